"""Model configurations: the Wan2.1 causal DiT (``WanDiTConfig``) and its presets.

A config describes an architecture only (sizes, activations, norms); it holds no weights and no
runtime choices (dtype, device, attention backend). ``WanDiTConfig.validate()`` runs on
construction and raises ``ValueError`` naming the field and why it is inconsistent.

Presets:

- ``wan21_t2v_1_3b()``: Wan2.1-T2V-1.3B, 30 blocks, dim 1536, 12 heads x 128, FFN 8960,
  1,418,996,800 parameters (the base of Self-Forcing, CausVid and LongLive);
- ``wan21_t2v_14b()``: Wan2.1-T2V-14B, 40 blocks, dim 5120, 40 heads x 128, FFN 13824;
- ``world_small()``: a small Wan-shaped model for the bundled world;
- ``tiny_test()``: two blocks at small width, for CPU tests.

``PRESETS`` maps a name to its factory; ``WanDiTConfig.from_name(name)`` builds one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

# Wan's 3D RoPE splits a head of size d into temporal / height / width parts of
# d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6) channels (44 / 42 / 42 for d = 128).


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of a head given to the (time, height, width) rotary parts."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


@dataclass(frozen=True)
class WanDiTConfig:
    """Architecture of a Wan2.1 text-to-video DiT run causally, chunk by chunk."""

    num_layers: int = 30
    """Transformer blocks."""
    dim: int = 1536
    """Hidden size of the residual stream (= num_heads * head_dim)."""
    num_heads: int = 12
    """Attention heads (self- and cross-attention)."""
    ffn_dim: int = 8960
    """Inner size of each block's feed-forward network (Linear -> tanh-GELU -> Linear)."""
    in_channels: int = 16
    """Latent channels of the input (the Wan2.1 VAE's z_dim)."""
    out_channels: int = 16
    """Channels of the velocity prediction."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """Patch (frames, height, width) of the Conv3d patch embedding; latent F, H, W must be multiples."""
    text_dim: int = 4096
    """Width of the text encoder's embeddings (UMT5-XXL: 4096)."""
    text_len: int = 512
    """Text tokens per prompt the model was trained with (embeddings are zero-padded to this)."""
    freq_dim: int = 256
    """Width of the sinusoidal timestep embedding fed to the time MLP."""
    eps: float = 1e-6
    """Epsilon of every LayerNorm and of the q/k RMSNorms."""
    qk_norm: bool = True
    """RMSNorm over all heads (a weight of size dim) on queries and keys, self- and cross-attention."""
    cross_attn_norm: bool = True
    """Affine LayerNorm before cross-attention (Wan's ``norm3``; diffusers' ``norm2``)."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies."""
    name: str = field(default="custom", compare=False)
    """Label used in logs and error messages; not part of the architecture."""

    def __post_init__(self):
        if isinstance(self.patch_size, list):
            object.__setattr__(self, "patch_size", tuple(self.patch_size))
        self.validate()

    # ------------------------------------------------------------------ derived sizes

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Channels per head for the (time, height, width) rotary parts."""
        return rope_split(self.head_dim)

    @property
    def patch_volume(self) -> int:
        pt, ph, pw = self.patch_size
        return pt * ph * pw

    def tokens_per_frame(self, height: int, width: int) -> int:
        """Tokens of one latent frame of (height, width) latents."""
        _, ph, pw = self.patch_size
        return (height // ph) * (width // pw)

    def validate(self) -> None:
        """Raise ValueError naming the field when the configuration cannot describe a Wan DiT."""
        for name in ("num_layers", "dim", "num_heads", "ffn_dim", "in_channels", "out_channels", "text_dim",
                     "text_len", "freq_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"WanDiTConfig({self.name}): '{name}' must be a positive int, got {value!r}")
        if self.dim % self.num_heads:
            raise ValueError(
                f"WanDiTConfig({self.name}): 'dim'={self.dim} must be a multiple of 'num_heads'={self.num_heads} "
                f"(head_dim = dim / num_heads)"
            )
        d = self.head_dim
        if d % 2:
            raise ValueError(f"WanDiTConfig({self.name}): head_dim = dim / num_heads = {d} must be even for RoPE")
        t_dim, h_dim, _ = rope_split(d)
        if d < 6 or h_dim == 0 or t_dim % 2:
            raise ValueError(
                f"WanDiTConfig({self.name}): head_dim={d} cannot be split into even time/height/width rotary parts "
                f"(d - 4*(d//6), 2*(d//6), 2*(d//6) = {rope_split(d)}); use a head_dim >= 6 with d - 4*(d//6) even"
            )
        if self.freq_dim % 2:
            raise ValueError(f"WanDiTConfig({self.name}): 'freq_dim'={self.freq_dim} must be even (sin and cos halves)")
        if len(self.patch_size) != 3 or any((not isinstance(p, int)) or p <= 0 for p in self.patch_size):
            raise ValueError(f"WanDiTConfig({self.name}): 'patch_size' must be three positive ints, got {self.patch_size!r}")
        if not (isinstance(self.eps, float) and 0 < self.eps < 1):
            raise ValueError(f"WanDiTConfig({self.name}): 'eps' must be a float in (0, 1), got {self.eps!r}")
        if self.rope_theta <= 1:
            raise ValueError(f"WanDiTConfig({self.name}): 'rope_theta' must be > 1, got {self.rope_theta!r}")

    def num_parameters(self) -> int:
        """Parameter count implied by the config (checked against the module in the tests)."""
        dim, ffn, text, freq = self.dim, self.ffn_dim, self.text_dim, self.freq_dim
        linear = lambda i, o: i * o + o  # noqa: E731
        attn = 4 * linear(dim, dim) + (2 * dim if self.qk_norm else 0)
        block = 2 * attn + linear(dim, ffn) + linear(ffn, dim) + 6 * dim + (2 * dim if self.cross_attn_norm else 0)
        head = linear(dim, self.out_channels * self.patch_volume) + 2 * dim
        embed = (self.in_channels * self.patch_volume * dim + dim) + linear(text, dim) + linear(dim, dim) \
            + linear(freq, dim) + linear(dim, dim) + linear(dim, 6 * dim)
        return embed + self.num_layers * block + head

    def replace(self, **changes) -> "WanDiTConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_name(cls, name: str) -> "WanDiTConfig":
        if name not in PRESETS:
            raise ValueError(f"WanDiTConfig: 'name'={name!r} is not a preset; choose one of {sorted(PRESETS)}")
        return PRESETS[name]()


def wan21_t2v_1_3b() -> WanDiTConfig:
    """Wan2.1-T2V-1.3B (Self-Forcing, CausVid and LongLive are fine-tunes of it)."""
    return WanDiTConfig(num_layers=30, dim=1536, num_heads=12, ffn_dim=8960, name="wan2.1-t2v-1.3b")


def wan21_t2v_14b() -> WanDiTConfig:
    """Wan2.1-T2V-14B."""
    return WanDiTConfig(num_layers=40, dim=5120, num_heads=40, ffn_dim=13824, name="wan2.1-t2v-14b")


def tiny_test(num_layers: int = 2, dim: int = 48, num_heads: int = 4, ffn_dim: int = 80, text_dim: int = 24,
              freq_dim: int = 32, in_channels: int = 4, out_channels: int | None = None) -> WanDiTConfig:
    """A small config (head_dim 12: rotary split 4/4/4) for CPU tests."""
    return WanDiTConfig(num_layers=num_layers, dim=dim, num_heads=num_heads, ffn_dim=ffn_dim, text_dim=text_dim,
                        text_len=16, freq_dim=freq_dim, in_channels=in_channels,
                        out_channels=in_channels if out_channels is None else out_channels, name="tiny-test")


def world_small() -> WanDiTConfig:
    """A small Wan-shaped DiT (13,281,472 parameters) for the bundled world: 6 blocks, dim 384,
    6 heads x 64 (rotary split 24/20/20), 16 latent channels so it runs with the Wan2.1 VAE,
    text dim 384 with 64 tokens."""
    return WanDiTConfig(num_layers=6, dim=384, num_heads=6, ffn_dim=1024, text_dim=384, text_len=64, freq_dim=128,
                        name="world-small")


PRESETS: dict[str, Callable[[], WanDiTConfig]] = {
    "wan2.1-t2v-1.3b": wan21_t2v_1_3b,
    "wan2.1-t2v-14b": wan21_t2v_14b,
    "world-small": world_small,
    "tiny-test": tiny_test,
}
