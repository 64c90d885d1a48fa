"""``channel_rms_norm``: the Wan VAE's RMS norm over channels, optionally fused with the SiLU that
follows it in every residual block and in the decoder head.

    x = x + bias[c]                                              (when a bias is given)
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
floats. Returns a new tensor of x's shape, dtype and layout, or writes into ``out``: one to three
tensors of x's dtype, each (B, C, T_k, *x.shape[3:]) with T_k <= T = x.shape[2], receiving
x[:, :, :T_k]; within each, the positions (dims 2.. flattened) are evenly strided, and channels
are innermost when x is channels-last (the position stride may exceed C), outermost when x is
contiguous. Views into larger buffers qualify: a time slice of a channels-last buffer (the VAE's
causal convolution input, behind the cached frames) or a channel block of a buffer that stacks
three time-shifted copies of the frames along the channels (the VAE's time-folded convolution).
Boundaries: inference only (no autograd formula); the caller brings x into one of the two layouts.
Backends: triton (kernels/channel_rms_norm.py), reference.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    bias: torch.Tensor | None = None,
    out: torch.Tensor | Sequence[torch.Tensor] | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """RMS norm over dim 1 times scale * gamma, optionally followed by SiLU, in one pass.

    Args:
        x: (B, C, *spatial) activations, bf16/fp16/fp32, contiguous or channels-last, at least 3 dims.
        gamma: per-channel weight, any shape with C elements, bf16/fp16/fp32, on x's device.
        scale: positive multiplier of the normalized value (the VAE's sqrt(C)).
        silu: apply SiLU to the result (fused).
        eps: lower bound of the channel norm (> 0; F.normalize's default 1e-12).
        bias: optional per-channel value added to x first (C elements, on x's device): the bias of
            the convolution that produced x, deferred into this pass (the VAE's residual blocks).
        out: optional destination tensor or tensors (module docstring); returned when given.
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
    if bias is not None:
        bias = dispatch.check_tensor(OP, "bias", bias, dtypes=FLOAT_DTYPES, device=x.device, contiguous=False)
        if bias.numel() != channels:
            raise ValueError(f"{OP}: argument 'bias' must have C = {channels} elements, got shape {tuple(bias.shape)}")
        bias = bias.reshape(channels).contiguous()
    chosen = dispatch.select_backend(OP, x.device, IMPLEMENTED, backend)
    gamma = gamma.reshape(channels).contiguous()
    if out is None:
        return dispatch.invoke(_channel_rms_norm_op, _channel_rms_norm_impl, x, gamma, bias, float(scale), float(eps), silu, chosen)
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    if not 1 <= len(outs) <= MAX_OUTPUTS:
        raise ValueError(f"{OP}: argument 'out' must be a tensor or 1 to {MAX_OUTPUTS} tensors, got {len(outs)}")
    for k, o in enumerate(outs):
        _out_strides(x, o, "out" if isinstance(out, torch.Tensor) else f"out[{k}]")
    dispatch.invoke(_channel_rms_norm_out_op, _channel_rms_norm_out_impl, x, gamma, bias, outs, float(scale), float(eps), silu, chosen)
    return out


MAX_OUTPUTS = 3


def _out_strides(x: torch.Tensor, out, name: str) -> tuple[int, int]:
    """Check one destination (module docstring); returns its (channel stride, position stride)."""
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"{OP}: argument '{name}' must be a torch.Tensor, got {type(out).__name__}")
    want = (x.shape[0], x.shape[1], "T_k <= " + str(x.shape[2]), *x.shape[3:])
    if (out.dim() != x.dim() or out.shape[:2] != x.shape[:2] or out.shape[3:] != x.shape[3:]
            or out.shape[2] > x.shape[2]):
        raise ValueError(f"{OP}: argument '{name}' must have shape {want}, got {tuple(out.shape)}")
    out = dispatch.check_tensor(OP, name, out, dtypes=(x.dtype,), device=x.device, contiguous=False)
    spatial = out.shape[2:]
    positions = spatial.numel()
    sized = [d for d in range(2, out.dim()) if out.shape[d] > 1]  # a size-1 dim's stride is free
    channels_last = is_channels_last(x)
    pos_stride = out.stride(sized[-1]) // spatial[sized[-1] - 1:].numel() if sized else (x.shape[1] if channels_last else 1)
    chan_stride = out.stride(1) if out.shape[1] > 1 else (1 if channels_last else positions)
    even = all(out.stride(d) == pos_stride * spatial[d - 1:].numel() for d in sized)
    if channels_last:
        ok = even and chan_stride == 1 and pos_stride >= x.shape[1]
        kind = "channels innermost (stride 1) and positions evenly strided by at least C"
    else:
        ok = even and pos_stride == 1 and chan_stride >= positions
        kind = "positions contiguous and channel planes apart by at least T_k * H * W"
    if out.shape[0] > 1 and out.stride(0) == 0:
        raise ValueError(f"{OP}: argument '{name}' has overlapping batch items (batch stride 0)")
    if not ok:
        raise ValueError(f"{OP}: argument '{name}' must have {kind} (x is "
                         f"{'channels-last' if channels_last else 'contiguous'}), got strides {tuple(out.stride())}")
    return chan_stride, pos_stride


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether x (B, C, *spatial) is dense with the channels innermost (and is not also plainly
    contiguous, as tensors with C == 1 or no spatial extent are)."""
    return not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


# ------------------------------------------------------------------ torch.library registration


def _channel_rms_norm_out_impl(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None, out: list[torch.Tensor],
                               scale: float, eps: float, silu: bool, backend: str) -> None:
    if backend == "reference":
        y = _reference.channel_rms_norm(x, gamma, scale=scale, silu=silu, eps=eps, bias=bias)
        for o in out:
            o.copy_(y[:, :, : o.shape[2]])
    elif x.numel():
        from spiral_rt.kernels import channel_rms_norm as kernel

        # the strides again (checked in channel_rms_norm): the registered op carries tensors only
        dests = [(o, *_out_strides(x, o, "out")) for o in out if o.numel()]
        if dests:
            kernel.channel_rms_norm(x, gamma, dests, scale, eps, silu, channels_last=is_channels_last(x), bias=bias)


def _channel_rms_norm_impl(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None, scale: float, eps: float,
                           silu: bool, backend: str) -> torch.Tensor:
    if backend == "reference":
        return _reference.channel_rms_norm(x, gamma, scale=scale, silu=silu, eps=eps, bias=bias)
    y = torch.empty_like(x)  # same layout as x
    _channel_rms_norm_out_impl(x, gamma, bias, [y], scale, eps, silu, backend)
    return y


_channel_rms_norm_op = torch.library.custom_op("spiral_rt::channel_rms_norm", _channel_rms_norm_impl, mutates_args=())


@_channel_rms_norm_op.register_fake
def _(x, gamma, bias, scale, eps, silu, backend):
    return torch.empty_like(x)


_channel_rms_norm_out_op = torch.library.custom_op("spiral_rt::channel_rms_norm_out", _channel_rms_norm_out_impl,
                                                   mutates_args=("out",))


@_channel_rms_norm_out_op.register_fake
def _(x, gamma, bias, out, scale, eps, silu, backend):
    return None
