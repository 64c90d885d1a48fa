"""Chunk attention over paged K/V: a flash-attention forward in Triton for Hopper (math and
contract: ``spiral_rt.reference.chunk_attention``; work partition: ``spiral_rt.ops.chunk_attention``).

Grid (num_work, H): program (w, h) handles query head h of work item w = (seq, q_start, q_end,
kv_start, kv_end, split), i.e. up to BLOCK_M queries of one sequence against its logical keys
[kv_start, kv_end). Work items vary fastest, so the CTAs resident at one time are mostly the
q-blocks of the same head reading the same K/V tiles (L2 reuse).

Per key tile of BLOCK_N logical keys j the page lookup is done once per tile: with
HOIST_PAGES (BLOCK_N <= page_size) two scalar loads of the (at most two) pages the tile spans,
otherwise a BLOCK_N-wide gather from the page list (L1/L2 resident). Each key row is one contiguous run of D values in its
page (vectorized 16-byte loads; no alignment between tiles and pages is assumed), K and V share
the row offsets. Scores are scaled into the log2 domain (sm_scale * log2(e)) and the online
softmax runs in fp32 with exp2; the last, partial tile is the only one with masks. Empty key ranges
give O = 0, LSE = -inf.

With num_splits > 1 the key range of a sequence is split across work items that write fp32
partial states (O_split, LSE_split); ``_merge_splits_kernel`` combines them exactly. The CUDA
kernel's split units (csrc/chunk_attention_sm90.cu) are merged by ``_merge_pieces_kernel``; both
share ``_combine_states``.

``_chunk_attention_tma_kernel`` is a variant for Hopper's TMA: the plan cuts each sequence's keys
into tiles that lie whole inside one page (loaded by TMA from a 2-D descriptor over the page pool,
no masks, no per-row addresses) plus the leftover keys of partial page tails (gathered); the
benchmark compares it with the pointer kernel.

``distinct_key_tiles`` rewrites the CUDA kernel's tile table for a prompt's distinct text rows
(``ChunkAttentionPlan.with_distinct_keys``) in one launch.
"""

import torch
import triton
import triton.language as tl

WORK_FIELDS = 6  # pointer variant: seq, q_start, q_end, kv_start, kv_end, split
WORK_FIELDS_TMA = 8  # TMA variant: seq, q_start, q_end, t0, t1, l0, l1, split


@triton.jit
def _attend_tile(
    acc, l_i, m_i, q, k_base, v_base, page_table, start, kv_end, qk_scale, offs_n, offs_d,
    PAGE_SIZE: tl.constexpr, KV_ROW: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr,
    HOIST_PAGES: tl.constexpr,
):
    j = start + offs_n
    if MASKED:
        valid = j < kv_end
    if HOIST_PAGES:
        # BLOCK_N <= PAGE_SIZE: the tile spans at most two pages; two scalar lookups per tile and a
        # per-row select, no per-row division. The second page exists iff a key < kv_end is in it.
        first = start // PAGE_SIZE
        off = j - first * PAGE_SIZE
        page0 = tl.load(page_table + first).to(tl.int64)
        page1 = tl.load(page_table + first + 1, mask=(first + 1) * PAGE_SIZE < kv_end, other=0).to(tl.int64)
        second = off >= PAGE_SIZE
        rows = (tl.where(second, page1, page0) * PAGE_SIZE + tl.where(second, off - PAGE_SIZE, off)) * KV_ROW
    else:
        # per-row gather from the page list (a BLOCK_N-wide load, pipelined with the K/V loads)
        if MASKED:
            page = tl.load(page_table + j // PAGE_SIZE, mask=valid, other=0)
        else:
            page = tl.load(page_table + j // PAGE_SIZE)
        rows = (page.to(tl.int64) * PAGE_SIZE + (j % PAGE_SIZE)) * KV_ROW
    offs = rows[:, None] + offs_d[None, :]
    if MASKED:
        k = tl.load(k_base + offs, mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_base + offs)
    if IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    if MASKED:
        qk = tl.where(valid[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if MASKED:
        v = tl.load(v_base + offs, mask=valid[:, None], other=0.0)
    else:
        v = tl.load(v_base + offs)
    if IEEE:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _store_state(acc, l_i, m_i, o_ptr, lse_ptr, split, stride_os, stride_ls, offs_m, m_mask, offs_d, head,
                 NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Normalize and store O (rows offs_m of head) and LSE (natural log); empty rows: O = 0, -inf."""
    nonempty = l_i > 0.0
    l_safe = tl.where(nonempty, l_i, 1.0)
    lse = tl.where(nonempty, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o = acc * (1.0 / l_safe)[:, None]
    o_offs = split.to(tl.int64) * stride_os + offs_m.to(tl.int64)[:, None] * (NUM_HEADS * HEAD_DIM) \
        + head * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptr + o_offs, o.to(o_ptr.dtype.element_ty), mask=m_mask[:, None])
    lse_offs = split.to(tl.int64) * stride_ls + offs_m.to(tl.int64) * NUM_HEADS + head
    tl.store(lse_ptr + lse_offs, lse, mask=m_mask)


@triton.jit
def _chunk_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, work_ptr, kv_indptr_ptr, kv_indices_ptr,
    stride_qt, stride_qh, stride_os, stride_ls, qk_scale,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    KV_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    HOIST_PAGES: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    work = work_ptr + tl.program_id(0) * 6
    head = tl.program_id(1)
    seq = tl.load(work)
    q_start = tl.load(work + 1)
    q_end = tl.load(work + 2)
    kv_start = tl.load(work + 3)
    kv_end = tl.load(work + 4)
    split = tl.load(work + 5)

    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_mask = offs_m < q_end
    q_offs = offs_m.to(tl.int64)[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_offs, mask=m_mask[:, None], other=0.0)

    page_table = kv_indices_ptr + tl.load(kv_indptr_ptr + seq)
    kv_head_off = (head // GROUP) * HEAD_DIM
    k_base = k_ptr + kv_head_off
    v_base = v_ptr + kv_head_off

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    num_full = (kv_end - kv_start) // BLOCK_N
    for t in tl.range(0, num_full, warp_specialize=WARP_SPECIALIZE):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k_base, v_base, page_table, kv_start + t * BLOCK_N, kv_end,
                                     qk_scale, offs_n, offs_d, PAGE_SIZE, KV_ROW, False, IEEE, HOIST_PAGES)
    tail = kv_start + num_full * BLOCK_N
    if tail < kv_end:
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k_base, v_base, page_table, tail, kv_end,
                                     qk_scale, offs_n, offs_d, PAGE_SIZE, KV_ROW, True, IEEE, HOIST_PAGES)

    _store_state(acc, l_i, m_i, o_ptr, lse_ptr, split, stride_os, stride_ls, offs_m, m_mask, offs_d, head,
                 NUM_HEADS, HEAD_DIM)


@triton.jit
def _chunk_attention_tma_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, work_ptr, tile_rows_ptr, left_rows_ptr,
    stride_qt, stride_qh, stride_os, stride_ls, qk_scale, num_kv_rows,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, KV_ROW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """The TMA variant: the plan lists, per work item, key tiles that lie whole inside one page
    (flat row starts in tile_rows[t0:t1], loaded with device-side TMA descriptors, no masks) and
    the leftover keys of partial page tails (flat rows in left_rows[l0:l1], gathered with pointer
    loads). Softmax is order-independent, so the keys need not be visited in logical order."""
    work = work_ptr + tl.program_id(0) * 8
    head = tl.program_id(1)
    q_start = tl.load(work + 1)
    q_end = tl.load(work + 2)
    t0 = tl.load(work + 3)
    t1 = tl.load(work + 4)
    l0 = tl.load(work + 5)
    l1 = tl.load(work + 6)
    split = tl.load(work + 7)

    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_mask = offs_m < q_end
    q_offs = offs_m.to(tl.int64)[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_offs, mask=m_mask[:, None], other=0.0)
    kv_col = (head // GROUP) * HEAD_DIM

    k_desc = tl.make_tensor_descriptor(k_ptr, shape=[num_kv_rows, KV_ROW], strides=[KV_ROW, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(v_ptr, shape=[num_kv_rows, KV_ROW], strides=[KV_ROW, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for t in tl.range(t0, t1, warp_specialize=WARP_SPECIALIZE):
        row0 = tl.load(tile_rows_ptr + t)
        k = k_desc.load([row0, kv_col])
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = v_desc.load([row0, kv_col])
        if IEEE:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    k_base = k_ptr + kv_col
    v_base = v_ptr + kv_col
    for lt in range(l0, l1, BLOCK_N):
        idx = lt + offs_n
        valid = idx < l1
        rows = tl.load(left_rows_ptr + idx, mask=valid, other=0).to(tl.int64) * KV_ROW
        offs = rows[:, None] + offs_d[None, :]
        k = tl.load(k_base + offs, mask=valid[:, None], other=0.0)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(v_base + offs, mask=valid[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    _store_state(acc, l_i, m_i, o_ptr, lse_ptr, split, stride_os, stride_ls, offs_m, m_mask, offs_d, head,
                 NUM_HEADS, HEAD_DIM)


@triton.jit
def _combine_states(po_ptr, plse_ptr, rows, rmask, num_states, state_stride,
                    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr):
    """Exact log-sum-exp merge of num_states fp32 states: state s of row r is O at
    po_ptr + (s * state_stride + r) * HEAD_DIM and LSE at plse_ptr + s * state_stride + r.
    Returns (O, LSE) of the rows; a row without keys in any state gets O = 0, LSE = -inf."""
    cols = tl.arange(0, HEAD_DIM)
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for s in range(num_states):
        m = tl.maximum(m, tl.load(plse_ptr + s * state_stride + rows, mask=rmask, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    for s in range(num_states):
        lse_s = tl.load(plse_ptr + s * state_stride + rows, mask=rmask, other=float("-inf"))
        w = tl.math.exp2((lse_s - m_safe) * 1.4426950408889634)
        total += w
        o_s = tl.load(po_ptr + (s * state_stride + rows)[:, None] * HEAD_DIM + cols[None, :], mask=rmask[:, None],
                      other=0.0)
        acc += w[:, None] * o_s
    nonempty = total > 0.0
    t_safe = tl.where(nonempty, total, 1.0)
    o = acc * tl.where(nonempty, 1.0 / t_safe, 0.0)[:, None]
    return o, tl.where(nonempty, m_safe + tl.log2(t_safe) * 0.6931471805599453, float("-inf"))


@triton.jit
def _merge_splits_kernel(
    po_ptr, plse_ptr, o_ptr, lse_ptr, num_rows, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Merge num_splits fp32 states (num_splits, R, D) / (num_splits, R) into o (R, D), lse (R,)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < num_rows
    o, lse = _combine_states(po_ptr, plse_ptr, rows, rmask, num_splits, num_rows, HEAD_DIM, BLOCK_R)
    cols = tl.arange(0, HEAD_DIM)
    tl.store(o_ptr + rows[:, None] * HEAD_DIM + cols[None, :], o.to(o_ptr.dtype.element_ty), mask=rmask[:, None])
    tl.store(lse_ptr + rows, lse, mask=rmask)


@triton.jit
def _merge_pieces_kernel(
    po_ptr, plse_ptr, merge_ptr, o_ptr, lse_ptr,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PIECE_ROWS: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Program (u, b): rows b * BLOCK_R .. of split unit u = merge row (q_start, q_end, head,
    first slot, pieces); piece i's state lives in slot first + i of (slots, PIECE_ROWS, D)."""
    unit = merge_ptr + tl.program_id(0) * 5
    q_start, q_end, head = tl.load(unit), tl.load(unit + 1), tl.load(unit + 2)
    first, pieces = tl.load(unit + 3), tl.load(unit + 4)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = q_start + r < q_end
    rows = first.to(tl.int64) * PIECE_ROWS + r
    o, lse = _combine_states(po_ptr, plse_ptr, rows, rmask, pieces, PIECE_ROWS, HEAD_DIM, BLOCK_R)
    out = (q_start + r).to(tl.int64) * NUM_HEADS + head
    cols = tl.arange(0, HEAD_DIM)
    tl.store(o_ptr + out[:, None] * HEAD_DIM + cols[None, :], o.to(o_ptr.dtype.element_ty), mask=rmask[:, None])
    tl.store(lse_ptr + out, lse, mask=rmask)


def _ensure_allocator():
    """Device-side TMA descriptors need Triton's scratch allocator; install a torch-backed one
    unless the application set its own."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def chunk_attention(q, k_pages, v_pages, work, kv_indptr, kv_indices, o, lse, partial_o, partial_lse,
                    sm_scale: float, num_splits: int, block_m: int, block_n: int, num_warps: int, num_stages: int,
                    hoist_pages: bool = True, warp_specialize: bool = False, tile_rows=None, left_rows=None):
    """Launch on checked tensors: q (T, H, D) with D contiguous; pages (P, page_size, H_kv, D)
    contiguous; o (T, H, D), lse (T, H) contiguous outputs. With num_splits > 1, partial_o
    (num_splits, T, H, D) and partial_lse (num_splits, T, H) fp32 scratch are written first and
    merged into o, lse.

    Pointer variant (tile_rows is None): work (W, 6) int32 = seq, q_start, q_end, kv_start, kv_end,
    split over logical keys; hoist_pages picks the two-page lookup when block_n <= page_size.
    TMA variant: work (W, 8) int32 = seq, q_start, q_end, t0, t1, l0, l1, split over tile_rows
    (flat row starts of whole in-page tiles) and left_rows (flat rows of leftover keys).
    warp_specialize asks Triton to warp-specialize the main key loop (experimental on Hopper)."""
    total_q, heads, head_dim = q.shape
    num_work = work.shape[0]
    if num_work == 0:
        return
    page_size, kv_heads = k_pages.shape[1], k_pages.shape[2]
    split = num_splits > 1
    out_o, out_lse = (partial_o, partial_lse) if split else (o, lse)
    common = dict(NUM_HEADS=heads, GROUP=heads // kv_heads, HEAD_DIM=head_dim, KV_ROW=kv_heads * head_dim,
                  BLOCK_M=block_m, BLOCK_N=block_n, IEEE=q.dtype.itemsize == 4, WARP_SPECIALIZE=warp_specialize,
                  num_warps=num_warps, num_stages=num_stages)
    qk_scale = sm_scale * 1.4426950408889634
    if tile_rows is None:
        _chunk_attention_kernel[(num_work, heads)](
            q, k_pages, v_pages, out_o, out_lse, work, kv_indptr, kv_indices,
            q.stride(0), q.stride(1), total_q * heads * head_dim, total_q * heads, qk_scale,
            PAGE_SIZE=page_size, HOIST_PAGES=hoist_pages and block_n <= page_size, **common)
    else:
        if q.is_cuda:
            _ensure_allocator()
        _chunk_attention_tma_kernel[(num_work, heads)](
            q, k_pages, v_pages, out_o, out_lse, work, tile_rows, left_rows,
            q.stride(0), q.stride(1), total_q * heads * head_dim, total_q * heads, qk_scale,
            k_pages.shape[0] * page_size, **common)
    if split:
        merge_splits(partial_o, partial_lse, o, lse)


def merge_splits(partial_o, partial_lse, o, lse):
    """Merge fp32 split states partial_o (num_splits, T, H, D), partial_lse (num_splits, T, H) into
    o (T, H, D) and lse (T, H); the second launch of every split kernel (Triton's and CUDA's)."""
    num_splits, total_q, heads, head_dim = partial_o.shape
    rows = total_q * heads
    block_r = 32 if head_dim <= 64 else 16
    _merge_splits_kernel[(triton.cdiv(rows, block_r),)](
        partial_o, partial_lse, o, lse, rows, num_splits, HEAD_DIM=head_dim, BLOCK_R=block_r, num_warps=4)


def merge_pieces(partial_o, partial_lse, merge, o, lse):
    """Merge the CUDA kernel's pieces: partial_o (slots, R, D), partial_lse (slots, R) fp32, merge
    (U, 5) int32 rows q_start, q_end, head, first slot, pieces (spiral_rt/ops/chunk_attention.py,
    cuda_work_tables) into the units' rows of o (T, H, D) and lse (T, H)."""
    piece_rows, head_dim = partial_o.shape[1], partial_o.shape[2]
    block_r = 16
    _merge_pieces_kernel[(merge.shape[0], triton.cdiv(piece_rows, block_r))](
        partial_o, partial_lse, merge, o, lse, NUM_HEADS=o.shape[1], HEAD_DIM=head_dim, PIECE_ROWS=piece_rows,
        BLOCK_R=block_r, num_warps=4)


@triton.jit
def _distinct_key_tiles_kernel(tiles_ptr, tile_keys_ptr, distinct_ptr, out_ptr, log2_ptr, num_tiles,
                               BLOCK: tl.constexpr):
    """``spiral_rt.ops.chunk_attention.distinct_key_tiles_reference`` for BLOCK tiles a program."""
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = t < num_tiles
    seq = tl.load(tile_keys_ptr + 3 * t, mask=mask, other=0)
    key0 = tl.load(tile_keys_ptr + 3 * t + 1, mask=mask, other=0)
    kv_len = tl.load(tile_keys_ptr + 3 * t + 2, mask=mask, other=0)
    dk = tl.maximum(tl.load(distinct_ptr + seq, mask=mask, other=0), 0)
    keys = tl.minimum(dk + 1, kv_len)
    word = tl.load(tiles_ptr + 2 * t + 1, mask=mask, other=0)
    valid = (word >> 16) & 0x3FFF
    read = tl.minimum(tl.maximum(keys - key0, 0), valid)
    copies = kv_len - dk
    counted = (copies > 1) & (keys > key0) & (keys <= key0 + valid)
    tl.store(out_ptr + 2 * t, tl.load(tiles_ptr + 2 * t, mask=mask, other=0), mask=mask)
    tl.store(out_ptr + 2 * t + 1, (word & 0xFFFF) | (read << 16) | (counted.to(tl.int32) << 30), mask=mask)
    log2_count = tl.where(counted, tl.log2(tl.maximum(copies, 1).to(tl.float32)), 0.0)
    tl.store(log2_ptr + t, log2_count, mask=mask)


def distinct_key_tiles(tiles, tile_keys, distinct_keys):
    """The CUDA kernel's tiles for distinct keys and their log2 counts in one launch (math:
    ``spiral_rt.ops.chunk_attention.distinct_key_tiles_reference``): tiles (num_tiles, 2) and
    tile_keys (num_tiles, 3) int32 contiguous, distinct_keys (S,) int32."""
    num_tiles = tiles.shape[0]
    out = torch.empty_like(tiles)
    log2_count = torch.empty(num_tiles, dtype=torch.float32, device=tiles.device)
    block = 256
    _distinct_key_tiles_kernel[(triton.cdiv(num_tiles, block),)](tiles, tile_keys, distinct_keys, out, log2_count,
                                                                  num_tiles, BLOCK=block, num_warps=4)
    return out, log2_count
