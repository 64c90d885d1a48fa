"""Flow-matching identities between latents, clean data, noise and velocity.

Boundaries: elementwise tensor algebra, no schedule, no model, no randomness. With
``x = (1 - sigma) x0 + sigma eps`` and the model's velocity ``v = eps - x0``:

    x0  = x - sigma * v
    eps = x + (1 - sigma) * v

Latents are (S, ...) with S sequences leading (e.g. a chunk's latents (S, C, F, H, W)); sigma is
a float (all sequences) or an (S,) tensor on the latents' device (one per sequence). Math runs in
fp32 (fp64 for fp64 inputs) and the result comes back in the input's dtype.
"""

from __future__ import annotations

import torch


def _per_sequence(sigma, x: torch.Tensor, work: torch.dtype):
    if isinstance(sigma, torch.Tensor):
        if sigma.dim() == 0:
            return sigma.to(device=x.device, dtype=work)
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must be a float or a ({x.shape[0]},) tensor (one per sequence), got shape {tuple(sigma.shape)}")
        return sigma.to(device=x.device, dtype=work).reshape(-1, *([1] * (x.dim() - 1)))
    return float(sigma)


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def x0_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """Clean-data prediction x0 = x - sigma * v, in x's dtype."""
    work = _work_dtype(x)
    return (x.to(work) - _per_sequence(sigma, x, work) * v.to(work)).to(x.dtype)


def noise_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """Noise prediction eps = x + (1 - sigma) * v, in x's dtype."""
    work = _work_dtype(x)
    return (x.to(work) + (1 - _per_sequence(sigma, x, work)) * v.to(work)).to(x.dtype)


def velocity_from_x0(x: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
    """Velocity v = (x - x0) / sigma (sigma > 0), in x's dtype."""
    work = _work_dtype(x)
    return ((x.to(work) - x0.to(work)) / _per_sequence(sigma, x, work)).to(x.dtype)


def add_noise(x0: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """Forward process x = (1 - sigma) x0 + sigma eps, in x0's dtype."""
    work = _work_dtype(x0)
    s = _per_sequence(sigma, x0, work)
    return ((1 - s) * x0.to(work) + s * eps.to(work)).to(x0.dtype)
