"""GRPO rollout mode on the CPU (tiny DiT and VAE with random weights, reference ops, fp32).

- recorded log-probs equal a float64 evaluation of the Gaussian step density on the recorded x, x', mu,
  the coefficients are the step policy's, x' - mu has the step's std, and steps chain (x_{k+1} = x'_k);
- a saved RolloutBatch loads equal, and replaying it from its seed reproduces latents, transitions and
  frames exactly (another seed does not);
- the prefix runs once per plan (DiT calls counted by batch size), the G members share its pages
  (refcount G at the fork) and run as one batch, peak KV pages = one prefix + G suffixes;
- the "naive" and "prefix_once" baselines give identical latents with the expected call counts;
- noise policies: shared initial noise gives identical first-chunk noise within a group, independent
  noise differs, "shared_except_fork" differs at the fork chunk only; a member equals a plain session
  with the same noise ids;
- rewards come from the critic on worker threads (or judge_batch), advantages are normalised per group,
  plan-level records go to JSONL;
- pages are all freed at the end and after an error; the engine's step policy is never changed;
- spec errors name the field.
"""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest
import torch

from rollout_helpers import (BatchBrightnessCritic, BrightnessCritic, DiTCalls, assert_no_leaks, embeddings,
                             make_engine, tiny_decoder, tiny_model)
from spiral_rt.agents.testing import ScriptedPlanner
from spiral_rt.agents.types import FailureKind, Step, Verdict
from spiral_rt.cache import KVCacheExhausted
from spiral_rt.rl import AdvantageConfig, group_advantages
from spiral_rt.rollout import RolloutBatch, RolloutRunner, RolloutSpec
from spiral_rt.rollout.runner import verdict_signal
from spiral_rt.sampling import DanceGRPOStep, FlowGRPOStep, SelfForcingRenoise, gaussian_log_prob

F = 3
N = 4  # Self-Forcing's 4 steps (the engine's default schedule)
PLANS = [[["a fox in snow", "the fox runs", "the fox jumps"], ["a cat on a wall", "the cat sits"]]]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def vae():
    return tiny_decoder(seed=4)


def runner_for(engine, model, critic=None, plans=PLANS, **kw):
    prompts = {p for per in plans for pl in per for p in pl} | {"fox"}
    return RolloutRunner(engine, critic, prompt_embeddings=embeddings(model, prompts), **kw)


def spec(**kw):
    kw.setdefault("goals", ["fox"])
    kw.setdefault("plans", PLANS)
    kw.setdefault("num_plans", 2)
    kw.setdefault("group_size", 3)
    kw.setdefault("num_chunks", 4)
    kw.setdefault("fork_chunk", 2)
    kw.setdefault("progress", False)
    return RolloutSpec(**kw)


# ----------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("policy", [FlowGRPOStep(noise_level=0.7), DanceGRPOStep(eta=0.3)])
def test_log_probs_equal_float64_gaussian_density(model, policy):
    engine = make_engine(model, context_noise=0.05)
    batch = runner_for(engine, model).run(spec(step_policy=policy))
    M, T = batch.num_members, batch.num_transitions
    assert M == 6 and T == 2 * 3  # 2 chunks after the fork x steps 0, 1, 2 (step 3 is deterministic)
    assert batch.step.tolist() == [0, 1, 2, 0, 1, 2] and batch.chunk.tolist() == [2, 2, 2, 3, 3, 3]
    count = batch.count
    assert count == 16 * F * 4 * 6
    for t in range(T):
        coef = policy.coefficients(float(batch.sigma[t]), float(batch.sigma_next[t]))
        assert torch.equal(batch.a[:, t], coef.a.expand(M)) and torch.equal(batch.c[:, t], coef.c.expand(M))
        assert torch.equal(batch.b[:, t], coef.b.expand(M))
        for m in range(M):
            x1, mu = batch.x_next[m, t].double(), batch.mu[m, t].double()
            c = float(batch.c[m, t])
            want = -((x1 - mu) ** 2).sum() / (2 * c * c) - count * (math.log(c) + 0.5 * math.log(2 * math.pi))
            got = batch.log_prob[m, t]
            assert batch.log_prob.dtype == torch.float64
            assert abs(float(got) - float(want)) <= 1e-6 * abs(float(want)) + 1e-6, (m, t, float(got), float(want))
            # the sample really has the step's std around mu (1152 elements: a few percent)
            assert abs(float((x1 - mu).std()) / c - 1.0) < 0.1
            assert torch.allclose(batch.log_probs("mean")[m, t], got / count)
        # consecutive recorded steps chain: x of step k + 1 is x' of step k
        if t % 3 < 2:
            assert torch.equal(batch.x[:, t + 1], batch.x_next[:, t])
    # the density helper of spiral_rt.sampling agrees with the recorded values
    sq = ((batch.x_next.double() - batch.mu.double()) ** 2).flatten(2).sum(-1)
    ref = gaussian_log_prob(sq.flatten(), count, batch.c.flatten()).view(M, T)
    assert torch.allclose(batch.log_prob, ref, rtol=1e-6, atol=1e-6)
    assert_no_leaks(engine)


def test_deterministic_train_step_is_rejected(model):
    engine = make_engine(model)
    with pytest.raises(ValueError, match="train_steps"):
        runner_for(engine, model).run(spec(train_steps=(3,)))
    assert_no_leaks(engine)


# ----------------------------------------------------------------------------- replay


def test_save_load_and_replay_reproduce_exactly(model, vae, tmp_path):
    engine = make_engine(model, vae)
    critic = BrightnessCritic()
    batch = runner_for(engine, model, critic).run(spec(noise="shared_initial", seed=11, num_chunks=3, fork_chunk=1,
                                                      group_size=2))
    path = batch.save(tmp_path / "batch")
    loaded = RolloutBatch.load(path)
    for name in ("goal_index", "plan_index", "member_index", "group_index", "noise_ids", "prompt_ids", "chunk", "step",
                 "sigma", "sigma_next", "timestep", "x", "x_next", "mu", "a", "b", "c", "log_prob", "latents", "frames",
                 "rewards", "advantages", "plan_rewards", "plan_advantages"):
        a, b = getattr(batch, name), getattr(loaded, name)
        assert a is not None and torch.equal(a, b), name
    assert loaded.spec == json.loads(json.dumps(batch.spec)) and loaded.prompts == batch.prompts
    assert loaded.verdicts == batch.verdicts and loaded.count == batch.count

    fresh = make_engine(model, vae)
    again = runner_for(fresh, model).replay(loaded)
    for name in ("latents", "x", "x_next", "mu", "log_prob", "frames", "noise_ids", "prompt_ids"):
        assert torch.equal(getattr(again, name), getattr(loaded, name)), name
    assert again.rewards is None  # a replay does not re-score unless asked
    other = runner_for(fresh, model).run(RolloutSpec.from_dict(loaded.spec, seed=12, progress=False))
    assert not torch.equal(other.latents, loaded.latents)
    assert_no_leaks(engine)
    assert_no_leaks(fresh)


@pytest.mark.parametrize("schedule", ["batched", "naive"])
def test_observed_prefix_chunks_are_given_and_replayed(model, vae, schedule):
    engine = make_engine(model, vae)
    C, (h, w) = model.config.in_channels, engine.config.latent_size
    given = torch.randn(C, F, h, w, generator=torch.Generator().manual_seed(5))
    sp = spec(num_chunks=3, fork_chunk=1, observed_chunks=1, group_size=2, seed=3)
    batch = runner_for(engine, model).run(sp, observations=[given], schedule=schedule)
    for m in range(batch.latents.shape[0]):  # every member's prefix is the observation
        assert torch.equal(batch.latents[m][:, :F], given)
    assert batch.spec["observed_chunks"] == 1
    again = runner_for(make_engine(model, vae), model).replay(batch, schedule=schedule)
    assert torch.equal(again.latents, batch.latents) and torch.equal(again.log_prob, batch.log_prob)
    with pytest.raises(ValueError, match="observations"):
        runner_for(engine, model).run(sp)
    with pytest.raises(ValueError, match=r"observations\[0\]"):
        runner_for(engine, model).run(sp, observations=[given[:, :1]])
    with pytest.raises(ValueError, match="observed_chunks"):
        spec(fork_chunk=1, observed_chunks=2).validate()
    assert_no_leaks(engine)


# ----------------------------------------------------------------------------- prefix, pages, schedules


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def batch_step0(batch):
    return (batch.step == 0).nonzero().flatten()


def test_prefix_once_per_plan_shared_pages_and_memory(model):
    engine = make_engine(model)
    G, n, fork = 3, 4, 2
    seen = []
    step = engine.step

    def spy(sessions=None, noise=None, step_policy=None):
        if noise is not None and not seen:  # the first step after the fork: the group's pages as forked
            tables = [engine.cache.page_table(s.seq_id) for s in sessions]
            seen.append((len(sessions), tables, [engine.cache.refcount(p) for p in tables[0]]))
        return step(sessions, noise, step_policy)

    engine.step = spy
    calls = DiTCalls(model)
    try:
        batch = runner_for(engine, model).run(spec(group_size=G, num_chunks=n, fork_chunk=fork))
    finally:
        calls.remove()
    per_chunk = N + 1  # denoising forwards + the clean pass (none at the last chunk: nothing reads its K/V)
    plan_calls = [1] * (fork * per_chunk) + [G] * ((n - fork) * per_chunk - 1)
    assert calls.batches == plan_calls * 2  # K = 2 plans, each: prefix once (batch 1), members batched (batch G)
    size, tables, refcounts = seen[0]
    assert size == G and all(t == tables[0] for t in tables) and len(tables[0]) == fork * F
    assert refcounts == [G] * (fork * F)  # the parent closed after the fork: the G members hold every prefix page
    assert batch.stats["peak_kv_pages"] == fork * F + G * (n - fork) * F  # one prefix + G suffixes
    # every member carries the same prefix latents and frames-free batch (latents engine)
    for grp in range(2):
        sel = batch.latents[batch.group_index == grp]
        assert all(torch.equal(sel[0, :, :fork * F], s[:, :fork * F]) for s in sel)
        assert not torch.equal(sel[0, :, fork * F:], sel[1, :, fork * F:])
    assert batch.frames is None
    assert_no_leaks(engine)


def test_baseline_schedules_agree_with_batched(model):
    G, n, fork = 3, 4, 2
    out = {}
    for schedule in ("batched", "prefix_once", "naive"):
        engine = make_engine(model)
        calls = DiTCalls(model)
        try:
            out[schedule] = (runner_for(engine, model).run(spec(group_size=G, num_chunks=n, fork_chunk=fork, num_plans=1,
                                                                plans=[PLANS[0][:1]], noise="shared_except_fork"),
                                                           schedule=schedule), calls.batches)
        finally:
            calls.remove()
        assert_no_leaks(engine)
    ref, ref_calls = out["batched"]
    for schedule in ("prefix_once", "naive"):
        b, _ = out[schedule]
        # the same noise draws exactly; the rest to float rounding (a batch of G vs 1 changes GEMM blocking)
        assert torch.equal(b.x[:, batch_step0(ref)], ref.x[:, batch_step0(ref)]) and torch.equal(b.noise_ids, ref.noise_ids)
        assert torch.equal(b.latents[:, :, :fork * F], ref.latents[:, :, :fork * F])  # the prefix runs at batch 1 in all
        for name in ("latents", "x", "x_next", "mu"):
            assert rel_err(getattr(b, name), getattr(ref, name)) < 1e-5, (schedule, name)
        assert torch.allclose(b.log_prob, ref.log_prob, rtol=1e-5, atol=0), schedule
        assert b.stats["schedule"] == schedule
    per_chunk = N + 1  # a member's last chunk runs no clean pass: one call fewer per member run
    assert ref_calls == [1] * (fork * per_chunk) + [G] * ((n - fork) * per_chunk - 1)
    assert out["prefix_once"][1] == [1] * (fork * per_chunk + G * ((n - fork) * per_chunk - 1))
    assert out["naive"][1] == [1] * (G * (n * per_chunk - 1))
    assert out["naive"][0].stats["peak_kv_pages"] == n * F
    assert out["prefix_once"][0].stats["peak_kv_pages"] == n * F


def test_members_split_by_max_batch_size(model):
    engine = make_engine(model, max_batch_size=2)
    calls = DiTCalls(model)
    try:
        small = runner_for(engine, model).run(spec(group_size=3, num_plans=1, plans=[PLANS[0][:1]]))
    finally:
        calls.remove()
    assert calls.batches[2 * (N + 1):] == [2] * (N + 1) + [1] * (N + 1) + [2] * N + [1] * N  # no clean pass at the last
    big = runner_for(make_engine(model), model).run(spec(group_size=3, num_plans=1, plans=[PLANS[0][:1]]))
    assert rel_err(small.latents, big.latents) < 1e-5 and torch.allclose(small.log_prob, big.log_prob, rtol=1e-5, atol=0)


def test_concurrent_groups_give_the_same_batch_in_fewer_engine_steps(model, vae):
    """Two goals x two plans = 4 groups in waves of 3 and 1: prefixes batched per wave, every member of
    a wave in one step per chunk (max_batch_size 5 slices the wave's 9 members 5 + 4); same batch."""
    plans = [PLANS[0], [["a dog on a beach", "the dog digs"], ["a bird in a tree", "the bird flies", "it lands"]]]
    G, n, fork = 3, 4, 2
    kw = dict(goals=["fox", "dog"], plans=plans, group_size=G, num_chunks=n, fork_chunk=fork, train_steps=(0, 2))
    out = {}
    for waves in (1, 3):
        engine = make_engine(model, vae, max_batch_size=5)
        calls = DiTCalls(model)
        try:
            out[waves] = (runner_for(engine, model, BrightnessCritic(), plans).run(spec(**kw), concurrent_groups=waves),
                          calls.batches)
        finally:
            calls.remove()
        assert_no_leaks(engine)
    ref, one = out[1]
    b, three = out[3]
    per_chunk = N + 1
    # the last chunk runs no clean pass (N calls, not N + 1)
    assert three == ([3] * fork * per_chunk + ([5] * per_chunk + [4] * per_chunk) * (n - fork - 1)  # wave 1: groups 0-2
                     + [5] * N + [4] * N
                     + [1] * fork * per_chunk + [3] * ((n - fork) * per_chunk - 1))       # wave 2: group 3
    assert one == ([1] * fork * per_chunk + [3] * ((n - fork) * per_chunk - 1)) * 4
    assert b.stats["engine_steps"] < ref.stats["engine_steps"]
    for name in ("goal_index", "plan_index", "member_index", "group_index", "noise_ids", "prompt_ids", "chunk", "step"):
        assert torch.equal(getattr(b, name), getattr(ref, name)), name
    for name in ("latents", "x", "x_next", "mu"):  # batch size changes GEMM blocking: float rounding only
        assert rel_err(getattr(b, name), getattr(ref, name)) < 1e-5, name
    assert torch.allclose(b.log_prob, ref.log_prob, rtol=1e-5, atol=0)
    assert b.rewards is not None and torch.allclose(b.rewards, ref.rewards, atol=1e-3)
    with pytest.raises(ValueError, match="concurrent_groups"):
        runner_for(make_engine(model), model).run(spec(), concurrent_groups=0)
    with pytest.raises(ValueError, match="concurrent_groups"):
        runner_for(make_engine(model), model).run(spec(), schedule="naive", concurrent_groups=2)


class MeanBrightnessCritic:
    """BrightnessCritic's scores without its thread bookkeeping (a lock does not pickle)."""

    def judge(self, frames, step, memory):
        return BrightnessCritic.judge(BrightnessCritic(), frames, step, memory)


def test_critic_in_worker_processes_gives_the_threads_rewards(model, vae):
    kw = dict(group_size=2, num_plans=1, plans=[PLANS[0][:1]], num_chunks=3, fork_chunk=1)
    threads = runner_for(make_engine(model, vae), model, MeanBrightnessCritic()).run(spec(**kw))
    with runner_for(make_engine(model, vae), model, MeanBrightnessCritic(), critic_processes=2) as runner:
        first = runner.run(spec(**kw))
        pool = runner._processes
        second = runner.run(spec(**kw))
        assert pool is not None and runner._processes is pool  # the workers outlive a run
    assert runner._processes is None  # closed on exit
    assert torch.equal(first.rewards, threads.rewards) and torch.equal(second.rewards, threads.rewards)
    assert [[v["feedback"] for v in m] for m in first.verdicts] == [[v["feedback"] for v in m] for m in threads.verdicts]
    with pytest.raises(ValueError, match="critic_processes"):
        RolloutRunner(make_engine(model), critic_processes=-1)


# ----------------------------------------------------------------------------- noise policies


@pytest.mark.parametrize("noise", ["independent", "shared_initial", "shared_except_fork"])
def test_noise_policies(model, noise):
    engine = make_engine(model, context_noise=0.05)
    G, fork = 3, 1
    batch = runner_for(engine, model).run(spec(noise=noise, group_size=G, num_chunks=3, fork_chunk=fork, train_steps=(0,)))
    assert batch.chunk.tolist() == [1, 2] and batch.step.tolist() == [0, 0]
    x_t = batch.x  # (M, T, ...): step 0's input is the chunk's initial noise

    def same_within_groups(t):
        return [all(torch.equal(x_t[g * G, t], x_t[g * G + m, t]) for m in range(1, G)) for g in range(2)]

    def all_distinct(t):
        rows = [x_t[i, t] for i in range(batch.num_members)]
        return all(not torch.equal(rows[i], rows[j]) for i in range(len(rows)) for j in range(i + 1, len(rows)))

    fork_chunk, later = 0, 1
    if noise == "independent":
        assert all_distinct(fork_chunk) and all_distinct(later)
    elif noise == "shared_initial":
        assert same_within_groups(fork_chunk) == [True, True] and same_within_groups(later) == [True, True]
        assert not torch.equal(x_t[0, fork_chunk], x_t[G, fork_chunk])  # groups differ
    else:
        assert all_distinct(fork_chunk) and same_within_groups(later) == [True, True]
    # members still diverge (the SDE noise is theirs) in every policy
    assert all(not torch.equal(batch.latents[0, :, fork * F:], batch.latents[m, :, fork * F:]) for m in range(1, G))
    if noise == "independent":
        # a member equals a plain session with the same noise ids: the prefix's id, then the member's own
        spec_ = RolloutSpec.from_dict(batch.spec)
        plain = make_engine(model, context_noise=0.05, step_policy=FlowGRPOStep())
        prompts = spec_.chunk_prompts(spec_.resolved_plans()[0][1])[0]
        emb = embeddings(model, set(prompts))
        s = plain.open_session([emb[p] for p in prompts], seed=spec_.seed, noise_id=spec_.group_noise_id(1))
        chunks = [s.next_chunk()]
        s.noise_id = spec_.member_noise_id(1, 2)
        chunks += [s.next_chunk() for _ in range(2)]
        got = torch.cat(chunks, dim=1)
        assert torch.equal(got[:, :fork * F], batch.latents[G + 2, :, :fork * F])
        assert rel_err(got, batch.latents[G + 2]) < 1e-5  # batch 1 here vs G in the rollout: rounding only
        assert rel_err(got, batch.latents[G + 1]) > 1e-2
        s.close()
    assert_no_leaks(engine)


def test_branch_noise_differs_only_in_the_trained_transitions_draws(model):
    """noise="branch": a member's own id only in the slot its trained step draws (slot k + 1), in trained
    chunks; so the trained transition's input is the group's and its output the member's own."""
    engine = make_engine(model, context_noise=0.05)
    G, fork = 3, 1
    batch = runner_for(engine, model).run(spec(noise="branch", group_size=G, num_chunks=3, fork_chunk=fork,
                                               train_steps=(1,), train_chunks=(0,)))
    sp = RolloutSpec.from_dict(batch.spec)
    for row in range(batch.num_members):
        g, m = int(batch.group_index[row]), int(batch.member_index[row])
        shared, own = sp.group_noise_id(g), sp.member_noise_id(g, m)
        assert batch.noise_ids[row, 1].tolist() == [shared, shared, own] + [shared] * (N - 2)  # fork chunk, trained
        assert batch.noise_ids[row, 2].tolist() == [shared] * (N + 1)  # untrained chunk
    for g in range(2):
        rows = range(g * G, (g + 1) * G)
        assert all(torch.equal(batch.x[g * G, 0], batch.x[r, 0]) for r in rows)  # step 1's input: shared
        assert all(not torch.equal(batch.x_next[g * G, 0], batch.x_next[r, 0]) for r in rows if r != g * G)
    assert_no_leaks(engine)


# ----------------------------------------------------------------------------- rewards and advantages


def test_completed_reward_signal_is_the_mean_of_verdicts_completed(model, vae):
    engine = make_engine(model, vae)
    sp = spec(group_size=2, num_chunks=3, fork_chunk=1, reward_signal="completed")
    batch = runner_for(engine, model, BrightnessCritic()).run(sp)
    for i in range(batch.num_members):
        done = [float(v["completed"]) for v in batch.verdicts[i]]
        assert float(batch.rewards[i]) == sum(done) / len(done)
    assert batch.spec["reward_signal"] == "completed"
    with pytest.raises(ValueError, match="reward_signal"):
        spec(reward_signal="binary").validate()
    assert_no_leaks(engine)


def test_verdict_signals():
    done = Verdict(score=1.0, completed=True)
    drift = Verdict(score=0.6, completed=False, failure=FailureKind.DRIFT)
    physics = Verdict(score=0.3, completed=False, failure=FailureKind.PHYSICS)
    short = Verdict(score=0.4, completed=False, failure=FailureKind.INCOMPLETE_ACTION)
    assert [verdict_signal(v, "score") for v in (done, drift, physics, short)] == [1.0, 0.6, 0.3, 0.4]
    assert [verdict_signal(v, "completed") for v in (done, drift, physics, short)] == [1.0, 0.0, 0.0, 0.0]
    # "consistent": only the world going wrong costs reward, not an unfinished step
    assert [verdict_signal(v, "consistent") for v in (done, drift, physics, short)] == [1.0, 0.0, 0.0, 1.0]


def test_step_credit_gives_each_transition_its_plan_steps_advantage(model, vae, tmp_path):
    """credit="step": a transition's advantage is its chunk's plan step's score normalised within the group."""
    plans = [[["a fox in snow", "the fox runs", "the fox jumps", "it lands"]]]
    G, n, fork = 3, 4, 1
    engine = make_engine(model, vae)
    runner = runner_for(engine, model, BrightnessCritic(), plans)
    kw = dict(plans=plans, num_plans=1, group_size=G, num_chunks=n, fork_chunk=fork, train_steps=(0,))
    video = runner.run(spec(**kw))
    batch = runner.run(spec(credit="step", **kw))
    assert video.transition_advantages is None and batch.chunk.tolist() == [1, 2, 3]
    assert torch.equal(batch.rewards, video.rewards) and torch.equal(batch.advantages, video.advantages)
    scores = torch.tensor([[v["score"] for v in member] for member in batch.verdicts], dtype=torch.float64)  # (G, 3 steps)
    for t, chunk in enumerate(batch.chunk.tolist()):  # plan step k covers chunk k (one chunk each)
        expected = group_advantages(scores[:, chunk - fork], torch.zeros(G, dtype=torch.int64))
        torch.testing.assert_close(batch.transition_advantages[:, t], expected)
    assert not torch.allclose(batch.transition_advantages[:, 0], batch.transition_advantages[:, 2])
    again = RolloutBatch.load(batch.save(tmp_path / "b"))
    assert torch.equal(again.transition_advantages, batch.transition_advantages)
    assert RolloutSpec.from_dict(batch.spec).credit == "step"
    with pytest.raises(ValueError, match="credit"):
        runner.run(spec(credit="chunk", **kw))
    assert_no_leaks(engine)


@pytest.mark.parametrize("critic_cls", [BrightnessCritic, BatchBrightnessCritic])
def test_rewards_advantages_and_planner_jsonl(model, vae, tmp_path, critic_cls):
    engine = make_engine(model, vae)
    critic = critic_cls()
    G = 3
    batch = runner_for(engine, model, critic).run(spec(group_size=G, num_chunks=4, fork_chunk=1,
                                                       advantage=AdvantageConfig(eps=1e-12, clip=None)))
    M = batch.num_members
    assert batch.frames.shape[:2] == (M, 9 + 3 * 12) and batch.frames.dtype == torch.uint8
    # rewards = mean over the plan steps after the fork of the critic's score on that step's frames
    chunk_frames = [(0, 9), (9, 21), (21, 33), (33, 45)]
    for i in range(M):
        plan = PLANS[0][int(batch.plan_index[i])]
        steps = [min(c, len(plan) - 1) for c in range(4)]
        scores = []
        for j in sorted(set(steps[1:])):
            cs = [c for c in range(1, 4) if steps[c] == j]
            seg = batch.frames[i, chunk_frames[cs[0]][0]:chunk_frames[cs[-1]][1]]
            scores.append(float(seg.double().mean()) / 255.0)
        assert abs(float(batch.rewards[i]) - sum(scores) / len(scores)) < 1e-9
        assert len(batch.verdicts[i]) == len(scores)
    assert threading.get_ident() not in critic.threads  # judged on worker threads
    # every member's memory starts from the prefix's last frame (frame 8: the fork chunk decodes 9)
    prefix_last = [batch.frames[i, 8].numpy() for i in range(M)]
    assert len(critic.first_key_frames) == critic.calls
    assert all(any(np.array_equal(k, f) for f in prefix_last) for k in critic.first_key_frames)
    if critic_cls is BatchBrightnessCritic:
        assert critic.batch_calls == 2 + 1  # plan 0: steps 1 and 2 after the fork; plan 1: step 1
    # execution advantages: normalised within each plan's group
    for g in range(2):
        adv = batch.advantages[batch.group_index == g]
        assert abs(float(adv.mean())) < 1e-9 and abs(float(adv.std(unbiased=False)) - 1.0) < 1e-4
    want = group_advantages(batch.rewards, batch.group_index, AdvantageConfig(eps=1e-12, clip=None))
    assert torch.allclose(batch.advantages, want.double())
    assert torch.allclose(batch.plan_rewards, torch.stack([batch.rewards[:G].mean(), batch.rewards[G:].mean()]))
    assert torch.allclose(batch.plan_advantages.abs(), torch.ones(2, dtype=torch.float64), atol=1e-4)
    path = RolloutRunner.write_planner_jsonl(batch, tmp_path / "planner.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2
    for k, line in enumerate(lines):
        assert line["plan_id"] == k and line["prompt"][0]["content"] == "fox"
        assert [s["prompt"] for s in json.loads(line["completion"][0]["content"])["steps"]] == PLANS[0][k]
        assert line["execution_rewards"] == pytest.approx(batch.rewards[k * G:(k + 1) * G].tolist())
        assert line["advantage"] == pytest.approx(float(batch.plan_advantages[k]))
    assert_no_leaks(engine)


def test_plans_from_a_plan_agent(model):
    planner = ScriptedPlanner(plans=[[Step("a fox in snow", 2), Step("the fox runs", 1)], [Step("a cat on a wall", 3)]])
    engine = make_engine(model)
    batch = runner_for(engine, model).run(spec(plans=None, planner=planner, group_size=2, num_chunks=3, fork_chunk=1))
    assert [c[0] for c in planner.calls] == ["plan", "plan"]
    assert [batch.prompts[i] for i in batch.prompt_ids[0].tolist()] == ["a fox in snow", "a fox in snow", "the fox runs"]
    assert [batch.prompts[i] for i in batch.prompt_ids[2].tolist()] == ["a cat on a wall"] * 3
    assert batch.spec["plans"][0][1]["steps"][0]["span_chunks"] == 3
    assert_no_leaks(engine)


# ----------------------------------------------------------------------------- cleanup and errors


def test_pages_freed_and_policy_unchanged_after_error(model):
    engine = make_engine(model, kv_num_pages=10)  # a prefix of 6 frames + 3 x 3 frames does not fit
    before = engine.config.step_policy
    with pytest.raises(KVCacheExhausted):
        runner_for(engine, model).run(spec(group_size=3))
    assert engine.config.step_policy is before and isinstance(before, SelfForcingRenoise)
    assert_no_leaks(engine)


@pytest.mark.parametrize("field,value,match", [
    ("goals", [], "goals"), ("group_size", 0, "group_size"), ("num_plans", 3, "plans\\[0\\]"),
    ("fork_chunk", 4, "fork_chunk"), ("train_chunks", (2,), "train_chunks"), ("train_steps", (7,), "train_steps"),
    ("noise", "shared", "noise"), ("seed", -1, "seed"), ("step_policy", FlowGRPOStep(prediction="x0"), "step_policy"),
    ("reward_reduce", "max", "reward_reduce"), ("plans", [[["ok"], 3]], "plans\\[0\\]\\[1\\]"),
])
def test_spec_errors_name_the_field(model, field, value, match):
    engine = make_engine(model)
    with pytest.raises(ValueError, match=match):
        runner_for(engine, model).run(spec(**{field: value}))
    assert_no_leaks(engine)


def test_runner_argument_errors(model):
    engine = make_engine(model)
    with pytest.raises(ValueError, match="engine"):
        RolloutRunner(object())
    with pytest.raises(ValueError, match="critic"):
        RolloutRunner(engine, critic=object())
    with pytest.raises(ValueError, match="prompt_embeddings"):
        RolloutRunner(engine).run(spec())
    with pytest.raises(ValueError, match="prompt_embeddings"):
        RolloutRunner(engine, prompt_embeddings={"x": torch.zeros(2, 24)}).run(spec())
    with pytest.raises(ValueError, match="schedule"):
        runner_for(engine, model).run(spec(), schedule="fast")
    with pytest.raises(ValueError, match="uint8"):
        runner_for(engine, model, BrightnessCritic()).run(spec())
    assert_no_leaks(engine)
