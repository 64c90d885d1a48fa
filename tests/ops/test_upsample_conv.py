"""Tests of ``spiral_rt.ops.upsample_conv``: the sub-pixel identity (nearest 2x upsample + 3x3 conv
== 2x2 conv of the low-res input with phase weights, then the interleave) against the plain
formula in fp64; ``phase_interleave``'s Triton kernel (the interpreter on CPU, the GPU under
``-m gpu``) against the reference at odd sizes, in both layouts, into ``out``; bad arguments.

Tolerances: the identity in fp64 1e-12 (a sum reordered); in fp32 through the ops 1e-5 relative
(the phase weights are fp32 sums: one extra rounding); the interleave is a copy: bit exact.
"""

import pytest
import torch
import torch.nn.functional as F

from spiral_rt.ops.upsample_conv import IMPLEMENTED, phase_interleave, phase_weights, upsample_conv2d
from spiral_rt.reference import upsample_conv as ref


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (1, 3, 1, 1), (3, 4, 6, 2)])
def test_phase_identity_matches_upsample_conv_fp64(shape):
    N, C, H, W = shape
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(6, C, 3, 3, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    plain = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=1)
    torch.testing.assert_close(ref.upsample_conv2d(x, w, b), plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref.upsample_conv2d_phased(x, w, b), plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref.upsample_conv2d_phased(x, w), F.conv2d(
        F.interpolate(x, scale_factor=2.0, mode="nearest"), w, padding=1), rtol=1e-12, atol=1e-12)


def test_phase_weights_rounded_once():
    """The combined weights are fp32 sums rounded once to the weights' dtype (bf16 here)."""
    w = torch.randn(4, 3, 3, 3).to(torch.bfloat16)
    w4, b4 = phase_weights(w)
    assert w4.shape == (16, 3, 2, 2) and w4.dtype == torch.bfloat16 and b4 is None
    exact, _ = ref.phase_weights(w.double())
    assert torch.equal(w4, exact.to(torch.bfloat16))  # fp32 sums of <= 4 bf16 values are exact
    # block 2a + b is phase (a, b): phase (1, 1) = [[w00 + w01 + w10 + w11, w02 + w12], [w20 + w21, w22]]
    wd = w.double()
    top_left = wd[:, :, :2, :2].sum(dim=(2, 3))
    torch.testing.assert_close(exact[12:, :, 0, 0], top_left)
    torch.testing.assert_close(exact[12:, :, 1, 1], wd[:, :, 2, 2])
    b = torch.randn(4)
    assert torch.equal(phase_weights(w.float(), b)[1], b.repeat(4))


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (1, 16, 4, 5), (3, 24, 1, 2)])
def test_upsample_conv2d_fp32_matches_formula(shape, channels_last):
    N, C, H, W = shape
    x = torch.randn(shape)
    w, b = 0.2 * torch.randn(7, C, 3, 3), torch.randn(7)
    w4, b4 = phase_weights(w, b)
    if channels_last:
        x, w4 = x.contiguous(memory_format=torch.channels_last), w4.contiguous(memory_format=torch.channels_last)
    out = upsample_conv2d(x, w4, b4, backend="reference")
    assert out.shape == (N, 7, 2 * H, 2 * W)
    assert _rel(out, ref.upsample_conv2d(x.double(), w.double(), b.double())) <= 1e-5


def _phase_output(shape, dtype, device, channels_last):
    y = torch.randn(shape, device=device).to(dtype)
    return y.contiguous(memory_format=torch.channels_last) if channels_last else y


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(1, 4, 2, 2), (2, 12, 4, 6), (3, 52, 3, 8), (1, 384, 2, 3), (2, 20, 5, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_triton_interleave_matches_reference(triton_device, shape, dtype, channels_last):
    """Odd sizes: C = 1, 3, 13, 96 (BLOCK_C 16 / masked / 32), 5 (masked); H, W from 1 up."""
    y = _phase_output(shape, dtype, triton_device, channels_last)
    want = ref.phase_interleave(y)
    out = phase_interleave(y, backend="triton")
    assert out.stride() == want.stride() and out.dtype == dtype
    assert torch.equal(out, want)
    other = torch.empty(want.shape, dtype=dtype, device=triton_device,
                        memory_format=torch.contiguous_format if channels_last else torch.channels_last)
    assert phase_interleave(y, out=other, backend="triton") is other  # into the other layout
    assert torch.equal(other, want)


def test_triton_interleave_reads_strided_views(triton_device):
    """y a channel slice of a larger channels-last tensor (any strides are accepted)."""
    big = _phase_output((2, 20, 4, 5), torch.float32, triton_device, True)
    y = big[:, 4:16]
    assert torch.equal(phase_interleave(y, backend="triton"), ref.phase_interleave(y))


def test_interleave_bad_arguments_are_named():
    y = torch.randn(2, 8, 3, 4)
    with pytest.raises(ValueError, match="'y' must be \\(N, 4C, H \\+ 1, W \\+ 1\\)"):
        phase_interleave(y[:, :6], backend="reference")
    with pytest.raises(ValueError, match="'y' must be \\(N, 4C"):
        phase_interleave(y[:, :, :1], backend="reference")
    with pytest.raises(ValueError, match="'y' must have dtype"):
        phase_interleave(y.double(), backend="reference")
    with pytest.raises(ValueError, match="'out' must have shape \\(2, 2, 4, 6\\)"):
        phase_interleave(y, out=torch.empty(2, 2, 4, 5), backend="reference")
    with pytest.raises(ValueError, match="'out' must be contiguous or channels-last"):
        phase_interleave(y, out=torch.empty(2, 2, 6, 4).transpose(2, 3), backend="reference")
    with pytest.raises(ValueError, match="'out' must not overlap 'y'"):
        phase_interleave(y, out=y.view(-1)[: 2 * 2 * 4 * 6].view(2, 2, 4, 6), backend="reference")
    with pytest.raises(ValueError, match="'weight' must be \\(C_out, C_in, 3, 3\\)"):
        phase_weights(torch.randn(4, 3, 2, 2))
    with pytest.raises(ValueError, match="'phase_weight' must be \\(4 C_out, C_in, 2, 2\\)"):
        upsample_conv2d(torch.randn(1, 3, 2, 2), torch.randn(4, 3, 3, 3))
    assert IMPLEMENTED == ("triton", "reference")


@pytest.mark.gpu
@pytest.mark.parametrize("C, H, W", [(192, 60, 104), (96, 240, 416), (96, 7, 13)])
def test_gpu_bf16_interleave_at_vae_sizes(C, H, W):
    """The resample sizes of the 832x480 Wan decoder (one frame each), bf16 channels-last: bit exact."""
    y = torch.randn(2, 4 * C, H + 1, W + 1, device="cuda").to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    out = phase_interleave(y)  # automatic: triton
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, ref.phase_interleave(y))


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_upsample_conv2d_matches_formula(monkeypatch):
    """The whole sub-pixel path (cuDNN 2x2 conv + Triton interleave) vs the upsample + 3x3 conv:
    fp32 (TF32 off) 1e-5; bf16 within 1.2x the explicit bf16 path's error against fp64."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    x = torch.randn(6, 64, 30, 52, device="cuda").contiguous(memory_format=torch.channels_last)
    w, b = 0.05 * torch.randn(32, 64, 3, 3, device="cuda"), torch.randn(32, device="cuda")
    exact = ref.upsample_conv2d(x.double(), w.double(), b.double())
    w4, b4 = phase_weights(w, b)
    out = upsample_conv2d(x, w4.contiguous(memory_format=torch.channels_last), b4)
    assert _rel(out, exact) <= 1e-5
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    w4, b4 = phase_weights(wb, bb)
    phased = upsample_conv2d(xb, w4.contiguous(memory_format=torch.channels_last), b4)
    plain = F.conv2d(F.interpolate(xb, scale_factor=2.0, mode="nearest"), wb.contiguous(memory_format=torch.channels_last),
                     bb, padding=1)
    exact = ref.upsample_conv2d(xb.double(), wb.double(), bb.double())
    assert _rel(phased, exact) <= 1.2 * _rel(plain, exact) + 1e-4
