"""Group-normalised advantages for GRPO, flat and hierarchical (plan groups x execution groups).

GRPO replaces a learned value baseline by the statistics of a group of rollouts that share a
condition: each member's advantage is its reward minus the group mean, over the group standard
deviation. SPIRAL/TempAct groups are hierarchical: for a goal, K plans (a planning group); for a
plan, G continuations from one shared visual prefix (an execution group). The executor learns
from advantages within each execution group; the planner from plan rewards (the mean reward of a
plan's G executions) normalised across the K plans of its goal.

Boundaries: pure tensor math on rewards; no model, no I/O. A group whose rewards are all equal
carries no signal: its advantages are exactly zero (not NaN), and ``zero_std_fraction`` reports
how often that happens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AdvantageConfig:
    """How rewards become advantages."""

    eps: float = 1e-6
    """Added to the group standard deviation before dividing."""
    clip: float | None = 5.0
    """Advantages are clipped to [-clip, clip] (None: no clipping)."""
    scale_by_std: bool = True
    """Divide by the group standard deviation (False: mean-centred only, as in Dr. GRPO)."""

    def __post_init__(self):
        if not self.eps > 0:
            raise ValueError(f"AdvantageConfig: 'eps' must be > 0, got {self.eps}")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"AdvantageConfig: 'clip' must be > 0 or None, got {self.clip}")


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, config: AdvantageConfig | None = None) -> torch.Tensor:
    """Advantages of ``rewards`` (N,) normalised within groups given by ``group_ids`` (N,) ints.

    Uses the population standard deviation of each group (unbiased=False); groups of one member,
    or with equal rewards, get zero advantages.
    """
    config = config or AdvantageConfig()
    rewards = torch.as_tensor(rewards)
    group_ids = torch.as_tensor(group_ids, device=rewards.device)
    if rewards.dim() != 1:
        raise ValueError(f"group_advantages: argument 'rewards' must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if group_ids.shape != rewards.shape:
        raise ValueError(f"group_advantages: argument 'group_ids' must have the shape of rewards {tuple(rewards.shape)}, "
                         f"got {tuple(group_ids.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("group_advantages: argument 'rewards' contains NaN or inf")
    r = rewards.double()
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    count = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, inverse, torch.ones_like(r))
    mean = torch.zeros_like(count).index_add_(0, inverse, r) / count
    centred = r - mean[inverse]
    adv = centred
    if config.scale_by_std:
        var = torch.zeros_like(count).index_add_(0, inverse, centred**2) / count
        std = var.sqrt()[inverse]
        adv = torch.where(std > 0, centred / (std + config.eps), torch.zeros_like(centred))
    if config.clip is not None:
        adv = adv.clamp(-config.clip, config.clip)
    return adv.to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def zero_std_fraction(rewards: torch.Tensor, group_ids: torch.Tensor) -> float:
    """Fraction of groups whose rewards are all equal (they contribute no gradient)."""
    rewards, group_ids = torch.as_tensor(rewards), torch.as_tensor(group_ids)
    groups = torch.unique(group_ids)
    flat = sum(bool((rewards[group_ids == g] == rewards[group_ids == g][0]).all()) for g in groups)
    return flat / max(len(groups), 1)


@dataclass
class HierarchicalAdvantages:
    """Advantages of one goal's K plans x G executions."""

    execution: torch.Tensor
    """(K, G): each execution's reward normalised within its plan's execution group."""
    plan_rewards: torch.Tensor
    """(K,): each plan's reward, the mean of its G execution rewards."""
    plan: torch.Tensor
    """(K,): plan rewards normalised across the goal's K plans."""


def hierarchical_advantages(rewards: torch.Tensor, config: AdvantageConfig | None = None) -> HierarchicalAdvantages:
    """Execution- and plan-level advantages from one goal's rewards, shape (K plans, G executions)."""
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 2 or rewards.numel() == 0:
        raise ValueError(f"hierarchical_advantages: argument 'rewards' must be (K plans, G executions), got shape {tuple(rewards.shape)}")
    k, g = rewards.shape
    plan_ids = torch.arange(k, device=rewards.device).repeat_interleave(g)
    execution = group_advantages(rewards.reshape(-1), plan_ids, config).reshape(k, g)
    plan_rewards = rewards.double().mean(dim=1).to(execution.dtype)
    plan = group_advantages(plan_rewards, torch.zeros(k, dtype=torch.int64, device=rewards.device), config)
    return HierarchicalAdvantages(execution=execution, plan_rewards=plan_rewards, plan=plan)
