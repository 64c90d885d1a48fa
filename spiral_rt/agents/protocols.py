"""Interfaces of the closed loop: the two agents and the generator they steer.

Boundaries: structural types only (``typing.Protocol``), no implementation. Anything with these
methods plugs in: the LLM/VLM backends of ``spiral_rt.agents.llm``, the bundled world's programmatic
agents, scripted test agents, and (for ``Generator``) the streaming engine's session. The loop in
``spiral_rt.agents.loop`` is written against these protocols and nothing else.

Threading contract: the loop calls ``Generator`` methods from one thread only (the thread that calls
``ClosedLoop.run``) and calls ``CriticAgent.judge`` / ``PlanAgent.plan`` on worker threads, so agents
must not touch the generator and should be safe to call from a thread other than the one that
built them.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from .types import Goal, Plan, Step, Verdict, WorldMemory


@runtime_checkable
class PlanAgent(Protocol):
    """Turns a goal into a plan, and repairs the rest of a plan when execution goes wrong."""

    def plan(self, goal: Goal, memory: WorldMemory) -> Plan:
        """The first plan for ``goal`` (``memory`` is usually empty; it may hold a visual prefix)."""
        ...

    def replan(self, goal: Goal, memory: WorldMemory, remaining: list[Step]) -> Plan:
        """A new plan for what is left of ``goal``, given what ``memory`` says happened.

        ``remaining`` are the steps not yet executed, the failed one first. The returned plan's steps
        replace them; their ``index`` fields are renumbered by the loop.
        """
        ...


@runtime_checkable
class CriticAgent(Protocol):
    """Judges one generated segment against its step."""

    def judge(self, frames: np.ndarray, step: Step, memory: WorldMemory) -> Verdict:
        """Verdict on ``frames`` ((F, H, W, 3) uint8, the whole segment) as an execution of ``step``.

        ``memory`` holds the steps accepted before this one and their key frames.
        """
        ...


@runtime_checkable
class Generator(Protocol):
    """A stateful autoregressive video generator with snapshot/rollback and speculation.

    The generator's state is its visual memory (for the engine: the KV pages of the frames generated
    so far). ``generate`` appends a segment to it; tokens returned by ``snapshot`` and
    ``start_speculation`` are opaque to the loop.

    Speculation: after ``start_speculation()``, generated chunks go on droppable state.
    ``drop_speculation(token)`` returns the generator to exactly the state it had at
    ``start_speculation``; ``commit_speculation(token)`` makes the speculative chunks ordinary. At
    most one speculation is open at a time, and ``snapshot``/``rollback`` are not called while one is.
    """

    def generate(self, prompt: str, span_chunks: int, seed: int) -> np.ndarray:
        """Generate ``span_chunks`` chunks conditioned on ``prompt`` with noise from ``seed``.

        Returns the segment's decoded frames, (F, H, W, 3) uint8, F >= 1.
        """
        ...

    def snapshot(self) -> Any:
        """A token for the current state (a chunk boundary); valid until ``release_snapshot``."""
        ...

    def rollback(self, token: Any) -> None:
        """Return to the state of ``token``; the token stays valid (a segment may be retried twice)."""
        ...

    def release_snapshot(self, token: Any) -> None:
        """Forget ``token`` (the engine frees the pages only it kept alive)."""
        ...

    def start_speculation(self) -> Any:
        """Open a speculation: what is generated from now on can be dropped. Returns its token."""
        ...

    def commit_speculation(self, token: Any) -> None:
        """Keep what was generated since ``start_speculation`` as ordinary state."""
        ...

    def drop_speculation(self, token: Any) -> None:
        """Discard what was generated since ``start_speculation``."""
        ...
