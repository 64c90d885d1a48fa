"""CausalWanDiT: the Wan2.1 text-to-video DiT, run chunk by chunk against a KV cache.

One forward denoises one chunk of latent frames:

    x (B, C, F, H, W), timesteps (B, F), frame_offset, attention context, text conditioning
        -> patch embed (Conv3d, patch (1, 2, 2)) -> tokens (B, L, dim), L = F * (H/2) * (W/2), frame-major
        -> num_layers x [ self-attention (per-frame adaLN, qk RMSNorm, 3D RoPE, attention context)
                          cross-attention to the text (K/V precomputed once per prompt)
                          feed-forward (per-frame adaLN, tanh-GELU) ]
        -> head (per-frame 2-way adaLN, Linear) -> unpatchify -> velocity (B, C_out, F, H, W)

Per-frame timesteps: every latent frame has its own t (Self-Forcing / CausVid / diffusion forcing);
its sinusoidal embedding goes through the time MLP to a 6-way modulation (shift, scale, gate for
self-attention; shift, scale, gate for the FFN) applied to that frame's tokens only.

RoPE: head_dim d is split into time / height / width parts of d - 4*(d//6), 2*(d//6), 2*(d//6)
channels (44/42/42 for d = 128), rotating consecutive channel pairs (Wan's complex layout). The
temporal position of a token is ``frame_offset`` + its frame index in the chunk, so a chunk
placed after cached frames gets the positions it would have in the full sequence. Angles and
cos/sin are computed in fp32 from inverse frequencies computed once, and the tables are cached
per (frame_offset, F, H, W, device).

Two paths compute the same function. The reference path (``_block``) is plain PyTorch and runs
with every attention context. The fused path (``_blocks_fused``) runs when the context sets
``fused_ops`` (the engine's paged context does, ``EngineConfig.fused_ops``): adaLN and the gated
residual adds go through ``spiral_rt.ops.modulated_norm``, and qk-norm, RoPE and the K/V write
through the context's ``self_attention_fused`` (``spiral_rt.ops.qk_norm_rope_kv_write``), so the
activations are read and written a few times per block instead of a few dozen; after ``pack_qkv``
(the engine calls it) q, k and v come from one GEMM.

Boundaries: the model does not know how the KV cache is managed; it calls
``attention.self_attention(layer, q, k, v)`` (see ``spiral_rt.models.attention``). Text embeddings
come in already encoded (``spiral_rt.models.text``); ``encode_text`` runs the text MLP and the
per-block cross-attention K/V once per prompt into a ``TextConditioning``. Module and parameter
names follow the original Wan code (``blocks.N.self_attn.q``, ``ffn.0``, ``modulation``,
``head.head``...), so original checkpoints load with the identity key map
(``spiral_rt.models.checkpoints``).

Dtypes: the residual stream and matmuls run in the parameters' dtype (``to_dtype(torch.bfloat16)``
keeps the time MLP and the modulation tables in fp32, as Wan does); norms, modulation, RoPE and the
residual additions are computed in fp32.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.chunk_attention import ChunkAttentionPlan, chunk_attention, plan_chunk_attention
from ..ops.linear import linear as _tuned_linear
from ..ops.modulated_norm import modulated_norm
from ..ops.row_inv_rms import row_inv_rms
from .attention import AttentionContext, DenseAttention, sdpa_blhd
from .config import WanDiTConfig, rope_split

logger = logging.getLogger(__name__)

FP32_PARAM_PREFIXES = ("time_embedding.", "time_projection.")
FP32_PARAM_SUFFIXES = ("modulation",)


# ----------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    """Wan's RMSNorm: normalise in fp32, cast back, multiply by the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class Attention(nn.Module):
    """Projections of one attention layer (q, k, v, o and the qk RMSNorms over all heads)."""

    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        dim = cfg.dim
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, dim) -> (B, L, H, D)."""
        return x.unflatten(-1, (self.num_heads, -1))


class Block(nn.Module):
    """One Wan block: self-attention, cross-attention, FFN, with a 6-way per-frame modulation."""

    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        dim = cfg.dim
        self.eps = cfg.eps
        self.self_attn = Attention(cfg)
        self.norm3 = LayerNorm(dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = Attention(cfg)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def text_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention K, V (B, Lt, H, D) of the text-MLP output ``context`` (B, Lt, dim)."""
        ca = self.cross_attn
        return ca.heads(ca.norm_k(ca.k(context))), ca.heads(ca.v(context))


def _plain_qkv(attn: Attention) -> tuple[nn.Linear, nn.Linear, nn.Linear] | None:
    """``attn``'s q, k, v projections when all three are plain biased ``nn.Linear``s (the ones
    ``pack_qkv`` can pack), else None (LoRA wrappers, FP8 linears)."""
    lins = (attn.q, attn.k, attn.v)
    return lins if all(type(lin) is nn.Linear and lin.bias is not None for lin in lins) else None


def _packed_qkv(attn: Attention) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (3 dim, dim) weight and (3 dim,) bias of ``attn``'s q, k, v projections as views of the one
    buffer ``CausalWanDiT.pack_qkv`` put them in, or None: not packed (or unpacked since by a dtype or
    device cast), not plain biased ``nn.Linear``s (LoRA wrappers, FP8 linears), or gradients wanted."""
    lins = _plain_qkv(attn)
    if lins is None:
        return None
    packed = []
    for name in ("weight", "bias"):
        first, *rest = (getattr(lin, name) for lin in lins)
        if torch.is_grad_enabled() and first.requires_grad:
            return None
        if not first.is_contiguous() or any(
            not t.is_contiguous() or t.dtype != first.dtype or t.shape != first.shape
            or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            or t.storage_offset() != first.storage_offset() + i * first.numel()
            for i, t in enumerate(rest, start=1)
        ):
            return None
        packed.append(first.detach().as_strided((3 * first.shape[0], *first.shape[1:]), first.stride()))
    return packed[0], packed[1]


def _qkv_heads(attn: Attention, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, L, H, D) of ``y`` (B, L, dim): one GEMM against the packed weight when there is one
    (the three are then strided views of its (B, L, 3 dim) output), else three."""
    packed = _packed_qkv(attn)
    if packed is None:
        return attn.heads(attn.q(y)), attn.heads(attn.k(y)), attn.heads(attn.v(y))
    weight, bias = packed
    qkv = _tuned_linear(y, weight, bias) if _tunable(weight, y) else F.linear(y, weight, bias)
    return qkv.unflatten(-1, (3, attn.num_heads, -1)).unbind(-3)


def _rms_norm_fused(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` as one kernel (F.rms_norm: fp32 math, the weight applied before the one rounding,
    where RMSNorm rounds before it); the fused path's cross-attention query norm."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)


def _q_weighted_keys(model: "CausalWanDiT", ks) -> list[torch.Tensor] | None:
    """Every block's cross-attention keys (B, Lt, H, D) times its query norm's weight, rounded once:
    q_i . (w * k_j) = (w * q_i) . k_j, so attention of RMS-normalised queries needs only each query
    row's inverse RMS (``TextConditioning.cross_k_q_weighted``). None off CUDA (where the fused
    cross-attention does not run) or without qk-norm."""
    if not (ks and ks[0].is_cuda and model.config.qk_norm):
        return None
    out = []
    with torch.no_grad():
        for block, k in zip(model.blocks, ks):
            w = block.cross_attn.norm_q.weight.float().view(k.shape[2], k.shape[3])
            out.append((k.float() * w).to(k.dtype))
    return out


def _linear(lin: nn.Module, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """``lin(x)`` (then tanh-GELU when ``gelu``) for the fused path: a plain nn.Linear on a GPU, with no
    gradient asked for, runs through ``spiral_rt.ops.linear`` (cuBLASLt with the GEMM algorithm timed
    per shape, the bias and GELU in its epilogue); anything else (LoRA wrappers, FP8 linears, training,
    the CPU) runs as the module."""
    if type(lin) is nn.Linear and _tunable(lin.weight, x):
        return _tuned_linear(x, lin.weight, lin.bias, gelu=gelu)
    y = lin(x)
    return F.gelu(y, approximate="tanh") if gelu else y


def _tunable(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``spiral_rt.ops.linear`` can take x @ weight^T: on a GPU, one dtype, no gradient asked for."""
    return x.is_cuda and weight.dtype == x.dtype and not (torch.is_grad_enabled() and weight.requires_grad)


_TEXT_PLANS: dict[tuple, ChunkAttentionPlan] = {}


def _text_attention_plan(batch: int, q_len: int, text: TextConditioning) -> ChunkAttentionPlan | None:
    """The fused path's cross-attention as ``spiral_rt.ops.chunk_attention`` over each prompt's
    distinct text rows (``ChunkAttentionPlan.with_distinct_keys``): a prompt's K/V rows are one page,
    read up to its padding, the padding rows' shared K/V counted once with their number. With a
    128-token prompt that is 129 keys instead of Wan's 512. The base plan is built once per shape (on
    the host; cached), the counts applied on the device once per forward. None (SDPA over every row)
    without counts, gradients, the Hopper CUDA kernel, or when first met inside a graph capture."""
    k = text.cross_k[0] if text.cross_k else None
    if (k is None or text.distinct_rows is None or not k.is_cuda or (torch.is_grad_enabled() and k.requires_grad)
            or k.shape[0] not in (1, batch) or not k.is_contiguous()):
        return None
    kv_batch, rows, heads, dim = k.shape
    key = (batch, q_len, kv_batch, rows, heads, dim, k.dtype, k.device)
    plan = _TEXT_PLANS.get(key)
    if plan is None:
        if torch.cuda.is_current_stream_capturing():  # the plan's upload cannot be captured
            return None
        plan = plan_chunk_attention(
            [b * q_len for b in range(batch + 1)], list(range(batch + 1)),
            [b if kv_batch == batch else 0 for b in range(batch)], [rows] * batch, page_size=rows,
            num_pages=kv_batch, num_qo_heads=heads, head_dim=dim, dtype=k.dtype, device=k.device)
        _TEXT_PLANS[key] = plan
    if plan.cuda_reason is not None:  # the Triton kernel would read every row: SDPA is faster
        return None
    distinct = text.distinct_rows
    if distinct.shape[0] != batch:
        distinct = distinct.expand(batch).contiguous()
    return plan.with_distinct_keys(distinct)


def _ffn_fused(ffn: nn.Sequential, y: torch.Tensor) -> torch.Tensor:
    """``ffn(y)`` with the bias and tanh-GELU of the first linear in its GEMM epilogue (``_linear``),
    saving a pass over the (L, ffn_dim) hidden activations. Other activations run as modules."""
    up, act, down = ffn
    if not isinstance(act, nn.GELU) or act.approximate != "tanh":
        return ffn(y)
    return _linear(down, _linear(up, y, gelu=True))


def _modulated_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift per frame, in fp32. x: (B, F, T, C); shift, scale: (B, F, 1, C)."""
    xn = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return xn * (1 + scale) + shift


class Head(nn.Module):
    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, cfg.out_channels * cfg.patch_volume)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)


class RotaryEmbedding3D:
    """cos/sin tables of Wan's 3D RoPE, fp32, cached per (frame_offset, F, H, W, device).

    Inverse frequencies are computed once (on the CPU, in float64, then stored in fp32); the
    angles pos * inv_freq and their cos/sin are computed in fp32 on the target device.
    """

    def __init__(self, head_dim: int, theta: float, max_cached: int = 64):
        self.split = rope_split(head_dim)
        # explicit device: independent of any torch.device(...) context (meta-device model init)
        self.inv_freq = [
            (1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d)).float() for d in self.split
        ]
        self._inv_freq_on: dict[torch.device, list[torch.Tensor]] = {}
        self.max_cached = max_cached
        self._cache: OrderedDict = OrderedDict()

    def _inv_freq(self, device) -> list[torch.Tensor]:
        device = torch.device(device)
        if device not in self._inv_freq_on:
            self._inv_freq_on[device] = [f.to(device) for f in self.inv_freq]
        return self._inv_freq_on[device]

    def tables(self, frame_offset: int, frames: int, height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (L, 1, head_dim / 2), L = frames * height * width (frame-major tokens)."""
        key = (frame_offset, frames, height, width, torch.device(device))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        pos_t = torch.arange(frame_offset, frame_offset + frames, device=device, dtype=torch.float32)
        out = self.tables_at(pos_t[None], height, width)
        out = (out[0][0], out[1][0])
        self._cache[key] = out
        if len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return out

    def tables_at(self, positions: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (B, L, 1, head_dim / 2) for per-sequence frame positions (B, F).

        Not cached: the positions are a device tensor (e.g. a KV-cache plan's), so sessions at
        different positions, or non-consecutive frames, share one forward without a host sync.
        """
        device = positions.device
        inv_t, inv_h, inv_w = self._inv_freq(device)
        B, frames = positions.shape
        pos_t = positions.to(torch.float32)
        ang_t = (pos_t[..., None] * inv_t)[:, :, None, None, :].expand(B, frames, height, width, -1)
        ang_h = torch.outer(torch.arange(height, device=device, dtype=torch.float32), inv_h)[None, None, :, None, :]
        ang_w = torch.outer(torch.arange(width, device=device, dtype=torch.float32), inv_w)[None, None, None, :, :]
        ang = torch.cat([ang_t, ang_h.expand(B, frames, height, width, -1), ang_w.expand(B, frames, height, width, -1)], -1)
        ang = ang.reshape(B, frames * height * width, 1, -1)
        return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of x (B, L, H, D) by the angles of cos/sin, (L, 1, D/2) or
    (B, L, 1, D/2), in fp32."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of t (any shape) -> (*t.shape, dim), fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    ang = t.float()[..., None] * freqs
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


# ----------------------------------------------------------------------------- text conditioning


@dataclass
class TextConditioning:
    """Everything the DiT derives from one batch of prompts; built once per prompt by
    ``CausalWanDiT.encode_text`` and reused by every forward until the prompt changes."""

    context: torch.Tensor
    """(B, text_len, dim): the text-embedding MLP's output."""
    cross_k: list[torch.Tensor]
    """Per block, (B, text_len, H, D): cross-attention keys after the k RMSNorm."""
    cross_v: list[torch.Tensor]
    """Per block, (B, text_len, H, D): cross-attention values."""
    distinct_rows: torch.Tensor | None = None
    """(B,) int32 on the device: the rows before each prompt's zero padding. The padding rows' K/V
    are all one row, so cross-attention reads the distinct rows and that one, counted (``encode_text``
    sets it; None: unknown, every row is read)."""
    cross_k_q_weighted: list[torch.Tensor] | None = None
    """Per block, ``cross_k`` times the cross-attention query norm's weight (B, text_len, H, D): the
    fused path's CUDA cross-attention applies the query RMS norm as a per-row score scale
    (``row_inv_rms``, ``chunk_attention(q_row_scale=)``) with the weight folded into these keys
    (``encode_text`` sets it on CUDA; None: the queries are normalised and ``cross_k`` is read)."""

    @property
    def batch_size(self) -> int:
        return self.context.shape[0]

    def rows(self, start: int, stop: int) -> "TextConditioning":
        """The conditioning of batch rows [start, stop) (views)."""
        return TextConditioning(context=self.context[start:stop], cross_k=[k[start:stop] for k in self.cross_k],
                                cross_v=[v[start:stop] for v in self.cross_v],
                                distinct_rows=None if self.distinct_rows is None else self.distinct_rows[start:stop],
                                cross_k_q_weighted=(None if self.cross_k_q_weighted is None
                                                    else [k[start:stop] for k in self.cross_k_q_weighted]))

    @staticmethod
    def cat(conds: "list[TextConditioning]") -> "TextConditioning":
        """The batch of several conditionings, rows in order."""
        return TextConditioning(
            context=torch.cat([c.context for c in conds]),
            cross_k=[torch.cat([c.cross_k[i] for c in conds]) for i in range(len(conds[0].cross_k))],
            cross_v=[torch.cat([c.cross_v[i] for c in conds]) for i in range(len(conds[0].cross_v))],
            distinct_rows=(torch.cat([c.distinct_rows for c in conds])
                           if all(c.distinct_rows is not None for c in conds) else None),
            cross_k_q_weighted=([torch.cat([c.cross_k_q_weighted[i] for c in conds]) for i in range(len(conds[0].cross_k))]
                                if all(c.cross_k_q_weighted is not None for c in conds) else None),
        )


# ----------------------------------------------------------------------------- time tables


_MAX_TIME_TABLES = 64
"""Cached (t, B, F, device) entries per model; past this, a forward at a new key computes its tables
without keeping them (entries are never evicted: a captured CUDA graph may read them)."""


@dataclass
class _TimeTables:
    """What one forward derives from its timesteps, fp32: the time embedding e (B, F, dim), the 6-way
    modulation e0 (B, F, 6, dim) and, built on the fused path's first use, ``_fused_tables``."""

    e: torch.Tensor
    e0: torch.Tensor
    fused: tuple | None = None
    versions: tuple = ()

    def tensors(self) -> list[torch.Tensor]:
        out = [self.e, self.e0]
        if self.fused is not None:
            mods, norm3_mods, head_mod, ones = self.fused
            out += [mods, *norm3_mods.values(), head_mod, ones]
        return out


# ----------------------------------------------------------------------------- the model


class CausalWanDiT(nn.Module):
    """Wan2.1 DiT with per-frame timesteps and an attention-context interface (module docstring)."""

    def __init__(self, config: WanDiTConfig):
        super().__init__()
        if not isinstance(config, WanDiTConfig):
            raise ValueError(f"CausalWanDiT: 'config' must be a WanDiTConfig, got {type(config).__name__}")
        self.config = cfg = config
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        self.rope = RotaryEmbedding3D(cfg.head_dim, cfg.rope_theta)
        self._time_tables: dict[tuple, _TimeTables] = {}  # numeric timesteps' tables (_time_conditioning)

    # ------------------------------------------------------------------ dtype

    def to_dtype(self, dtype: torch.dtype) -> "CausalWanDiT":
        """Cast parameters to ``dtype``, keeping the time MLP and the modulation tables in fp32."""
        for name, p in self.named_parameters():
            keep = name.startswith(FP32_PARAM_PREFIXES) or name.endswith(FP32_PARAM_SUFFIXES)
            p.data = p.data.to(torch.float32 if keep else dtype)
        return self

    @torch.no_grad()
    def pack_qkv(self) -> "CausalWanDiT":
        """Put each block's self-attention q, k, v weights (and biases) side by side in one buffer, so
        that the fused path projects q, k and v with one GEMM of N = 3 dim (one launch, one read of the
        activations, a wider grid to fill the GPU) instead of three. Values and Parameter objects stay
        (optimizers keep working; state dicts load into them in place); only where their data lives
        changes. A later dtype or device cast unpacks them, and the three GEMMs run again."""
        for block in self.blocks:
            lins = _plain_qkv(block.self_attn)
            if lins is None or _packed_qkv(block.self_attn) is not None:
                continue
            for name in ("weight", "bias"):
                params = [getattr(lin, name) for lin in lins]
                buffer = torch.cat([p.data for p in params])
                for p, view in zip(params, buffer.chunk(3)):
                    p.data = view
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    # ------------------------------------------------------------------ text

    def encode_text(self, text_embeddings: torch.Tensor) -> TextConditioning:
        """Run the text MLP and every block's cross-attention K/V once for a batch of prompts.

        Args:
            text_embeddings: (B, Lt, text_dim) encoder output, padding positions zero; Lt <= text_len.
                Shorter sequences are zero-padded to ``config.text_len`` (what Wan does).
        """
        cfg = self.config
        emb = text_embeddings
        if not isinstance(emb, torch.Tensor) or emb.dim() != 3 or emb.shape[-1] != cfg.text_dim:
            shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
            raise ValueError(f"CausalWanDiT.encode_text: 'text_embeddings' must be (B, Lt, {cfg.text_dim}), got {shape}")
        length = text_embeddings.shape[1]
        if length > cfg.text_len:
            raise ValueError(
                f"CausalWanDiT.encode_text: 'text_embeddings' has {length} tokens, more than text_len={cfg.text_len}"
            )
        if length < cfg.text_len:
            text_embeddings = F.pad(text_embeddings, (0, 0, 0, cfg.text_len - length))
        context = self.text_embedding(text_embeddings.to(self.dtype))
        ks, vs = zip(*(block.text_kv(context) for block in self.blocks))
        # rows up to the last non-zero one (on the device: no sync); the rest are the padding
        nonzero = text_embeddings.ne(0).any(dim=-1)
        position = torch.arange(1, cfg.text_len + 1, device=nonzero.device, dtype=torch.int32)
        distinct = torch.where(nonzero, position, 0).amax(dim=-1).to(torch.int32)
        return TextConditioning(context=context, cross_k=list(ks), cross_v=list(vs), distinct_rows=distinct,
                                cross_k_q_weighted=_q_weighted_keys(self, ks))

    # ------------------------------------------------------------------ time tables

    def _time_params(self) -> list[torch.Tensor]:
        """Every parameter the time tables read: the time MLP (adapters included), the blocks'
        modulations and cross-attention norm affines, the head's modulation."""
        params = [*self.time_embedding.parameters(), *self.time_projection.parameters(), self.head.modulation]
        for block in self.blocks:
            params.append(block.modulation)
            params += block.norm3.parameters()
        return params

    def _time_versions(self) -> tuple | None:
        """(data pointer, version) of every parameter the time tables read; None when one is an
        inference tensor (made under torch.inference_mode), which keeps no version counter."""
        params = self._time_params()
        if any(p.is_inference() for p in params):
            return None
        return tuple((p.data_ptr(), p._version) for p in params)

    def _time_mlp(self, t: torch.Tensor) -> _TimeTables:
        """The time MLP at (B, F) timesteps: e (B, F, dim) and e0 (B, F, 6, dim), fp32."""
        t_dtype = self.time_embedding[0].weight.dtype
        e = self.time_embedding(timestep_embedding(t, self.config.freq_dim).to(t_dtype)).float()
        e0 = self.time_projection(e.to(t_dtype)).float().unflatten(-1, (6, self.config.dim))
        return _TimeTables(e, e0)

    def _time_conditioning(self, timesteps, B: int, frames: int, device: torch.device) -> _TimeTables:
        """The time tables of one forward. A tensor of timesteps runs the time MLP. A number (one t for
        every frame and sequence: the engine's fixed few-step schedule) is looked up in a per-model
        cache keyed by (t, B, F, device), filled on first use and recomputed in place when a parameter
        it reads has changed (data pointer or version counter). Not cached with autograd on, nor for
        weights made under inference mode (no version counter tells when they change)."""
        if isinstance(timesteps, torch.Tensor):
            return self._time_mlp(timesteps if timesteps.dim() == 2 else timesteps[:, None].expand(B, frames))
        t = float(timesteps)
        versions = None if torch.is_grad_enabled() else self._time_versions()
        if versions is None:
            return self._time_mlp(torch.full((B, frames), t, device=device))
        tables = self._time_tables
        key = (t, B, frames, torch.device(device))
        entry = tables.get(key)
        if entry is None:
            entry = self._time_mlp(torch.full((B, frames), t, device=device))
            entry.versions = versions
            if len(tables) < _MAX_TIME_TABLES:
                tables[key] = entry
        elif entry.versions != versions:
            self._refresh_time_entry(key, entry, versions)
        return entry

    def _refresh_time_entry(self, key: tuple, entry: _TimeTables, versions: tuple) -> None:
        t, B, frames, device = key
        with torch.inference_mode(entry.e.is_inference()), torch.no_grad():  # no_grad inside: mode False enables grad
            fresh = self._time_mlp(torch.full((B, frames), t, device=device))
            if entry.fused is not None:
                fresh.fused = self._fused_tables(fresh)
            for dst, src in zip(entry.tensors(), fresh.tensors(), strict=True):
                dst.copy_(src)
        entry.versions = versions

    def refresh_time_tables(self) -> None:
        """Recompute, in place, the cached time tables whose parameters changed since they were built.
        A forward does this for the entry it uses; call it before replaying a CUDA graph captured from
        forwards at numeric timesteps (the graph reads the tables, it does not recompute them)."""
        tables = self._time_tables
        if tables:
            versions = self._time_versions()
            for key, entry in tables.items():
                if versions is None or entry.versions != versions:  # None: weights swapped for inference tensors
                    self._refresh_time_entry(key, entry, versions)

    # ------------------------------------------------------------------ forward

    def _check_inputs(self, x, timesteps, frame_offset, text):
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != cfg.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"CausalWanDiT: 'x' must be (B, {cfg.in_channels}, F, H, W), got {shape}")
        B, _, Fr, H, W = x.shape
        pt, ph, pw = cfg.patch_size
        if Fr % pt or H % ph or W % pw:
            raise ValueError(
                f"CausalWanDiT: 'x' frames/height/width ({Fr}, {H}, {W}) must be multiples of the patch {cfg.patch_size}"
            )
        frames = Fr // pt
        if isinstance(timesteps, (int, float)) and not isinstance(timesteps, bool):
            if not 0 <= timesteps <= 1000:
                raise ValueError(f"CausalWanDiT: 'timesteps' as a number must lie in [0, 1000], got {timesteps!r}")
        elif not isinstance(timesteps, torch.Tensor) or tuple(timesteps.shape) not in ((B, frames), (B,)):
            shape = tuple(timesteps.shape) if isinstance(timesteps, torch.Tensor) else type(timesteps).__name__
            raise ValueError(
                f"CausalWanDiT: 'timesteps' must be (B, F) = ({B}, {frames}) (one t per latent frame), ({B},) "
                f"or one number for every frame, got {shape}"
            )
        if isinstance(frame_offset, torch.Tensor):
            if tuple(frame_offset.shape) != (B, frames) or frame_offset.is_floating_point() or frame_offset.device != x.device:
                raise ValueError(
                    f"CausalWanDiT: 'frame_offset' as a tensor must be integer (B, F) = ({B}, {frames}) frame positions "
                    f"on {x.device}, got {frame_offset.dtype} {tuple(frame_offset.shape)} on {frame_offset.device}"
                )
        elif isinstance(frame_offset, bool) or not isinstance(frame_offset, int) or frame_offset < 0:
            raise ValueError(f"CausalWanDiT: 'frame_offset' must be a non-negative int or a (B, F) tensor, got {frame_offset!r}")
        if not isinstance(text, TextConditioning):
            raise ValueError(
                f"CausalWanDiT: 'text' must be a TextConditioning (from model.encode_text), got {type(text).__name__}"
            )
        if text.batch_size not in (1, B) or len(text.cross_k) != cfg.num_layers:
            raise ValueError(
                f"CausalWanDiT: 'text' has batch {text.batch_size} and {len(text.cross_k)} blocks; "
                f"expected batch 1 or {B} and {cfg.num_layers} blocks"
            )
        return frames

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        frame_offset: int | torch.Tensor,
        attention: AttentionContext | None,
        text: TextConditioning,
        kv_only: bool = False,
    ) -> torch.Tensor | None:
        """Velocity prediction for one chunk.

        Args:
            x: (B, C, F, H, W) latents of this chunk.
            timesteps: (B, F) one t in [0, 1000] per latent frame, (B,) the same t for every frame, or
                one number for every frame of every sequence (its time tables are cached per model:
                ``_time_conditioning``).
            frame_offset: temporal RoPE position of the chunk's first frame (frames before it in the video),
                or a (B, F) integer tensor of each sequence's frame positions (sequences batched at
                different positions; non-consecutive frames, e.g. a re-cache over sink + window).
            attention: the KV-cache view for this forward; None = attention over this chunk only.
            text: the prompt's ``TextConditioning`` (batch 1 broadcasts over B).
            kv_only: the caller wants only the K/V this forward writes into ``attention``'s cache (a
                clean pass, a re-cache): returns None and skips the head, and on the fused path
                everything of the last block after its K/V write.
        Returns:
            (B, C_out, F, H, W) in the model dtype, or None with ``kv_only``.
        """
        cfg = self.config
        frames = self._check_inputs(x, timesteps, frame_offset, text)
        if attention is None:
            attention = DenseAttention()
        B = x.shape[0]
        dtype = self.dtype
        pt, ph, pw = cfg.patch_size
        h, w = x.shape[3] // ph, x.shape[4] // pw
        tokens_per_frame = h * w

        # patch embedding -> (B, L, dim), frame-major
        tokens = self.patch_embedding(x.to(dtype)).flatten(2).transpose(1, 2).contiguous()
        L = tokens.shape[1]

        # per-frame time embedding and 6-way modulation, fp32: (B, F, dim), (B, F, 6, dim)
        time = self._time_conditioning(timesteps, B, frames, x.device)
        e, e0 = time.e, time.e0

        if self._fused_path(attention):
            y = self._blocks_fused(tokens, time, frame_offset, attention, text, frames, (h, w), kv_only)
        else:
            if isinstance(frame_offset, torch.Tensor):
                cos, sin = self.rope.tables_at(frame_offset, h, w)
            else:
                cos, sin = self.rope.tables(frame_offset, frames, h, w, x.device)
            for i, block in enumerate(self.blocks):
                tokens = self._block(i, block, tokens, e0, cos, sin, attention, text, frames, tokens_per_frame)
            if not kv_only:  # head: per-frame 2-way modulation
                mod = self.head.modulation.float()[:, None] + e[:, :, None]  # (B, F, 2, dim)
                shift, scale = mod[:, :, 0:1], mod[:, :, 1:2]
                y = _modulated_norm(tokens.view(B, frames, tokens_per_frame, -1), shift, scale, cfg.eps).to(dtype)
        if kv_only:
            return None
        out = self.head.head(y.view(B, L, -1))
        return self.unpatchify(out, frames, h, w)

    def _block(self, i, block: Block, x, e0, cos, sin, attention, text, frames, tpf):
        B, L, C = x.shape
        dtype = x.dtype
        mod = block.modulation.float()[:, None] + e0  # (B, F, 6, dim)
        shift, scale, gate, c_shift, c_scale, c_gate = (m[:, :, None] for m in mod.unbind(2))
        xf = x.view(B, frames, tpf, C)

        # self-attention
        sa = block.self_attn
        y = _modulated_norm(xf, shift, scale, block.eps).to(dtype).view(B, L, C)
        q = apply_rope(sa.heads(sa.norm_q(sa.q(y))), cos, sin)
        k = apply_rope(sa.heads(sa.norm_k(sa.k(y))), cos, sin)
        v = sa.heads(sa.v(y))
        o = attention.self_attention(i, q, k, v)
        y = sa.o(o.flatten(2))
        x = (xf.float() + y.view(B, frames, tpf, C).float() * gate).to(dtype)

        # cross-attention to the text (K/V precomputed)
        ca = block.cross_attn
        y = block.norm3(x.view(B, L, C))
        q = ca.heads(ca.norm_q(ca.q(y)))
        k, v = text.cross_k[i], text.cross_v[i]
        if k.shape[0] != B:
            k, v = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
        x = x.view(B, L, C) + ca.o(sdpa_blhd(q, k, v).flatten(2))

        # feed-forward
        xf = x.view(B, frames, tpf, C)
        y = block.ffn(_modulated_norm(xf, c_shift, c_scale, block.eps).to(dtype))
        x = (xf.float() + y.float() * c_gate).to(dtype)
        return x.view(B, L, C)

    # ------------------------------------------------------------------ fused path

    def _fused_path(self, attention) -> bool:
        """Whether this forward runs ``_blocks_fused``: the context asks for it (``fused_ops``) and can
        take the self-attention prologue (``self_attention_fused``), and the blocks have qk-norm."""
        return (bool(getattr(attention, "fused_ops", False)) and hasattr(attention, "self_attention_fused")
                and self.config.qk_norm)

    def _blocks_fused(self, x, time: "_TimeTables", frame_offset, attention, text, frames, grid_hw, kv_only=False):
        """The blocks and the head's adaLN through ``spiral_rt.ops``: the same math as ``_block`` and
        the head, with fewer passes over the (B, L, dim) activations.

        Per block: one ``modulated_norm`` that also adds the previous block's gated FFN output to the
        residual stream; q, k, v projections, then ``attention.self_attention_fused`` (qk RMSNorm, RoPE
        and the K/V write in one kernel, then attention); one ``modulated_norm`` for the gated residual
        add and the cross-attention LayerNorm (its affine weight and bias are a frame-independent
        modulation: scale = weight - 1, shift = bias); cross-attention; one ``modulated_norm`` for its
        residual add (gate 1) and the FFN's adaLN; the FFN. Returns the head's modulated input, or
        None with ``kv_only``: the last block then stops after writing its K/V (its attention, FFN and
        the head feed only the output: 1/30 of a Wan2.1-1.3B forward).
        """
        B, L, C = x.shape
        device = x.device
        if isinstance(frame_offset, torch.Tensor):
            frame_index = frame_offset.reshape(-1)
        else:
            frame_index = torch.arange(frame_offset, frame_offset + frames, device=device).repeat(B)
        if time.fused is None:
            time.fused = self._fused_tables(time)
        mods, norm3_mods, head_mod, ones = time.fused
        text_plan = _text_attention_plan(B, L, text)
        carry = None  # (branch, gate) of the residual add not yet applied: the previous block's FFN
        for i, block in enumerate(self.blocks):
            shift, scale, gate, c_shift, c_scale, c_gate = mods[i]
            if carry is None:
                y = modulated_norm(x, shift, scale, eps=block.eps).y
            else:
                y, x = modulated_norm(x, shift, scale, gate=carry[1], branch=carry[0], eps=block.eps)

            sa = block.self_attn
            attend = not (kv_only and i == len(self.blocks) - 1)
            o = attention.self_attention_fused(i, *_qkv_heads(sa, y),
                                               q_norm_weight=sa.norm_q.weight, k_norm_weight=sa.norm_k.weight,
                                               eps=sa.norm_q.eps, grid_hw=grid_hw, frame_index=frame_index,
                                               attend=attend, kv_only=kv_only)
            if not attend:
                return None
            branch = _linear(sa.o, o.flatten(2))
            n3 = block.norm3
            if isinstance(n3, nn.LayerNorm):
                n3_shift, n3_scale = norm3_mods[i]
                y, x = modulated_norm(x, n3_shift, n3_scale, gate=gate, branch=branch, eps=n3.eps)
            else:
                x = (x.view(B, frames, -1, C).float() + branch.view(B, frames, -1, C).float() * gate[:, :, None]).to(x.dtype).view(B, L, C)
                y = x

            ca = block.cross_attn
            q = _linear(ca.q, y)
            k, v = text.cross_k[i], text.cross_v[i]
            if text_plan is not None:
                if text.cross_k_q_weighted is not None:
                    # the query RMS norm as a per-row score scale, its weight in the keys: q read once, not rewritten
                    keys, row_scale = text.cross_k_q_weighted[i], row_inv_rms(q.view(B * L, C), ca.norm_q.eps)
                else:
                    q, keys, row_scale = _rms_norm_fused(ca.norm_q, q), k, None
                o = chunk_attention(q.view(B * L, *k.shape[2:]), keys, v, text_plan, q_row_scale=row_scale).o.view(B, L, C)
            else:
                q = ca.heads(_rms_norm_fused(ca.norm_q, q))
                if k.shape[0] != B:
                    k, v = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
                o = sdpa_blhd(q, k, v).flatten(2)
            branch = _linear(ca.o, o)
            y, x = modulated_norm(x, c_shift, c_scale, gate=ones, branch=branch, eps=block.eps)
            carry = (_ffn_fused(block.ffn, y), c_gate)

        return modulated_norm(x, head_mod[0], head_mod[1], gate=carry[1], branch=carry[0], eps=self.config.eps).y

    def _fused_tables(self, time: "_TimeTables") -> tuple:
        """What the fused path derives from the time embedding: the blocks' modulations and the
        norm3 affines (``_fused_modulations``), the head's (2, B, F, dim) shift and scale, and the
        all-ones (B, F, dim) gate of the cross-attention's residual add."""
        mods, norm3_mods = self._fused_modulations(time.e0)
        e = time.e
        head_mod = (self.head.modulation.float()[0, :, None, None] + e[None]).contiguous()  # (2, B, F, dim)
        return mods, norm3_mods, head_mod, torch.ones_like(e)

    def _fused_modulations(self, e0: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Every block's per-frame modulation for the fused path, built with a few kernels per forward
        instead of a dozen tiny ones per block (each costs a launch, ~1% of the DiT's time in all).

        Returns (num_layers, 6, B, F, dim): block i's shift, scale, gate, c_shift, c_scale, c_gate
        (``block.modulation + e0``, fp32), and {i: (2, B, F, dim)}: the cross-attention LayerNorm's
        affine of the blocks that have one, as a frame-independent modulation (shift = bias, scale =
        weight - 1). Each (B, F, dim) slice is contiguous, as ``modulated_norm`` takes it."""
        B, frames, _, C = e0.shape
        table = torch.cat([block.modulation for block in self.blocks]).float()  # (num_layers, 6, dim)
        mods = torch.empty((len(self.blocks), 6, B, frames, C), device=e0.device)  # contiguous, whatever e0's strides
        torch.add(table[:, :, None, None, :], e0.permute(2, 0, 1, 3), out=mods)
        norms = {i: block.norm3 for i, block in enumerate(self.blocks) if isinstance(block.norm3, nn.LayerNorm)}
        if not norms:
            return mods, {}

        def stacked(name: str, default: float) -> torch.Tensor:  # (num_norms, dim) fp32, one cast for all
            params = [getattr(n, name) for n in norms.values()]
            like = next((p for p in params if p is not None), None)
            fill = torch.full((C,), default, device=e0.device, dtype=like.dtype if like is not None else torch.float32)
            return torch.stack([p if p is not None else fill for p in params]).float()

        affine = torch.stack([stacked("bias", 0.0), stacked("weight", 1.0) - 1.0], dim=1)  # (num_norms, 2, dim)
        affine = affine[:, :, None, None, :].expand(-1, -1, B, frames, -1).contiguous()
        return mods, dict(zip(norms, affine))

    def unpatchify(self, out: torch.Tensor, frames: int, h: int, w: int) -> torch.Tensor:
        """(B, L, C_out * pt * ph * pw) -> (B, C_out, frames * pt, h * ph, w * pw)."""
        pt, ph, pw = self.config.patch_size
        B = out.shape[0]
        out = out.view(B, frames, h, w, pt, ph, pw, self.config.out_channels)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(B, self.config.out_channels, frames * pt, h * ph, w * pw)


def build_dit(config: WanDiTConfig, device=None, dtype: torch.dtype | None = None) -> CausalWanDiT:
    """A randomly initialised CausalWanDiT on ``device`` (default CPU), optionally cast with ``to_dtype``."""
    with torch.device(device or "cpu"):
        model = CausalWanDiT(config)
    if dtype is not None:
        model.to_dtype(dtype)
    return model.eval()
