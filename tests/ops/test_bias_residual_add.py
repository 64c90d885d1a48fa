"""Tests of ``spiral_rt.ops.bias_residual_add``: the reference against an fp64 formula, the Triton
kernel (interpreter on CPU, the GPU under ``-m gpu``) against the reference in both layouts at
awkward sizes, writing into y itself, and bad arguments.

Tolerances: the reference vs fp64 within one rounding of the dtype (fp32 1e-6 relative, bf16 /
fp16 half an ulp: 4e-3 / 5e-4 relative); Triton vs reference: equal up to the order of the two fp32
additions (fp32 1e-6, bf16 / fp16 one ulp).
"""

import pytest
import torch

from spiral_rt.ops.bias_residual_add import IMPLEMENTED, bias_residual_add
from spiral_rt.reference.bias_residual_add import bias_residual_add as bias_residual_add_ref

TOL = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _inputs(shape, dtype, device, channels_last):
    y = torch.randn(shape, device=device).to(dtype)
    h = torch.randn(shape, device=device).to(dtype)
    if channels_last:
        fmt = torch.channels_last_3d if len(shape) == 5 else torch.channels_last
        y, h = y.contiguous(memory_format=fmt), h.contiguous(memory_format=fmt)
    bias = torch.randn(shape[1], 1, 1, 1, device=device).to(dtype)
    return y, bias, h


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_matches_fp64(dtype):
    torch.manual_seed(0)
    y, bias, h = _inputs((2, 5, 3, 4, 7), dtype, "cpu", False)
    exact = y.double() + bias.double().reshape(1, 5, 1, 1, 1) + h.double()
    out = bias_residual_add_ref(y, bias, h)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), exact, rtol=TOL[dtype] / 2, atol=TOL[dtype] / 2)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(1, 3, 2, 5, 7), (2, 19, 1, 3, 33), (3, 6, 11, 13)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_matches_reference(triton_device, shape, dtype, channels_last):
    torch.manual_seed(sum(shape))
    y, bias, h = _inputs(shape, dtype, triton_device, channels_last)
    want = bias_residual_add_ref(y, bias, h)
    out = bias_residual_add(y, bias, h, backend="triton")
    assert out.stride() == y.stride()
    torch.testing.assert_close(out, want, rtol=TOL[dtype], atol=TOL[dtype])
    same = y.clone()
    assert bias_residual_add(same, bias, h, out=same, backend="triton") is same  # in place, into y
    torch.testing.assert_close(same, want, rtol=TOL[dtype], atol=TOL[dtype])


def test_bad_arguments_are_named():
    y, bias, h = _inputs((2, 4, 3, 5), torch.float32, "cpu", False)
    with pytest.raises(ValueError, match="'bias' must have C = 4"):
        bias_residual_add(y, bias[:3], h, backend="reference")
    with pytest.raises(ValueError, match="'residual' must have y's strides"):
        bias_residual_add(y, bias, h.contiguous(memory_format=torch.channels_last), backend="reference")
    with pytest.raises(ValueError, match="'residual' must have dtype"):
        bias_residual_add(y, bias, h.half(), backend="reference")
    with pytest.raises(ValueError, match="'y' must be contiguous or channels-last"):
        bias_residual_add(y.transpose(2, 3), bias, h.transpose(2, 3), backend="reference")
    with pytest.raises(ValueError, match="'out' must have shape"):
        bias_residual_add(y, bias, h, out=y[:1], backend="reference")
    assert IMPLEMENTED == ("triton", "reference")
