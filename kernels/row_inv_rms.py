"""``1 / sqrt(mean(x[i]^2) + eps)`` per row, in Triton (math and contract:
``spiral_rt.reference.row_inv_rms``).

One program per row: the row's N values (N <= ``MAX_N``) loaded in one masked block, squared and
summed in fp32; one read of x and a 4-byte write per row (an RMS norm reads and writes the whole
row).
"""

import triton
import triton.language as tl

MAX_N = 16384


@triton.jit
def _row_inv_rms_kernel(x_ptr, out_ptr, n, row_stride, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * row_stride + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + row, 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps))


def row_inv_rms(x, out, eps: float):
    """Launch on checked tensors: x (M, N) with unit column stride, out (M,) fp32 contiguous."""
    m, n = x.shape
    if m == 0:
        return
    block = triton.next_power_of_2(n)
    _row_inv_rms_kernel[(m,)](x, out, n, x.stride(0), eps, BLOCK=block, num_warps=4 if block <= 2048 else 8)
