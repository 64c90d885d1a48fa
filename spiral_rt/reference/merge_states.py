"""Exact merge of two partial attention states, reference implementation (eager PyTorch; any device).

A partial attention state over a key set K is (O, LSE): O the softmax-weighted mean of V over K and
LSE = log sum_{j in K} exp(s_j) (natural log). For disjoint key sets A and B the state over A u B is

    m   = max(lse_a, lse_b)
    w_a = exp(lse_a - m),  w_b = exp(lse_b - m)
    lse = m + log(w_a + w_b)
    O   = (w_a O_a + w_b O_b) / (w_a + w_b)

An empty key set has LSE = -inf (and O = 0 by convention); merging two empty states gives
LSE = -inf and O = 0, merging an empty with a non-empty state returns the non-empty one.
Math in fp32 (or fp64 when the inputs are fp64); O is returned in o_a's dtype, LSE in fp32 (fp64
for fp64 inputs).
"""

from __future__ import annotations

import torch


def merge_states(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``spiral_rt.ops.merge_states``: o (..., D), lse (...) -> (o, lse)."""
    work = torch.float64 if o_a.dtype == torch.float64 else torch.float32
    la, lb = lse_a.to(work), lse_b.to(work)
    m = torch.maximum(la, lb)
    m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(la - m_safe), torch.exp(lb - m_safe)
    total = wa + wb
    nonempty = total > 0
    lse = torch.where(nonempty, m_safe + torch.log(torch.where(nonempty, total, torch.ones_like(total))),
                      torch.full_like(total, float("-inf")))
    inv = torch.where(nonempty, 1.0 / torch.where(nonempty, total, torch.ones_like(total)), torch.zeros_like(total))
    o = (wa * inv)[..., None] * o_a.to(work) + (wb * inv)[..., None] * o_b.to(work)
    return o.to(o_a.dtype), lse
