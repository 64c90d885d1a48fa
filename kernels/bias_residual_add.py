"""``y + bias[c] + residual`` in one pass, in Triton (math and contract:
``spiral_rt.reference.bias_residual_add``).

y, residual and out share one dense layout, so the op is elementwise over their common memory
order; only the channel of an element depends on the layout: element i is channel i % C when the
channels are innermost (channels-last), (i // N) % C when each channel is a plane of N positions
(contiguous). One read of y and residual and one write of out (three passes over the activations
instead of the eager path's five: a bias add, then the residual add).
"""

import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _bias_residual_add_kernel(y_ptr, bias_ptr, res_ptr, out_ptr, numel, num_channels, num_positions,
                              CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if CHANNELS_LAST:
        c = offs % num_channels
    else:
        c = (offs // num_positions) % num_channels
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (y + b + r).to(out_ptr.dtype.element_ty), mask=mask)


def bias_residual_add(y, bias, residual, out, channels_last: bool):
    """Launch on checked tensors: y, residual, out (B, C, *spatial) in one dense layout (the same
    strides), bias (C,) contiguous."""
    numel = y.numel()
    if numel == 0:
        return
    positions = numel // (y.shape[0] * y.shape[1])
    _bias_residual_add_kernel[(triton.cdiv(numel, BLOCK),)](
        y, bias, residual, out, numel, y.shape[1], positions, CHANNELS_LAST=channels_last, BLOCK=BLOCK, num_warps=8)
