"""``epilogue(x W^T + b)``, reference implementation: PyTorch's own linear, then Wan's tanh-GELU.

The GEMM runs in the inputs' dtype with fp32 accumulation (what PyTorch does on every device), so on
a GPU it is as fast as PyTorch, and the reference backend stays usable where ``spiral_rt.ops``'s
cuBLASLt path is not available. With ``gelu`` the GEMM's output is rounded before the GELU; the fused
epilogue rounds once, so 16-bit results may differ by an ulp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
    """Reference of ``spiral_rt.ops.linear``: (..., K) x (N, K) -> (..., N), plus bias, tanh-GELU."""
    y = F.linear(x, weight, bias)
    return F.gelu(y, approximate="tanh") if gelu else y
