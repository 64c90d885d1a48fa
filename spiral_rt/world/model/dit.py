"""The world model's network: a CausalWanDiT that predicts clean data, and its teacher-forcing attention.

``WorldDiT`` is ``spiral_rt.models.CausalWanDiT`` unchanged (same blocks, names, KV-cache interface,
engine path) except for what its head means: the head outputs the clean latents x0 (``predict_x0``)
and ``forward`` returns the velocity the engine and the step policies expect,

    v = (x - x0_hat) / sigma,   sigma = t / 1000 per frame (clamped to >= ``SIGMA_MIN``),

so that every consumer's x0 = x - sigma v gives back x0_hat exactly. Why x0: the world codec is a
pixel codec whose DiT tokens hold 768 values (192 channels x 2 x 2) on a 384-wide residual stream;
a velocity or noise target is full-rank noise that such a stream cannot carry, while clean tokens
of this world lie on a low-dimensional manifold (flat background, a few shapes): predicting x and
converting is what makes high-dimensional pixel tokens work ("Back to Basics: Let Denoising
Generative Models Denoise", Li & He 2025). At the clean pass (t = 0) the returned velocity is
unused by the engine; the clamp only keeps it finite.

``FoldedTeacherForcing`` is the training-time ``AttentionContext``. A window of N chunks of B videos
is folded into the batch (element b * N + i is chunk i of video b) so that each chunk gets its own
prompt, timesteps and RoPE positions, and two forwards reproduce exactly what the engine computes
chunk by chunk through the KV cache:

    mode "clean":  chunk i (clean or lightly noised context) attends to clean chunks 0..i of its video
                   (block-causal); the forward's K/V of every layer are kept (with their graph)
    mode "noisy":  chunk i (noised at its sigma) attends to the kept clean K/V of chunks 0..i-1 and to
                   itself: the engine's denoising forward over the cache written by the clean passes

The gradient of the noisy loss flows into the clean forward through the kept K/V, so the model
learns what to write into the cache. ``tests/world/test_world_model.py`` checks that the noisy
forward equals running the chunks one by one through ``ContiguousKVCache``.

Boundaries: the network and its attention contexts; configs in ``world_dit_config``; no data, no
loss, no optimiser (``spiral_rt.world.model.train``), no file I/O (``spiral_rt.world.model.loader``).
"""

from __future__ import annotations

import logging

import torch

from spiral_rt.models.attention import block_causal_mask, sdpa_blhd
from spiral_rt.models.config import WanDiTConfig
from spiral_rt.models.dit import CausalWanDiT, TextConditioning

from .codec import PixelCodecConfig
from .text import MINILM_DIM, DEFAULT_MAX_LENGTH

logger = logging.getLogger(__name__)

SIGMA_MIN = 1e-3
"""Smallest sigma ``WorldDiT.forward`` divides by (the clean pass at t = 0 discards its output)."""
NUM_TRAIN_TIMESTEPS = 1000
"""Timestep scale: sigma = t / 1000 (``FlowMatchSchedule.num_train_timesteps``)."""


def world_dit_config(size: str = "world", codec: PixelCodecConfig | None = None) -> WanDiTConfig:
    """The world model's DiT architecture.

    Args:
        size: "world" (shipped model: 6 blocks, dim 384, 6 heads x 64, FFN 640, 12,051,072 parameters,
            24.1 MB in fp16/bf16) or "tiny" (2 blocks, dim 128, 2 heads x 64: CPU tests and smoke runs).
        codec: the codec whose z_dim sets the in / out channels (default ``PixelCodecConfig()``: 192).
    """
    z_dim = (codec or PixelCodecConfig()).z_dim
    common = dict(in_channels=z_dim, out_channels=z_dim, text_dim=MINILM_DIM, text_len=DEFAULT_MAX_LENGTH)
    if size == "world":
        return WanDiTConfig(num_layers=6, dim=384, num_heads=6, ffn_dim=640, freq_dim=128, name="world-pixel", **common)
    if size == "tiny":
        return WanDiTConfig(num_layers=2, dim=128, num_heads=2, ffn_dim=256, freq_dim=32, name="world-tiny", **common)
    raise ValueError(f"world_dit_config: 'size' must be 'world' or 'tiny', got {size!r}")


class WorldDiT(CausalWanDiT):
    """CausalWanDiT with an x0 head and a velocity interface (module docstring)."""

    def predict_x0(self, x: torch.Tensor, timesteps: torch.Tensor | float, frame_offset, attention, text: TextConditioning,
                   kv_only: bool = False) -> torch.Tensor | None:
        """Clean-latent prediction (B, C, F, H, W) in the model dtype; arguments as ``CausalWanDiT.forward``."""
        return super().forward(x, timesteps, frame_offset, attention, text, kv_only=kv_only)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, frame_offset, attention, text: TextConditioning,
                kv_only: bool = False) -> torch.Tensor | None:
        """Velocity (B, C, F, H, W), fp32 (or fp64 for fp64 x): (x - x0_hat) / max(t / 1000, SIGMA_MIN) per
        frame; None with ``kv_only`` (only the K/V written into ``attention``'s cache, as ``CausalWanDiT``)."""
        x0 = self.predict_x0(x, timesteps, frame_offset, attention, text, kv_only=kv_only)
        if kv_only:
            return None
        B, _, F = x.shape[:3]
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        if not isinstance(timesteps, torch.Tensor):  # one t for every frame (a tensor: the same division)
            timesteps = torch.full((B, F), float(timesteps), device=x.device)
        t = timesteps if timesteps.dim() == 2 else timesteps[:, None].expand(B, F)
        sigma = (t.to(work) / NUM_TRAIN_TIMESTEPS).clamp_min(SIGMA_MIN).view(B, 1, F, 1, 1)
        return (x.to(work) - x0.to(work)) / sigma


def build_world_dit(config: WanDiTConfig, device=None, dtype: torch.dtype | None = None) -> WorldDiT:
    """A randomly initialised WorldDiT on ``device`` (default CPU), optionally cast with ``to_dtype``."""
    with torch.device(device or "cpu"):
        model = WorldDiT(config)
    if dtype is not None:
        model.to_dtype(dtype)
    return model.eval()


class FoldedTeacherForcing:
    """Teacher-forcing attention over N chunks folded into the batch (module docstring).

    Args:
        num_chunks: N, chunks per video in the window; the forward's batch must be a multiple of N
            (b * N + i = chunk i of video b) and every chunk the same number of tokens.

    Set ``mode`` to "clean" for the context forward (it keeps its K/V), then to "noisy".
    """

    def __init__(self, num_chunks: int):
        if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
            raise ValueError(f"FoldedTeacherForcing: 'num_chunks' must be a positive int, got {num_chunks!r}")
        self.num_chunks = num_chunks
        self.mode = "clean"
        self._k: dict[int, torch.Tensor] = {}
        self._v: dict[int, torch.Tensor] = {}
        self._masks: dict[tuple, torch.Tensor] = {}

    def _mask(self, kind: str, tokens: int, device) -> torch.Tensor:
        key = (kind, tokens, str(device))
        hit = self._masks.get(key)
        if hit is None:
            n = self.num_chunks
            if kind == "clean":
                hit = block_causal_mask([1] * n, tokens, device=device)  # (N T, N T)
            else:
                # (N, 1, T, (N + 1) T): chunk i sees context chunks j < i, then its own tokens
                ctx = torch.arange(n, device=device)[None, :] < torch.arange(n, device=device)[:, None]  # (N, N)
                ctx = ctx[:, None, None, :, None].expand(n, 1, tokens, n, tokens).reshape(n, 1, tokens, n * tokens)
                own = torch.ones(n, 1, tokens, tokens, dtype=torch.bool, device=device)
                hit = torch.cat([ctx, own], dim=-1)
            self._masks[key] = hit
        return hit

    def self_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = self.num_chunks
        BN, T, H, D = q.shape
        if BN % n:
            raise ValueError(f"FoldedTeacherForcing: the forward's batch {BN} is not a multiple of num_chunks={n}")
        B = BN // n
        if self.mode == "clean":
            kk, vv = k.reshape(B, n * T, H, D), v.reshape(B, n * T, H, D)
            self._k[layer], self._v[layer] = kk, vv
            out = sdpa_blhd(q.reshape(B, n * T, H, D), kk, vv, self._mask("clean", T, q.device))
            return out.reshape(BN, T, H, D)
        if self.mode != "noisy":
            raise ValueError(f"FoldedTeacherForcing: 'mode' must be 'clean' or 'noisy', got {self.mode!r}")
        if layer not in self._k:
            raise ValueError(f"FoldedTeacherForcing: layer {layer} has no clean K/V; run the clean forward first")
        ck, cv = self._k[layer], self._v[layer]
        if ck.shape != (B, n * T, H, D):
            raise ValueError(f"FoldedTeacherForcing: clean K/V of layer {layer} are {tuple(ck.shape)}, the noisy forward "
                             f"needs {(B, n * T, H, D)}")
        ck = ck[:, None].expand(B, n, n * T, H, D).reshape(BN, n * T, H, D)
        cv = cv[:, None].expand(B, n, n * T, H, D).reshape(BN, n * T, H, D)
        mask = self._mask("noisy", T, q.device)[None].expand(B, n, 1, T, (n + 1) * T).reshape(BN, 1, T, (n + 1) * T)
        kk = torch.cat([ck, k.to(ck.dtype)], dim=1)
        vv = torch.cat([cv, v.to(cv.dtype)], dim=1)
        q_ = q.transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(q_, kk.transpose(1, 2), vv.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)

    def clear(self) -> None:
        """Drop the kept K/V (and their graph)."""
        self._k.clear()
        self._v.clear()
