"""PagedAttentionContext: the DiT run chunk by chunk through paged K/V equals the same model
through the contiguous reference cache, the block-causal dense forward, and (with a sink + window
policy) a dense reference over the same visible frames. fp32, reference backend: relative error
<= 1e-5 (only summation order differs)."""

from __future__ import annotations

import pytest
import torch

from helpers import LATENT_HW, FrameKVReference, make_cache, rel_err, tiny_model
from spiral_rt.cache import SinkWindowPolicy, visible_context_frames
from spiral_rt.engine.paged_context import PagedAttentionContext, build_attention_plan, plan_positions
from spiral_rt.models.attention import ContiguousKVCache, DenseAttention

CHUNK = 3


def _inputs(model, num_chunks, batch=1):
    cfg = model.config
    H, W = LATENT_HW
    x = torch.randn(batch, cfg.in_channels, CHUNK * num_chunks, H, W)
    t = torch.rand(batch, CHUNK * num_chunks) * 1000
    text = model.encode_text(torch.randn(batch, 10, cfg.text_dim))
    return x, t, text


def _paged_forward(model, cache, seq_ids, x, t, text, write):
    plan = cache.plan_chunk(seq_ids, CHUNK)
    ctx = PagedAttentionContext(cache, plan, build_attention_plan(cache, plan), backend="reference")
    out = model(x, t, plan_positions(plan.device.q_frame_idx, len(seq_ids)), ctx, text)
    if write:
        cache.commit(plan)
    else:
        cache.abort(plan)
    return out


@pytest.mark.parametrize("frames_per_page", [1, 2])
def test_paged_equals_contiguous_and_block_causal(frames_per_page):
    torch.manual_seed(1)
    model = tiny_model()
    num_chunks = 3
    x, t, text = _inputs(model, num_chunks)
    dense = model(x, t, 0, DenseAttention(block_frames=CHUNK, tokens_per_frame=6), text)

    cache = make_cache(model, frames_per_page=frames_per_page)
    seq = cache.add_sequence()
    contiguous = ContiguousKVCache(model.config.num_layers)
    for c in range(num_chunks):
        sl = slice(c * CHUNK, (c + 1) * CHUNK)
        xc, tc = x[:, :, sl].contiguous(), t[:, sl]
        # a denoising-style read-only forward at another t, then the writing pass
        t_noisy = torch.rand_like(tc) * 1000
        contiguous.write = False
        ref_read = model(xc, t_noisy, c * CHUNK, contiguous, text)
        got_read = _paged_forward(model, cache, [seq], xc, t_noisy, text, write=False)
        assert rel_err(got_read, ref_read) < 1e-5
        contiguous.write = True
        ref = model(xc, tc, c * CHUNK, contiguous, text)
        contiguous.commit()
        got = _paged_forward(model, cache, [seq], xc, tc, text, write=True)
        assert rel_err(got, ref) < 1e-5
        assert rel_err(got, dense[:, :, sl]) < 1e-5
    cache.check_invariants()


def test_batched_sequences_at_different_positions():
    """Two sequences at different frame positions in one DiT call equal each run alone."""
    torch.manual_seed(2)
    model = tiny_model()
    cache = make_cache(model)
    a, b = cache.add_sequence(), cache.add_sequence()
    xa, ta, text_a = _inputs(model, 1)
    xb, tb, text_b = _inputs(model, 1)
    _paged_forward(model, cache, [a], xa, ta, text_a, write=True)  # a is one chunk ahead
    x2 = torch.randn(2, model.config.in_channels, CHUNK, *LATENT_HW)
    t2 = torch.rand(2, CHUNK) * 1000
    text2 = model.encode_text(torch.randn(2, 10, model.config.text_dim))
    both = _paged_forward(model, cache, [a, b], x2, t2, text2, write=False)
    text_a2, text_b2 = text2.rows(0, 1), text2.rows(1, 2)
    alone_a = _paged_forward(model, cache, [a], x2[:1], t2[:1], text_a2, write=False)
    alone_b = _paged_forward(model, cache, [b], x2[1:], t2[1:], text_b2, write=False)
    assert rel_err(both[:1], alone_a) < 1e-6 and rel_err(both[1:], alone_b) < 1e-6
    # and position matters: a's chunk sits at frame 3, b's at frame 0
    contiguous = ContiguousKVCache(model.config.num_layers)
    ref_b = model(x2[1:], t2[1:], 0, contiguous, text_b2)
    assert rel_err(alone_b, ref_b) < 1e-5


def test_sink_window_equals_dense_over_visible_frames():
    torch.manual_seed(3)
    model = tiny_model()
    policy = SinkWindowPolicy(sink_frames=3, window_frames=6)
    cache = make_cache(model, num_pages=16, policy=policy)
    seq = cache.add_sequence()
    ref = FrameKVReference(model.config.num_layers, 6)
    num_chunks = 6
    x, t, text = _inputs(model, num_chunks)
    for c in range(num_chunks):
        sl = slice(c * CHUNK, (c + 1) * CHUNK)
        xc, tc = x[:, :, sl].contiguous(), t[:, sl]
        visible = visible_context_frames(policy, c * CHUNK, 1)
        assert visible == cache.visible_frames(seq)
        ref.visible, ref.first_frame, ref.write = visible, c * CHUNK, True
        want = model(xc, tc, c * CHUNK, ref, text)
        got = _paged_forward(model, cache, [seq], xc, tc, text, write=True)
        assert rel_err(got, want) < 1e-5, c
    # evicted frames really are gone: only sink + window + the last chunk stay resident
    assert cache.num_pages - cache.num_free_pages == 3 + 6 + CHUNK - (6 % CHUNK)
    cache.check_invariants()


@pytest.mark.parametrize("window", [6, 4])
def test_rewrite_recomputes_the_window_over_the_kept_sink(window):
    """A rewrite plan (the engine's LongLive re-cache) recomputes the window's K/V, which attend to the
    sink's K/V as they stand and to each other, and leaves the sink's pages untouched; equals a dense
    reference run on the same frames with the sink's stored K/V as context."""
    torch.manual_seed(5)
    model = tiny_model()
    policy = SinkWindowPolicy(sink_frames=3, window_frames=window)
    cache = make_cache(model, num_pages=24, policy=policy)
    seq = cache.add_sequence()
    tpf = model.config.tokens_per_frame(*LATENT_HW)
    ref = FrameKVReference(model.config.num_layers, tpf)
    x, t, text = _inputs(model, 5)
    for c in range(5):
        sl = slice(c * CHUNK, (c + 1) * CHUNK)
        ref.visible, ref.first_frame, ref.write = visible_context_frames(policy, c * CHUNK, 1), c * CHUNK, True
        model(x[:, :, sl].contiguous(), t[:, sl], c * CHUNK, ref, text)
        _paged_forward(model, cache, [seq], x[:, :, sl].contiguous(), t[:, sl], text, write=True)
    frames = cache.rewrite_frames(seq)
    assert frames == list(range(15 - window, 15)) and cache.visible_frames(seq) == [0, 1, 2] + frames
    sink_before = cache.kv[:, :, cache.page_table(seq)[:3]].clone()
    xw = torch.randn(1, model.config.in_channels, len(frames), *LATENT_HW)
    tw, text2 = torch.zeros(1, len(frames)), model.encode_text(torch.randn(1, 10, model.config.text_dim))
    ref.visible, ref.first_frame, ref.write = [0, 1, 2], frames[0], True
    want = model(xw, tw, frames[0], ref, text2)
    plan = cache.plan_rewrite([seq])
    assert plan.host.q_frame_idx.tolist() == frames
    got = model(xw, tw, plan_positions(plan.device.q_frame_idx, 1), PagedAttentionContext(cache, plan, backend="reference"), text2)
    cache.commit(plan)
    assert rel_err(got, want) < 1e-5
    table = cache.page_table(seq)
    assert torch.equal(cache.kv[:, :, table[:3]], sink_before)
    for layer in range(model.config.num_layers):
        for f in frames:
            assert rel_err(cache.kv[layer, 0, table[f]], ref.kv[layer][f][0][0]) < 1e-5
    cache.check_invariants()


def test_context_errors():
    model = tiny_model()
    cache = make_cache(model)
    a, b = cache.add_sequence(), cache.add_sequence()
    plan = cache.plan_chunk([a, b], [3, 2])
    with pytest.raises(ValueError, match="equal lengths"):
        PagedAttentionContext(cache, plan)
    cache.abort(plan)
    plan = cache.plan_chunk([a], 3)
    ctx = PagedAttentionContext(cache, plan, backend="reference")
    q = torch.randn(1, 18, 2, 64, dtype=torch.float64)
    with pytest.raises(ValueError, match="KV pool"):
        ctx.self_attention(0, q, q, q)
    with pytest.raises(ValueError, match="sequence"):
        ctx.self_attention(0, q[:, :6].float(), q[:, :6].float(), q[:, :6].float())
    cache.abort(plan)
