"""Shared helpers of the engine tests: tiny models with random weights, caches, a frame-level
dense reference context, and error measures."""

from __future__ import annotations

import torch

from spiral_rt.cache import GlobalPolicy, KVCacheConfig, PagedKVCache
from spiral_rt.models.attention import sdpa_blhd
from spiral_rt.models.config import tiny_test
from spiral_rt.models.dit import build_dit
from spiral_rt.models.vae import build_vae_decoder, tiny_vae

LATENT_HW = (4, 6)  # latent (H, W): 2 x 3 = 6 tokens per frame with the (1, 2, 2) patch


def tiny_config(num_layers: int = 2):
    """head_dim 64 (chunk_attention supports 64 and 128), 16 latent channels for the tiny VAE."""
    return tiny_test(num_layers=num_layers, dim=128, num_heads=2, ffn_dim=96, text_dim=24, freq_dim=32, in_channels=16)


def randomize_(module: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Fresh random values for every parameter (norm weights around 1)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("gamma", "norm_q.weight", "norm_k.weight")) or (".norm" in name and name.endswith("weight")):
                p.copy_(1 + std * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
    return module


def tiny_model(num_layers: int = 2, dtype=torch.float32):
    model = randomize_(build_dit(tiny_config(num_layers)))
    return model.to_dtype(dtype) if dtype != torch.float32 else model


def tiny_decoder():
    return randomize_(build_vae_decoder(tiny_vae(base_dim=8)), std=0.05)


def make_cache(model, num_pages: int = 64, policy=None, frames_per_page: int = 1, dtype=torch.float32) -> PagedKVCache:
    cfg = model.config
    return PagedKVCache(KVCacheConfig(
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
        tokens_per_frame=cfg.tokens_per_frame(*LATENT_HW), frames_per_page=frames_per_page, num_pages=num_pages,
        dtype=dtype, device="cpu", policy=policy or GlobalPolicy(),
    ))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


class FrameKVReference:
    """Dense reference context keeping K/V per layer per frame (batch 1), attending to chosen frames.

    Set ``visible`` (context frame indices) and ``write`` before a forward; a writing forward stores
    its frames' K/V at frames ``first_frame ..``. Independent of the paged code (plain SDPA)."""

    def __init__(self, num_layers: int, tokens_per_frame: int):
        self.kv = [dict() for _ in range(num_layers)]
        self.tpf = tokens_per_frame
        self.visible: list[int] = []
        self.first_frame = 0
        self.write = False

    def self_attention(self, layer, q, k, v):
        store = self.kv[layer]
        ctx_k = [store[f][0] for f in self.visible]
        ctx_v = [store[f][1] for f in self.visible]
        if self.write:
            for i in range(k.shape[1] // self.tpf):
                sl = slice(i * self.tpf, (i + 1) * self.tpf)
                store[self.first_frame + i] = (k[:, sl].clone(), v[:, sl].clone())
        return sdpa_blhd(q, torch.cat(ctx_k + [k], 1), torch.cat(ctx_v + [v], 1))
