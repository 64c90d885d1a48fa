"""Step policies: how one denoising step moves latents from sigma to sigma_next, through ``sampler_step``.

Boundaries: each policy maps (sigma, sigma_next) per sequence to the scalars (A, B, C) of the fused
op ``spiral_rt.ops.sampler_step``, ``x' = A x + B m + C eps`` (m = the model's velocity v, or its
clean-data prediction x0), and runs that op; the log-density of the transition follows from the
op's ``sq_sum`` (``spiral_rt.sampling.log_prob``). No model, no schedule, no cache here.

Policies (v = eps - x0 is the model's velocity, x0 = x - sigma v, d = sigma_next - sigma):

    SelfForcingRenoise  x' = (1 - s') x0 + s' eps                      A = 0, B = 1 - s', C = s'   (m = x0)
    EulerStep           x' = x + d v                                   A = 1, B = d, C = 0
    FlowGRPOStep        mu = x (1 + g^2 d / 2s) + v (1 + g^2 (1 - s) / 2s) d,  C = g sqrt(-d),
                        g = a sqrt(s / (1 - s))                        (Flow-GRPO's SDE)
    DanceGRPOStep       the same drift and std with g = eta constant   (DanceGRPO)
    CPSStep             mu = (1 - s') x0 + s' cos(eta pi / 2) eps_hat,  C = s' sin(eta pi / 2),
                        eps_hat = x + (1 - s) v                        (coefficients-preserving sampling)

Every policy can consume either prediction (``prediction="velocity"`` or ``"x0"``); the
coefficients are converted exactly (x0 = x - s v), so the engine passes whichever it has.

Sigma = 1 (the first step of every few-step list): Flow-GRPO's g = a sqrt(s / (1 - s)) is infinite
there. Like Flow-GRPO, the denominator uses sigma_next instead, g = a sqrt(1 / (1 - s')), when
s = 1 (the drift's (1 - s) factor stays exactly 0). DanceGRPO and CPS divide only by s, never by
1 - s, and Self-Forcing and Euler divide by nothing, so none of them needs a special case. A step
from s' = 1 to 1 (d = 0) is rejected for the SDE policies (no noise, no density).

Coefficients are computed in float64 with torch ops on the sigmas' device: host floats (the usual
case) stay on the CPU and are validated there; device tensors are used as they are, unvalidated,
so nothing waits on the device.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple

import torch

from spiral_rt.ops import sampler_step

from .log_prob import Convention, gaussian_log_prob

Prediction = Literal["velocity", "x0"]
PREDICTIONS = ("velocity", "x0")


@dataclass(frozen=True)
class StepCoefficients:
    """Per-sequence scalars of one step, float64, shape () for one shared sigma or (S,)."""

    a: torch.Tensor
    """Coefficient of x."""
    b: torch.Tensor
    """Coefficient of the model output m (velocity or x0, see ``prediction``)."""
    c: torch.Tensor
    """Coefficient of the noise, i.e. the transition's std (0: deterministic)."""
    sigma: torch.Tensor
    """Noise level before the step."""
    sigma_next: torch.Tensor
    """Noise level after the step."""
    prediction: Prediction
    """What m is: "velocity" (v = eps - x0) or "x0"."""

    def mean(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """mu = A x + B m in float64 (a readable check of the coefficients; not the fast path)."""
        shape = (-1,) + (1,) * (x.dim() - 1)
        a = self.a.to(x.device).reshape(shape) if self.a.dim() else self.a.to(x.device)
        b = self.b.to(x.device).reshape(shape) if self.b.dim() else self.b.to(x.device)
        return a * x.double() + b * m.double()


class StepResult(NamedTuple):
    """What one policy step produced."""

    x_next: torch.Tensor
    """(S, ...) latents after the step, in x's dtype."""
    mu: torch.Tensor | None
    """(S, ...) the transition mean A x + B m (None when return_mu=False)."""
    sq_sum: torch.Tensor
    """(S,) fp32: sum over each sequence of (x_next - mu)^2."""
    count: int
    """Elements per sequence."""
    coefficients: StepCoefficients
    """The (A, B, C) used, with the sigmas (what a rollout records)."""

    def log_prob(self, convention: Convention = "sum") -> torch.Tensor:
        """(S,) float64 log-density of x_next (NaN for a deterministic step); see ``gaussian_log_prob``."""
        return gaussian_log_prob(self.sq_sum, self.count, self.coefficients.c, convention)


def _as_float64(name: str, value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise ValueError(f"{name} must be a floating point tensor, got {value.dtype}")
        if value.dim() > 1:
            raise ValueError(f"{name} must be a float or a 1-d tensor (one per sequence), got shape {tuple(value.shape)}")
        return value.to(torch.float64)
    try:
        return torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a float, a sequence of floats or a tensor, got {value!r}") from None


def _op_scalar(t: torch.Tensor, device: torch.device):
    """A coefficient in the form sampler_step takes, without a device sync."""
    if t.device == device:
        return t.to(torch.float32)
    if t.dim() == 0 and t.device.type == "cpu":
        return float(t)  # a fill on the device, no transfer
    return t.to(device=device, dtype=torch.float32, non_blocking=True)


class StepPolicy(abc.ABC):
    """Base of the step policies: subclasses give ``_native(sigma, sigma_next) -> (A, B, C)``."""

    name: ClassVar[str]
    native_prediction: ClassVar[Prediction] = "velocity"
    requires_decrease: ClassVar[bool] = False
    prediction: Prediction

    @abc.abstractmethod
    def _native(self, s: torch.Tensor, sn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, B, C) of the step for the policy's native prediction (float64 tensors)."""

    def _check_prediction(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"{type(self).__name__}: prediction must be one of {PREDICTIONS}, got {self.prediction!r}")

    def coefficients(self, sigma, sigma_next) -> StepCoefficients:
        """(A, B, C) for a step from ``sigma`` to ``sigma_next`` (floats, or one per sequence)."""
        s, sn = torch.broadcast_tensors(_as_float64("sigma", sigma), _as_float64("sigma_next", sigma_next))
        if s.device.type == "cpu":
            self._validate(s, sn)
        a, b, c = self._native(s, sn)
        if self.prediction != self.native_prediction:
            if self.prediction == "x0":  # A x + B v, v = (x - x0) / s
                a, b = a + b / s, -b / s
            else:  # A x + B x0, x0 = x - s v
                a, b = a + b, -s * b
        return StepCoefficients(a, b, c, s, sn, self.prediction)

    def _validate(self, s: torch.Tensor, sn: torch.Tensor) -> None:
        name = type(self).__name__
        if not bool(((s > 0) & (s <= 1)).all()):
            raise ValueError(f"{name}: sigma must lie in (0, 1], got {s.tolist()}")
        if not bool(((sn >= 0) & (sn <= 1)).all()):
            raise ValueError(f"{name}: sigma_next must lie in [0, 1], got {sn.tolist()}")
        if self.requires_decrease and not bool((sn < s).all()):
            raise ValueError(f"{name}: sigma_next must be < sigma (a denoising step), got sigma={s.tolist()}, sigma_next={sn.tolist()}")

    def step(
        self,
        x: torch.Tensor,
        m: torch.Tensor,
        sigma,
        sigma_next,
        *,
        noise: torch.Tensor | None = None,
        noise_key: torch.Tensor | None = None,
        return_mu: bool = True,
        backend: str | None = None,
    ) -> StepResult:
        """One step of the policy through ``spiral_rt.ops.sampler_step``.

        Args:
            x: (S, ...) latents at ``sigma`` (e.g. (S, C, F, H, W)), bf16/fp16/fp32.
            m: (S, ...) model output of kind ``self.prediction``, like x.
            sigma, sigma_next: floats, or (S,) per sequence.
            noise / noise_key: explicit noise, or (S, 4) Philox keys (seed, sequence, chunk, step);
                neither means eps = 0 (see ``sampler_step``).
            return_mu, backend: passed to ``sampler_step``.
        """
        coef = self.coefficients(sigma, sigma_next)
        res = sampler_step(
            x, m, _op_scalar(coef.a, x.device), _op_scalar(coef.b, x.device), _op_scalar(coef.c, x.device),
            noise=noise, noise_key=noise_key, return_mu=return_mu, backend=backend,
        )
        return StepResult(res.x_next, res.mu, res.sq_sum, res.count, coef)


def _check_level(policy: str, field_name: str, value, upper: float | None = None) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if not ok or (upper is not None and value > upper):
        bound = f"in [0, {upper}]" if upper is not None else "finite and >= 0"
        raise ValueError(f"{policy}: {field_name} must be {bound}, got {value!r}")


@dataclass(frozen=True)
class SelfForcingRenoise(StepPolicy):
    """Self-Forcing / LongLive / CausVid few-step sampling: predict x0, re-noise to sigma_next.

    x' = (1 - s') x0 + s' eps; the last step (s' = 0) returns x0 itself (C = 0).
    """

    prediction: Prediction = "x0"
    """What the caller passes as m: "x0" (natural here) or "velocity"."""

    name: ClassVar[str] = "self_forcing"
    native_prediction: ClassVar[Prediction] = "x0"

    def __post_init__(self) -> None:
        self._check_prediction()

    def _native(self, s, sn):
        return torch.zeros_like(s), 1.0 - sn, sn.clone()


@dataclass(frozen=True)
class EulerStep(StepPolicy):
    """Deterministic Euler step of the flow ODE: x' = x + (s' - s) v (C = 0, no density)."""

    prediction: Prediction = "velocity"
    """What the caller passes as m."""

    name: ClassVar[str] = "euler"

    def __post_init__(self) -> None:
        self._check_prediction()

    def _native(self, s, sn):
        return torch.ones_like(s), sn - s, torch.zeros_like(s)


def _sde_drift(s, sn, g2):
    """Flow-GRPO's drift and std for a squared diffusion scale g^2 (float64 tensors)."""
    d = sn - s
    a = 1.0 + g2 * d / (2.0 * s)
    b = (1.0 + g2 * (1.0 - s) / (2.0 * s)) * d
    return a, b, torch.sqrt(g2 * -d)


@dataclass(frozen=True)
class FlowGRPOStep(StepPolicy):
    """Flow-GRPO's SDE step: the flow ODE's marginals with diffusion g = a sqrt(s / (1 - s)).

    At s = 1 the denominator uses s' (Flow-GRPO's rule; see the module docstring).
    """

    noise_level: float = 0.7
    """a >= 0, the noise scale (Flow-GRPO's default 0.7; 0 gives the Euler step)."""
    prediction: Prediction = "velocity"
    """What the caller passes as m."""

    name: ClassVar[str] = "flow_grpo"
    requires_decrease: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_level("FlowGRPOStep", "noise_level", self.noise_level)
        self._check_prediction()

    def _native(self, s, sn):
        denom = torch.where(s >= 1.0, 1.0 - sn, 1.0 - s)
        g2 = self.noise_level**2 * s / denom
        return _sde_drift(s, sn, g2)


@dataclass(frozen=True)
class DanceGRPOStep(StepPolicy):
    """DanceGRPO's SDE step: Flow-GRPO's drift and std with a constant diffusion g = eta."""

    eta: float = 0.3
    """Constant diffusion scale eta >= 0 (DanceGRPO's default 0.3)."""
    prediction: Prediction = "velocity"
    """What the caller passes as m."""

    name: ClassVar[str] = "dance_grpo"
    requires_decrease: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_level("DanceGRPOStep", "eta", self.eta)
        self._check_prediction()

    def _native(self, s, sn):
        return _sde_drift(s, sn, torch.full_like(s, float(self.eta) ** 2))


@dataclass(frozen=True)
class CPSStep(StepPolicy):
    """Coefficients-preserving sampling (Wang & Yu 2025): re-noise with part fresh, part predicted noise.

    mu = (1 - s') x0 + s' cos(eta pi / 2) eps_hat, C = s' sin(eta pi / 2), so x' has exactly the
    coefficients (1 - s', s') of the forward process at s'.
    """

    noise_level: float = 0.7
    """eta in [0, 1]: 0 is deterministic (DDIM-like), 1 is fresh noise only (Self-Forcing's re-noise)."""
    prediction: Prediction = "velocity"
    """What the caller passes as m."""

    name: ClassVar[str] = "cps"
    requires_decrease: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_level("CPSStep", "noise_level", self.noise_level, upper=1.0)
        self._check_prediction()

    def _native(self, s, sn):
        angle = self.noise_level * math.pi / 2.0
        keep = sn * math.cos(angle)  # = sqrt(s'^2 - C^2), the predicted noise's share
        a = (1.0 - sn) + keep
        b = -s * (1.0 - sn) + keep * (1.0 - s)
        return a, b, sn * math.sin(angle)


STEP_POLICIES: dict[str, type[StepPolicy]] = {
    cls.name: cls for cls in (SelfForcingRenoise, EulerStep, FlowGRPOStep, DanceGRPOStep, CPSStep)
}


def make_step_policy(name: str, **kwargs) -> StepPolicy:
    """A policy by name (``STEP_POLICIES``: self_forcing, euler, flow_grpo, dance_grpo, cps)."""
    cls = STEP_POLICIES.get(name)
    if cls is None:
        raise ValueError(f"make_step_policy: name={name!r} is not a step policy; choose one of {sorted(STEP_POLICIES)}")
    return cls(**kwargs)
