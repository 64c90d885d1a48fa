"""Configuration of the streaming engine (``EngineConfig``) and of a prompt schedule (``PromptSpan``).

Boundaries: plain data with validation (``ValueError`` naming the field); no tensors are created
here. The engine (``spiral_rt.engine.engine``) reads these once at construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

import torch

from spiral_rt.cache import CachePolicy, GlobalPolicy, SinkWindowPolicy
from spiral_rt.models.text import TextEmbeddings
from spiral_rt.sampling import SELF_FORCING, FlowMatchSchedule, SelfForcingRenoise, StepPolicy

Prompt = Union[str, torch.Tensor, TextEmbeddings]
"""A prompt: a string (needs the engine's text encoder), or precomputed encoder embeddings
(Lt, text_dim) / (1, Lt, text_dim), or a ``TextEmbeddings`` of batch 1."""

OutputFormat = Literal["uint8", "float", "latents"]


@dataclass
class PromptSpan:
    """One prompt of a session's schedule and how many chunks it covers."""

    prompt: Prompt
    """The prompt (see ``Prompt``)."""
    num_chunks: int | None = None
    """Chunks generated with this prompt; None: until the schedule is changed (only the last span)."""

    def __post_init__(self):
        if self.num_chunks is not None and (isinstance(self.num_chunks, bool) or not isinstance(self.num_chunks, int)
                                            or self.num_chunks < 1):
            raise ValueError(f"PromptSpan: 'num_chunks' must be a positive int or None, got {self.num_chunks!r}")
        if not isinstance(self.prompt, (str, torch.Tensor, TextEmbeddings)):
            raise ValueError(f"PromptSpan: 'prompt' must be a str, a tensor of embeddings or TextEmbeddings, "
                             f"got {type(self.prompt).__name__}")


def as_schedule(prompts) -> list[PromptSpan]:
    """A prompt, a PromptSpan, or a list of either (bare prompts cover one chunk each, the last forever)."""
    if isinstance(prompts, (str, torch.Tensor, TextEmbeddings, PromptSpan)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"'prompts' must be a prompt, a PromptSpan or a non-empty list of them, got {type(prompts).__name__}")
    spans = []
    for i, p in enumerate(prompts):
        last = i == len(prompts) - 1
        spans.append(p if isinstance(p, PromptSpan) else PromptSpan(p, None if last else 1))
    for i, s in enumerate(spans[:-1]):
        if s.num_chunks is None:
            raise ValueError(f"'prompts': span {i} has num_chunks=None but is not the last span")
    return spans


@dataclass
class EngineConfig:
    """How the engine generates, caches, decodes and measures."""

    latent_size: tuple[int, int] = (60, 104)
    """Latent (H, W) of every session (832x480 video: (60, 104))."""
    chunk_frames: int = 3
    """Latent frames per chunk (Self-Forcing / LongLive: 3, i.e. 12 video frames, 9 for the first)."""
    schedule: FlowMatchSchedule = SELF_FORCING
    """Denoising timesteps of every chunk (default: Self-Forcing's 4 steps, t = 1000, 937.5, 833.3, 625)."""
    step_policy: StepPolicy = field(default_factory=lambda: SelfForcingRenoise(prediction="velocity"))
    """How a step moves the latents (fed the model's velocity; Self-Forcing's x0 re-noise by default)."""
    context_noise: float = 0.0
    """Sigma of the clean pass that writes the chunk's K/V (0: t = 0 on the clean latents)."""
    seed: int = 0
    """Default Philox seed of new sessions; noise key = (seed, session noise id, chunk index, step)."""
    latent_dtype: torch.dtype = torch.float32
    """dtype of the latents the sampler carries between steps (the DiT runs in its own dtype)."""
    output: OutputFormat = "uint8"
    """Decoded frames as (F, H, W, 3) uint8 or float in [-1, 1], or "latents": no VAE decode."""
    recache_on_switch: bool = False
    """At a prompt switch, recompute the K/V of the visible frames with the new prompt (LongLive's re-cache):
    the window's frames, or every frame under the global policy; the attention sink keeps its K/V, as
    in LongLive's code."""
    clean_pass_last_chunk: bool = False
    """Run the clean pass for the last chunk of a session with ``max_chunks`` too. Nothing can attend to
    that chunk's K/V (the session ends with it), so by default the step skips it when every session of
    its batch is at its last chunk: one forward of the chunk's N + 1 (its pages then hold the last
    denoising step's K/V); the frames are the same either way."""
    policy: CachePolicy = field(default_factory=GlobalPolicy)
    """Default cache policy of new sessions (GlobalPolicy, or SinkWindowPolicy for constant memory)."""
    kv_memory_bytes: int | None = None
    """Bytes of the KV pool; None with ``kv_num_pages`` None: 40% of free device memory (CUDA) or 256 MiB."""
    kv_num_pages: int | None = None
    """Explicit KV page count (wins over ``kv_memory_bytes``)."""
    frames_per_page: int = 1
    """Latent frames per KV page."""
    max_batch_size: int = 8
    """Most sessions batched into one DiT call; more ready sessions run in further calls of the same step."""
    on_cache_full: Literal["raise", "wait"] = "raise"
    """When the pool cannot hold a step's chunks: raise ``KVCacheExhausted``, or run the sessions that fit
    and let the others wait for a later step (an error still when not even one fits)."""
    attention_backend: str | None = None
    """Backend of ``chunk_attention`` and ``qk_norm_rope_kv_write`` ("reference", "triton"; None: the
    fastest for the device)."""
    fused_ops: bool = True
    """Run the DiT's fused path (adaLN, residual adds, qk-norm, RoPE and the K/V write through
    ``spiral_rt.ops``); False: the model's plain PyTorch path (the readable reference)."""
    denoising_kv_from_qkv: bool = True
    """Fused path: the denoising forwards leave the KV cache alone and their attention reads the
    chunk's own K/V from the QKV projection's output (the clean pass writes them, as every later chunk
    reads them); needs the cuda or reference attention backend and one frame a page. False: every
    forward writes its K/V into the cache first."""
    sampler_backend: str | None = None
    """Backend of ``sampler_step`` ("reference", "triton", "cuda"; None: the fastest)."""
    cuda_graphs: bool = False
    """CUDA only: replay each chunk's whole forward sequence (steps + clean pass) from a CUDA graph, one
    per context-length bucket (captured the second time a bucket is met; Philox noise only)."""
    vae_side_stream: bool = True
    """CUDA only: decode on a second stream, beside the next chunk's DiT work. On an H100 the two do not
    overlap in time (each fills the GPU): one stream measured the same within 0.7% (bench/NOTES.md,
    session 23)."""
    timing: bool = False
    """Record per-stage times (CUDA events / perf_counter); read with ``Engine.stage_times()``."""
    device: torch.device | str | None = None
    """Where everything runs; None: the model's device."""

    def validate(self) -> None:
        if (not isinstance(self.latent_size, (tuple, list)) or len(self.latent_size) != 2
                or any(not isinstance(v, int) or v < 1 for v in self.latent_size)):
            raise ValueError(f"EngineConfig: 'latent_size' must be (H, W) positive ints, got {self.latent_size!r}")
        self.latent_size = tuple(self.latent_size)
        for name in ("chunk_frames", "max_batch_size", "frames_per_page"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"EngineConfig: '{name}' must be a positive int, got {v!r}")
        for name in ("fused_ops", "denoising_kv_from_qkv", "cuda_graphs", "vae_side_stream", "timing", "recache_on_switch", "clean_pass_last_chunk"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"EngineConfig: '{name}' must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.schedule, FlowMatchSchedule):
            raise ValueError(f"EngineConfig: 'schedule' must be a FlowMatchSchedule, got {type(self.schedule).__name__}")
        if not isinstance(self.step_policy, StepPolicy):
            raise ValueError(f"EngineConfig: 'step_policy' must be a StepPolicy, got {type(self.step_policy).__name__}")
        if not (isinstance(self.context_noise, (int, float)) and 0.0 <= self.context_noise < 1.0):
            raise ValueError(f"EngineConfig: 'context_noise' must be a sigma in [0, 1), got {self.context_noise!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise ValueError(f"EngineConfig: 'seed' must be an int in [0, 2**64), got {self.seed!r}")
        if self.output not in ("uint8", "float", "latents"):
            raise ValueError(f"EngineConfig: 'output' must be 'uint8', 'float' or 'latents', got {self.output!r}")
        if self.on_cache_full not in ("raise", "wait"):
            raise ValueError(f"EngineConfig: 'on_cache_full' must be 'raise' or 'wait', got {self.on_cache_full!r}")
        if not isinstance(self.policy, (GlobalPolicy, SinkWindowPolicy)):
            raise ValueError(f"EngineConfig: 'policy' must be GlobalPolicy or SinkWindowPolicy, got {type(self.policy).__name__}")
        if self.latent_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"EngineConfig: 'latent_dtype' must be float32, bfloat16 or float16, got {self.latent_dtype}")
