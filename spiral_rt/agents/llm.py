"""PlanAgent and CriticAgent over any chat backend (OpenAI-compatible endpoint or local VLM).

Boundaries: builds messages from the templates in ``spiral_rt.agents.prompts``, sends them through a
``ChatBackend``, and turns the reply into a ``Plan`` or ``Verdict``. A reply that is not valid JSON
for the schema gets exactly one repair turn (the bad reply and the error go back to the model);
if that fails too the agent raises ``AgentOutputError``. The agents never fall back themselves: the
loop does that, so the trace records every fallback in one place.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .backends import ChatBackend, EventLog
from .prompts import REPAIR_TEMPLATE
from .prompts import critic as critic_prompts
from .prompts import planner as planner_prompts
from .types import LAST_REJECTION, Goal, Plan, Step, Verdict, WorldMemory

logger = logging.getLogger(__name__)


class AgentOutputError(ValueError):
    """The model's reply was not usable even after the repair turn."""


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_json(text: str) -> Any:
    """The JSON object in a model reply: the whole text, a fenced block, or the first balanced {...}."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the reply is empty")
    text = text.strip()
    candidates = [text]
    candidates += [m.group(1).strip() for m in _FENCE.finditer(text)]
    start = text.find("{")
    if start >= 0:
        candidates.append(text[start:])
    decoder = json.JSONDecoder()
    last_error = None
    for c in candidates:
        try:
            return json.loads(c)
        except json.JSONDecodeError as exc:
            last_error = exc
        brace = c.find("{")
        if brace >= 0:
            try:
                return decoder.raw_decode(c[brace:])[0]
            except json.JSONDecodeError as exc:
                last_error = exc
    raise ValueError(f"the reply is not JSON ({last_error}): {text[:200]!r}")


def parse_plan(data: Any, goal: Goal, max_span_chunks: int, max_steps: int) -> Plan:
    """A ``Plan`` from a decoded plan answer; spans are clamped to [1, max_span_chunks]."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    if "refusal" in data and "steps" not in data:
        raise ValueError(f"the model refused: {data['refusal']}")
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise ValueError("'steps' must be a non-empty list")
    steps = []
    for k, s in enumerate(raw_steps[:max_steps]):
        if not isinstance(s, dict):
            raise ValueError(f"steps[{k}] must be an object, got {type(s).__name__}")
        prompt = s.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"steps[{k}].prompt must be a non-empty string, got {prompt!r}")
        span = s.get("span_chunks")
        if isinstance(span, float) and span.is_integer():
            span = int(span)
        if isinstance(span, bool) or not isinstance(span, int):
            raise ValueError(f"steps[{k}].span_chunks must be an integer, got {span!r}")
        criteria = s.get("success_criteria", [])
        if isinstance(criteria, str):
            criteria = [criteria]
        if not isinstance(criteria, list) or not all(isinstance(c, str) for c in criteria):
            raise ValueError(f"steps[{k}].success_criteria must be a list of strings, got {criteria!r}")
        steps.append(Step(prompt=prompt.strip(), span_chunks=min(max(span, 1), max_span_chunks),
                          success_criteria=criteria, index=k))
    rationale = data.get("rationale", "")
    return Plan(goal=goal, steps=steps, rationale=rationale if isinstance(rationale, str) else str(rationale))


def parse_verdict(data: Any) -> Verdict:
    """A ``Verdict`` from a decoded verdict answer (the ``Verdict`` checks ranges and kinds)."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    if "refusal" in data and "score" not in data:
        raise ValueError(f"the model refused: {data['refusal']}")
    missing = [k for k in ("score", "completed") if k not in data]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    failure = data.get("failure")
    if failure in ("", "none", "null"):
        failure = None
    return Verdict(score=data["score"], completed=data["completed"], failure=failure,
                   feedback=data.get("feedback") or "", refined_prompt=data.get("refined_prompt"),
                   plan_is_wrong=bool(data.get("plan_is_wrong", False)))


def last_rejection(memory: WorldMemory) -> str:
    """The critic's feedback on the failed step: the loop appends it to the summary it hands to ``replan``."""
    for line in reversed(memory.summary.splitlines()):
        if line.startswith(LAST_REJECTION):
            return line[len(LAST_REJECTION):].strip()
    return ""


class _ChatAgent:
    def __init__(self, backend: ChatBackend):
        if not callable(getattr(backend, "complete", None)):
            raise ValueError(f"{type(self).__name__}: argument 'backend' must have a complete(messages, schema, name) method")
        self.backend = backend
        self.events = EventLog()

    def _ask(self, messages: list[dict], schema: dict, name: str, parse: Callable[[Any], Any]) -> Any:
        text = self.backend.complete(messages, schema, name)
        try:
            return parse(extract_json(text))
        except (ValueError, KeyError, TypeError) as exc:
            error = str(exc)
        self.events.add("repair", schema=name, error=error[:300], reply=str(text)[:300])
        logger.warning("%s: unusable reply (%s); asking once for a repair", type(self).__name__, error)
        repair = messages + [{"role": "assistant", "content": str(text)},
                             {"role": "user", "content": REPAIR_TEMPLATE.format(error=error, schema=json.dumps(schema))}]
        text = self.backend.complete(repair, schema, name)
        try:
            result = parse(extract_json(text))
        except (ValueError, KeyError, TypeError) as exc:
            self.events.add("repair_failed", schema=name, error=str(exc)[:300], reply=str(text)[:300])
            raise AgentOutputError(f"{type(self).__name__}: unusable reply after one repair: {exc}") from exc
        self.events.add("repaired", schema=name)
        return result

    def drain_events(self) -> list[dict]:
        """Events of this agent and its backend since the last call (the loop puts them in the trace)."""
        events = self.events.drain()
        drain = getattr(self.backend, "drain_events", None)
        return events + (drain() if callable(drain) else [])


@dataclass
class PlannerSettings:
    """Limits the LLM planner is told about and enforces."""

    max_span_chunks: int = 8
    """Longest step, in chunks."""
    max_steps: int = 8
    """Most steps in one plan."""
    chunk_seconds: float | None = None
    """Seconds of video per chunk, told to the planner so spans mean something (None: not told)."""

    def validate(self) -> None:
        if self.max_span_chunks < 1 or self.max_steps < 1:
            raise ValueError(f"PlannerSettings: max_span_chunks and max_steps must be >= 1, got {self.max_span_chunks}, {self.max_steps}")


class ChatPlanAgent(_ChatAgent):
    """``PlanAgent`` backed by a chat model."""

    def __init__(self, backend: ChatBackend, settings: PlannerSettings | None = None):
        super().__init__(backend)
        self.settings = settings or PlannerSettings()
        self.settings.validate()
        self.schema = planner_prompts.schema(self.settings.max_span_chunks, self.settings.max_steps)

    def _parse(self, goal: Goal) -> Callable[[Any], Plan]:
        return lambda data: parse_plan(data, goal, self.settings.max_span_chunks, self.settings.max_steps)

    def plan(self, goal: Goal, memory: WorldMemory) -> Plan:
        s = self.settings
        messages = planner_prompts.plan_messages(goal, memory, max_span_chunks=s.max_span_chunks, max_steps=s.max_steps,
                                                 chunk_seconds=s.chunk_seconds)
        return self._ask(messages, self.schema, "plan", self._parse(goal))

    def replan(self, goal: Goal, memory: WorldMemory, remaining: list[Step]) -> Plan:
        if not remaining:
            raise ValueError("ChatPlanAgent.replan: argument 'remaining' must hold at least the failed step")
        s = self.settings
        messages = planner_prompts.replan_messages(goal, memory, remaining, max_span_chunks=s.max_span_chunks,
                                                   max_steps=s.max_steps, chunk_seconds=s.chunk_seconds,
                                                   feedback=last_rejection(memory))
        return self._ask(messages, self.schema, "plan", self._parse(goal))


class ChatCriticAgent(_ChatAgent):
    """``CriticAgent`` backed by a vision-language chat model; sends ``num_frames`` sampled frames."""

    def __init__(self, backend: ChatBackend, num_frames: int = 6, reference_frame: bool = True):
        super().__init__(backend)
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"ChatCriticAgent: argument 'num_frames' must be an int >= 1, got {num_frames!r}")
        self.num_frames, self.reference_frame = num_frames, reference_frame
        self.schema = critic_prompts.schema()

    def judge(self, frames: np.ndarray, step: Step, memory: WorldMemory) -> Verdict:
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) < 1:
            raise ValueError(f"ChatCriticAgent.judge: argument 'frames' must be (F, H, W, 3) uint8, got {frames.dtype} {frames.shape}")
        messages = critic_prompts.judge_messages(frames, step, memory, num_frames=self.num_frames,
                                                 reference_frame=self.reference_frame)
        return self._ask(messages, self.schema, "verdict", parse_verdict)
