"""Tests of ``spiral_rt.ops.narrow_causal_conv3d``: the reference against conv3d over the
concatenated frames (fp64), the Triton kernels (the interpreter on CPU in fp32 / fp16 at small
shapes, the GPU under ``-m gpu`` in bf16 / fp32 at the Wan VAE head's size) against the reference:
both kernels (shift: taps in N, the default for C_out <= 4, at several tile shapes; direct: taps
in K), C not a multiple of BLOCK_K, C_out 1 / 3 / 4 / 16, T = 1 and T > 2, no past (the first
chunk), B > 1, images of several tiles and partial tiles, channels-last and contiguous inputs,
strided views; bad arguments.

Tolerances (relative, ||a - b|| / ||b||, against the fp32 reference): fp32 1e-5 (the summation
order; TF32 off); fp16 2e-3 and bf16 1e-2 (one rounding of the output plus the reference's own
rounding of the same value: the element-wise difference stays within 1 ulp of the output dtype,
checked at 2 ulps).
"""

import pytest
import torch
import torch.nn.functional as F

from spiral_rt.kernels import narrow_causal_conv3d as kernel
from spiral_rt.ops.narrow_causal_conv3d import IMPLEMENTED, narrow_causal_conv3d
from spiral_rt.reference.narrow_causal_conv3d import narrow_causal_conv3d as narrow_causal_conv3d_ref

ULP = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _inputs(B, C, T, H, W, cout, dtype, device, channels_last=True, past=True):
    x = torch.randn(B, C, T, H, W, device=device).to(dtype)
    p = torch.randn(B, C, 2, H, W, device=device).to(dtype) if past else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
        p = p.contiguous(memory_format=torch.channels_last_3d) if p is not None else None
    w = (torch.randn(cout, C, 3, 3, 3, device=device) / (27 * C) ** 0.5).to(dtype)
    b = torch.randn(cout, device=device).to(dtype)
    return x, w, b, p


def _check(out, want, dtype):
    assert out.dtype == want.dtype and out.shape == want.shape and out.is_contiguous()
    if dtype == torch.float32:
        assert _rel(out, want) <= 1e-5
    else:
        torch.testing.assert_close(out.double(), want.double(), rtol=2 * ULP[dtype],
                                   atol=2 * ULP[dtype] * want.abs().max().item())


def test_reference_matches_conv3d_of_concatenation():
    x, w, b, p = _inputs(2, 5, 3, 4, 6, 3, torch.float64, "cpu", channels_last=False)
    want = F.conv3d(torch.cat([p, x], dim=2), w, b, padding=(0, 1, 1))
    torch.testing.assert_close(narrow_causal_conv3d_ref(x, w, b, p), want, rtol=1e-12, atol=1e-12)
    zeros = F.conv3d(torch.cat([torch.zeros_like(p), x], dim=2), w, None, padding=(0, 1, 1))
    torch.testing.assert_close(narrow_causal_conv3d_ref(x, w), zeros, rtol=1e-12, atol=1e-12)
    # the streaming identity: two chunks behind their cached frames == the whole clip at once
    whole = narrow_causal_conv3d_ref(torch.cat([x, x.flip(2)], dim=2), w, b, p)
    second = narrow_causal_conv3d_ref(x.flip(2), w, b, x[:, :, -2:])
    torch.testing.assert_close(torch.cat([narrow_causal_conv3d_ref(x, w, b, p), second], dim=2), whole)


@pytest.mark.parametrize("B, C, T, H, W, cout, channels_last, past", [
    (1, 8, 3, 5, 7, 3, True, True),      # C < BLOCK_K: masked channels
    (2, 32, 1, 4, 9, 3, True, False),    # one frame, no past: only the last time tap runs
    (1, 20, 2, 3, 4, 16, False, True),   # contiguous layout, C_out 16, C masked
    (2, 48, 4, 6, 5, 1, True, True),     # B > 1, T > 2, C = 3 x 16
    (1, 96, 2, 3, 11, 3, True, True),    # the head's channel count (BLOCK_K 32)
    (1, 16, 2, 17, 30, 3, True, True),   # several 16 x 16 shift tiles (14 x 14 interiors) and partial ones
    (1, 16, 1, 15, 14, 4, True, True),   # exactly one tile's interior (plus a partial row), C_out 4
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("variant", ["auto", "direct"])
def test_triton_matches_reference(triton_device, B, C, T, H, W, cout, channels_last, past, dtype, variant, monkeypatch):
    """"auto": the shift kernel for C_out <= 4, direct above; "direct" forced for every C_out."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    if variant == "direct":
        monkeypatch.setattr(kernel, "MAX_SHIFT_COUT", 0)
    x, w, b, p = _inputs(B, C, T, H, W, cout, dtype, triton_device, channels_last, past)
    want = narrow_causal_conv3d_ref(x, w, b, p)
    _check(narrow_causal_conv3d(x, w, b, past=p, backend="triton"), want, dtype)
    _check(narrow_causal_conv3d(x, w, None, past=p, backend="triton"), narrow_causal_conv3d_ref(x, w, None, p), dtype)


@pytest.mark.parametrize("tile", [(4, 8), (8, 4), (16, 32)])
def test_triton_shift_tiles(triton_device, tile, monkeypatch):
    """The shift kernel's tile sides (the interior is tile - 2 each way) against the reference."""
    monkeypatch.setattr(kernel, "TILE_H", tile[0])
    monkeypatch.setattr(kernel, "TILE_W", tile[1])
    x, w, b, p = _inputs(2, 16, 2, 9, 13, 3, torch.float32, triton_device)
    _check(narrow_causal_conv3d(x, w, b, past=p, backend="triton"), narrow_causal_conv3d_ref(x, w, b, p), torch.float32)


def test_triton_reads_past_as_a_view(triton_device):
    """past a time slice of a larger channels-last buffer, x a channel block: any strides."""
    big = torch.randn(1, 24, 5, 4, 6, device=triton_device).contiguous(memory_format=torch.channels_last_3d)
    x, p = big[:, 8:24, 2:], big[:, 8:24, :2]
    w = 0.1 * torch.randn(3, 16, 3, 3, 3, device=triton_device)
    _check(narrow_causal_conv3d(x, w, past=p, backend="triton"), narrow_causal_conv3d_ref(x, w, None, p), torch.float32)


def test_bad_arguments_are_named():
    x, w, b, p = _inputs(1, 4, 2, 3, 5, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match="'x' must be \\(B, C, T >= 1, H, W\\)"):
        narrow_causal_conv3d(x[:, :, :0], w, b, backend="reference")
    with pytest.raises(ValueError, match="'weight' must be \\(C_out, 4, 3, 3, 3\\) with 1 <= C_out <= 16"):
        narrow_causal_conv3d(x, torch.randn(17, 4, 3, 3, 3), backend="reference")
    with pytest.raises(ValueError, match="'weight' must be \\(C_out, 4, 3, 3, 3\\)"):
        narrow_causal_conv3d(x, w[:, :, :1], backend="reference")
    with pytest.raises(ValueError, match="'weight' must have dtype"):
        narrow_causal_conv3d(x, w.half(), backend="reference")
    with pytest.raises(ValueError, match="'bias' must have C_out = 3"):
        narrow_causal_conv3d(x, w, b[:2], backend="reference")
    with pytest.raises(ValueError, match="'past' must have shape \\(1, 4, 2, 3, 5\\)"):
        narrow_causal_conv3d(x, w, b, past=p[:, :, :1], backend="reference")
    assert IMPLEMENTED == ("triton", "reference")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@torch.no_grad()
def test_gpu_head_size(dtype, monkeypatch):
    """The Wan VAE head at a quarter of its 832x480 size (96 -> 3 channels, 3 frames behind 2
    cached ones, channels-last), and its first chunk (no past)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    x, w, b, p = _inputs(1, 96, 3, 240, 416, 3, dtype, "cuda")
    _check(narrow_causal_conv3d(x, w, b, past=p), narrow_causal_conv3d_ref(x, w, b, p), dtype)
    _check(narrow_causal_conv3d(x, w, b), narrow_causal_conv3d_ref(x, w, b), dtype)
