"""RolloutRunner: executes a RolloutSpec on an Engine and returns a scored RolloutBatch.

Per execution group (one plan of one goal), with the default "batched" schedule::

    parent = open_session(plan prompts, noise id = the group's shared id)
    chunks [0, fork):   engine.step([parent])                 the prefix, once (batch 1); its first
                        (or engine.observe(parent, z))        spec.observed_chunks are given latents
    children = parent.fork(G); parent.close()                 G sequences share the prefix pages (refcounts)
    chunks [fork, n):   engine.step(children, noise=...)      one DiT call per denoising step for all G
                        (slices of max_batch_size)            trained steps recorded in the same pass
    decode: the engine's streaming VAE, per member, every chunk (prefix decoded once, shared)
    critic: the group's frames go to a thread pool (or worker processes) while the next group
            generates; each member's memory starts with the prefix's last frame as its key frame
            (the state the judged steps start from)
    advantages: spiral_rt.rl.hierarchical_advantages over (K plans, G members) per goal

``run(..., concurrent_groups=N)`` generates N execution groups together (a wave): their prefixes
in one engine step per chunk, then every member of the wave in one step per chunk (sliced by
``max_batch_size``). Same latents (the engine's result does not depend on the batch composition);
for a small model whose forward is latency-bound this divides the rollout's engine steps by N, at
the price of N groups' KV pages at once.

The baselines of the benchmark run the same code with another order: "prefix_once" generates the
prefix once and then each member alone on a fork of it (TempAct's schedule: a cache copy per member,
members one at a time), "naive" generates each member from scratch, alone. All three give the same
latents (same noise keys; the engine's batch composition does not change a session's result).

Noise: prefix chunks use the engine's own Philox path (the parent's noise id); every chunk after the
fork gets explicit noise drawn here with the same Philox op, one key per noise slot from
``RolloutSpec.slot_noise_ids``, which is how members mix shared and private draws inside one chunk.

Recording: the rollout's step policy is wrapped in a ``RecordingStepPolicy`` and passed to every
``Engine.step`` of the run (``step_policy=``; the engine's own configuration is never changed); the
recorder is armed only for trained chunks. Nothing in the chunk loop reads device values on the
host: records stay on the device until the group is finished, then move to the host once per group
(together with the frames the critic needs).

Boundaries: uses the engine's public API (sessions, ``step``, ``fork``, ``config``) and the agents'
CriticAgent protocol; it changes no engine code. One thread drives the engine; the critic runs on
worker threads and never touches the engine. Sessions it opens are closed before ``run`` returns
or raises, so the cache has no pages of the rollout left.
"""

from __future__ import annotations

import logging
import time
import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from spiral_rt.agents.types import FailureKind, Plan, Verdict, WorldMemory
from spiral_rt.engine import Engine, PromptSpan, StreamSession
from spiral_rt.ops import sampler_step
from spiral_rt.rl import group_advantages, hierarchical_advantages, write_planner_jsonl
from spiral_rt.transfer import to_host

from .batch import RolloutBatch
from .recorder import RecordingStepPolicy, TransitionRecorder
from .spec import RolloutSpec

logger = logging.getLogger(__name__)

SCHEDULES = ("batched", "prefix_once", "naive")


@dataclass
class _Group:
    """Host bookkeeping of one execution group while it runs."""

    index: int
    goal: int
    plan_in_goal: int
    plan: Plan
    chunk_prompts: list[str]
    chunk_steps: list[int]
    size: int
    latents: list[dict[int, torch.Tensor]] = field(default_factory=list)
    frames: list[dict[int, torch.Tensor]] = field(default_factory=list)
    records: list[dict[tuple[int, int], tuple]] = field(default_factory=list)

    def __post_init__(self):
        self.latents = [dict() for _ in range(self.size)]
        self.frames = [dict() for _ in range(self.size)]
        self.records = [dict() for _ in range(self.size)]


@dataclass
class _GroupResult:
    """One finished group, on the host."""

    x: torch.Tensor
    x_next: torch.Tensor
    mu: torch.Tensor | None
    log_prob: torch.Tensor
    abc: torch.Tensor
    latents: torch.Tensor
    frames: torch.Tensor | None
    frame_ranges: list[tuple[int, int]]


class RolloutRunner:
    """Runs GRPO rollouts on ``engine`` (module docstring).

    Args:
        engine: the streaming engine (its config's schedule, latent size, dtype and backends are used;
            its step policy is replaced by the spec's while a rollout runs). Chunks after the fork use
            explicit noise, so CUDA graphs, if enabled, only serve the prefix.
        critic: any ``CriticAgent`` (``judge(frames, step, memory) -> Verdict``); if it also has
            ``judge_batch(frames_list, steps, memories) -> list[Verdict]``, a group's members are judged
            in one call per plan step. None: no rewards.
        prompt_embeddings: precomputed text embeddings per prompt string ((Lt, text_dim) tensors); None:
            the engine's text encoder encodes the prompts.
        critic_processes: 0 (default): the critic runs on ``spec.critic_workers`` threads; N > 0: on N
            worker processes, started at the first scored run and kept until ``close()``, for a critic
            whose work is Python (threads would take turns on the GIL). The critic must pickle.
    """

    def __init__(self, engine: Engine, critic=None, *, prompt_embeddings: Mapping[str, torch.Tensor] | None = None,
                 critic_processes: int = 0):
        if not isinstance(engine, Engine):
            raise ValueError(f"RolloutRunner: argument 'engine' must be an Engine, got {type(engine).__name__}")
        if critic is not None and not callable(getattr(critic, "judge", None)):
            raise ValueError(f"RolloutRunner: argument 'critic' must implement CriticAgent.judge, got {type(critic).__name__}")
        if prompt_embeddings is not None and not isinstance(prompt_embeddings, Mapping):
            raise ValueError(f"RolloutRunner: argument 'prompt_embeddings' must be a mapping str -> tensor, "
                             f"got {type(prompt_embeddings).__name__}")
        if isinstance(critic_processes, bool) or not isinstance(critic_processes, int) or critic_processes < 0:
            raise ValueError(f"RolloutRunner: argument 'critic_processes' must be an int >= 0, got {critic_processes!r}")
        self.engine = engine
        self.critic = critic
        self.prompt_embeddings = prompt_embeddings
        self.critic_processes = critic_processes
        self._processes: ProcessPoolExecutor | None = None
        self._open: list[StreamSession] = []

    def close(self) -> None:
        """Stop the critic's worker processes (if any); the runner can still run (it starts new ones)."""
        if self._processes is not None:
            self._processes.shutdown(wait=True, cancel_futures=True)
            self._processes = None

    def __enter__(self) -> "RolloutRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ public

    def run(self, spec: RolloutSpec, *, schedule: str = "batched", score: bool = True,
            observations: Sequence[torch.Tensor] | None = None, concurrent_groups: int = 1) -> RolloutBatch:
        """Generate, record, decode, score and normalise one rollout.

        Args:
            spec: the rollout (validated here).
            schedule: "batched" (default), or the benchmark baselines "prefix_once" and "naive".
            score: run the critic (when the runner has one) and compute rewards and advantages.
            observations: with ``spec.observed_chunks`` > 0, per goal the clean latents (C, F, h, w) of
                its observed chunks, F = observed_chunks * chunk frames (shared by the goal's plans).
            concurrent_groups: execution groups generated together by the "batched" schedule (module
                docstring); the result is the same for any value.
        """
        if not isinstance(spec, RolloutSpec):
            raise ValueError(f"RolloutRunner.run: argument 'spec' must be a RolloutSpec, got {type(spec).__name__}")
        spec.validate()
        if schedule not in SCHEDULES:
            raise ValueError(f"RolloutRunner.run: argument 'schedule' must be one of {SCHEDULES}, got {schedule!r}")
        if isinstance(concurrent_groups, bool) or not isinstance(concurrent_groups, int) or concurrent_groups < 1:
            raise ValueError(f"RolloutRunner.run: argument 'concurrent_groups' must be a positive int, got {concurrent_groups!r}")
        if concurrent_groups > 1 and schedule != "batched":
            raise ValueError(f"RolloutRunner.run: argument 'concurrent_groups' > 1 needs schedule 'batched', got {schedule!r}")
        engine, cfg = self.engine, self.engine.config
        self._observations = self._check_observations(spec, observations)
        scoring = score and self.critic is not None
        if scoring and cfg.output != "uint8":
            raise ValueError(f"RolloutRunner.run: the critic needs uint8 frames; the engine's config.output is {cfg.output!r}")
        if self.prompt_embeddings is None and engine.text_encoder is None:
            raise ValueError("RolloutRunner: the engine has no text_encoder; pass 'prompt_embeddings' (prompt -> embeddings)")
        num_steps = len(cfg.schedule.transitions())
        train_steps = spec.trained_steps(cfg.schedule)
        train_chunks = spec.trained_chunks()
        plans = spec.resolved_plans()
        spec_dict = spec.to_dict(plans)
        prompt_table: dict[str, int] = {}
        groups: list[_Group] = []
        for g, per_goal in enumerate(plans):
            for k, plan in enumerate(per_goal):
                prompts, steps = spec.chunk_prompts(plan)
                for p in prompts:
                    prompt_table.setdefault(p, len(prompt_table))
                    self._resolve(p)
                groups.append(_Group(len(groups), g, k, plan, prompts, steps, spec.group_size))

        policy = RecordingStepPolicy(spec.step_policy)  # passed to every engine step of the run
        per_group = spec.fork_chunk + (spec.num_chunks - spec.fork_chunk) * (1 if schedule == "batched" else spec.group_size)
        if schedule == "naive":
            per_group = spec.num_chunks * spec.group_size
        bar = tqdm(total=len(groups) * per_group, desc=f"rollout ({schedule})", unit="chunk step", disable=not spec.progress)
        pool = None
        if scoring and self.critic_processes:
            if self._processes is None:  # spawned: forking a process that holds a CUDA context is unsafe
                self._processes = ProcessPoolExecutor(self.critic_processes, mp_context=multiprocessing.get_context("spawn"))
            pool = self._processes
        elif scoring:
            pool = ThreadPoolExecutor(max_workers=spec.critic_workers, thread_name_prefix="rollout-critic")
        futures: list[list[Future]] = []
        results: list[_GroupResult] = []
        self._peak_pages = 0
        self._engine_steps = 0
        failed = True
        t0 = time.perf_counter()
        try:
            ctx = dict(policy=policy, train_chunks=frozenset(train_chunks), train_steps=train_steps,
                       num_steps=num_steps)
            waves = [groups[i:i + concurrent_groups] for i in range(0, len(groups), concurrent_groups)]
            for wave in waves:
                getattr(self, f"_wave_{schedule}")(spec, wave, bar, ctx)
                for grp in wave:
                    res = self._finish_group(grp, spec, train_chunks, train_steps)
                    results.append(res)
                    if scoring:
                        futures.append(self._submit_judging(pool, grp, res, spec))
            failed = False
        finally:
            bar.close()
            for s in list(self._open):
                self._close(s)
            if pool is not None and failed:
                if pool is self._processes:
                    for f in (f for group_futures in futures for f in group_futures):
                        f.cancel()
                else:
                    pool.shutdown(wait=True, cancel_futures=True)
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        gen_seconds = time.perf_counter() - t0

        verdicts: list[list[dict]] = [[] for _ in range(spec.num_members)]
        signals: list[list[float]] = [[] for _ in range(spec.num_members)]  # per member, per judged step
        rewards = None
        if scoring:
            rewards = torch.zeros(spec.num_members, dtype=torch.float64)
            judged = tqdm(total=spec.num_members, desc="critic", unit="video", disable=not spec.progress)
            try:
                for grp, group_futures in zip(groups, futures):
                    base = grp.index * spec.group_size
                    member_verdicts = _collect(group_futures, spec.group_size)
                    for m, vs in enumerate(member_verdicts):
                        verdicts[base + m] = [v.to_dict() for v in vs]
                        signals[base + m] = [verdict_signal(v, spec.reward_signal) for v in vs]
                        rewards[base + m] = _reduce(signals[base + m], spec.reward_reduce)
                        judged.update(1)
            finally:
                judged.close()
                if pool is not self._processes:
                    pool.shutdown(wait=True)
        seconds = time.perf_counter() - t0
        batch = self._assemble(spec, spec_dict, groups, results, prompt_table, train_chunks, train_steps, num_steps,
                               rewards, verdicts)
        if rewards is not None and spec.credit == "step":
            batch.transition_advantages = _step_advantages(spec, groups, signals, [(c, k) for c in train_chunks
                                                                                   for k in train_steps])
        page_bytes = engine.cache.config.page_bytes
        batch.stats = {
            "schedule": schedule, "videos": spec.num_members, "seconds": seconds, "generate_seconds": gen_seconds,
            "videos_per_s": spec.num_members / seconds if seconds > 0 else float("inf"),
            "engine_steps": self._engine_steps, "peak_kv_pages": self._peak_pages, "page_bytes": page_bytes,
            "peak_kv_bytes": self._peak_pages * page_bytes, "scored": scoring,
        }
        logger.info("rollout (%s): %d videos in %.2f s, peak KV %d pages", schedule, spec.num_members, seconds,
                    self._peak_pages)
        return batch

    def replay(self, batch: RolloutBatch, *, schedule: str = "batched", score: bool = False,
               progress: bool = False) -> RolloutBatch:
        """Regenerate ``batch`` from its stored spec, plans and seed (same latents on the same engine setup);
        observed chunks are taken from the batch's latents."""
        if not isinstance(batch, RolloutBatch):
            raise ValueError(f"RolloutRunner.replay: argument 'batch' must be a RolloutBatch, got {type(batch).__name__}")
        spec = RolloutSpec.from_dict(batch.spec, progress=progress)
        observations = None
        if spec.observed_chunks:
            frames = spec.observed_chunks * self.engine.config.chunk_frames
            first = [int((batch.goal_index == g).nonzero()[0]) for g in range(len(spec.goals))]
            observations = [batch.latents[i][:, :frames] for i in first]
        return self.run(spec, schedule=schedule, score=score, observations=observations)

    @staticmethod
    def write_planner_jsonl(batch: RolloutBatch, path) -> "object":
        """Plan-level rewards and advantages of ``batch`` as JSONL for LLM RL trainers (TRL, verl)."""
        return write_planner_jsonl(batch.planner_records(), path)

    # ------------------------------------------------------------------ schedules

    def _wave_batched(self, spec, wave, bar, ctx):
        parents = self._prefixes(spec, wave, bar, ctx)
        items = []  # (group, session, [member]) of every member of the wave
        for grp, parent in zip(wave, parents):
            children = parent.fork(spec.group_size)
            self._open.extend(children)
            for m, child in enumerate(children):
                child.noise_id = spec.member_noise_id(grp.index, m)
                items.append((grp, child, [m]))
            self._close(parent)
        for c in range(spec.fork_chunk, spec.num_chunks):
            self._chunks(spec, items, c, ctx)
            bar.update(len(wave))
        for _, child, _ in items:
            self._close(child)

    def _wave_prefix_once(self, spec, wave, bar, ctx):
        (grp,) = wave
        (parent,) = self._prefixes(spec, wave, bar, ctx)
        for m in range(spec.group_size):
            child = parent.fork(1)[0]
            self._open.append(child)
            child.noise_id = spec.member_noise_id(grp.index, m)
            for c in range(spec.fork_chunk, spec.num_chunks):
                self._chunks(spec, [(grp, child, [m])], c, ctx)
                bar.update(1)
            self._close(child)
        self._close(parent)

    def _wave_naive(self, spec, wave, bar, ctx):
        (grp,) = wave
        for m in range(spec.group_size):
            s = self._open_session(spec, grp)
            for c in range(spec.num_chunks):
                self._chunks(spec, [(grp, s, [m])], c, ctx)
                bar.update(1)
            self._close(s)

    def _prefixes(self, spec, wave, bar, ctx) -> list[StreamSession]:
        """One parent session per group of ``wave``, through the prefix chunks (each stands for every member)."""
        parents = [self._open_session(spec, grp) for grp in wave]
        everyone = list(range(spec.group_size))
        for c in range(spec.fork_chunk):
            self._chunks(spec, [(grp, p, everyone) for grp, p in zip(wave, parents)], c, ctx)
            bar.update(len(wave))
        return parents

    def _check_observations(self, spec: RolloutSpec, observations) -> list[torch.Tensor] | None:
        if not spec.observed_chunks:
            if observations is not None:
                raise ValueError("RolloutRunner.run: argument 'observations' needs spec.observed_chunks > 0")
            return None
        cfg = self.engine.config
        shape = (self.engine.model.config.in_channels, spec.observed_chunks * cfg.chunk_frames, *cfg.latent_size)
        if observations is None or len(observations) != len(spec.goals):
            raise ValueError(f"RolloutRunner.run: spec.observed_chunks={spec.observed_chunks} needs argument 'observations' "
                             f"with one latent tensor {shape} per goal ({len(spec.goals)})")
        out = []
        for g, z in enumerate(observations):
            if not isinstance(z, torch.Tensor) or tuple(z.shape) != shape:
                got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
                raise ValueError(f"RolloutRunner.run: argument 'observations[{g}]' must be a tensor {shape}, got {got}")
            out.append(z.to(self.engine.device, cfg.latent_dtype))
        return out

    # ------------------------------------------------------------------ one chunk step

    def _chunks(self, spec: RolloutSpec, items: list[tuple[_Group, StreamSession, list[int]]], chunk: int,
                ctx: dict) -> None:
        """Chunk ``chunk`` of every ``(group, session, members)`` item, ``max_batch_size`` sessions per engine step."""
        size = self.engine.config.max_batch_size
        for lo in range(0, len(items), size):
            self._chunk(spec, items[lo:lo + size], chunk, ctx)

    def _chunk(self, spec: RolloutSpec, items: list[tuple[_Group, StreamSession, list[int]]], chunk: int,
               ctx: dict) -> None:
        """One engine step of the items' sessions at chunk ``chunk``; an item's session stands for its
        group's ``members`` (the whole group for a prefix, one member after the fork)."""
        engine = self.engine
        num_steps = ctx["num_steps"]
        sessions = [s for _, s, _ in items]
        noise = None
        if chunk >= spec.fork_chunk:
            noise = self._noise(spec, [(grp.index, members[0]) for grp, _, members in items], sessions, chunk, num_steps)
        recorder = None
        if chunk in ctx["train_chunks"]:
            recorder = TransitionRecorder(ctx["train_steps"], num_steps, spec.record_mu)
        policy: RecordingStepPolicy = ctx["policy"]
        policy.recorder = recorder
        try:
            if chunk < spec.observed_chunks:  # a given chunk of the prefix: one session per goal's plan
                F = engine.config.chunk_frames
                outs = {s.session_id: engine.observe(s, self._observations[grp.goal][:, chunk * F:(chunk + 1) * F])
                        for grp, s, _ in items}
            else:
                outs = engine.step(sessions, noise=noise, step_policy=policy)
        finally:
            policy.recorder = None
        self._engine_steps += 1
        missing = [s.session_id for s in sessions if s.session_id not in outs]
        if missing:
            raise RuntimeError(f"RolloutRunner: sessions {missing} were not run (the KV pool is full and the engine's "
                               "on_cache_full is 'wait'); give the engine more KV pages or reduce group_size")
        used = engine.cache.num_pages - engine.cache.num_free_pages
        self._peak_pages = max(self._peak_pages, used)
        records = recorder.finish() if recorder is not None else []
        for i, (grp, s, members) in enumerate(items):
            out = outs[s.session_id]
            frames = out.frames
            row_records = {}
            for r in records:
                row_records[(chunk, r.step)] = (r.x[i], r.x_next[i], r.mu[i] if r.mu is not None else None,
                                                r.log_prob[i], (r.a, r.b, r.c))
            for m in members:
                grp.latents[m][chunk] = out.latents
                if frames is not None:
                    grp.frames[m][chunk] = frames
                grp.records[m].update(row_records)

    def _noise(self, spec: RolloutSpec, members: list[tuple[int, int]], sessions: list[StreamSession], chunk: int,
               num_steps: int) -> dict[int, torch.Tensor]:
        """Explicit (num_steps + 1, C, F, h, w) noise per session from its (group, member)'s slot noise ids."""
        engine, cfg = self.engine, self.engine.config
        seed = spec.seed - 2**64 if spec.seed >= 2**63 else spec.seed
        ids = [spec.slot_noise_ids(group, m, chunk, num_steps) for group, m in members]
        rows = [(seed, ids[i][j], chunk, j if j < num_steps else num_steps + 1)
                for j in range(num_steps + 1) for i in range(len(members))]
        keys = torch.tensor(rows, dtype=torch.int64).view(num_steps + 1, len(members), 4)
        if engine.device.type == "cuda":
            keys = keys.pin_memory().to(engine.device, non_blocking=True)
        h, w = cfg.latent_size
        zeros = torch.zeros((len(members), engine.model.config.in_channels, cfg.chunk_frames, h, w),
                            dtype=cfg.latent_dtype, device=engine.device)
        draws = torch.stack([sampler_step(zeros, zeros, 0.0, 0.0, 1.0, noise_key=keys[j], return_mu=False,
                                          backend=cfg.sampler_backend).x_next for j in range(num_steps + 1)], dim=1)
        return {s.session_id: draws[i] for i, s in enumerate(sessions)}

    # ------------------------------------------------------------------ sessions and prompts

    def _resolve(self, prompt: str):
        if self.prompt_embeddings is None:
            return prompt
        emb = self.prompt_embeddings.get(prompt)
        if emb is None:
            raise ValueError(f"RolloutRunner: argument 'prompt_embeddings' has no entry for prompt {prompt[:60]!r}")
        return emb

    def _open_session(self, spec: RolloutSpec, grp: _Group) -> StreamSession:
        spans: list[PromptSpan] = []
        run_start = 0
        prompts = grp.chunk_prompts
        for c in range(1, len(prompts) + 1):
            if c == len(prompts) or prompts[c] != prompts[run_start]:
                spans.append(PromptSpan(self._resolve(prompts[run_start]), c - run_start))
                run_start = c
        s = self.engine.open_session(spans, seed=spec.seed, max_chunks=spec.num_chunks,
                                     noise_id=spec.group_noise_id(grp.index))
        self._open.append(s)
        return s

    def _close(self, s: StreamSession) -> None:
        s.close()
        if s in self._open:
            self._open.remove(s)

    # ------------------------------------------------------------------ results

    def _finish_group(self, grp: _Group, spec: RolloutSpec, train_chunks, train_steps) -> _GroupResult:
        """Stack the group's per-member records, latents and frames and bring them to the host (one sync)."""
        keys = [(c, k) for c in train_chunks for k in train_steps]
        with torch.no_grad():
            def stack(i):
                return to_host(torch.stack([torch.stack([grp.records[m][key][i] for key in keys]) for m in range(grp.size)]),
                               wait=False)

            x, x_next, log_prob = stack(0), stack(1), stack(3)  # log_prob widened after the sync below
            mu = stack(2) if spec.record_mu else None
            abc = torch.tensor([[grp.records[m][key][4] for key in keys] for m in range(grp.size)], dtype=torch.float64)
            latents = to_host(torch.stack([torch.cat([grp.latents[m][c] for c in range(spec.num_chunks)], dim=1)
                                           for m in range(grp.size)]), wait=False)
            frames, ranges = None, []
            if grp.frames[0]:
                start = 0
                for c in range(spec.num_chunks):
                    n = grp.frames[0][c].shape[0]
                    ranges.append((start, start + n))
                    start += n
                frames = to_host(torch.stack([torch.cat([grp.frames[m][c] for c in range(spec.num_chunks)])
                                              for m in range(grp.size)]), wait=False)
            if self.engine.device.type == "cuda":
                torch.cuda.current_stream(self.engine.device).synchronize()  # the copies to pinned memory
            log_prob = log_prob.double()
        grp.latents = grp.frames = grp.records = []  # release the device tensors
        return _GroupResult(x, x_next, mu, log_prob, abc, latents, frames, ranges)

    def _submit_judging(self, pool: ThreadPoolExecutor, grp: _Group, res: _GroupResult, spec: RolloutSpec) -> list[Future]:
        """Queue the group's judging on the pool (frames on the host); futures return per-member verdict lists."""
        frames = res.frames.numpy()
        segments = []  # (plan step index, frame start, frame end) of the plan steps after the fork
        for j in sorted({grp.chunk_steps[c] for c in range(spec.fork_chunk, spec.num_chunks)}):
            chunks = [c for c in range(spec.fork_chunk, spec.num_chunks) if grp.chunk_steps[c] == j]
            segments.append((j, res.frame_ranges[chunks[0]][0], res.frame_ranges[chunks[-1]][1]))
        # the state the judged steps start from: the prefix's last frame (the first key frame of the memory)
        before = res.frame_ranges[spec.fork_chunk - 1][1] - 1 if spec.fork_chunk > 0 else None
        batch_judge = getattr(self.critic, "judge_batch", None)
        if callable(batch_judge):
            return [pool.submit(_judge_group, batch_judge, frames, grp.plan, segments, before)]
        return [pool.submit(_judge_members, self.critic, frames[m:m + 1], grp.plan, segments, before)
                for m in range(grp.size)]

    def _assemble(self, spec, spec_dict, groups, results, prompt_table, train_chunks, train_steps, num_steps,
                  rewards, verdicts) -> RolloutBatch:
        cfg = self.engine.config
        members = [(grp, m) for grp in groups for m in range(spec.group_size)]
        transitions = cfg.schedule.transitions()
        keys = [(c, k) for c in train_chunks for k in train_steps]
        abc = torch.cat([r.abc for r in results])
        batch = RolloutBatch(
            spec=spec_dict,
            goal_index=torch.tensor([g.goal for g, _ in members], dtype=torch.int64),
            plan_index=torch.tensor([g.plan_in_goal for g, _ in members], dtype=torch.int64),
            member_index=torch.tensor([m for _, m in members], dtype=torch.int64),
            group_index=torch.tensor([g.index for g, _ in members], dtype=torch.int64),
            noise_ids=torch.tensor([[spec.slot_noise_ids(g.index, m, c, num_steps) for c in range(spec.num_chunks)]
                                    for g, m in members], dtype=torch.int64),
            prompts=list(prompt_table),
            prompt_ids=torch.tensor([[prompt_table[p] for p in g.chunk_prompts] for g, _ in members], dtype=torch.int64),
            chunk=torch.tensor([c for c, _ in keys], dtype=torch.int64),
            step=torch.tensor([k for _, k in keys], dtype=torch.int64),
            sigma=torch.tensor([transitions[k][0] for _, k in keys], dtype=torch.float64),
            sigma_next=torch.tensor([transitions[k][1] for _, k in keys], dtype=torch.float64),
            timestep=torch.tensor([cfg.schedule.model_timesteps[k] for _, k in keys], dtype=torch.float64),
            x=torch.cat([r.x for r in results]), x_next=torch.cat([r.x_next for r in results]),
            mu=torch.cat([r.mu for r in results]) if spec.record_mu else None,
            a=abc[..., 0].contiguous(), b=abc[..., 1].contiguous(), c=abc[..., 2].contiguous(),
            log_prob=torch.cat([r.log_prob for r in results]),
            count=int(results[0].x[0, 0].numel()),
            latents=torch.cat([r.latents for r in results]),
            frames=torch.cat([r.frames for r in results]) if spec.keep_frames and results[0].frames is not None else None,
            verdicts=verdicts,
        )
        if rewards is not None:
            per_goal = rewards.view(len(spec.goals), spec.num_plans, spec.group_size)
            execution, plan_rewards, plan_adv = [], [], []
            for g in range(len(spec.goals)):
                h = hierarchical_advantages(per_goal[g], spec.advantage)
                execution.append(h.execution.reshape(-1))
                plan_rewards.append(h.plan_rewards)
                plan_adv.append(h.plan)
            batch.rewards = rewards
            batch.advantages = torch.cat(execution).double()
            batch.plan_rewards = torch.cat(plan_rewards).double()
            batch.plan_advantages = torch.cat(plan_adv).double()
        return batch


# ---------------------------------------------------------------------- critic tasks (worker threads)


def _step_advantages(spec: RolloutSpec, groups: list[_Group], signals: list[list[float]], keys) -> torch.Tensor:
    """(M, T) step credit: each judged plan step's signal normalised within the group; transition t
    (chunk, step) = ``keys[t]`` gets the advantage of the plan step its chunk belongs to."""
    G = spec.group_size
    out = torch.zeros(spec.num_members, len(keys), dtype=torch.float64)
    for grp in groups:
        base = grp.index * G
        judged = sorted({grp.chunk_steps[c] for c in range(spec.fork_chunk, spec.num_chunks)})  # the verdicts' order
        signal = torch.tensor(signals[base:base + G], dtype=torch.float64).view(G, len(judged))
        same = torch.zeros(G, dtype=torch.int64)
        adv = torch.stack([group_advantages(signal[:, p], same, spec.advantage) for p in range(len(judged))], dim=1)
        for t, (chunk, _) in enumerate(keys):
            out[base:base + G, t] = adv[:, judged.index(grp.chunk_steps[chunk])]
    return out


def _memory(frames: np.ndarray, before: int | None) -> WorldMemory:
    """A member's memory before its first judged step: the prefix's last frame as key frame, if any."""
    return WorldMemory(key_frames=[np.ascontiguousarray(frames[before])]) if before is not None else WorldMemory()


def _judge_member(critic, frames: np.ndarray, plan: Plan, segments, before: int | None = None) -> list[Verdict]:
    memory = _memory(frames, before)
    verdicts = []
    for j, lo, hi in segments:
        seg = np.ascontiguousarray(frames[lo:hi])
        v = critic.judge(seg, plan.steps[j], memory)
        if not isinstance(v, Verdict):
            raise ValueError(f"RolloutRunner: the critic's judge returned {type(v).__name__}, not a Verdict")
        memory.record(plan.steps[j], v, seg[-1])
        verdicts.append(v)
    return verdicts


def _judge_members(critic, frames: np.ndarray, plan: Plan, segments, before: int | None = None) -> list[list[Verdict]]:
    """``_judge_member`` for each member of ``frames`` (M, F, H, W, 3)."""
    return [_judge_member(critic, f, plan, segments, before) for f in frames]


def _judge_group(judge_batch, frames: np.ndarray, plan: Plan, segments, before: int | None = None) -> list[list[Verdict]]:
    size = frames.shape[0]
    memories = [_memory(frames[m], before) for m in range(size)]
    out: list[list[Verdict]] = [[] for _ in range(size)]
    for j, lo, hi in segments:
        segs = [np.ascontiguousarray(frames[m, lo:hi]) for m in range(size)]
        vs = list(judge_batch(segs, [plan.steps[j]] * size, memories))
        if len(vs) != size or not all(isinstance(v, Verdict) for v in vs):
            raise ValueError(f"RolloutRunner: the critic's judge_batch must return {size} Verdicts, got {vs!r}")
        for m, v in enumerate(vs):
            memories[m].record(plan.steps[j], v, segs[m][-1])
            out[m].append(v)
    return out


def _collect(futures: list[Future], size: int) -> list[list[Verdict]]:
    """Every future returns a list of per-member verdict lists (a whole group, or one member)."""
    out = [per_member for f in futures for per_member in f.result()]
    if len(out) != size:
        raise RuntimeError(f"RolloutRunner: judged {len(out)} members, expected {size}")
    return out


def verdict_signal(verdict: Verdict, signal: str) -> float:
    """What one verdict contributes to a member's reward (``RolloutSpec.reward_signal``)."""
    if signal == "completed":
        return float(verdict.completed)
    if signal == "consistent":
        return 0.0 if verdict.failure in (FailureKind.DRIFT, FailureKind.PHYSICS) else 1.0
    return float(verdict.score)


def _reduce(scores: list[float], how: str) -> float:
    if not scores:
        return 0.0
    if how == "min":
        return min(scores)
    if how == "last":
        return scores[-1]
    return sum(scores) / len(scores)
