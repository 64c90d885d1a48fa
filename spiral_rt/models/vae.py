"""Streaming Wan2.1 VAE decoder: latents (B, 16, T, H, W) -> video (B, 3, T_out, 8H, 8W) in [-1, 1].

The Wan2.1 VAE compresses 4x in time and 8x8 in space with causal 3D convolutions: an output
frame depends only on the current and earlier latent frames. Every temporal convolution (kernel 3
in time) looks at the two input frames before the current one; decoding chunk by chunk carries
those two frames per convolution from one call to the next in a ``DecoderState`` whose buffers are
allocated once (``new_state``) and updated in place, so decoding a clip chunk by chunk gives the
same frames as decoding it at once. The first latent frame decodes to 1 frame, every later latent
frame to 4: a first chunk of T latent frames gives 1 + 4 (T - 1) frames, later chunks 4 T.

Structure (names follow the original ``Wan2.1_VAE.pth``, so its decoder keys load unchanged):

    z -> z * std + mean (per channel) -> conv2 (1x1x1) -> decoder.conv1 (3x3x3)
      -> decoder.middle: ResidualBlock, AttentionBlock (per frame, one head), ResidualBlock
      -> decoder.upsamples: per stage (num_res_blocks + 1) ResidualBlocks, then a Resample
         (upsample3d: causal time conv doubling the frames after the first + 2x nearest + 3x3 conv;
          upsample2d: 2x nearest + 3x3 conv)
      -> decoder.head: RMS norm, SiLU, conv to 3 channels -> clamp to [-1, 1]

``upsample3d`` keeps Wan's rule for the first frame: the very first frame a resample sees passes
through without the time convolution (1 frame out), every later frame through the causal time
convolution of the sequence that starts at the second frame (2 frames out).

Boundaries: decoder only (the runtime never encodes); weights via
``spiral_rt.models.checkpoints.load_vae``. Activations run in the parameters' dtype; the RMS norm
is computed in fp32.

Layout: on a GPU the activations, conv weights and stream state are channels-last
(torch.channels_last_3d, and channels_last for the per-frame 2D convs): cuDNN's Hopper
convolutions read that layout natively, so no NCDHW <-> NDHWC transposes run around every conv
(measured on the H100: the full-resolution 3x3x3 convs 9.6 -> 7.6 ms, the resample 2D convs
5.6 -> 3.1 ms). ``WanVAEDecoder.channels_last`` overrides the choice (None: on CUDA only); the
output is returned contiguous either way. Each RMS norm and the SiLU after it run as one
``spiral_rt.ops.channel_rms_norm`` (Triton on a GPU, the PyTorch reference on a CPU), rounded once
to the activation dtype; the ``nn.SiLU`` modules stay in their ``nn.Sequential``s only so that the
indices, hence the checkpoint keys, stay Wan's. With channels-last activations each norm writes
straight into its convolution's input (behind the cached frames; for the full-resolution convs,
into the three time-shifted channel blocks of the time-folded 2-D conv, see
``CausalConv3d._forward_time_folded``), a residual block's first conv leaves its bias to the
second norm, and its second conv (and shortcut conv) leave theirs to the residual add
(``spiral_rt.ops.bias_residual_add``), so no concatenation or bias pass runs over those activations.

Fast paths (each switchable, for tests and A/B benchmarks: bench/bench_vae_parts.py):
``WanVAEDecoder.phase_upsample`` (default True) runs each Resample's nearest 2x + 3x3 conv as one
sub-pixel 2x2 conv of the low-res frames plus an interleave (``spiral_rt.ops.upsample_conv``:
2.25x fewer multiply-adds, no 4x-sized upsampled copy; the checkpoint keys stay Wan's, the
combined weights are derived and cached); ``WanVAEDecoder.head_impl`` (default "auto": "direct" on
CUDA) runs the head conv (96 -> 3 channels) as ``spiral_rt.ops.narrow_causal_conv3d``, which reads
the norm's single output and the cached frames in place, instead of the time-folded cuDNN conv
("conv") that cuDNN runs with a slow kernel for 3 output channels ("padded": the folded conv with
16 output channels, 13 of zero weights); and the cache bookkeeping copies between channels-last
buffers run on int64 views (``_copy_``; module flag ``WIDE_COPIES``), as PyTorch's copy of
non-contiguous tensors does not vectorize.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.bias_residual_add import bias_residual_add
from ..ops.channel_rms_norm import channel_rms_norm, is_channels_last
from ..ops.narrow_causal_conv3d import MAX_OUT_CHANNELS as NARROW_MAX_OUT_CHANNELS
from ..ops.narrow_causal_conv3d import narrow_causal_conv3d
from ..ops.upsample_conv import phase_weights, upsample_conv2d

logger = logging.getLogger(__name__)

WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
CACHE_FRAMES = 2
HEAD_IMPLS = ("auto", "conv", "padded", "direct")
HEAD_PADDED_CHANNELS = 16
WIDE_COPIES = True
"""Copy channels-innermost activations as 8-byte words (``_copy_``); False: plain ``copy_`` (A/B)."""


@dataclass(frozen=True)
class WanVAEConfig:
    """Architecture of the Wan2.1 VAE decoder."""

    z_dim: int = 16
    """Latent channels."""
    base_dim: int = 96
    """Base width; stage widths are base_dim * dim_mult."""
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    """Width multipliers of the encoder stages (the decoder walks them in reverse)."""
    num_res_blocks: int = 2
    """Residual blocks per encoder stage (the decoder has one more per stage)."""
    temporal_upsample: tuple[bool, ...] = (True, True, False)
    """Per decoder upsampling stage, whether it also doubles the frames (Wan2.1: 2 of 3 -> 4x in time)."""
    out_channels: int = 3
    """Video channels."""
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    """Per-channel mean of the latents: the DiT's normalised latents z decode as z * std + mean."""
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    """Per-channel std of the latents."""
    name: str = field(default="wan2.1-vae", compare=False)
    """Label for logs and errors."""

    def __post_init__(self):
        for f in ("dim_mult", "temporal_upsample", "latents_mean", "latents_std"):
            if isinstance(getattr(self, f), list):
                object.__setattr__(self, f, tuple(getattr(self, f)))
        for f in ("z_dim", "base_dim", "num_res_blocks", "out_channels"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"WanVAEConfig({self.name}): '{f}' must be a positive int, got {v!r}")
        if len(self.dim_mult) < 2 or any(m <= 0 for m in self.dim_mult):
            raise ValueError(f"WanVAEConfig({self.name}): 'dim_mult' must list >= 2 positive multipliers, got {self.dim_mult}")
        if len(self.temporal_upsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"WanVAEConfig({self.name}): 'temporal_upsample' needs {len(self.dim_mult) - 1} entries "
                f"(one per upsampling stage of dim_mult={self.dim_mult}), got {len(self.temporal_upsample)}"
            )
        for f in ("latents_mean", "latents_std"):
            if len(getattr(self, f)) != self.z_dim:
                raise ValueError(f"WanVAEConfig({self.name}): '{f}' needs z_dim={self.z_dim} values, got {len(getattr(self, f))}")
        if any(s <= 0 for s in self.latents_std):
            raise ValueError(f"WanVAEConfig({self.name}): 'latents_std' must be positive")
        if (self.base_dim * self.dim_mult[-1]) % 2 or any((self.base_dim * m) % 2 for m in self.dim_mult):
            raise ValueError(f"WanVAEConfig({self.name}): stage widths base_dim * dim_mult must be even (resamples halve them)")

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temporal_upsample)

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    def output_frames(self, latent_frames: int, first_chunk: bool) -> int:
        s = self.temporal_stride
        return (1 + s * (latent_frames - 1)) if first_chunk else s * latent_frames


def wan21_vae() -> WanVAEConfig:
    return WanVAEConfig()


def tiny_vae(base_dim: int = 8, z_dim: int = 16) -> WanVAEConfig:
    mean = WAN21_LATENTS_MEAN if z_dim == 16 else tuple(0.1 * i for i in range(z_dim))
    std = WAN21_LATENTS_STD if z_dim == 16 else tuple(1.0 + 0.1 * i for i in range(z_dim))
    return WanVAEConfig(z_dim=z_dim, base_dim=base_dim, latents_mean=mean, latents_std=std, name="tiny-vae")


# ----------------------------------------------------------------------------- streaming state


@dataclass
class DecoderState:
    """Carried between ``decode_chunk`` calls of one video: the last two input frames of every
    temporal convolution (zeros before the first chunk) and whether the first frame was decoded."""

    buffers: list[torch.Tensor]
    """Per temporal conv, (B, C_in, 2, H_conv, W_conv)."""
    started: bool = False
    """True once the first chunk is decoded."""
    latent_size: tuple[int, int] = (0, 0)
    """(H, W) of the latents this state was made for."""

    def reset(self) -> None:
        for b in self.buffers:
            b.zero_()
        self.started = False


# ----------------------------------------------------------------------------- modules


class CausalConv3d(nn.Conv3d):
    """Conv3d, zero 'same' padding in space, causal in time: a temporal kernel kt sees the kt - 1
    frames before each output frame, taken from the stream state (zeros before the video starts)."""

    def __init__(self, in_channels, out_channels, kernel_size, padding=0):
        kernel = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        pad = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        super().__init__(in_channels, out_channels, kernel, padding=(0, pad[1], pad[2]))
        self.time_context = kernel[0] - 1
        if self.time_context not in (0, CACHE_FRAMES) or pad[0] * 2 != self.time_context:
            raise ValueError(f"CausalConv3d: temporal kernel {kernel[0]} / padding {pad[0]} not supported (1/0 or 3/1)")
        self.cache_index = -1  # set by the decoder when time_context > 0
        self.spatial_scale = 1
        # run as one 2-D convolution over the three time taps stacked along the channels (see
        # _forward_time_folded); None: when the input has fewer than 128 channels, where cuDNN's 3-D
        # kernels are slow (H100, 96 channels at 832x480: 11.1 ms as conv3d, 6.2 ms folded; at 192
        # channels conv3d is the faster, 4.6 vs 5.0 ms)
        self.fold_time: bool | None = None

    def forward(self, x: torch.Tensor, state: DecoderState | None = None, norm: "RMSNorm3d | None" = None,
                norm_bias: torch.Tensor | None = None, add_bias: bool = True, pad_out: int = 0) -> torch.Tensor:
        """Convolve x (B, C, T, H, W), or ``silu(norm(x + norm_bias))`` when ``norm`` is given: with
        channels-last activations the norm then writes straight into the convolution's input buffer,
        behind the cached frames, instead of into a tensor that a concatenation would copy again.
        ``add_bias=False`` leaves this conv's bias out, for a following norm to add (``norm_bias``).
        ``pad_out`` > out_channels runs the convolution with that many output channels, the extra
        ones of zero weights, and returns the real ones (a view): cuDNN picks no fast kernel for 3."""
        bias = self.bias if add_bias else None
        if pad_out > self.out_channels:
            weight, bias = _pad_out_channels(self.weight, bias, pad_out)
            return self._forward(x, state, norm, norm_bias, weight, bias)[:, : self.out_channels]
        return self._forward(x, state, norm, norm_bias, self.weight, bias)

    def _forward(self, x, state, norm, norm_bias, weight, bias) -> torch.Tensor:
        if norm is not None:
            norm = functools.partial(norm, silu=True, bias=norm_bias)
        if self.time_context == 0:
            return self._conv_forward(norm(x) if norm is not None else x, weight, bias)
        if norm is not None and not is_channels_last(x):
            x, norm = norm(x), None  # a time slice of a contiguous buffer is not per-item dense
        fold = self.fold_time if self.fold_time is not None else self.in_channels < 128
        if fold and norm is not None:
            return self._forward_time_folded(x, state, norm, bias, weight)
        B, C, T, H, W = x.shape
        xin = torch.empty((B, C, self.time_context + T, H, W), dtype=x.dtype, device=x.device, memory_format=_layout_of(x))
        past, current = xin[:, :, : self.time_context], xin[:, :, self.time_context :]
        if state is None:
            past.zero_()
        else:
            _copy_(past, state.buffers[self.cache_index])
        if norm is None:
            _copy_(current, x)
        else:
            norm(x, out=current)
        out = self._conv_forward(xin, weight, bias)
        if state is not None:
            _copy_(state.buffers[self.cache_index], xin[:, :, -CACHE_FRAMES:])
        return out

    def forward_direct(self, x: torch.Tensor, state: DecoderState | None, norm: "RMSNorm3d") -> torch.Tensor:
        """The same convolution of silu(norm(x)) for a 3x3x3 conv to <= 16 channels (the decoder
        head), through ``spiral_rt.ops.narrow_causal_conv3d``: the norm writes its output once
        (not three times, as for the time-folded conv, nor behind a copy of the cached frames),
        the op reads the cached frames from the state itself, and the last two input frames become
        the next cached ones. Returns (B, C_out, T, H, W) contiguous."""
        h = norm(x, silu=True)  # x's layout
        past = state.buffers[self.cache_index] if state is not None else None
        y = narrow_causal_conv3d(h, self.weight, self.bias, past=past)
        if past is not None:
            T = h.shape[2]
            if T >= CACHE_FRAMES:
                _copy_(past, h[:, :, T - CACHE_FRAMES :])
            else:  # one new frame: the newer cached frame moves down, the new one follows
                _copy_(past[:, :, :1], past[:, :, 1:])
                _copy_(past[:, :, 1:], h)
        return y

    def _forward_time_folded(self, x: torch.Tensor, state: DecoderState | None, norm, bias: torch.Tensor | None,
                             weight: torch.Tensor) -> torch.Tensor:
        """The same convolution of silu(norm(x)) behind the cached frames, as a 2-D convolution
        over (B * T) frames of 3 C channels: channel block k of frame t holds input frame t + k (of
        the cached frames followed by x's), so the three time taps become one GEMM with a K three
        times as deep. The norm writes each output frame into the (up to) three blocks directly."""
        B, C, T, H, W = x.shape
        ctx = self.time_context
        folded = torch.empty((B, (ctx + 1) * C, T, H, W), dtype=x.dtype, device=x.device,
                             memory_format=torch.channels_last_3d)
        blocks = [folded[:, k * C : (k + 1) * C] for k in range(ctx + 1)]
        past = state.buffers[self.cache_index] if state is not None else None
        for k in range(ctx):  # block k starts with the ctx - k cached frames k.. (zeros before the video)
            n = min(ctx - k, T)
            if past is None:
                blocks[k][:, :, :n].zero_()
            else:
                _copy_(blocks[k][:, :, :n], past[:, :, k : k + n])
        norm(x, out=[blocks[k][:, :, ctx - k :] for k in range(ctx + 1) if T > ctx - k])
        if past is not None:  # the next chunk's cached frames: inputs T and T + 1, in blocks 1, 2 of frame T - 1
            for i in range(ctx):
                _copy_(past[:, :, i : i + 1], blocks[i + 1][:, :, T - 1 :])
        weight = weight.permute(0, 2, 1, 3, 4).reshape(weight.shape[0], (ctx + 1) * C, *self.kernel_size[1:])
        frames = folded.permute(0, 2, 1, 3, 4).reshape(B * T, (ctx + 1) * C, H, W)
        y = F.conv2d(frames, weight.contiguous(memory_format=torch.channels_last), bias, padding=self.padding[1:])
        return y.view(B, T, *y.shape[1:]).permute(0, 2, 1, 3, 4)


def _pad_out_channels(weight: torch.Tensor, bias: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """weight (C_out, ...) and bias (C_out,) padded with zeros to n output channels, weight's layout kept."""
    w = torch.zeros((n, *weight.shape[1:]), dtype=weight.dtype, device=weight.device)
    w[: weight.shape[0]] = weight
    fmt = torch.channels_last_3d if weight.dim() == 5 and is_channels_last(weight) else torch.contiguous_format
    if bias is not None:
        bias = torch.cat([bias, bias.new_zeros(n - bias.shape[0])])
    return w.contiguous(memory_format=fmt), bias


def _copy_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)`` for two tensors of one dtype and shape. When the channels (dim 1) are
    innermost in both, with C * itemsize a multiple of 8 bytes (the VAE's channels-last buffers,
    their time slices and the time-folded conv's channel blocks), the copy runs on int64 views of
    the same memory: PyTorch copies non-contiguous tensors with a generic kernel that moves one
    element per step and does not vectorize, so 8-byte words instead of 2-byte bf16 elements cut
    its work 4x. Bit exact either way."""
    if WIDE_COPIES and dst.dtype == src.dtype and dst.shape == src.shape and dst.dim() >= 3:
        d, s = _as_words(dst), _as_words(src)
        if d is not None and s is not None:
            d.copy_(s)
            return dst
    return dst.copy_(src)


def _as_words(t: torch.Tensor) -> torch.Tensor | None:
    """t (B, C, ...) with the channels moved last, viewed as int64 words; None when the memory
    does not allow it (channels not innermost, C * itemsize or a stride not a multiple of 8 bytes)."""
    size = t.element_size()
    if size >= 8 or t.stride(1) != 1 or (t.shape[1] * size) % 8 or (t.storage_offset() * size) % 8:
        return None
    if any((st * size) % 8 for d, st in enumerate(t.stride()) if d != 1):
        return None
    return t.movedim(1, -1).view(torch.int64)


def _layout_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last_3d for a 5-D channels-last tensor, else contiguous_format."""
    return torch.channels_last_3d if x.dim() == 5 and is_channels_last(x) else torch.contiguous_format


class RMSNorm3d(nn.Module):
    """Wan VAE's RMS norm over channels: normalize(x, dim=1) * sqrt(C) * gamma, with the SiLU that
    follows it fused on request; fp32 math, one rounding (``spiral_rt.ops.channel_rms_norm``)."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor, silu: bool = False, out=None, bias: torch.Tensor | None = None) -> torch.Tensor:
        # the op reads contiguous or channels-last tensors; a contiguous-mode Resample's output is a
        # permuted view of neither kind
        if not (x.is_contiguous() or is_channels_last(x)):
            x = x.contiguous()
        return channel_rms_norm(x, self.gamma, scale=self.scale, silu=silu, bias=bias, out=out)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm3d(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm3d(out_dim), nn.SiLU(), nn.Dropout(0.0), CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, state: DecoderState | None) -> torch.Tensor:
        r = self.residual
        bias = r[6].bias
        if isinstance(self.shortcut, CausalConv3d):
            h = self.shortcut(x, add_bias=False)
            bias = bias + self.shortcut.bias
        else:
            h = x
        # norm + SiLU (r[0] + r[1], r[3] + r[4]) run as one fused op inside each conv's input, the
        # second adding the first conv's bias (a separate pass over the conv output otherwise); r[5] is
        # Dropout(0). The second conv's and the shortcut's biases join the residual add: one pass.
        x = r[2](x, state, norm=r[0], add_bias=False)
        x = r[6](x, state, norm=r[3], norm_bias=r[2].bias, add_bias=False)
        if x.stride() == h.stride() and (x.is_contiguous() or is_channels_last(x)):
            return bias_residual_add(x, bias, h, out=x)
        return x + bias.view(-1, 1, 1, 1) + h  # mixed layouts (the time-folded conv on a CPU, in tests)


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention within each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm3d(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, state: DecoderState | None = None) -> torch.Tensor:
        B, C, T, H, W = x.shape
        y = x.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W)
        qkv = self.to_qkv(self.norm(y)).reshape(B * T, 3 * C, H * W).transpose(1, 2)  # (BT, HW, 3C)
        q, k, v = qkv[:, None].chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(B * T, C, H, W)
        y = self.proj(y).view(B, T, C, H, W).permute(0, 2, 1, 3, 4)
        return x + y


class Upsample2x(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # nearest copies values, so the activation dtype gives the fp32 result bit for bit
        if not is_channels_last(x):
            return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")
        # channels-last (N, H, W, C) memory: each pixel's channel vector written to a 2 x 2 block is
        # one broadcast copy into (N, H, 2, W, 2, C), twice as fast as interpolate's NHWC kernel
        # (H100, 12 x 192 x 240 x 416: 5.4 -> 2.5 ms)
        N, C, H, W = x.shape
        y = x.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(N, H, 2, W, 2, C).reshape(N, 2 * H, 2 * W, C)
        return y.permute(0, 3, 1, 2)


class Resample(nn.Module):
    """2x spatial upsampling (and, for 'upsample3d', 2x temporal through a causal time conv).

    The nearest 2x upsample + 3x3 conv (``resample.0``, ``resample.1``: Wan's modules and keys)
    run as one sub-pixel convolution (``spiral_rt.ops.upsample_conv``): a 2x2 conv of the low-res
    frames to 4 x C_out channels whose blocks are the four output phases, then one interleave pass;
    2.25x fewer multiply-adds and no 4x-sized upsampled intermediate. Its combined weights are
    computed once (fp32 sums, one rounding to the weights' dtype) and cached until the conv's
    weights change (another tensor, or an in-place write: the version counter; weights created
    under torch.inference_mode have none and are recombined per call). ``phase_conv =
    False`` runs the explicit upsample and 3x3 conv instead (tests, A/B benchmarks)."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in ("upsample2d", "upsample3d"):
            raise ValueError(f"Resample: 'mode' must be 'upsample2d' or 'upsample3d', got {mode!r}")
        self.mode = mode
        self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        self.phase_conv = True
        self._phase_cache: tuple | None = None  # (key, weight, bias, the source tensors)

    def _phase_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sub-pixel conv's (4 C_out, C_in, 2, 2) weights (in the 3x3 weights' layout: the
        activations', see ``WanVAEDecoder._set_weight_layout``) and bias."""
        conv = self.resample[1]
        w, b = conv.weight, conv.bias
        fmt = torch.channels_last if is_channels_last(w) else torch.contiguous_format
        if (torch.is_grad_enabled() and (w.requires_grad or (b is not None and b.requires_grad))) \
                or w.is_inference() or (b is not None and b.is_inference()):
            # differentiable when autograd is on; weights made under torch.inference_mode have no
            # version counter to tell an in-place write: both recomputed per call, not cached
            w4, b4 = phase_weights(w, b)
            return w4.contiguous(memory_format=fmt), b4
        key = (w.data_ptr(), w._version, w.dtype, w.device, fmt,
               None if b is None else (b.data_ptr(), b._version, b.dtype))
        hit = self._phase_cache
        if hit is None or hit[0] != key:
            w4, b4 = phase_weights(w.detach(), None if b is None else b.detach())
            # the sources stay referenced, so no other tensor can take their addresses while cached
            hit = self._phase_cache = (key, w4.contiguous(memory_format=fmt), b4, (w.detach(), b))
        return hit[1], hit[2]

    def forward(self, x: torch.Tensor, state: DecoderState | None) -> torch.Tensor:
        if self.mode == "upsample3d":
            first_video_frame = state is None or not state.started
            head, rest = (x[:, :, :1], x[:, :, 1:]) if first_video_frame else (None, x)
            parts = [head] if head is not None else []
            if rest.shape[2]:
                B, C, T, H, W = rest.shape
                y = self.time_conv(rest, state).view(B, 2, C, T, H, W)
                # interleave the two halves in time (frame t -> 2t, 2t + 1), in x's layout (rest, a
                # time slice, is not dense when B > 1)
                doubled = torch.empty((B, C, 2 * T, H, W), dtype=y.dtype, device=y.device, memory_format=_layout_of(x))
                _copy_(doubled[:, :, 0::2], y[:, 0])
                _copy_(doubled[:, :, 1::2], y[:, 1])
                parts.append(doubled)
            x = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
        B, C, T, H, W = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W)
        if self.phase_conv:
            y = upsample_conv2d(frames, *self._phase_params())
        else:
            y = self.resample(frames)
        return y.view(B, T, *y.shape[1:]).permute(0, 2, 1, 3, 4)


class Decoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.base_dim * m for m in (mult[-1],) + tuple(reversed(mult))]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.ModuleList([ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0])])
        ups = []
        scale = 1
        convs_scale: list[tuple[nn.Module, int]] = [(self.conv1, 1), *((m, 1) for m in self.middle.modules())]
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous resample halved the width
            for _ in range(cfg.num_res_blocks + 1):
                ups.append(ResidualBlock(in_dim, out_dim))
                convs_scale += [(m, scale) for m in ups[-1].modules()]
                in_dim = out_dim
            if i != len(mult) - 1:
                ups.append(Resample(out_dim, "upsample3d" if cfg.temporal_upsample[i] else "upsample2d"))
                convs_scale += [(m, scale) for m in ups[-1].modules()]
                scale *= 2
        self.upsamples = nn.ModuleList(ups)
        self.head = nn.Sequential(RMSNorm3d(out_dim), nn.SiLU(), CausalConv3d(out_dim, cfg.out_channels, 3, padding=1))
        self.head_impl = "auto"
        """How the head conv runs (see ``WanVAEDecoder.head_impl``)."""
        convs_scale += [(m, scale) for m in self.head.modules()]
        self.cached_convs: list[CausalConv3d] = []
        for m, s in convs_scale:
            if isinstance(m, CausalConv3d) and m.time_context and m.cache_index < 0:
                m.cache_index, m.spatial_scale = len(self.cached_convs), s
                self.cached_convs.append(m)

    def forward(self, x: torch.Tensor, state: DecoderState | None) -> torch.Tensor:
        x = self.conv1(x, state)
        for layer in self.middle:
            x = layer(x, state)
        for layer in self.upsamples:
            x = layer(x, state)
        norm, conv = self.head[0], self.head[2]  # head[1], the SiLU, fused into the norm
        impl = self.head_impl
        if impl not in HEAD_IMPLS:
            raise ValueError(f"Decoder3d: 'head_impl' must be one of {HEAD_IMPLS}, got {impl!r}")
        if impl == "auto":
            impl = "direct" if x.is_cuda and conv.out_channels <= NARROW_MAX_OUT_CHANNELS else "conv"
        if impl == "direct":
            return conv.forward_direct(x, state, norm)
        return conv(x, state, norm=norm, pad_out=HEAD_PADDED_CHANNELS if impl == "padded" else 0)


class WanVAEDecoder(nn.Module):
    """The streaming decoder (module docstring). ``decode`` for a whole clip, ``new_state`` +
    ``decode_chunk`` for chunk-by-chunk decoding with identical results."""

    def __init__(self, config: WanVAEConfig | None = None):
        super().__init__()
        self.config = cfg = config or WanVAEConfig()
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)
        # fp32 per-channel mean/std, one copy per device (not buffers: model.to(bf16) must not round them)
        self._scale_by_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.channels_last: bool | None = None
        """Activation layout: True channels-last, False contiguous, None channels-last on CUDA only."""
        self._weights_channels_last: bool | None = None  # the layout _set_weight_layout last applied

    @property
    def phase_upsample(self) -> bool:
        """Whether the Resamples run their upsample + 3x3 conv as a sub-pixel conv (the default;
        see ``Resample``); setting it sets every Resample's ``phase_conv``."""
        return all(m.phase_conv for m in self.modules() if isinstance(m, Resample))

    @phase_upsample.setter
    def phase_upsample(self, on: bool) -> None:
        for m in self.modules():
            if isinstance(m, Resample):
                m.phase_conv = bool(on)

    @property
    def head_impl(self) -> str:
        """How the head conv (C -> 3, 3x3x3) runs: "direct" (``ops.narrow_causal_conv3d``, reading
        the norm's output once and the cached frames in place), "conv" (the generic causal conv:
        time-folded conv2d with channels-last activations), "padded" ("conv" with the output
        channels zero-padded to 16, for cuDNN's Hopper kernels), or "auto" (direct on CUDA, conv
        elsewhere; on a CPU "direct" runs the op's PyTorch reference)."""
        return self.decoder.head_impl

    @head_impl.setter
    def head_impl(self, impl: str) -> None:
        if impl not in HEAD_IMPLS:
            raise ValueError(f"WanVAEDecoder: 'head_impl' must be one of {HEAD_IMPLS}, got {impl!r}")
        self.decoder.head_impl = impl

    def _use_channels_last(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.channels_last is None else bool(self.channels_last)

    def _set_weight_layout(self, channels_last: bool) -> None:
        """Conv weights in the activations' layout (cuDNN then picks its native NHWC kernels); once
        per layout change, not per chunk (copies, dtype and device moves keep the layout)."""
        if self._weights_channels_last == channels_last:
            return
        self._weights_channels_last = channels_last
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.Conv2d)):
                fmt = (torch.channels_last_3d if m.weight.dim() == 5 else torch.channels_last) if channels_last \
                    else torch.contiguous_format
                if not m.weight.is_contiguous(memory_format=fmt):
                    m.weight.data = m.weight.data.contiguous(memory_format=fmt)

    def _latent_scale(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as fp32 (1, z_dim, 1, 1, 1) tensors on ``device``, copied there once."""
        hit = self._scale_by_device.get(device)
        if hit is None:
            cfg = self.config
            hit = tuple(torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
                        for v in (cfg.latents_mean, cfg.latents_std))
            self._scale_by_device[device] = hit
        return hit

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    def new_state(self, batch: int, latent_height: int, latent_width: int, device=None, dtype=None) -> DecoderState:
        """Zeroed conv caches for decoding one batch of videos of (latent_height, latent_width) latents."""
        device = torch.device(device if device is not None else self.conv2.weight.device)
        dtype = dtype or self.dtype
        fmt = torch.channels_last_3d if self._use_channels_last(device) else torch.contiguous_format
        bufs = [
            torch.empty((batch, c.in_channels, CACHE_FRAMES, latent_height * c.spatial_scale,
                         latent_width * c.spatial_scale), device=device, dtype=dtype, memory_format=fmt).zero_()
            for c in self.decoder.cached_convs
        ]
        return DecoderState(buffers=bufs, latent_size=(latent_height, latent_width))

    def state_nbytes(self, batch: int, latent_height: int, latent_width: int, dtype=torch.bfloat16) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return sum(batch * c.in_channels * CACHE_FRAMES * latent_height * latent_width * c.spatial_scale**2 * elem
                   for c in self.decoder.cached_convs)

    def _check(self, z: torch.Tensor, state: DecoderState | None):
        cfg = self.config
        if not isinstance(z, torch.Tensor) or z.dim() != 5 or z.shape[1] != cfg.z_dim or z.shape[2] == 0:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"WanVAEDecoder: 'z' must be (B, {cfg.z_dim}, T >= 1, H, W) latents, got {shape}")
        if state is not None:
            B, _, _, H, W = z.shape
            first = state.buffers[0] if state.buffers else None
            if state.latent_size != (H, W) or (first is not None and first.shape[0] != B):
                raise ValueError(
                    f"WanVAEDecoder: 'state' was made for batch {first.shape[0] if first is not None else '?'} and latents "
                    f"{state.latent_size}, got z of batch {B} and (H, W) = ({H}, {W}); make one with new_state()"
                )

    def decode_chunk(self, z: torch.Tensor, state: DecoderState, clamp: bool = True) -> torch.Tensor:
        """Decode the next chunk of a video.

        Args:
            z: (B, z_dim, T, H, W) normalised latents (the DiT's output space) of the next T latent frames.
            state: from ``new_state``; updated in place.
        Returns:
            (B, 3, T_out, 8H, 8W) frames in [-1, 1] (clamped), T_out = 1 + 4 (T - 1) for the first chunk, else 4 T.
        """
        self._check(z, state)
        channels_last = self._use_channels_last(z.device)
        if state.buffers and is_channels_last(state.buffers[0]) != channels_last:
            raise ValueError("WanVAEDecoder: 'state' was made for the other activation layout (channels_last "
                             f"is now {channels_last}); make a new one with new_state()")
        self._set_weight_layout(channels_last)
        mean, std = self._latent_scale(z.device)
        x = (z.float() * std + mean).to(self.dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        out = self.decoder(self.conv2(x), state)
        state.started = True
        out = out.clamp(-1.0, 1.0) if clamp else out
        return out.contiguous()

    def decode(self, z: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Decode a whole clip (B, z_dim, T, H, W) -> (B, 3, 1 + 4 (T - 1), 8H, 8W)."""
        self._check(z, None)
        state = self.new_state(z.shape[0], z.shape[3], z.shape[4], device=z.device)
        return self.decode_chunk(z, state, clamp=clamp)


def build_vae_decoder(config: WanVAEConfig | None = None, device=None, dtype=None) -> WanVAEDecoder:
    with torch.device(device or "cpu"):
        model = WanVAEDecoder(config)
    if dtype is not None:
        model.to(dtype)
    return model.eval()
