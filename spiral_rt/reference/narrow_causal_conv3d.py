"""A causal 3x3x3 convolution to few output channels (the Wan VAE decoder's head: 96 -> 3),
reference implementation (eager PyTorch).

For x (B, C, T, H, W), the two frames before it ``past`` (B, C, 2, H, W) (zeros when None), weight
(C_out, C, 3, 3, 3) and bias (C_out,)::

    y = conv3d(cat([past, x], dim=2), weight, bias, padding=(0, 1, 1))     # (B, C_out, T, H, W)

i.e. output frame t sees input frames t - 2, t - 1, t (time-causal, no time padding: the past
frames are the padding), zero 'same' padding in space. Computed in fp32 (fp64 for fp64 inputs,
TF32 off), rounded once to x's dtype; returned contiguous.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def narrow_causal_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         past: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of ``spiral_rt.ops.narrow_causal_conv3d`` (module docstring)."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    B, C, T, H, W = x.shape
    if past is None:
        past = torch.zeros((B, C, 2, H, W), dtype=work, device=x.device)
    xin = torch.cat([past.to(work), x.to(work)], dim=2)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # an fp32 oracle on a GPU too
    try:
        y = F.conv3d(xin, weight.to(work), None if bias is None else bias.to(work).reshape(-1), padding=(0, 1, 1))
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    return y.to(x.dtype).contiguous()
