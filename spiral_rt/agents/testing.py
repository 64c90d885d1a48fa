"""Stand-ins for tests and benchmarks: a deterministic fake generator and scripted agents.

Boundaries: no model, no network. ``FakeGenerator`` implements ``protocols.Generator`` with the same
state discipline the engine must follow (snapshot / rollback / one open speculation) and raises
``RuntimeError`` on misuse, so tests of the loop also check that the loop uses the protocol
correctly. Its frames are a pure function of (prompt, seed, position), so a regenerated segment is
visibly different from the one it replaces and a replayed run is identical. ``chunk_time_s`` makes
it sleep per chunk (the GIL is released, like a GPU-bound engine) for overlap benchmarks.
"""

from __future__ import annotations

import itertools
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .types import FailureKind, Goal, Plan, Step, Verdict, WorldMemory


@dataclass
class _Chunk:
    prompt: str
    seed: int
    position: int


class FakeGenerator:
    """A ``Generator`` whose state is the list of chunks generated so far; frames from (prompt, seed, position)."""

    def __init__(self, height: int = 32, width: int = 48, frames_per_chunk: int = 4, chunk_time_s: float = 0.0):
        for name, value in (("height", height), ("width", width), ("frames_per_chunk", frames_per_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FakeGenerator: argument '{name}' must be an int >= 1, got {value!r}")
        if chunk_time_s < 0:
            raise ValueError(f"FakeGenerator: argument 'chunk_time_s' must be >= 0, got {chunk_time_s}")
        self.height, self.width, self.frames_per_chunk, self.chunk_time_s = height, width, frames_per_chunk, chunk_time_s
        self.chunks: list[_Chunk] = []
        self._snapshots: dict[int, int] = {}
        self._ids = itertools.count()
        self._speculation: tuple[int, int] | None = None  # (token, len(chunks) at start)
        self.thread_ids: set[int] = set()
        self.counts = {"generate_calls": 0, "chunks_generated": 0, "rollbacks": 0, "snapshots": 0, "released": 0,
                       "speculations": 0, "commits": 0, "drops": 0, "dropped_chunks": 0}
        """Counts of every call and of chunks generated and dropped."""
        self.calls: list[tuple] = []
        """(method, args) of every call, in order."""

    # -- frames
    def render_chunk(self, prompt: str, seed: int, position: int) -> np.ndarray:
        """(frames_per_chunk, H, W, 3) uint8: a background colour from the prompt, a bar moving with position, seeded noise."""
        h = zlib.crc32(prompt.encode())
        base = np.array([(h >> 16) & 255, (h >> 8) & 255, h & 255], dtype=np.int32)
        rng = np.random.default_rng([seed & 0xFFFFFFFF, position])
        out = np.empty((self.frames_per_chunk, self.height, self.width, 3), np.uint8)
        for f in range(self.frames_per_chunk):
            frame = np.broadcast_to(base, (self.height, self.width, 3)).copy()
            x = (position * self.frames_per_chunk + f) * 2 % self.width
            frame[:, x: x + max(1, self.width // 8)] = 255 - base
            frame += rng.integers(-20, 21, size=(self.height, self.width, 1))
            out[f] = np.clip(frame, 0, 255)
        return out

    def video(self) -> np.ndarray:
        """Frames of the current state (what an engine would have decoded and kept)."""
        if not self.chunks:
            return np.zeros((0, self.height, self.width, 3), np.uint8)
        return np.concatenate([self.render_chunk(c.prompt, c.seed, c.position) for c in self.chunks])

    # -- Generator protocol
    def generate(self, prompt: str, span_chunks: int, seed: int) -> np.ndarray:
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"FakeGenerator.generate: argument 'prompt' must be a non-empty str, got {prompt!r}")
        if isinstance(span_chunks, bool) or not isinstance(span_chunks, int) or span_chunks < 1:
            raise ValueError(f"FakeGenerator.generate: argument 'span_chunks' must be an int >= 1, got {span_chunks!r}")
        self.thread_ids.add(threading.get_ident())
        self.calls.append(("generate", (prompt, span_chunks, seed)))
        self.counts["generate_calls"] += 1
        out = []
        for _ in range(span_chunks):
            if self.chunk_time_s:
                time.sleep(self.chunk_time_s)
            chunk = _Chunk(prompt, int(seed), len(self.chunks))
            self.chunks.append(chunk)
            out.append(self.render_chunk(chunk.prompt, chunk.seed, chunk.position))
            self.counts["chunks_generated"] += 1
        return np.concatenate(out)

    def _no_speculation(self, what: str) -> None:
        if self._speculation is not None:
            raise RuntimeError(f"FakeGenerator.{what} called while a speculation is open")

    def snapshot(self) -> int:
        self._no_speculation("snapshot")
        token = next(self._ids)
        self._snapshots[token] = len(self.chunks)
        self.counts["snapshots"] += 1
        self.calls.append(("snapshot", (token,)))
        return token

    def rollback(self, token: int) -> None:
        self._no_speculation("rollback")
        if token not in self._snapshots:
            raise RuntimeError(f"FakeGenerator.rollback: unknown or released snapshot {token}")
        del self.chunks[self._snapshots[token]:]
        self.counts["rollbacks"] += 1
        self.calls.append(("rollback", (token,)))

    def release_snapshot(self, token: int) -> None:
        if self._snapshots.pop(token, None) is None:
            raise RuntimeError(f"FakeGenerator.release_snapshot: unknown or released snapshot {token}")
        self.counts["released"] += 1
        self.calls.append(("release_snapshot", (token,)))

    @property
    def live_snapshots(self) -> int:
        """Snapshots taken and not yet released (0 after a clean run: no leaked pages)."""
        return len(self._snapshots)

    def start_speculation(self) -> int:
        self._no_speculation("start_speculation")
        token = next(self._ids)
        self._speculation = (token, len(self.chunks))
        self.counts["speculations"] += 1
        self.calls.append(("start_speculation", (token,)))
        return token

    def _close(self, token: int, what: str) -> int:
        if self._speculation is None or self._speculation[0] != token:
            raise RuntimeError(f"FakeGenerator.{what}: speculation {token} is not open")
        start = self._speculation[1]
        self._speculation = None
        self.calls.append((what, (token,)))
        return start

    def commit_speculation(self, token: int) -> None:
        self._close(token, "commit_speculation")
        self.counts["commits"] += 1

    def drop_speculation(self, token: int) -> None:
        start = self._close(token, "drop_speculation")
        self.counts["dropped_chunks"] += len(self.chunks) - start
        del self.chunks[start:]
        self.counts["drops"] += 1


class ScriptedPlanner:
    """A ``PlanAgent`` that returns scripted plans (or raises scripted exceptions) in call order.

    ``plans`` / ``replans`` are lists of ``Plan``, ``list[Step]``, exceptions, or callables
    ``(goal, memory, remaining) -> Plan``; when a list runs out, ``plan`` gives a one-step plan and
    ``replan`` returns the remaining steps unchanged. ``delay_s`` sleeps before answering.
    """

    def __init__(self, plans: list | None = None, replans: list | None = None, delay_s: float = 0.0):
        self.plans, self.replans, self.delay_s = list(plans or []), list(replans or []), delay_s
        self.calls: list[tuple[str, Goal, WorldMemory, list[Step] | None]] = []

    def _answer(self, script: list, goal: Goal, memory: WorldMemory, remaining: list[Step] | None, default: Callable) -> Plan:
        self.calls.append(("plan" if remaining is None else "replan", goal, memory, remaining))
        if self.delay_s:
            time.sleep(self.delay_s)
        item = script.pop(0) if script else default()
        if isinstance(item, BaseException):
            raise item
        if callable(item):
            item = item(goal, memory, remaining)
        if isinstance(item, list):
            item = Plan(goal, item)
        return item

    def plan(self, goal: Goal, memory: WorldMemory) -> Plan:
        return self._answer(self.plans, goal, memory, None, lambda: Plan(goal, [Step(goal.text, 2)]))

    def replan(self, goal: Goal, memory: WorldMemory, remaining: list[Step]) -> Plan:
        return self._answer(self.replans, goal, memory, remaining, lambda: Plan(goal, list(remaining)))


def accept(score: float = 1.0, feedback: str = "looks right") -> Verdict:
    """An accepting verdict."""
    return Verdict(score=score, completed=True, failure=None, feedback=feedback)


def reject(feedback: str = "the action is not finished", failure: FailureKind = FailureKind.INCOMPLETE_ACTION,
           score: float = 0.2, refined_prompt: str | None = None, plan_is_wrong: bool = False) -> Verdict:
    """A rejecting verdict."""
    return Verdict(score=score, completed=False, failure=failure, feedback=feedback,
                   refined_prompt=refined_prompt, plan_is_wrong=plan_is_wrong)


class ScriptedCritic:
    """A ``CriticAgent`` with scripted verdicts.

    ``script`` maps a step's (planned) prompt to a list of answers used in order for that step's
    judgements; ``default`` answers everything else (and a step whose list ran out). An answer is a
    ``Verdict``, an exception to raise, a float (sleep that many seconds, then accept), or a callable
    ``(frames, step, memory) -> Verdict``. ``delay_s`` sleeps before every answer.
    """

    def __init__(self, script: dict[str, list] | None = None, default: Any = None, delay_s: float = 0.0):
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.default = default if default is not None else accept()
        self.delay_s = delay_s
        self.calls: list[tuple[str, int, int]] = []
        """(step prompt, step index, number of frames) of every judgement, in order."""
        self.memories: list[WorldMemory] = []
        self._lock = threading.Lock()

    def judge(self, frames: np.ndarray, step: Step, memory: WorldMemory) -> Verdict:
        with self._lock:
            self.calls.append((step.prompt, step.index, int(len(frames))))
            self.memories.append(memory)
            queue = self.script.get(step.prompt)
            answer = queue.pop(0) if queue else self.default
        if self.delay_s:
            time.sleep(self.delay_s)
        if isinstance(answer, BaseException):
            raise answer
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            time.sleep(float(answer))
            return accept()
        if callable(answer):
            return answer(frames, step, memory)
        return answer


class FixedLatencyCritic:
    """A ``CriticAgent`` that sleeps ``latency_s`` and accepts (the overlap benchmark's critic)."""

    def __init__(self, latency_s: float):
        if latency_s < 0:
            raise ValueError(f"FixedLatencyCritic: argument 'latency_s' must be >= 0, got {latency_s}")
        self.latency_s = latency_s

    def judge(self, frames: np.ndarray, step: Step, memory: WorldMemory) -> Verdict:
        time.sleep(self.latency_s)
        return accept(feedback=f"fixed-latency critic ({self.latency_s * 1e3:.0f} ms)")
