"""``modulated_norm``: adaLN of the Wan blocks, LayerNorm(x) * (1 + scale) + shift with per-frame
modulation, optionally fused with the gated residual add that precedes it.

    y = LayerNorm(x) * (1 + scale[frame]) + shift[frame]          (no affine, eps=1e-6)

With ``gate`` and ``branch`` (the attention or FFN output of the previous sub-block) the op first
updates the residual stream, x_new = x + gate[frame] * branch, and normalizes x_new as stored;
it returns both, reading x and branch once (see ``spiral_rt.reference.modulated_norm``).

Shapes: x, branch (B, L, C); shift, scale, gate (B, F, C), F frames of L / F consecutive tokens
(F = 1: one modulation for the whole sequence). x, branch bf16/fp16/fp32; modulation tensors any
float dtype (fp32 in Wan), loaded as fp32; all math fp32. Returns ``ModulatedNormResult(y, x_new)``:
y in ``out_dtype`` (default x's dtype), x_new in x's dtype or None when unfused.
Backends: triton (kernels/modulated_norm.py), reference.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..reference import modulated_norm as _reference
from . import dispatch

OP = "modulated_norm"
IMPLEMENTED = ("triton", "reference")
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class ModulatedNormResult(NamedTuple):
    y: torch.Tensor
    """(B, L, C) normalized and modulated activations, in out_dtype."""
    x_new: Optional[torch.Tensor]
    """(B, L, C) updated residual x + gate * branch in x's dtype; None when unfused."""


def modulated_norm(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    *,
    gate: torch.Tensor | None = None,
    branch: torch.Tensor | None = None,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> ModulatedNormResult:
    """Per-frame modulated LayerNorm, optionally after a gated residual add.

    Args:
        x: (B, L, C) residual stream, bf16/fp16/fp32, contiguous.
        shift, scale: (B, F, C) per-frame modulation (F divides L), float, contiguous.
        gate: (B, F, C) per-frame gate of the residual add; given together with branch.
        branch: (B, L, C) sub-block output added to x as x + gate * branch.
        eps: LayerNorm epsilon (> 0).
        out_dtype: dtype of y (bf16/fp16/fp32); default x's dtype.
        backend: "triton" | "reference" | "auto"/None (see spiral_rt.ops.dispatch).
    """
    x = dispatch.check_tensor(OP, "x", x, dtypes=FLOAT_DTYPES)
    if x.dim() != 3:
        raise ValueError(f"{OP}: argument 'x' must have shape (B, L, C), got {tuple(x.shape)}")
    batch, seq_len, channels = x.shape
    device = x.device
    if not isinstance(shift, torch.Tensor) or shift.dim() != 3:
        raise ValueError(f"{OP}: argument 'shift' must be a tensor of shape (B, F, C) = ({batch}, F, {channels})")
    num_frames = shift.shape[1]
    if num_frames < 1 or seq_len % num_frames:
        raise ValueError(f"{OP}: argument 'shift' has F = {num_frames} frames, which must be >= 1 and divide "
                         f"the sequence length L = {seq_len} of 'x'")
    mod_shape = (batch, num_frames, channels)
    dispatch.check_tensor(OP, "shift", shift, shape=mod_shape, dtypes=FLOAT_DTYPES, device=device)
    dispatch.check_tensor(OP, "scale", scale, shape=mod_shape, dtypes=FLOAT_DTYPES, device=device)
    if (gate is None) != (branch is None):
        raise ValueError(f"{OP}: pass 'gate' and 'branch' together (fused gated residual add) or neither")
    if gate is not None:
        dispatch.check_tensor(OP, "gate", gate, shape=mod_shape, dtypes=FLOAT_DTYPES, device=device)
        dispatch.check_tensor(OP, "branch", branch, shape=x.shape, dtypes=FLOAT_DTYPES, device=device)
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"{OP}: argument 'eps' must be a positive float, got {eps!r}")
    out_dtype = out_dtype or x.dtype
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"{OP}: argument 'out_dtype' must be one of bfloat16, float16, float32, got {out_dtype}")
    chosen = dispatch.select_backend(OP, device, IMPLEMENTED, backend)
    y, x_new = dispatch.invoke(_modulated_norm_op, _modulated_norm_impl, x, shift, scale, gate, branch, float(eps), out_dtype, chosen)
    return ModulatedNormResult(y, x_new if gate is not None else None)


# ------------------------------------------------------------------ torch.library registration


def _modulated_norm_impl(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    gate: Optional[torch.Tensor],
    branch: Optional[torch.Tensor],
    eps: float,
    out_dtype: torch.dtype,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "reference":
        y, x_new = _reference.modulated_norm(x, shift, scale, gate, branch, eps, out_dtype)
        return y, (x_new if x_new is not None else x.new_empty(0))
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    x_new = torch.empty_like(x) if branch is not None else None
    if x.numel():
        from spiral_rt.kernels import modulated_norm as kernel

        kernel.modulated_norm(x, shift, scale, gate, branch, y, x_new, shift.shape[1], eps)
    return y, (x_new if x_new is not None else x.new_empty(0))


_modulated_norm_op = torch.library.custom_op("spiral_rt::modulated_norm", _modulated_norm_impl, mutates_args=())


@_modulated_norm_op.register_fake
def _(x, shift, scale, gate, branch, eps, out_dtype, backend):
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    return y, (torch.empty_like(x) if branch is not None else x.new_empty(0))
