"""The closed loop driving the real engine (EngineGenerator) on the CPU: tiny random-weight DiT and VAE,
reference ops, scripted agents.

- rejection -> rollback -> regeneration: the regenerated segment differs from the rejected one, the
  kept video has the right length and equals a straight run of the accepted segments on a fresh
  engine (the rollback left no trace in the KV pages or the decoder state); afterwards every page is
  free or held once by the session, and after close the cache is empty with zero refcounts;
- a replan: the replanned step replaces the failed one in the video;
- a speculative segment dropped after a rejection (its pages freed, nothing of it in the video);
- replay: the same seeds give identical frames, another seed different ones;
- the adapter itself: seed and prompt semantics, re-cache option, contract checks, argument errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spiral_rt.agents import trace as tr
from spiral_rt.agents.loop import ClosedLoop, LoopConfig
from spiral_rt.agents.protocols import Generator
from spiral_rt.agents.testing import ScriptedCritic, ScriptedPlanner, accept, reject
from spiral_rt.agents.types import FailureKind, Goal, Step
from spiral_rt.engine import Engine, EngineConfig
from spiral_rt.engine.generator import EngineGenerator, EngineGeneratorConfig, HashTextEncoder
from spiral_rt.models.config import tiny_test
from spiral_rt.models.dit import build_dit
from spiral_rt.models.vae import build_vae_decoder, tiny_vae

LATENT_HW = (4, 4)  # 2 x 2 tokens per frame; 32 x 32 video frames through the tiny VAE
NOISE_ID = 7
A, B, C = "move the red circle left", "make the red circle blue", "grow the blue circle"


def _randomize(module: torch.nn.Module, std: float) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in module.named_parameters():
            norm = name.endswith(("gamma", "norm_q.weight", "norm_k.weight")) or (".norm" in name and name.endswith("weight"))
            p.copy_((1 + std * torch.randn_like(p)) if norm else std * torch.randn_like(p))
    return module


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(1234)
    cfg = tiny_test(num_layers=2, dim=128, num_heads=2, ffn_dim=96, text_dim=24, freq_dim=32, in_channels=16)
    model = _randomize(build_dit(cfg), 0.1).eval()
    vae = _randomize(build_vae_decoder(tiny_vae(base_dim=8)), 0.05).eval()
    return model, vae


def make_engine(weights, **kw) -> Engine:
    model, vae = weights
    kw.setdefault("kv_num_pages", 48)
    cfg = EngineConfig(latent_size=LATENT_HW, attention_backend="reference", sampler_backend="reference", **kw)
    return Engine(model, vae, cfg, text_encoder=HashTextEncoder(model.config.text_dim, model.config.text_len))


def make_generator(weights, config=None, **kw) -> EngineGenerator:
    return EngineGenerator(make_engine(weights, **kw), config, noise_id=NOISE_ID)


def frames_of(weights, chunks: int) -> int:
    vae_cfg = weights[1].config
    return sum(vae_cfg.output_frames(3, first_chunk=(c == 0)) for c in range(chunks))


class RecordingCritic(ScriptedCritic):
    """ScriptedCritic that also keeps a copy of every segment it judged, in call order."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.segments: list[tuple[int, np.ndarray]] = []

    def judge(self, frames, step, memory):
        with self._lock:
            self.segments.append((step.index, frames.copy()))
        return super().judge(frames, step, memory)


def run_loop(gen, steps, critic, replans=None, **cfg):
    planner = ScriptedPlanner([list(steps)], replans)
    cfg.setdefault("critic_timeout_s", 60.0)
    result = ClosedLoop(gen, planner, critic, LoopConfig(**cfg)).run(Goal("circle left, then blue"))
    assert result.trace.error is None, result.trace.error
    return result


def decisions(result):
    return [(a.step_index, a.attempt, a.decision) for a in result.trace.attempts]


def straight_run(weights, segments) -> np.ndarray:
    """The video a fresh engine makes from ``segments`` = [(prompt, span, seed)] without any rollback."""
    gen = make_generator(weights)
    video = np.concatenate([gen.generate(p, n, s) for p, n, s in segments])
    gen.close()
    return video


def kept_segments(result):
    return [(a.prompt, a.span_chunks, a.seed) for a in result.trace.attempts
            if a.decision in (tr.ACCEPTED, tr.KEPT)]


def assert_only_session_pages(gen: EngineGenerator):
    cache = gen.engine.cache
    cache.check_invariants()
    assert gen.live_snapshots == 0 and cache.stats().num_snapshots == 0
    table = set(cache.page_table(gen.session.seq_id))
    assert cache.num_free_pages == cache.num_pages - len(table)
    assert all(cache.refcount(p) == 1 for p in table)
    assert all(cache.refcount(p) == 0 for p in range(cache.num_pages) if p not in table)


def assert_empty_after_close(gen: EngineGenerator):
    gen.close()
    cache = gen.engine.cache
    cache.check_invariants()
    assert gen.session.status == "closed"
    assert cache.num_free_pages == cache.num_pages
    assert all(cache.refcount(p) == 0 for p in range(cache.num_pages))
    assert cache.stats().num_sequences == 0 and cache.stats().num_snapshots == 0


# ----------------------------------------------------------------------------- the loop over the engine


def test_engine_generator_satisfies_the_protocol(weights):
    gen = make_generator(weights)
    assert isinstance(gen, Generator)
    gen.close()


def test_rejection_rolls_back_and_regenerates_a_different_segment(weights):
    gen = make_generator(weights)
    critic = RecordingCritic({A: [reject("the circle did not move", FailureKind.INCOMPLETE_ACTION)]})
    result = run_loop(gen, [Step(A, 1), Step(B, 2)], critic, speculate=False, max_retries=2)
    assert decisions(result) == [(0, 1, tr.RETRY), (0, 2, tr.ACCEPTED), (1, 1, tr.ACCEPTED)]
    assert result.trace.counters["rollbacks"] == 1 and result.trace.counters["retries"] == 1
    (i0, rejected), (i1, regenerated), (i2, _) = critic.segments
    assert (i0, i1, i2) == (0, 0, 1)
    # the retry uses a refined prompt and a new seed; its frames are not the rejected ones
    a1, a2 = result.trace.attempts[:2]
    assert a1.seed != a2.seed and a2.prompt == f"{A}. the circle did not move"
    assert rejected.shape == regenerated.shape == (frames_of(weights, 1), 32, 32, 3)
    assert np.mean(rejected != regenerated) > 0.5
    # the kept video: the regenerated segment then step 1's, 1 + 2 chunks of frames
    assert result.video.shape == (frames_of(weights, 3), 32, 32, 3) and result.video.dtype == np.uint8
    np.testing.assert_array_equal(result.video[: len(regenerated)], regenerated)
    # the rollback left no trace: a fresh engine running only the kept segments gives the same video
    np.testing.assert_array_equal(result.video, straight_run(weights, kept_segments(result)))
    assert_only_session_pages(gen)
    assert gen.session.chunk_index == 3
    assert_empty_after_close(gen)


def test_replan_replaces_the_failed_step(weights):
    gen = make_generator(weights)
    critic = RecordingCritic({B: [reject("it stayed red", FailureKind.WRONG_ACTION, score=0.1)] * 2})
    result = run_loop(gen, [Step(A, 1), Step(B, 1)], critic, replans=[[Step(C, 1)]], speculate=False,
                      max_retries=1, max_replans=1)
    assert decisions(result) == [(0, 1, tr.ACCEPTED), (1, 1, tr.RETRY), (1, 2, tr.REPLAN), (2, 1, tr.ACCEPTED)]
    t = result.trace
    assert t.counters["replans"] == 1 and len(t.replans) == 1 and t.replans[0].reason == "retries_exhausted"
    assert [s.prompt for s in t.executed_steps] == [A, C]
    assert result.video.shape[0] == frames_of(weights, 2)
    np.testing.assert_array_equal(result.video, straight_run(weights, kept_segments(result)))
    assert_only_session_pages(gen)
    assert_empty_after_close(gen)


def test_speculative_segment_dropped_after_rejection(weights):
    gen = make_generator(weights)
    critic = RecordingCritic({A: [reject("the circle moved right instead of left", FailureKind.WRONG_ACTION)]})
    result = run_loop(gen, [Step(A, 1), Step(B, 1)], critic, speculate=True, max_retries=1)
    t = result.trace
    assert decisions(result) == [(0, 1, tr.RETRY), (1, 1, tr.DROPPED), (0, 2, tr.ACCEPTED), (1, 1, tr.ACCEPTED)]
    assert [a.speculative for a in t.attempts] == [False, True, False, True]
    assert t.counters["speculations"] == 2 and t.counters["speculations_dropped"] == 1
    assert t.counters["speculations_committed"] == 1
    # 1 + 1 chunks dropped (rolled back / speculative), 2 kept: 4 chunks generated in all
    assert gen.chunks_generated == 4 and gen.session.chunk_index == 2
    np.testing.assert_array_equal(result.video, straight_run(weights, kept_segments(result)))
    assert_only_session_pages(gen)
    assert_empty_after_close(gen)


def test_replay_same_seeds_identical_other_seed_different(weights):
    videos = []
    for seed in (3, 3, 4):
        gen = make_generator(weights)
        result = run_loop(gen, [Step(A, 1), Step(B, 1)], ScriptedCritic(default=accept()), seed=seed)
        videos.append((result.video, [a.seed for a in result.trace.attempts]))
        assert_empty_after_close(gen)
    (v0, s0), (v1, s1), (v2, s2) = videos
    assert s0 == s1 and s0 != s2
    np.testing.assert_array_equal(v0, v1)
    assert v0.shape == v2.shape and np.mean(v0 != v2) > 0.5


# ----------------------------------------------------------------------------- the adapter


def test_seed_and_prompt_semantics_and_recache_option(weights):
    gen = make_generator(weights)
    gen.generate(A, 1, 11)
    snap = gen.snapshot()
    first = gen.generate(B, 1, 5)
    gen.rollback(snap)
    assert np.array_equal(gen.generate(B, 1, 5), first)  # same seed and prompt at the same position: replay
    gen.rollback(snap)
    assert np.mean(gen.generate(B, 1, 6) != first) > 0.5  # a new seed: new noise
    gen.rollback(snap)
    assert not np.array_equal(gen.generate(C, 1, 5), first)  # another prompt
    gen.release_snapshot(snap)
    assert_empty_after_close(gen)
    # re-cache at the prompt switch recomputes the context's K/V: the next segment changes
    regen = make_generator(weights, EngineGeneratorConfig(recache=True))
    regen.generate(A, 1, 11)
    assert not np.array_equal(regen.generate(B, 1, 5), first)
    assert_empty_after_close(regen)


def test_observed_start_continues_like_the_generated_one(weights):
    gen = make_generator(weights)
    first = gen.generate(A, 1, 11)
    s = gen.session
    z = torch.stack([s.latent_frames[f] for f in range(3)], dim=1)
    after = gen.generate(B, 2, 5)
    obs = make_generator(weights)
    assert np.array_equal(obs.observe(A, z), first)  # decoded like the generated chunk
    assert obs.session.status == "paused" and obs.session.chunk_index == 1
    assert np.array_equal(obs.generate(B, 2, 5), after)  # and continued from identical K/V
    with pytest.raises(ValueError, match="'latents'"):
        obs.observe(A, z[:, :2])
    with pytest.raises(ValueError, match="'prompt'"):
        obs.observe(" ", z)
    assert_empty_after_close(gen)
    assert_empty_after_close(obs)


def test_session_paused_between_segments_and_borrowed_session_left_open(weights):
    engine = make_engine(weights)
    session = engine.open_session(A, seed=1)
    gen = EngineGenerator(engine, session=session)
    gen.generate(A, 1, 2)
    assert session.status == "paused"
    assert engine.step() == {}  # nobody else's step advances the loop's session
    gen.close()
    assert session.status == "paused" and session.chunk_index == 1  # borrowed: not closed by the generator
    session.close()
    engine.cache.check_invariants()
    assert engine.cache.num_free_pages == engine.cache.num_pages


def test_contract_misuse_and_argument_errors(weights):
    gen = make_generator(weights, EngineGeneratorConfig(max_span_chunks=2))
    with pytest.raises(ValueError, match="'prompt'"):
        gen.generate("  ", 1, 0)
    with pytest.raises(ValueError, match="'span_chunks'"):
        gen.generate(A, 0, 0)
    with pytest.raises(ValueError, match="max_span_chunks"):
        gen.generate(A, 3, 0)
    with pytest.raises(ValueError, match="'seed'"):
        gen.generate(A, 1, -1)
    snap = gen.snapshot()
    token = gen.start_speculation()
    with pytest.raises(RuntimeError, match="speculation is already open"):
        gen.start_speculation()
    with pytest.raises(RuntimeError, match="speculation is open"):
        gen.snapshot()
    with pytest.raises(RuntimeError, match="speculation is open"):
        gen.rollback(snap)
    with pytest.raises(ValueError, match="'token'"):
        gen.commit_speculation(snap)
    spec = gen.generate(A, 1, 0)
    gen.drop_speculation(token)
    assert gen.session.chunk_index == 0
    with pytest.raises(RuntimeError, match="no speculation is open"):
        gen.drop_speculation(token)
    assert np.array_equal(gen.generate(A, 1, 0), spec)  # dropping restored the exact start state
    gen.release_snapshot(snap)
    with pytest.raises(ValueError, match="'token'"):
        gen.rollback(snap)  # released
    assert_empty_after_close(gen)
    with pytest.raises(RuntimeError, match="closed"):
        gen.generate(A, 1, 0)
    with pytest.raises(ValueError, match="'engine'"):
        EngineGenerator(object())
    with pytest.raises(ValueError, match="'output'|latents"):
        EngineGenerator(make_engine(weights, output="latents"))
    with pytest.raises(ValueError, match="'recache'"):
        EngineGenerator(make_engine(weights), EngineGeneratorConfig(recache="yes"))


def test_hash_text_encoder_is_deterministic():
    enc = HashTextEncoder(dim=24, max_length=8)
    a, b = enc.encode([A, A.upper()]), enc.encode([B])
    assert a.embeddings.shape == (2, 8, 24) and a.mask[0].sum() == 5
    assert torch.equal(a.embeddings[0], a.embeddings[1])  # case-insensitive tokens
    assert not torch.equal(a.embeddings[0], b.embeddings[0])
    assert torch.all(a.embeddings[0, 5:] == 0)
    with pytest.raises(ValueError, match="'prompts'"):
        enc.encode(A)
    with pytest.raises(ValueError, match="'dim'"):
        HashTextEncoder(dim=0)
