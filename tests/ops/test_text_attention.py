"""Tests of ``spiral_rt.ops.text_attention``: the collapsed-rows identity, Triton vs reference, checks.

The fast path reads rows [0, distinct] of the text K/V and weights the last of them as the
Lt - distinct identical rows after it. Checked: that identity in fp64 (exact up to rounding), and
the Triton kernel against the reference (attention over every row) on fresh random inputs at
awkward sizes, with broadcast and strided K/V. Tolerances relative to max |O|: fp32 1e-5, fp16
2e-3, bf16 1.6e-2 (the probabilities are rounded to the input dtype before P V, as in every
flash-style kernel). The CPU runs the kernel under the Triton interpreter, whose bf16 dots are
unreliable: bf16 runs on the GPU only.
"""

import pytest
import torch

from spiral_rt.ops import dispatch
from spiral_rt.ops.text_attention import text_attention
from spiral_rt.reference.text_attention import text_attention as text_attention_ref
from spiral_rt.reference.text_attention import text_attention_collapsed

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _text_kv(batch, len_t, heads, dim, distinct, dtype, device):
    """Random K, V (batch, len_t, heads, dim) whose rows [distinct[b], len_t) repeat one random row."""
    k = torch.randn(batch, len_t, heads, dim, device=device)
    v = torch.randn(batch, len_t, heads, dim, device=device)
    for b, n in enumerate(distinct):
        k[b, n:] = k[b, n]
        v[b, n:] = v[b, n]
    return k.to(dtype), v.to(dtype), torch.tensor(distinct, dtype=torch.int32, device=device)


def _assert_close(out, ref, dtype):
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= TOL[dtype] * ref.float().abs().max().item(), err


@pytest.mark.parametrize("distinct", [[0], [9], [76], [3, 40, 76]])
def test_collapsed_rows_equal_every_row_fp64(distinct):
    q = torch.randn(len(distinct), 11, 2, 16, dtype=torch.float64) * 2
    k, v, n = _text_kv(len(distinct), 77, 2, 16, distinct, torch.float64, "cpu")
    torch.testing.assert_close(text_attention_collapsed(q, k, v, n), text_attention_ref(q, k, v, n), rtol=0, atol=1e-12)


def _dtypes(device):
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])


@pytest.mark.parametrize("len_q,len_t,distinct", [(37, 77, [5, 76]), (130, 200, [0, 131]), (1, 9, [8, 3])])
def test_triton_matches_reference(triton_device, len_q, len_t, distinct):
    heads, dim = 3, 32
    for dtype in _dtypes(triton_device):
        q = (torch.randn(2, len_q, heads, dim, device=triton_device) * 2).to(dtype)
        k, v, n = _text_kv(2, len_t, heads, dim, distinct, dtype, triton_device)
        out = text_attention(q, k, v, n, backend="triton")
        assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
        _assert_close(out, text_attention_ref(q, k, v, n), dtype)


def test_triton_broadcast_and_strided_inputs(triton_device):
    """One prompt's K/V (batch 1) for three batch items; q a strided view of a packed projection."""
    heads, dim, len_q, len_t = 2, 16, 45, 70
    dtype = torch.float16
    packed = torch.randn(3, len_q, 3 * heads * dim, device=triton_device).to(dtype)
    q = packed[..., heads * dim: 2 * heads * dim].unflatten(-1, (heads, dim))
    assert not q.is_contiguous()
    k, v, n1 = _text_kv(1, len_t, heads, dim, [21], dtype, triton_device)
    n = n1.repeat(3)
    out = text_attention(q, k, v, n, backend="triton")
    _assert_close(out, text_attention_ref(q, k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1), n), dtype)


def test_out_of_range_counts_are_clamped(triton_device):
    """A count past the rows reads no further than the last row (all rows distinct: the full attention)."""
    q = torch.randn(1, 20, 2, 16, device=triton_device)
    k, v, _ = _text_kv(1, 30, 2, 16, [29], torch.float32, triton_device)
    for bad in (29, 30, 1000):
        out = text_attention(q, k, v, torch.tensor([bad], device=triton_device), backend="triton")
        _assert_close(out, text_attention_ref(q, k, v, None), torch.float32)
    out = text_attention(q, k, v, torch.tensor([-5], device=triton_device), backend="triton")
    assert torch.isfinite(out).all()


@pytest.mark.gpu
def test_wan_sizes_bf16_on_gpu():
    """One chunk of Wan2.1-1.3B: 4680 queries, 12 heads of 128, 512 text rows, prompts of 0..511 tokens."""
    device = torch.device("cuda")
    for distinct in ([37], [0], [511], [120, 300]):
        b = len(distinct)
        q = torch.randn(b, 4680, 12, 128, device=device, dtype=torch.bfloat16)
        k, v, n = _text_kv(b, 512, 12, 128, distinct, torch.bfloat16, device)
        _assert_close(text_attention(q, k, v, n), text_attention_ref(q, k, v, n), torch.bfloat16)


def test_bad_inputs_name_the_argument(triton_device):
    q = torch.randn(2, 10, 2, 16, device=triton_device)
    k = torch.randn(2, 12, 2, 16, device=triton_device)
    n = torch.tensor([3, 4], dtype=torch.int32, device=triton_device)
    with pytest.raises(ValueError, match="'q'"):
        text_attention(q[0], k, k, n)
    with pytest.raises(ValueError, match="'k'"):
        text_attention(q, k[:, :, :1], k, n)
    with pytest.raises(ValueError, match="'k'"):
        text_attention(q, k.half(), k, n)
    with pytest.raises(ValueError, match="'v'"):
        text_attention(q, k, k[:, :5], n)
    with pytest.raises(ValueError, match="'distinct_rows'"):
        text_attention(q, k, k, n.float())
    with pytest.raises(ValueError, match="'distinct_rows'"):
        text_attention(q, k, k, n[:1])
    with pytest.raises(ValueError, match="'q'"):
        text_attention(q.transpose(-1, -2), k.transpose(-1, -2), k.transpose(-1, -2), n)
    if dispatch.TRITON_INSTALLED:
        odd = torch.randn(2, 10, 2, 24, device=triton_device)
        with pytest.raises(ValueError, match="head dim"):
            text_attention(odd, odd, odd, n, backend="triton")
