"""Modulated LayerNorm with per-frame shift/scale and an optional fused gated residual add, in
Triton (math and contract: ``spiral_rt.reference.modulated_norm``).

One program per ``ROWS`` consecutive token rows of one frame (C channels padded to a power of two,
masked): each row is read once, reduced twice in registers (mean, then variance of the centred
values) and written once. The frame's modulation rows (shift, scale, gate: fp32, 3 x 6 KB at
C = 1536) are loaded once per program and broadcast over its rows: loaded per row, they cost more
L2 traffic than the row's own DRAM traffic. Memory traffic per token: unfused read x, write y;
fused read x, branch, write x_new, y.
"""

import triton
import triton.language as tl


@triton.jit
def _modulated_norm_kernel(
    x_ptr, branch_ptr, gate_ptr, shift_ptr, scale_ptr, y_ptr, x_new_ptr,
    seq_len, tokens_per_frame, num_frames, num_channels, eps,
    FUSED: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
):
    block = tl.program_id(0)
    frame = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    token = block * ROWS + tl.arange(0, ROWS)
    row_mask = token < tokens_per_frame
    rows = batch * seq_len + frame * tokens_per_frame + token
    mod_row = (batch * num_frames + frame) * num_channels
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < num_channels
    mask = row_mask[:, None] & col_mask[None, :]
    offs = rows[:, None] * num_channels + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if FUSED:
        branch = tl.load(branch_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(gate_ptr + mod_row + cols, mask=col_mask, other=0.0).to(tl.float32)
        x_new = (x + gate[None, :] * branch).to(x_new_ptr.dtype.element_ty)
        tl.store(x_new_ptr + offs, x_new, mask=mask)
        x = x_new.to(tl.float32)
    mean = tl.sum(x, axis=1) / num_channels
    centred = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / num_channels
    rstd = 1.0 / tl.sqrt(var + eps)
    scale = tl.load(scale_ptr + mod_row + cols, mask=col_mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + mod_row + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _launch_shape(block_c: int) -> tuple[int, int]:
    """(rows per program, warps): up to 8 rows a program, about 32 padded elements a thread."""
    rows = max(1, min(8, 8192 // block_c))
    return rows, max(1, min(16, rows * block_c // 1024))


def modulated_norm(x, shift, scale, gate, branch, y, x_new, num_frames: int, eps: float, num_warps: int | None = None,
                   rows: int | None = None):
    """Launch on checked contiguous tensors: x, branch, y, x_new (B, L, C); shift, scale, gate (B, F, C).

    ``gate``/``branch``/``x_new`` are None for the unfused op; ``rows`` (a power of two) and
    ``num_warps`` override the launch shape (benchmarks).
    """
    batch, seq_len, channels = x.shape
    block_c = triton.next_power_of_2(channels)
    default_rows, default_warps = _launch_shape(block_c)
    rows = rows or default_rows
    tokens_per_frame = seq_len // num_frames
    fused = branch is not None
    grid = (triton.cdiv(tokens_per_frame, rows), num_frames, batch)
    _modulated_norm_kernel[grid](
        x, branch if fused else x, gate if fused else shift, shift, scale, y, x_new if fused else y,
        seq_len, tokens_per_frame, num_frames, channels, eps,
        FUSED=fused, BLOCK_C=block_c, ROWS=rows, num_warps=num_warps or default_warps,
    )
