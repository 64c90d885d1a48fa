"""Cross-attention of video queries to a prompt's text K/V, reference implementation (eager
PyTorch; any device).

The text K/V of a Wan prompt are ``text_len`` (512) rows, the prompt's tokens followed by zero
padding; after the text MLP and the K/V projections every padding row is the same vector, and Wan
attends to all of them. The op's contract: for batch item b, rows ``[distinct_rows[b], Lt)`` of
``k[b]`` and ``v[b]`` are identical. The reference ignores ``distinct_rows`` and attends to every
row, which is the definition the fast path must match; the fast path reads only the first
``distinct_rows[b] + 1`` rows and counts the last of them ``Lt - distinct_rows[b]`` times.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def text_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, distinct_rows: torch.Tensor) -> torch.Tensor:
    """Reference of ``spiral_rt.ops.text_attention``: q (B, Lq, H, D), k, v (B, Lt, H, D) -> (B, Lq, H, D).

    Softmax(q k^T / sqrt(D)) v over all Lt rows, math in fp32 (fp64 for fp64 inputs), returned in
    q's dtype. ``distinct_rows`` is not read: it only tells the fast path which rows repeat."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = F.scaled_dot_product_attention(q.to(work).transpose(1, 2), k.to(work).transpose(1, 2),
                                         v.to(work).transpose(1, 2))
    return out.transpose(1, 2).to(q.dtype)


def text_attention_collapsed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             distinct_rows: torch.Tensor) -> torch.Tensor:
    """The fast path's arithmetic in eager PyTorch (for tests and as its readable description):
    per batch item, the first ``distinct_rows[b] + 1`` rows, the last one's score raised by
    log(Lt - distinct_rows[b]), i.e. weighted as the Lt - distinct_rows[b] identical rows it stands for."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    lt = k.shape[1]
    outs = []
    for b, n in enumerate(distinct_rows.tolist()):
        kb, vb = k[b, : n + 1].to(work), v[b, : n + 1].to(work)
        bias = torch.zeros(n + 1, dtype=work, device=q.device)
        bias[n] = torch.log(torch.tensor(float(lt - n), dtype=work))
        qb = q[b].to(work).transpose(0, 1)  # (H, Lq, D)
        o = F.scaled_dot_product_attention(qb, kb.transpose(0, 1), vb.transpose(0, 1), attn_mask=bias)
        outs.append(o.transpose(0, 1))
    return torch.stack(outs).to(q.dtype)
