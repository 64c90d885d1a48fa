"""``linear``: y = x W^T + b, optionally through Wan's tanh-GELU, with the GEMM algorithm timed.

The DiT's projections and FFN (``spiral_rt.models.dit``'s fused path) run through this op. The
cuda backend calls cuBLASLt with the fastest of its heuristic's candidates for the problem, timed
once per shape (``spiral_rt.ops.cublaslt``), the GELU and bias in the GEMM's epilogue; PyTorch takes
the heuristic's first candidate, which on the DiT's shapes is up to 8% slower. The reference
backend is PyTorch's own linear (``spiral_rt.reference.linear``).

Shapes: x (..., K), weight (N, K) (nn.Linear's layout), bias (N,) or None; bf16/fp16 for the cuda
backend (any float dtype for the reference); x's last dimension contiguous. Returns (..., N),
contiguous. Inputs the cuda backend cannot take (fp32, rows not 16-byte aligned) run the
reference when the backend was chosen automatically and raise ValueError when it was forced.
Boundaries: forward only (no autograd formula): training keeps nn.Linear.
"""

from __future__ import annotations

import torch

from ..reference import linear as _reference
from . import cublaslt, dispatch

OP = "linear"
IMPLEMENTED = ("cuda", "reference")
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
LT_DTYPES = (torch.bfloat16, torch.float16)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, gelu: bool = False,
           backend: str | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``, then tanh-GELU when ``gelu``; see the module docstring.

    Args:
        x: (..., K) activations; the last dimension contiguous.
        weight: (N, K), contiguous, x's dtype and device.
        bias: (N,) in x's dtype, or None.
        gelu: apply GELU with the tanh approximation (Wan's FFN activation) after the bias.
        backend: "cuda" | "reference" | "auto"/None (see spiral_rt.ops.dispatch).
    """
    x = dispatch.check_tensor(OP, "x", x, dtypes=FLOAT_DTYPES, min_dim=2, contiguous=False)
    if x.stride(-1) != 1:
        raise ValueError(f"{OP}: argument 'x' must have a contiguous last dimension (strides {tuple(x.stride())} "
                         f"for shape {tuple(x.shape)}); pass x.contiguous()")
    K = x.shape[-1]
    weight = dispatch.check_tensor(OP, "weight", weight, dtypes=(x.dtype,), device=x.device)
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"{OP}: argument 'weight' must have shape (N, {K}) (K = x.shape[-1]), got {tuple(weight.shape)}")
    N = weight.shape[0]
    if bias is not None:
        dispatch.check_tensor(OP, "bias", bias, shape=(N,), dtypes=(x.dtype,), device=x.device)
    chosen = dispatch.select_backend(OP, x.device, IMPLEMENTED, backend)
    x2 = x.reshape(-1, K)  # a view whenever the leading dimensions collapse
    if chosen == "cuda":
        reason = _lt_unsupported(x2, weight, bias)
        if reason is not None:
            if dispatch.requested_backend(OP, backend) == "cuda":
                raise ValueError(f"{OP}: the cuda backend cannot take these inputs: {reason}")
            chosen = "reference"
    y = dispatch.invoke(_linear_op, _linear_impl, x2, weight, bias, gelu, chosen)
    return y.view(*x.shape[:-1], N)


def _lt_unsupported(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """Why cuBLASLt's 16-bit path cannot take these operands (None when it can)."""
    if x2.dtype not in LT_DTYPES:
        return f"dtype {str(x2.dtype).replace('torch.', '')} (bf16 or fp16 only)"
    if x2.shape[0] == 0:
        return "no rows"
    ptrs = [x2.data_ptr(), weight.data_ptr()] + ([] if bias is None else [bias.data_ptr()])
    if any(p % 16 for p in ptrs) or (x2.stride(0) * x2.element_size()) % 16 or (x2.shape[1] * x2.element_size()) % 16 \
            or (weight.shape[0] * x2.element_size()) % 16:
        return "operands, row strides and N * itemsize must be 16-byte aligned"
    if not cublaslt.available():
        return "this torch build or machine has no cuBLASLt to call"
    return None


# ------------------------------------------------------------------ torch.library registration


def _linear_impl(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool,
                 backend: str) -> torch.Tensor:
    if backend == "reference":
        return _reference.linear(x2, weight, bias, gelu).contiguous()
    M, K = x2.shape
    N = weight.shape[0]
    problem = cublaslt.Problem(x2.device.index, x2.dtype, M, K, N, x2.stride(0), bias is not None, gelu)
    out = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    cublaslt.plan(problem, x2, weight, bias).run(x2, weight, bias, out)
    return out


_linear_op = torch.library.custom_op("spiral_rt::linear", _linear_impl, mutates_args=())


@_linear_op.register_fake
def _(x2, weight, bias, gelu, backend):
    return x2.new_empty(x2.shape[0], weight.shape[0])
