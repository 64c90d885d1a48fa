"""Public op API of spiral_rt.

Each op checks its inputs once (``ValueError`` naming the bad argument), allocates its outputs and
dispatches to a backend: ``cuda`` (csrc/ via ``spiral_rt._C``), ``triton`` (kernels/) or
``reference`` (spiral_rt/reference/). See ``spiral_rt.ops.dispatch`` for how the backend is chosen
and forced. Ops are registered as ``torch.ops.spiral_rt.*`` custom ops, so they trace through
``torch.compile`` and record into CUDA graphs.

Ops:
- ``sampler_step``: fused stochastic sampler transition with Philox noise and log-prob terms;
- ``chunk_attention``: a chunk's queries over paged K/V (varlen, plan once, run per layer/step);
- ``merge_states``: exact log-sum-exp merge of partial attention states (shared prefixes);
- ``qk_norm_rope_kv_write``: RMSNorm over heads + Wan 3D RoPE on q, k and the K/V page write;
- ``modulated_norm``: LayerNorm * (1 + scale) + shift per frame, optionally after a gated residual;
- ``channel_rms_norm``: the Wan VAE's RMS norm over channels * scale * gamma, optionally + SiLU;
- ``bias_residual_add``: y + bias + residual in one pass (the end of a Wan VAE residual block);
- ``phase_interleave``: the four sub-pixel phases of a 2x2 conv into the 2x upsampled image (the Wan
  VAE's nearest-2x upsample + 3x3 conv as a sub-pixel conv);
- ``narrow_causal_conv3d``: a causal 3x3x3 conv to a few output channels over cached frames (the
  Wan VAE's head);
- ``linear``: x W^T + b (optionally tanh-GELU) through cuBLASLt with the algorithm timed per shape
  (the DiT's projections and FFN);
- ``row_inv_rms``: 1 / sqrt(mean(x^2) + eps) per row (an RMS norm's factor, for ``chunk_attention``'s
  per-row score scale).
"""

from . import bias_residual_add as _bias_residual_add_module
from . import channel_rms_norm as _channel_rms_norm_module
from . import chunk_attention as _chunk_attention_module
from . import linear as _linear_module
from . import merge_states as _merge_states_module
from . import modulated_norm as _modulated_norm_module
from . import narrow_causal_conv3d as _narrow_causal_conv3d_module
from . import qk_norm_rope_kv_write as _qk_norm_rope_kv_write_module
from . import row_inv_rms as _row_inv_rms_module
from . import sampler_step as _sampler_step_module
from . import upsample_conv as _upsample_conv_module
from .bias_residual_add import bias_residual_add
from .channel_rms_norm import channel_rms_norm
from .chunk_attention import (
    AttentionConfig,
    ChunkAttentionPlan,
    chunk_attention,
    chunk_attention_shared_prefix,
    plan_chunk_attention,
)
from .dispatch import available_backends, select_backend
from .linear import linear
from .merge_states import AttentionState, merge_states
from .modulated_norm import ModulatedNormResult, modulated_norm
from .narrow_causal_conv3d import narrow_causal_conv3d
from .qk_norm_rope_kv_write import qk_norm_rope_kv_write
from .row_inv_rms import row_inv_rms
from .sampler_step import SamplerStepResult, noise_key, sampler_step
from .upsample_conv import phase_interleave

# op name -> the backends that implement it (``spiral-rt info`` lists what runs where)
OP_BACKENDS = {
    m.OP: m.IMPLEMENTED
    for m in (
        _sampler_step_module,
        _chunk_attention_module,
        _merge_states_module,
        _qk_norm_rope_kv_write_module,
        _modulated_norm_module,
        _channel_rms_norm_module,
        _bias_residual_add_module,
        _upsample_conv_module,
        _narrow_causal_conv3d_module,
        _linear_module,
        _row_inv_rms_module,
    )
}

__all__ = [
    "sampler_step", "SamplerStepResult", "noise_key",
    "chunk_attention", "chunk_attention_shared_prefix", "plan_chunk_attention", "ChunkAttentionPlan", "AttentionConfig",
    "merge_states", "AttentionState",
    "modulated_norm", "ModulatedNormResult",
    "qk_norm_rope_kv_write",
    "channel_rms_norm",
    "bias_residual_add",
    "phase_interleave",
    "narrow_causal_conv3d",
    "linear",
    "row_inv_rms",
    "available_backends", "select_backend", "OP_BACKENDS",
]
