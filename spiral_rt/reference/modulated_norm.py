"""Modulated LayerNorm (adaLN) with per-frame modulation, reference implementation (eager PyTorch).

For x (B, L, C) whose L tokens are F frames of L / F consecutive tokens, and per-frame
modulation shift, scale (B, F, C), in fp32::

    y = LayerNorm(x) * (1 + scale[frame]) + shift[frame]      # LayerNorm without affine, eps

Fused with the gated residual add that precedes it in a Wan block (``x = x + gate * branch``)::

    x_new = round_to(x.dtype, x + gate[frame] * branch)
    y     = LayerNorm(x_new) * (1 + scale[frame]) + shift[frame]

i.e. the norm reads the residual exactly as stored, so the fused op equals the two ops run
separately. y is returned in ``out_dtype`` (default x's dtype).
"""

from __future__ import annotations

import torch


def _per_token(mod: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B, F, C) per-frame values -> (B, L, C) per-token fp32 values."""
    num_frames = mod.shape[1]
    return mod.float().repeat_interleave(seq_len // num_frames, dim=1)


def modulated_norm(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    gate: torch.Tensor | None = None,
    branch: torch.Tensor | None = None,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference of ``spiral_rt.ops.modulated_norm``; returns (y, x_new or None)."""
    seq_len = x.shape[1]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    x_new = None
    if branch is not None:
        x_new = (x.to(work) + _per_token(gate, seq_len).to(work) * branch.to(work)).to(x.dtype)
        x = x_new
    xf = x.to(work)
    mean = xf.mean(dim=-1, keepdim=True)
    var = ((xf - mean) ** 2).mean(dim=-1, keepdim=True)
    normed = (xf - mean) * torch.rsqrt(var + eps)
    y = normed * (1 + _per_token(scale, seq_len).to(work)) + _per_token(shift, seq_len).to(work)
    return y.to(out_dtype or x.dtype), x_new
