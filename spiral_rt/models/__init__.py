"""spiral_rt.models: the networks the runtime drives, and the checkpoints they load from.

- ``config``: ``WanDiTConfig`` and presets (Wan2.1-T2V-1.3B, -14B, the bundled world's, tests');
- ``dit``: ``CausalWanDiT``, a Wan2.1 DiT that runs chunk by chunk through an attention context;
- ``attention``: the ``AttentionContext`` protocol the DiT calls (the model never sees how a KV
  cache is managed) and its dense / contiguous-cache reference implementations;
- ``vae``: the streaming Wan2.1 VAE decoder (conv caches carried between chunks);
- ``text``: text-encoder protocol, UMT5-XXL through transformers, per-prompt cache;
- ``checkpoints``: original Wan, Self-Forcing / CausVid, LongLive (+LoRA) and diffusers formats.

Importing this package imports neither transformers nor diffusers.
"""

from .attention import AttentionContext, ContiguousKVCache, DenseAttention, block_causal_mask
from .checkpoints import (
    CheckpointError,
    export_dit_state_dict,
    export_vae_state_dict,
    load_dit,
    load_vae,
    read_checkpoint,
)
from .config import PRESETS, WanDiTConfig, tiny_test, wan21_t2v_1_3b, wan21_t2v_14b, world_small
from .dit import CausalWanDiT, TextConditioning, build_dit
from .text import CachedTextEncoder, TextEmbeddings, TextEncoder, UMT5TextEncoder
from .vae import DecoderState, WanVAEConfig, WanVAEDecoder, build_vae_decoder, tiny_vae, wan21_vae

__all__ = [
    "AttentionContext", "ContiguousKVCache", "DenseAttention", "block_causal_mask",
    "CheckpointError", "export_dit_state_dict", "export_vae_state_dict", "load_dit", "load_vae", "read_checkpoint",
    "PRESETS", "WanDiTConfig", "tiny_test", "wan21_t2v_1_3b", "wan21_t2v_14b", "world_small",
    "CausalWanDiT", "TextConditioning", "build_dit",
    "CachedTextEncoder", "TextEmbeddings", "TextEncoder", "UMT5TextEncoder",
    "DecoderState", "WanVAEConfig", "WanVAEDecoder", "build_vae_decoder", "tiny_vae", "wan21_vae",
]
