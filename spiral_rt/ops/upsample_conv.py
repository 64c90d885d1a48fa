"""Nearest 2x upsampling + 3x3 convolution as a sub-pixel ("phase") convolution: one 2x2 conv of
the low-res input to 4 C_out channels (cuDNN, through ``F.conv2d``), then ``phase_interleave``,
which scatters its four channel blocks onto the 2x2 output phases. The identity, its weights and
why it is exact: ``spiral_rt.reference.upsample_conv``. The Wan VAE's ``Resample`` runs it (2.25x
fewer multiply-adds than convolving the upsampled frames, no 4x-sized intermediate).

``phase_interleave`` (the op with backends):
    y (N, 4C, H + 1, W + 1) -> out (N, C, 2H, 2W), out[n, c, 2h + a, 2w + b] = y[n, (2a + b) C + c, h + a, w + b]

y bf16/fp16/fp32, any strides (fast when the channels are innermost: channels-last, as the VAE's
conv writes it on a GPU); H, W >= 1. Returns a new tensor, channels-last when y is, else
contiguous, or writes into ``out`` (y's dtype, shape (N, C, 2H, 2W), dense: contiguous or
channels-last, not overlapping y). A copy: bit exact. Boundaries: inference only (no autograd
formula). Backends: triton (kernels/upsample_conv.py), reference.

``phase_weights`` turns the 3x3 conv's parameters into the 2x2 conv's (fp32 sums, one rounding);
``upsample_conv2d`` runs the whole thing on already-combined parameters (the caller caches them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import upsample_conv as _reference
from . import dispatch
from .channel_rms_norm import is_channels_last

OP = "phase_interleave"
IMPLEMENTED = ("triton", "reference")
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def phase_weights(weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(4 C_out, C_in, 2, 2) weights and (4 C_out,) bias of the sub-pixel conv equal to a 3x3 conv
    (``weight`` (C_out, C_in, 3, 3), ``bias`` (C_out,) or None) after nearest 2x upsampling; block
    2a + b is output phase (a, b). Summed in fp32, rounded once to weight's dtype; contiguous."""
    op = "phase_weights"
    dispatch.check_tensor(op, "weight", weight, dtypes=FLOAT_DTYPES + (torch.float64,), contiguous=False)
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"{op}: argument 'weight' must be (C_out, C_in, 3, 3), got {tuple(weight.shape)}")
    if bias is not None:
        dispatch.check_tensor(op, "bias", bias, device=weight.device, contiguous=False)
        if bias.numel() != weight.shape[0]:
            raise ValueError(f"{op}: argument 'bias' must have C_out = {weight.shape[0]} elements, got shape {tuple(bias.shape)}")
    return _reference.phase_weights(weight, bias)


def upsample_conv2d(x: torch.Tensor, phase_weight: torch.Tensor, phase_bias: torch.Tensor | None = None, *,
                    out: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """conv2d(upsample_nearest_2x(x), w, b, padding=1) for x (N, C_in, H, W), given the combined
    ``phase_weights(w, b)``: (N, C_out, 2H, 2W) in x's layout (channels-last when x and the
    weights are). ``backend`` picks the interleave's backend."""
    if not isinstance(phase_weight, torch.Tensor) or phase_weight.dim() != 4 or tuple(phase_weight.shape[2:]) != (2, 2) \
            or phase_weight.shape[0] % 4:
        shape = tuple(phase_weight.shape) if isinstance(phase_weight, torch.Tensor) else type(phase_weight).__name__
        raise ValueError(f"upsample_conv2d: argument 'phase_weight' must be (4 C_out, C_in, 2, 2) from phase_weights(), "
                         f"got {shape}")
    return phase_interleave(F.conv2d(x, phase_weight, phase_bias, padding=1), out=out, backend=backend)


def phase_interleave(y: torch.Tensor, *, out: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Scatter the four phase blocks of a sub-pixel conv's output onto the 2x upsampled grid; see
    the module docstring.

    Args:
        y: (N, 4C, H + 1, W + 1), bf16/fp16/fp32, any strides.
        out: optional (N, C, 2H, 2W) destination of y's dtype, contiguous or channels-last; returned when given.
        backend: "triton" | "reference" | "auto"/None (see spiral_rt.ops.dispatch).
    """
    y = dispatch.check_tensor(OP, "y", y, dtypes=FLOAT_DTYPES, contiguous=False)
    if y.dim() != 4 or y.shape[1] % 4 or y.shape[2] < 2 or y.shape[3] < 2:
        raise ValueError(f"{OP}: argument 'y' must be (N, 4C, H + 1, W + 1) with H, W >= 1, got {tuple(y.shape)}")
    N, C4, H1, W1 = y.shape
    shape = (N, C4 // 4, 2 * (H1 - 1), 2 * (W1 - 1))
    if N * shape[2] * shape[3] >= 2**31:
        raise ValueError(f"{OP}: argument 'y' has N * 2H * 2W = {N * shape[2] * shape[3]} output positions, "
                         "more than the kernel's int32 index covers (2**31); split the batch")
    chosen = dispatch.select_backend(OP, y.device, IMPLEMENTED, backend)
    if out is None:
        fmt = torch.channels_last if is_channels_last(y) else torch.contiguous_format
        out = torch.empty(shape, dtype=y.dtype, device=y.device, memory_format=fmt)
    else:
        dispatch.check_tensor(OP, "out", out, shape=shape, dtypes=(y.dtype,), device=y.device, contiguous=False)
        if not (out.is_contiguous() or is_channels_last(out)):
            raise ValueError(f"{OP}: argument 'out' must be contiguous or channels-last (strides {tuple(out.stride())} "
                             f"for shape {tuple(out.shape)} are neither)")
        if not torch.compiler.is_compiling() and out.numel() and y.numel() and _overlap(out, y):
            raise ValueError(f"{OP}: argument 'out' must not overlap 'y'")
    dispatch.invoke(_phase_interleave_op, _phase_interleave_impl, y, out, chosen)
    return out


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of a and b intersect (a conservative test)."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t):
        start = t.data_ptr()
        return start, start + sum((s - 1) * st for s, st in zip(t.shape, t.stride())) * t.element_size() + t.element_size()
    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


# ------------------------------------------------------------------ torch.library registration


def _phase_interleave_impl(y: torch.Tensor, out: torch.Tensor, backend: str) -> None:
    if backend == "reference":
        out.copy_(_reference.phase_interleave(y))
        return
    from spiral_rt.kernels import upsample_conv as kernel

    kernel.phase_interleave(y, out)


_phase_interleave_op = torch.library.custom_op("spiral_rt::phase_interleave", _phase_interleave_impl,
                                               mutates_args=("out",))


@_phase_interleave_op.register_fake
def _(y, out, backend):
    return None
