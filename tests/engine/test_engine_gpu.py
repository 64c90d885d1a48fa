"""GPU tests of the engine (``pytest -m gpu`` on the H100 machine).

- the optimised path (fused DiT path, Triton chunk attention, CUDA/Triton sampler step, CUDA graphs, side-stream
  VAE) equals the reference path (reference ops, eager) on the same weights and Philox noise:
  relative L2 of the final latents over 7 chunks in bf16 <= 1e-2, for the global and the sink +
  window policy, for the eager run, the capturing run and the replaying runs;
- graph replays follow in-place weight updates of the time tables' parameters;
- side-stream decode gives the same frames as decoding on the main stream;
- the steady chunk loop makes no host synchronisation (``torch.cuda.set_sync_debug_mode("error")``).
"""

from __future__ import annotations

import pytest
import torch

from spiral_rt.cache import GlobalPolicy, SinkWindowPolicy
from spiral_rt.engine import Engine, EngineConfig
from spiral_rt.models.config import tiny_test
from spiral_rt.models.dit import build_dit
from spiral_rt.models.vae import build_vae_decoder, tiny_vae

pytestmark = pytest.mark.gpu

LATENT_HW = (16, 24)  # 96 tokens per frame
CHUNKS = 7


def _model():
    cfg = tiny_test(num_layers=4, dim=256, num_heads=2, ffn_dim=512, text_dim=64, freq_dim=64, in_channels=16)
    return build_dit(cfg, device="cuda", dtype=torch.bfloat16)


def _engine(model, vae=None, optimised=True, policy=None, **kw):
    cfg = EngineConfig(
        latent_size=LATENT_HW, output="latents" if vae is None else "uint8", kv_num_pages=256,
        policy=policy or GlobalPolicy(),
        attention_backend=None if optimised else "reference", sampler_backend=None if optimised else "reference",
        cuda_graphs=optimised, vae_side_stream=optimised, fused_ops=optimised, **kw,
    )
    return Engine(model, vae, cfg)


def _video(engine, prompt, seed=7):
    s = engine.open_session(prompt, seed=seed, noise_id=0, max_chunks=CHUNKS)
    lat = torch.cat([s.next_chunk() for _ in range(CHUNKS)], dim=1)
    s.close()
    return lat.float()


@pytest.mark.parametrize("policy", [GlobalPolicy(), SinkWindowPolicy(sink_frames=3, window_frames=6)])
def test_optimised_equals_reference_bf16(policy):
    torch.manual_seed(0)
    model = _model()
    prompt = torch.randn(12, model.config.text_dim, device="cuda")
    ref = _video(_engine(model, optimised=False, policy=policy), prompt)
    fast = _engine(model, optimised=True, policy=policy)
    for attempt in range(3):  # eager buckets, capturing run, replays
        got = _video(fast, prompt)
        err = ((got - ref).norm() / ref.norm()).item()
        assert err <= 1e-2, (attempt, err)
    assert fast._graphs.num_captures >= 1 and fast._graphs.num_replays >= 1
    assert fast.cache.num_free_pages == fast.cache.num_pages


def test_graph_replays_follow_in_place_weight_updates():
    """The captured chunk graphs read the DiT's per-t time tables; an optimizer-style in-place update of
    the modulation tables and time MLP must reach the replays (refreshed before each replay)."""
    torch.manual_seed(3)
    with torch.inference_mode(False):  # weights with version counters, as a trainer's are
        model = _model()
    prompt = torch.randn(12, model.config.text_dim, device="cuda")
    fast = _engine(model, optimised=True)
    for _ in range(3):  # eager buckets, capturing run, replays
        before = _video(fast, prompt)
    assert model._time_tables  # the graphs read kept tables
    with torch.inference_mode(False), torch.no_grad():
        for block in model.blocks:
            block.modulation.add_(0.2)
        model.time_projection[1].bias.mul_(-1.0)
    got = _video(fast, prompt)
    ref = _video(_engine(model, optimised=False), prompt)
    err = ((got - ref).norm() / ref.norm()).item()
    moved = ((before - ref).norm() / ref.norm()).item()
    assert err <= 1e-2 and moved > 10 * err, (err, moved)
    assert fast._graphs.num_replays >= 1


@pytest.mark.parametrize("graphs", [False, True])
def test_side_stream_decode_equals_main_stream(graphs):
    """The same frames with the decode on the caller's stream and on the side stream (twice: a second
    engine's graph captures while the first, dropped without ``close()``, awaits the cyclic GC),
    through a rollback and a fork, eagerly and with CUDA graphs."""
    torch.manual_seed(1)
    model = _model()
    vae = build_vae_decoder(tiny_vae(base_dim=16), device="cuda", dtype=torch.bfloat16)
    prompt = torch.randn(12, model.config.text_dim, device="cuda")
    runs = []
    for side in (False, True, True):
        engine = Engine(model, vae, EngineConfig(latent_size=LATENT_HW, kv_num_pages=64, vae_side_stream=side,
                                                 cuda_graphs=graphs))
        s = engine.open_session(prompt, seed=3, noise_id=0)
        frames = [s.next_chunk() for _ in range(2)]
        snap = s.snapshot()
        frames.append(s.next_chunk())
        s.rollback(snap)
        twin = s.fork(1, share_noise=True)[0]
        for _ in range(3):
            frames += [s.next_chunk(), twin.next_chunk()]
        runs.append(frames)
    for a, b, c in zip(*runs):
        assert a.dtype == torch.uint8 and torch.equal(a, b) and torch.equal(a, c)


def test_no_host_sync_in_steady_chunk_loop():
    torch.manual_seed(2)
    model = _model()
    vae = build_vae_decoder(tiny_vae(base_dim=16), device="cuda", dtype=torch.bfloat16)
    engine = Engine(model, vae, EngineConfig(latent_size=LATENT_HW, kv_num_pages=64))
    s = engine.open_session(torch.randn(12, model.config.text_dim, device="cuda"))
    s.next_chunk()  # first chunk: text encoding, kernel compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
