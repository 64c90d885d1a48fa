"""``bias_residual_add``: out = y + bias[c] + residual in one pass, the end of a Wan VAE residual
block (the second convolution's output, its bias left out, plus the shortcut).

Shapes: y and residual (B, C, *spatial), at least 3 dims, the same shape, dtype (bf16/fp16/fp32)
and strides, dense and either contiguous or channels-last (the VAE's layout on a GPU); bias with
C elements on their device. Returns a new tensor in y's layout, or writes into ``out`` (same
shape, dtype and strides; it may be y or residual itself). Math in fp32, rounded once (see
``spiral_rt.reference.bias_residual_add``). Boundaries: inference only (no autograd formula).
Backends: triton (kernels/bias_residual_add.py), reference.
"""

from __future__ import annotations

import torch

from ..reference import bias_residual_add as _reference
from . import dispatch
from .channel_rms_norm import is_channels_last

OP = "bias_residual_add"
IMPLEMENTED = ("triton", "reference")
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def bias_residual_add(
    y: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """y + bias (per channel) + residual, one pass; see the module docstring.

    Args:
        y: (B, C, *spatial) activations, bf16/fp16/fp32, contiguous or channels-last.
        bias: C elements (any shape), bf16/fp16/fp32, on y's device.
        residual: like y (same shape, dtype and strides).
        out: optional destination like y (may alias y or residual); returned when given.
        backend: "triton" | "reference" | "auto"/None (see spiral_rt.ops.dispatch).
    """
    y = dispatch.check_tensor(OP, "y", y, dtypes=FLOAT_DTYPES, min_dim=3, contiguous=False)
    if not (y.is_contiguous() or is_channels_last(y)):
        raise ValueError(f"{OP}: argument 'y' must be contiguous or channels-last (strides {tuple(y.stride())} "
                         f"for shape {tuple(y.shape)} are neither); pass y.contiguous()")
    for name, t in (("residual", residual), ("out", out)):
        if t is None:
            continue
        dispatch.check_tensor(OP, name, t, shape=y.shape, dtypes=(y.dtype,), device=y.device, contiguous=False)
        if t.stride() != y.stride():
            raise ValueError(f"{OP}: argument '{name}' must have y's strides {tuple(y.stride())} (one layout for "
                             f"all), got {tuple(t.stride())}")
    bias = dispatch.check_tensor(OP, "bias", bias, dtypes=FLOAT_DTYPES, device=y.device, contiguous=False)
    if bias.numel() != y.shape[1]:
        raise ValueError(f"{OP}: argument 'bias' must have C = {y.shape[1]} elements, got shape {tuple(bias.shape)}")
    bias = bias.reshape(-1).contiguous()
    chosen = dispatch.select_backend(OP, y.device, IMPLEMENTED, backend)
    if out is None:
        out = torch.empty_like(y)  # y's layout
    dispatch.invoke(_bias_residual_add_op, _bias_residual_add_impl, y, bias, residual, out, chosen)
    return out


# ------------------------------------------------------------------ torch.library registration


def _bias_residual_add_impl(y: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, out: torch.Tensor,
                            backend: str) -> None:
    if backend == "reference":
        out.copy_(_reference.bias_residual_add(y, bias, residual))
        return
    from spiral_rt.kernels import bias_residual_add as kernel

    kernel.bias_residual_add(y, bias, residual, out, channels_last=is_channels_last(y))


_bias_residual_add_op = torch.library.custom_op("spiral_rt::bias_residual_add", _bias_residual_add_impl,
                                                mutates_args=("out",))


@_bias_residual_add_op.register_fake
def _(y, bias, residual, out, backend):
    return None
