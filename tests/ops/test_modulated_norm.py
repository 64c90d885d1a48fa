"""Tests of ``spiral_rt.ops.modulated_norm``: reference vs fp64 F.layer_norm, Triton vs reference.

Awkward sizes: C not a power of two (72, 200), one-frame modulation, B > 1, frames of odd length, frames
longer than one program's rows (21 tokens: three programs a frame, the last partial).
Tolerances, relative to max |y| (one rounding of y; x_new may differ by one ulp of its dtype when the
compiler fuses the multiply-add): fp32 2e-5, fp16 2e-3, bf16 1.6e-2.
"""

import pytest
import torch
import torch.nn.functional as F

from spiral_rt.ops.modulated_norm import modulated_norm
from spiral_rt.reference.modulated_norm import modulated_norm as modulated_norm_ref

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _inputs(b, l, c, f, dtype, device, fused, mod_dtype=torch.float32):
    x = (torch.randn(b, l, c, device=device) * 3 + 0.5).to(dtype)
    shift = torch.randn(b, f, c, device=device).to(mod_dtype)
    scale = (torch.randn(b, f, c, device=device) * 0.5).to(mod_dtype)
    gate = torch.randn(b, f, c, device=device).to(mod_dtype) if fused else None
    branch = torch.randn(b, l, c, device=device).to(dtype) if fused else None
    return x, shift, scale, gate, branch


def _close(actual, expected, dtype):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=TOL[dtype] * expected.abs().max().item())


@pytest.mark.parametrize("fused", [False, True])
def test_reference_matches_fp64_layer_norm(fused):
    b, l, c, f = 2, 12, 40, 3
    x, shift, scale, gate, branch = _inputs(b, l, c, f, torch.float64, "cpu", fused, torch.float64)
    y, x_new = modulated_norm_ref(x, shift, scale, gate, branch)
    base = x + gate.repeat_interleave(l // f, 1) * branch if fused else x
    expected = F.layer_norm(base, (c,), eps=1e-6) * (1 + scale.repeat_interleave(l // f, 1)) + shift.repeat_interleave(l // f, 1)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    if fused:
        torch.testing.assert_close(x_new, base, rtol=0, atol=0)
    # per-frame modulation really is per frame: the last token of frame 0 and first of frame 1 differ
    y_frame0 = F.layer_norm(base[:, l // f - 1], (c,), eps=1e-6) * (1 + scale[:, 0]) + shift[:, 0]
    torch.testing.assert_close(y[:, l // f - 1], y_frame0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("b,l,c,f", [(1, 15, 72, 3), (2, 7, 200, 1), (3, 10, 64, 5), (2, 42, 48, 2)])
def test_triton_matches_reference(triton_device, dtype, fused, b, l, c, f):
    x, shift, scale, gate, branch = _inputs(b, l, c, f, dtype, triton_device, fused)
    y, x_new = modulated_norm(x, shift, scale, gate=gate, branch=branch, backend="triton")
    y_ref, x_new_ref = modulated_norm_ref(x, shift, scale, gate, branch)
    assert y.dtype == dtype and y.shape == x.shape
    _close(y, y_ref, dtype)
    if fused:
        assert x_new.dtype == dtype
        ulp = torch.finfo(dtype).eps
        torch.testing.assert_close(x_new.double(), x_new_ref.double(), rtol=ulp, atol=ulp)
    else:
        assert x_new is None


def test_out_dtype_and_mixed_modulation_dtype(triton_device):
    x, shift, scale, gate, branch = _inputs(2, 9, 48, 3, torch.float32, triton_device, True, torch.bfloat16)
    y, x_new = modulated_norm(x, shift, scale, gate=gate, branch=branch, out_dtype=torch.bfloat16, backend="triton")
    y_ref, x_new_ref = modulated_norm_ref(x, shift, scale, gate, branch, out_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16 and x_new.dtype == torch.float32
    _close(y, y_ref, torch.bfloat16)
    torch.testing.assert_close(x_new, x_new_ref, rtol=1e-6, atol=1e-6)


def test_reference_backend_through_op():
    x, shift, scale, gate, branch = _inputs(1, 6, 32, 2, torch.float32, "cpu", True)
    y, x_new = modulated_norm(x, shift, scale, gate=gate, branch=branch, backend="reference")
    y_ref, x_new_ref = modulated_norm_ref(x, shift, scale, gate, branch)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x_new, x_new_ref)


def test_bad_arguments_name_the_argument():
    x, shift, scale, gate, branch = _inputs(1, 6, 32, 2, torch.float32, "cpu", True)
    with pytest.raises(ValueError, match="'x'"):
        modulated_norm(x[0], shift, scale)
    with pytest.raises(ValueError, match="'shift'.*divide"):
        modulated_norm(x, torch.randn(1, 4, 32), torch.randn(1, 4, 32))
    with pytest.raises(ValueError, match="'scale'"):
        modulated_norm(x, shift, scale[:, :, :16])
    with pytest.raises(ValueError, match="'gate' and 'branch'"):
        modulated_norm(x, shift, scale, gate=gate)
    with pytest.raises(ValueError, match="'branch'"):
        modulated_norm(x, shift, scale, gate=gate, branch=branch[:, :3])
    with pytest.raises(ValueError, match="'eps'"):
        modulated_norm(x, shift, scale, eps=0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
def test_gpu_wan_chunk_shape(fused):
    x, shift, scale, gate, branch = _inputs(1, 4680, 1536, 3, torch.bfloat16, "cuda", fused)
    y, x_new = modulated_norm(x, shift, scale, gate=gate, branch=branch)
    y_ref, x_new_ref = modulated_norm_ref(x, shift, scale, gate, branch)
    _close(y, y_ref, torch.bfloat16)
    if fused:
        ulp = torch.finfo(torch.bfloat16).eps
        torch.testing.assert_close(x_new.float(), x_new_ref.float(), rtol=ulp, atol=ulp)
