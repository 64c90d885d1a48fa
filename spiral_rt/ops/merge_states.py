"""``merge_states``: exact log-sum-exp merge of two partial attention states.

Given attention states (O_a, LSE_a) over key set A and (O_b, LSE_b) over a disjoint key set B of
the same queries, returns the state over A u B (see ``spiral_rt.reference.merge_states``)::

    lse = m + log(exp(lse_a - m) + exp(lse_b - m)),  m = max(lse_a, lse_b)
    O   = w_a O_a + w_b O_b,   w_x = exp(lse_x - lse)

Use: a group of G sequences that share prefix pages attends to the prefix in one
``chunk_attention`` launch (the G members' queries concatenated) and to each member's own pages in
another; this op combines the two. Empty key sets (LSE = -inf, O = 0) merge exactly.

Shapes: o_a, o_b (N, H, D) (any leading shape (..., D)) in bf16/fp16/fp32; lse_a, lse_b (N, H) fp32
(o's shape without the last dim). Returns ``AttentionState(o, lse)``, o in o_a's dtype, lse fp32.
Backends: triton (kernels/merge_states.py), reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..reference import merge_states as _reference
from . import dispatch

OP = "merge_states"
IMPLEMENTED = ("triton", "reference")
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class AttentionState(NamedTuple):
    """A (partial) attention state: output and log-sum-exp of the scores (natural log)."""

    o: torch.Tensor
    """(N, H, D) attention output, softmax-weighted mean of V."""
    lse: torch.Tensor
    """(N, H) fp32, log sum_j exp(score_j); -inf for an empty key set."""


def merge_states(
    o_a: torch.Tensor,
    lse_a: torch.Tensor,
    o_b: torch.Tensor,
    lse_b: torch.Tensor,
    *,
    backend: str | None = None,
) -> AttentionState:
    """Merge two attention states over disjoint key sets of the same queries.

    Args:
        o_a: (N, H, D) output over key set A, bf16/fp16/fp32, contiguous.
        lse_a: (N, H) fp32 log-sum-exp over A (-inf when A is empty).
        o_b: like o_a, over key set B.
        lse_b: like lse_a, over B.
        backend: "triton" | "reference" | "auto"/None (see spiral_rt.ops.dispatch).
    """
    o_a = dispatch.check_tensor(OP, "o_a", o_a, dtypes=FLOAT_DTYPES, min_dim=1)
    device = o_a.device
    if o_a.shape[-1] == 0:
        raise ValueError(f"{OP}: argument 'o_a' must have a non-empty last (head) dimension, got shape {tuple(o_a.shape)}")
    dispatch.check_tensor(OP, "lse_a", lse_a, shape=o_a.shape[:-1], dtypes=(torch.float32,), device=device)
    dispatch.check_tensor(OP, "o_b", o_b, shape=o_a.shape, dtypes=(o_a.dtype,), device=device)
    dispatch.check_tensor(OP, "lse_b", lse_b, shape=o_a.shape[:-1], dtypes=(torch.float32,), device=device)
    chosen = dispatch.select_backend(OP, device, IMPLEMENTED, backend)
    o, lse = dispatch.invoke(_merge_states_op, _merge_states_impl, o_a, lse_a, o_b, lse_b, chosen)
    return AttentionState(o, lse)


# ------------------------------------------------------------------ torch.library registration


def _merge_states_impl(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "reference":
        return _reference.merge_states(o_a, lse_a, o_b, lse_b)
    o = torch.empty_like(o_a)
    lse = torch.empty_like(lse_a)
    if o.numel():
        _run_triton(o_a, lse_a, o_b, lse_b, o, lse)
    return o, lse


_merge_states_op = torch.library.custom_op("spiral_rt::merge_states", _merge_states_impl, mutates_args=())


@_merge_states_op.register_fake
def _(o_a, lse_a, o_b, lse_b, backend):
    return torch.empty_like(o_a), torch.empty_like(lse_a)


# ------------------------------------------------------------------------------ backend glue


def _run_triton(o_a, lse_a, o_b, lse_b, o, lse):
    from spiral_rt.kernels import merge_states as kernel

    head_dim = o_a.shape[-1]
    kernel.merge_states(o_a.view(-1, head_dim), lse_a.view(-1), o_b.view(-1, head_dim), lse_b.view(-1),
                        o.view(-1, head_dim), lse.view(-1))
