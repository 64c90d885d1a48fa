"""Gaussian log-densities of sampler transitions, in both conventions GRPO trainers use.

Boundaries: turns the sampler step's per-sequence ``sq_sum = sum (x' - mu)^2`` and element count
into log-densities (no sampling here), plus a differentiable version for training that forms
``sq_sum`` itself. A stochastic step draws ``x' ~ N(mu, C^2 I)`` over ``count`` elements:

    sum convention  : log p(x') = -sq_sum / (2 C^2) - count * (log C + log(2 pi) / 2)
    mean convention : log p(x') / count   (the per-element mean Flow-GRPO, DanceGRPO, TempAct use)

``C`` is the step's std (a float or an (S,) tensor). C = 0 is a deterministic step, which has no
density: the result is NaN there, so it cannot be mistaken for a probability. Results are float64
(a sum over ~10^6 elements loses the small differences GRPO ratios need in float32).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Convention = Literal["sum", "mean"]
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def gaussian_log_prob(sq_sum: torch.Tensor, count: int, std, convention: Convention = "sum") -> torch.Tensor:
    """Per-sequence log-density of a Gaussian transition from its squared-deviation sum.

    Args:
        sq_sum: (S,) sum over each sequence of (x' - mu)^2 (the sampler step's ``sq_sum``).
        count: elements per sequence.
        std: the step's std C: a float, or an (S,) tensor (moved to sq_sum's device).
        convention: "sum" (the true log-density) or "mean" (divided by count).
    Returns:
        (S,) float64 on sq_sum's device; NaN where std == 0.
    """
    if convention not in ("sum", "mean"):
        raise ValueError(f"gaussian_log_prob: convention must be 'sum' or 'mean', got {convention!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"gaussian_log_prob: count must be a positive int, got {count!r}")
    sq = sq_sum.to(torch.float64)
    c = std.to(device=sq.device, dtype=torch.float64) if isinstance(std, torch.Tensor) else torch.full_like(sq, float(std))
    lp = -sq / (2.0 * c * c) - count * (torch.log(c) + _HALF_LOG_2PI)
    lp = torch.where(c > 0, lp, torch.full_like(lp, float("nan")))
    return lp / count if convention == "mean" else lp


def transition_log_prob(x_next: torch.Tensor, mu: torch.Tensor, std, convention: Convention = "sum") -> torch.Tensor:
    """Differentiable log N(x_next; mu, std^2) per sequence (leading dim), for recomputing with gradients.

    ``x_next`` (S, ...) is the stored sample (treated as data, detached); ``mu`` (S, ...) may carry
    gradients. Sums in fp32, then the float64 formula of ``gaussian_log_prob``.
    """
    if x_next.shape != mu.shape:
        raise ValueError(f"transition_log_prob: mu must have x_next's shape {tuple(x_next.shape)}, got {tuple(mu.shape)}")
    diff = x_next.detach().float() - mu.float()
    sq_sum = diff.pow(2).reshape(diff.shape[0], -1).sum(dim=1)
    return gaussian_log_prob(sq_sum, x_next[0].numel(), std, convention)
