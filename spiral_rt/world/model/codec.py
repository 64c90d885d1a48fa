"""PixelCodec: a fixed, exactly invertible latent codec for the bundled world's 64x64 RGB videos.

It stands in for the Wan VAE: the engine decodes every generated chunk through ``new_state`` +
``decode_chunk`` and checks ``config.z_dim`` against the DiT's channels; the trainer encodes the
rendered frames with ``encode``.

A latent frame packs a block of ``temporal_stride`` video frames and every ``spatial_stride`` x
``spatial_stride`` pixel patch into channels (space-to-depth in time and space), after an affine
per-colour-channel normalisation::

    video (B, 3, T, H, W) in [-1, 1]
      -> z = (video - background) / std                   (background grey -> 0, about unit variance)
      -> (B, 3 * t * s * s, T / t, H / s, W / s)           channel index = ((c * t + dt) * s + dy) * s + dx

With the defaults (t = 4, s = 4) a chunk of 12 video frames is 3 latent frames of (192, 16, 16),
i.e. 64 DiT tokens per latent frame with the DiT's (1, 2, 2) patch. Unlike the Wan VAE there is no
special first frame: every chunk of F latent frames decodes to t * F video frames, and a latent frame
depends on nothing else, so the streaming state carries no frames (``DecoderState.buffers`` is empty)
and chunk-by-chunk decoding equals whole-clip decoding exactly.

Reconstruction: exact. The round trip uint8 -> encode -> decode -> uint8 returns the input bit for
bit (fp32 error of the float round trip about 1e-7, PSNR > 130 dB on rendered world videos;
``tests/world/test_world_model.py`` checks >= 100 dB and exact uint8 equality). Whatever the DiT
gets wrong is therefore the DiT's error, not the codec's.

Boundaries: pure tensor reshapes and one affine map; no parameters to train or load (the config is
recorded in the world model's weights file). Shapes: video (B, 3, T, H, W) like the Wan VAE's output;
``frames_to_video`` / ``video_to_frames`` convert from / to the world's (B, T, H, W, 3) uint8.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import torch

from spiral_rt.models.vae import DecoderState

logger = logging.getLogger(__name__)

WORLD_BACKGROUND = 118.0 / 127.5 - 1.0
"""The world's flat grey background (118, 118, 118) in [-1, 1] (``spiral_rt.world.scene.BACKGROUND``)."""
WORLD_PIXEL_STD = 0.16
"""Standard deviation of rendered world pixels in [-1, 1] around the background, all channels
(measured on random goals: 0.160 / 0.140 / 0.171 for R / G / B)."""


@dataclass(frozen=True)
class PixelCodecConfig:
    """Geometry and normalisation of the pixel codec."""

    temporal_stride: int = 4
    """Video frames packed into one latent frame (the world's 12-frame chunk = 3 latent frames)."""
    spatial_stride: int = 4
    """Pixels per side of the square patch packed into one latent position (64x64 -> 16x16)."""
    image_channels: int = 3
    """Colour channels of the video."""
    shift: tuple[float, ...] = (WORLD_BACKGROUND,) * 3
    """Per colour channel, the value in [-1, 1] that maps to latent 0 (the world's background)."""
    scale: tuple[float, ...] = (WORLD_PIXEL_STD,) * 3
    """Per colour channel, the divisor that brings pixels to about unit variance."""
    name: str = field(default="world-pixel-codec", compare=False)
    """Label for logs and errors."""

    def __post_init__(self):
        for f in ("shift", "scale"):
            if isinstance(getattr(self, f), list):
                object.__setattr__(self, f, tuple(getattr(self, f)))
        for f in ("temporal_stride", "spatial_stride", "image_channels"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"PixelCodecConfig: '{f}' must be a positive int, got {v!r}")
        for f in ("shift", "scale"):
            if len(getattr(self, f)) != self.image_channels:
                raise ValueError(f"PixelCodecConfig: '{f}' needs image_channels={self.image_channels} values, "
                                 f"got {getattr(self, f)!r}")
        if any(not s > 0 for s in self.scale):
            raise ValueError(f"PixelCodecConfig: 'scale' must be positive, got {self.scale!r}")

    @property
    def z_dim(self) -> int:
        """Latent channels (the DiT's in_channels / out_channels): image_channels * t * s * s."""
        return self.image_channels * self.temporal_stride * self.spatial_stride ** 2

    def output_frames(self, latent_frames: int, first_chunk: bool = False) -> int:
        """Video frames decoded from ``latent_frames`` latent frames (no special first chunk)."""
        return self.temporal_stride * latent_frames

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "PixelCodecConfig":
        return cls(**data)


class PixelCodec:
    """Space-to-depth codec (module docstring): ``encode`` for training, ``new_state`` +
    ``decode_chunk`` for the engine's streaming decode, ``decode`` for a whole clip."""

    def __init__(self, config: PixelCodecConfig | None = None):
        self.config = config or PixelCodecConfig()
        self._affine: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _shift_scale(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device(device)
        hit = self._affine.get(device)
        if hit is None:
            cfg = self.config
            hit = tuple(torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
                        for v in (cfg.shift, cfg.scale))
            self._affine[device] = hit
        return hit

    # ------------------------------------------------------------------ encode

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) video in [-1, 1] -> (B, z_dim, T / t, H / s, W / s) fp32 latents.

        T must be a multiple of the temporal stride and H, W of the spatial stride.
        """
        cfg = self.config
        t, s = cfg.temporal_stride, cfg.spatial_stride
        if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[1] != cfg.image_channels:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"PixelCodec.encode: 'video' must be (B, {cfg.image_channels}, T, H, W), got {shape}")
        B, C, T, H, W = video.shape
        if T % t or H % s or W % s or T == 0:
            raise ValueError(f"PixelCodec.encode: 'video' (T, H, W) = ({T}, {H}, {W}) must be positive multiples of "
                             f"(temporal_stride, spatial_stride, spatial_stride) = ({t}, {s}, {s})")
        shift, scale = self._shift_scale(video.device)
        z = (video.float() - shift) / scale
        z = z.view(B, C, T // t, t, H // s, s, W // s, s).permute(0, 1, 3, 5, 7, 2, 4, 6)
        return z.reshape(B, C * t * s * s, T // t, H // s, W // s).contiguous()

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, H, W, 3) uint8 frames (the world's layout) -> latents; see ``encode``."""
        return self.encode(frames_to_video(frames))

    # ------------------------------------------------------------------ decode

    def _check(self, z: torch.Tensor, state: DecoderState | None) -> None:
        cfg = self.config
        if not isinstance(z, torch.Tensor) or z.dim() != 5 or z.shape[1] != cfg.z_dim or z.shape[2] == 0:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"PixelCodec: 'z' must be (B, {cfg.z_dim}, T >= 1, H, W) latents, got {shape}")
        if state is not None:
            if not isinstance(state, DecoderState):
                raise ValueError(f"PixelCodec: 'state' must be a DecoderState from new_state(), got {type(state).__name__}")
            if state.latent_size != tuple(z.shape[3:]):
                raise ValueError(f"PixelCodec: 'state' was made for latents {state.latent_size}, got z of (H, W) = "
                                 f"{tuple(z.shape[3:])}; make one with new_state()")

    def new_state(self, batch: int, latent_height: int, latent_width: int, device=None, dtype=None) -> DecoderState:
        """Streaming state of one batch of videos (no carried frames: every latent frame decodes alone)."""
        for name, v in (("batch", batch), ("latent_height", latent_height), ("latent_width", latent_width)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"PixelCodec.new_state: '{name}' must be a positive int, got {v!r}")
        return DecoderState(buffers=[], latent_size=(latent_height, latent_width))

    def decode_chunk(self, z: torch.Tensor, state: DecoderState, clamp: bool = True) -> torch.Tensor:
        """Decode the next chunk of a video.

        Args:
            z: (B, z_dim, F, h, w) latents (the DiT's output space) of the next F latent frames.
            state: from ``new_state``; marked started.
            clamp: clamp the frames to [-1, 1].
        Returns:
            (B, 3, t * F, s * h, s * w) fp32 frames in [-1, 1].
        """
        self._check(z, state)
        cfg = self.config
        t, s, C = cfg.temporal_stride, cfg.spatial_stride, cfg.image_channels
        B, _, F, h, w = z.shape
        x = z.float().reshape(B, C, t, s, s, F, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(B, C, F * t, h * s, w * s)
        shift, scale = self._shift_scale(z.device)
        x = x * scale + shift
        state.started = True
        return x.clamp(-1.0, 1.0) if clamp else x

    def decode(self, z: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Decode a whole clip (B, z_dim, F, h, w) -> (B, 3, t * F, s * h, s * w)."""
        self._check(z, None)
        return self.decode_chunk(z, self.new_state(z.shape[0], z.shape[3], z.shape[4]), clamp=clamp)

    def state_nbytes(self, batch: int, latent_height: int, latent_width: int, dtype=torch.bfloat16) -> int:
        """Bytes of a streaming state (none: nothing is carried)."""
        return 0


def frames_to_video(frames: torch.Tensor) -> torch.Tensor:
    """(B, T, H, W, 3) uint8 -> (B, 3, T, H, W) fp32 in [-1, 1]."""
    if not isinstance(frames, torch.Tensor) or frames.dim() != 5 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        shape = (tuple(frames.shape), frames.dtype) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"frames_to_video: 'frames' must be (B, T, H, W, 3) uint8, got {shape}")
    return frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def video_to_frames(video: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1] -> (B, T, H, W, 3) uint8 (round to nearest, as the engine does)."""
    return ((video.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()


def psnr(reference: torch.Tensor, test: torch.Tensor, peak: float = 2.0) -> float:
    """PSNR in dB of ``test`` against ``reference`` (same shape; peak-to-peak range ``peak``); inf when equal."""
    if reference.shape != test.shape:
        raise ValueError(f"psnr: 'reference' {tuple(reference.shape)} and 'test' {tuple(test.shape)} differ in shape")
    mse = (reference.double() - test.double()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(peak ** 2 / mse)).item()
