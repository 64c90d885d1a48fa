"""``channel_rms_norm``: the Wan VAE's RMS norm over channels, optionally fused with the SiLU that
follows it in every residual block and in the decoder head.

    y = x / max(||x||_2 over dim 1, eps) * scale * gamma[c]      (F.normalize(x, dim=1), eps=1e-12)
    y = silu(y)                                                  (when silu=True)

All math in fp32, rounded once to x's dtype (see ``spiral_rt.reference.channel_rms_norm`` for how
this differs from the unfused bf16 path). One read-reduce pass and one read-write pass over x
instead of the eager path's normalize, cast, two multiplies and SiLU.

Shapes: x (B, C, *spatial), any number >= 1 of trailing dims (VAE: (B, C, T, H, W) in the residual
blocks and head, (B*T, C, H, W) in the attention block), bf16/fp16/fp32, dense in one of two
layouts: contiguous, or channels-last (the channels innermost, as torch.channels_last /
channels_last_3d lay them out; the VAE's layout on a GPU); gamma any shape with C elements
((C, 1, 1, 1) / (C, 1, 1) in the VAE), bf16/fp16/fp32; scale (sqrt(C) in the VAE) and eps positive
floats. Returns a new tensor of x's shape, dtype and layout.
Boundaries: inference only (no autograd formula); the caller brings x into one of the two layouts.
Backends: triton (kernels/channel_rms_norm.py), reference.
"""

from __future__ import annotations

import torch

from ..reference import channel_rms_norm as _reference
from . import dispatch

OP = "channel_rms_norm"
IMPLEMENTED = ("triton", "reference")
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def channel_rms_norm(
    x: torch.Tensor,
    gamma: torch.Tensor,
    *,
    scale: float,
    silu: bool = False,
    eps: float = 1e-12,
    backend: str | None = None,
) -> torch.Tensor:
    """RMS norm over dim 1 times scale * gamma, optionally followed by SiLU, in one pass.

    Args:
        x: (B, C, *spatial) activations, bf16/fp16/fp32, contiguous or channels-last, at least 3 dims.
        gamma: per-channel weight, any shape with C elements, bf16/fp16/fp32, on x's device.
        scale: positive multiplier of the normalized value (the VAE's sqrt(C)).
        silu: apply SiLU to the result (fused).
        eps: lower bound of the channel norm (> 0; F.normalize's default 1e-12).
        backend: "triton" | "reference" | "auto"/None (see spiral_rt.ops.dispatch).
    """
    x = dispatch.check_tensor(OP, "x", x, dtypes=FLOAT_DTYPES, min_dim=3, contiguous=False)
    if not (x.is_contiguous() or is_channels_last(x)):
        raise ValueError(f"{OP}: argument 'x' must be contiguous or channels-last (strides {tuple(x.stride())} "
                         f"for shape {tuple(x.shape)} are neither); pass x.contiguous()")
    channels = x.shape[1]
    gamma = dispatch.check_tensor(OP, "gamma", gamma, dtypes=FLOAT_DTYPES, device=x.device, contiguous=False)
    if gamma.numel() != channels:
        raise ValueError(f"{OP}: argument 'gamma' must have C = {channels} elements (one per channel of 'x'), "
                         f"got shape {tuple(gamma.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"{OP}: argument 'scale' must be a positive float, got {scale!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{OP}: argument 'eps' must be a positive float, got {eps!r}")
    if not isinstance(silu, bool):
        raise ValueError(f"{OP}: argument 'silu' must be a bool, got {silu!r}")
    chosen = dispatch.select_backend(OP, x.device, IMPLEMENTED, backend)
    return dispatch.invoke(_channel_rms_norm_op, _channel_rms_norm_impl,
                           x, gamma.reshape(channels).contiguous(), float(scale), float(eps), silu, chosen)


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether x (B, C, *spatial) is dense with the channels innermost (and is not also plainly
    contiguous, as tensors with C == 1 or no spatial extent are)."""
    return not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


# ------------------------------------------------------------------ torch.library registration


def _channel_rms_norm_impl(x: torch.Tensor, gamma: torch.Tensor, scale: float, eps: float, silu: bool,
                           backend: str) -> torch.Tensor:
    if backend == "reference":
        return _reference.channel_rms_norm(x, gamma, scale=scale, silu=silu, eps=eps)
    y = torch.empty_like(x)  # same layout as x
    if x.numel():
        from spiral_rt.kernels import channel_rms_norm as kernel

        kernel.channel_rms_norm(x, gamma, y, scale, eps, silu, channels_last=is_channels_last(x))
    return y


_channel_rms_norm_op = torch.library.custom_op("spiral_rt::channel_rms_norm", _channel_rms_norm_impl, mutates_args=())


@_channel_rms_norm_op.register_fake
def _(x, gamma, scale, eps, silu, backend):
    return torch.empty_like(x)
