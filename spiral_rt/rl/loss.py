"""The GRPO objective for few-step flow-matching samplers, per transition x -> x'.

Each trained transition is a Gaussian step x' ~ N(mu, C^2 I) with mu = A x + B m, where m is the
model's velocity (or x0) prediction and (A, B, C) come from the step policy
(``spiral_rt.sampling``). With log-probs of the stored sample under the rollout policy (old) and
under the current parameters (new):

    ratio = exp(logp_new - logp_old)
    loss  = mean over transitions of  max(-A_i ratio, -A_i clip(ratio, 1 - eps, 1 + eps))  + beta * KL

Log-prob conventions: "sum" (the true log-density of the transition, summed over its elements)
or "mean" (per element: the convention of Flow-GRPO, DanceGRPO and TempAct, which keeps ratios
near 1 for large latents). KL to a reference policy: the closed-form KL of two Gaussians of equal
std, sum or mean of (mu_new - mu_ref)^2 / (2 C^2), or TempAct's velocity MSE, mean (m_new - m_ref)^2.

TempAct's ratio normalisation (``normalized_log_ratio``): the per-element log-ratio of a step
policy is  [2 (x' - mu_old) . d - d^2] / (2 C^2)  with  d = B (m_new - m_old).  Adding back the
quadratic term and rescaling by C / |B| leaves  sign(B) mean(eps . (m_new - m_old)),  eps the
stored step's standard noise: a ratio whose scale no longer depends on the step's sigma.

Boundaries: math on tensors the trainer provides (log-probs, predictions, advantages); no model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

Convention = Literal["sum", "mean"]
KLKind = Literal["gaussian", "velocity_mse", "none"]


@dataclass
class GRPOLossConfig:
    """Settings of the GRPO objective."""

    clip_range: float = 0.2
    """PPO clipping: the ratio is clipped to [1 - clip_range, 1 + clip_range]."""
    kl_coef: float = 0.0
    """Weight beta of the KL term (0: no KL)."""
    kl: KLKind = "gaussian"
    """KL estimate: closed-form Gaussian KL of the step policy, or TempAct's velocity MSE."""
    convention: Convention = "mean"
    """Log-probs (and the Gaussian KL) summed over a transition's elements, or averaged per element."""
    ratio_norm: bool = False
    """TempAct's ratio normalisation (see the module docstring); needs the predictions and (B, C)."""

    def __post_init__(self):
        if not 0 < self.clip_range < 1:
            raise ValueError(f"GRPOLossConfig: 'clip_range' must be in (0, 1), got {self.clip_range}")
        if self.kl_coef < 0:
            raise ValueError(f"GRPOLossConfig: 'kl_coef' must be >= 0, got {self.kl_coef}")
        if self.kl not in ("gaussian", "velocity_mse", "none"):
            raise ValueError(f"GRPOLossConfig: 'kl' must be 'gaussian', 'velocity_mse' or 'none', got {self.kl!r}")
        if self.convention not in ("sum", "mean"):
            raise ValueError(f"GRPOLossConfig: 'convention' must be 'sum' or 'mean', got {self.convention!r}")


@dataclass
class GRPOLossOutput:
    loss: torch.Tensor
    """Scalar to backpropagate."""
    policy_loss: torch.Tensor
    """The clipped surrogate alone (scalar)."""
    kl: torch.Tensor
    """Mean KL term (scalar; 0 when unused)."""
    stats: dict = field(default_factory=dict)
    """Detached diagnostics: ratio mean, clip fraction (above / below), approximate KL to old."""


def _per_sequence(x: torch.Tensor, convention: Convention) -> torch.Tensor:
    flat = x.reshape(x.shape[0], -1)
    return flat.sum(dim=1) if convention == "sum" else flat.mean(dim=1)


def gaussian_kl(mu_new: torch.Tensor, mu_ref: torch.Tensor, std, convention: Convention = "mean") -> torch.Tensor:
    """KL(N(mu_new, std^2) || N(mu_ref, std^2)) per transition (leading dim), summed or per element."""
    std = torch.as_tensor(std, dtype=torch.float32, device=mu_new.device)
    std = std.reshape(-1, *([1] * (mu_new.dim() - 1))) if std.dim() == 1 else std
    return _per_sequence((mu_new.float() - mu_ref.float()) ** 2 / (2 * std**2), convention)


def velocity_mse(m_new: torch.Tensor, m_ref: torch.Tensor) -> torch.Tensor:
    """TempAct's KL surrogate: mean squared difference of the predictions, per transition."""
    return _per_sequence((m_new.float() - m_ref.float()) ** 2, "mean")


def normalized_log_ratio(log_ratio_mean: torch.Tensor, m_new: torch.Tensor, m_old: torch.Tensor, b, c) -> torch.Tensor:
    """TempAct's normalised log-ratio from the per-element mean log-ratio (see the module docstring).

    ``b``, ``c``: the step policy's B and C, floats or (N,) tensors; B must not be 0.
    """
    b = torch.as_tensor(b, dtype=torch.float32, device=log_ratio_mean.device)
    c = torch.as_tensor(c, dtype=torch.float32, device=log_ratio_mean.device)
    if (b == 0).any() or (c <= 0).any():
        raise ValueError("normalized_log_ratio: the step policy needs B != 0 and C > 0 (a stochastic step that uses the model)")
    bias = b**2 / (2 * c**2) * velocity_mse(m_new, m_old)
    return (log_ratio_mean + bias) * c / b.abs()


def grpo_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    config: GRPOLossConfig | None = None,
    *,
    kl: torch.Tensor | None = None,
    log_ratio: torch.Tensor | None = None,
) -> GRPOLossOutput:
    """Clipped GRPO surrogate over N transitions.

    Args:
        logp_new: (N,) log-probs of the stored samples under the current parameters (with grad),
            in ``config.convention``.
        logp_old: (N,) the same under the rollout policy (no grad).
        advantages: (N,) one per transition (each transition of a rollout carries its rollout's).
        kl: optional (N,) KL to the reference policy (``gaussian_kl`` or ``velocity_mse``);
            required when ``config.kl_coef > 0``.
        log_ratio: optional (N,) log-ratio to use instead of logp_new - logp_old (e.g. from
            ``normalized_log_ratio`` when ``config.ratio_norm``).
    """
    config = config or GRPOLossConfig()
    n = logp_new.shape[0] if logp_new.dim() else 0
    for name, value in (("logp_old", logp_old), ("advantages", advantages)):
        if value.shape != logp_new.shape or logp_new.dim() != 1:
            raise ValueError(f"grpo_loss: argument '{name}' must have the shape of logp_new (N,) = {tuple(logp_new.shape)}, got {tuple(value.shape)}")
    if config.kl_coef > 0 and config.kl != "none" and kl is None:
        raise ValueError("grpo_loss: config.kl_coef > 0 needs the argument 'kl' (gaussian_kl or velocity_mse per transition)")
    if config.ratio_norm and log_ratio is None:
        raise ValueError("grpo_loss: config.ratio_norm needs the argument 'log_ratio' (from normalized_log_ratio)")
    if n == 0:
        raise ValueError("grpo_loss: no transitions (N = 0)")
    lr = log_ratio if log_ratio is not None else logp_new.float() - logp_old.float().detach()
    ratio = torch.exp(lr)
    adv = advantages.float().detach()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - config.clip_range, 1 + config.clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()
    kl_term = kl.float().mean() if kl is not None and config.kl != "none" else policy_loss.new_zeros(())
    loss = policy_loss + config.kl_coef * kl_term
    with torch.no_grad():
        stats = {
            "ratio_mean": ratio.mean().item(),
            "clipfrac": ((ratio - 1).abs() > config.clip_range).float().mean().item(),
            "clipfrac_high": (ratio - 1 > config.clip_range).float().mean().item(),
            "clipfrac_low": (1 - ratio > config.clip_range).float().mean().item(),
            # k3 estimator of KL(old || new) from the same samples
            "approx_kl_old": ((ratio - 1) - lr).mean().item(),
        }
    return GRPOLossOutput(loss=loss, policy_loss=policy_loss, kl=kl_term, stats=stats)
