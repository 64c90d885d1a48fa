"""RMSNorm over heads + Wan 3D RoPE on q and k, and the write of k, v into KV pages and/or of k into
k_out, in one Triton pass (math and contract: ``spiral_rt.reference.qk_norm_rope_kv_write``).

One program per token: it reads the token's q and k rows as (H, D) blocks (each padded to a power
of two and masked), normalizes them over the whole row in fp32, rotates the (even, odd) pairs by
cos/sin of pos * inv_freq (D/2 angles per token in fp32 from a (D/2,) table of inverse
frequencies, shared by all heads), and stores q' to the output, then, per the constexpr flags:
WRITE_K_OUT stores k' to the token's row of k_out (which may be k itself: the row was loaded
first); WRITE_PAGES loads the token's slot and v row and stores k', v to the slot of the pages
(without it no slot, v or page is touched). Traffic per token, nothing else (the weights and the
frequency table stay in L2): pages only 3 row reads + 3 row writes; k_out only 2 reads + 2
writes; both 3 reads + 4 writes.

The sequence of a token (varlen) is found by comparing the token index with all of ``cu_seqlens``
at once (MAX_SEQS lanes). Slots outside [0, num_slots) are skipped (negative = padding; the op
layer is responsible for rejecting out-of-range slots), so a bad slot can never write out of bounds.
"""

import triton
import triton.language as tl


@triton.jit
def _norm_rope(x, w, cos, sin, eps, ROW: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """RMSNorm of the (BLOCK_H, BLOCK_D) fp32 row block over all valid values, then the rotation of
    its (even, odd) pairs by (cos, sin) of shape (BLOCK_D // 2,), shared by every head."""
    x = x * (1.0 / tl.sqrt(tl.sum(tl.sum(x * x, axis=1), axis=0) / ROW + eps)) * w
    xe, xo = tl.split(tl.reshape(x, [BLOCK_H, BLOCK_D // 2, 2]))
    c = cos[None, :]
    s = sin[None, :]
    return tl.reshape(tl.join(xe * c - xo * s, xe * s + xo * c), [BLOCK_H, BLOCK_D])


@triton.jit
def _qk_norm_rope_kv_write_kernel(
    q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, inv_freq_ptr,
    q_out_ptr, k_out_ptr, k_pages_ptr, v_pages_ptr, slot_ptr,
    cu_seqlens_ptr, frame_offsets_ptr,
    stride_q, stride_k, stride_v, stride_k_out,
    num_seqs, frame_offset, grid_h, grid_w, num_slots, eps,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAIRS_T: tl.constexpr, PAIRS_H: tl.constexpr,
    VARLEN: tl.constexpr, OFFSET_TENSOR: tl.constexpr, FRAME_TABLE: tl.constexpr, MAX_SEQS: tl.constexpr,
    WRITE_PAGES: tl.constexpr, WRITE_K_OUT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    ROW: tl.constexpr = HEADS * HEAD_DIM
    token = tl.program_id(0)
    # ---- position (t, h, w) of this token
    per_frame = grid_h * grid_w
    if FRAME_TABLE:  # whole frames of tokens; frame_offsets holds each frame's absolute index
        frame_no = token // per_frame
        local = token - frame_no * per_frame
        seq = 0
    elif VARLEN:
        seq_idx = tl.arange(0, MAX_SEQS)
        ends = tl.load(cu_seqlens_ptr + 1 + seq_idx, mask=seq_idx < num_seqs, other=2147483647)
        seq = tl.minimum(tl.sum((token >= ends).to(tl.int32), axis=0), num_seqs - 1)
        local = token - tl.load(cu_seqlens_ptr + seq)
    else:
        seq = 0
        local = token
    if FRAME_TABLE:
        f0 = tl.load(frame_offsets_ptr + frame_no)
    elif OFFSET_TENSOR:
        f0 = tl.load(frame_offsets_ptr + seq)
    else:
        f0 = frame_offset
    frame = local // per_frame
    rem = local - frame * per_frame
    pos_y = rem // grid_w
    pos_x = rem - pos_y * grid_w
    pos_t = f0 + frame
    # ---- cos/sin of the D/2 pairs of a head (the same for every head)
    pair = tl.arange(0, BLOCK_D // 2)
    pair_ok = pair < HEAD_DIM // 2
    pos = tl.where(pair < PAIRS_T, pos_t, tl.where(pair < PAIRS_T + PAIRS_H, pos_y, pos_x)).to(tl.float32)
    angle = pos * tl.load(inv_freq_ptr + pair, mask=pair_ok, other=0.0)
    cos = tl.cos(angle)
    sin = tl.sin(angle)

    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    cols = heads[:, None] * HEAD_DIM + dims[None, :]
    mask = (heads[:, None] < HEADS) & (dims[None, :] < HEAD_DIM)
    tok = token.to(tl.int64)
    if WRITE_PAGES:  # the slot is loaded up front, its latency hidden behind q and k
        slot = tl.load(slot_ptr + tok)
        write = (slot >= 0) & (slot < num_slots)
        dst = slot * ROW + cols

    # ---- q: norm + rope -> q_out
    x = tl.load(q_ptr + tok * stride_q + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(qw_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    x = _norm_rope(x, w, cos, sin, eps, ROW, BLOCK_H, BLOCK_D)
    tl.store(q_out_ptr + tok * ROW + cols, x.to(q_out_ptr.dtype.element_ty), mask=mask)

    # ---- k: norm + rope -> k_out row and/or k page slot
    x = tl.load(k_ptr + tok * stride_k + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(kw_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    x = _norm_rope(x, w, cos, sin, eps, ROW, BLOCK_H, BLOCK_D)
    if WRITE_K_OUT:
        tl.store(k_out_ptr + tok * stride_k_out + cols, x.to(k_out_ptr.dtype.element_ty), mask=mask)
    if WRITE_PAGES:
        tl.store(k_pages_ptr + dst, x.to(k_pages_ptr.dtype.element_ty), mask=mask & write)

        # ---- v: copy -> v page slot
        x = tl.load(v_ptr + tok * stride_v + cols, mask=mask, other=0.0)
        tl.store(v_pages_ptr + dst, x.to(v_pages_ptr.dtype.element_ty), mask=mask & write)


def _num_warps(block: int) -> int:
    # 2 warps at 16 (padded) x 128: 2.56 vs 2.44 TB/s for 4 warps at one chunk, 2.91 vs 2.90 at
    # eight (H100, bench/results/fused_ops.json); larger blocks keep ~32 elements a thread or more
    return 2 if block <= 2048 else 8 if block <= 4096 else 16


def qk_norm_rope_kv_write(q, k, v, q_weight, k_weight, inv_freq, q_out, k_pages, v_pages, slot_mapping,
                          cu_seqlens, frame_offsets, frame_offset: int, grid_h: int, grid_w: int,
                          pairs_t: int, pairs_h: int, eps: float, num_warps: int | None = None, frame_index=None,
                          k_out=None):
    """Launch on checked tensors: q, k, v (T, H, D) with (H, D) contiguous and any token stride;
    q_out (T, H, D) contiguous; pages (P, page_size, H, D) contiguous; slot_mapping (T,) int64;
    cu_seqlens (S+1,) int32 or None (one sequence); frame_offsets (S,) int32/int64 or None (use the
    int frame_offset); frame_index (T / (grid_h * grid_w),) int32/int64 absolute frame of each
    frame of tokens, or None (overrides cu_seqlens/frame offsets); inv_freq (D/2,) fp32; k_out
    (T, H, D) like k (may be k), or None. k_pages, v_pages and slot_mapping are all None when no
    page is written (v is then not read and may be None)."""
    total, heads, head_dim = q.shape
    block_h, block_d = triton.next_power_of_2(heads), triton.next_power_of_2(head_dim)
    num_seqs = cu_seqlens.numel() - 1 if cu_seqlens is not None else 1
    write_pages = k_pages is not None
    num_slots = k_pages.shape[0] * k_pages.shape[1] if write_pages else 0
    # stand-in for the pointers of disabled paths (never dereferenced)
    unused = slot_mapping if write_pages else q
    _qk_norm_rope_kv_write_kernel[(total,)](
        q, k, v if v is not None else unused, q_weight, k_weight, inv_freq, q_out,
        k_out if k_out is not None else unused, k_pages if write_pages else unused,
        v_pages if write_pages else unused, slot_mapping if write_pages else unused,
        cu_seqlens if cu_seqlens is not None else unused,
        frame_index if frame_index is not None else frame_offsets if frame_offsets is not None else unused,
        q.stride(0), k.stride(0), v.stride(0) if v is not None else 0, k_out.stride(0) if k_out is not None else 0,
        num_seqs, frame_offset, grid_h, grid_w, num_slots, eps,
        HEADS=heads, HEAD_DIM=head_dim, PAIRS_T=pairs_t, PAIRS_H=pairs_h,
        VARLEN=cu_seqlens is not None, OFFSET_TENSOR=frame_offsets is not None, FRAME_TABLE=frame_index is not None,
        MAX_SEQS=max(2, triton.next_power_of_2(num_seqs)), WRITE_PAGES=write_pages, WRITE_K_OUT=k_out is not None,
        BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=num_warps or _num_warps(block_h * block_d),
    )
