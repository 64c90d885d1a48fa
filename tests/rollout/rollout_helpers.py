"""Shared helpers of the rollout tests: a tiny CPU engine (random weights, reference ops), prompt
embeddings, critics with known behaviour, and a DiT call counter."""

from __future__ import annotations

import threading
import zlib

import numpy as np
import torch

from spiral_rt.agents.types import Verdict
from spiral_rt.engine import Engine, EngineConfig
from spiral_rt.models.config import tiny_test
from spiral_rt.models.dit import build_dit
from spiral_rt.models.vae import build_vae_decoder, tiny_vae

LATENT_HW = (4, 6)
REF = dict(attention_backend="reference", sampler_backend="reference")


def randomize_(module: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if name.endswith(("gamma", "norm_q.weight", "norm_k.weight")) or (".norm" in name and name.endswith("weight")):
                p.copy_(1 + std * r)
            else:
                p.copy_(std * r)
    return module


def tiny_model(seed: int = 0):
    cfg = tiny_test(num_layers=2, dim=128, num_heads=2, ffn_dim=96, text_dim=24, freq_dim=32, in_channels=16)
    return randomize_(build_dit(cfg), seed=seed)


def tiny_decoder(seed: int = 1):
    return randomize_(build_vae_decoder(tiny_vae(base_dim=8)), std=0.05, seed=seed)


def make_engine(model, vae=None, **kw) -> Engine:
    kw.setdefault("output", "latents" if vae is None else "uint8")
    kw.setdefault("kv_num_pages", 96)
    return Engine(model, vae, EngineConfig(latent_size=LATENT_HW, **REF, **kw))


def embeddings(model, prompts, n: int = 5) -> dict[str, torch.Tensor]:
    """Deterministic (n, text_dim) embeddings per prompt string."""
    out = {}
    for p in prompts:
        g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
        out[p] = torch.randn(n, model.config.text_dim, generator=g)
    return out


class BrightnessCritic:
    """Score = mean brightness of the segment (a deterministic function of the frames); records threads."""

    def __init__(self):
        self.threads: set[int] = set()
        self.calls = 0
        self.first_key_frames: list[np.ndarray] = []  # the memory's first key frame at every call
        self._lock = threading.Lock()

    def judge(self, frames: np.ndarray, step, memory) -> Verdict:
        assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3
        with self._lock:
            self.threads.add(threading.get_ident())
            self.calls += 1
            if memory.key_frames:
                self.first_key_frames.append(memory.key_frames[0].copy())
        return Verdict(score=float(frames.mean()) / 255.0, completed=True, feedback=f"{step.prompt}")


class BatchBrightnessCritic(BrightnessCritic):
    """The same scores through ``judge_batch`` (one call per plan step for a whole group)."""

    def __init__(self):
        super().__init__()
        self.batch_calls = 0

    def judge_batch(self, frames_list, steps, memories):
        with self._lock:
            self.batch_calls += 1
        return [BrightnessCritic.judge(self, f, s, m) for f, s, m in zip(frames_list, steps, memories)]


class DiTCalls:
    """Counts the DiT's forward calls and their batch sizes (a forward hook)."""

    def __init__(self, model):
        self.batches: list[int] = []
        self._h = model.register_forward_hook(lambda mod, args, out: self.batches.append(int(args[0].shape[0])))

    def remove(self):
        self._h.remove()


def assert_no_leaks(engine):
    cache = engine.cache
    cache.check_invariants()
    assert cache.num_free_pages == cache.num_pages
    assert all(cache.refcount(p) == 0 for p in range(cache.num_pages))
    assert cache.stats().num_sequences == 0 and cache.stats().num_snapshots == 0
    assert not engine.sessions
