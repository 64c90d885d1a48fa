"""``narrow_causal_conv3d``: a causal 3x3x3 convolution to few (<= 16) output channels, reading
the two cached frames before the chunk from their own tensor (no concatenated copy):

    y = conv3d(cat([past, x], dim=2), weight, bias, padding=(0, 1, 1))      (B, C_out, T, H, W)

The Wan VAE decoder's head (96 -> 3 channels at full resolution): cuDNN, given 3 output channels,
runs it in a slow generic kernel (H100, 12 x 480 x 832: 3.6 ms as the time-folded conv2d), and the
time-folded form needs its input written three times. This op reads the norm's output once.

Shapes: x (B, C, T, H, W), bf16/fp16/fp32, any strides (fast when the channels are innermost:
channels-last, the VAE's GPU layout); past (B, C, 2, H, W) of x's dtype (zeros when None: the
start of a video); weight (C_out, C, 3, 3, 3) of x's dtype, 1 <= C_out <= 16; bias C_out elements
(any float dtype) or None. Returns y (B, C_out, T, H, W) contiguous, x's dtype. Math: fp32
accumulation, one rounding (``spiral_rt.reference.narrow_causal_conv3d``). Boundaries: inference
only (no autograd formula); the caller updates its frame cache. Backends: triton
(kernels/narrow_causal_conv3d.py: the 9 spatial taps as GEMM columns for C_out <= 4, a plain
implicit GEMM above), reference.
"""

from __future__ import annotations

import torch

from ..reference import narrow_causal_conv3d as _reference
from . import dispatch

OP = "narrow_causal_conv3d"
IMPLEMENTED = ("triton", "reference")
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_OUT_CHANNELS = 16
PAST_FRAMES = 2


def narrow_causal_conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    past: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal 3x3x3 conv of x behind ``past`` to C_out <= 16 channels; see the module docstring.

    Args:
        x: (B, C, T, H, W) activations, bf16/fp16/fp32, any strides.
        weight: (C_out, C, 3, 3, 3), x's dtype and device.
        bias: optional, C_out elements, on x's device.
        past: optional (B, C, 2, H, W), the two input frames before x (zeros when None).
        backend: "triton" | "reference" | "auto"/None (see spiral_rt.ops.dispatch).
    """
    x = dispatch.check_tensor(OP, "x", x, dtypes=FLOAT_DTYPES, contiguous=False)
    if x.dim() != 5 or x.shape[2] == 0:
        raise ValueError(f"{OP}: argument 'x' must be (B, C, T >= 1, H, W), got {tuple(x.shape)}")
    B, C, T, H, W = x.shape
    weight = dispatch.check_tensor(OP, "weight", weight, dtypes=(x.dtype,), device=x.device, contiguous=False)
    if weight.dim() != 5 or weight.shape[1] != C or tuple(weight.shape[2:]) != (3, 3, 3) \
            or not 1 <= weight.shape[0] <= MAX_OUT_CHANNELS:
        raise ValueError(f"{OP}: argument 'weight' must be (C_out, {C}, 3, 3, 3) with 1 <= C_out <= {MAX_OUT_CHANNELS}, "
                         f"got {tuple(weight.shape)}")
    cout = weight.shape[0]
    if bias is not None:
        bias = dispatch.check_tensor(OP, "bias", bias, dtypes=FLOAT_DTYPES, device=x.device, contiguous=False)
        if bias.numel() != cout:
            raise ValueError(f"{OP}: argument 'bias' must have C_out = {cout} elements, got shape {tuple(bias.shape)}")
    if past is not None:
        dispatch.check_tensor(OP, "past", past, shape=(B, C, PAST_FRAMES, H, W), dtypes=(x.dtype,), device=x.device,
                              contiguous=False)
    for name, t in (("x", x), ("past", past)):
        if t is not None and _frame_span(t) >= 2**31:
            raise ValueError(f"{OP}: argument '{name}' has frames spanning >= 2**31 elements (strides "
                             f"{tuple(t.stride())}); the kernel indexes within a frame in int32")
    chosen = dispatch.select_backend(OP, x.device, IMPLEMENTED, backend)
    y = torch.empty((B, cout, T, H, W), dtype=x.dtype, device=x.device)
    if _frame_span(y) >= 2**31:
        raise ValueError(f"{OP}: output frames of {H} x {W} are too large for the kernel's int32 indexing")
    dispatch.invoke(_narrow_causal_conv3d_op, _narrow_causal_conv3d_impl, x, weight, bias, past, y, chosen)
    return y


def _frame_span(t: torch.Tensor) -> int:
    """Elements between the first and last of one (C, H, W) frame of a (B, C, T, H, W) tensor."""
    return sum((t.shape[d] - 1) * abs(t.stride(d)) for d in (1, 3, 4)) + 1


# ------------------------------------------------------------------ torch.library registration


def _narrow_causal_conv3d_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               past: torch.Tensor | None, y: torch.Tensor, backend: str) -> None:
    if backend == "reference":
        y.copy_(_reference.narrow_causal_conv3d(x, weight, bias, past))
        return
    from spiral_rt.kernels import narrow_causal_conv3d as kernel

    cout = weight.shape[0]
    block_k = kernel.block_k_for(x.shape[1])
    variant = kernel.default_variant(cout)
    packed = (kernel.pack_shift if variant == "shift" else kernel.pack_direct)(weight, block_k)
    b = None
    if bias is not None:
        b = torch.zeros(MAX_OUT_CHANNELS, dtype=torch.float32, device=x.device)
        b[:cout] = bias.reshape(-1)
    kernel.narrow_causal_conv3d(x, past, packed, b, y, cout, block_k, variant=variant)


_narrow_causal_conv3d_op = torch.library.custom_op("spiral_rt::narrow_causal_conv3d", _narrow_causal_conv3d_impl,
                                                   mutates_args=("y",))


@_narrow_causal_conv3d_op.register_fake
def _(x, weight, bias, past, y, backend):
    return None
