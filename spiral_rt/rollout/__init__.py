"""spiral_rt.rollout: GRPO rollout mode (DESIGN §3, issue 7 item 1).

Hierarchical groups of rollouts: per goal K plans, per plan G continuations from one shared visual
prefix. The prefix is generated once per plan, the KV cache forks G ways (refcounted pages), the G
members run as one batch per denoising step, the sampler step records each trained transition's
x, x', mu and log-prob in the same pass, frames are decoded by the engine's streaming VAE, a
CriticAgent scores them on worker threads, and ``spiral_rt.rl`` turns rewards into execution- and
plan-level advantages (plan level exported as JSONL for LLM trainers).

- ``spec``: ``RolloutSpec`` (what to generate, which transitions to train, noise policy, seeds);
- ``batch``: ``RolloutBatch`` (per-member transitions, latents, frames, rewards, advantages; save/load);
- ``runner``: ``RolloutRunner`` (run / replay; schedules "batched", "prefix_once", "naive");
- ``recorder``: ``RecordingStepPolicy``, ``TransitionRecorder`` (recording inside the engine's chunk loop).

Boundaries: composes the engine's public API; no engine, model or cache code is changed here. The
GRPO trainer (recomputing transitions with gradients) is not part of this package.
"""

from .batch import RolloutBatch
from .recorder import RecordedStep, RecordingStepPolicy, TransitionRecorder
from .runner import SCHEDULES, RolloutRunner
from .spec import NOISE_POLICIES, RolloutSpec

__all__ = ["RolloutSpec", "RolloutBatch", "RolloutRunner", "SCHEDULES", "NOISE_POLICIES", "RecordingStepPolicy",
           "TransitionRecorder", "RecordedStep"]
