"""``qk_norm_rope_kv_write``: the prologue of every Wan self-attention, fused into one pass.

For the T tokens of one chunk (or of S sequences back to back, ``cu_seqlens``):

1. RMSNorm over all heads (H * D values, weight of size H * D) on q and k, in fp32;
2. Wan's 3D RoPE on q and k, in fp32 (no float64): head_dim split into t/h/w rotary parts of
   D - 4 (D // 6), 2 (D // 6), 2 (D // 6) dims (44/42/42 for D = 128), adjacent pairs rotated;
   token i of a sequence is latent (f, y, x) of a frame-major grid_h x grid_w grid and sits at
   position (frame_offset + f, y, x) (or (frame_index[frame], y, x) with a per-frame table);
3. the writes, either or both:
   - of the rotated k and of v into the KV pages at per-token flat slots
     (slot = page * page_size + offset; negative = padding, not written);
   - of the rotated k into ``k_out`` (T, H, D), which may be k itself (in place). The engine's
     denoising forwards read the chunk's K and V straight from the QKV projection's output, so
     there the rotated k goes back into it and nothing is written to the pages (v is not read:
     2 row reads + 2 row writes per token instead of 3 + 3).

Returns the normed, rotated q (T, H, D) in q's dtype; k_pages, v_pages and k_out are written in
place. q, k, v, k_out may be strided views of a fused QKV projection (only their (H, D) part must
be contiguous): nothing is copied. Math: ``spiral_rt.reference.qk_norm_rope_kv_write``.

Device-side metadata (slot_mapping, cu_seqlens, frame offsets) is not read back to the host per
call: the kernel never writes outside the pages (out-of-range slots are skipped), and
``validate_slots=True`` (one host sync) turns an out-of-range slot into a ValueError for
debugging (without pages there is nothing to validate). Backends: triton
(kernels/qk_norm_rope_kv_write.py), reference.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ..reference import qk_norm_rope_kv_write as _reference
from . import dispatch

OP = "qk_norm_rope_kv_write"
IMPLEMENTED = ("triton", "reference")
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def _check_rows(name: str, t: torch.Tensor, shape, dtype, device) -> None:
    """(T, H, D) with contiguous (H, D) part; any token stride."""
    dispatch.check_tensor(OP, name, t, shape=shape, dtypes=(dtype,), device=device, contiguous=False)
    if t.stride(2) != 1 or t.stride(1) != t.shape[2]:
        raise ValueError(f"{OP}: argument '{name}' must have contiguous heads and head_dim (strides (*, {t.shape[2]}, 1)), "
                         f"got strides {tuple(t.stride())}; pass {name}.contiguous()")


def qk_norm_rope_kv_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    k_pages: torch.Tensor | None,
    v_pages: torch.Tensor | None,
    slot_mapping: torch.Tensor | None,
    *,
    grid_hw: tuple[int, int],
    frame_offset: int | torch.Tensor = 0,
    cu_seqlens: torch.Tensor | None = None,
    frame_index: torch.Tensor | None = None,
    eps: float = 1e-6,
    validate_slots: bool = False,
    k_out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Normalize and rotate q and k, write k and v into their pages and/or k into k_out; returns q'.

    Args:
        q, k, v: (T, H, D) bf16/fp16/fp32, one dtype; (H, D) contiguous, any token stride. v is
            read only when the pages are written (it may be None without pages).
        q_norm_weight, k_norm_weight: (H * D,) RMSNorm weights, any float dtype.
        k_pages, v_pages: (num_pages, page_size, H, D) contiguous, same dtype (a layer's K and V).
        slot_mapping: (T,) int64 flat slot (page * page_size + offset) of each token; < 0 skips.
            k_pages, v_pages and slot_mapping are all given or all None (no page write).
        grid_hw: (grid_h, grid_w) latent tokens per frame (e.g. (30, 52) at 832x480).
        frame_offset: latent frame index of each sequence's first token: an int, or an int32/int64
            tensor of shape (S,) on the device (CUDA-graph friendly).
        cu_seqlens: (S + 1,) int32 token offsets of S sequences on the device; None = one sequence.
        frame_index: instead of frame_offset/cu_seqlens, a (T / (grid_h * grid_w),) int32/int64
            tensor with the absolute latent frame of each frame of tokens (tokens come in whole
            frames, sequence after sequence; e.g. the KV cache plan's ``q_frame_idx``, which may
            skip frames).
        eps: RMSNorm epsilon (> 0).
        validate_slots: check slot_mapping < num_pages * page_size on the host (one sync).
        k_out: (T, H, D) of q's dtype, (H, D) contiguous, any token stride: receives the rotated k
            of every token (padding slots included). It may be k itself; it must not overlap q or v.
            Without pages, k_out is required (else the call would write nothing).
        backend: "triton" | "reference" | "auto"/None (see spiral_rt.ops.dispatch).
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"{OP}: argument 'q' must be a tensor of shape (T, H, D), got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    total, heads, head_dim = q.shape
    device = q.device
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{OP}: argument 'q' must have dtype in (bfloat16, float16, float32), got {q.dtype}")
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"{OP}: argument 'q' has head_dim {head_dim}; Wan's 3D RoPE needs an even head_dim >= 6")
    _check_rows("q", q, q.shape, q.dtype, device)
    _check_rows("k", k, q.shape, q.dtype, device)
    page_args = {"k_pages": k_pages, "v_pages": v_pages, "slot_mapping": slot_mapping}
    missing = [name for name, t in page_args.items() if t is None]
    if 0 < len(missing) < len(page_args):
        given = [f"'{name}'" for name in page_args if name not in missing]
        raise ValueError(f"{OP}: argument '{missing[0]}' is None but {' and '.join(given)} "
                         f"{'is' if len(given) == 1 else 'are'} given; k_pages, v_pages and slot_mapping must be "
                         "all given (page write) or all None (no page write)")
    write_pages = not missing
    if not write_pages and k_out is None:
        raise ValueError(f"{OP}: no pages (k_pages, v_pages, slot_mapping are None) and no argument 'k_out': "
                         "the call writes nothing; pass k_out (e.g. k itself) or the pages")
    if write_pages or v is not None:
        _check_rows("v", v, q.shape, q.dtype, device)
    if k_out is not None:
        _check_rows("k_out", k_out, q.shape, q.dtype, device)
    row = heads * head_dim
    dispatch.check_tensor(OP, "q_norm_weight", q_norm_weight, shape=(row,), dtypes=FLOAT_DTYPES, device=device)
    dispatch.check_tensor(OP, "k_norm_weight", k_norm_weight, shape=(row,), dtypes=FLOAT_DTYPES, device=device)
    if write_pages:
        if not isinstance(k_pages, torch.Tensor) or k_pages.dim() != 4 or tuple(k_pages.shape[2:]) != (heads, head_dim):
            raise ValueError(f"{OP}: argument 'k_pages' must have shape (num_pages, page_size, {heads}, {head_dim}), got "
                             f"{tuple(k_pages.shape) if isinstance(k_pages, torch.Tensor) else type(k_pages).__name__}")
        dispatch.check_tensor(OP, "k_pages", k_pages, dtypes=FLOAT_DTYPES, device=device)
        dispatch.check_tensor(OP, "v_pages", v_pages, shape=k_pages.shape, dtypes=(k_pages.dtype,), device=device)
        dispatch.check_tensor(OP, "slot_mapping", slot_mapping, shape=(total,), dtypes=(torch.int64,), device=device)
    if not (isinstance(grid_hw, (tuple, list)) and len(grid_hw) == 2 and all(isinstance(g, int) and g > 0 for g in grid_hw)):
        raise ValueError(f"{OP}: argument 'grid_hw' must be two positive ints (grid_h, grid_w), got {grid_hw!r}")
    num_seqs = 1
    if cu_seqlens is not None:
        dispatch.check_tensor(OP, "cu_seqlens", cu_seqlens, dtypes=(torch.int32,), device=device)
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"{OP}: argument 'cu_seqlens' must have shape (S + 1,) with S >= 1, got {tuple(cu_seqlens.shape)}")
        num_seqs = cu_seqlens.numel() - 1
    frame_offsets = None
    if isinstance(frame_offset, torch.Tensor):
        frame_offsets = dispatch.check_tensor(OP, "frame_offset", frame_offset, shape=(num_seqs,), dtypes=INDEX_DTYPES, device=device)
        frame_offset = 0
    elif not isinstance(frame_offset, int) or isinstance(frame_offset, bool) or frame_offset < 0:
        raise ValueError(f"{OP}: argument 'frame_offset' must be a non-negative int or an ({num_seqs},) int tensor, got {frame_offset!r}")
    elif num_seqs > 1:
        raise ValueError(f"{OP}: argument 'frame_offset' must be an ({num_seqs},) int tensor (one offset per sequence of cu_seqlens)")
    if frame_index is not None:
        per_frame = grid_hw[0] * grid_hw[1]
        if total % per_frame:
            raise ValueError(f"{OP}: argument 'frame_index' needs whole frames of tokens, but T = {total} is not a "
                             f"multiple of grid_h * grid_w = {per_frame}")
        dispatch.check_tensor(OP, "frame_index", frame_index, shape=(total // per_frame,), dtypes=INDEX_DTYPES,
                              device=device)
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"{OP}: argument 'eps' must be a positive float, got {eps!r}")
    if validate_slots and write_pages and total:
        num_slots = k_pages.shape[0] * k_pages.shape[1]
        hi = int(slot_mapping.max())
        if hi >= num_slots:
            raise ValueError(f"{OP}: argument 'slot_mapping' holds slot {hi}, but the pages have only {num_slots} slots "
                             f"({k_pages.shape[0]} pages x {k_pages.shape[1]})")
    chosen = dispatch.select_backend(OP, device, IMPLEMENTED, backend)
    return dispatch.invoke(_qk_norm_rope_kv_write_op, _qk_norm_rope_kv_write_impl, 
        q, k, v, q_norm_weight, k_norm_weight, k_pages, v_pages, slot_mapping, k_out, cu_seqlens, frame_offsets,
        frame_index, int(frame_offset), int(grid_hw[0]), int(grid_hw[1]), float(eps), chosen)


# ------------------------------------------------------------------ torch.library registration


def _qk_norm_rope_kv_write_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: Optional[torch.Tensor],
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    k_pages: Optional[torch.Tensor],
    v_pages: Optional[torch.Tensor],
    slot_mapping: Optional[torch.Tensor],
    k_out: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    frame_offsets: Optional[torch.Tensor],
    frame_index: Optional[torch.Tensor],
    frame_offset: int,
    grid_h: int,
    grid_w: int,
    eps: float,
    backend: str,
) -> torch.Tensor:
    if backend == "reference":
        cu = cu_seqlens.tolist() if cu_seqlens is not None else None
        offsets = frame_offsets.tolist() if frame_offsets is not None else [frame_offset]
        if frame_index is not None:  # one "sequence" per frame of tokens
            per_frame = grid_h * grid_w
            cu = list(range(0, q.shape[0] + 1, per_frame))
            offsets = frame_index.tolist()
        return _reference.qk_norm_rope_kv_write(q, k, v, q_norm_weight, k_norm_weight, k_pages, v_pages, slot_mapping,
                                                grid_h, grid_w, offsets, cu, eps, k_out=k_out)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0]:
        from spiral_rt.kernels import qk_norm_rope_kv_write as kernel

        head_dim = q.shape[2]
        d_t, d_h, _ = _reference.rope_parts(head_dim)
        kernel.qk_norm_rope_kv_write(q, k, v, q_norm_weight, k_norm_weight, _inv_freq(head_dim, q.device), q_out,
                                     k_pages, v_pages, slot_mapping, cu_seqlens, frame_offsets, frame_offset,
                                     grid_h, grid_w, d_t // 2, d_h // 2, eps, frame_index=frame_index, k_out=k_out)
    return q_out


_qk_norm_rope_kv_write_op = torch.library.custom_op("spiral_rt::qk_norm_rope_kv_write", _qk_norm_rope_kv_write_impl, mutates_args=("k_pages", "v_pages", "k_out"))


@_qk_norm_rope_kv_write_op.register_fake
def _(q, k, v, q_norm_weight, k_norm_weight, k_pages, v_pages, slot_mapping, k_out, cu_seqlens, frame_offsets,
      frame_index, frame_offset, grid_h, grid_w, eps, backend):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


# ------------------------------------------------------------------------------ backend glue


@functools.lru_cache(maxsize=None)
def _inv_freq(head_dim: int, device: torch.device) -> torch.Tensor:
    """The (D/2,) fp32 inverse-frequency table on ``device``, built once (the reference's own table)."""
    return _reference.rope_inv_freq(head_dim, device)
