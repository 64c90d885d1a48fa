"""Shifted flow-matching schedules and the warped few-step lists of Self-Forcing, LongLive and CausVid.

Boundaries: host-side numbers only (Python floats, float64 math); no tensors, no model. The step
policies (``spiral_rt.sampling.step_policies``) turn consecutive sigmas into step coefficients.

Flow matching interpolates data and noise, ``x_sigma = (1 - sigma) x0 + sigma eps`` (sigma = 1 is
pure noise), and a timestep t in [0, num_train_timesteps] means sigma = t / num_train_timesteps.
Wan-family models sample on a *shifted* sigma,

    sigma' = shift * sigma / (1 + (shift - 1) * sigma),

which keeps more steps at high noise. A few-step distilled model (Self-Forcing, LongLive, CausVid)
is trained on a short list of timesteps that is warped through the shift once: Self-Forcing and
LongLive use [1000, 750, 500, 250] with shift 5, i.e. t = 1000, 937.5, 833.33, 625 (sigma = 1.0,
0.9375, 0.8333, 0.625); CausVid uses [1000, 757, 522] with shift 8. The model is conditioned on the
warped timestep ``sigma' * num_train_timesteps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def shift_sigma(sigma: float, shift: float) -> float:
    """The shifted sigma: shift * sigma / (1 + (shift - 1) * sigma) (identity for shift = 1)."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


@dataclass(frozen=True)
class FlowMatchSchedule:
    """A list of denoising timesteps, warped through the flow-matching shift.

    Step i goes from ``sigmas[i]`` to ``sigmas[i + 1]`` (0 after the last step): the model is
    evaluated at ``model_timesteps[i]`` and a step policy moves the latents to the next sigma.
    """

    timesteps: tuple[float, ...]
    """The unwarped timesteps, strictly decreasing, each in (0, num_train_timesteps]."""
    shift: float = 1.0
    """Flow-matching shift s > 0 applied once to every timestep (1: no warp)."""
    num_train_timesteps: int = 1000
    """Timestep scale of the model: sigma = t / num_train_timesteps."""

    def __post_init__(self) -> None:
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 1:
            raise ValueError(f"FlowMatchSchedule: num_train_timesteps must be a positive int, got {self.num_train_timesteps!r}")
        try:
            shift = float(self.shift)
        except (TypeError, ValueError):
            raise ValueError(f"FlowMatchSchedule: shift must be a number, got {self.shift!r}") from None
        if not math.isfinite(shift) or shift <= 0:
            raise ValueError(f"FlowMatchSchedule: shift must be finite and > 0, got {self.shift!r}")
        try:
            steps = tuple(float(t) for t in self.timesteps)
        except (TypeError, ValueError):
            raise ValueError(f"FlowMatchSchedule: timesteps must be a sequence of numbers, got {self.timesteps!r}") from None
        if not steps:
            raise ValueError("FlowMatchSchedule: timesteps is empty; give at least one timestep, e.g. [1000, 750, 500, 250]")
        n = self.num_train_timesteps
        for i, t in enumerate(steps):
            if not math.isfinite(t) or not 0 < t <= n:
                raise ValueError(f"FlowMatchSchedule: timesteps[{i}] = {t} must lie in (0, {n}] (num_train_timesteps); got {list(steps)}")
        for i in range(1, len(steps)):
            if steps[i] >= steps[i - 1]:
                raise ValueError(
                    f"FlowMatchSchedule: timesteps must be strictly decreasing (from noise to data), but "
                    f"timesteps[{i}] = {steps[i]} >= timesteps[{i - 1}] = {steps[i - 1]}; got {list(steps)}"
                )
        object.__setattr__(self, "timesteps", steps)
        object.__setattr__(self, "shift", shift)

    @classmethod
    def uniform(cls, num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> "FlowMatchSchedule":
        """``num_steps`` timesteps evenly spaced from num_train_timesteps down to (excluding) 0."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"FlowMatchSchedule.uniform: num_steps must be a positive int, got {num_steps!r}")
        n = num_train_timesteps
        return cls(tuple(n * (num_steps - i) / num_steps for i in range(num_steps)), shift, n)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def sigmas(self) -> tuple[float, ...]:
        """Shifted sigma of every step, in (0, 1]."""
        s, n = self.shift, self.num_train_timesteps
        # s * t / (n + (s - 1) * t): one rounding for integer t, so the presets come out exact
        return tuple(s * t / (n + (s - 1.0) * t) for t in self.timesteps)

    @property
    def model_timesteps(self) -> tuple[float, ...]:
        """Warped timesteps the model is conditioned on: sigma * num_train_timesteps."""
        s, n = self.shift, self.num_train_timesteps
        return tuple(s * t * n / (n + (s - 1.0) * t) for t in self.timesteps)

    def sigma_next(self, step: int) -> float:
        """Sigma after step ``step`` (0.0 after the last step)."""
        self._check_step(step)
        return self.sigmas[step + 1] if step + 1 < self.num_steps else 0.0

    def transition(self, step: int) -> tuple[float, float]:
        """(sigma, sigma_next) of step ``step``."""
        self._check_step(step)
        return self.sigmas[step], self.sigma_next(step)

    def transitions(self) -> list[tuple[float, float]]:
        """(sigma, sigma_next) of every step, the last one ending at 0."""
        sig = self.sigmas
        return [(sig[i], sig[i + 1] if i + 1 < len(sig) else 0.0) for i in range(len(sig))]

    def _check_step(self, step: int) -> None:
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < self.num_steps:
            raise ValueError(f"FlowMatchSchedule: step must be an int in [0, {self.num_steps}), got {step!r}")


SELF_FORCING = FlowMatchSchedule((1000, 750, 500, 250), shift=5.0)
"""Self-Forcing's 4-step list: sigma = 1.0, 0.9375, 0.8333, 0.625."""
LONGLIVE = FlowMatchSchedule((1000, 750, 500, 250), shift=5.0)
"""LongLive uses Self-Forcing's list."""
CAUSVID = FlowMatchSchedule((1000, 757, 522), shift=8.0)
"""CausVid's 3-step list with shift 8: sigma = 1.0, 0.9614, 0.8973."""

PRESETS = {"self_forcing": SELF_FORCING, "longlive": LONGLIVE, "causvid": CAUSVID}


def schedule_preset(name: str) -> FlowMatchSchedule:
    """A named schedule: one of ``PRESETS`` (self_forcing, longlive, causvid)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"schedule_preset: name={name!r} is not a preset; choose one of {sorted(PRESETS)}") from None
