"""spiral_rt.sampling: flow-matching schedules and the step policies that run through ``sampler_step``.

- ``schedules``: ``shift_sigma``, ``FlowMatchSchedule`` (warped few-step lists; presets
  ``SELF_FORCING``, ``LONGLIVE``, ``CAUSVID``);
- ``flow``: x0 = x - sigma v and the other flow-matching identities;
- ``step_policies``: ``SelfForcingRenoise``, ``EulerStep``, ``FlowGRPOStep``, ``DanceGRPOStep``,
  ``CPSStep`` -> per-sequence (A, B, C) of ``spiral_rt.ops.sampler_step``;
- ``log_prob``: Gaussian log-densities of a step from its ``sq_sum`` (sum and per-element mean).
"""

from .flow import add_noise, noise_from_velocity, velocity_from_x0, x0_from_velocity
from .log_prob import gaussian_log_prob, transition_log_prob
from .schedules import CAUSVID, LONGLIVE, PRESETS, SELF_FORCING, FlowMatchSchedule, schedule_preset, shift_sigma
from .step_policies import (
    STEP_POLICIES,
    CPSStep,
    DanceGRPOStep,
    EulerStep,
    FlowGRPOStep,
    SelfForcingRenoise,
    StepCoefficients,
    StepPolicy,
    StepResult,
    make_step_policy,
)

__all__ = [
    "shift_sigma",
    "FlowMatchSchedule",
    "SELF_FORCING",
    "LONGLIVE",
    "CAUSVID",
    "PRESETS",
    "schedule_preset",
    "x0_from_velocity",
    "noise_from_velocity",
    "velocity_from_x0",
    "add_noise",
    "gaussian_log_prob",
    "transition_log_prob",
    "StepPolicy",
    "StepCoefficients",
    "StepResult",
    "SelfForcingRenoise",
    "EulerStep",
    "FlowGRPOStep",
    "DanceGRPOStep",
    "CPSStep",
    "STEP_POLICIES",
    "make_step_policy",
]
