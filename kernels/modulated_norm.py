"""Modulated LayerNorm with per-frame shift/scale and an optional fused gated residual add, in
Triton (math and contract: ``spiral_rt.reference.modulated_norm``).

One program per token row of C channels (C padded to a power of two, masked): the row is read
once, reduced twice in registers (mean, then variance of the centred values) and written once;
the per-frame modulation rows (B * F rows) stay in L2. Memory traffic per token: unfused read x,
write y; fused read x, branch, write x_new, y (the gate/shift/scale rows are shared by a frame).
"""

import triton
import triton.language as tl


@triton.jit
def _modulated_norm_kernel(
    x_ptr, branch_ptr, gate_ptr, shift_ptr, scale_ptr, y_ptr, x_new_ptr,
    seq_len, tokens_per_frame, num_frames, num_channels, eps,
    FUSED: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    batch = row // seq_len
    frame = (row - batch * seq_len) // tokens_per_frame
    mod_row = (batch * num_frames + frame) * num_channels
    cols = tl.arange(0, BLOCK_C)
    mask = cols < num_channels
    offs = row * num_channels + cols
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if FUSED:
        branch = tl.load(branch_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(gate_ptr + mod_row + cols, mask=mask, other=0.0).to(tl.float32)
        x_new = (x + gate * branch).to(x_new_ptr.dtype.element_ty)
        tl.store(x_new_ptr + offs, x_new, mask=mask)
        x = x_new.to(tl.float32)
    mean = tl.sum(x, axis=0) / num_channels
    centred = tl.where(mask, x - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / num_channels
    rstd = 1.0 / tl.sqrt(var + eps)
    scale = tl.load(scale_ptr + mod_row + cols, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + mod_row + cols, mask=mask, other=0.0).to(tl.float32)
    y = centred * rstd * (1.0 + scale) + shift
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _num_warps(block_c: int) -> int:
    return 4 if block_c <= 2048 else 8 if block_c <= 4096 else 16


def modulated_norm(x, shift, scale, gate, branch, y, x_new, num_frames: int, eps: float, num_warps: int | None = None):
    """Launch on checked contiguous tensors: x, branch, y, x_new (B, L, C); shift, scale, gate (B, F, C).

    ``gate``/``branch``/``x_new`` are None for the unfused op.
    """
    batch, seq_len, channels = x.shape
    block_c = triton.next_power_of_2(channels)
    fused = branch is not None
    _modulated_norm_kernel[(batch * seq_len,)](
        x, branch if fused else x, gate if fused else shift, shift, scale, y, x_new if fused else y,
        seq_len, seq_len // num_frames, num_frames, channels, eps,
        FUSED=fused, BLOCK_C=block_c, num_warps=num_warps or _num_warps(block_c),
    )
