"""Tests of spiral_rt.sampling.schedules and .flow: exact preset values, the shift, bad lists."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from spiral_rt.sampling import (
    CAUSVID,
    LONGLIVE,
    SELF_FORCING,
    FlowMatchSchedule,
    add_noise,
    noise_from_velocity,
    schedule_preset,
    shift_sigma,
    velocity_from_x0,
    x0_from_velocity,
)


def exact_shift(t: int, shift: int, n: int = 1000) -> Fraction:
    sigma = Fraction(t, n)
    return shift * sigma / (1 + (shift - 1) * sigma)


def test_self_forcing_and_longlive_values_exactly():
    for sched in (SELF_FORCING, LONGLIVE):
        assert sched.sigmas == (1.0, 0.9375, float(Fraction(5, 6)), 0.625)
        assert sched.model_timesteps == (1000.0, 937.5, float(Fraction(2500, 3)), 625.0)
        assert round(sched.model_timesteps[2], 1) == 833.3
        assert sched.transitions() == [(1.0, 0.9375), (0.9375, 5 / 6), (5 / 6, 0.625), (0.625, 0.0)]
    assert schedule_preset("longlive") is LONGLIVE


def test_causvid_values_and_any_list():
    assert CAUSVID.sigmas == tuple(float(exact_shift(t, 8)) for t in (1000, 757, 522))
    assert CAUSVID.sigmas[1] == pytest.approx(0.96142245, abs=1e-8)
    custom = FlowMatchSchedule([1000, 800.5, 333, 17], shift=3.0)
    for t, sigma in zip(custom.timesteps, custom.sigmas):
        assert sigma == pytest.approx(shift_sigma(t / 1000, 3.0), rel=1e-15)
    assert custom.sigma_next(3) == 0.0 and custom.transition(1) == (custom.sigmas[1], custom.sigmas[2])


def test_shift_formula_and_uniform():
    for sigma in torch.rand(20, dtype=torch.float64).tolist():
        s = 1 + 9 * torch.rand(()).item()
        got = shift_sigma(sigma, s)
        assert got == pytest.approx(s * sigma / (1 + (s - 1) * sigma), rel=1e-15)
        assert sigma <= got <= 1
    assert shift_sigma(0.3, 1.0) == 0.3
    u = FlowMatchSchedule.uniform(4, shift=5.0)
    assert u.timesteps == (1000.0, 750.0, 500.0, 250.0) and u.sigmas == SELF_FORCING.sigmas


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(timesteps=[]), "timesteps is empty"),
        (dict(timesteps=[750, 1000]), "strictly decreasing"),
        (dict(timesteps=[1000, 500, 500]), "strictly decreasing"),
        (dict(timesteps=[1001, 500]), r"timesteps\[0\] = 1001.0 must lie in \(0, 1000\]"),
        (dict(timesteps=[1000, 0]), r"timesteps\[1\]"),
        (dict(timesteps=[1000, float("nan")]), r"timesteps\[1\]"),
        (dict(timesteps="abc"), "timesteps must be a sequence of numbers"),
        (dict(timesteps=[1000], shift=0.0), "shift must be finite and > 0"),
        (dict(timesteps=[1000], shift=-2), "shift"),
        (dict(timesteps=[1000], num_train_timesteps=0), "num_train_timesteps"),
    ],
)
def test_bad_lists_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlowMatchSchedule(**kwargs)


def test_bad_step_index_and_preset_name():
    with pytest.raises(ValueError, match=r"step must be an int in \[0, 4\)"):
        SELF_FORCING.transition(4)
    with pytest.raises(ValueError, match="not a preset"):
        schedule_preset("wan")


@pytest.mark.parametrize("per_sequence", [False, True])
def test_flow_identities(per_sequence):
    x0 = torch.randn(3, 4, 2, 5, dtype=torch.float64)
    eps = torch.randn_like(x0)
    sigma = torch.rand(3, dtype=torch.float64) * 0.9 + 0.05 if per_sequence else 0.37
    x = add_noise(x0, eps, sigma)
    s = sigma.reshape(-1, 1, 1, 1) if per_sequence else sigma
    assert torch.allclose(x, (1 - s) * x0 + s * eps, rtol=0, atol=1e-14)
    v = eps - x0
    assert torch.allclose(x0_from_velocity(x, v, sigma), x0, rtol=0, atol=1e-13)
    assert torch.allclose(noise_from_velocity(x, v, sigma), eps, rtol=0, atol=1e-13)
    assert torch.allclose(velocity_from_x0(x, x0, sigma), v, rtol=0, atol=1e-12)
    xb, vb = x.to(torch.bfloat16), v.to(torch.bfloat16)
    got = x0_from_velocity(xb, vb, sigma)
    assert got.dtype == torch.bfloat16
    want = xb.double() - s * vb.double()  # math in fp32, one rounding to bf16 at the end
    assert torch.allclose(got.double(), want, rtol=2**-8, atol=1e-6)
    with pytest.raises(ValueError, match="sigma must be a float or a \\(3,\\) tensor"):
        x0_from_velocity(x, v, torch.rand(2))
