"""Engine and StreamSession on the CPU (reference ops, fp32, tiny model and VAE).

- the chunk loop equals an independent loop written against the contiguous reference cache and
  explicit noise (rel. error <= 1e-5: only the attention's summation order differs);
- Philox noise: same seeds -> identical latents; another seed -> different; explicit noise equal
  to the Philox draws -> identical; batch composition does not change a session's latents (exact);
- streaming with prompt switches (+ LongLive re-cache, checked against a dense recompute), rollback,
  fork, speculation; refcounts back to zero and no page leaks after close;
- window + sink keeps pages and kept latents constant over many chunks;
- errors name the argument; a profiler trace and stage times are produced.
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import LATENT_HW, rel_err, tiny_decoder, tiny_model
from spiral_rt.cache import KVCacheExhausted, SinkWindowPolicy
from spiral_rt.engine import Engine, EngineConfig, PromptSpan
from spiral_rt.models.attention import ContiguousKVCache, DenseAttention
from spiral_rt.ops import noise_key, sampler_step

F = 3
REF = dict(attention_backend="reference", sampler_backend="reference")


def make_engine(model=None, vae=None, **kw):
    model = model or tiny_model()
    kw.setdefault("output", "latents" if vae is None else "uint8")
    kw.setdefault("kv_num_pages", 64)
    cfg = EngineConfig(latent_size=LATENT_HW, **REF, **kw)
    return Engine(model, vae, cfg)


def prompt(model, n=7):
    return torch.randn(n, model.config.text_dim)


def run_chunks(session, n):
    return [session.next_chunk() for _ in range(n)]


def assert_no_leaks(engine):
    cache = engine.cache
    cache.check_invariants()
    assert cache.num_free_pages == cache.num_pages
    assert all(cache.refcount(p) == 0 for p in range(cache.num_pages))
    assert cache.stats().num_sequences == 0 and cache.stats().num_snapshots == 0


# ----------------------------------------------------------------------------- correctness


def test_chunk_loop_equals_independent_reference_loop():
    torch.manual_seed(11)
    model = tiny_model()
    engine = make_engine(model, context_noise=0.1)
    p = prompt(model)
    session = engine.open_session(p)
    sched = engine.config.schedule
    steps = sched.num_steps
    C = model.config.in_channels
    text = model.encode_text(p[None])
    cache = ContiguousKVCache(model.config.num_layers)
    for c in range(3):
        noise = torch.randn(steps + 1, C, F, *LATENT_HW)
        got = session.next_chunk(noise=noise)
        # the loop written out by hand: x0 = x - s v, x' = (1 - s') x0 + s' eps, clean pass at sigma 0.1
        x = noise[0][None]
        for k, ((s, sn), t) in enumerate(zip(sched.transitions(), sched.model_timesteps)):
            cache.write = False
            v = model(x, torch.full((1, F), t), c * F, cache, text)
            x0 = x - s * v
            x = (1 - sn) * x0 + sn * noise[k + 1] if sn > 0 else x0
        cache.write = True
        model((0.9 * x + 0.1 * noise[steps][None]), torch.full((1, F), 100.0), c * F, cache, text)
        cache.commit()
        assert rel_err(got, x[0]) < 1e-5, c


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("cross_attn_norm", ["affine", "no_affine", None])
def test_fused_path_equals_plain_path(dtype, tol, cross_attn_norm):
    """EngineConfig.fused_ops: the DiT's fused path (ops.modulated_norm, qk_norm_rope_kv_write) gives
    the plain PyTorch path's latents; fp32 to rounding, bf16 within its precision over 4 chunks. The
    cross-attention norm: Wan's affine LayerNorm, one without weight and bias, or none."""
    from spiral_rt.models.dit import LayerNorm

    torch.manual_seed(12)
    model = tiny_model(dtype=dtype)
    for block in model.blocks:
        if cross_attn_norm == "no_affine":
            block.norm3 = LayerNorm(model.config.dim, model.config.eps, elementwise_affine=False)
        elif cross_attn_norm is None:
            block.norm3 = torch.nn.Identity()
    p = prompt(model)
    outs = []
    for fused in (False, True):
        engine = make_engine(model, fused_ops=fused, policy=SinkWindowPolicy(sink_frames=1, window_frames=3))
        s = engine.open_session(p, seed=5, noise_id=0)
        outs.append(torch.cat(run_chunks(s, 4), dim=1).float())
        s.close()
        assert_no_leaks(engine)
    assert rel_err(outs[1], outs[0]) < tol


def test_clean_pass_kv_only_leaves_the_cache_of_the_full_forward(monkeypatch):
    """The clean pass asks the DiT for its K/V alone (``kv_only``: the fused path stops after the last
    block's K/V write, no head): the latents of later chunks, which attend to those K/V at every layer,
    equal those with full forwards, exactly. (A full forward writes the cache only when every forward
    does: ``denoising_kv_from_qkv=False``.)"""
    torch.manual_seed(13)
    model = tiny_model()
    p = prompt(model)
    text = model.encode_text(p[None])
    x = torch.randn(1, model.config.in_channels, F, *LATENT_HW)
    assert model(x, torch.full((1, F), 100.0), 0, None, text, kv_only=True) is None
    runs = []
    for full in (False, True):
        if full:
            forward = type(model).forward
            monkeypatch.setattr(type(model), "forward",
                                lambda self, *a, kv_only=False, **k: forward(self, *a, **k))
        engine = make_engine(model, fused_ops=True, denoising_kv_from_qkv=not full)
        session = engine.open_session(p, seed=5)
        runs.append(run_chunks(session, 3))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_denoising_forwards_read_their_kv_from_the_projection(monkeypatch):
    """``denoising_kv_from_qkv``: the denoising forwards write nothing into the cache (k rotated in place
    into the projection's output, attention reading the chunk's K/V from there); the latents and, after
    each clean pass, the cache's live pages equal those of writing every forward's K/V, exactly. Two sessions
    of different context lengths in one batch, sink + window eviction."""
    from spiral_rt.engine import paged_context

    torch.manual_seed(15)
    model = tiny_model()
    p = prompt(model)
    calls = {"pages": 0, "in_place": 0}
    real = paged_context.qk_norm_rope_kv_write

    def counting(*args, k_out=None, **kw):
        calls["in_place" if k_out is not None else "pages"] += 1
        return real(*args, k_out=k_out, **kw)

    monkeypatch.setattr(paged_context, "qk_norm_rope_kv_write", counting)
    outs, caches = [], []
    for own in (False, True):
        engine = make_engine(model, fused_ops=True, denoising_kv_from_qkv=own,
                             policy=SinkWindowPolicy(sink_frames=1, window_frames=3))
        a = engine.open_session(p, seed=5, noise_id=0)
        a.next_chunk()
        b = engine.open_session(p, seed=6, noise_id=1)
        lat = []
        for _ in range(3):
            out = engine.step([a, b])
            lat += [out[a.session_id].latents, out[b.session_id].latents]
        outs.append(torch.cat(lat, dim=1))
        live = [q for q in range(engine.cache.num_pages) if engine.cache.refcount(q) > 0]
        caches.append(engine.cache.kv[:, :, live].clone())  # free pages hold whatever was last there
        a.close(), b.close()
        assert_no_leaks(engine)
    assert torch.equal(outs[0], outs[1]) and torch.equal(caches[0], caches[1])
    layers = model.config.num_layers
    assert calls["in_place"] > 0 and calls["in_place"] % layers == 0  # the denoising forwards of the second run


def test_last_chunk_skips_the_clean_pass_with_the_same_frames(monkeypatch):
    """A session's last chunk (``max_chunks``) runs no clean pass (nothing can attend to its K/V): one
    forward fewer, the same latents as with ``clean_pass_last_chunk=True``, exactly; a session without
    ``max_chunks``, or a batch where one session goes on, keeps every clean pass; no page leaks."""
    torch.manual_seed(14)
    model = tiny_model()
    p = prompt(model)
    forwards = {"kv_only": 0}
    forward = type(model).forward

    def counting(self, *a, kv_only=False, **k):
        forwards["kv_only"] += int(kv_only)
        return forward(self, *a, kv_only=kv_only, **k)

    monkeypatch.setattr(type(model), "forward", counting)
    runs = {}
    for keep in (True, False):
        engine = make_engine(model, clean_pass_last_chunk=keep)
        forwards["kv_only"] = 0
        a = engine.open_session(p, seed=5, noise_id=0, max_chunks=3)
        assert not a.next_is_last
        runs[keep] = run_chunks(a, 3)
        assert a.status == "finished" and forwards["kv_only"] == (3 if keep else 2)
        a.close()
        assert_no_leaks(engine)
    assert all(torch.equal(x, y) for x, y in zip(runs[True], runs[False]))

    engine = make_engine(model)
    forwards["kv_only"] = 0
    open_ended = engine.open_session(p, seed=5, noise_id=0)
    run_chunks(open_ended, 3)
    assert forwards["kv_only"] == 3 and not open_ended.next_is_last
    open_ended.close()
    # batched: one session ends at chunk 2, the other goes on, so chunk 2's clean pass runs for both
    forwards["kv_only"] = 0
    ends = engine.open_session(p, seed=5, noise_id=0, max_chunks=2)
    goes_on = engine.open_session(p, seed=6, noise_id=1, max_chunks=3)
    outs = [engine.step([ends, goes_on]) for _ in range(2)] + [engine.step([goes_on])]
    assert forwards["kv_only"] == 2 + 0  # steps 1 and 2 batched (goes_on continues), step 3 alone and last
    assert rel_err(outs[1][ends.session_id].latents, runs[True][1]) < 1e-5  # batched: fp32 rounding
    for s in (ends, goes_on):
        s.close()
    assert_no_leaks(engine)


def test_same_seed_identical_other_seed_different_explicit_equals_philox():
    torch.manual_seed(12)
    model = tiny_model()
    p = prompt(model)
    runs = []
    for seed in (5, 5, 6):
        engine = make_engine(model)
        s = engine.open_session(p, seed=seed, noise_id=3)
        runs.append(run_chunks(s, 2))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not torch.equal(runs[0][1], runs[2][1])
    # explicit noise equal to the Philox draws of (seed 5, noise id 3, chunk, step) gives the same chunk
    engine = make_engine(model)
    s = engine.open_session(p, seed=5, noise_id=3)
    shape = (1, model.config.in_channels, F, *LATENT_HW)
    zeros = torch.zeros(shape)
    for c in range(2):
        noise = torch.cat([sampler_step(zeros, zeros, 0.0, 0.0, 1.0, noise_key=noise_key(5, [3], c, k),
                                        backend="reference").x_next for k in range(5)])
        assert torch.equal(s.next_chunk(noise=noise), runs[0][c])


@pytest.mark.parametrize("context_noise", [0.0, 0.1])
def test_observed_chunk_continues_like_the_generated_one(context_noise):
    """Observing a chunk's latents writes the same K/V as generating them: the next chunks are identical."""
    torch.manual_seed(17)
    model, vae = tiny_model(), tiny_decoder()
    p = prompt(model)
    engine = make_engine(model, vae, output="float", context_noise=context_noise)
    gen = engine.open_session(p, seed=9, noise_id=4)
    first = gen.next_chunk()
    z0 = engine.sessions[0].latent_frames
    z0 = torch.stack([z0[f] for f in range(F)], dim=1)
    rest = run_chunks(gen, 2)
    obs = engine.open_session(p, seed=9, noise_id=4)
    frames = obs.observe(z0.clone())
    assert obs.chunk_index == 1 and obs.num_frames == F
    assert torch.equal(frames, first)  # decoded like a generated chunk
    for a, b in zip(run_chunks(obs, 2), rest):
        assert rel_err(a, b) <= 1e-6
    with pytest.raises(ValueError, match="'latents'"):
        obs.observe(torch.randn(2, F, *LATENT_HW))
    obs.pause()
    with pytest.raises(ValueError, match="paused"):
        obs.observe(z0)
    engine.close()
    assert_no_leaks(engine)


def test_philox_session_batched_with_an_explicit_noise_session_matches_it_alone():
    """A session without given noise draws the same Philox noise (context noise too) whether or not
    it shares the chunk with a session that brings explicit noise."""
    torch.manual_seed(17)
    model = tiny_model()
    pa, pb = prompt(model), prompt(model, 5)
    steps = make_engine(model).config.schedule.num_steps
    alone = make_engine(model, context_noise=0.1)
    b_alone = alone.open_session(pb, seed=9, noise_id=2)
    expected = [b_alone.next_chunk() for _ in range(2)]
    mixed = make_engine(model, context_noise=0.1)
    a = mixed.open_session(pa, seed=1, noise_id=1)
    b = mixed.open_session(pb, seed=9, noise_id=2)
    for c in range(2):  # chunk 1 reads the K/V written with chunk 0's context noise
        given = {a.session_id: torch.randn(steps + 1, model.config.in_channels, F, *LATENT_HW)}
        out = mixed.step(noise=given)
        assert rel_err(out[b.session_id].latents, expected[c]) < 1e-5, c


def test_batch_composition_does_not_change_latents():
    """A session's latents alone equal those batched with another session at another position."""
    torch.manual_seed(13)
    model = tiny_model()
    pa, pb = prompt(model), prompt(model, 5)
    alone = make_engine(model)
    a = alone.open_session(pa, seed=1)
    want = run_chunks(a, 3)

    engine = make_engine(model)
    b = engine.open_session(pb, seed=2)
    b.next_chunk()  # b is one chunk ahead
    a = engine.open_session(pa, seed=1, noise_id=0)  # the noise id the lone session had
    got = []
    for _ in range(3):
        out = engine.step()
        assert set(out) == {a.session_id, b.session_id}
        got.append(out[a.session_id].latents)
    # Everything the engine controls (noise, page lists, positions, attention, sampler) is per
    # sequence; the only batch dependence left is MKL's small-M sgemm blocking in the DiT's
    # time MLP (B * F rows), a few ulp. A composition bug (wrong noise, context or position) is O(1).
    assert all(rel_err(g, w) < 1e-6 for g, w in zip(got, want))


# ----------------------------------------------------------------------------- streaming scenario


def test_stream_prompt_switch_recache_rollback_fork_no_leaks():
    torch.manual_seed(14)
    model, vae = tiny_model(), tiny_decoder()
    engine = make_engine(model, vae, recache_on_switch=True)
    p1, p2, p3 = prompt(model), prompt(model, 9), prompt(model, 4)
    session = engine.open_session([PromptSpan(p1, 2), PromptSpan(p2, None)], max_chunks=5)
    frames = run_chunks(session, 2)
    assert frames[0].shape == (9, 8 * LATENT_HW[0], 8 * LATENT_HW[1], 3) and frames[0].dtype == torch.uint8
    assert frames[1].shape[0] == 12

    # chunk 2 switches to p2: the re-cache rewrites frames 0..5 with p2 before the chunk runs
    before = engine.cache.kv.clone()
    old_table = engine.cache.page_table(session.seq_id)
    snap = session.snapshot()
    first = session.next_chunk()
    table = engine.cache.page_table(session.seq_id)
    assert all(table[f] != old_table[f] for f in range(6))  # rewritten pages were copied (the snapshot holds them)
    _check_recache(engine, model, session, p2, frames=range(6))

    # rollback to chunk 2 and regenerate: identical frames (same seed), snapshot pages restored
    session.rollback(snap)
    assert session.chunk_index == 2 and engine.cache.num_frames(session.seq_id) == 6
    for f in range(6):
        page = engine.cache.page_table(session.seq_id)[f]
        assert page == old_table[f] and torch.equal(engine.cache.kv[:, :, page], before[:, :, page])
    again = session.next_chunk()
    assert torch.equal(first, again)
    session.release_snapshot(snap)

    # a live prompt switch without re-cache, then fork: parent and child continue independently
    session.set_prompt(p3, recache=False)
    child, = session.fork()
    out = engine.step()
    assert set(out) == {session.session_id, child.session_id}
    assert out[session.session_id].frames.shape == out[child.session_id].frames.shape == (12, 32, 48, 3)
    assert not torch.equal(out[session.session_id].latents, out[child.session_id].latents)  # own noise
    twin, = child.fork(share_noise=True)
    out = engine.step()
    assert session.status == "finished" and child.status == "finished" and twin.status == "finished"
    # shared noise + pages: the same latents up to fp32 rounding (two rows of one batched call; with
    # several CPU threads rows may accumulate in different orders: 1e-6 seen at unit scale)
    torch.testing.assert_close(out[child.session_id].latents, out[twin.session_id].latents, rtol=1e-5, atol=1e-5)
    for s in (session, child, twin):
        s.close()
    assert_no_leaks(engine)
    with pytest.raises(ValueError, match="closed"):
        session.next_chunk()


def _check_recache(engine, model, session, new_prompt, frames):
    """The re-cached K of the visible frames equals a dense forward over them with the new prompt at t = 0."""
    frames = list(frames)

    class Capture(DenseAttention):
        def __init__(self):
            super().__init__()
            self.k = {}

        def self_attention(self, layer, q, k, v):
            self.k[layer] = k
            return super().self_attention(layer, q, k, v)

    cap = Capture()
    x = torch.stack([session.latent_frames[f] for f in frames], dim=1)[None]
    model(x, torch.zeros(1, len(frames)), 0, cap, model.encode_text(new_prompt[None]))
    table = engine.cache.page_table(session.seq_id)
    for layer in range(model.config.num_layers):
        got = torch.cat([engine.cache.kv[layer, 0, table[f]] for f in frames])
        assert rel_err(got, cap.k[layer][0]) < 1e-5


def test_speculation_commit_and_drop():
    torch.manual_seed(15)
    model = tiny_model()
    engine = make_engine(model)
    s = engine.open_session(prompt(model))
    s.next_chunk()
    free = engine.cache.num_free_pages
    marker = s.begin_speculation()
    spec = s.next_chunk()
    assert engine.cache.num_free_pages == free - F
    s.drop_speculation(marker)
    assert engine.cache.num_free_pages == free and s.chunk_index == 1
    marker = s.begin_speculation()
    assert torch.equal(s.next_chunk(), spec)
    s.commit_speculation(marker)
    assert engine.cache.num_free_pages == free - F and s.chunk_index == 2
    s.close()
    assert_no_leaks(engine)


def test_window_sink_constant_memory():
    torch.manual_seed(16)
    model = tiny_model()
    engine = make_engine(model, policy=SinkWindowPolicy(sink_frames=3, window_frames=6), kv_num_pages=16,
                         recache_on_switch=True)
    p1, p2 = prompt(model), prompt(model)
    s = engine.open_session([PromptSpan(p1, 4), PromptSpan(p2, 4), PromptSpan(p1, None)], max_chunks=14)
    used, kept = [], []
    for _ in range(14):
        s.next_chunk()
        used.append(engine.cache.num_pages - engine.cache.num_free_pages)
        kept.append(len(s.latent_frames))
    assert used[3:] == [3 + 6 + F - (6 % F)] * 11  # sink + window (+ the last chunk's frames), constant
    assert max(kept) <= 3 + 6 + F and kept[3:] == [kept[3]] * 11
    assert s.status == "finished"
    s.close()
    assert_no_leaks(engine)


# ----------------------------------------------------------------------------- limits and errors


def test_cache_full_raises_or_waits():
    torch.manual_seed(17)
    model = tiny_model()
    engine = make_engine(model, kv_num_pages=7)
    a, b = engine.open_session(prompt(model)), engine.open_session(prompt(model))
    engine.step()  # 6 pages used
    with pytest.raises(KVCacheExhausted, match="KV cache exhausted"):
        engine.step()
    engine.close()
    assert_no_leaks(engine)
    engine = make_engine(model, kv_num_pages=9, on_cache_full="wait")
    a, b = engine.open_session(prompt(model)), engine.open_session(prompt(model))
    assert set(engine.step()) == {a.session_id, b.session_id}
    assert set(engine.step()) == {a.session_id}  # b waits: only one chunk fits
    b.close()
    assert set(engine.step()) == {a.session_id}
    engine.close()
    assert_no_leaks(engine)


@pytest.mark.parametrize("field, value", [
    ("chunk_frames", 0), ("latent_size", (4,)), ("context_noise", 1.0), ("output", "png"),
    ("on_cache_full", "crash"), ("max_batch_size", 0), ("policy", "window"), ("fused_ops", "yes"),
])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value}).validate()


def test_argument_errors():
    model = tiny_model()
    engine = make_engine(model)
    with pytest.raises(ValueError, match="text_encoder"):
        engine.open_session("a string prompt").next_chunk()
    with pytest.raises(ValueError, match="prompts"):
        engine.open_session([])
    with pytest.raises(ValueError, match="max_chunks"):
        engine.open_session(prompt(model), max_chunks=0)
    s = engine.open_session(prompt(model))
    with pytest.raises(ValueError, match="noise"):
        s.next_chunk(noise=torch.randn(2, 16, F, *LATENT_HW))
    with pytest.raises(ValueError, match="vae"):
        Engine(model, None, EngineConfig(latent_size=LATENT_HW, output="uint8", kv_num_pages=4))
    engine.close()


def test_profile_trace_and_stage_times(tmp_path):
    torch.manual_seed(18)
    model = tiny_model()
    engine = make_engine(model, timing=True)
    s = engine.open_session(prompt(model))
    path = tmp_path / "trace.json"
    with engine.profile(str(path)):
        s.next_chunk()
    trace = json.loads(path.read_text())
    assert trace["traceEvents"]
    times = engine.stage_times(reset=True)
    assert {"text", "plan", "denoise_0", "denoise_3", "clean"} <= set(times)
    assert all(v["count"] >= 1 and v["total_ms"] > 0 for v in times.values())
    assert engine.stage_times() == {}


def test_close_gives_the_kv_pool_back_and_refuses_new_sessions():
    engine = make_engine()
    s = engine.open_session(prompt(engine.model), max_chunks=2)
    engine.step([s])
    assert engine.cache.kv.numel() > 0
    engine.close()
    assert s.status == "closed" and engine.cache.kv.numel() == 0 and engine.cache.num_free_pages == engine.cache.num_pages
    engine.close()  # twice: harmless
    with pytest.raises(ValueError, match="engine is closed"):
        engine.open_session(prompt(engine.model))


def test_graph_runner_refreshes_every_plan_table():
    """A CUDA graph replay must refresh every device table a kernel reads: each tensor field of
    ChunkAttentionPlan is in the runner's list (a missing one replays the captured page ids)."""
    import dataclasses
    import typing

    from spiral_rt.engine.cuda_paths import _PLAN_TENSORS
    from spiral_rt.ops.chunk_attention import ChunkAttentionPlan

    hints = typing.get_type_hints(ChunkAttentionPlan)
    tensor_fields = {f.name for f in dataclasses.fields(ChunkAttentionPlan) if "Tensor" in str(hints[f.name])}
    assert tensor_fields == set(_PLAN_TENSORS)


def test_static_text_copies_every_field_and_refuses_a_missing_one():
    """The graphs' static text buffers: one prompt's conditioning broadcast into a batch of 3, the
    query-weighted keys included; a conditioning without those keys, which captured graphs read, is
    refused with a clear error instead of leaving stale keys behind."""
    from spiral_rt.engine.cuda_paths import _StaticText
    from spiral_rt.models.dit import TextConditioning

    def cond(weighted=True):
        ks = [torch.randn(1, 5, 2, 4) for _ in range(2)]
        return TextConditioning(context=torch.randn(1, 5, 8), cross_k=ks, cross_v=[torch.randn(1, 5, 2, 4) for _ in ks],
                                distinct_rows=torch.tensor([3], dtype=torch.int32),
                                cross_k_q_weighted=[k * 2 for k in ks] if weighted else None)

    text = cond()
    static = _StaticText(text, batch=3)
    static.fill(text)
    for got, src in zip([static.cond.context, *static.cond.cross_k, *static.cond.cross_v, *static.cond.cross_k_q_weighted],
                        [text.context, *text.cross_k, *text.cross_v, *text.cross_k_q_weighted]):
        assert torch.equal(got, src.expand_as(got))
    assert static.cond.distinct_rows.tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="lacks cross_k_q_weighted"):
        static.fill(cond(weighted=False))
