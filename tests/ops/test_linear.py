"""Tests of ``spiral_rt.ops.linear``: the reference against an fp64 formula, the cuBLASLt path (GPU)
against fp64 and the reference at awkward sizes, strided and 3-D inputs, the automatic fallback and
the forced backend's errors, the timing's choice, CUDA-graph capture, and bad arguments.

Tolerances against fp64 (inputs rounded to the dtype first, outputs of unit scale): one rounding of
the output plus fp32 accumulation, bf16 1e-2 and fp16 2e-3 (abs and rel), fp32 1e-5; the reference
with GELU rounds twice (GEMM, then GELU), the fused epilogue once.
"""

import math

import pytest
import torch

from spiral_rt.ops import cublaslt
from spiral_rt.ops.linear import linear
from spiral_rt.reference.linear import linear as linear_ref

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _inputs(m, k, n, dtype, device, bias=True):
    x = torch.randn(m, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) / math.sqrt(k)).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    return x, w, b


def _exact(x, w, b, gelu):
    y = x.double() @ w.double().t()
    if b is not None:
        y = y + b.double()
    if gelu:
        y = 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y**3)))
    return y


@pytest.mark.parametrize("gelu", [False, True], ids=["plain", "gelu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reference_matches_fp64(dtype, bias, gelu):
    x, w, b = _inputs(13, 40, 24, dtype, "cpu", bias)
    out = linear_ref(x, w, b, gelu)
    assert out.dtype == dtype and out.shape == (13, 24)
    tol = TOL[dtype] * (2 if gelu else 1)
    torch.testing.assert_close(out.double(), _exact(x, w, b, gelu), rtol=tol, atol=tol)


def test_cpu_runs_the_reference_for_any_leading_shape():
    x, w, b = _inputs(2 * 3 * 5, 16, 8, torch.float32, "cpu")
    out = linear(x.view(2, 3, 5, 16), w, b, gelu=True)
    assert out.shape == (2, 3, 5, 8)
    torch.testing.assert_close(out.view(-1, 8), linear_ref(x, w, b, True))


@pytest.mark.parametrize("make, match", [
    (lambda: linear(torch.randn(4, 8), torch.randn(6, 9)), "'weight' must have shape"),
    (lambda: linear(torch.randn(4, 8), torch.randn(6, 8).half()), "'weight' must have dtype"),
    (lambda: linear(torch.randn(4, 8), torch.randn(6, 8), torch.randn(5)), "'bias' must have shape"),
    (lambda: linear(torch.randn(8), torch.randn(6, 8)), "'x' must have at least 2"),
    (lambda: linear(torch.randn(8, 4).t(), torch.randn(6, 8)), "'x' must have a contiguous last"),
    (lambda: linear(torch.randn(4, 8), torch.randn(6, 8), backend="cuda"), "cuda backend needs CUDA tensors"),
    (lambda: linear(torch.randn(4, 8).int(), torch.randn(6, 8)), "'x' must have dtype"),
])
def test_bad_arguments_name_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ------------------------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("gelu", [False, True], ids=["plain", "gelu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m, k, n", [(1, 64, 40), (37, 96, 200), (1000, 1536, 8960), (4680, 1536, 1536)])
def test_cuda_matches_fp64_and_reference(m, k, n, dtype, bias, gelu):
    x, w, b = _inputs(m, k, n, dtype, "cuda", bias)
    out = linear(x, w, b, gelu=gelu, backend="cuda")
    assert out.dtype == dtype and out.shape == (m, n) and out.is_contiguous()
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), _exact(x, w, b, gelu), rtol=tol, atol=tol)
    ref = linear_ref(x, w, b, gelu)
    torch.testing.assert_close(out, ref, rtol=2 * tol, atol=2 * tol)


@gpu
def test_cuda_takes_a_row_stride_and_leading_dims():
    wide = torch.randn(2 * 77, 200, device="cuda", dtype=torch.bfloat16)
    x = wide[:, 8:8 + 128]  # row stride 200 > K = 128, 16-byte aligned
    _, w, b = _inputs(1, 128, 72, torch.bfloat16, "cuda")
    out = linear(x.view(2, 77, 128), w, b, backend="cuda")
    assert out.shape == (2, 77, 72)
    torch.testing.assert_close(out.view(-1, 72), linear_ref(x, w, b), rtol=2e-2, atol=2e-2)


@gpu
def test_misaligned_rows_fall_back_unless_forced():
    buf = torch.randn(33 * 65 + 1, device="cuda", dtype=torch.bfloat16)
    x = buf[1:].view(33, 65)[:, :64]  # row stride 65 elements: not 16-byte aligned
    _, w, b = _inputs(1, 64, 24, torch.bfloat16, "cuda")
    torch.testing.assert_close(linear(x, w, b), linear_ref(x, w, b))  # auto: the reference
    with pytest.raises(ValueError, match="16-byte aligned"):
        linear(x, w, b, backend="cuda")
    with pytest.raises(ValueError, match="bf16 or fp16"):
        linear(x.float(), w.float(), b.float(), backend="cuda")


@gpu
def test_timing_keeps_the_fastest_candidate():
    x, w, b = _inputs(4680, 1536, 8960, torch.bfloat16, "cuda")
    linear(x, w, b, gelu=True)
    plan = cublaslt.plan(cublaslt.Problem(x.device.index, x.dtype, 4680, 1536, 8960, 1536, True, True), x, w, b)
    assert len(plan.candidates) >= 1
    if len(plan.candidates) > 1:
        assert plan.timed_us is not None and len(plan.timed_us) == len(plan.candidates)
        assert plan.timed_us[plan.chosen] == min(plan.timed_us)
    for i in range(len(plan.candidates)):  # every candidate computes the same product
        out = torch.empty(4680, 8960, device="cuda", dtype=torch.bfloat16)
        plan.run(x, w, b, out, candidate=i)
        torch.testing.assert_close(out, linear_ref(x, w, b, True), rtol=2e-2, atol=2e-2)


@gpu
@pytest.mark.parametrize("seen_before", [True, False], ids=["timed_first", "first_met_in_capture"])
def test_cuda_graph_capture_and_replay(seen_before):
    m = 517 if seen_before else 519  # a problem no other test has met
    x, w, b = _inputs(m, 256, 384, torch.bfloat16, "cuda")
    if seen_before:
        linear(x, w, b, gelu=True)
    static = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s):
        with torch.cuda.graph(graph):
            out = linear(static, w, b, gelu=True)
    torch.cuda.current_stream().wait_stream(s)
    fresh = torch.randn_like(x)
    static.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, linear_ref(fresh, w, b, True), rtol=2e-2, atol=2e-2)
    plan = cublaslt.plan(cublaslt.Problem(x.device.index, x.dtype, m, 256, 384, 256, True, True), x, w, b)
    if not seen_before:
        assert plan.timed_us is None and plan.chosen == 0  # no timing inside a capture
