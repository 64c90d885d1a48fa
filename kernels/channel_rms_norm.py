"""RMS norm over the channel dim of (B, C, *spatial) activations with an optional fused SiLU, in
Triton (math and contract: ``spiral_rt.reference.channel_rms_norm``).

x is viewed as (B, C, N), N = prod(spatial), either contiguous (the C values of one position lie N
elements apart, the positions of one channel are consecutive) or channels-last (the C values of
one position are consecutive: PyTorch's channels_last / channels_last_3d). One program takes BLOCK_N
consecutive positions of one batch item and walks the channels in blocks of BLOCK_C twice: first
accumulating the sum of squares in fp32, then re-reading x to write
y = x * scale / max(sqrt(ss), eps) * gamma[c] (SiLU'd when asked) in x's dtype. Every load and
store is a run of BLOCK_N (channels-last: BLOCK_C) consecutive elements. Traffic: two reads of x and one write
of y (the second read hits L2 only when the resident programs' C x BLOCK_N tiles fit there, i.e.
at small C); the unfused eager path makes about eight passes. Keeping the whole tile in registers
(one read) would need C x BLOCK_N fp32 values per program: not done, the two-pass form has no
limit on C.
"""

import torch
import triton
import triton.language as tl

BLOCK_N = 256
MAX_BLOCK_C = 16
CL_BLOCK_N = 128  # channels-last tiles: 32 channels (64 B of bf16 runs) x 128 positions
CL_MAX_BLOCK_C = 32


@triton.jit
def _offsets(c, pos, num_channels, num_positions, CHANNELS_LAST: tl.constexpr):
    """(BLOCK_C, BLOCK_N) element offsets within one batch item."""
    if CHANNELS_LAST:
        return pos.to(tl.int64)[None, :] * num_channels + c[:, None]
    return c.to(tl.int64)[:, None] * num_positions + pos[None, :]


@triton.jit
def _store(y_ptr, y, c, pos, mask, batch, stride_b, stride_c, stride_p, positions):
    """Store the (BLOCK_C, BLOCK_N) tile into one destination holding the first ``positions``."""
    offs = batch * stride_b + c.to(tl.int64)[:, None] * stride_c + pos.to(tl.int64)[None, :] * stride_p
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask & (pos < positions)[None, :])


@triton.jit
def _channel_rms_norm_kernel(
    x_ptr, gamma_ptr, bias_ptr, num_channels, num_positions, scale, eps,
    y0_ptr, y0_sb, y0_sc, y0_sp, y0_n, y1_ptr, y1_sb, y1_sc, y1_sp, y1_n, y2_ptr, y2_sb, y2_sc, y2_sp, y2_n,
    NUM_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    batch = tl.program_id(1).to(tl.int64)
    pos = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    pos_mask = pos < num_positions
    base = batch * num_channels * num_positions  # int64: B * C * N exceeds 2**31 at video sizes
    chans = tl.arange(0, BLOCK_C)

    # pass 1: sum of squares over the channels; a (BLOCK_C, BLOCK_N) accumulator keeps the loads of
    # one iteration independent of each other, reduced over channels once at the end
    acc = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
    for c0 in range(0, num_channels, BLOCK_C):
        c = c0 + chans
        mask = (c < num_channels)[:, None] & pos_mask[None, :]
        offs = _offsets(c, pos, num_channels, num_positions, CHANNELS_LAST)
        v = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            v += tl.load(bias_ptr + c, mask=c < num_channels, other=0.0).to(tl.float32)[:, None]
        acc += v * v
    norm = tl.sqrt(tl.sum(acc, axis=0))
    factor = scale / tl.maximum(norm, eps)  # (BLOCK_N,): F.normalize's x / max(||x||, eps), times scale

    # pass 2: re-read, scale, gamma, SiLU, store
    for c0 in range(0, num_channels, BLOCK_C):
        c = c0 + chans
        c_mask = c < num_channels
        mask = c_mask[:, None] & pos_mask[None, :]
        offs = _offsets(c, pos, num_channels, num_positions, CHANNELS_LAST)
        v = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            v += tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)[:, None]
        g = tl.load(gamma_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        y = v * factor[None, :] * g[:, None]
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        _store(y0_ptr, y, c, pos, mask, batch, y0_sb, y0_sc, y0_sp, y0_n)
        if NUM_OUT > 1:
            _store(y1_ptr, y, c, pos, mask, batch, y1_sb, y1_sc, y1_sp, y1_n)
        if NUM_OUT > 2:
            _store(y2_ptr, y, c, pos, mask, batch, y2_sb, y2_sc, y2_sp, y2_n)


def channel_rms_norm(x, gamma, y, scale: float, eps: float, silu: bool, channels_last: bool = False,
                     block_n: int | None = None, block_c: int | None = None, num_warps: int = 4, bias=None):
    """Launch on checked tensors: x (B, C, *spatial) contiguous or (channels_last=True)
    channels-last dense; gamma (C,) contiguous; y a tensor of x's shape and layout, or 1 to 3
    destinations (tensor, channel stride, position stride), each (B, C, T_k, *spatial[1:]) with
    evenly strided positions, receiving x's first T_k * prod(spatial[1:]) positions; bias (C,)
    contiguous or None, added to x first."""
    batch, channels = x.shape[0], x.shape[1]
    positions = x.numel() // (batch * channels)
    if isinstance(y, torch.Tensor):
        y = [(y, 1, channels) if channels_last else (y, positions, 1)]
    args = []
    for t, stride_c, stride_p in y:
        args += [t, t.stride(0) if batch > 1 else 0, stride_c, stride_p, t[0, 0].numel()]
    args += args[:5] * (3 - len(y))  # unused slots
    block_n = block_n or (CL_BLOCK_N if channels_last else BLOCK_N)
    block_c = block_c or min(CL_MAX_BLOCK_C if channels_last else MAX_BLOCK_C, triton.next_power_of_2(channels))
    grid = (triton.cdiv(positions, block_n), batch)
    _channel_rms_norm_kernel[grid](
        x, gamma, gamma if bias is None else bias, channels, positions, scale, eps, *args,
        NUM_OUT=len(y), HAS_BIAS=bias is not None, SILU=silu, CHANNELS_LAST=channels_last, BLOCK_C=block_c,
        BLOCK_N=block_n, num_warps=num_warps,
    )
