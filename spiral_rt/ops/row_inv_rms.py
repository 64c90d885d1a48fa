"""``row_inv_rms``: 1 / sqrt(mean(x[i]^2) + eps) for every row of x, fp32.

The factor an RMS norm applies to a row, without the normalised row itself: the DiT's fused
cross-attention passes it to ``chunk_attention(q_row_scale=...)`` so the query norm costs one read
of q instead of a read and a write (the norm's weight folded into the text keys once a prompt).

Shapes: x (M, N), bf16/fp16/fp32 (fp64 on the reference backend), unit stride along N (any row
stride), 1 <= N <= 16384. Returns (M,) fp32 (fp64 for fp64 x). Boundaries: inference only (no
autograd formula). Backends: triton (kernels/row_inv_rms.py), reference.
"""

from __future__ import annotations

import torch

from ..reference import row_inv_rms as _reference
from . import dispatch

OP = "row_inv_rms"
IMPLEMENTED = ("triton", "reference")
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
MAX_N = 16384  # kernels/row_inv_rms.py: one block a row


def row_inv_rms(x: torch.Tensor, eps: float = 1e-6, *, backend: str | None = None) -> torch.Tensor:
    """Each row's inverse RMS; see the module docstring.

    Args:
        x: (M, N) values, unit stride along N.
        eps: added to the mean square (an RMS norm's epsilon), >= 0.
        backend: "triton" | "reference" | "auto"/None (see spiral_rt.ops.dispatch).
    """
    x = dispatch.check_tensor(OP, "x", x, dtypes=FLOAT_DTYPES, contiguous=False)
    if x.dim() != 2:
        raise ValueError(f"{OP}: argument 'x' must be 2-D (M, N), got shape {tuple(x.shape)}")
    if not 1 <= x.shape[1] <= MAX_N:
        raise ValueError(f"{OP}: argument 'x' must have 1 <= N <= {MAX_N} columns, got {x.shape[1]}")
    if x.shape[0] > 1 and x.stride(1) != 1:
        raise ValueError(f"{OP}: argument 'x' must have unit stride along N, got strides {tuple(x.stride())}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"{OP}: argument 'eps' must be a float >= 0, got {eps!r}")
    implemented = IMPLEMENTED if x.dtype != torch.float64 else ("reference",)
    chosen = dispatch.select_backend(OP, x.device, implemented, backend)
    out = torch.empty(x.shape[0], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
    dispatch.invoke(_row_inv_rms_op, _row_inv_rms_impl, x, out, float(eps), chosen)
    return out


# ------------------------------------------------------------------ torch.library registration


def _row_inv_rms_impl(x: torch.Tensor, out: torch.Tensor, eps: float, backend: str) -> None:
    if backend == "reference":
        out.copy_(_reference.row_inv_rms(x, eps))
        return
    from spiral_rt.kernels import row_inv_rms as kernel

    kernel.row_inv_rms(x, out, eps)


_row_inv_rms_op = torch.library.custom_op("spiral_rt::row_inv_rms", _row_inv_rms_impl, mutates_args=("out",))


@_row_inv_rms_op.register_fake
def _(x, out, eps, backend):
    return None
