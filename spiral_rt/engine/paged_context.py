"""The DiT's attention context over the paged KV cache: K/V writes and chunk attention per layer.

Role: the glue between ``spiral_rt.models.attention.AttentionContext`` (what the DiT calls once per
layer with q, k, v of shape (B, L, H, D), already qk-normed and rotated) and the paged cache
(``spiral_rt.cache.PagedKVCache`` + one ``ChunkPlan``). Per layer it

1. scatters this forward's k, v into the pool rows ``plan.device.write_slots`` (the chunk's own
   reserved slots for an append plan, the rewritten frames' slots for a rewrite plan), then
2. runs ``spiral_rt.ops.chunk_attention`` of the B sequences' queries over their page lists
   (sink/window/history pages, then the chunk's own pages), varlen over sequences.

With ``fused=True`` the DiT takes its fused path and calls ``self_attention_fused`` with q, k, v
straight from the projections instead: ``spiral_rt.ops.qk_norm_rope_kv_write`` norms and rotates q
and k and writes k, v into the same slots in one kernel, then step 2 runs as above. In a denoising
forward of an append plan whose chunk fills whole pages (``own_pages_of``), the chunk's own K/V are
read by the attention only, so they are not written at all: the rotated k goes back in place into
the projection's output, and the attention reads the chunk's pages from there (``chunk_attention``'s
own rows) with the context from the pool. The clean pass (``kv_only``) writes the pages as before.

Denoising steps write into the chunk's *reserved, uncommitted* slots only: they are scratch until
the clean pass overwrites them and the engine commits the plan, so committed context is never
changed by a denoising step (this is why a forward at any step can read its own chunk through the
same page lists). A context built with ``write=False`` skips the scatter (the slots must then
already hold this forward's K/V; only useful for tests and graph replays that rewrite elsewhere).

Plan once, run many: ``build_attention_plan`` turns a ``ChunkPlan``'s host tables into the op's
``ChunkAttentionPlan`` once per chunk; every layer, denoising step and the clean pass reuse it.
The op plans on the host and uploads all tables in one pinned, non-blocking copy (no host sync).

RoPE positions: the DiT takes per-sequence frame positions as a (B, F) tensor, the plan's
``q_frame_idx`` (``plan_positions``), so sequences at different positions share one DiT call and
a rewrite plan's frames keep their absolute positions.

Boundaries: no scheduling, sampling or decoding here (``spiral_rt.engine.engine``); no page
bookkeeping (``spiral_rt.cache``).
"""

from __future__ import annotations

import logging

import torch

from spiral_rt.cache import ChunkPlan, PagedKVCache
from spiral_rt.ops import AttentionConfig, ChunkAttentionPlan, chunk_attention, plan_chunk_attention, qk_norm_rope_kv_write

logger = logging.getLogger(__name__)

_NUM_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # what plan_chunk_attention assumes off the GPU
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def build_attention_plan(
    cache: PagedKVCache,
    plan: ChunkPlan,
    *,
    dtype: torch.dtype | None = None,
    config: AttentionConfig | None = None,
) -> ChunkAttentionPlan:
    """The ``chunk_attention`` plan of one cache plan, built on the host and uploaded without a sync.

    Args:
        cache: the cache whose pool the attention reads (page count, page size, heads, head dim).
        plan: from ``cache.plan_chunk`` / ``cache.plan_rewrite``.
        dtype: dtype of q and the pages; default the pool's.
        config: kernel config (default: chosen by shape, see ``spiral_rt.ops.chunk_attention``).
    The plan reads each sequence's chunk pages from own rows when given them (``own_pages_of``).
    """
    if not isinstance(plan, ChunkPlan):
        raise ValueError(f"build_attention_plan: 'plan' must be a ChunkPlan, got {type(plan).__name__}")
    cfg = cache.config
    dtype = dtype or cfg.dtype
    host = plan.host
    return plan_chunk_attention(
        host.q_indptr, host.kv_indptr, host.kv_indices, host.kv_last_page_len,
        page_size=cache.page_size, num_pages=cache.num_pages, num_qo_heads=cfg.num_heads, head_dim=cfg.head_dim,
        num_kv_heads=cfg.num_heads, dtype=dtype, device=cache.device, config=config, num_sms=_num_sms(cache.device),
        own_pages=own_pages_of(plan),
    )


def own_pages_of(plan: ChunkPlan) -> list[int] | None:
    """Per sequence, the pages that hold its chunk's own K/V, when the query rows can stand in for
    them: an append plan whose every sequence's context ends on a page boundary and whose chunk
    fills whole pages (one frame a page, as the engine's caches are laid out). Else None."""
    if plan.kind != "append":
        return None
    host, size = plan.host, plan.page_size
    q_lens = [c * plan.tokens_per_frame for c in plan.num_q_frames]
    if any(n % size or c % size for n, c in zip(q_lens, host.kv_context_len.tolist())):
        return None
    return [n // size for n in q_lens]


class PagedAttentionContext:
    """``AttentionContext`` over a ``PagedKVCache`` and one ``ChunkPlan`` (module docstring).

    Args:
        cache: the pool (``cache.kv`` of shape (num_layers, 2, num_pages, page_size, H, D)).
        plan: the chunk's cache plan; its sequences' queries must have equal lengths (the DiT runs
            them as one (B, L) batch) and appear in plan order.
        attention_plan: from ``build_attention_plan(cache, plan)``; built here when None.
        write: scatter each forward's k, v into ``plan.device.write_slots`` before attending.
        backend: backend of ``chunk_attention`` and ``qk_norm_rope_kv_write`` ("reference", "triton",
            or None/"auto").
        sm_scale: softmax scale (default 1/sqrt(D), what the model's SDPA uses).
        fused: offer the DiT its fused path (``fused_ops``; needs ``write``): the model then calls
            ``self_attention_fused`` with q, k, v before qk-norm and RoPE.
        own_kv: on the fused path, let forwards that are not ``kv_only`` read the chunk's own K/V from
            the projection instead of writing them (module docstring); in effect (``self.own_kv``)
            when the plan allows it and the attention backend is cuda or reference.
    """

    def __init__(self, cache: PagedKVCache, plan: ChunkPlan, attention_plan: ChunkAttentionPlan | None = None, *,
                 write: bool = True, backend: str | None = None, sm_scale: float | None = None, fused: bool = False,
                 own_kv: bool = True):
        if not isinstance(cache, PagedKVCache):
            raise ValueError(f"PagedAttentionContext: 'cache' must be a PagedKVCache, got {type(cache).__name__}")
        if not isinstance(plan, ChunkPlan):
            raise ValueError(f"PagedAttentionContext: 'plan' must be a ChunkPlan, got {type(plan).__name__}")
        q_lens = {c * plan.tokens_per_frame for c in plan.num_q_frames}
        if len(q_lens) != 1:
            raise ValueError(f"PagedAttentionContext: 'plan' has sequences of {sorted(plan.num_q_frames)} query frames; "
                             "one DiT call needs equal lengths (group sequences by chunk length)")
        self.cache = cache
        self.plan = plan
        self.attention_plan = attention_plan if attention_plan is not None else build_attention_plan(cache, plan)
        self.write = write
        self.backend = backend
        self.sm_scale = sm_scale
        self.q_len = q_lens.pop()
        self.write_slots = plan.device.write_slots
        self.fused_ops = bool(fused) and write
        ap = self.attention_plan
        # the denoising forwards' own K/V from the projection: a backend that reads own rows at speed
        self.own_kv = bool(own_kv) and ap.own_pages is not None and (backend == "reference" or (
            backend in (None, "auto", "cuda") and ap.cuda_reason is None))

    def _check_q(self, q: torch.Tensor, k_pages: torch.Tensor) -> None:
        B, L = q.shape[:2]
        if B != self.plan.num_seqs or L != self.q_len:
            raise ValueError(f"PagedAttentionContext: q is (B, L) = ({B}, {L}); the plan has {self.plan.num_seqs} "
                             f"sequence(s) of {self.q_len} query tokens")
        if q.dtype != k_pages.dtype:
            raise ValueError(f"PagedAttentionContext: q is {q.dtype} but the KV pool is {k_pages.dtype}; "
                             "build the cache with the model's dtype")

    def self_attention_fused(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                             q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor, eps: float,
                             grid_hw: tuple[int, int], frame_index: torch.Tensor,
                             attend: bool = True, kv_only: bool = False) -> torch.Tensor | None:
        """``self_attention`` for q, k, v (B, L, H, D) straight from the projections: qk RMSNorm (over
        all heads), Wan's 3D RoPE at ``frame_index`` ((B * F,) absolute frame of each query frame) on a
        ``grid_hw`` token grid, and the K/V write run as one ``qk_norm_rope_kv_write``, then attention
        (``attend=False``: the K/V write alone, returning None). ``kv_only``: the forward exists for
        the K/V it writes (a clean pass): the pages are written. Otherwise, with ``own_kv``, they are
        not: k is rotated in place and the attention reads the chunk's K/V from k and v."""
        if not self.write:
            raise ValueError("PagedAttentionContext.self_attention_fused: this context does not write K/V (write=False)")
        k_pages, v_pages = self.cache.layer(layer)
        self._check_q(q, k_pages)
        B, L, H, D = q.shape
        rows = [t.reshape(B * L, H, D) for t in (q, k, v)]
        # in place into the projection's output: only with autograd off (inference forwards)
        own = self.own_kv and attend and not kv_only and not torch.is_grad_enabled()
        pages = (None, None, None) if own else (k_pages, v_pages, self.write_slots)
        q_rot = qk_norm_rope_kv_write(*rows, q_norm_weight, k_norm_weight, *pages, k_out=rows[1] if own else None,
                                      grid_hw=tuple(grid_hw), frame_index=frame_index, eps=eps, backend=self.backend)
        if not attend:
            return None
        own_rows = {"own_k": rows[1], "own_v": rows[2]} if own else {}
        state = chunk_attention(q_rot, k_pages, v_pages, self.attention_plan, sm_scale=self.sm_scale,
                                backend=self.backend, **own_rows)
        return state.o.view(B, L, H, D)

    def self_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_pages, v_pages = self.cache.layer(layer)
        self._check_q(q, k_pages)
        B, L, H, D = q.shape
        if self.write:
            rows = k_pages.shape[0] * k_pages.shape[1]
            k_pages.view(rows, H, D).index_copy_(0, self.write_slots, k.reshape(B * L, H, D))
            v_pages.view(rows, H, D).index_copy_(0, self.write_slots, v.reshape(B * L, H, D))
        state = chunk_attention(q.reshape(B * L, H, D), k_pages, v_pages, self.attention_plan,
                                sm_scale=self.sm_scale, backend=self.backend)
        return state.o.view(B, L, H, D)


def plan_positions(frame_idx: torch.Tensor, batch: int) -> torch.Tensor:
    """A plan's query frame positions (B * F,) as the (B, F) ``frame_offset`` tensor of the DiT."""
    if frame_idx.dim() != 1 or frame_idx.numel() % batch:
        raise ValueError(f"plan_positions: 'frame_idx' must be 1-D with a multiple of batch={batch} entries, "
                         f"got shape {tuple(frame_idx.shape)}")
    return frame_idx.view(batch, -1)
