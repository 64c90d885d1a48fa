"""GRPO advantages, loss and export against hand-written float64 formulas."""

import json
import math

import pytest
import torch

from spiral_rt.rl import (
    AdvantageConfig,
    GRPOLossConfig,
    PlanRecord,
    gaussian_kl,
    group_advantages,
    grpo_loss,
    hierarchical_advantages,
    normalized_log_ratio,
    velocity_mse,
    write_planner_jsonl,
    zero_std_fraction,
)
from spiral_rt.sampling import SelfForcingRenoise, transition_log_prob


def test_group_advantages_normalise_within_groups():
    rewards = torch.rand(12, dtype=torch.float64) * 3
    groups = torch.tensor([2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1])
    adv = group_advantages(rewards, groups, AdvantageConfig(clip=None, eps=1e-12))
    for g in range(3):
        r = rewards[groups == g]
        expected = (r - r.mean()) / r.std(unbiased=False)
        torch.testing.assert_close(adv[groups == g], expected)
        assert abs(adv[groups == g].sum().item()) < 1e-9


def test_flat_groups_get_zero_advantage_and_clipping_applies():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 10.0, 0.0, 0.0, 0.0, 0.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    adv = group_advantages(rewards, groups, AdvantageConfig(clip=2.0))
    assert torch.all(adv[:3] == 0)
    assert adv[5].item() == pytest.approx(2.0) and adv[3:].min() < 0
    assert zero_std_fraction(rewards, groups) == 0.5
    centred = group_advantages(rewards, groups, AdvantageConfig(scale_by_std=False, clip=None))
    assert centred[5].item() == pytest.approx(10 - 10 / 7)


def test_hierarchical_advantages():
    rewards = torch.rand(3, 4, dtype=torch.float64)
    h = hierarchical_advantages(rewards, AdvantageConfig(clip=None, eps=1e-12))
    for k in range(3):
        r = rewards[k]
        torch.testing.assert_close(h.execution[k], (r - r.mean()) / r.std(unbiased=False))
    pr = rewards.mean(1)
    torch.testing.assert_close(h.plan_rewards, pr)
    torch.testing.assert_close(h.plan, (pr - pr.mean()) / pr.std(unbiased=False))


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="'group_ids'"):
        group_advantages(torch.rand(4), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([1.0, float("nan")]), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="'rewards'"):
        hierarchical_advantages(torch.rand(5))
    with pytest.raises(ValueError, match="'clip_range'"):
        GRPOLossConfig(clip_range=1.5)
    with pytest.raises(ValueError, match="'kl'"):
        grpo_loss(torch.zeros(3), torch.zeros(3), torch.ones(3), GRPOLossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="'advantages'"):
        grpo_loss(torch.zeros(3), torch.zeros(3), torch.ones(2))


def _reference_loss(logp_new, logp_old, adv, clip, beta, kl):
    total = 0.0
    for i in range(len(adv)):
        r = math.exp(logp_new[i] - logp_old[i])
        total += max(-adv[i] * r, -adv[i] * min(max(r, 1 - clip), 1 + clip))
    return total / len(adv) + beta * sum(kl) / len(kl)


def test_grpo_loss_and_gradient_match_a_reference():
    n = 9
    logp_old = torch.randn(n, dtype=torch.float64)
    logp_new = (logp_old + 0.3 * torch.randn(n, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(n, dtype=torch.float64)
    kl = torch.rand(n, dtype=torch.float64)
    cfg = GRPOLossConfig(clip_range=0.2, kl_coef=0.05)
    out = grpo_loss(logp_new, logp_old, adv, cfg, kl=kl)
    expected = _reference_loss(logp_new.tolist(), logp_old.tolist(), adv.tolist(), 0.2, 0.05, kl.tolist())
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    out.loss.backward()
    # d/dlogp_new of max(-A r, -A clip(r)): -A r / N where the unclipped branch is active, else 0
    r = torch.exp(logp_new.detach() - logp_old)
    active = torch.where(adv > 0, r <= 1.2, r >= 0.8)
    expected_grad = torch.where(active, -adv * r / n, torch.zeros_like(r))
    torch.testing.assert_close(logp_new.grad.double(), expected_grad, rtol=1e-5, atol=1e-7)
    assert 0 <= out.stats["clipfrac"] <= 1


def test_gaussian_kl_closed_form_and_conventions():
    mu_a, mu_b = torch.randn(3, 5, 7, dtype=torch.float64), torch.randn(3, 5, 7, dtype=torch.float64)
    std = torch.tensor([0.5, 1.0, 2.0])
    per_elem = (mu_a - mu_b) ** 2 / (2 * std.double()[:, None, None] ** 2)
    torch.testing.assert_close(gaussian_kl(mu_a, mu_b, std, "sum").double(), per_elem.sum((1, 2)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gaussian_kl(mu_a, mu_b, std, "mean").double(), per_elem.mean((1, 2)), rtol=1e-5, atol=1e-6)
    # against torch.distributions in float64
    d = torch.distributions
    ref = d.kl_divergence(d.Normal(mu_a, std.double()[:, None, None]), d.Normal(mu_b, std.double()[:, None, None])).sum((1, 2))
    torch.testing.assert_close(gaussian_kl(mu_a, mu_b, std, "sum").double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(velocity_mse(mu_a, mu_b).double(), ((mu_a - mu_b) ** 2).mean((1, 2)), rtol=1e-5, atol=1e-6)


def test_normalized_log_ratio_is_the_noise_velocity_correlation():
    """For the Self-Forcing step, TempAct's normalisation leaves sign(B) * mean(eps * (v_new - v_old))."""
    policy = SelfForcingRenoise()
    sigma, sigma_next = 0.9375, 0.8333
    coef = policy.coefficients(sigma, sigma_next)
    a, b, c = coef.a, coef.b, coef.c
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    v_old = torch.randn_like(x)
    v_new = v_old + 0.05 * torch.randn_like(x)
    eps = torch.randn_like(x)
    mu_old = a * x + b * v_old
    mu_new = a * x + b * v_new
    x_next = mu_old + c * eps
    lp_old = transition_log_prob(x_next, mu_old, torch.full((4,), c), "mean").double()
    lp_new = transition_log_prob(x_next, mu_new, torch.full((4,), c), "mean").double()
    got = normalized_log_ratio((lp_new - lp_old).float(), v_new, v_old, b, c).double()
    expected = math.copysign(1, b) * (eps * (v_new - v_old)).mean((1, 2, 3))
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-5)


def test_planner_jsonl_export(tmp_path):
    h = hierarchical_advantages(torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]))
    records = [PlanRecord("g0", "move the red circle left", k, json.dumps({"steps": [f"step {k}"]}), float(h.plan_rewards[k]),
                          float(h.plan[k]), (1.0, 0.0)) for k in range(3)]
    path = write_planner_jsonl(records, tmp_path / "plans.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 3
    assert lines[0]["prompt"][0] == {"role": "user", "content": "move the red circle left"}
    assert lines[2]["completion"][0]["role"] == "assistant" and json.loads(lines[2]["completion"][0]["content"])
    assert lines[2]["advantage"] > 0 > lines[1]["advantage"]
    assert sum(line["advantage"] for line in lines) == pytest.approx(0, abs=1e-6)
