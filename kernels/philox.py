"""Philox4x32-10 and Box-Muller as Triton device functions.

The same function as ``spiral_rt.reference.philox`` and ``csrc/philox.h``: counter
(quad, sequence, chunk, step), key (seed lo, seed hi), uniforms (2 * (bits >> 9) + 1) * 2**-24,
normals (r cos theta, r sin theta) with r = sqrt(-2 ln u0), theta = 2 pi u1 - pi.
"""

import triton
import triton.language as tl


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds on uint32 tensors of one shape; returns the four output lanes."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def unit_open(bits):
    """uint32 -> fp32 in (0, 1): odd multiples of 2**-24."""
    return (((bits >> 9) << 1) | 1).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def box_muller(a, b):
    radius = tl.sqrt(-2.0 * tl.log(unit_open(a)))
    theta = unit_open(b) * 6.283185307179586 - 3.141592653589793
    return radius * tl.cos(theta), radius * tl.sin(theta)


@triton.jit
def philox_normal_block(start, seed, sequence, chunk, step, BLOCK: tl.constexpr):
    """Normals for elements start .. start + BLOCK - 1 of a noise stream (start % 4 == 0).

    seed is an int64 scalar; sequence, chunk and step int64 scalars taken mod 2**32.
    """
    quads = (start // 4 + tl.arange(0, BLOCK // 4)).to(tl.uint32)
    zeros = tl.zeros([BLOCK // 4], dtype=tl.uint32)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c1 = zeros + (sequence & 0xFFFFFFFF).to(tl.uint32)
    c2 = zeros + (chunk & 0xFFFFFFFF).to(tl.uint32)
    c3 = zeros + (step & 0xFFFFFFFF).to(tl.uint32)
    r0, r1, r2, r3 = philox4x32_10(quads, c1, c2, c3, zeros + k0, zeros + k1)
    z0, z1 = box_muller(r0, r1)
    z2, z3 = box_muller(r2, r3)
    # (quad, pair, lane) -> element 4 * quad + 2 * pair + lane
    return tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [BLOCK])
