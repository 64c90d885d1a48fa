"""RMS norm over the channel dim of (B, C, *spatial) activations, optionally followed by SiLU,
reference implementation (eager PyTorch). The Wan VAE's ``RMSNorm3d`` (+ ``nn.SiLU``).

For x (B, C, *spatial), gamma with C elements, in fp32 (fp64 for fp64 inputs)::

    x = x + bias[c]                                             # when a bias is given
    y = x / max(||x||_2 over dim 1, eps) * scale * gamma[c]     # F.normalize(x, dim=1) * scale * gamma
    y = silu(y)                                                  # when silu
    return round_to(x.dtype, y)

Everything, the SiLU included, is computed in fp32 and rounded once to x's dtype. The unfused
VAE path (``F.normalize(x.float()).to(x.dtype) * scale * gamma``, then ``nn.SiLU``) rounds after
each of those steps in bf16 (three times, four with the SiLU) instead; the results differ by a few
bf16 ulps at most, this one being the closer to the exact value. In fp32 both are a few fp32 ulps
apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def channel_rms_norm(x: torch.Tensor, gamma: torch.Tensor, *, scale: float, silu: bool, eps: float = 1e-12,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of ``spiral_rt.ops.channel_rms_norm``: y = x' / max(||x'||, eps) * scale * gamma (+ SiLU),
    x' = x + bias (per channel, when given)."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    per_channel = (1, x.shape[1], *([1] * (x.dim() - 2)))
    xf = x.to(work) if bias is None else x.to(work) + bias.to(work).reshape(per_channel)
    g = gamma.to(work).reshape(per_channel)
    norm = torch.linalg.vector_norm(xf, dim=1, keepdim=True)  # (B, 1, *spatial)
    y = xf / norm.clamp_min(eps) * (scale * g)
    if silu:
        y = F.silu(y)
    return torch.empty_like(x).copy_(y)  # x's dtype and layout (contiguous or channels-last)
