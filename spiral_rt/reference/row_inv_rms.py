"""Per-row inverse root mean square, reference implementation (eager PyTorch):
``1 / sqrt(mean(x[i]^2) + eps)`` over each row's N values.

It is the factor an RMS norm multiplies a row by (before its weight). The DiT's fused
cross-attention computes it for the query rows and hands it to ``chunk_attention`` as a per-row
score scale (the norm's weight folded into the keys), instead of writing normalised queries.
Math in fp32 (fp64 for fp64 inputs); the result is fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch


def row_inv_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference of ``spiral_rt.ops.row_inv_rms``: (M, N) -> (M,)."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.rsqrt(x.to(work).square().mean(dim=-1) + eps)
