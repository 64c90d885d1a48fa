"""``y + bias[c] + residual`` over (B, C, *spatial) activations, reference implementation (eager
PyTorch): the end of a Wan VAE residual block, whose second convolution leaves its bias out.

The sum is taken in fp32 (fp64 for fp64 inputs) and rounded once to y's dtype; the unfused path
(the convolution's bias add, then ``x + h``) rounds twice, so bf16 results differ by a bf16 ulp
at most, this one being the closer to the exact value.
"""

from __future__ import annotations

import torch


def bias_residual_add(y: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Reference of ``spiral_rt.ops.bias_residual_add``: y + bias (per channel) + residual."""
    work = torch.float64 if y.dtype == torch.float64 else torch.float32
    per_channel = (1, y.shape[1], *([1] * (y.dim() - 2)))
    total = y.to(work) + bias.to(work).reshape(per_channel) + residual.to(work)
    return torch.empty_like(y).copy_(total)  # y's dtype and layout
