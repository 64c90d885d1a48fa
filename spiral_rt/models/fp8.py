"""FP8 (e4m3) linears for the DiT: weights quantized once per output row, activations per token at
run time, the matmul through ``torch._scaled_mm`` with fp32 scales and the bias fused, output in the
activation dtype.

    y = (q(x) * s_x) @ (q(W) * s_W)^T + b,     q(.) = round to float8_e4m3fn after dividing by s,
    s_W[o] = max_i |W[o, i]| / 448,  s_x[t] = max_i |x[t, i]| / 448   (448: e4m3's largest finite value)

Row-wise scales keep one outlier row or token from crushing the others' resolution; e4m3 keeps 3
mantissa bits, so each product carries ~2^-4 relative rounding, averaged down over the reduction.

``apply_fp8_linears(model)`` swaps the chosen ``nn.Linear`` of every block (self-attention q, k, v, o;
cross-attention q, o; both FFN matmuls) for ``Fp8Linear`` in place and returns their names; the
cross-attention k, v (run once per prompt on the text) and everything outside the blocks stay in the
model dtype. It is opt-in and one-way: the bf16 weights of a swapped linear are dropped (halving
their memory). The quality cost is measured by ``bench/bench_stream.py --fp8`` (PSNR of the decoded
frames against bf16 on the same noise).

Paths: on CUDA (sm_89+) ``torch._scaled_mm``; elsewhere, or with ``emulate=True``, the same
arithmetic in fp32 from the dequantized operands (the readable reference the tests compare with).

Boundaries: the numeric format and the module swap; which model gets it is the caller's choice.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
DEFAULT_FP8_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o",
                       "ffn.0", "ffn.2")
"""Block linears swapped by default (suffixes of module names, as in ``blocks.3.ffn.0``)."""


def quantize_rowwise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn tensor, fp32 scale per row) of a 2-D tensor: t ~= q * scale[:, None]."""
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
        raise ValueError(f"quantize_rowwise: argument 't' must be a 2-D float tensor, got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    tf = t.float()
    scale = tf.abs().amax(dim=1).clamp_min(1e-12) / FP8_MAX
    q = (tf / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def _scaled_mm_supported(device: torch.device) -> bool:
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(nn.Module):
    """An ``nn.Linear`` with e4m3 weights and per-token e4m3 activations (module docstring).

    Args:
        linear: the layer to quantize (its weight is read once; the module keeps only the fp8 copy).
        emulate: always use the fp32 reference arithmetic (tests; CPUs without fp8 matmuls).
    """

    def __init__(self, linear: nn.Linear, emulate: bool = False):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"Fp8Linear: argument 'linear' must be an nn.Linear, got {type(linear).__name__}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_rowwise(linear.weight.detach())
        self.register_buffer("weight_fp8", q)
        self.register_buffer("weight_scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.out_dtype = linear.weight.dtype
        self.emulate = emulate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Fp8Linear: input has {x.shape[-1]} features, the layer takes {self.in_features}")
        lead = x.shape[:-1]
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else self.out_dtype
        xq, sx = quantize_rowwise(x.reshape(-1, self.in_features))
        bias = None if self.bias is None else self.bias.to(out_dtype)
        if not self.emulate and _scaled_mm_supported(x.device) and out_dtype != torch.float32:
            # rows of x (tokens) x columns of W^T (output features): scales (T, 1) and (1, O)
            y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=sx[:, None], scale_b=self.weight_scale[None, :],
                                 bias=bias, out_dtype=out_dtype)
        else:
            y = (xq.float() * sx[:, None]) @ (self.weight_fp8.float() * self.weight_scale[:, None]).t()
            if bias is not None:
                y = y + bias.float()
            y = y.to(out_dtype)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3, row-wise scales"


def apply_fp8_linears(model: nn.Module, targets: Sequence[str] = DEFAULT_FP8_TARGETS, *, emulate: bool = False) -> list[str]:
    """Swap every ``nn.Linear`` of ``model`` whose name ends with one of ``targets`` for an
    ``Fp8Linear``, in place; returns the swapped names (ValueError when none matches)."""
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise ValueError(f"apply_fp8_linears: no nn.Linear of the model matches 'targets' {tuple(targets)}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Fp8Linear(getattr(parent, child), emulate=emulate))
    logger.info("apply_fp8_linears: %d linears now e4m3 (%s...)", len(names), ", ".join(names[:3]))
    return names
