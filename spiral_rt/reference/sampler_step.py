"""Fused sampler step, reference implementation (eager PyTorch; any device).

For each sequence s (the leading dimension of x) and element i, in fp32:

    mu      = a[s] * x + b[s] * m
    x_next  = round_to_dtype(mu + c[s] * eps)
    sq_sum  = sum_i (x_next - mu)^2      # x_next after rounding: the density of the stored sample

``eps`` is an explicit tensor, Philox noise keyed by ``noise_key[s] = (seed, sequence, chunk,
step)`` (see ``spiral_rt.reference.philox``), or zero when neither is given.
"""

from __future__ import annotations

import torch

from .philox import philox_normal_keyed


def sampler_step(
    x: torch.Tensor,
    m: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    noise: torch.Tensor | None = None,
    noise_key: torch.Tensor | None = None,
    return_mu: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Reference of ``spiral_rt.ops.sampler_step``; a, b, c are fp32 tensors of shape (S,)."""
    num_seqs = x.shape[0]
    xf = x.reshape(num_seqs, -1).float()
    mf = m.reshape(num_seqs, -1).float()
    per_seq = xf.shape[1]
    if noise is not None:
        eps = noise.reshape(num_seqs, -1).float()
    elif noise_key is not None:
        eps = philox_normal_keyed(noise_key, per_seq)
    else:
        eps = torch.zeros_like(xf)
    mu = a.float()[:, None] * xf + b.float()[:, None] * mf
    x_next = (mu + c.float()[:, None] * eps).to(x.dtype)
    sq_sum = ((x_next.float() - mu) ** 2).sum(dim=1)
    mu_out = mu.to(x.dtype).reshape(x.shape) if return_mu else None
    return x_next.reshape(x.shape), mu_out, sq_sum
