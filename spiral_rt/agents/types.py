"""Typed records of the think-act-reflect loop: goals, plans, verdicts and the world memory.

Boundaries: plain data only. These records are what a PlanAgent, a CriticAgent, the loop, the trace
writer and the bundled world's programmatic agents exchange; they hold no model, no client and no
device tensor (key frames are host ``uint8`` numpy arrays). Every record round-trips through JSON
with ``to_dict`` / ``from_dict`` (``from_dict(to_dict(x)) == x``), which is how the trace stores them
and how LLM backends parse their constrained output. Field names are a stable interface: the world
package and the engine import them.
"""

from __future__ import annotations

import base64
import enum
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


LAST_REJECTION = "Last rejection: "
"""Prefix of the summary line the loop appends for ``PlanAgent.replan``: the critic's verdict on the failed step."""


def _require_str(owner: str, name: str, value: Any, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{owner}: argument '{name}' must be a str, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{owner}: argument '{name}' must be a non-empty string")
    return value


def _require_int(owner: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ValueError(f"{owner}: argument '{name}' must be an int >= {minimum}, got {value!r}")
    return int(value)


@dataclass
class Goal:
    """What the user wants the video to show, in words."""

    text: str
    """The goal in natural language, e.g. "pick up the red cube and put it in the bowl"."""
    id: str | None = None
    """Optional caller-chosen identifier (a dataset key, a request id); carried into the trace."""

    def __post_init__(self) -> None:
        _require_str("Goal", "text", self.text, allow_empty=False)
        if self.id is not None:
            _require_str("Goal", "id", self.id)

    def to_dict(self) -> dict:
        return {"text": self.text, "id": self.id}

    @classmethod
    def from_dict(cls, data: dict) -> "Goal":
        return cls(text=data["text"], id=data.get("id"))


@dataclass
class Step:
    """One segment of the plan: the prompt the generator conditions on and how long it runs."""

    prompt: str
    """Text prompt the generator conditions on while it generates this segment."""
    span_chunks: int
    """Length of the segment in generator chunks (>= 1)."""
    success_criteria: list[str] = field(default_factory=list)
    """Observable conditions the critic checks at the end of the segment (may be empty)."""
    index: int = 0
    """Position of the step in the whole run (0-based); a replanned step keeps counting on."""

    def __post_init__(self) -> None:
        _require_str("Step", "prompt", self.prompt, allow_empty=False)
        self.span_chunks = _require_int("Step", "span_chunks", self.span_chunks, 1)
        self.index = _require_int("Step", "index", self.index, 0)
        if not isinstance(self.success_criteria, (list, tuple)) or not all(isinstance(c, str) for c in self.success_criteria):
            raise ValueError(f"Step: argument 'success_criteria' must be a list of str, got {self.success_criteria!r}")
        self.success_criteria = list(self.success_criteria)

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "span_chunks": self.span_chunks,
                "success_criteria": list(self.success_criteria), "index": self.index}

    @classmethod
    def from_dict(cls, data: dict) -> "Step":
        return cls(prompt=data["prompt"], span_chunks=data["span_chunks"],
                   success_criteria=list(data.get("success_criteria", [])), index=data.get("index", 0))


@dataclass
class Plan:
    """A goal split into an ordered list of steps."""

    goal: Goal
    """The goal this plan serves."""
    steps: list[Step]
    """Steps in execution order (at least one)."""
    rationale: str = ""
    """The planner's short explanation of the split (free text, shown in the trace)."""

    def __post_init__(self) -> None:
        if not isinstance(self.goal, Goal):
            raise ValueError(f"Plan: argument 'goal' must be a Goal, got {type(self.goal).__name__}")
        if not isinstance(self.steps, (list, tuple)) or not self.steps or not all(isinstance(s, Step) for s in self.steps):
            raise ValueError(f"Plan: argument 'steps' must be a non-empty list of Step, got {self.steps!r}")
        self.steps = list(self.steps)
        _require_str("Plan", "rationale", self.rationale)

    @property
    def total_chunks(self) -> int:
        """Chunks the plan generates if every step is accepted on its first attempt."""
        return sum(s.span_chunks for s in self.steps)

    def to_dict(self) -> dict:
        return {"goal": self.goal.to_dict(), "steps": [s.to_dict() for s in self.steps], "rationale": self.rationale}

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        return cls(goal=Goal.from_dict(data["goal"]), steps=[Step.from_dict(s) for s in data["steps"]],
                   rationale=data.get("rationale", ""))


class FailureKind(str, enum.Enum):
    """Why the critic rejected a segment (SPIRAL's failure taxonomy)."""

    INCOMPLETE_ACTION = "incomplete_action"
    """The right action started but did not finish within the segment."""
    WRONG_ACTION = "wrong_action"
    """The segment shows a different action than the step asked for."""
    PHYSICS = "physics"
    """Implausible physics: interpenetration, floating objects, teleporting."""
    DRIFT = "drift_or_inconsistency"
    """Identity, layout or appearance drifted from what memory says the world looks like."""
    OTHER = "other"
    """Anything else (the feedback text says what)."""


@dataclass
class Verdict:
    """The critic's judgement of one generated segment."""

    score: float
    """Quality of the segment in [0, 1] (1: the step is fully and plausibly done)."""
    completed: bool
    """Whether the step's success criteria hold at the end of the segment (accept / reject)."""
    failure: FailureKind | None = None
    """Kind of failure when not completed (None when completed or unknown)."""
    feedback: str = ""
    """Free-text explanation; the loop appends it to the prompt when regenerating."""
    refined_prompt: str | None = None
    """A better prompt for the regeneration, if the critic proposes one (it wins over feedback)."""
    plan_is_wrong: bool = False
    """The step itself cannot succeed from the current world state: replan instead of retrying."""

    def __post_init__(self) -> None:
        if isinstance(self.score, bool) or not isinstance(self.score, (int, float, np.floating)) \
                or not math.isfinite(float(self.score)) or not 0.0 <= float(self.score) <= 1.0:
            raise ValueError(f"Verdict: argument 'score' must be a float in [0, 1], got {self.score!r}")
        self.score = float(self.score)
        if not isinstance(self.completed, (bool, np.bool_)):
            raise ValueError(f"Verdict: argument 'completed' must be a bool, got {self.completed!r}")
        self.completed = bool(self.completed)
        if self.failure is not None and not isinstance(self.failure, FailureKind):
            try:
                self.failure = FailureKind(self.failure)
            except ValueError:
                raise ValueError(f"Verdict: argument 'failure' must be a FailureKind or one of "
                                 f"{[k.value for k in FailureKind]}, got {self.failure!r}") from None
        _require_str("Verdict", "feedback", self.feedback)
        if self.refined_prompt is not None:
            _require_str("Verdict", "refined_prompt", self.refined_prompt)
            if not self.refined_prompt.strip():
                self.refined_prompt = None
        if not isinstance(self.plan_is_wrong, (bool, np.bool_)):
            raise ValueError(f"Verdict: argument 'plan_is_wrong' must be a bool, got {self.plan_is_wrong!r}")
        self.plan_is_wrong = bool(self.plan_is_wrong)

    def to_dict(self) -> dict:
        return {"score": self.score, "completed": self.completed,
                "failure": self.failure.value if self.failure is not None else None,
                "feedback": self.feedback, "refined_prompt": self.refined_prompt, "plan_is_wrong": self.plan_is_wrong}

    @classmethod
    def from_dict(cls, data: dict) -> "Verdict":
        return cls(score=data["score"], completed=data["completed"], failure=data.get("failure"),
                   feedback=data.get("feedback", ""), refined_prompt=data.get("refined_prompt"),
                   plan_is_wrong=data.get("plan_is_wrong", False))


@dataclass
class ExecutedStep:
    """One accepted (or accepted-after-exhaustion) step in the world memory."""

    step: Step
    """The step as planned (its original prompt)."""
    verdict: Verdict
    """The verdict of the attempt that was kept."""
    prompt_used: str | None = None
    """The prompt of the kept attempt, if a refinement changed it (None: ``step.prompt``)."""
    attempts: int = 1
    """Attempts it took (1: accepted at once)."""

    def to_dict(self) -> dict:
        return {"step": self.step.to_dict(), "verdict": self.verdict.to_dict(),
                "prompt_used": self.prompt_used, "attempts": self.attempts}

    @classmethod
    def from_dict(cls, data: dict) -> "ExecutedStep":
        return cls(step=Step.from_dict(data["step"]), verdict=Verdict.from_dict(data["verdict"]),
                   prompt_used=data.get("prompt_used"), attempts=data.get("attempts", 1))


def _frame_to_dict(frame: np.ndarray) -> dict:
    return {"shape": list(frame.shape), "data": base64.b64encode(np.ascontiguousarray(frame).tobytes()).decode("ascii")}


def _frame_from_dict(data: dict) -> np.ndarray:
    raw = base64.b64decode(data["data"])
    return np.frombuffer(raw, dtype=np.uint8).reshape(data["shape"]).copy()


@dataclass
class WorldMemory:
    """What the loop knows about the world so far: executed steps, key frames and a text summary."""

    executed: list[ExecutedStep] = field(default_factory=list)
    """Steps executed so far, in order, each with the verdict of the kept attempt."""
    key_frames: list[np.ndarray] = field(default_factory=list)
    """One (H, W, 3) uint8 frame per executed step (its last frame), in order; the critic compares against them."""
    summary: str = ""
    """Running text summary (the loop keeps it as ``render()``'s output; an agent may overwrite it)."""
    max_key_frames: int = 16
    """Oldest key frames beyond this many are dropped (the text record of every step stays)."""

    def __post_init__(self) -> None:
        self.max_key_frames = _require_int("WorldMemory", "max_key_frames", self.max_key_frames, 0)
        self.key_frames = [self._check_frame(f) for f in self.key_frames]

    @staticmethod
    def _check_frame(frame: Any) -> np.ndarray:
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"WorldMemory: argument 'key_frame' must be a (H, W, 3) uint8 array, got {frame.dtype} {frame.shape}")
        return frame

    def record(self, step: Step, verdict: Verdict, key_frame: np.ndarray | None = None, *,
               prompt_used: str | None = None, attempts: int = 1) -> ExecutedStep:
        """Record an executed step, its kept verdict and (optionally) its last frame; refresh ``summary``."""
        if not isinstance(step, Step):
            raise ValueError(f"WorldMemory.record: argument 'step' must be a Step, got {type(step).__name__}")
        if not isinstance(verdict, Verdict):
            raise ValueError(f"WorldMemory.record: argument 'verdict' must be a Verdict, got {type(verdict).__name__}")
        entry = ExecutedStep(step=step, verdict=verdict,
                             prompt_used=prompt_used if prompt_used not in (None, step.prompt) else None,
                             attempts=_require_int("WorldMemory.record", "attempts", attempts, 1))
        self.executed.append(entry)
        if key_frame is not None:
            self.key_frames.append(self._check_frame(key_frame).copy())
            if len(self.key_frames) > self.max_key_frames:
                del self.key_frames[: len(self.key_frames) - self.max_key_frames]
        self.summary = self.render()
        return entry

    @property
    def num_chunks(self) -> int:
        """Chunks of accepted video so far."""
        return sum(e.step.span_chunks for e in self.executed)

    def render(self, max_steps: int | None = None) -> str:
        """A text summary for an agent's prompt: one line per executed step (the last ``max_steps``)."""
        if not self.executed:
            return "Nothing has been generated yet."
        entries = self.executed if max_steps is None else self.executed[-max_steps:]
        skipped = len(self.executed) - len(entries)
        lines = [f"({skipped} earlier steps omitted)"] if skipped else []
        for e in entries:
            v = e.verdict
            status = "done" if v.completed else f"accepted unfinished ({v.failure.value if v.failure else 'unknown'})"
            line = f"{e.step.index + 1}. {e.prompt_used or e.step.prompt} [{e.step.span_chunks} chunks, " \
                   f"{e.attempts} attempt{'s' if e.attempts != 1 else ''}, score {v.score:.2f}, {status}]"
            if v.feedback:
                line += f" critic: {v.feedback}"
            lines.append(line)
        return "\n".join(lines)

    def to_dict(self, include_frames: bool = True) -> dict:
        return {"executed": [e.to_dict() for e in self.executed],
                "key_frames": [_frame_to_dict(f) for f in self.key_frames] if include_frames else [],
                "summary": self.summary, "max_key_frames": self.max_key_frames}

    @classmethod
    def from_dict(cls, data: dict) -> "WorldMemory":
        return cls(executed=[ExecutedStep.from_dict(e) for e in data.get("executed", [])],
                   key_frames=[_frame_from_dict(f) for f in data.get("key_frames", [])],
                   summary=data.get("summary", ""), max_key_frames=data.get("max_key_frames", 16))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WorldMemory):
            return NotImplemented
        return (self.executed == other.executed and self.summary == other.summary
                and self.max_key_frames == other.max_key_frames and len(self.key_frames) == len(other.key_frames)
                and all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(self.key_frames, other.key_frames)))
