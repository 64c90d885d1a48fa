"""``chunk_attention``: the queries of one chunk per sequence against K/V reached through page
tables, varlen over many sequences in one launch; returns O and LSE. Plus the plan that makes it
cheap to call once per layer and denoising step, and the shared-prefix composition.

Layout (FlashInfer's naming; the KV cache manager produces it):

- q (total_q, H, D): the queries of S sequences back to back, ``q_indptr`` (S+1,);
- k_pages, v_pages (num_pages, page_size, H_kv, D): one layer's K and V pages;
- sequence s lists pages ``kv_indices[kv_indptr[s]:kv_indptr[s+1]]`` (any order, any ids, pages
  may be shared between sequences: sink pages, window pages, then its own chunk's pages, which
  were written before attention); logical key j lives at page list[j // page_size], offset
  j % page_size; kv_len[s] = (num_pages[s] - 1) * page_size + kv_last_page_len[s] (0 pages: 0 keys);
- a plan built with ``own_pages`` may read each sequence's last own_pages[s] pages from the caller's
  own K/V rows (``own_k``, ``own_v``: the current chunk's, straight from the QKV projection, so a
  denoising forward need not write them into the pool first) instead of the pool.

Every query attends to all keys of its sequence (no mask: bidirectional within the chunk, full
view of the listed context). O (total_q, H, D) in q's dtype; LSE (total_q, H) fp32, natural log;
a sequence without keys gets O = 0, LSE = -inf (so it merges exactly, see ``merge_states``).

Plan once, run many: ``plan_chunk_attention`` validates the host-side index tables once (page ids
in range, lengths consistent with the indptrs, supported head dim: ValueError naming the
argument), copies them to the device and builds the work partition (q-blocks x KV splits, chosen by
shape), all reused by every layer and step of the chunk. ``chunk_attention`` itself only checks
shapes and dtypes against the plan (no host sync). ``AttentionConfig`` selects the kernel variant
(tile sizes, warps, stages, KV splits, page lookup, pointer or TMA loads); ``default_config``
picks one by shape and bench/bench_attention.py compares them. Math:
``spiral_rt.reference.chunk_attention``.

Backends: cuda (csrc/chunk_attention_sm90.cu: Hopper, TMA + warpgroup MMAs, D = 128, bf16/fp16;
the plan lists its key tiles and work items, one per 128 query rows x head, and splits the units
of the last wave(s) into pieces when a makespan model says it pays (``_tail_split``); the pieces'
partial states are merged by a second, small kernel; ``plan.cuda_reason`` says why a plan cannot
use it), triton (kernels/chunk_attention.py, any supported shape), reference.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Optional

import torch

from ..reference import chunk_attention as _reference
from spiral_rt.transfer import upload_tensors

from . import dispatch
from .merge_states import AttentionState, merge_states

OP = "chunk_attention"
IMPLEMENTED = ("cuda", "triton", "reference")
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SUPPORTED_HEAD_DIMS = (64, 128)
WORK_FIELDS = 6  # seq, q_start, q_end, kv_start, kv_end, split (kernels/chunk_attention.py)
WORK_FIELDS_TMA = 8  # seq, q_start, q_end, t0, t1, l0, l1, split
CUDA_BLOCK_M = 128  # query rows per CTA of the CUDA kernel (two consumer warpgroups x 64)
CUDA_WORK_FIELDS = 6  # q_start, q_end, t0, t1, head, slot (csrc/chunk_attention.h)
CUDA_MERGE_FIELDS = 5  # q_start, q_end, head, first slot, pieces (kernels/chunk_attention.py merge_pieces)
# Work-partition model of the CUDA kernel: a CTA costs its key tiles plus this many tiles of fixed
# work (Q load, pipeline fill, epilogue); a split unit's pieces add the merge's traffic.
_CUDA_CTA_OVERHEAD_TILES = 2.0
_CUDA_MIN_TILES_PER_PIECE = 4
_CUDA_RUN_MAX_TILES = 3
"""Whole units of at most this many key tiles each, all alike (a cross-attention's 512 text rows are
3 tiles of 176), are laid out so that each persistent CTA runs a contiguous run of them: one head's
row blocks back to back, so an item whose key range ends up one tile (a prompt's distinct rows)
reuses the tile its CTA's previous item left in shared memory (csrc/chunk_attention_sm90.cu)."""
CUDA_BLOCK_NS = (112, 128, 176)  # key-tile sizes it is compiled for (csrc/chunk_attention.h)
CUDA_DTYPES = (torch.bfloat16, torch.float16)

# Throughput model used only to choose the number of KV splits (H100 SXM figures, DESIGN.md §4).
_ATTN_FLOPS = 5.0e14
_MERGE_BYTES_PER_S = 2.5e12
_MIN_TILES_PER_SPLIT = 8
_MAX_SPLITS = 8


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Tile shape and launch parameters of the Triton kernel (one compiled variant each)."""

    block_m: int = 128
    """Queries per program (a power of two >= 16)."""
    block_n: int = 64
    """Keys per inner-loop tile (a power of two >= 16); tiles need not align with pages."""
    num_warps: int = 8
    """Warps per program (8: two Hopper warpgroups over BLOCK_M = 128)."""
    num_stages: int = 3
    """Software-pipelining depth of the K/V loads."""
    num_splits: int = 0
    """KV splits per sequence (> 1: partial states merged by a second kernel); 0 = choose by shape
    (Triton: one split count for all; CUDA: only the units of the last waves are split)."""
    hoist_pages: bool = True
    """Look pages up with two scalar loads per key tile (when block_n <= page_size) instead of a
    per-row gather from the page list."""
    warp_specialize: bool = False
    """Ask Triton to warp-specialize the key loop (``tl.range(warp_specialize=True)``); Triton
    documents it for Blackwell, the benchmark tries it on Hopper."""
    kv_load: str = "pointer"
    """"pointer": gathered loads over logical key tiles; "tma": the plan cuts the keys into tiles
    whole inside one page (TMA descriptor loads) plus gathered leftovers of partial page tails."""
    cuda_block_n: int = 176
    """Keys per tile of the CUDA kernel (112, 128 or 176). 176 (FA3's tile) measured fastest on
    Wan shapes (bench/NOTES.md, session 7), though 1560-token pages end in a 152-key tile;
    num_splits applies to it as well."""

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 16 and value & (value - 1) == 0):
                raise ValueError(f"AttentionConfig: '{name}' must be a power of two >= 16, got {value!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"AttentionConfig: 'num_warps' must be 1, 2, 4, 8 or 16, got {self.num_warps!r}")
        if not (isinstance(self.num_stages, int) and self.num_stages >= 1):
            raise ValueError(f"AttentionConfig: 'num_stages' must be an int >= 1, got {self.num_stages!r}")
        if self.kv_load not in ("pointer", "tma"):
            raise ValueError(f"AttentionConfig: 'kv_load' must be 'pointer' or 'tma', got {self.kv_load!r}")
        if self.cuda_block_n not in CUDA_BLOCK_NS:
            raise ValueError(f"AttentionConfig: 'cuda_block_n' must be one of {CUDA_BLOCK_NS}, got {self.cuda_block_n!r}")
        if not (isinstance(self.num_splits, int) and 0 <= self.num_splits <= 64):
            raise ValueError(f"AttentionConfig: 'num_splits' must be an int in [0, 64] (0 = auto), got {self.num_splits!r}")


def default_config(head_dim: int, dtype: torch.dtype, max_q_len: int, interpreting: bool) -> AttentionConfig:
    """The config used when the plan is given none: by head dim, dtype and query length."""
    if interpreting:  # the CPU interpreter: small tiles keep the tests fast and exercise masking
        return AttentionConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:  # fp32 tiles take twice the shared memory; correctness path
        return AttentionConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    if max_q_len <= 64:
        return AttentionConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)
    # H100, bf16, Lq = 4680, 12 x 128 heads (bench/results/attention.json): 128x64 tiles on four
    # warps was the fastest pointer-load variant at every Lk (369-394 TFLOP/s, vs 262-307 with
    # eight warps), within 5% of the TMA variant that led at long Lk.
    return AttentionConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)


@dataclasses.dataclass
class ChunkAttentionPlan:
    """Validated index tables on the device plus the work partition; build with
    ``plan_chunk_attention`` once per chunk step, reuse across layers and denoising steps."""

    num_seqs: int
    """S, sequences in the batch."""
    total_q: int
    """q_indptr[-1]: rows of q."""
    num_qo_heads: int
    """H of q."""
    num_kv_heads: int
    """H_kv of the pages (divides H)."""
    head_dim: int
    """D (64 or 128)."""
    page_size: int
    """Tokens per page."""
    num_pages: int
    """Pages per layer in the pool (k_pages.shape[0])."""
    dtype: torch.dtype
    """dtype of q and the pages."""
    device: torch.device
    """Where the tables and inputs live."""
    config: AttentionConfig
    """Kernel config, num_splits resolved (>= 1)."""
    q_indptr: torch.Tensor
    """(S+1,) int32 on device."""
    kv_indptr: torch.Tensor
    """(S+1,) int32 on device."""
    kv_indices: torch.Tensor
    """(total_pages,) int32 on device (at least one element, padded with 0 when empty)."""
    kv_last_page_len: torch.Tensor
    """(S,) int32 on device."""
    work: torch.Tensor
    """(num_work, 6) int32 on device: seq, q_start, q_end, kv_start, kv_end, split; with
    kv_load="tma" (num_work, 8): seq, q_start, q_end, t0, t1, l0, l1, split."""
    tile_rows: torch.Tensor | None
    """kv_load="tma": int32 flat row (page * page_size + offset) of each whole in-page key tile."""
    left_rows: torch.Tensor | None
    """kv_load="tma": int32 flat rows of the keys left over in partial page tails."""
    cuda_work: torch.Tensor | None
    """CUDA kernel: (num_work, 6) int32 q_start, q_end, t0, t1, head, slot over ``cuda_tiles``:
    whole units first (strided over persistent CTAs), then the pieces (a CTA each), see
    csrc/chunk_attention.h; None when ``cuda_reason`` is set."""
    cuda_tiles: torch.Tensor | None
    """CUDA kernel: (num_tiles, 2) int32 page, row0 | valid << 16 (csrc/chunk_attention.h)."""
    cuda_merge: torch.Tensor | None
    """CUDA kernel: (num_split_units, 5) int32 q_start, q_end, head, first slot, pieces: the
    units whose keys were split into pieces, merged after the kernel; None without pieces."""
    cuda_pieces: int
    """Partial-state slots the CUDA work partition writes (0: no merge)."""
    cuda_short_items: bool
    """CUDA kernel: every whole item has the same few key tiles (``_short_units``: a cross-attention's
    row blocks), so it runs the variant with a one-stage K/V ring and two Q buffers."""
    cuda_reason: str | None
    """Why the CUDA kernel cannot run this plan (None when it can)."""
    cuda_tile_keys: torch.Tensor | None
    """CUDA kernel: (num_tiles, 3) int32 sequence, logical index of the tile's first key, the
    sequence's key count (what ``with_distinct_keys`` recomputes the tiles from)."""
    kv_lens: tuple[int, ...]
    """Keys per sequence (host)."""
    flops: int
    """4 * sum_s q_len_s * kv_len_s * H * D: the attention FLOPs of one call."""

    distinct_keys: torch.Tensor | None = None
    """(S,) int32 on device, or None: see ``with_distinct_keys``."""
    cuda_tile_log2_count: torch.Tensor | None = None
    """CUDA kernel with ``distinct_keys``: (num_tiles,) fp32, log2 of the copies a counted tile's last
    key stands for (csrc/chunk_attention.h)."""
    own_pages: tuple[int, ...] | None = None
    """Per sequence, how many of its last pages ``chunk_attention(own_k=, own_v=)`` reads from the own
    rows (sequence s's first own page is own page sum(own_pages[:s])); None: the pool only."""
    cuda_own_tiles: torch.Tensor | None = None
    """CUDA kernel with ``own_pages``: ``cuda_tiles`` with each own page's tiles naming own page i as
    i | 1 << 31 (csrc/chunk_attention.h): the table used when own rows are given."""

    @property
    def num_splits(self) -> int:
        return self.config.num_splits

    def with_distinct_keys(self, distinct_keys: torch.Tensor) -> "ChunkAttentionPlan":
        """This plan for K/V whose keys (and values) of sequence s from index ``distinct_keys[s]`` on
        are all copies of that key, as the text rows of a zero-padded prompt are: attention then reads
        keys 0 .. distinct_keys[s] and raises the last one's score by log(kv_len - distinct_keys[s]),
        which gives the same result as all kv_len keys (the weights of m equal keys sum to the weight
        of one whose score is larger by log m), with fewer keys. distinct_keys[s] >= kv_len - 1: no
        change. The counts stay on the device (no host sync; the tiles are recomputed there), so a
        CUDA graph captured with the result stays valid when the counts change. Runs on the cuda and
        reference backends. Call it on the plan from ``plan_chunk_attention``, once per counts (every
        layer and step can reuse the result)."""
        if self.distinct_keys is not None:
            raise ValueError(f"{OP}: with_distinct_keys: this plan already has distinct keys; call it on the base plan")
        if self.own_pages is not None:
            raise ValueError(f"{OP}: with_distinct_keys: this plan reads own pages; distinct keys need a plan without")
        d = dispatch.check_tensor(OP, "distinct_keys", distinct_keys, shape=(self.num_seqs,), device=self.device)
        if d.is_floating_point() or d.dtype == torch.bool:
            raise ValueError(f"{OP}: argument 'distinct_keys' must hold integers, got {str(d.dtype).replace('torch.', '')}")
        d = d.to(torch.int32).contiguous()
        if self.cuda_tiles is None:
            return dataclasses.replace(self, distinct_keys=d)
        from spiral_rt.kernels import chunk_attention as kernel  # one launch instead of ~15 (~42 us in a graph)

        tiles, log2_count = kernel.distinct_key_tiles(self.cuda_tiles, self.cuda_tile_keys, d)
        return dataclasses.replace(self, distinct_keys=d, cuda_tiles=tiles, cuda_tile_log2_count=log2_count)


def distinct_key_tiles_reference(tiles: torch.Tensor, tile_keys: torch.Tensor,
                                 distinct_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CUDA kernel's tiles (num_tiles, 2) int32 for sequences whose keys from ``distinct_keys[s]``
    on are copies of that key (``ChunkAttentionPlan.with_distinct_keys``), in PyTorch: each tile keeps
    its page and row0, reads only the distinct keys and the one that stands for the copies, and the
    tile holding that key is flagged, with log2 of the copies' number in the second output (num_tiles,)
    fp32. ``tile_keys`` (num_tiles, 3): the tile's sequence, its first key's index, the sequence's key
    count. ``spiral_rt.kernels.chunk_attention.distinct_key_tiles`` does the same in one launch."""
    seq, key0, kv_len = tile_keys.unbind(1)
    dk = distinct_keys.clamp(min=0).index_select(0, seq)
    keys = torch.minimum(dk + 1, kv_len)  # the distinct keys and the one that stands for its copies
    word = tiles[:, 1]
    valid = (word >> 16) & 0x3FFF
    read = torch.minimum((keys - key0).clamp(min=0), valid)
    copies = kv_len - dk  # of the key at index dk (<= 1: none repeated)
    counted = (copies > 1) & (keys > key0) & (keys <= key0 + valid)  # the tile holding that key
    out = torch.stack([tiles[:, 0], (word & 0xFFFF) | (read << 16) | (counted.int() << 30)], dim=1)
    log2_count = torch.where(counted, torch.log2(copies.clamp(min=1).float()), 0.0)
    return out.contiguous(), log2_count


def _host_ints(op: str, name: str, value, length: int | None = None) -> list[int]:
    """An index table as a host list of ints (from a list, numpy array or tensor on any device)."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{op}: argument '{name}' must be an integer tensor, got {value.dtype}")
        if value.dim() != 1:
            raise ValueError(f"{op}: argument '{name}' must be 1-D, got shape {tuple(value.shape)}")
        out = value.tolist()
    else:
        try:
            out = [int(x) for x in value]
        except (TypeError, ValueError) as err:
            raise ValueError(f"{op}: argument '{name}' must be a 1-D sequence of ints ({err})") from None
    if length is not None and len(out) != length:
        raise ValueError(f"{op}: argument '{name}' must have {length} entries, got {len(out)}")
    return out


def _check_indptr(name: str, indptr: list[int]) -> None:
    if len(indptr) < 2:
        raise ValueError(f"{OP}: argument '{name}' must have S + 1 >= 2 entries, got {len(indptr)}")
    if indptr[0] != 0:
        raise ValueError(f"{OP}: argument '{name}' must start at 0, got {indptr[0]}")
    for s in range(len(indptr) - 1):
        if indptr[s + 1] < indptr[s]:
            raise ValueError(f"{OP}: argument '{name}' must be non-decreasing; entry {s + 1} = {indptr[s + 1]} "
                             f"< entry {s} = {indptr[s]}")


def _choose_splits(q_lens, kv_lens, heads, head_dim, block_m, block_n, num_sms, ctas_per_sm) -> int:
    """KV splits minimizing the modelled time: attention at _ATTN_FLOPS scaled by the wave
    efficiency of the grid, plus the traffic of the split merge."""
    flops = sum(4 * ql * kl * heads * head_dim for ql, kl in zip(q_lens, kv_lens))
    if flops == 0:
        return 1
    blocks = sum(math.ceil(ql / block_m) for ql, kl in zip(q_lens, kv_lens) if ql and kl) * heads
    longest_tiles = max(math.ceil(kl / block_n) for kl in kv_lens)
    total_q = sum(q_lens)
    slots = max(1, num_sms * ctas_per_sm)
    best, best_time = 1, None
    for splits in range(1, _MAX_SPLITS + 1):
        if splits > 1 and longest_tiles < splits * _MIN_TILES_PER_SPLIT:
            break
        units = blocks * splits
        efficiency = units / (math.ceil(units / slots) * slots)
        merge_bytes = 0 if splits == 1 else (2 * splits * 4 + 2) * total_q * heads * head_dim
        t = flops / (_ATTN_FLOPS * efficiency) + merge_bytes / _MERGE_BYTES_PER_S
        if best_time is None or t < best_time * 0.97:  # a split must win clearly
            best, best_time = splits, t
    return best


def cuda_unavailable_reason(head_dim: int, dtype: torch.dtype, page_size: int, device: torch.device) -> str | None:
    """Why the CUDA kernel cannot serve a plan with these parameters (None when it can)."""
    if head_dim != 128:
        return f"it supports head_dim 128, got {head_dim}"
    if dtype not in CUDA_DTYPES:
        return f"it supports bfloat16 and float16, got {str(dtype).replace('torch.', '')}"
    if page_size > 0xFFFF:
        return f"it supports page_size <= 65535, got {page_size}"
    if device.type != "cuda":
        return f"it needs CUDA tensors, got {device}"
    if not dispatch.CUDA_KERNELS_BUILT:
        return "spiral_rt._C was built without CUDA"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if not dispatch.NATIVE.chunk_attention_available(index):
        return "it needs a compute capability 9.0 (Hopper) GPU and an sm_90a build of spiral_rt._C"
    return None


def cuda_work_tables(q_ptr: list[int], kv_ptr: list[int], pages: list[int], last: list[int], page_size: int,
                     order: list[int], block_n: int, heads: int, splits: int, num_sms: int,
                     own_pages: list[int] | None = None):
    """The CUDA kernel's work partition (csrc/chunk_attention.h): each sequence's keys cut into
    tiles of ``block_n`` rows that never cross a page (the last tile of a page is short); units of
    CUDA_BLOCK_M query rows x one head, listed longest sequence first; a unit runs whole, or its
    tiles split into contiguous pieces whose partial states ``merge_pieces`` combines.

    ``splits`` >= 1 splits every unit that many ways; 0 chooses by shape (``_tail_split``). Whole
    units are listed (launched) first, in order (uniform units of at most ``_CUDA_RUN_MAX_TILES``
    tiles: in runs per persistent CTA, ``_runs_per_cta``), then the pieces.
    Returns (work rows, tiles, merge rows, number of pieces, tile keys, own tiles): tile keys lists,
    per tile, its sequence, the logical index of its first key and the sequence's key count; own
    tiles (with ``own_pages``, else None) are the tiles with sequence s's last own_pages[s] pages
    named as own pages (bit 31)."""
    own_base = None if own_pages is None else [sum(own_pages[:s]) for s in range(len(own_pages))]
    units, tiles, tile_keys, own_tiles = [], [], [], []
    for s in order:
        if q_ptr[s + 1] == q_ptr[s]:
            continue
        t_start = len(tiles)
        seq_pages = pages[kv_ptr[s]:kv_ptr[s + 1]]
        kv_len = (len(seq_pages) - 1) * page_size + last[s] if seq_pages else 0
        first_own = len(seq_pages) - (own_pages[s] if own_pages is not None else 0)
        for i, page in enumerate(seq_pages):
            in_page = page_size if i < len(seq_pages) - 1 else last[s]
            words = [r0 | min(block_n, in_page - r0) << 16 for r0 in range(0, in_page, block_n)]
            tiles += [(page, w) for w in words]
            tile_keys += [(s, i * page_size + r0, kv_len) for r0 in range(0, in_page, block_n)]
            if own_pages is not None:  # bit 31 of the page word, as an int32: own page i is i - 2**31
                own_page = own_base[s] + i - first_own - 2**31 if i >= first_own else page
                own_tiles += [(own_page, w) for w in words]
        for head in range(heads):  # one head's row blocks back to back: they stream the same K/V
            units += [(q0, min(q0 + CUDA_BLOCK_M, q_ptr[s + 1]), head, t_start, len(tiles))
                      for q0 in range(q_ptr[s], q_ptr[s + 1], CUDA_BLOCK_M)]
    pieces_of = [splits] * len(units) if splits >= 1 else _tail_split([u[4] - u[3] for u in units], num_sms)
    work, merge, slots = [], [], 0
    for (q0, q1, head, t0, t1), pieces in zip(units, pieces_of):  # whole units first, pieces last
        if pieces == 1:
            work.append((q0, q1, t0, t1, head, -1))
    if _short_units(work):
        work = _runs_per_cta(work, num_sms)
    for (q0, q1, head, t0, t1), pieces in zip(units, pieces_of):
        if pieces == 1:
            continue
        n = t1 - t0
        work += [(q0, q1, t0 + n * i // pieces, t0 + n * (i + 1) // pieces, head, slots + i) for i in range(pieces)]
        merge.append((q0, q1, head, slots, pieces))
        slots += pieces
    return work, tiles, merge, slots, tile_keys, (own_tiles if own_pages is not None else None)


def _short_units(whole: list) -> bool:
    """Whether whole work items (q0, q1, t0, t1, head, slot) all span the same number of key tiles, at
    most ``_CUDA_RUN_MAX_TILES``."""
    spans = {w[3] - w[2] for w in whole}
    return len(spans) == 1 and spans.pop() <= _CUDA_RUN_MAX_TILES


def _short_item_kernel(cuda_work: list | None) -> bool:
    """Whether the CUDA kernel runs a plan's items with two Q buffers and a one-stage K/V ring: its
    whole items are short (``_short_units``)."""
    return cuda_work is not None and _short_units([w for w in cuda_work if w[5] < 0])


def _runs_per_cta(items: list, num_sms: int) -> list:
    """``items`` reordered so that persistent CTA b, which runs list positions b, b + P, b + 2P, ...
    (P = min(len, num_sms) CTAs, csrc/chunk_attention_sm90.cu), gets a contiguous run of the
    original order; the first len % P CTAs get one item more, as in the strided order."""
    n = len(items)
    ctas = min(n, num_sms)
    out, i = [None] * n, 0
    for b in range(ctas):
        for j in range((n - b + ctas - 1) // ctas):
            out[b + j * ctas] = items[i]
            i += 1
    return out


def _makespan(durations, slots: int) -> float:
    """Finish time of CTAs started in list order, each on the first free one of ``slots`` SMs."""
    free = [0.0] * min(slots, len(durations))
    heapq.heapify(free)
    for d in durations:
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free, default=0.0)


def _tail_split(unit_tiles: list[int], slots: int) -> list[int]:
    """Pieces per unit (1 = whole) for units launched in this order on ``slots`` SMs: the split
    whose modelled makespan beats running every unit whole by > 3%. The candidates split the
    units of the last wave (or last two, three) that have at least 4 tiles a piece into 2-4
    pieces; a piece costs its tiles plus the fixed per-CTA work and 1 tile-equivalent of merge."""
    n = len(unit_tiles)
    whole = [1] * n
    if n == 0 or n >= 8 * slots:  # eight or more waves: the tail is too small to matter
        return whole
    cost = _CUDA_CTA_OVERHEAD_TILES
    best, best_time = whole, _makespan([t + cost for t in unit_tiles], slots)
    tail = n % slots or slots
    for m in (tail, tail + slots, tail + 2 * slots):
        if m > n:
            break
        for k in (2, 3, 4):
            pieces = [1] * (n - m) + [k if t >= k * _CUDA_MIN_TILES_PER_PIECE else 1 for t in unit_tiles[n - m:]]
            durations = [t / p + cost + (p > 1) for t, p in zip(unit_tiles, pieces) for _ in range(p)]
            t = _makespan(durations, slots)
            if t < best_time * 0.97:
                best, best_time = pieces, t
    return best


def plan_chunk_attention(
    q_indptr,
    kv_indptr,
    kv_indices,
    kv_last_page_len,
    *,
    page_size: int,
    num_pages: int,
    num_qo_heads: int,
    head_dim: int,
    num_kv_heads: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cuda",
    config: AttentionConfig | None = None,
    num_sms: int | None = None,
    own_pages=None,
) -> ChunkAttentionPlan:
    """Validate the index tables once and build the plan (see the module docstring).

    Args:
        q_indptr: (S+1,) query offsets into q. Host lists/tensors preferred (device tensors are
            copied to the host once, here).
        kv_indptr: (S+1,) offsets into kv_indices.
        kv_indices: page ids of each sequence, in logical order, each in [0, num_pages).
        kv_last_page_len: (S,) keys in each sequence's last page: 1..page_size, 0 without pages.
        page_size: tokens per page (any positive int).
        num_pages: pages per layer in the pool (k_pages.shape[0]).
        num_qo_heads: H of q.
        head_dim: D, 64 or 128.
        num_kv_heads: H_kv of the pages (divides H); default H.
        dtype: dtype of q and the pages (bf16/fp16/fp32).
        device: where q and the pages live.
        config: kernel config; default ``default_config`` (num_splits=0: chosen by shape).
        num_sms: SM count for the split choice; default the device's (132 off-GPU).
        own_pages: (S,) per sequence, how many of its last pages ``chunk_attention`` reads from the
            caller's own K/V rows when it is given them (``own_k``, ``own_v``); every own page but a
            sequence's last must be full. None: the pool only.
    """
    q_ptr = _host_ints(OP, "q_indptr", q_indptr)
    _check_indptr("q_indptr", q_ptr)
    num_seqs = len(q_ptr) - 1
    kv_ptr = _host_ints(OP, "kv_indptr", kv_indptr, num_seqs + 1)
    _check_indptr("kv_indptr", kv_ptr)
    pages = _host_ints(OP, "kv_indices", kv_indices)
    last = _host_ints(OP, "kv_last_page_len", kv_last_page_len, num_seqs)
    if not (isinstance(page_size, int) and page_size >= 1):
        raise ValueError(f"{OP}: argument 'page_size' must be a positive int, got {page_size!r}")
    if not (isinstance(num_pages, int) and num_pages >= 1):
        raise ValueError(f"{OP}: argument 'num_pages' must be a positive int, got {num_pages!r}")
    if kv_ptr[-1] != len(pages):
        raise ValueError(f"{OP}: argument 'kv_indptr' ends at {kv_ptr[-1]} but 'kv_indices' has {len(pages)} entries")
    for i, p in enumerate(pages):
        if not 0 <= p < num_pages:
            raise ValueError(f"{OP}: argument 'kv_indices' entry {i} is page {p}, out of range [0, {num_pages})")
    for s in range(num_seqs):
        n = kv_ptr[s + 1] - kv_ptr[s]
        lo = 1 if n > 0 else 0
        hi = page_size if n > 0 else 0
        if not lo <= last[s] <= hi:
            what = f"in [1, page_size={page_size}]" if n > 0 else "0 (the sequence lists no pages)"
            raise ValueError(f"{OP}: argument 'kv_last_page_len' entry {s} is {last[s]}, must be {what}")
    if own_pages is not None:
        own_pages = _host_ints(OP, "own_pages", own_pages, num_seqs)
        for s, n in enumerate(own_pages):
            if not 0 <= n <= kv_ptr[s + 1] - kv_ptr[s]:
                raise ValueError(f"{OP}: argument 'own_pages' entry {s} is {n}, must be in [0, "
                                 f"{kv_ptr[s + 1] - kv_ptr[s]}] (the pages sequence {s} lists)")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{OP}: argument 'head_dim' is {head_dim}; supported head dims are {SUPPORTED_HEAD_DIMS}")
    num_kv_heads = num_qo_heads if num_kv_heads is None else num_kv_heads
    if not (isinstance(num_qo_heads, int) and num_qo_heads >= 1 and isinstance(num_kv_heads, int)
            and num_kv_heads >= 1 and num_qo_heads % num_kv_heads == 0):
        raise ValueError(f"{OP}: argument 'num_kv_heads' ({num_kv_heads}) must be a positive divisor of "
                         f"'num_qo_heads' ({num_qo_heads})")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{OP}: argument 'dtype' must be bfloat16, float16 or float32, got {dtype}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    q_lens = [q_ptr[s + 1] - q_ptr[s] for s in range(num_seqs)]
    kv_lens = _reference.kv_lengths(kv_ptr, last, page_size)
    if config is None:
        config = default_config(head_dim, dtype, max(q_lens), dispatch.triton_interpreting())
    if not isinstance(config, AttentionConfig):
        raise ValueError(f"{OP}: argument 'config' must be an AttentionConfig, got {type(config).__name__}")
    splits = cuda_splits = config.num_splits
    if num_sms is None:
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    if splits == 0:
        ctas = 1 if config.block_m * head_dim >= 128 * 128 else 2
        splits = _choose_splits(q_lens, kv_lens, num_qo_heads, head_dim, config.block_m, config.block_n, num_sms, ctas)
    config = dataclasses.replace(config, num_splits=splits)

    # work items, longest key range first (fewer stragglers in the last wave)
    order = sorted(range(num_seqs), key=lambda s: -kv_lens[s])
    work, tile_rows, left_rows = [], [], []
    if config.kv_load == "pointer":
        for s in order:
            tiles = math.ceil(kv_lens[s] / config.block_n)
            per_split = math.ceil(tiles / splits) * config.block_n if tiles else 0
            for q0 in range(q_ptr[s], q_ptr[s + 1], config.block_m):
                q1 = min(q0 + config.block_m, q_ptr[s + 1])
                for sp in range(splits):
                    k0 = min(sp * per_split, kv_lens[s])
                    k1 = min((sp + 1) * per_split, kv_lens[s])
                    work.append((s, q0, q1, k0, k1, sp))
        fields = WORK_FIELDS
    else:
        if num_pages * page_size >= 2**31:
            raise ValueError(f"{OP}: kv_load='tma' needs num_pages * page_size < 2**31, got {num_pages * page_size}")
        bn = config.block_n
        for s in order:
            if q_ptr[s + 1] == q_ptr[s]:
                continue
            t_start, l_start = len(tile_rows), len(left_rows)
            seq_pages = pages[kv_ptr[s]:kv_ptr[s + 1]]
            for i, page in enumerate(seq_pages):
                in_page = page_size if i < len(seq_pages) - 1 else last[s]
                whole = in_page // bn * bn
                tile_rows += range(page * page_size, page * page_size + whole, bn)
                left_rows += range(page * page_size + whole, page * page_size + in_page)
            n_tiles, n_left = len(tile_rows) - t_start, len(left_rows) - l_start
            left_tiles = math.ceil(n_left / bn)
            for q0 in range(q_ptr[s], q_ptr[s + 1], config.block_m):
                q1 = min(q0 + config.block_m, q_ptr[s + 1])
                for sp in range(splits):
                    t0, t1 = t_start + n_tiles * sp // splits, t_start + n_tiles * (sp + 1) // splits
                    l0 = l_start + min(n_left, left_tiles * sp // splits * bn)
                    l1 = l_start + min(n_left, left_tiles * (sp + 1) // splits * bn)
                    work.append((s, q0, q1, t0, t1, l0, l1, sp))
        fields = WORK_FIELDS_TMA

    cuda_reason = cuda_unavailable_reason(head_dim, dtype, page_size, device)
    cuda_work = cuda_tiles = cuda_merge = cuda_tile_keys = cuda_own_tiles = None
    cuda_pieces = 0
    if cuda_reason is None:
        cuda_work, cuda_tiles, cuda_merge, cuda_pieces, cuda_tile_keys, cuda_own_tiles = cuda_work_tables(
            q_ptr, kv_ptr, pages, last, page_size, order, config.cuda_block_n, num_qo_heads, cuda_splits, num_sms,
            own_pages)

    def table(values):
        return torch.tensor(values, dtype=torch.int32)

    tma = config.kv_load == "tma"
    # One pinned, non-blocking upload of every table: no host sync per chunk.
    tables = upload_tensors({
        "q_indptr": table(q_ptr), "kv_indptr": table(kv_ptr), "kv_indices": table(pages or [0]),
        "kv_last_page_len": table(last), "work": table(work).reshape(-1, fields),
        "tile_rows": table(tile_rows or [0]) if tma else None, "left_rows": table(left_rows or [0]) if tma else None,
        "cuda_work": None if cuda_work is None else table(cuda_work).reshape(-1, CUDA_WORK_FIELDS),
        "cuda_tiles": None if cuda_tiles is None else table(cuda_tiles or [(0, 0)]).reshape(-1, 2),
        "cuda_merge": table(cuda_merge).reshape(-1, CUDA_MERGE_FIELDS) if cuda_merge else None,
        "cuda_tile_keys": None if cuda_tile_keys is None else table(cuda_tile_keys or [(0, 0, 0)]).reshape(-1, 3),
        "cuda_own_tiles": None if cuda_own_tiles is None else table(cuda_own_tiles or [(0, 0)]).reshape(-1, 2),
    }, device)
    return ChunkAttentionPlan(
        num_seqs=num_seqs, total_q=q_ptr[-1], num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, page_size=page_size, num_pages=num_pages, dtype=dtype, device=device, config=config,
        cuda_pieces=cuda_pieces, cuda_short_items=_short_item_kernel(cuda_work),
        cuda_reason=cuda_reason, kv_lens=tuple(kv_lens), flops=sum(4 * ql * kl * num_qo_heads * head_dim for ql, kl in zip(q_lens, kv_lens)),
        own_pages=None if own_pages is None else tuple(own_pages), **tables,
    )


def chunk_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    plan: ChunkAttentionPlan,
    *,
    sm_scale: float | None = None,
    q_row_scale: torch.Tensor | None = None,
    own_k: torch.Tensor | None = None,
    own_v: torch.Tensor | None = None,
    backend: str | None = None,
) -> AttentionState:
    """Attention of each sequence's queries over its listed K/V pages; see the module docstring.

    Args:
        q: (total_q, H, D) queries, dtype and device of the plan; (H, D) contiguous in the last
            dim (any token and head strides).
        k_pages, v_pages: (num_pages, page_size, H_kv, D) contiguous K and V pages of one layer.
        plan: from ``plan_chunk_attention`` for these index tables.
        sm_scale: softmax scale; default 1 / sqrt(D).
        q_row_scale: optional (total_q,) fp32 factors > 0 on the device: query row i's scores are
            multiplied by q_row_scale[i], as if the row (all its heads) were scaled by it. With
            ``row_inv_rms(q)`` and an RMS norm's weight folded into the keys, this is attention of
            the RMS-normalised queries without writing them. cuda and reference backends.
        own_k, own_v: with a plan built with ``own_pages``: (sum(own_pages) * page_size, H_kv, D)
            rows of the plan's dtype, (H_kv, D) contiguous, any row stride (e.g. views of a QKV
            projection's output); sequence s's last own_pages[s] pages are read from them (own page
            i = rows [i * page_size, (i + 1) * page_size)) instead of from the pool, whose slots for
            them need not be written. Both or neither. cuda and reference backends.
        backend: "cuda" | "triton" | "reference" | "auto"/None (see spiral_rt.ops.dispatch); auto
            takes cuda when the plan and q's layout allow it, else triton.
    Returns:
        ``AttentionState(o, lse)``: o (total_q, H, D) in q's dtype, lse (total_q, H) fp32.
    """
    if not isinstance(plan, ChunkAttentionPlan):
        raise ValueError(f"{OP}: argument 'plan' must be a ChunkAttentionPlan from plan_chunk_attention, "
                         f"got {type(plan).__name__}")
    dispatch.check_tensor(OP, "q", q, shape=(plan.total_q, plan.num_qo_heads, plan.head_dim), dtypes=(plan.dtype,),
                          device=plan.device, contiguous=False)
    if q.stride(2) != 1:
        raise ValueError(f"{OP}: argument 'q' must be contiguous in its last dim, got strides {tuple(q.stride())}")
    page_shape = (plan.num_pages, plan.page_size, plan.num_kv_heads, plan.head_dim)
    dispatch.check_tensor(OP, "k_pages", k_pages, shape=page_shape, dtypes=(plan.dtype,), device=plan.device)
    dispatch.check_tensor(OP, "v_pages", v_pages, shape=page_shape, dtypes=(plan.dtype,), device=plan.device)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(plan.head_dim)
    elif not (isinstance(sm_scale, (int, float)) and sm_scale > 0):
        raise ValueError(f"{OP}: argument 'sm_scale' must be a positive float, got {sm_scale!r}")
    own = _check_own_rows(plan, own_k, own_v)
    cuda_reason = (plan.cuda_reason or _cuda_input_reason(q, k_pages, v_pages)
                   or (_cuda_own_reason(own_k, own_v) if own else None))
    if cuda_reason is not None and dispatch.requested_backend(OP, backend) == "cuda":
        raise ValueError(f"{OP}: backend 'cuda' cannot run these inputs: {cuda_reason}")
    if q_row_scale is not None:
        dispatch.check_tensor(OP, "q_row_scale", q_row_scale, shape=(plan.total_q,), dtypes=(torch.float32,),
                              device=plan.device)
    implemented = IMPLEMENTED if cuda_reason is None else IMPLEMENTED[1:]
    if plan.distinct_keys is not None or q_row_scale is not None or own:  # the Triton kernel has none of them
        implemented = tuple(b for b in implemented if b != "triton")
    chosen = dispatch.select_backend(OP, q.device, implemented, backend)
    cfg = plan.config
    if cfg.kv_load == "tma" and (k_pages.data_ptr() % 16 or v_pages.data_ptr() % 16):
        raise ValueError(f"{OP}: kv_load='tma' needs 16-byte aligned 'k_pages' and 'v_pages' (TMA descriptors)")
    o, lse = dispatch.invoke(_chunk_attention_op, _chunk_attention_impl, 
        q, k_pages, v_pages, plan.q_indptr, plan.kv_indptr, plan.kv_indices, plan.kv_last_page_len, plan.work,
        float(sm_scale), cfg.num_splits, cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.hoist_pages,
        cfg.warp_specialize, plan.tile_rows, plan.left_rows, plan.cuda_work, plan.cuda_tiles, cfg.cuda_block_n,
        plan.cuda_merge, plan.cuda_pieces, plan.cuda_short_items, plan.cuda_tile_log2_count, plan.distinct_keys,
        q_row_scale, own_k, own_v, list(plan.own_pages) if own else None, plan.cuda_own_tiles if own else None, chosen)
    return AttentionState(o, lse)


def _check_own_rows(plan: ChunkAttentionPlan, own_k: torch.Tensor | None, own_v: torch.Tensor | None) -> bool:
    """Whether this call reads own rows; ValueError naming the argument when they do not fit the plan."""
    if own_k is None and own_v is None:
        return False
    if own_k is None or own_v is None:
        raise ValueError(f"{OP}: arguments 'own_k' and 'own_v' go together; got only "
                         f"'{'own_k' if own_v is None else 'own_v'}'")
    if plan.own_pages is None:
        raise ValueError(f"{OP}: argument 'own_k' needs a plan built with own_pages (plan_chunk_attention)")
    shape = (sum(plan.own_pages) * plan.page_size, plan.num_kv_heads, plan.head_dim)
    for name, t in (("own_k", own_k), ("own_v", own_v)):
        dispatch.check_tensor(OP, name, t, shape=shape, dtypes=(plan.dtype,), device=plan.device, contiguous=False)
        if t.stride(2) != 1 or t.stride(1) != plan.head_dim:
            raise ValueError(f"{OP}: argument '{name}' must have contiguous heads and head_dim (strides "
                             f"(*, {plan.head_dim}, 1)), got strides {tuple(t.stride())}")
    return True


def _cuda_own_reason(own_k: torch.Tensor, own_v: torch.Tensor) -> str | None:
    """Layout limits of the CUDA kernel's own-row descriptors (one row stride for K and V)."""
    if own_k.stride(0) != own_v.stride(0):
        return f"own_k and own_v must share a row stride, got {own_k.stride(0)} and {own_v.stride(0)}"
    if (own_k.stride(0) * own_k.element_size()) % 16:
        return f"own rows' stride must be a multiple of 16 bytes, got {own_k.stride(0) * own_k.element_size()}"
    if not torch.compiler.is_compiling() and (own_k.data_ptr() % 16 or own_v.data_ptr() % 16):
        return "own_k and own_v must be 16-byte aligned"
    return None


def _cuda_input_reason(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor) -> str | None:
    """Layout limits of the CUDA kernel's TMA descriptors (None when q and the pages fit)."""
    if q.stride(1) != q.shape[2]:
        return f"q must have its heads back to back (stride(1) == D), got strides {tuple(q.stride())}"
    if (q.stride(0) * q.element_size()) % 16:
        return f"q's row stride must be a multiple of 16 bytes, got {q.stride(0) * q.element_size()}"
    if not torch.compiler.is_compiling() and any(t.data_ptr() % 16 for t in (q, k_pages, v_pages)):
        return "q, k_pages and v_pages must be 16-byte aligned"
    return None


def chunk_attention_shared_prefix(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    prefix_plan: ChunkAttentionPlan,
    suffix_plan: ChunkAttentionPlan,
    *,
    sm_scale: float | None = None,
    backend: str | None = None,
) -> AttentionState:
    """Attention of G group members over (shared prefix pages + own pages) in two launches.

    ``prefix_plan``: one sequence per group whose queries are its members' queries concatenated,
    listing the shared prefix pages; ``suffix_plan``: one sequence per member, listing only its
    own pages. Both cover the same rows of q in the same order. Returns the exact merge.
    """
    if prefix_plan.total_q != suffix_plan.total_q:
        raise ValueError(f"{OP}: 'prefix_plan' covers {prefix_plan.total_q} queries but 'suffix_plan' "
                         f"{suffix_plan.total_q}; both must cover the same rows of q")
    a = chunk_attention(q, k_pages, v_pages, prefix_plan, sm_scale=sm_scale, backend=backend)
    b = chunk_attention(q, k_pages, v_pages, suffix_plan, sm_scale=sm_scale, backend=backend)
    return merge_states(a.o, a.lse, b.o, b.lse, backend=backend)


# ------------------------------------------------------------------ torch.library registration


def _chunk_attention_impl(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    q_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    work: torch.Tensor,
    sm_scale: float,
    num_splits: int,
    block_m: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
    hoist_pages: bool,
    warp_specialize: bool,
    tile_rows: Optional[torch.Tensor],
    left_rows: Optional[torch.Tensor],
    cuda_work: Optional[torch.Tensor],
    cuda_tiles: Optional[torch.Tensor],
    cuda_block_n: int,
    cuda_merge: Optional[torch.Tensor],
    cuda_pieces: int,
    cuda_short_items: bool,
    cuda_tile_log2_count: Optional[torch.Tensor],
    distinct_keys: Optional[torch.Tensor],
    q_row_scale: Optional[torch.Tensor],
    own_k: Optional[torch.Tensor],
    own_v: Optional[torch.Tensor],
    own_pages: Optional[list[int]],
    cuda_own_tiles: Optional[torch.Tensor],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "reference":
        kv_ptr = kv_indptr.tolist()
        return _reference.chunk_attention(q, k_pages, v_pages, q_indptr.tolist(), kv_ptr,
                                          kv_indices.tolist()[:kv_ptr[-1]], kv_last_page_len.tolist(), sm_scale,
                                          distinct_keys=None if distinct_keys is None else distinct_keys.tolist(),
                                          q_row_scale=q_row_scale,
                                          own=None if own_k is None else (own_k, own_v, list(own_pages)))
    total_q, heads, head_dim = q.shape
    o = torch.empty((total_q, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((total_q, heads), dtype=torch.float32, device=q.device)
    from spiral_rt.kernels import chunk_attention as kernel

    if backend == "cuda":
        part_o = part_lse = None
        if cuda_pieces:  # fp32 partial states of split units, (pieces, rows, D) and (pieces, rows)
            part_o = torch.empty((cuda_pieces, CUDA_BLOCK_M, head_dim), dtype=torch.float32, device=q.device)
            part_lse = torch.empty((cuda_pieces, CUDA_BLOCK_M), dtype=torch.float32, device=q.device)
        C = dispatch.NATIVE
        if own_k is not None:
            cuda_tiles = cuda_own_tiles
        C.chunk_attention(
            q.data_ptr(), k_pages.data_ptr(), v_pages.data_ptr(), o.data_ptr(), lse.data_ptr(),
            part_o.data_ptr() if cuda_pieces else 0, part_lse.data_ptr() if cuda_pieces else 0, cuda_work.data_ptr(), cuda_tiles.data_ptr(), q.stride(0), total_q, cuda_work.shape[0],
            cuda_pieces, k_pages.shape[0], k_pages.shape[1], heads, k_pages.shape[2], head_dim, cuda_block_n, sm_scale,
            C.DTYPES[str(q.dtype).replace("torch.", "")], q.device.index, torch.cuda.current_stream(q.device).cuda_stream,
            0 if cuda_tile_log2_count is None else cuda_tile_log2_count.data_ptr(),
            0 if q_row_scale is None else q_row_scale.data_ptr(), cuda_short_items,
            0 if own_k is None else own_k.data_ptr(), 0 if own_v is None else own_v.data_ptr(),
            0 if own_k is None else own_k.stride(0), 0 if own_k is None else own_k.shape[0] // k_pages.shape[1])
        if cuda_pieces:
            kernel.merge_pieces(part_o, part_lse, cuda_merge, o, lse)
        return o, lse
    partial_o = partial_lse = None
    if num_splits > 1:
        partial_o = torch.empty((num_splits, total_q, heads, head_dim), dtype=torch.float32, device=q.device)
        partial_lse = torch.empty((num_splits, total_q, heads), dtype=torch.float32, device=q.device)
    kernel.chunk_attention(q, k_pages, v_pages, work, kv_indptr, kv_indices, o, lse, partial_o, partial_lse,
                           sm_scale, num_splits, block_m, block_n, num_warps, num_stages, hoist_pages,
                           warp_specialize, tile_rows, left_rows)
    return o, lse


_chunk_attention_op = torch.library.custom_op("spiral_rt::chunk_attention", _chunk_attention_impl, mutates_args=())


@_chunk_attention_op.register_fake
def _(q, k_pages, v_pages, q_indptr, kv_indptr, kv_indices, kv_last_page_len, work, sm_scale, num_splits,
      block_m, block_n, num_warps, num_stages, hoist_pages, warp_specialize, tile_rows, left_rows, cuda_work, cuda_tiles,
      cuda_block_n, cuda_merge, cuda_pieces, cuda_short_items, cuda_tile_log2_count, distinct_keys, q_row_scale,
      own_k, own_v, own_pages, cuda_own_tiles, backend):
    total_q, heads, head_dim = q.shape
    return q.new_empty((total_q, heads, head_dim)), q.new_empty((total_q, heads), dtype=torch.float32)
