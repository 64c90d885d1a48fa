"""Tests of spiral_rt.sampling.step_policies and .log_prob.

Each policy's (A, B, C) must reproduce its textbook update, written out independently below in
float64; the log-prob formed from the op's sq_sum must equal a float64 evaluation of the Gaussian
density of the stored sample, on every backend that runs here (reference; Triton through the
interpreter when available).
"""

from __future__ import annotations

import math

import pytest
import torch

from spiral_rt.ops import available_backends, noise_key
from spiral_rt.sampling import (
    SELF_FORCING,
    CPSStep,
    DanceGRPOStep,
    EulerStep,
    FlowGRPOStep,
    SelfForcingRenoise,
    gaussian_log_prob,
    make_step_policy,
    transition_log_prob,
)

# ---------------------------------------------------------------------- textbook formulas, float64


def textbook(policy, x, v, s, sn):
    """(mu, std) of each policy written the way its paper/code states it; s, sn broadcastable."""
    d = sn - s
    x0 = x - s * v
    if isinstance(policy, SelfForcingRenoise):
        return (1 - sn) * x0, sn
    if isinstance(policy, EulerStep):
        return x + d * v, torch.zeros_like(s)
    if isinstance(policy, FlowGRPOStep):
        # std_dev_t = a * sqrt(sigma / (1 - where(sigma == 1, sigma_next, sigma)))
        std_t = policy.noise_level * torch.sqrt(s / (1 - torch.where(s == 1, sn, s)))
        mu = x * (1 + std_t**2 / (2 * s) * d) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * d
        return mu, std_t * torch.sqrt(-d)
    if isinstance(policy, DanceGRPOStep):
        # DanceGRPO's form: Euler mean plus the score correction -eta^2/2 * score * dsigma
        score = -(x - x0 * (1 - s)) / s**2
        mu = x + d * v - 0.5 * policy.eta**2 * score * d
        return mu, policy.eta * torch.sqrt(-d)
    if isinstance(policy, CPSStep):
        std = sn * math.sin(policy.noise_level * math.pi / 2)
        eps_hat = x + v * (1 - s)
        return x0 * (1 - sn) + eps_hat * torch.sqrt(sn**2 - std**2), std
    raise AssertionError(policy)


POLICIES = [
    SelfForcingRenoise(),
    SelfForcingRenoise(prediction="velocity"),
    EulerStep(),
    EulerStep(prediction="x0"),
    FlowGRPOStep(noise_level=0.7),
    FlowGRPOStep(noise_level=1.3, prediction="x0"),
    DanceGRPOStep(eta=0.3),
    DanceGRPOStep(eta=0.9, prediction="x0"),
    CPSStep(noise_level=0.7),
    CPSStep(noise_level=0.35, prediction="x0"),
]
STOCHASTIC = [p for p in POLICIES if not isinstance(p, EulerStep)]


def random_sigmas(num_seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence (sigma, sigma_next), sigma_next < sigma, with sigma = 1 (the first step) included."""
    s = torch.rand(num_seqs, dtype=torch.float64) * 0.8 + 0.15
    s[0] = 1.0
    sn = s * (torch.rand(num_seqs, dtype=torch.float64) * 0.9 + 0.05)
    return s, sn


def ids(p):
    return f"{p.name}-{p.prediction}"


@pytest.mark.parametrize("policy", POLICIES, ids=ids)
def test_coefficients_reproduce_textbook_update(policy):
    num_seqs = 6
    s, sn = random_sigmas(num_seqs)
    x = torch.randn(num_seqs, 4, 3, 5, dtype=torch.float64)
    v = torch.randn_like(x)
    coef = policy.coefficients(s, sn)
    assert coef.a.dtype == coef.b.dtype == coef.c.dtype == torch.float64 and coef.a.shape == (num_seqs,)
    assert torch.isfinite(torch.stack([coef.a, coef.b, coef.c])).all(), "sigma = 1 must not divide by zero"
    col = (-1, 1, 1, 1)
    mu_ref, std_ref = textbook(policy, x, v, s.reshape(col), sn.reshape(col))
    m = v if policy.prediction == "velocity" else x - s.reshape(col) * v
    assert torch.allclose(coef.mean(x, m), mu_ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(coef.c, torch.as_tensor(std_ref, dtype=torch.float64).reshape(-1).expand(num_seqs), rtol=1e-14, atol=0)
    # scalar sigmas give 0-d coefficients equal to the per-sequence ones
    one = policy.coefficients(float(s[2]), float(sn[2]))
    assert one.a.dim() == 0 and torch.allclose(torch.stack([one.a, one.b, one.c]), torch.stack([coef.a[2], coef.b[2], coef.c[2]]), rtol=1e-15)


def test_known_values_at_the_first_self_forcing_step():
    s, sn = SELF_FORCING.transition(0)  # 1.0 -> 0.9375
    sf = SelfForcingRenoise().coefficients(s, sn)
    assert (sf.a.item(), sf.b.item(), sf.c.item()) == (0.0, 0.0625, 0.9375)
    fg = FlowGRPOStep(noise_level=0.7).coefficients(s, sn)  # g^2 = 0.49 / (1 - 0.9375) = 7.84
    assert fg.c.item() == pytest.approx(math.sqrt(7.84 * 0.0625), rel=1e-14)
    assert fg.a.item() == pytest.approx(1 - 7.84 * 0.0625 / 2, rel=1e-14)
    assert fg.b.item() == pytest.approx(-0.0625, rel=1e-14)  # (1 - sigma) = 0 removes the v correction
    eu = EulerStep().coefficients(s, sn)
    assert (eu.a.item(), eu.b.item(), eu.c.item()) == (1.0, -0.0625, 0.0)
    cps = CPSStep(noise_level=1.0).coefficients(s, sn)  # eta = 1: pure re-noise, like Self-Forcing
    assert cps.c.item() == pytest.approx(0.9375, rel=1e-15)


def float64_log_density(x_next, mu, std):
    """Sum over each sequence of log N(x_next; mu, std^2), all float64."""
    z = (x_next.double() - mu) / std
    lp = -0.5 * z**2 - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.reshape(lp.shape[0], -1).sum(dim=1)


BACKENDS = available_backends(["reference", "triton"], "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy", STOCHASTIC, ids=ids)
def test_log_prob_from_op_equals_float64_density(policy, dtype, backend):
    num_seqs = 3
    s, sn = random_sigmas(num_seqs)
    x = torch.randn(num_seqs, 16, 3, 5, 7).to(dtype)  # odd sizes
    v = torch.randn(num_seqs, 16, 3, 5, 7).to(dtype)
    col = (-1, 1, 1, 1, 1)
    m = v if policy.prediction == "velocity" else (x.double() - s.reshape(col) * v.double()).to(dtype)
    key = noise_key(int(torch.randint(0, 2**40, ())), [3, 8, 11], chunk=2, step=1)
    res = policy.step(x, m, s, sn, noise_key=key, backend=backend)
    assert res.x_next.dtype == dtype and res.count == x[0].numel()
    mu64, std64 = textbook(policy, x.double(), v.double(), s.reshape(col), sn.reshape(col))
    if dtype == torch.bfloat16 and policy.prediction == "x0":
        mu64 = res.coefficients.mean(x, m)  # the x0 the op saw was rounded to bf16
    std64 = torch.as_tensor(std64, dtype=torch.float64).reshape(-1)
    want = float64_log_density(res.x_next, mu64, std64.reshape(col))
    got = res.log_prob("sum")
    assert got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-3), (got, want)
    assert torch.allclose(res.log_prob("mean"), want / res.count, rtol=1e-5, atol=1e-8)
    # the sample is a plausible draw: the standardised residual has unit variance
    z2 = res.sq_sum.double() / (std64**2 * res.count)
    assert ((z2 - 1).abs() < 0.2).all(), z2


def test_deterministic_step_has_no_density_and_replay_is_exact():
    x, v = torch.randn(2, 8, 5), torch.randn(2, 8, 5)
    res = EulerStep().step(x, v, 0.8, 0.5)
    assert torch.allclose(res.x_next, x + (0.5 - 0.8) * v, rtol=1e-6, atol=1e-6)
    assert torch.isnan(res.log_prob()).all()
    key = noise_key(7, [0, 1], chunk=0, step=0)
    a = FlowGRPOStep().step(x, v, 1.0, 0.9375, noise_key=key)
    b = FlowGRPOStep().step(x, v, 1.0, 0.9375, noise_key=key)
    assert torch.equal(a.x_next, b.x_next) and torch.equal(a.sq_sum, b.sq_sum)
    assert not torch.equal(a.x_next, FlowGRPOStep().step(x, v, 1.0, 0.9375, noise_key=noise_key(8, [0, 1], 0, 0)).x_next)


def test_gaussian_log_prob_conventions_and_gradients():
    num_seqs, count = 4, 37
    std = torch.rand(num_seqs, dtype=torch.float64) + 0.1
    mu = torch.randn(num_seqs, count, dtype=torch.float64, requires_grad=True)
    x_next = (mu + std[:, None] * torch.randn(num_seqs, count, dtype=torch.float64)).detach()
    want = torch.distributions.Normal(mu, std[:, None]).log_prob(x_next).sum(dim=1)
    got = transition_log_prob(x_next, mu, std)
    assert torch.allclose(got, want.detach(), rtol=1e-5, atol=1e-4)  # fp32 sum inside
    assert torch.allclose(transition_log_prob(x_next, mu, std, "mean"), want.detach() / count, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    assert torch.allclose(mu.grad, (x_next - mu.detach()) / std[:, None] ** 2, rtol=1e-5, atol=1e-4)  # fp32 diff / std^2
    sq = ((x_next - mu.detach()) ** 2).sum(dim=1).float()
    assert torch.allclose(gaussian_log_prob(sq, count, std), want.detach(), rtol=1e-6, atol=1e-4)
    scalar = gaussian_log_prob(sq, count, 0.5)
    assert torch.allclose(scalar, torch.distributions.Normal(mu.detach(), 0.5).log_prob(x_next).sum(dim=1), rtol=1e-6, atol=1e-4)
    with pytest.raises(ValueError, match="convention"):
        gaussian_log_prob(sq, count, std, "avg")
    with pytest.raises(ValueError, match="count"):
        gaussian_log_prob(sq, 0, std)


@pytest.mark.parametrize(
    "make,sigma,sigma_next,match",
    [
        (FlowGRPOStep, 0.5, 0.5, "sigma_next must be < sigma"),
        (DanceGRPOStep, 0.5, 0.7, "sigma_next must be < sigma"),
        (CPSStep, 1.0, 1.0, "sigma_next must be < sigma"),
        (EulerStep, 0.0, 0.0, r"sigma must lie in \(0, 1\]"),
        (SelfForcingRenoise, 0.5, -0.1, r"sigma_next must lie in \[0, 1\]"),
        (FlowGRPOStep, 1.2, 0.5, "sigma must lie"),
    ],
)
def test_bad_sigmas_raise(make, sigma, sigma_next, match):
    with pytest.raises(ValueError, match=match):
        make().coefficients(sigma, sigma_next)


def test_bad_policy_settings_raise():
    with pytest.raises(ValueError, match="noise_level must be finite and >= 0"):
        FlowGRPOStep(noise_level=-0.1)
    with pytest.raises(ValueError, match=r"noise_level must be in \[0, 1.0\]"):
        CPSStep(noise_level=1.5)
    with pytest.raises(ValueError, match="eta"):
        DanceGRPOStep(eta=float("nan"))
    with pytest.raises(ValueError, match="prediction must be one of"):
        EulerStep(prediction="eps")
    with pytest.raises(ValueError, match="not a step policy"):
        make_step_policy("ddpm")
    assert make_step_policy("dance_grpo", eta=0.5) == DanceGRPOStep(eta=0.5)
    with pytest.raises(ValueError, match="sigma must be a float"):
        EulerStep().coefficients("high", 0.5)
