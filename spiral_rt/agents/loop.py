"""The closed loop: plan, generate a segment per step, judge it, regenerate or replan.

Boundaries: this module owns the control flow and the bookkeeping (``LoopTrace``), nothing else. It
drives a ``Generator`` (snapshot / rollback / speculation are the generator's business, e.g. KV pages
in the engine) and calls a ``PlanAgent`` and a ``CriticAgent`` on a thread pool; it never raises
because an agent failed: the critic falls back to accept-with-warning, the planner to a one-step plan
from the goal (replanning: to the old remaining steps), and each fallback goes into the trace. A
generator error stops the run but the segments accepted so far are returned, so no video is lost.

Schedule of one step (speculation on)::

    main thread:  generate(n) | snapshot, start_speculation, generate(n+1) | wait verdict(n) | commit or drop
    worker:                   | judge(n) ..................................|

so the critic's latency is hidden behind the next segment's generation as long as it is shorter.
The first planner call overlaps with the ``warmup`` callable (model warm-up, compilation, text
encoding of fixed prompts), which runs on the calling thread.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import trace as tr
from .protocols import CriticAgent, Generator, PlanAgent
from .trace import AttemptRecord, FallbackRecord, LoopTrace, ReplanRecord
from .types import LAST_REJECTION, Goal, Plan, Step, Verdict, WorldMemory

logger = logging.getLogger(__name__)


@dataclass
class LoopConfig:
    """Knobs of the closed loop."""

    max_retries: int = 2
    """Regenerations of a rejected step before replanning (0: never regenerate)."""
    max_replans: int = 2
    """Replans per run; when none are left a step that exhausted its retries is kept as it is."""
    accept_score: float = 0.0
    """A verdict accepts when ``completed`` and ``score >= accept_score``."""
    speculate: bool = True
    """Generate the next step's segment on droppable state while the critic judges the current one."""
    critic_timeout_s: float | None = 120.0
    """Longest wait for a verdict after the loop has nothing else to do; None: wait forever."""
    planner_timeout_s: float | None = 120.0
    """Longest wait for a plan or replan; None: wait forever."""
    fallback_span_chunks: int = 3
    """Span of the one-step plan used when the planner fails."""
    fallback_score: float = 0.5
    """Score of the accept-with-warning verdict used when the critic fails."""
    max_span_chunks: int | None = None
    """Clamp each planned step's span to this many chunks (None: no clamp)."""
    max_plan_steps: int = 32
    """Keep at most this many steps of a plan or replan (guards against runaway planners)."""
    refine_template: str = "{prompt}. {feedback}"
    """How a rejected step's prompt is refined when the verdict has feedback but no refined prompt."""
    seed: int = 0
    """Base seed; each (step, attempt) gets its own seed derived from it."""
    num_thumbnails: int = 3
    """Frames kept per attempt for the contact sheet (first, ..., last)."""
    agent_workers: int = 2
    """Threads of the agent pool (a timed-out call keeps its thread until it returns)."""

    def validate(self) -> None:
        for name in ("max_retries", "max_replans", "num_thumbnails"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"LoopConfig: {name} must be an int >= 0, got {value!r}")
        for name in ("fallback_span_chunks", "max_plan_steps", "agent_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LoopConfig: {name} must be an int >= 1, got {value!r}")
        if self.max_span_chunks is not None and (not isinstance(self.max_span_chunks, int) or self.max_span_chunks < 1):
            raise ValueError(f"LoopConfig: max_span_chunks must be None or an int >= 1, got {self.max_span_chunks!r}")
        for name in ("accept_score", "fallback_score"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"LoopConfig: {name} must be in [0, 1], got {value!r}")
        for name in ("critic_timeout_s", "planner_timeout_s"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"LoopConfig: {name} must be None or > 0 seconds, got {value!r}")
        if "{prompt}" not in self.refine_template or "{feedback}" not in self.refine_template:
            raise ValueError(f"LoopConfig: refine_template must contain {{prompt}} and {{feedback}}, got {self.refine_template!r}")


@dataclass
class LoopResult:
    """What a run produced."""

    video: np.ndarray
    """(T, H, W, 3) uint8: the kept segments in order (T = 0 if nothing was kept)."""
    trace: LoopTrace
    """Every decision, with timings."""
    memory: WorldMemory
    """The world memory at the end of the run."""
    segments: list[np.ndarray] = field(default_factory=list, repr=False)
    """The kept segments, (F_i, H, W, 3) uint8 each, one per executed step."""


@dataclass
class _Segment:
    """A generated, not yet decided segment and the state it can be undone to."""

    step: Step
    record: AttemptRecord
    frames: np.ndarray
    snapshot: Any
    """Generator token of the state before the segment."""


class _CriticFailure(Exception):
    def __init__(self, reason: str, error: str):
        super().__init__(error)
        self.reason, self.error = reason, error


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _thumbnails(frames: np.ndarray, count: int) -> list[np.ndarray]:
    if count == 0 or len(frames) == 0:
        return []
    idx = np.unique(np.linspace(0, len(frames) - 1, num=min(count, len(frames))).round().astype(int))
    return [frames[i].copy() for i in idx]


def _check_frames(frames: Any, what: str) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise TypeError(f"{what} must return (F, H, W, 3) uint8 frames with F >= 1, got {frames.dtype} {frames.shape}")
    return frames


class ClosedLoop:
    """SPIRAL's think-act-reflect loop over a generator, a planner and a critic.

    ``ClosedLoop(generator, planner, critic, config).run(goal, warmup=...)`` returns a ``LoopResult``;
    write it with ``spiral_rt.agents.outputs.write_outputs``. One instance runs one goal at a time.
    """

    def __init__(self, generator: Generator, planner: PlanAgent, critic: CriticAgent, config: LoopConfig | None = None):
        for name, obj, methods in (("generator", generator, ("generate", "snapshot", "rollback", "release_snapshot",
                                                             "start_speculation", "commit_speculation", "drop_speculation")),
                                   ("planner", planner, ("plan", "replan")), ("critic", critic, ("judge",))):
            missing = [m for m in methods if not callable(getattr(obj, m, None))]
            if missing:
                raise ValueError(f"ClosedLoop: argument '{name}' ({type(obj).__name__}) lacks method(s) {missing}")
        self.generator, self.planner, self.critic = generator, planner, critic
        self.config = config or LoopConfig()
        self.config.validate()

    # ------------------------------------------------------------------------------------ run
    def run(self, goal: Goal | str, warmup: Callable[[], Any] | None = None,
            memory: WorldMemory | None = None, progress: Callable[[AttemptRecord], None] | None = None) -> LoopResult:
        """Plan ``goal``, execute every step with judgement, retries and replans; return the result.

        ``warmup`` runs on this thread while the first planner call runs on a worker. ``progress`` is
        called with each attempt record once it is decided (for a progress bar).
        """
        if isinstance(goal, str):
            goal = Goal(goal)
        if not isinstance(goal, Goal):
            raise ValueError(f"ClosedLoop.run: argument 'goal' must be a Goal or str, got {type(goal).__name__}")
        if warmup is not None and not callable(warmup):
            raise ValueError("ClosedLoop.run: argument 'warmup' must be callable or None")
        cfg = self.config
        self._trace = trace = LoopTrace(goal=goal, config=dataclasses.asdict(cfg))
        self._memory = memory if memory is not None else WorldMemory()
        self._progress = progress
        self._next_index = 0
        self._pool = cf.ThreadPoolExecutor(max_workers=cfg.agent_workers, thread_name_prefix="spiral-agent")
        segments: list[np.ndarray] = []
        t_run = time.perf_counter()
        try:
            steps = self._first_plan(goal, warmup)
            self._run_steps(goal, steps, segments)
            trace.completed = trace.error is None
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
            trace.add_time("total_s", time.perf_counter() - t_run)
        video = np.concatenate(segments, axis=0) if segments else np.zeros((0, 0, 0, 3), np.uint8)
        trace.num_video_frames = int(video.shape[0])
        return LoopResult(video=video, trace=trace, memory=self._memory, segments=segments)

    # ------------------------------------------------------------------------------- planning
    def _renumber(self, steps: list[Step]) -> list[Step]:
        cfg = self.config
        out = []
        for s in steps[: cfg.max_plan_steps]:
            span = s.span_chunks
            if cfg.max_span_chunks is not None and span > cfg.max_span_chunks:
                self._trace.warn(f"step {s.prompt!r}: span {span} clamped to max_span_chunks={cfg.max_span_chunks}")
                span = cfg.max_span_chunks
            out.append(Step(prompt=s.prompt, span_chunks=span, success_criteria=list(s.success_criteria), index=self._next_index))
            self._next_index += 1
        if len(steps) > cfg.max_plan_steps:
            self._trace.warn(f"plan had {len(steps)} steps; kept the first max_plan_steps={cfg.max_plan_steps}")
        return out

    def _timed_call(self, agent: str, fn: Callable, *args) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self._trace.add_latency(agent, time.perf_counter() - t)

    def _drain_events(self, agent_name: str, agent: Any) -> None:
        drain = getattr(agent, "drain_events", None)
        if callable(drain):
            try:
                events = drain()
            except Exception as exc:  # an agent's bookkeeping must not stop the run
                logger.debug("drain_events of %s failed: %s", agent_name, exc)
                return
            if events:
                self._trace.add_events(agent_name, list(events))

    def _await_plan(self, future: cf.Future, goal: Goal, call: str) -> tuple[Plan | None, FallbackRecord | None]:
        """The plan from ``future`` if it is valid, else None and the fallback record to file."""
        try:
            plan = future.result(timeout=self.config.planner_timeout_s)
        except Exception as exc:
            if not future.done():
                return None, FallbackRecord("planner", call, "timeout", f"no plan within {self.config.planner_timeout_s} s", "")
            return None, FallbackRecord("planner", call, "timeout" if isinstance(exc, TimeoutError) else "error",
                                        _describe(exc), "")
        finally:
            self._drain_events("planner", self.planner)
        if not isinstance(plan, Plan) or not plan.steps:
            return None, FallbackRecord("planner", call, "invalid_output", f"expected a Plan with steps, got {plan!r:.200}", "")
        return plan, None

    def _fallback(self, record: FallbackRecord) -> None:
        self._trace.fallbacks.append(record)
        message = f"{record.agent}.{record.call} failed ({record.reason}: {record.error}); {record.action}"
        self._trace.warn(message)
        logger.warning(message)

    def _first_plan(self, goal: Goal, warmup: Callable[[], Any] | None) -> list[Step]:
        trace = self._trace
        memory_view = self._memory_view()
        t0 = time.perf_counter()
        future = self._pool.submit(self._timed_call, "planner", self.planner.plan, goal, memory_view)
        if warmup is not None:
            t_w = time.perf_counter()
            try:
                warmup()
            finally:
                trace.add_time("warmup_s", time.perf_counter() - t_w)
        t_wait = time.perf_counter()
        plan, failure = self._await_plan(future, goal, "plan")
        trace.add_time("plan_wait_s", time.perf_counter() - t_wait)
        trace.add_time("first_plan_s", time.perf_counter() - t0)
        if plan is None:
            span = self.config.fallback_span_chunks
            plan = Plan(goal, [Step(prompt=goal.text, span_chunks=span)],
                        rationale=f"fallback: the planner failed ({failure.reason}); one step from the goal")
            failure.action = f"one-step plan from the goal ({span} chunks)"
            self._fallback(failure)
        steps = self._renumber(plan.steps)
        trace.initial_plan = Plan(goal, steps, plan.rationale)
        logger.info("plan for %r: %d step(s), %d chunk(s)", goal.text, len(steps), sum(s.span_chunks for s in steps))
        return steps

    def _replan(self, goal: Goal, remaining: list[Step], reason: str, verdict: Verdict) -> list[Step]:
        trace = self._trace
        view = self._memory_view()
        kind = verdict.failure.value if verdict.failure is not None else "unspecified"
        view.summary = (f"{view.summary or view.render()}\n{LAST_REJECTION}step {remaining[0].prompt!r} "
                        f"(score {verdict.score:.2f}, {kind}{', plan judged wrong' if verdict.plan_is_wrong else ''}): "
                        f"{verdict.feedback or 'no feedback'}")
        t0 = time.perf_counter()
        future = self._pool.submit(self._timed_call, "planner", self.planner.replan, goal, view, list(remaining))
        plan, failure = self._await_plan(future, goal, "replan")
        latency = time.perf_counter() - t0
        trace.add_time("replan_s", latency)
        trace.counters["replans"] += 1
        if plan is None:
            failure.action = "kept the remaining steps as planned"
            failure.step_index = remaining[0].index
            self._fallback(failure)
            new_steps = self._renumber(remaining)
        else:
            new_steps = self._renumber(plan.steps)
        trace.replans.append(ReplanRecord(after_step_index=remaining[0].index, reason=reason, old_steps=list(remaining),
                                          new_steps=list(new_steps), latency_s=latency, fallback=plan is None))
        logger.info("replanned after step %d (%s): %d step(s) left", remaining[0].index, reason, len(new_steps))
        return new_steps

    # ------------------------------------------------------------------------------- judging
    def _memory_view(self) -> WorldMemory:
        """A shallow copy of the memory for an agent thread (the loop keeps appending to its own)."""
        m = self._memory
        return WorldMemory(executed=list(m.executed), key_frames=list(m.key_frames), summary=m.summary,
                           max_key_frames=m.max_key_frames)

    def _judge_call(self, frames: np.ndarray, step: Step, memory: WorldMemory) -> tuple[Any, float]:
        t = time.perf_counter()
        try:
            return self.critic.judge(frames, step, memory), time.perf_counter() - t
        finally:
            self._trace.add_latency("critic", time.perf_counter() - t)

    def _await_verdict(self, future: cf.Future, seg: _Segment) -> Verdict:
        """The verdict for ``seg``; on any critic failure the accept-with-warning verdict (recorded)."""
        rec = seg.record
        t_wait = time.perf_counter()
        reason = error = None
        try:
            verdict, rec.critic_latency_s = future.result(timeout=self.config.critic_timeout_s)
            if not isinstance(verdict, Verdict):
                raise _CriticFailure("invalid_output", f"expected a Verdict, got {verdict!r:.200}")
        except _CriticFailure as exc:
            reason, error = exc.reason, exc.error
        except Exception as exc:
            if not future.done():  # our wait ran out; the call goes on in its thread and is ignored
                reason, error = "timeout", f"no verdict within {self.config.critic_timeout_s} s"
                future.cancel()
            else:  # the critic raised (its own request timeout counts as a timeout)
                reason, error = "timeout" if isinstance(exc, TimeoutError) else "error", _describe(exc)
        rec.critic_wait_s = time.perf_counter() - t_wait
        self._trace.add_time("critic_wait_s", rec.critic_wait_s)
        self._drain_events("critic", self.critic)
        if reason is None:
            return verdict
        rec.critic_fallback = True
        self._fallback(FallbackRecord("critic", "judge", reason, error, "accepted the segment without judgement",
                                      step_index=seg.step.index, attempt=rec.attempt))
        return Verdict(score=self.config.fallback_score, completed=True, failure=None,
                       feedback=f"critic unavailable ({reason}); accepted without judgement")

    # ------------------------------------------------------------------------------ generating
    def _seed(self, step: Step, attempt: int) -> int:
        return int(np.random.SeedSequence([self.config.seed, step.index, attempt]).generate_state(1, np.uint32)[0])

    def _generate(self, step: Step, attempt: int, prompt: str, snapshot: Any, speculative: bool) -> _Segment:
        seed = self._seed(step, attempt)
        rec = AttemptRecord(step_index=step.index, attempt=attempt, prompt=prompt, seed=seed,
                            span_chunks=step.span_chunks, speculative=speculative)
        self._trace.attempts.append(rec)
        t = time.perf_counter()
        frames = _check_frames(self.generator.generate(prompt, step.span_chunks, seed), "generator.generate")
        rec.generate_s = time.perf_counter() - t
        self._trace.add_time("generate_s", rec.generate_s)
        if speculative:
            self._trace.add_time("speculative_generate_s", rec.generate_s)
        rec.num_frames = int(frames.shape[0])
        rec.thumbnails = _thumbnails(frames, self.config.num_thumbnails)
        return _Segment(step=step, record=rec, frames=frames, snapshot=snapshot)

    def _refine(self, step: Step, verdict: Verdict) -> str:
        if verdict.refined_prompt:
            return verdict.refined_prompt
        if verdict.feedback.strip():
            return self.config.refine_template.format(prompt=step.prompt.rstrip(" ."), feedback=verdict.feedback.strip())
        return step.prompt

    def _decide(self, rec: AttemptRecord, decision: str) -> None:
        rec.decision = decision
        if self._progress is not None:
            try:
                self._progress(rec)
            except Exception as exc:
                logger.debug("progress callback failed: %s", exc)

    # ------------------------------------------------------------------------------ main loop
    def _run_steps(self, goal: Goal, steps: list[Step], segments: list[np.ndarray]) -> None:
        cfg, gen, trace = self.config, self.generator, self._trace
        i = 0
        attempt = 1
        video_frames = 0
        pending: _Segment | None = None
        spec: _Segment | None = None
        spec_token: Any = None
        try:
            pending = self._generate(steps[0], 1, steps[0].prompt, gen.snapshot(), speculative=False)
            while True:
                step, rec = pending.step, pending.record
                future = self._pool.submit(self._judge_call, pending.frames, step, self._memory_view())
                spec = None
                if cfg.speculate and i + 1 < len(steps):
                    nxt = steps[i + 1]
                    snap_next = gen.snapshot()
                    spec_token = gen.start_speculation()
                    trace.counters["speculations"] += 1
                    spec = self._generate(nxt, 1, nxt.prompt, snap_next, speculative=True)
                verdict = self._await_verdict(future, pending)
                rec.verdict = verdict
                accepted = rec.critic_fallback or (verdict.completed and verdict.score >= cfg.accept_score)
                exhausted = attempt > cfg.max_retries
                if accepted:
                    action = tr.ACCEPTED
                elif (exhausted or verdict.plan_is_wrong) and trace.counters["replans"] < cfg.max_replans:
                    action = tr.REPLAN
                elif not exhausted:
                    action = tr.RETRY
                else:
                    action = tr.KEPT
                if action in (tr.RETRY, tr.REPLAN):
                    if spec is not None:  # it was built on the segment we are about to undo
                        gen.drop_speculation(spec_token)
                        gen.release_snapshot(spec.snapshot)
                        trace.counters["speculations_dropped"] += 1
                        trace.add_time("dropped_generate_s", spec.record.generate_s)
                        self._decide(spec.record, tr.DROPPED)
                        spec = None
                    self._decide(rec, action)
                    gen.rollback(pending.snapshot)
                    trace.counters["rollbacks"] += 1
                    if action == tr.RETRY:
                        trace.counters["retries"] += 1
                        attempt += 1
                        pending = self._generate(step, attempt, self._refine(step, verdict), pending.snapshot, speculative=False)
                    else:
                        gen.release_snapshot(pending.snapshot)
                        reason = "plan_is_wrong" if verdict.plan_is_wrong else "retries_exhausted"
                        steps = steps[:i] + self._replan(goal, steps[i:], reason, verdict)
                        attempt = 1
                        pending = self._generate(steps[i], 1, steps[i].prompt, gen.snapshot(), speculative=False)
                    continue
                if action == tr.KEPT:
                    trace.warn(f"step {step.index} ({step.prompt!r}) still rejected after {attempt} attempt(s) and "
                               f"{trace.counters['replans']} replan(s); kept the last attempt")
                    logger.warning(trace.warnings[-1])
                # keep the segment (and the speculation built on it)
                self._decide(rec, action)
                rec.video_start_frame = video_frames
                video_frames += len(pending.frames)
                segments.append(pending.frames)
                trace.executed_steps.append(step)
                self._memory.record(step, verdict, pending.frames[-1], prompt_used=rec.prompt, attempts=attempt)
                gen.release_snapshot(pending.snapshot)
                i += 1
                attempt = 1
                if i >= len(steps):
                    break
                if spec is not None:
                    gen.commit_speculation(spec_token)
                    trace.counters["speculations_committed"] += 1
                    pending, spec = spec, None
                else:
                    pending = self._generate(steps[i], 1, steps[i].prompt, gen.snapshot(), speculative=False)
        except Exception as exc:
            trace.error = _describe(exc)
            message = f"generator failed, run stopped with {len(segments)} kept segment(s): {trace.error}"
            trace.warn(message)
            logger.error(message, exc_info=True)
            for rec in trace.attempts:
                if not rec.decision:
                    self._decide(rec, tr.ABORTED)
