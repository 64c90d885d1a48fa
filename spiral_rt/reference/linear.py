"""``epilogue(x W^T + b)``, reference implementation: PyTorch's own linear, then Wan's tanh-GELU.

The GEMM runs in the inputs' dtype with fp32 accumulation (what PyTorch does on every device), so on
a GPU it is as fast as PyTorch, and the reference backend stays usable where ``spiral_rt.ops``'s
cuBLASLt path is not available. With ``gelu`` on a GPU (2-D x, a bias) it is PyTorch's own fused
call (cuBLASLt's bias + tanh-GELU epilogue, one rounding: what the DiT ran before the op);
elsewhere the GEMM's output is rounded before the GELU, so 16-bit results may differ by an ulp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
    """Reference of ``spiral_rt.ops.linear``: (..., K) x (N, K) -> (..., N), plus bias, tanh-GELU."""
    if gelu and x.is_cuda and x.dim() == 2 and bias is not None:
        return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
    y = F.linear(x, weight, bias)
    return F.gelu(y, approximate="tanh") if gelu else y
