"""Tests of ``spiral_rt.ops.chunk_attention`` (and its plan and shared-prefix composition).

Ground truth: dense attention in fp64 over keys gathered position by position from the page
lists (independent of the reference's gather). Cases: varlen batches whose lengths are not tile
multiples, one-frame chunks, a sequence without context (LSE = -inf, O = 0), a sequence without
queries, pages shared between sequences, page_size not a power of two, sink + window + own page
lists with out-of-order ids, GQA, D = 64 and 128, forced KV splits (some empty).

Tolerances. Reference (fp32 math) vs fp64: 1e-5 (O, relative to max |O|) and 1e-5 (LSE).
Triton under the interpreter: fp32 inputs 1e-5 for O and LSE; fp16 inputs 4e-3 for O (the fp16
rounding of P and of O), 1e-3 for LSE. GPU (bf16/fp16): the kernel's max error against an fp32
reference is at most twice that of PyTorch's own SDPA in the same dtype (flash-attention's test
criterion), LSE within 2e-2 absolute of the fp32 LSE.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from spiral_rt.ops import dispatch
from spiral_rt.ops.chunk_attention import (
    CUDA_BLOCK_NS,
    AttentionConfig,
    _choose_splits,
    _short_units,
    _tail_split,
    chunk_attention,
    chunk_attention_shared_prefix,
    cuda_work_tables,
    plan_chunk_attention,
)
from spiral_rt.ops.merge_states import merge_states
from spiral_rt.reference.chunk_attention import chunk_attention as chunk_attention_ref

# the interpreter converts loaded scalars with a numpy deprecation warning; harmless
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


@dataclasses.dataclass
class Batch:
    q_indptr: list
    kv_indptr: list
    kv_indices: list
    last: list
    page_size: int
    num_pages: int
    seqs: list  # (q_len, pages, kv_len)


def make_batch(seqs, page_size, num_pages):
    """seqs: list of (q_len, page ids, kv_len) with kv_len consistent with the page count."""
    q_ptr, kv_ptr, idx, last = [0], [0], [], []
    for q_len, pages, kv_len in seqs:
        assert (kv_len == 0) == (len(pages) == 0) and (len(pages) - 1) * page_size < kv_len <= len(pages) * page_size or not pages
        q_ptr.append(q_ptr[-1] + q_len)
        kv_ptr.append(kv_ptr[-1] + len(pages))
        idx += pages
        last.append(kv_len - (len(pages) - 1) * page_size if pages else 0)
    return Batch(q_ptr, kv_ptr, idx, last, page_size, num_pages, seqs)


def dense_attention_fp64(q, k_pages, v_pages, b: Batch, sm_scale=None):
    """fp64 attention, keys gathered one logical position at a time."""
    total_q, heads, d = q.shape
    group = heads // k_pages.shape[2]
    scale = sm_scale or 1 / math.sqrt(d)
    o = torch.zeros(total_q, heads, d, dtype=torch.float64)
    lse = torch.full((total_q, heads), float("-inf"), dtype=torch.float64)
    kf, vf = k_pages.double().cpu(), v_pages.double().cpu()
    qd = q.double().cpu()
    for s, (q_len, pages, kv_len) in enumerate(b.seqs):
        if q_len == 0 or kv_len == 0:
            continue
        j = torch.arange(kv_len)
        page = torch.tensor(pages)[j // b.page_size]
        k = kf[page, j % b.page_size].repeat_interleave(group, 1)
        v = vf[page, j % b.page_size].repeat_interleave(group, 1)
        q0 = b.q_indptr[s]
        sc = torch.einsum("qhd,khd->hqk", qd[q0:q0 + q_len], k) * scale
        lse[q0:q0 + q_len] = torch.logsumexp(sc, -1).T
        o[q0:q0 + q_len] = torch.einsum("hqk,khd->qhd", torch.softmax(sc, -1), v)
    return o, lse


def plan_for(b: Batch, heads, d, dtype, device, kv_heads=None, config=None):
    return plan_chunk_attention(b.q_indptr, b.kv_indptr, b.kv_indices, b.last, page_size=b.page_size,
                                num_pages=b.num_pages, num_qo_heads=heads, num_kv_heads=kv_heads, head_dim=d,
                                dtype=dtype, device=device, config=config)


def random_inputs(b: Batch, heads, kv_heads, d, dtype, device):
    q = torch.randn(b.q_indptr[-1], heads, d, device=device).to(dtype)
    k_pages = torch.randn(b.num_pages, b.page_size, kv_heads, d, device=device).to(dtype)
    v_pages = torch.randn(b.num_pages, b.page_size, kv_heads, d, device=device).to(dtype)
    return q, k_pages, v_pages


def check_against_fp64(o, lse, q, k_pages, v_pages, b, o_tol, lse_tol):
    o_ref, lse_ref = dense_attention_fp64(q, k_pages, v_pages, b)
    o, lse = o.double().cpu(), lse.double().cpu()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref)), "empty-context rows must have LSE = -inf exactly"
    finite = torch.isfinite(lse_ref)
    torch.testing.assert_close(lse[finite], lse_ref[finite], rtol=0, atol=lse_tol)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=o_tol * max(o_ref.abs().max().item(), 1e-30))
    assert (o[~finite] == 0).all()


# A window/sink-like batch: page_size 7 (not a power of two), out-of-order ids, shared pages.
SINK = [12, 3]
WINDOW = [17, 8, 0]
VARLEN = [
    (23, SINK + WINDOW + [5, 14], 6 * 7 + 4),   # sink + window + own chunk, partial last page
    (7, [5], 7),                                # one-frame chunk, no context: only its own page
    (9, [], 0),                                 # no keys at all: O = 0, LSE = -inf
    (0, [1, 2], 10),                            # no queries
    (16, SINK + [9, 11, 10], 5 * 7),            # shares the sink pages, exactly full pages
]


# The same shapes with page_size 21 > BLOCK_N: key tiles straddle page boundaries (two-page lookup).
VARLEN_21 = [
    (23, [12, 3, 17, 8, 0], 4 * 21 + 5),
    (7, [5], 21),
    (9, [], 0),
    (19, [12, 3, 9], 3 * 21),
]


def test_reference_matches_fp64():
    b = make_batch(VARLEN, page_size=7, num_pages=18)
    q, kp, vp = random_inputs(b, 4, 2, 24, torch.float32, "cpu")
    o, lse = chunk_attention_ref(q, kp, vp, b.q_indptr, b.kv_indptr, b.kv_indices, b.last)
    check_against_fp64(o, lse, q, kp, vp, b, 1e-5, 1e-5)


@pytest.mark.parametrize("dtype,o_tol,lse_tol", [(torch.float32, 1e-5, 1e-5), (torch.float16, 4e-3, 1e-3)])
@pytest.mark.parametrize("config", [
    AttentionConfig(block_m=16, block_n=16, num_warps=4, num_stages=1, num_splits=1),
    AttentionConfig(block_m=32, block_n=16, num_warps=4, num_stages=1, num_splits=3),
    AttentionConfig(block_m=16, block_n=16, num_warps=4, num_stages=1, num_splits=1, kv_load="tma"),
], ids=["m16n16", "m32n16-split3", "m16n16-tma"])
def test_triton_varlen_paged(triton_device, dtype, o_tol, lse_tol, config):
    b = make_batch(VARLEN, page_size=7, num_pages=18)
    q, kp, vp = random_inputs(b, 4, 2, 64, dtype, triton_device)
    plan = plan_for(b, 4, 64, dtype, triton_device, kv_heads=2, config=config)
    o, lse = chunk_attention(q, kp, vp, plan, backend="triton")
    assert o.dtype == dtype and lse.dtype == torch.float32 and o.shape == q.shape
    check_against_fp64(o, lse, q, kp, vp, b, o_tol, lse_tol)


@pytest.mark.parametrize("variant", ["hoist", "gather", "tma"])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_triton_tiles_straddle_pages(triton_device, variant, num_splits):
    b = make_batch(VARLEN_21, page_size=21, num_pages=18)
    q, kp, vp = random_inputs(b, 2, 2, 64, torch.float32, triton_device)
    cfg = AttentionConfig(block_m=16, block_n=16, num_warps=4, num_stages=1, num_splits=num_splits,
                          hoist_pages=variant == "hoist", kv_load="tma" if variant == "tma" else "pointer")
    o, lse = chunk_attention(q, kp, vp, plan_for(b, 2, 64, torch.float32, triton_device, config=cfg), backend="triton")
    check_against_fp64(o, lse, q, kp, vp, b, 1e-5, 1e-5)


def test_triton_head_dim_128_page_size_13(triton_device):
    b = make_batch([(21, [4, 1, 0], 2 * 13 + 1), (13, [2, 3], 26)], page_size=13, num_pages=5)
    q, kp, vp = random_inputs(b, 2, 2, 128, torch.float16, triton_device)
    plan = plan_for(b, 2, 128, torch.float16, triton_device, config=AttentionConfig(16, 32, 4, 1, 1))
    o, lse = chunk_attention(q, kp, vp, plan, backend="triton", sm_scale=0.05)
    o_ref, lse_ref = chunk_attention_ref(q.double(), kp.double(), vp.double(), b.q_indptr, b.kv_indptr,
                                         b.kv_indices, b.last, sm_scale=0.05)
    torch.testing.assert_close(o.double(), o_ref, rtol=0, atol=4e-3 * o_ref.abs().max().item())
    torch.testing.assert_close(lse.double(), lse_ref, rtol=0, atol=1e-3)


def test_shared_prefix_equals_full_attention(triton_device):
    """G = 3 members share 3 prefix pages; each has 2 own pages; prefix + own merged == full."""
    ps, prefix = 5, [7, 2, 9]
    own = [[0, 4], [1, 6], [3, 8]]
    q_lens = [10, 10, 10]
    full = make_batch([(ql, prefix + o, 5 * ps - 2) for ql, o in zip(q_lens, own)], ps, 10)
    pre = make_batch([(sum(q_lens), prefix, 3 * ps)], ps, 10)
    suf = make_batch([(ql, o, 2 * ps - 2) for ql, o in zip(q_lens, own)], ps, 10)
    q, kp, vp = random_inputs(full, 2, 2, 64, torch.float32, triton_device)
    cfg = AttentionConfig(16, 16, 4, 1, 1)
    merged = chunk_attention_shared_prefix(q, kp, vp, plan_for(pre, 2, 64, torch.float32, triton_device, config=cfg),
                                           plan_for(suf, 2, 64, torch.float32, triton_device, config=cfg),
                                           backend="triton")
    check_against_fp64(merged.o, merged.lse, q, kp, vp, full, 1e-5, 1e-5)


def test_merge_pieces_combines_split_key_ranges_exactly(triton_device):
    """The CUDA path's merge (kernels/chunk_attention.py merge_pieces) on states computed in fp32
    over key pieces (one of them empty) equals attention over all keys; rows of other units and
    heads are left alone. fp32: within 1e-5."""
    from spiral_rt.kernels.chunk_attention import merge_pieces

    torch.manual_seed(7)
    total_q, heads, d, rows = 21, 3, 64, 16  # piece slots of 16 rows (the CUDA kernel's are 128)
    q = torch.randn(total_q, heads, d, device=triton_device)
    k = torch.randn(40, heads, d, device=triton_device)
    v = torch.randn(40, heads, d, device=triton_device)

    def state(q0, q1, head, k0, k1):
        s = q[q0:q1, head] @ k[k0:k1, head].T / math.sqrt(d)
        lse = torch.logsumexp(s, dim=1) if k1 > k0 else torch.full((q1 - q0,), float("-inf"), device=q.device)
        o = torch.softmax(s, dim=1) @ v[k0:k1, head] if k1 > k0 else torch.zeros(q1 - q0, d, device=q.device)
        return o, lse

    units = [(0, 16, 1, [0, 13, 13, 40]), (16, 21, 2, [0, 25, 40]), (0, 16, 0, [0, 40])]  # key cuts per unit
    part_o = torch.full((6, rows, d), float("nan"), device=q.device)
    part_lse = torch.full((6, rows), float("nan"), device=q.device)
    merge, slot = [], 0
    for q0, q1, head, cuts in units:
        for i in range(len(cuts) - 1):
            part_o[slot + i, :q1 - q0], part_lse[slot + i, :q1 - q0] = state(q0, q1, head, cuts[i], cuts[i + 1])
        merge.append((q0, q1, head, slot, len(cuts) - 1))
        slot += len(cuts) - 1
    o = torch.full((total_q, heads, d), 5.0, device=q.device)
    lse = torch.full((total_q, heads), 5.0, device=q.device)
    merge_pieces(part_o, part_lse, torch.tensor(merge, dtype=torch.int32, device=q.device), o, lse)
    covered = torch.zeros(total_q, heads, dtype=torch.bool)
    for q0, q1, head, _ in units:
        o_ref, lse_ref = state(q0, q1, head, 0, 40)
        torch.testing.assert_close(o[q0:q1, head], o_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[q0:q1, head], lse_ref, atol=1e-5, rtol=1e-5)
        covered[q0:q1, head] = True
    assert (o[~covered] == 5.0).all() and (lse[~covered] == 5.0).all()


def test_empty_context_merges_exactly(triton_device):
    """A launch over no keys gives (0, -inf); merging it with a real state returns that state."""
    b_empty = make_batch([(11, [], 0)], 6, 4)
    b_real = make_batch([(11, [3, 1], 9)], 6, 4)
    q, kp, vp = random_inputs(b_real, 2, 2, 64, torch.float32, triton_device)
    cfg = AttentionConfig(16, 16, 4, 1, 1)
    e = chunk_attention(q, kp, vp, plan_for(b_empty, 2, 64, torch.float32, triton_device, config=cfg), backend="triton")
    assert torch.isneginf(e.lse).all() and (e.o == 0).all()
    r = chunk_attention(q, kp, vp, plan_for(b_real, 2, 64, torch.float32, triton_device, config=cfg), backend="triton")
    m = merge_states(e.o, e.lse, r.o, r.lse, backend="triton")
    torch.testing.assert_close(m.o, r.o, rtol=0, atol=1e-6)
    torch.testing.assert_close(m.lse, r.lse, rtol=0, atol=1e-6)


def test_plan_partition_covers_every_query_key_pair_once():
    b = make_batch(VARLEN, page_size=7, num_pages=18)
    for cfg in (AttentionConfig(16, 16, 4, 1, 1), AttentionConfig(32, 16, 4, 1, 3), AttentionConfig(128, 64, 8, 3, 4)):
        plan = plan_for(b, 4, 64, torch.bfloat16, "cpu", config=cfg)
        cover = [torch.zeros(ql, kl, dtype=torch.int32) for ql, _, kl in b.seqs]
        seen_rows = torch.zeros(b.q_indptr[-1], cfg.num_splits, dtype=torch.int32)
        for seq, q0, q1, k0, k1, sp in plan.work.tolist():
            assert q1 - q0 <= cfg.block_m and 0 <= k0 <= k1 <= plan.kv_lens[seq]
            base = b.q_indptr[seq]
            cover[seq][q0 - base:q1 - base, k0:k1] += 1
            seen_rows[q0:q1, sp] += 1
        assert all(bool((c == 1).all()) for c in cover)
        assert (seen_rows == 1).all(), "every row must be written exactly once per split"


@pytest.mark.parametrize("num_splits", [1, 3])
def test_tma_plan_covers_every_key_once(num_splits):
    """kv_load='tma': per q-row, whole in-page tiles + leftovers list every key of the sequence once."""
    b = make_batch(VARLEN_21, page_size=21, num_pages=18)
    cfg = AttentionConfig(16, 16, 4, 1, num_splits, kv_load="tma")
    plan = plan_for(b, 2, 64, torch.bfloat16, "cpu", config=cfg)
    tiles, left = plan.tile_rows.tolist(), plan.left_rows.tolist()
    keys_of_row = {}
    for seq, q0, q1, t0, t1, l0, l1, sp in plan.work.tolist():
        rows = [r + i for r in tiles[t0:t1] for i in range(16)] + left[l0:l1]
        assert all(r // 21 == tiles[t] // 21 for t in range(t0, t1) for r in (tiles[t], tiles[t] + 15)), "tile crosses a page"
        for q in range(q0, q1):
            keys_of_row.setdefault(q, []).extend(rows)
    for s, (q_len, pages, kv_len) in enumerate(b.seqs):
        expected = sorted(pages[j // 21] * 21 + j % 21 for j in range(kv_len))
        for q in range(b.q_indptr[s], b.q_indptr[s] + q_len):
            assert sorted(keys_of_row.get(q, [])) == expected


def test_split_choice_by_shape():
    # one Wan chunk, 12 heads, 132 SMs: short context stays unsplit, long context splits
    assert _choose_splits([4680], [4680], 12, 128, 128, 64, 132, 1) == 1
    assert _choose_splits([4680], [32760], 12, 128, 128, 64, 132, 1) >= 2
    assert _choose_splits([4680] * 8, [18720] * 8, 12, 128, 128, 64, 132, 1) == 1
    assert _choose_splits([0], [100], 12, 128, 128, 64, 132, 1) == 1


def test_reference_backend_through_op():
    b = make_batch(VARLEN, page_size=7, num_pages=18)
    q, kp, vp = random_inputs(b, 2, 2, 64, torch.float32, "cpu")
    o, lse = chunk_attention(q, kp, vp, plan_for(b, 2, 64, torch.float32, "cpu"), backend="reference")
    check_against_fp64(o, lse, q, kp, vp, b, 1e-5, 1e-5)


def test_plan_validation_errors():
    b = make_batch(VARLEN, page_size=7, num_pages=18)
    kw = dict(page_size=7, num_pages=18, num_qo_heads=4, head_dim=64, device="cpu")
    with pytest.raises(ValueError, match="'kv_indices' entry 2 is page 18, out of range"):
        plan_chunk_attention(b.q_indptr, b.kv_indptr, [12, 3, 18] + b.kv_indices[3:], b.last, **kw)
    with pytest.raises(ValueError, match="'kv_indices'.*-1"):
        plan_chunk_attention(b.q_indptr, b.kv_indptr, [-1] + b.kv_indices[1:], b.last, **kw)
    with pytest.raises(ValueError, match="'kv_indptr' ends at"):
        plan_chunk_attention(b.q_indptr, b.kv_indptr, b.kv_indices[:-1], b.last, **kw)
    with pytest.raises(ValueError, match="'kv_indptr' must have 6 entries"):
        plan_chunk_attention(b.q_indptr, b.kv_indptr[:-1], b.kv_indices, b.last, **kw)
    with pytest.raises(ValueError, match="'q_indptr' must be non-decreasing"):
        plan_chunk_attention([0, 5, 3, 9, 9, 12], b.kv_indptr, b.kv_indices, b.last, **kw)
    with pytest.raises(ValueError, match="'q_indptr' must start at 0"):
        plan_chunk_attention([1] + b.q_indptr[1:], b.kv_indptr, b.kv_indices, b.last, **kw)
    with pytest.raises(ValueError, match="'kv_last_page_len' entry 0 is 8"):
        plan_chunk_attention(b.q_indptr, b.kv_indptr, b.kv_indices, [8] + b.last[1:], **kw)
    with pytest.raises(ValueError, match="'kv_last_page_len' entry 0 is 0"):
        plan_chunk_attention(b.q_indptr, b.kv_indptr, b.kv_indices, [0] + b.last[1:], **kw)
    with pytest.raises(ValueError, match="'kv_last_page_len' entry 2 is 3.*no pages"):
        plan_chunk_attention(b.q_indptr, b.kv_indptr, b.kv_indices, b.last[:2] + [3] + b.last[3:], **kw)
    with pytest.raises(ValueError, match="'head_dim' is 96"):
        plan_chunk_attention(b.q_indptr, b.kv_indptr, b.kv_indices, b.last, **{**kw, "head_dim": 96})
    with pytest.raises(ValueError, match="'num_kv_heads'"):
        plan_chunk_attention(b.q_indptr, b.kv_indptr, b.kv_indices, b.last, num_kv_heads=3, **kw)
    with pytest.raises(ValueError, match="'kv_indices' must be an integer tensor"):
        plan_chunk_attention(b.q_indptr, b.kv_indptr, torch.tensor(b.kv_indices, dtype=torch.float32), b.last, **kw)
    with pytest.raises(ValueError, match="'block_n'"):
        AttentionConfig(block_n=48)


def test_call_checks_against_plan():
    b = make_batch(VARLEN, page_size=7, num_pages=18)
    q, kp, vp = random_inputs(b, 4, 2, 64, torch.float32, "cpu")
    plan = plan_for(b, 4, 64, torch.float32, "cpu", kv_heads=2)
    with pytest.raises(ValueError, match="'q' must have shape"):
        chunk_attention(q[:-1], kp, vp, plan, backend="reference")
    with pytest.raises(ValueError, match="'q' must have dtype"):
        chunk_attention(q.half(), kp, vp, plan, backend="reference")
    with pytest.raises(ValueError, match="'k_pages' must have shape"):
        chunk_attention(q, kp[:-1], vp, plan, backend="reference")
    with pytest.raises(ValueError, match="'v_pages' must be contiguous"):
        chunk_attention(q, kp, vp.transpose(2, 3).contiguous().transpose(2, 3), plan, backend="reference")
    with pytest.raises(ValueError, match="'plan'"):
        chunk_attention(q, kp, vp, None, backend="reference")
    with pytest.raises(ValueError, match="'sm_scale'"):
        chunk_attention(q, kp, vp, plan, sm_scale=-1.0, backend="reference")


@pytest.mark.parametrize("block_n,splits,num_sms", [(112, 1, 132), (16, 3, 132), (5, 2, 132), (5, 0, 12), (16, 0, 132)])
def test_cuda_partition_covers_every_key_once_within_pages(block_n, splits, num_sms):
    """Every (query block, head) unit runs whole or as contiguous pieces named by one merge row;
    either way its tiles list the sequence's keys in order, each tile inside one page."""
    b = make_batch(VARLEN, page_size=7, num_pages=18)
    order, heads = [4, 0, 1, 2, 3], 3
    work, tiles, merge, pieces, *_ = cuda_work_tables(b.q_indptr, b.kv_indptr, b.kv_indices, b.last, b.page_size, order,
                                                  block_n, heads, splits, num_sms)
    assert sorted(w[5] for w in work if w[5] >= 0) == list(range(pieces))
    assert sum(m[4] for m in merge) == pieces and len({(m[0], m[2]) for m in merge}) == len(merge)
    units = {}
    for q0, q1, t0, t1, head, slot in work:
        units.setdefault((q0, q1, head), []).append((slot, t0, t1))
    expected_units = {(q0, min(q0 + 128, b.q_indptr[s + 1]), h) for s in range(len(b.seqs)) for h in range(heads)
                      for q0 in range(b.q_indptr[s], b.q_indptr[s + 1], 128)}
    assert set(units) == expected_units
    for (q0, q1, head), rows in units.items():
        s = next(i for i in range(len(b.seqs)) if b.q_indptr[i] <= q0 < b.q_indptr[i + 1])
        _, pages, kv_len = b.seqs[s]
        rows.sort()
        if rows[0][0] < 0:
            assert len(rows) == 1
        else:
            (first, n), = [(m[3], m[4]) for m in merge if (m[0], m[1], m[2]) == (q0, q1, head)]
            assert [r[0] for r in rows] == list(range(first, first + n))
            assert all(rows[i][2] == rows[i + 1][1] for i in range(n - 1))  # contiguous pieces
            if splits:
                assert n == splits
        keys = []
        for _, t0, t1 in rows:
            for page, packed in tiles[t0:t1]:
                row0, valid = packed & 0xFFFF, packed >> 16
                assert 1 <= valid <= block_n and row0 + valid <= b.page_size
                keys += [(page, row0 + r) for r in range(valid)]
        assert keys == [(pages[i // b.page_size], i % b.page_size) for i in range(kv_len)]
    if splits == 0 and num_sms == 12:
        assert pieces > 0  # twelve SMs: the long units of the one wave run as pieces


def test_cuda_tail_split_by_shape():
    # one Wan chunk at 176-key tiles (9 a page), 37 row blocks x 12 heads = 444 units on 132 SMs:
    # the 48 units of the last wave run as halves (4.0 -> 3.5 waves)
    for frames in (3, 12, 21):
        assert _tail_split([9 * frames] * 444, 132) == [1] * 396 + [2] * 48
    assert _tail_split([27] * 396, 132) == [1] * 396  # three whole waves: nothing to gain
    assert _tail_split([189] * 3552, 132) == [1] * 3552  # eight members: 27 waves, tail too small
    assert _tail_split([6] * 100, 132) == [1] * 100  # pieces would be shorter than 4 tiles
    assert _tail_split([], 132) == []
    # one wave of long and short units on 64 SMs: the long ones are split, units without enough
    # tiles (here none at all) stay whole
    pieces = _tail_split([40] * 10 + [20] * 30 + [0] * 5, 64)
    assert all(p >= 2 for p in pieces[:10]) and pieces[-5:] == [1] * 5


def _kernel_tile_loads(work, tiles, num_sms, distinct=None, keys=None, group=1):
    """A Python model of the CUDA kernel's persistent schedule (csrc/chunk_attention_sm90.cu): per
    CTA, the items it runs and how many key tiles its producer loads; an item whose key range
    (after the distinct-keys rewrite, when ``distinct`` is given) is the one tile its CTA's previous
    item read for the same KV head loads nothing."""
    whole = [w for w in work if w[5] < 0]
    ctas = min(len(whole), num_sms)

    def key_range(w):
        t0, t1 = w[2], w[3]
        if distinct is not None:  # tiles from the first one without keys read nothing (key_range_end)
            for t in range(t0, t1):
                s, key0, _ = keys[t]
                if key0 > distinct[s]:
                    return t0, t
        return t0, t1

    loads, per_cta = 0, []
    for b in range(ctas):
        items = whole[b::ctas]
        per_cta.append(items)
        prev = None
        for w in items:
            t0, t1 = key_range(w)
            cur = (t0, t1, w[4] // group)
            same = prev is not None and t1 == t0 + 1 and prev[1] == prev[0] + 1 and prev[0] == t0 and prev[2] == cur[2]
            loads += 0 if same else t1 - t0
            prev = cur
    return loads, per_cta


def test_cross_attention_units_run_per_cta_and_reuse_their_tile():
    """Uniform units of <= 3 tiles (text pages) are laid out so that each persistent CTA runs a
    contiguous run of the original order (one head's row blocks back to back), every unit once;
    with a 128-token prompt's distinct rows (one tile an item), the modelled producer loads one tile
    per (CTA, head) run instead of one per item. Units of many tiles keep the strided order."""
    heads, rows_q = 12, 4680
    b = make_batch([(rows_q, [0], 512)], page_size=512, num_pages=1)
    order = [0]
    work, tiles, _, pieces, keys, _ = cuda_work_tables(b.q_indptr, b.kv_indptr, b.kv_indices, b.last, 512, order,
                                                    176, heads, 0, 132)
    units = [(q0, min(q0 + 128, rows_q), h) for h in range(heads) for q0 in range(0, rows_q, 128)]
    assert pieces == 0 and len(work) == len(units) == 444
    assert sorted((w[0], w[1], w[4]) for w in work) == sorted(units)
    strided_runs = [work[c::132] for c in range(132)]
    flat = [(w[0], w[1], w[4]) for run in strided_runs for w in run]
    assert flat == units  # CTA 0's run, then CTA 1's, ...: the original order
    assert [len(r) for r in strided_runs] == [4] * 48 + [3] * 84
    loads, _ = _kernel_tile_loads(work, tiles, 132, distinct=[128], keys=keys)
    runs_by_head = sum(len({w[4] for w in run}) for run in strided_runs)
    assert loads == runs_by_head < 160  # ~1.1 loads a CTA against 444 (one an item)
    assert _short_units(work)  # the kernel variant with two Q buffers runs them
    # self-attention units (27 tiles: a 3-frame chunk) keep the strided, longest-first order
    b = make_batch([(rows_q, [0, 1, 2], 3 * 1560)], page_size=1560, num_pages=3)
    work, *_ = cuda_work_tables(b.q_indptr, b.kv_indptr, b.kv_indices, b.last, 1560, order, 176, heads, 1, 132)
    assert [(w[0], w[4]) for w in work] == [(q0, h) for h in range(heads) for q0 in range(0, rows_q, 128)]
    assert not _short_units(work)


def test_distinct_key_tiles_kernel_matches_reference():
    """The one-launch tile rewrite for distinct keys (Triton, interpreted here) equals the PyTorch
    formula on random tile tables: tiles at page starts and inside pages, short last tiles, counts
    below 0, at every tile edge, at and past the sequence's length."""
    from spiral_rt.kernels import chunk_attention as kernel
    from spiral_rt.ops.chunk_attention import distinct_key_tiles_reference

    gen = torch.Generator().manual_seed(3)
    rows, keys, counts = [], [], []
    for s in range(7):
        kv_len = int(torch.randint(1, 900, (1,), generator=gen))
        for key0 in range(0, kv_len, 176):
            rows.append((int(torch.randint(0, 50, (1,), generator=gen)), (key0 % 512) | min(176, kv_len - key0) << 16))
            keys.append((s, key0, kv_len))
        counts.append(int(torch.randint(-2, kv_len + 3, (1,), generator=gen)))
    counts[0], counts[1] = 176, 175  # the repeated key at a tile's first and last row
    tiles, tile_keys = torch.tensor(rows, dtype=torch.int32), torch.tensor(keys, dtype=torch.int32)
    distinct = torch.tensor(counts, dtype=torch.int32)
    got_tiles, got_log2 = kernel.distinct_key_tiles(tiles, tile_keys, distinct)
    want_tiles, want_log2 = distinct_key_tiles_reference(tiles, tile_keys, distinct)
    assert torch.equal(got_tiles, want_tiles)
    assert (want_tiles[:, 1] >> 30).sum() > 0  # some tiles carry the counted key
    torch.testing.assert_close(got_log2, want_log2, rtol=1e-6, atol=0)


def test_short_units():
    """The one-stage, two-Q-buffer kernel variant is for whole items that all span the same few tiles."""
    def items(*spans):
        return [(0, 128, 10 * i, 10 * i + n, 0, -1) for i, n in enumerate(spans)]

    assert _short_units(items(1, 1, 1)) and _short_units(items(3, 3)) and _short_units(items(0))
    assert not _short_units(items(4, 4))  # too many tiles: the K/V prefetch matters
    assert not _short_units(items(1, 2))  # not alike
    assert not _short_units([])


def test_cuda_backend_refuses_plans_it_cannot_run():
    b = make_batch(VARLEN, page_size=7, num_pages=18)
    q, kp, vp = random_inputs(b, 2, 2, 64, torch.float32, "cpu")
    plan = plan_for(b, 2, 64, torch.float32, "cpu")
    assert plan.cuda_work is None and "head_dim 128" in plan.cuda_reason
    with pytest.raises(ValueError, match="backend 'cuda' cannot run these inputs: it supports head_dim 128"):
        chunk_attention(q, kp, vp, plan, backend="cuda")
    with pytest.raises(ValueError, match="cuda_block_n"):
        AttentionConfig(cuda_block_n=100)
    if dispatch.CUDA_KERNELS_BUILT:
        assert tuple(dispatch.NATIVE.CHUNK_ATTENTION_BLOCK_NS) == CUDA_BLOCK_NS


def own_rows_of(b: Batch, own_pages, k_pages, v_pages, q_heads):
    """What a fused QKV projection would hold: a (N * page_size, 3, ...) buffer whose k and v thirds
    carry each sequence's last own_pages[s] pool pages (own page order), row stride 3x the row;
    returns (buffer, own_k, own_v, the pool ids of the own pages). Rows past a partial last page are
    NaN (never read)."""
    n, ps = sum(own_pages), b.page_size
    kv_heads, d = k_pages.shape[2:]
    assert q_heads == kv_heads  # the q third has the k third's shape here
    buf = torch.full((n * ps, 3, kv_heads, d), float("nan"), dtype=k_pages.dtype, device=k_pages.device)
    ids, i = [], 0
    for (_, plist, kv_len), count in zip(b.seqs, own_pages):
        for j, page in enumerate(plist[len(plist) - count:]):
            rows = min(ps, kv_len - (len(plist) - count + j) * ps)
            buf[i * ps:i * ps + rows, 1] = k_pages[page, :rows]
            buf[i * ps:i * ps + rows, 2] = v_pages[page, :rows]
            ids.append(page)
            i += 1
    return buf, buf[:, 1], buf[:, 2], ids


def test_own_pages_read_from_own_rows_reference():
    """A plan with own_pages reads each sequence's last pages from the own rows (strided views of a
    QKV-like buffer) and never from the pool: with those pool pages poisoned, the result equals the
    pool-only result exactly. Partial last pages, a sequence without queries, shared pool pages."""
    b = make_batch(VARLEN, page_size=7, num_pages=18)
    own_pages = [2, 1, 0, 1, 1]
    q, kp, vp = random_inputs(b, 2, 2, 64, torch.float32, "cpu")
    plain = plan_for(b, 2, 64, torch.float32, "cpu")
    o_ref, lse_ref = chunk_attention(q, kp, vp, plain, backend="reference")
    plan = plan_chunk_attention(b.q_indptr, b.kv_indptr, b.kv_indices, b.last, page_size=7, num_pages=18,
                                num_qo_heads=2, head_dim=64, dtype=torch.float32, device="cpu", own_pages=own_pages)
    _, own_k, own_v, ids = own_rows_of(b, own_pages, kp, vp, 2)
    kp2, vp2 = kp.clone(), vp.clone()
    kp2[ids], vp2[ids] = float("nan"), float("nan")
    o, lse = chunk_attention(q, kp2, vp2, plan, own_k=own_k, own_v=own_v, backend="reference")
    assert torch.equal(o, o_ref) and torch.equal(lse, lse_ref)
    o, lse = chunk_attention(q, kp, vp, plan, backend="reference")  # without own rows: the pool
    assert torch.equal(o, o_ref) and torch.equal(lse, lse_ref)


def test_own_pages_tiles_name_own_pages():
    """The CUDA partition's own-tile table: the tiles of each sequence's own pages name own page i as
    i | 1 << 31, in sequence order; every other tile and every row word is the pool table's."""
    b = make_batch(VARLEN, page_size=7, num_pages=18)
    own_pages = [2, 1, 0, 1, 1]
    order = sorted(range(len(b.seqs)), key=lambda s: -b.seqs[s][2])
    _, tiles, _, _, keys, own_tiles = cuda_work_tables(b.q_indptr, b.kv_indptr, b.kv_indices, b.last, b.page_size,
                                                       order, 112, 2, 1, 132, own_pages)
    base = [sum(own_pages[:s]) for s in range(len(own_pages))]
    flagged = 0
    for (page, word), (own_page, own_word), (s, key0, _) in zip(tiles, own_tiles, keys):
        assert own_word == word
        plist = b.seqs[s][1]
        i = key0 // b.page_size  # the tile's page position in the sequence's list
        first_own = len(plist) - own_pages[s]
        if i >= first_own:
            assert own_page < 0 and own_page + 2**31 == base[s] + i - first_own
            flagged += 1
        else:
            assert own_page == page
    assert flagged == sum(1 for s, (_, plist, _) in enumerate(b.seqs) if b.q_indptr[s + 1] > b.q_indptr[s]
                          for _ in plist[len(plist) - own_pages[s]:])


def test_own_pages_errors_name_the_argument():
    b = make_batch(VARLEN, page_size=7, num_pages=18)
    q, kp, vp = random_inputs(b, 2, 2, 64, torch.float32, "cpu")
    kw = dict(page_size=7, num_pages=18, num_qo_heads=2, head_dim=64, dtype=torch.float32, device="cpu")
    args = (b.q_indptr, b.kv_indptr, b.kv_indices, b.last)
    with pytest.raises(ValueError, match="'own_pages' entry 1 is 2"):
        plan_chunk_attention(*args, own_pages=[0, 2, 0, 0, 0], **kw)
    with pytest.raises(ValueError, match="'own_pages' must have 5 entries"):
        plan_chunk_attention(*args, own_pages=[1, 1], **kw)
    plan = plan_chunk_attention(*args, own_pages=[2, 1, 0, 1, 1], **kw)
    _, own_k, own_v, _ = own_rows_of(b, [2, 1, 0, 1, 1], kp, vp, 2)
    with pytest.raises(ValueError, match="'own_k' and 'own_v' go together"):
        chunk_attention(q, kp, vp, plan, own_k=own_k)
    with pytest.raises(ValueError, match="'own_k' needs a plan built with own_pages"):
        chunk_attention(q, kp, vp, plan_for(b, 2, 64, torch.float32, "cpu"), own_k=own_k, own_v=own_v)
    with pytest.raises(ValueError, match="'own_v'"):
        chunk_attention(q, kp, vp, plan, own_k=own_k, own_v=own_v[:-1])
    with pytest.raises(ValueError, match="'own_k' must have contiguous heads"):
        chunk_attention(q, kp, vp, plan, own_k=own_k.transpose(1, 2).contiguous().transpose(1, 2), own_v=own_v)
    with pytest.raises(ValueError, match="triton"):
        chunk_attention(q, kp, vp, plan, own_k=own_k, own_v=own_v, backend="triton")
    with pytest.raises(ValueError, match="own pages"):
        plan.with_distinct_keys(torch.zeros(5, dtype=torch.int32))


def test_custom_op_has_fake_kernel():
    b = make_batch(VARLEN, page_size=7, num_pages=18)
    q, kp, vp = random_inputs(b, 2, 2, 64, torch.float32, "cpu")
    plan = plan_for(b, 2, 64, torch.float32, "cpu")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        args = [mode.from_tensor(t) for t in (q, kp, vp, plan.q_indptr, plan.kv_indptr, plan.kv_indices,
                                               plan.kv_last_page_len, plan.work)]
        o, lse = torch.ops.spiral_rt.chunk_attention(*args, 0.125, 1, 16, 16, 4, 1, True, False, None, None, None, None,
                                                      176, None, 0, False, None, None, None, None, None, None, None, "triton")
        assert o.shape == q.shape and lse.shape == q.shape[:2] and lse.dtype == torch.float32


# ------------------------------------------------------------------------------------ GPU tests

WAN_PAGE = 1560


def _wan_batch(q_frames, ctx_frames, num_seqs=1, shared_ctx=False):
    """Sequences of q_frames own frames after ctx_frames context frames, one page per frame,
    page ids shuffled over the pool."""
    pages_per_seq = ctx_frames + q_frames
    total_pages = pages_per_seq * num_seqs if not shared_ctx else ctx_frames + q_frames * num_seqs
    perm = torch.randperm(total_pages).tolist()
    seqs = []
    for s in range(num_seqs):
        ctx = perm[:ctx_frames] if shared_ctx else perm[s * pages_per_seq:s * pages_per_seq + ctx_frames]
        own_start = ctx_frames + s * q_frames if shared_ctx else s * pages_per_seq + ctx_frames
        own = perm[own_start:own_start + q_frames]
        seqs.append((q_frames * WAN_PAGE, ctx + own, pages_per_seq * WAN_PAGE))
    return make_batch(seqs, WAN_PAGE, total_pages)


def _dense(pages, b, s):
    _, plist, kv_len = b.seqs[s]
    return pages[torch.tensor(plist, device=pages.device)].flatten(0, 1)[:kv_len]


def _sdpa_error_ratio(dtype, b, heads, d, config=None):
    """max|ours - fp32 ref| / max|sdpa(dtype) - fp32 ref| over all sequences; also the LSE error."""
    import torch.nn.functional as F

    q, kp, vp = random_inputs(b, heads, heads, d, dtype, "cuda")
    plan = plan_for(b, heads, d, dtype, "cuda", config=config)
    o, lse = chunk_attention(q, kp, vp, plan)
    err_ours = err_pt = lse_err = 0.0
    for s, (q_len, _, kv_len) in enumerate(b.seqs):
        q0 = b.q_indptr[s]
        qs = q[q0:q0 + q_len].transpose(0, 1)[None]
        ks, vs = _dense(kp, b, s).transpose(0, 1)[None], _dense(vp, b, s).transpose(0, 1)[None]
        scores = (qs.float() @ ks.float().transpose(-1, -2)) / math.sqrt(d)  # fp32 math, TF32 off
        ref = (torch.softmax(scores, -1) @ vs.float())[0].transpose(0, 1)
        lse_ref = torch.logsumexp(scores, -1)[0].T
        del scores
        pt = F.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1)
        err_ours = max(err_ours, (o[q0:q0 + q_len].float() - ref).abs().max().item())
        err_pt = max(err_pt, (pt.float() - ref).abs().max().item())
        lse_err = max(lse_err, (lse[q0:q0 + q_len] - lse_ref).abs().max().item())
    return err_ours, err_pt, lse_err


@pytest.mark.gpu
@pytest.mark.parametrize("ctx_frames", [0, 7])
def test_gpu_wan_chunk_error_within_twice_sdpa(ctx_frames):
    torch.backends.cuda.matmul.allow_tf32 = False
    b = _wan_batch(3, ctx_frames)
    err_ours, err_pt, lse_err = _sdpa_error_ratio(torch.bfloat16, b, 12, 128)
    assert err_ours <= 2 * err_pt + 1e-6, (err_ours, err_pt)
    assert lse_err < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 2, 3])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_varlen_shared_context_splits(num_splits, d):
    torch.backends.cuda.matmul.allow_tf32 = False
    b = _wan_batch(1, 2, num_seqs=3, shared_ctx=True)
    cfg = AttentionConfig(128, 64, 8 if d == 128 else 4, 3, num_splits)
    err_ours, err_pt, lse_err = _sdpa_error_ratio(torch.float16, b, 4, d, cfg)
    assert err_ours <= 2 * err_pt + 1e-6, (err_ours, err_pt)
    assert lse_err < 2e-2


BENCH_CONFIGS = [  # every variant bench/bench_attention.py may pick must be correct
    AttentionConfig(128, 64, 8, 3, 1), AttentionConfig(128, 64, 8, 4, 1), AttentionConfig(128, 128, 8, 2, 1),
    AttentionConfig(128, 128, 8, 3, 1), AttentionConfig(64, 64, 4, 3, 1), AttentionConfig(128, 64, 8, 3, 2),
    AttentionConfig(128, 64, 8, 3, 1, hoist_pages=False), AttentionConfig(128, 64, 8, 3, 1, kv_load="tma"),
    AttentionConfig(128, 128, 8, 2, 1, kv_load="tma"), AttentionConfig(128, 64, 8, 3, 2, kv_load="tma"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("config", BENCH_CONFIGS, ids=str)
@pytest.mark.parametrize("layout", ["page7", "page200"])
def test_gpu_bench_configs_correct(config, layout):
    if layout == "page7":
        b = make_batch(VARLEN, page_size=7, num_pages=18)
    elif layout == "page21":
        b = make_batch(VARLEN_21, page_size=21, num_pages=18)
    else:  # page_size > block_n: the two-page lookup path with long tiles
        b = make_batch([(300, [4, 0, 2], 2 * 200 + 77), (130, [1], 200), (5, [], 0)], page_size=200, num_pages=5)
    q, kp, vp = random_inputs(b, 4, 2, 128, torch.bfloat16, "cuda")
    try:
        o, lse = chunk_attention(q, kp, vp, plan_for(b, 4, 128, torch.bfloat16, "cuda", kv_heads=2, config=config),
                                 backend="triton")
    except Exception as err:  # a config over the shared-memory budget is skipped by the benchmark too
        if "OutOfResources" in type(err).__name__ or "out of resource" in str(err):
            pytest.skip(f"{config} exceeds this GPU's shared memory: {err}")
        raise
    check_against_fp64(o, lse, q, kp, vp, b, 1.6e-2, 2e-2)


def _poison_unused_rows(pages, b: Batch):
    """NaN in every page row that no sequence lists as a key: a kernel that reads one (instead of
    masking it) turns its output into NaN."""
    used = torch.zeros(pages.shape[:2], dtype=torch.bool)
    for _, plist, kv_len in b.seqs:
        for i, page in enumerate(plist):
            used[page, :min(b.page_size, kv_len - i * b.page_size)] = True
    pages[~used.to(pages.device)] = float("nan")


CUDA_LAYOUTS = {
    "page7": lambda: make_batch(VARLEN, page_size=7, num_pages=18),
    "page200": lambda: make_batch([(300, [4, 0, 2], 2 * 200 + 77), (130, [1], 200), (5, [], 0)], page_size=200,
                                  num_pages=6),
    "wan": lambda: _wan_batch(1, 2, num_seqs=3, shared_ctx=True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("layout", list(CUDA_LAYOUTS))
@pytest.mark.parametrize("splits", [0, 1, 3])
@pytest.mark.parametrize("block_n", CUDA_BLOCK_NS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_cuda_kernel_matches_fp64(layout, splits, block_n, dtype):
    """The Hopper kernel: varlen, GQA, partial and one-page tiles, empty sequences, forced and
    chosen splits (pieces merged); unused page rows hold NaN. bf16: O within 1.6e-2 of max |O| (fp16 4e-3), LSE within 2e-2."""
    b = CUDA_LAYOUTS[layout]()
    q, kp, vp = random_inputs(b, 4, 2, 128, dtype, "cuda")
    _poison_unused_rows(kp, b)
    _poison_unused_rows(vp, b)
    plan = plan_for(b, 4, 128, dtype, "cuda", kv_heads=2, config=AttentionConfig(num_splits=splits, cuda_block_n=block_n))
    if plan.cuda_reason is not None:
        pytest.skip(plan.cuda_reason)
    o, lse = chunk_attention(q, kp, vp, plan, backend="cuda")
    o_tol = 1.6e-2 if dtype == torch.bfloat16 else 4e-3
    check_against_fp64(o, lse, q, kp.nan_to_num(0.0), vp.nan_to_num(0.0), b, o_tol, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [0, 1, 3])
def test_gpu_cuda_own_rows_equal_the_pool_bit_for_bit(splits):
    """The engine's layout: two sequences of 3 own frames after 7 context frames, q and the own K/V
    as thirds of one (rows, 3, H, D) buffer. With the pool's own pages poisoned, the kernel reading
    them from the own rows gives the pool-only result's bits (same values, same tiles); a graph replay too."""
    b = _wan_batch(3, 7, num_seqs=2)
    own_pages = [3, 3]
    plan = plan_chunk_attention(b.q_indptr, b.kv_indptr, b.kv_indices, b.last, page_size=WAN_PAGE,
                                num_pages=b.num_pages, num_qo_heads=12, head_dim=128, dtype=torch.bfloat16,
                                device="cuda", config=AttentionConfig(num_splits=splits), own_pages=own_pages)
    if plan.cuda_reason is not None:
        pytest.skip(plan.cuda_reason)
    _, kp, vp = random_inputs(b, 12, 12, 128, torch.bfloat16, "cuda")
    buf, own_k, own_v, ids = own_rows_of(b, own_pages, kp, vp, 12)
    q = buf[:, 0]
    q.copy_(torch.randn_like(q))
    o_ref, lse_ref = chunk_attention(q, kp, vp, plan, backend="cuda")
    check_against_fp64(o_ref, lse_ref, q, kp, vp, b, 1.6e-2, 2e-2)
    kp[ids], vp[ids] = float("nan"), float("nan")
    o, lse = chunk_attention(q, kp, vp, plan, own_k=own_k, own_v=own_v, backend="cuda")
    torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse_ref, rtol=0, atol=0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        og, lg = chunk_attention(q, kp, vp, plan, own_k=own_k, own_v=own_v, backend="cuda")
    graph.replay()
    torch.testing.assert_close(og, o_ref, rtol=0, atol=0)
    torch.testing.assert_close(lg, lse_ref, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_cuda_kernel_error_within_twice_sdpa_and_graph_replay():
    torch.backends.cuda.matmul.allow_tf32 = False
    b = _wan_batch(3, 7)
    plan = plan_for(b, 12, 128, torch.bfloat16, "cuda")
    if plan.cuda_reason is not None:
        pytest.skip(plan.cuda_reason)
    err_ours, err_pt, lse_err = _sdpa_error_ratio(torch.bfloat16, b, 12, 128)  # auto picks cuda
    assert err_ours <= 2 * err_pt + 1e-6, (err_ours, err_pt)
    assert lse_err < 2e-2
    q, kp, vp = random_inputs(b, 12, 12, 128, torch.bfloat16, "cuda")
    o, lse = chunk_attention(q, kp, vp, plan, backend="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        og, lg = chunk_attention(q, kp, vp, plan, backend="cuda")
    graph.replay()
    torch.testing.assert_close(og, o, rtol=0, atol=0)  # deterministic: same inputs, same bits
    torch.testing.assert_close(lg, lse, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_fp32_and_cuda_graph_replay():
    b = make_batch(VARLEN, page_size=7, num_pages=18)
    q, kp, vp = random_inputs(b, 4, 4, 64, torch.float32, "cuda")
    plan = plan_for(b, 4, 64, torch.float32, "cuda")
    o, lse = chunk_attention(q, kp, vp, plan)
    check_against_fp64(o, lse, q, kp, vp, b, 1e-4, 1e-4)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        og, lg = chunk_attention(q, kp, vp, plan)
    q.copy_(torch.randn_like(q))
    graph.replay()
    o2, l2 = chunk_attention(q, kp, vp, plan)
    torch.testing.assert_close(og, o2, rtol=0, atol=0)
    torch.testing.assert_close(lg, l2, rtol=0, atol=0)


# ------------------------------------------------------------------- distinct keys (repeated tails)


def _repeat_tails(k_pages, v_pages, b: Batch, distinct):
    """Make every sequence's keys and values from index distinct[s] on copies of key distinct[s] (in
    place, position by position through its page list), as a zero-padded prompt's text rows are."""
    for s, (_, pages, kv_len) in enumerate(b.seqs):
        d = distinct[s]
        if kv_len == 0 or d >= kv_len - 1:
            continue
        src = (pages[d // b.page_size], d % b.page_size)
        for j in range(d + 1, kv_len):
            dst = (pages[j // b.page_size], j % b.page_size)
            k_pages[dst] = k_pages[src]
            v_pages[dst] = v_pages[src]


def _expected_tiles(b: Batch, distinct, block_n):
    """Per CUDA tile: (valid keys read, counted, log2 count), from the tile list of cuda_work_tables."""
    order = sorted(range(len(b.seqs)), key=lambda s: -b.seqs[s][2])
    _, tiles, _, _, keys, _ = cuda_work_tables(b.q_indptr, b.kv_indptr, b.kv_indices, b.last, b.page_size, order,
                                            block_n, 1, 1, 132)
    out = []
    for (_, word), (s, key0, kv_len) in zip(tiles, keys):
        d = distinct[s]
        n = min(d + 1, kv_len)
        valid = word >> 16
        read = max(0, min(n - key0, valid))
        copies = kv_len - d
        counted = copies > 1 and key0 < n <= key0 + valid
        out.append((read, counted, math.log2(copies) if counted else 0.0))
    return tiles, keys, out


def test_reference_distinct_keys_equal_all_keys_when_tails_repeat():
    b = make_batch(VARLEN, page_size=7, num_pages=18)
    q, kp, vp = random_inputs(b, 4, 2, 64, torch.float64, "cpu")
    distinct = [13, 0, 0, 4, 100]  # mid-page, first key, no keys, (no queries), past the end (no change)
    _repeat_tails(kp, vp, b, distinct)
    o, lse = chunk_attention_ref(q, kp, vp, b.q_indptr, b.kv_indptr, b.kv_indices, b.last, distinct_keys=distinct)
    check_against_fp64(o, lse, q, kp, vp, b, 1e-12, 1e-12)
    # the op on the CPU: the plan keeps the counts, the reference backend applies them
    plan = plan_for(b, 4, 64, torch.float32, "cpu", kv_heads=2).with_distinct_keys(torch.tensor(distinct))
    o2, lse2 = chunk_attention(q.float(), kp.float(), vp.float(), plan)
    check_against_fp64(o2, lse2, q, kp, vp, b, 1e-5, 1e-5)
    with pytest.raises(ValueError, match="already has distinct keys"):
        plan.with_distinct_keys(torch.tensor(distinct))
    with pytest.raises(ValueError, match="'distinct_keys' must have shape"):
        plan_for(b, 4, 64, torch.float32, "cpu", kv_heads=2).with_distinct_keys(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="must hold integers"):
        plan_for(b, 4, 64, torch.float32, "cpu", kv_heads=2).with_distinct_keys(torch.zeros(5))


@pytest.mark.parametrize("block_n", [5, 16])
def test_distinct_key_tiles_match_the_key_counts(block_n):
    """The device-side tile rewrite (run here on CPU tensors): each tile reads the keys below d + 1,
    and exactly the tile holding key d is counted, with log2(kv_len - d)."""
    b = make_batch(VARLEN, page_size=7, num_pages=18)
    distinct = [13, 0, 0, 4, 20]
    tiles, keys, want = _expected_tiles(b, distinct, block_n)
    base = plan_for(b, 2, 64, torch.float32, "cpu")
    base = dataclasses.replace(base, cuda_tiles=torch.tensor(tiles, dtype=torch.int32),
                               cuda_tile_keys=torch.tensor(keys, dtype=torch.int32))
    plan = base.with_distinct_keys(torch.tensor(distinct, dtype=torch.int64))
    words = plan.cuda_tiles[:, 1].tolist()
    assert plan.cuda_tiles[:, 0].tolist() == [t[0] for t in tiles]
    got = [((w >> 16) & 0x3FFF, bool(w >> 30 & 1), c) for w, c in zip(words, plan.cuda_tile_log2_count.tolist())]
    assert [(r, c) for r, c, _ in got] == [(r, c) for r, c, _ in want]
    assert [w & 0xFFFF for w in words] == [t[1] & 0xFFFF for t in tiles]
    torch.testing.assert_close(torch.tensor([g[2] for g in got]), torch.tensor([w[2] for w in want]))


def test_reference_q_row_scale_equals_scaled_queries():
    """Scores of row i times r[i] are attention of the row scaled by r[i] (fp64), with and without
    distinct keys; the op checks the argument and keeps the Triton backend out."""
    b = make_batch(VARLEN, page_size=7, num_pages=18)
    q, kp, vp = random_inputs(b, 4, 2, 64, torch.float64, "cpu")
    r = torch.rand(q.shape[0], dtype=torch.float64) * 2 + 0.1
    o, lse = chunk_attention_ref(q, kp, vp, b.q_indptr, b.kv_indptr, b.kv_indices, b.last, q_row_scale=r)
    check_against_fp64(o, lse, q * r[:, None, None], kp, vp, b, 1e-12, 1e-12)
    distinct = [13, 0, 0, 4, 100]
    _repeat_tails(kp, vp, b, distinct)
    plan = plan_for(b, 4, 64, torch.float32, "cpu", kv_heads=2).with_distinct_keys(torch.tensor(distinct))
    o2, lse2 = chunk_attention(q.float(), kp.float(), vp.float(), plan, q_row_scale=r.float())
    check_against_fp64(o2, lse2, q * r[:, None, None], kp, vp, b, 1e-5, 1e-5)
    base = plan_for(b, 4, 64, torch.float32, "cpu", kv_heads=2)
    with pytest.raises(ValueError, match="'q_row_scale' must have shape"):
        chunk_attention(q.float(), kp.float(), vp.float(), base, q_row_scale=r[:3].float())
    with pytest.raises(ValueError, match="'q_row_scale' must have dtype"):
        chunk_attention(q.float(), kp.float(), vp.float(), base, q_row_scale=r)
    with pytest.raises(ValueError, match="backend='triton', but chunk_attention has only"):
        chunk_attention(q.float(), kp.float(), vp.float(), base, q_row_scale=r.float(), backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("block_n", CUDA_BLOCK_NS)
def test_gpu_q_row_scale_matches_fp64(block_n):
    """The CUDA kernel's per-row score scale: Wan pages with units split into pieces, and zero-padded
    text pages with distinct keys at tile edges, against fp64 attention of the scaled rows."""
    torch.backends.cuda.matmul.allow_tf32 = False
    wan = _wan_batch(1, 2, num_seqs=2)
    cases = ((wan, 3, None), (make_batch([(300, [s], 512) for s in range(4)], 512, 4), 0, [0, 100, 176, 511]))
    for b, splits, distinct in cases:
        q, kp, vp = random_inputs(b, 4, 4, 128, torch.bfloat16, "cuda")
        if distinct is not None:
            _repeat_tails(kp, vp, b, distinct)
        r = torch.rand(q.shape[0], device="cuda") * 1.5 + 0.25
        plan = plan_for(b, 4, 128, torch.bfloat16, "cuda",
                        config=AttentionConfig(cuda_block_n=block_n, num_splits=splits))
        if distinct is not None:
            plan = plan.with_distinct_keys(torch.tensor(distinct, device="cuda"))
        o, lse = chunk_attention(q, kp, vp, plan, q_row_scale=r, backend="cuda")
        check_against_fp64(o, lse, q.double() * r.double()[:, None, None], kp, vp, b, 1.6e-2, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_batch", ["per_sequence", "one_prompt"])
def test_gpu_distinct_keys_text_pages(kv_batch):
    """Cross-attention over zero-padded prompts: one 512-row page per prompt (or one page for every
    sequence), the distinct rows at tile edges and inside tiles; equal to attention over all rows."""
    torch.backends.cuda.matmul.allow_tf32 = False
    distinct = [0, 1, 100, 175, 176, 177, 351, 352, 500, 510, 511, 512]
    L, rows, heads = 300, 512, 12
    n = len(distinct) if kv_batch == "per_sequence" else 1
    seqs = [(L, [s if n > 1 else 0], rows) for s in range(len(distinct))]
    b = make_batch(seqs, page_size=rows, num_pages=n)
    q, kp, vp = random_inputs(b, heads, heads, 128, torch.bfloat16, "cuda")
    if n == 1:
        distinct = [123] * len(distinct)
    _repeat_tails(kp, vp, b, distinct)
    base = plan_for(b, heads, 128, torch.bfloat16, "cuda")
    assert base.cuda_reason is None and base.cuda_short_items  # one stage, two Q buffers; 3 tiles an item
    plan = base.with_distinct_keys(torch.tensor(distinct, device="cuda"))
    o, lse = chunk_attention(q, kp, vp, plan, backend="cuda")
    o_all, lse_all = chunk_attention(q, kp, vp, base, backend="cuda")
    check_against_fp64(o, lse, q, kp, vp, b, 1.6e-2, 2e-2)
    check_against_fp64(o_all, lse_all, q, kp, vp, b, 1.6e-2, 2e-2)
    torch.testing.assert_close(lse, lse_all, rtol=0, atol=2e-2)
    # bf16 outputs of two summation orders: up to one rounding step apart (2**-7 relative)
    torch.testing.assert_close(o.float(), o_all.float(), rtol=8e-3, atol=2e-2)


@pytest.mark.gpu
def test_gpu_distinct_keys_across_pages_with_split_pieces_and_graph():
    """Wan pages (1560 rows): distinct counts in the first, second and last page, units split into
    pieces (some left without keys), and a CUDA graph that recomputes the tiles from counts it reads
    from a static tensor, replayed after the counts change."""
    torch.backends.cuda.matmul.allow_tf32 = False
    b = _wan_batch(1, 5, num_seqs=3)
    q, kp, vp = random_inputs(b, 4, 4, 128, torch.bfloat16, "cuda")
    cfg = AttentionConfig(cuda_block_n=176, num_splits=3)
    base = plan_for(b, 4, 128, torch.bfloat16, "cuda", config=cfg)
    assert base.cuda_pieces > 0
    counts = torch.zeros(3, dtype=torch.int32, device="cuda")
    kp0, vp0 = kp.clone(), vp.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        chunk_attention(q, kp, vp, base.with_distinct_keys(counts))  # warm-up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o, lse = chunk_attention(q, kp, vp, base.with_distinct_keys(counts))
    torch.cuda.current_stream().wait_stream(s)
    for distinct in ([700, 1560 + 3, 6 * 1560 - 2], [0, 3 * 1560, 2 * 1560 + 175]):
        kp.copy_(kp0)
        vp.copy_(vp0)
        _repeat_tails(kp, vp, b, distinct)
        counts.copy_(torch.tensor(distinct))
        graph.replay()
        torch.cuda.synchronize()
        check_against_fp64(o, lse, q, kp, vp, b, 1.6e-2, 2e-2)
