"""``text_attention``: video queries over a prompt's text K/V, reading its repeated padding rows once.

A Wan prompt's text K/V are ``text_len`` (512) rows: the prompt's tokens, then zero padding that the
text MLP and the K/V projections turn into one repeated row. Wan attends to all of them, so a prompt
of n tokens costs the cross-attention 512 keys where n + 1 distinct ones carry the same result:
softmax weights over m identical keys sum to the weight of one key whose score is raised by log m.
The op takes ``distinct_rows`` (B,): for batch item b, rows ``[distinct_rows[b], Lt)`` of k[b] and
v[b] are identical (``CausalWanDiT.encode_text`` finds it from the text MLP's output), and reads
rows ``[0, distinct_rows[b]]`` only. The count lives on the device, so a prompt switch changes no
shapes (CUDA graphs replay as captured).

Shapes: q (B, Lq, H, D); k, v (B, Lt, H, D) or (1, Lt, H, D) (one prompt for every batch item), any
strides with a contiguous head dim; bf16/fp16/fp32. Returns (B, Lq, H, D) in q's dtype, contiguous.
Values of ``distinct_rows`` outside [0, Lt) are clamped by the kernel (no out-of-range read);
rows that are not in fact identical give the attention over the collapsed rows, not an error: the
count must come from the data (``encode_text``), never be guessed.
Backends: triton (kernels/text_attention.py), reference (spiral_rt.reference.text_attention: every row).
"""

from __future__ import annotations

import torch

from ..reference import text_attention as _reference
from . import dispatch

OP = "text_attention"
IMPLEMENTED = ("triton", "reference")
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def text_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    distinct_rows: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Softmax(q k^T / sqrt(D)) v over every text row, reading each repeated row once.

    Args:
        q: (B, Lq, H, D) queries, head dim contiguous.
        k: (B, Lt, H, D) or (1, Lt, H, D) text keys, q's dtype and device, head dim contiguous.
        v: like k, text values.
        distinct_rows: (B,) int32/int64 on q's device: rows of k[b], v[b] before the trailing run of
            identical rows (``TextConditioning.distinct_rows``).
        backend: "triton" | "reference" | "auto"/None (see spiral_rt.ops.dispatch).
    """
    q = dispatch.check_tensor(OP, "q", q, dtypes=FLOAT_DTYPES, contiguous=False)
    if q.dim() != 4:
        raise ValueError(f"{OP}: argument 'q' must be (B, Lq, H, D), got shape {tuple(q.shape)}")
    B, _, H, D = q.shape
    device = q.device
    k = dispatch.check_tensor(OP, "k", k, dtypes=(q.dtype,), device=device, contiguous=False)
    if k.dim() != 4 or k.shape[0] not in (1, B) or k.shape[2:] != (H, D) or k.shape[1] == 0:
        raise ValueError(f"{OP}: argument 'k' must be ({B} or 1, Lt >= 1, {H}, {D}), got shape {tuple(k.shape)}")
    dispatch.check_tensor(OP, "v", v, shape=k.shape, dtypes=(q.dtype,), device=device, contiguous=False)
    dispatch.check_tensor(OP, "distinct_rows", distinct_rows, shape=(B,), dtypes=INDEX_DTYPES, device=device)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{OP}: argument '{name}' must have a contiguous head dim (stride 1), got strides {tuple(t.stride())}")
    if k.shape[0] != B:
        k, v = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
    chosen = dispatch.select_backend(OP, device, IMPLEMENTED, backend)
    if chosen == "triton" and (D < 16 or D > 256 or D & (D - 1)):
        raise ValueError(f"{OP}: the triton backend needs a head dim that is a power of two in [16, 256], got q with D = {D}")
    return dispatch.invoke(_text_attention_op, _text_attention_impl, q, k, v, distinct_rows, chosen)


# ------------------------------------------------------------------ torch.library registration


def _text_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, distinct_rows: torch.Tensor,
                         backend: str) -> torch.Tensor:
    if backend == "reference":
        return _reference.text_attention(q, k, v, distinct_rows).contiguous()
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if o.numel():
        from spiral_rt.kernels import text_attention as kernel

        kernel.text_attention(q, k, v, distinct_rows, o)
    return o


_text_attention_op = torch.library.custom_op("spiral_rt::text_attention", _text_attention_impl, mutates_args=())


@_text_attention_op.register_fake
def _(q, k, v, distinct_rows, backend):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)
