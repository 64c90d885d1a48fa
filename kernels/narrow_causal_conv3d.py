"""A causal 3x3x3 convolution to few (<= 16) output channels, in Triton (math and contract:
``spiral_rt.reference.narrow_causal_conv3d``). The Wan VAE decoder's head (96 -> 3 channels at
full resolution), where cuDNN, given 3 output channels, falls back to a slow generic kernel.

Input frames: output frame t reads frames t, t + 1, t + 2 of the sequence [past (2 frames); x],
each from ``past`` or from ``x`` directly (no concatenated copy). Two kernels:

- ``shift`` (C_out <= 4, the default there): the 9 spatial taps go into the GEMM's N instead of
  its K. A program loads a TILE_H x TILE_W tile of input pixels (one pixel of halo on each side,
  out-of-image pixels as zeros: the zero padding) once per time tap, BLOCK_K channels at a time,
  and multiplies it by the packed weights (3, K_PAD, N_PAD): column s * C_out + o holds
  weight[o, :, dt, dy, dx] for spatial tap s = 3 dy + dx. The (pixels, N_PAD) fp32 result P says
  what each input pixel contributes through each tap; the output at tile pixel m is then
  sum_s P[m + (dy - 1) TILE_W + (dx - 1), s * C_out + o], one ``tl.gather`` along the pixels and
  a masked row sum per output channel, for the (TILE_H - 2) x (TILE_W - 2) interior pixels. Each
  input pixel is read once per time tap (times the halo overhead, 1.31x for 16 x 16 tiles) instead
  of 9 times, and the MMAs are 27 / N_PAD-dense instead of C_out / 16. Programs run (batch, frame)
  fastest, so the three output frames that read one input frame run back to back (L2 hits).
- ``direct`` (any C_out <= 16): a plain implicit GEMM, BLOCK_M pixels x 16 (C_out padded) per
  program, K = the 27 taps x C channels, the shifted activations re-read per tap (from L1/L2).

fp32 accumulation, bias added in fp32, one rounding at the store. Offsets inside one frame are
int32 (the op layer checks they fit); frame and batch offsets int64. The shift kernel runs its
(time tap, channel block) reduction as one loop, so the loads are pipelined across time taps.
Compiled offline for sm_90 (bf16, C = 96, 16 x 16 tiles, 8 warps): 16-byte cp.async loads, wgmma,
80 registers a thread, 55 KB of shared memory; not yet timed on a GPU when written.
"""

import torch
import triton
import triton.language as tl

BLOCK_N = 16
BLOCK_M = 128
TILE_H = 16
TILE_W = 16
MAX_SHIFT_COUT = 4


# ----------------------------------------------------------------------------- direct: taps in K


@triton.jit
def _direct_accumulate(acc, src, s_sc, s_sh, s_sw, w_ptr, dt: tl.constexpr, h, w, m_ok, num_channels, height,
                       width, K_PAD: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """acc += the 9 spatial taps x K_PAD channels of time tap dt, read from one frame at ``src``."""
    k = tl.arange(0, BLOCK_K)
    n = tl.arange(0, BLOCK_N)
    NUM_KB: tl.constexpr = K_PAD // BLOCK_K
    for i in range(0, 9 * NUM_KB):
        s = i // NUM_KB
        c0 = (i % NUM_KB) * BLOCK_K
        hh = h + (s // 3 - 1)
        ww = w + (s % 3 - 1)
        ok = m_ok & (hh >= 0) & (hh < height) & (ww >= 0) & (ww < width)
        c = c0 + k
        mask = ok[:, None]
        if not EVEN_K:
            mask = mask & (c < num_channels)[None, :]
        a = tl.load(src + (hh * s_sh + ww * s_sw)[:, None] + (c * s_sc)[None, :], mask=mask, other=0.0)
        wt = tl.load(w_ptr + ((dt * 9 + s) * K_PAD + c)[:, None] * BLOCK_N + n[None, :])
        acc = tl.dot(a, wt, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _direct_kernel(
    x_ptr, past_ptr, w_ptr, bias_ptr, y_ptr, num_channels, num_frames, height, width,
    x_sb, x_sc, x_st, x_sh, x_sw, p_sb, p_sc, p_st, p_sh, p_sw, y_sb, y_sc, y_st, y_sh, y_sw,
    COUT: tl.constexpr, HAS_PAST: tl.constexpr, HAS_BIAS: tl.constexpr, K_PAD: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    bt = tl.program_id(1)
    b = (bt // num_frames).to(tl.int64)
    t = bt % num_frames
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = m // width
    w = m % width
    m_ok = m < height * width
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for dt in tl.static_range(3):
        f = t + dt  # frame of [past (2 frames); x]
        if f >= 2:
            src = x_ptr + b * x_sb + (f - 2).to(tl.int64) * x_st
            acc = _direct_accumulate(acc, src, x_sc, x_sh, x_sw, w_ptr, dt, h, w, m_ok, num_channels, height, width,
                                     K_PAD, EVEN_K, BLOCK_K, BLOCK_N, PRECISION)
        elif HAS_PAST:
            src = past_ptr + b * p_sb + f.to(tl.int64) * p_st
            acc = _direct_accumulate(acc, src, p_sc, p_sh, p_sw, w_ptr, dt, h, w, m_ok, num_channels, height, width,
                                     K_PAD, EVEN_K, BLOCK_K, BLOCK_N, PRECISION)
    n = tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n)[None, :]  # fp32, zero-padded to BLOCK_N
    offs = b * y_sb + t.to(tl.int64) * y_st + (h * y_sh + w * y_sw)[:, None] + (n * y_sc)[None, :]
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & (n < COUT)[None, :])


# ----------------------------------------------------------------------------- shift: taps in N


@triton.jit
def _shift_kernel(
    x_ptr, past_ptr, w_ptr, bias_ptr, y_ptr, num_channels, num_frames, num_bt, height, width, tiles_w,
    x_sb, x_sc, x_st, x_sh, x_sw, p_sb, p_sc, p_st, p_sh, p_sw, y_sb, y_sc, y_st, y_sh, y_sw,
    COUT: tl.constexpr, HAS_PAST: tl.constexpr, HAS_BIAS: tl.constexpr, K_PAD: tl.constexpr, EVEN_K: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_K: tl.constexpr, N_PAD: tl.constexpr,
    SAME_STRIDES: tl.constexpr, PRECISION: tl.constexpr,
):
    # (batch, frame) fastest: the programs of one spatial tile run back to back (L2 reuse of frames)
    pid = tl.program_id(0)
    bt = pid % num_bt
    tile = pid // num_bt
    b = (bt // num_frames).to(tl.int64)
    t = bt % num_frames
    M: tl.constexpr = TILE_H * TILE_W
    m = tl.arange(0, M)
    ri = m // TILE_W
    ci = m % TILE_W
    hh = (tile // tiles_w) * (TILE_H - 2) - 1 + ri  # the tile with its one-pixel halo
    ww = (tile % tiles_w) * (TILE_W - 2) - 1 + ci
    ok = (hh >= 0) & (hh < height) & (ww >= 0) & (ww < width)
    k = tl.arange(0, BLOCK_K)
    n = tl.arange(0, N_PAD)
    x_pix = hh * x_sh + ww * x_sw
    if not SAME_STRIDES:
        p_pix = hh * p_sh + ww * p_sw
    acc = tl.zeros([M, N_PAD], dtype=tl.float32)
    # one loop over (time tap, channel block), so loads are pipelined across the time taps;
    # acc[m, s * C_out + o] += channels of tile pixel m of frame t + dt of [past; x] x weight[o, :, dt, s]
    NUM_KB: tl.constexpr = K_PAD // BLOCK_K
    for i in range(0, 3 * NUM_KB):
        dt = i // NUM_KB
        c = (i % NUM_KB) * BLOCK_K + k
        f = t + dt
        in_x = f >= 2
        mask = ok[:, None]
        if not HAS_PAST:
            mask = mask & in_x  # zeros before the video
        if not EVEN_K:
            mask = mask & (c < num_channels)[None, :]
        fx = tl.maximum(f - 2, 0).to(tl.int64)
        fp = tl.minimum(f, 1).to(tl.int64)
        if SAME_STRIDES:  # one frame pointer chosen, one offset tensor (fewer registers)
            frame = tl.where(in_x, x_ptr + b * x_sb + fx * x_st, past_ptr + b * p_sb + fp * p_st)
            ptrs = frame + x_pix[:, None] + (c * x_sc)[None, :]
        else:
            ptrs = tl.where(in_x, x_ptr + b * x_sb + fx * x_st + x_pix[:, None] + (c * x_sc)[None, :],
                            past_ptr + b * p_sb + fp * p_st + p_pix[:, None] + (c * p_sc)[None, :])
        a = tl.load(ptrs, mask=mask, other=0.0)
        wt = tl.load(w_ptr + (dt * K_PAD + c)[:, None] * N_PAD + n[None, :])
        acc = tl.dot(a, wt, acc, input_precision=PRECISION)
    # out[m, o] = sum_s acc[m + (dy - 1) TILE_W + (dx - 1), s * C_out + o], for interior pixels m
    s = n // COUT
    used = n < 9 * COUT
    shift = tl.where(used, (s // 3 - 1) * TILE_W + (s % 3 - 1), 0)
    idx = tl.minimum(tl.maximum(m[:, None] + shift[None, :], 0), M - 1)  # border rows: clamped, not stored
    g = tl.gather(acc, idx, 0)
    inner = ok & (ri >= 1) & (ri < TILE_H - 1) & (ci >= 1) & (ci < TILE_W - 1)
    out = y_ptr + b * y_sb + t.to(tl.int64) * y_st + (hh * y_sh + ww * y_sw)
    for o in tl.static_range(COUT):
        v = tl.sum(tl.where((used & (n % COUT == o))[None, :], g, 0.0), axis=1)
        if HAS_BIAS:
            v += tl.load(bias_ptr + o)
        tl.store(out + o * y_sc, v.to(y_ptr.dtype.element_ty), mask=inner)


# ----------------------------------------------------------------------------- launchers


def block_k_for(channels: int) -> int:
    """Channels per reduction step: 32 when it divides C (the VAE head's 96: three unmasked steps),
    else 16 (the smallest ``tl.dot`` K; channels past C masked)."""
    return 32 if channels % 32 == 0 else 16


def default_variant(cout: int) -> str:
    return "shift" if cout <= MAX_SHIFT_COUT else "direct"


def shift_n_pad(cout: int) -> int:
    return max(16, triton.next_power_of_2(9 * cout))


def pack_direct(weight, block_k: int):
    """(C_out, C, 3, 3, 3) -> (27, K_PAD, 16): [tap (dt, dy, dx), channel, output channel], zeros
    past C (K_PAD = C rounded up to block_k) and past C_out."""
    cout, C = weight.shape[:2]
    k_pad = triton.cdiv(C, block_k) * block_k
    packed = torch.zeros((27, k_pad, BLOCK_N), dtype=weight.dtype, device=weight.device)
    packed[:, :C, :cout] = weight.permute(2, 3, 4, 1, 0).reshape(27, C, cout)
    return packed


def pack_shift(weight, block_k: int):
    """(C_out, C, 3, 3, 3) -> (3, K_PAD, N_PAD): [time tap dt, channel, s * C_out + o] with
    s = 3 dy + dx, zeros past C and past 9 C_out."""
    cout, C = weight.shape[:2]
    k_pad = triton.cdiv(C, block_k) * block_k
    packed = torch.zeros((3, k_pad, shift_n_pad(cout)), dtype=weight.dtype, device=weight.device)
    packed[:, :C, : 9 * cout] = weight.permute(2, 1, 3, 4, 0).reshape(3, C, 9 * cout)
    return packed


def narrow_causal_conv3d(x, past, w_packed, bias, y, cout: int, block_k: int, variant: str = "shift",
                         block_m: int | None = None, tile: tuple[int, int] | None = None,
                         num_warps: int | None = None, num_stages: int = 3):
    """Launch on checked tensors: x (B, C, T, H, W), past (B, C, 2, H, W) or None (zeros), any
    strides (fast with the channels innermost); w_packed from ``pack_shift`` / ``pack_direct``
    (per ``variant``) with the same block_k, in x's dtype; bias (>= C_out,) fp32 or None; y (B,
    cout, T, H, W) of x's dtype, any strides. ``block_m`` (direct) / ``tile`` (shift, each side a
    power of two >= 4) set the pixels per program (default: BLOCK_M / (TILE_H, TILE_W)); num_warps
    defaults to 8 for shift (sm_90: 80 registers a thread, 3 programs an SM; 4 warps need ~180, as
    the epilogue holds the result, its gather indices and the gathered values), 4 for direct."""
    B, C, T, H, W = x.shape
    if B * T * H * W == 0:
        return
    p = past if past is not None else x
    common = dict(COUT=cout, HAS_PAST=past is not None, HAS_BIAS=bias is not None, K_PAD=w_packed.shape[1],
                  EVEN_K=C % block_k == 0, BLOCK_K=block_k,
                  PRECISION="ieee" if x.dtype.itemsize == 4 else "tf32", num_stages=num_stages,
                  num_warps=num_warps or 4)  # shift: 4 warps 1.60 ms vs 8 warps 2.17 ms (H100, the Wan head, vae_parts.json)
    bias = bias if bias is not None else w_packed
    if variant == "shift":
        th, tw = tile or (TILE_H, TILE_W)
        tiles_w = triton.cdiv(W, tw - 2)
        num_tiles = triton.cdiv(H, th - 2) * tiles_w
        _shift_kernel[(B * T * num_tiles,)](
            x, p, w_packed, bias, y, C, T, B * T, H, W, tiles_w, *x.stride(), *p.stride(), *y.stride(),
            TILE_H=th, TILE_W=tw, N_PAD=w_packed.shape[2],
            SAME_STRIDES=[p.stride(d) for d in (1, 3, 4)] == [x.stride(d) for d in (1, 3, 4)], **common,
        )
    elif variant == "direct":
        _direct_kernel[(triton.cdiv(H * W, block_m or BLOCK_M), B * T)](
            x, p, w_packed, bias, y, C, T, H, W, *x.stride(), *p.stride(), *y.stride(),
            BLOCK_M=block_m or BLOCK_M, BLOCK_N=BLOCK_N, **common,
        )
    else:
        raise ValueError(f"narrow_causal_conv3d kernel: 'variant' must be 'shift' or 'direct', got {variant!r}")
