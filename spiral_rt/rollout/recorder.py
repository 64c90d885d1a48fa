"""Recording the sampler's transitions inside the engine's chunk loop, in the same pass.

The engine's chunk loop (``Engine.chunk_sequence``) calls its step policy's ``step(x, v, sigma,
sigma_next, ...)`` once per denoising step for the whole batch; the runner passes a
``RecordingStepPolicy`` to every ``Engine.step`` of a rollout (``step_policy=``). It wraps the
rollout's step policy and, while a ``TransitionRecorder`` is armed, asks the fused sampler step for
mu as well on the trained steps and keeps (x, x', mu, sq_sum, count, (A, B, C)) of the batch, so the
log-probs come from the very op that produced x' (no second pass, no host sync: tensors stay on
the device and the Gaussian log-density is formed on the device with the host-side std).

Boundaries: used by the runner only; it relies on the public contract that the chunk loop calls the
policy exactly ``num_steps`` times per chunk in step order (``finish`` checks the count, which
would catch a CUDA-graph replay, where the Python policy is not called; the engine runs steps with
an explicit policy eagerly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spiral_rt.sampling import StepPolicy, StepResult, gaussian_log_prob


@dataclass
class RecordedStep:
    """One trained transition of a batch of sequences (device tensors)."""

    step: int
    """Denoising step index within the chunk."""
    x: torch.Tensor
    """(B, C, F, h, w) latents before the step."""
    x_next: torch.Tensor
    """(B, C, F, h, w) latents after the step (the sample)."""
    mu: torch.Tensor | None
    """(B, C, F, h, w) the transition mean (None unless recorded)."""
    log_prob: torch.Tensor
    """(B,) float64 log-density (sum convention) of x_next under N(mu, C^2 I)."""
    sq_sum: torch.Tensor
    """(B,) fp32 sum of (x_next - mu)^2."""
    count: int
    """Elements per sequence."""
    a: float
    b: float
    c: float
    sigma: float
    sigma_next: float


class TransitionRecorder:
    """Collects the trained steps of one chunk step of one batch (arm, run the engine step, finish)."""

    def __init__(self, steps: tuple[int, ...], num_steps: int, record_mu: bool):
        self.steps = frozenset(steps)
        self.num_steps = num_steps
        self.record_mu = record_mu
        self.calls = 0
        self.records: list[RecordedStep] = []

    def wants(self) -> bool:
        return self.calls in self.steps

    def add(self, x: torch.Tensor, res: StepResult) -> None:
        coef = res.coefficients
        if coef.c.dim() != 0 or coef.c.device.type != "cpu":
            raise ValueError("TransitionRecorder: the rollout's sigmas must be host floats (one per step)")
        c = float(coef.c)
        self.records.append(RecordedStep(
            step=self.calls, x=x, x_next=res.x_next, mu=res.mu if self.record_mu else None,
            log_prob=gaussian_log_prob(res.sq_sum, res.count, c, "sum"), sq_sum=res.sq_sum, count=res.count,
            a=float(coef.a), b=float(coef.b), c=c, sigma=float(coef.sigma), sigma_next=float(coef.sigma_next),
        ))

    def finish(self) -> list[RecordedStep]:
        if self.calls != self.num_steps:
            raise RuntimeError(f"TransitionRecorder: the chunk loop called the step policy {self.calls} times, expected "
                               f"{self.num_steps} (is the chunk replayed from a CUDA graph?)")
        return self.records


class RecordingStepPolicy(StepPolicy):
    """A step policy that delegates to ``inner`` and records trained steps while a recorder is armed."""

    name = "recording"

    def __init__(self, inner: StepPolicy):
        if not isinstance(inner, StepPolicy):
            raise ValueError(f"RecordingStepPolicy: 'inner' must be a StepPolicy, got {type(inner).__name__}")
        self.inner = inner
        self.prediction = inner.prediction
        self.recorder: TransitionRecorder | None = None

    def _native(self, s, sn):
        return self.inner._native(s, sn)

    def coefficients(self, sigma, sigma_next):
        return self.inner.coefficients(sigma, sigma_next)

    def step(self, x, m, sigma, sigma_next, *, noise=None, noise_key=None, return_mu=True, backend=None) -> StepResult:
        rec = self.recorder
        want = rec is not None and rec.wants()
        res = self.inner.step(x, m, sigma, sigma_next, noise=noise, noise_key=noise_key,
                              return_mu=return_mu or (want and rec.record_mu), backend=backend)
        if rec is not None:
            if want:
                rec.add(x, res)
            rec.calls += 1
        return res

    def __repr__(self) -> str:
        return f"RecordingStepPolicy({self.inner!r})"
