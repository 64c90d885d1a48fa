"""Tests of ``spiral_rt.ops.row_inv_rms``: the reference against an fp64 formula, the Triton kernel
(interpreter on CPU, the GPU under ``-m gpu``) against the reference at awkward sizes and row
strides, inside a CUDA graph, and bad arguments.

Tolerances: fp32 sums of squares over up to a few thousand values: 2e-6 relative for the reference
against fp64 (inputs exactly representable), 1e-5 between Triton and the reference (summation order).
"""

import pytest
import torch

from spiral_rt.ops import row_inv_rms
from spiral_rt.reference.row_inv_rms import row_inv_rms as row_inv_rms_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_matches_fp64(dtype):
    torch.manual_seed(0)
    x = (torch.randn(7, 37) * 3).to(dtype)
    exact = 1.0 / torch.sqrt(x.double().pow(2).mean(-1) + 1e-6)
    out = row_inv_rms_ref(x, 1e-6)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), exact, rtol=2e-6, atol=0)


@pytest.mark.parametrize("shape,row_stride", [((1, 1), 1), ((5, 37), 37), ((13, 1536), 4608), ((3, 2049), 2050)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_matches_reference(triton_device, shape, row_stride, dtype):
    torch.manual_seed(shape[0] * 31 + shape[1])
    m, n = shape
    base = (torch.randn(m, row_stride, device=triton_device) * 2).to(dtype)
    x = base[:, :n]  # rows row_stride apart (a slice of a packed projection)
    out = row_inv_rms(x, 1e-6, backend="triton")
    torch.testing.assert_close(out, row_inv_rms_ref(x, 1e-6), rtol=1e-5, atol=0)


def test_zero_rows_and_eps():
    x = torch.zeros(3, 8)
    torch.testing.assert_close(row_inv_rms(x, 0.25, backend="reference"), torch.full((3,), 2.0))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="'x' must be 2-D"):
        row_inv_rms(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="'x' must have unit stride"):
        row_inv_rms(torch.ones(4, 3).t())
    with pytest.raises(ValueError, match="'eps' must be a float >= 0"):
        row_inv_rms(torch.ones(2, 3), -1.0)
    with pytest.raises(ValueError, match="'x' must have 1 <= N"):
        row_inv_rms(torch.ones(2, 0))


@pytest.mark.gpu
def test_gpu_cuda_graph():
    torch.manual_seed(0)
    x = torch.randn(4680, 1536, device="cuda", dtype=torch.bfloat16)
    out = row_inv_rms(x, 1e-6)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = row_inv_rms(x, 1e-6)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.testing.assert_close(captured, row_inv_rms_ref(x, 1e-6), rtol=1e-5, atol=0)
    assert not torch.equal(captured, out)
