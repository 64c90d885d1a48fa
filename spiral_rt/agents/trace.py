"""The record of one closed-loop run: every attempt, verdict, retry, replan, fallback and timing.

Boundaries: plain data filled in by ``spiral_rt.agents.loop`` and serialised by
``spiral_rt.agents.outputs`` (JSON trace, contact sheet). Thumbnails of each attempt are kept in
memory for the contact sheet but are not part of the JSON.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .types import Goal, Plan, Step, Verdict

# Decisions an attempt can end with.
ACCEPTED = "accepted"
"""The critic accepted the segment (or the critic failed and the loop accepted with a warning)."""
RETRY = "rejected_retry"
"""Rejected: rolled back and regenerated with a refined prompt and new noise."""
REPLAN = "rejected_replan"
"""Rejected with retries exhausted or the plan judged wrong: rolled back, the rest replanned."""
KEPT = "kept_after_exhaustion"
"""Rejected, but no retries and no replans were left: kept so the video goes on."""
DROPPED = "speculative_dropped"
"""Generated speculatively while the previous segment was judged, dropped when that was rejected."""
ABORTED = "aborted"
"""The generator failed; the run stopped here (what was accepted before is kept)."""
DECISIONS = (ACCEPTED, RETRY, REPLAN, KEPT, DROPPED, ABORTED)


@dataclass
class AttemptRecord:
    """One generated segment (an attempt at a step) and what the loop did with it."""

    step_index: int
    """``Step.index`` of the step it tried to execute."""
    attempt: int
    """1-based attempt number for that step (a dropped speculative segment shares the number of the attempt that replaced it)."""
    prompt: str
    """The prompt the generator was given (refined after a rejection)."""
    seed: int
    """Noise seed of the segment."""
    span_chunks: int
    """Chunks generated."""
    num_frames: int = 0
    """Decoded frames of the segment."""
    speculative: bool = False
    """Generated on droppable state while the previous segment was being judged."""
    verdict: Verdict | None = None
    """The critic's verdict (the fallback verdict when the critic failed); None if never judged."""
    critic_fallback: bool = False
    """The critic failed (timeout, error, bad output) and the loop accepted with a warning."""
    decision: str = ""
    """One of ``DECISIONS``."""
    generate_s: float = 0.0
    """Wall time of the generator call."""
    critic_latency_s: float | None = None
    """Wall time of the critic call, measured on its worker thread."""
    critic_wait_s: float = 0.0
    """Time the loop blocked waiting for the verdict after its own work was done (the unhidden part)."""
    video_start_frame: int | None = None
    """First frame of the segment in the output video, if it was kept."""
    thumbnails: list[np.ndarray] = field(default_factory=list, repr=False)
    """A few (H, W, 3) uint8 frames of the segment (first, middle, last) for the contact sheet; not in JSON."""

    def to_dict(self) -> dict:
        return {
            "step_index": self.step_index, "attempt": self.attempt, "prompt": self.prompt, "seed": self.seed,
            "span_chunks": self.span_chunks, "num_frames": self.num_frames, "speculative": self.speculative,
            "verdict": self.verdict.to_dict() if self.verdict is not None else None,
            "critic_fallback": self.critic_fallback, "decision": self.decision,
            "generate_s": round(self.generate_s, 6),
            "critic_latency_s": None if self.critic_latency_s is None else round(self.critic_latency_s, 6),
            "critic_wait_s": round(self.critic_wait_s, 6), "video_start_frame": self.video_start_frame,
        }


@dataclass
class ReplanRecord:
    """One outer-loop correction: the steps that were left and the steps that replaced them."""

    after_step_index: int
    """``Step.index`` of the step whose failure triggered the replan."""
    reason: str
    """``"retries_exhausted"`` or ``"plan_is_wrong"``."""
    old_steps: list[Step]
    """The remaining steps before the replan (the failed one first)."""
    new_steps: list[Step]
    """The steps that replaced them (renumbered)."""
    latency_s: float
    """Wall time of the planner call."""
    fallback: bool = False
    """The planner failed; the old steps were kept."""

    def to_dict(self) -> dict:
        return {"after_step_index": self.after_step_index, "reason": self.reason,
                "old_steps": [s.to_dict() for s in self.old_steps], "new_steps": [s.to_dict() for s in self.new_steps],
                "latency_s": round(self.latency_s, 6), "fallback": self.fallback}


@dataclass
class FallbackRecord:
    """An agent call that failed and what the loop did instead."""

    agent: str
    """``"planner"`` or ``"critic"``."""
    call: str
    """``"plan"``, ``"replan"`` or ``"judge"``."""
    reason: str
    """``"timeout"``, ``"error"`` or ``"invalid_output"``."""
    error: str
    """The exception (type and message) or what was wrong with the output."""
    action: str
    """What the loop did instead, in words."""
    step_index: int | None = None
    """The step concerned, if any."""
    attempt: int | None = None
    """The attempt concerned, if any."""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class LoopTrace:
    """Everything one closed-loop run decided, with timings; ``to_dict`` is the JSON trace."""

    goal: Goal
    """The goal of the run."""
    config: dict = field(default_factory=dict)
    """The loop configuration (``LoopConfig`` as a dict)."""
    initial_plan: Plan | None = None
    """The first plan (after validation; the fallback plan if the planner failed)."""
    executed_steps: list[Step] = field(default_factory=list)
    """Steps whose segment is in the video, in order."""
    attempts: list[AttemptRecord] = field(default_factory=list)
    """Every generated segment in generation order."""
    replans: list[ReplanRecord] = field(default_factory=list)
    """Every replan in order."""
    fallbacks: list[FallbackRecord] = field(default_factory=list)
    """Every failed agent call and the loop's substitute."""
    agent_events: list[dict] = field(default_factory=list)
    """Backend-level events reported by agents (transport retries, JSON repairs, schema downgrades)."""
    warnings: list[str] = field(default_factory=list)
    """Human-readable warnings, in order."""
    timings: dict = field(default_factory=dict)
    """Per-stage wall times in seconds (warm-up, planning, generation, critic waits, total, ...)."""
    agent_latencies: dict = field(default_factory=lambda: {"planner": [], "critic": []})
    """Wall time of every agent call, per agent, in call order."""
    counters: dict = field(default_factory=lambda: {"rollbacks": 0, "speculations": 0, "speculations_committed": 0,
                                                     "speculations_dropped": 0, "retries": 0, "replans": 0})
    """Counts of generator-side events."""
    completed: bool = False
    """The run reached the end of its plan (False: aborted by a generator error)."""
    error: str | None = None
    """The generator error that aborted the run, if any."""
    num_video_frames: int = 0
    """Frames in the output video."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_time(self, key: str, seconds: float) -> None:
        """Accumulate ``seconds`` into ``timings[key]``."""
        with self._lock:
            self.timings[key] = self.timings.get(key, 0.0) + seconds

    def add_latency(self, agent: str, seconds: float) -> None:
        with self._lock:
            self.agent_latencies.setdefault(agent, []).append(seconds)

    def warn(self, message: str) -> None:
        with self._lock:
            self.warnings.append(message)

    def add_events(self, agent: str, events: list[dict]) -> None:
        with self._lock:
            self.agent_events.extend({"agent": agent, **e} for e in events)

    @staticmethod
    def _latency_summary(values: list[float]) -> dict:
        if not values:
            return {"calls": 0}
        return {"calls": len(values), "median_s": statistics.median(values), "max_s": max(values), "total_s": sum(values)}

    def to_dict(self) -> dict:
        return {
            "goal": self.goal.to_dict(),
            "completed": self.completed,
            "error": self.error,
            "config": self.config,
            "initial_plan": self.initial_plan.to_dict() if self.initial_plan is not None else None,
            "executed_steps": [s.to_dict() for s in self.executed_steps],
            "attempts": [a.to_dict() for a in self.attempts],
            "replans": [r.to_dict() for r in self.replans],
            "fallbacks": [f.to_dict() for f in self.fallbacks],
            "agent_events": list(self.agent_events),
            "warnings": list(self.warnings),
            "counters": dict(self.counters),
            "timings": {k: round(v, 6) for k, v in self.timings.items()},
            "agent_latencies": {k: {"values_s": [round(x, 6) for x in v], **self._latency_summary(v)}
                                for k, v in self.agent_latencies.items()},
            "num_video_frames": self.num_video_frames,
        }


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.elapsed`` (perf_counter seconds)."""

    def __enter__(self) -> "Stopwatch":
        self.start = time.perf_counter()
        self.elapsed = 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        self.elapsed = time.perf_counter() - self.start
