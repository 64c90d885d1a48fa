"""FlashAttention 3 as an optional backend of ``chunk_attention`` (``backend="fa3"``).

FA3's forward reads a paged K/V cache in exactly the layout of ``spiral_rt.cache``: pages of shape
(num_pages, page_size, H_kv, D), a dense page table per sequence and a key count per sequence, with
varlen queries. So the engine can run its attention through FA3 on Hopper when FA3 is installed
(``pip install fa3-fwd``: a prebuilt forward, module ``fa3_fwd_interface``; or a flash-attn Hopper
build, module ``flash_attn_interface``), with the same plan, pages and (O, LSE) contract as the
Triton kernel. Nothing here is required: without FA3 the dispatcher picks the next backend.

Boundaries: the import, the availability check and the one call; plans and checks live in
``spiral_rt.ops.chunk_attention``.
"""

from __future__ import annotations

import functools
import importlib

import torch

MODULES = ("fa3_fwd_interface", "flash_attn_interface")
"""Where FA3's Python interface lives, in order: the ``fa3-fwd`` wheel, a flash-attn Hopper build."""


@functools.lru_cache(maxsize=None)
def _load():
    """(module, None) when FA3 imports, else (None, why)."""
    errors = []
    for name in MODULES:
        try:
            return importlib.import_module(name), None
        except Exception as err:  # noqa: BLE001 - any import failure means "not available here"
            errors.append(f"{name}: {type(err).__name__}: {err}")
    return None, "FA3 is not installed (pip install fa3-fwd): " + "; ".join(errors)


def module():
    """FA3's interface module, or None when it does not import."""
    return _load()[0]


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def unavailable_reason(device: torch.device) -> str | None:
    """Why FA3 cannot run tensors on ``device`` (None when it can)."""
    if device.type != "cuda":
        return f"the fa3 backend needs CUDA tensors, got tensors on {device}"
    fa3, why = _load()
    if fa3 is None:
        return why
    major, minor = _capability(device.index if device.index is not None else torch.cuda.current_device())
    if major != 9:
        return f"FA3 runs on Hopper GPUs (sm_90) only; this GPU is sm_{major}{minor}"
    return None


def paged_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, page_table: torch.Tensor,
                    kv_lens: torch.Tensor, q_indptr: torch.Tensor, max_q_len: int,
                    sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """O (total_q, H, D) and LSE (total_q, H) fp32 of varlen queries over paged K/V, no mask.

    ``page_table`` (S, max_pages) int32, ``kv_lens`` (S,) int32 keys per sequence, ``q_indptr``
    (S+1,) int32; inputs already checked by ``chunk_attention``.
    """
    out = module().flash_attn_with_kvcache(
        q, k_pages, v_pages, cache_seqlens=kv_lens, page_table=page_table, cu_seqlens_q=q_indptr,
        max_seqlen_q=max_q_len, softmax_scale=sm_scale, causal=False, return_softmax_lse=True)
    o, lse = out[0], out[1]
    if lse.shape[0] != q.shape[0]:  # varlen LSE comes as (H, total_q)
        lse = lse.transpose(0, 1)
    return o, lse.contiguous()
