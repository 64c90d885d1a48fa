"""Nearest 2x upsampling followed by a 3x3 convolution (the Wan VAE ``Resample``), reference
implementation (eager PyTorch): the plain formula, the sub-pixel identity that replaces it, and the
phase interleave that the identity ends with (the reference of ``spiral_rt.ops.phase_interleave``).

The identity: with u = upsample_nearest_2x(x) (u[2h + a, 2w + b] = x[h, w]) and a 3x3 kernel w of
zero padding 1, output row 2h + a reads the upsampled rows 2h + a - 1 .. 2h + a + 1, i.e. the
low-res rows

    a = 0:  h - 1 with w[0],          h with w[1] + w[2]
    a = 1:  h     with w[0] + w[1],   h + 1 with w[2]

(columns alike with b), and the zero padding of u is the zero padding of x. So each output phase
(a, b) is a 2x2 convolution of the LOW-RES x with combined weights; run as one convolution of
kernel 2x2, padding 1 and 4 * C_out output channels (channel block 2a + b holds phase (a, b)), it
gives a (H + 1) x (W + 1) map whose phase (a, b) is rows a .. a + H - 1, columns b .. b + W - 1 of
its block:

    out[n, c, 2h + a, 2w + b] = y[n, (2a + b) * C_out + c, h + a, w + b]

16 multiply-adds per low-res pixel per (C_in, C_out) pair instead of 4 x 9 = 36, and no 4x-sized
upsampled intermediate. The combined weights are sums of up to four weights: computed in fp32 and
rounded once to the weights' dtype (in bf16 this rounds differently from the 3x3 path, which sums
the same products in its fp32 accumulator: the two differ by about one bf16 ulp of a weight).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def upsample_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The plain formula: conv2d(upsample_nearest_2x(x), weight (C_out, C_in, 3, 3), bias, padding=1),
    x (N, C_in, H, W) -> (N, C_out, 2H, 2W), in fp32 (fp64 for fp64 inputs), rounded once to x's dtype."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    up = x.to(work).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # an fp32 oracle on a GPU too
    try:
        y = F.conv2d(up, weight.to(work), None if bias is None else bias.to(work), padding=1)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    return y.to(x.dtype)


def _phase_taps(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two phases' 2-tap kernels along ``dim`` (size 3 -> 2): (w0, w1 + w2) and (w0 + w1, w2)."""
    k0, k1, k2 = w.unbind(dim)
    return torch.stack([k0, k1 + k2], dim), torch.stack([k0 + k1, k2], dim)


def phase_weights(weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sub-pixel convolution's parameters (module docstring): weight (C_out, C_in, 3, 3) ->
    (4 C_out, C_in, 2, 2), block 2a + b = phase (a, b), summed in fp32 (fp64 for fp64 weights) and
    rounded once to weight's dtype; bias (C_out,) -> (4 C_out,), repeated per phase."""
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    rows = _phase_taps(weight.to(work), 2)
    blocks = [col for a in (0, 1) for col in _phase_taps(rows[a], 3)]  # (0, 0), (0, 1), (1, 0), (1, 1)
    w4 = torch.cat(blocks, dim=0).to(weight.dtype)
    return w4, (None if bias is None else bias.reshape(-1).repeat(4))


def phase_interleave(y: torch.Tensor) -> torch.Tensor:
    """Reference of ``spiral_rt.ops.phase_interleave``: y (N, 4C, H + 1, W + 1) -> (N, C, 2H, 2W),
    out[n, c, 2h + a, 2w + b] = y[n, (2a + b) C + c, h + a, w + b]; channels-last when y is, else
    contiguous; y's dtype (a copy: bit exact)."""
    N, C4, H1, W1 = y.shape
    C, H, W = C4 // 4, H1 - 1, W1 - 1
    channels_last = not y.is_contiguous() and y.movedim(1, -1).is_contiguous()
    out = torch.empty((N, C, 2 * H, 2 * W), dtype=y.dtype, device=y.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    phases = out.view(N, C, H, 2, W, 2)
    for a in (0, 1):
        for b in (0, 1):
            k = 2 * a + b
            phases[:, :, :, a, :, b] = y[:, k * C : (k + 1) * C, a : a + H, b : b + W]
    return out


def upsample_conv2d_phased(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The identity, eagerly: one 2x2 conv of the low-res x with ``phase_weights`` (in x's dtype,
    like the 3x3 conv it replaces), then ``phase_interleave``."""
    w4, b4 = phase_weights(weight, bias)
    return phase_interleave(F.conv2d(x, w4, b4, padding=1))
