"""Fused sampler step in Triton (math and contract: ``spiral_rt.reference.sampler_step``).

Grid (blocks per sequence, sequences). Each program handles BLOCK elements of one sequence and
writes its partial sum of (x_next - mu)^2; a second launch sums the partials of each sequence in
a fixed order, so sq_sum is deterministic.
"""

import triton
import triton.language as tl

from .philox import philox_normal_block

NOISE_NONE, NOISE_TENSOR, NOISE_PHILOX = 0, 1, 2
BLOCK = 2048
REDUCE_BLOCK = 1024


@triton.jit
def _sampler_step_kernel(
    x_ptr, m_ptr, a_ptr, b_ptr, c_ptr, noise_ptr, key_ptr,
    x_next_ptr, mu_ptr, partial_ptr,
    seq_len, blocks_per_seq,
    NOISE: tl.constexpr, WRITE_MU: tl.constexpr, BLOCK: tl.constexpr,
):
    blk = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    start = blk.to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < seq_len
    row = seq * seq_len
    x = tl.load(x_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + seq)
    b = tl.load(b_ptr + seq)
    c = tl.load(c_ptr + seq)
    mu = a * x + b * m
    if NOISE == 1:
        eps = tl.load(noise_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
        x_next = mu + c * eps
    elif NOISE == 2:
        key = key_ptr + 4 * seq
        eps = philox_normal_block(start, tl.load(key), tl.load(key + 1), tl.load(key + 2), tl.load(key + 3), BLOCK)
        x_next = mu + c * eps
    else:
        x_next = mu
    x_next = x_next.to(x_next_ptr.dtype.element_ty)
    tl.store(x_next_ptr + row + offs, x_next, mask=mask)
    if WRITE_MU:
        tl.store(mu_ptr + row + offs, mu.to(mu_ptr.dtype.element_ty), mask=mask)
    d = tl.where(mask, x_next.to(tl.float32) - mu, 0.0)
    tl.store(partial_ptr + seq * blocks_per_seq + blk, tl.sum(d * d, axis=0))


@triton.jit
def _sum_partials_kernel(partial_ptr, sq_ptr, blocks_per_seq, BLOCK: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, blocks_per_seq, BLOCK):
        idx = i + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + seq * blocks_per_seq + idx, mask=idx < blocks_per_seq, other=0.0)
    tl.store(sq_ptr + seq, tl.sum(acc, axis=0))


def blocks_per_seq(seq_len: int) -> int:
    return triton.cdiv(seq_len, BLOCK)


def sampler_step(x, m, a, b, c, noise, noise_key, x_next, mu, partials, sq_sum, noise_mode: int):
    """Launch on checked, contiguous (S, N) tensors; ``partials`` holds S * blocks_per_seq(N) fp32.

    ``noise``/``noise_key``/``mu`` may be None (then any tensor is passed as a dummy pointer).
    """
    num_seqs, seq_len = x.shape
    nblk = blocks_per_seq(seq_len)
    _sampler_step_kernel[(nblk, num_seqs)](
        x, m, a, b, c,
        noise if noise is not None else x,
        noise_key if noise_key is not None else a,
        x_next, mu if mu is not None else x_next, partials,
        seq_len, nblk,
        NOISE=noise_mode, WRITE_MU=mu is not None, BLOCK=BLOCK, num_warps=8,
    )
    _sum_partials_kernel[(num_seqs,)](partials, sq_sum, nblk, BLOCK=REDUCE_BLOCK, num_warps=4)
