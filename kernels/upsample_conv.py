"""The phase interleave of a sub-pixel (upsample + conv) convolution, in Triton (math and contract:
``spiral_rt.reference.upsample_conv``):

    out[n, c, 2h + a, 2w + b] = y[n, (2a + b) C + c, h + a, w + b]

A pure copy. One program takes BLOCK_P consecutive output positions (n, oh, ow) and BLOCK_C
channels: per position one run of BLOCK_C channels is read and one written, so with the channels
innermost (channels-last y and out, the VAE's GPU layout) every load and store is a contiguous run
of BLOCK_C elements (16-byte vectors when the strides allow; Triton specialises the stride-1 and
16-divisible integer arguments, which the channels-last layout gives). Other strides work too,
element by element. Positions are indexed in int32 (the op layer checks N * 2H * 2W < 2**31),
memory offsets in int64. Each element of y's used region is read once and each of out written once:
2 x out bytes of traffic, the floor for a copy.
"""

import triton
import triton.language as tl

TILE = 4096  # elements per program
MAX_BLOCK_C = 64


@triton.jit
def _phase_interleave_kernel(
    y_ptr, out_ptr, num_channels, height, width, num_positions,
    y_sn, y_sc, y_sh, y_sw, o_sn, o_sc, o_sh, o_sw,
    EVEN_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # output positions, (n, oh, ow) order (< 2**31)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c64 = c.to(tl.int64)
    ow = p % (2 * width)
    rest = p // (2 * width)
    oh = rest % (2 * height)
    n = (rest // (2 * height)).to(tl.int64)
    a = oh % 2
    b = ow % 2
    src = n * y_sn + (oh // 2 + a).to(tl.int64) * y_sh + (ow // 2 + b).to(tl.int64) * y_sw \
        + ((2 * a + b) * num_channels).to(tl.int64) * y_sc
    dst = n * o_sn + oh.to(tl.int64) * o_sh + ow.to(tl.int64) * o_sw
    mask = (p < num_positions)[:, None]
    if not EVEN_C:
        mask = mask & (c < num_channels)[None, :]
    v = tl.load(y_ptr + src[:, None] + (c64 * y_sc)[None, :], mask=mask)
    tl.store(out_ptr + dst[:, None] + (c64 * o_sc)[None, :], v, mask=mask)


def _block_c(channels: int) -> int:
    """The largest power of two <= MAX_BLOCK_C dividing C (no masked lanes), else a masked block."""
    block = MAX_BLOCK_C
    while block >= 16:
        if channels % block == 0:
            return block
        block //= 2
    return min(MAX_BLOCK_C, triton.next_power_of_2(channels))


def phase_interleave(y, out, block_c: int | None = None, num_warps: int = 4):
    """Launch on checked tensors: y (N, 4C, H + 1, W + 1), out (N, C, 2H, 2W), any strides (fast
    when the channels are innermost in both), out not overlapping y."""
    N, C, H2, W2 = out.shape
    positions = N * H2 * W2
    if positions == 0 or C == 0:
        return
    block_c = block_c or _block_c(C)
    block_p = max(1, TILE // block_c)
    grid = (triton.cdiv(positions, block_p), triton.cdiv(C, block_c))
    _phase_interleave_kernel[grid](
        y, out, C, H2 // 2, W2 // 2, positions, *y.stride(), *out.stride(),
        EVEN_C=C % block_c == 0, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps,
    )
