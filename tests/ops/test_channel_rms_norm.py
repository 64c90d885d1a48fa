"""Tests of ``spiral_rt.ops.channel_rms_norm``: reference vs an fp64 formula (and F.normalize),
Triton vs reference at awkward sizes (C not a multiple of BLOCK_C, N not a multiple of BLOCK_N,
3-, 4- and 5-D, B > 1), argument errors, torch.compile; on the GPU all three dtypes at VAE sizes,
inductor and CUDA graph capture.

Tolerances, element-wise against the reference (both round one fp32 value once, so they differ by
at most one ulp of the output dtype): bf16 rtol 2**-7, fp16 rtol 2**-10 (one ulp), fp32 rtol 1e-5
(the sum order, the sqrt and the division differ from PyTorch's by a few fp32 ulps); atol 1e-6 of
max |y| everywhere. The interpreter runs fp32 only (its bf16 support on CPU is unreliable).
"""

import pytest
import torch
import torch.nn.functional as F

from spiral_rt.ops import select_backend
from spiral_rt.ops.channel_rms_norm import IMPLEMENTED, channel_rms_norm
from spiral_rt.reference.channel_rms_norm import channel_rms_norm as channel_rms_norm_ref

RTOL = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def _inputs(shape, dtype, device, gamma_shape=None):
    x = (torch.randn(shape, device=device) * 3 + 0.5).to(dtype)
    c = shape[1]
    gamma = (1 + 0.3 * torch.randn(c, device=device)).reshape(gamma_shape or (c,))
    return x, gamma, c**0.5


def _close(actual, expected, dtype):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected.double(), rtol=RTOL[dtype],
                               atol=1e-6 * expected.abs().max().item())


def _fp64_formula(x, gamma, scale, silu, eps=1e-12):
    x = x.double()
    g = gamma.double().reshape(1, -1, *([1] * (x.dim() - 2)))
    y = x / x.pow(2).sum(dim=1, keepdim=True).sqrt().clamp_min(eps) * scale * g
    return y * torch.sigmoid(y) if silu else y


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("shape", [(2, 13, 3, 5, 7), (2, 13, 35, 9), (3, 5, 11)])
def test_reference_matches_fp64_formula(shape, silu):
    x, gamma, scale = _inputs(shape, torch.float64, "cpu")
    y = channel_rms_norm_ref(x, gamma, scale=scale, silu=silu)
    torch.testing.assert_close(y, _fp64_formula(x, gamma, scale, silu), rtol=1e-12, atol=1e-12)
    if not silu:  # the VAE's former formula, in fp64
        g = gamma.reshape(1, -1, *([1] * (x.dim() - 2)))
        torch.testing.assert_close(y, F.normalize(x, dim=1) * scale * g, rtol=1e-12, atol=1e-12)
    # fp32 inputs: computed in fp32, rounded once
    y32 = channel_rms_norm_ref(x.float(), gamma.float(), scale=scale, silu=silu)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), _fp64_formula(x.float(), gamma.float(), scale, silu), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("shape, gamma_shape", [
    ((2, 13, 3, 5, 7), (13, 1, 1, 1)),   # 5-D video, the VAE's gamma shape; N = 105 < BLOCK_N
    ((2, 13, 35, 9), (13, 1, 1)),        # 4-D image (attention block's norm)
    ((1, 40, 300), (40,)),               # N = 300: one full and one partial position block, C = 2.5 BLOCK_C
    ((3, 3, 2, 17, 19), (3,)),           # C < BLOCK_C
])
def test_triton_matches_reference(triton_device, shape, gamma_shape, silu):
    x, gamma, scale = _inputs(shape, torch.float32, triton_device, gamma_shape)
    y = channel_rms_norm(x, gamma, scale=scale, silu=silu, backend="triton")
    assert y.is_contiguous()
    _close(y, channel_rms_norm_ref(x, gamma, scale=scale, silu=silu), torch.float32)


@pytest.mark.parametrize("backend", IMPLEMENTED)
@pytest.mark.parametrize("shape,layout", [
    ((2, 13, 3, 5, 7), torch.channels_last_3d),  # the VAE's GPU layout; C not a multiple of 32
    ((2, 40, 9, 35), torch.channels_last),       # attention block's images; C = 1.25 x 32
])
def test_channels_last_equals_contiguous(triton_device, backend, shape, layout):
    """Channels-last x gives the contiguous result, in x's layout."""
    device = triton_device if backend == "triton" else "cpu"
    x, gamma, scale = _inputs(shape, torch.float32, device)
    xc = x.contiguous(memory_format=layout)
    for silu in (False, True):
        y = channel_rms_norm(xc, gamma, scale=scale, silu=silu, backend=backend)
        assert y.is_contiguous(memory_format=layout) and not y.is_contiguous()
        _close(y, channel_rms_norm_ref(x, gamma, scale=scale, silu=silu), torch.float32)


@pytest.mark.parametrize("backend", IMPLEMENTED)
def test_out_writes_a_time_slice_of_a_larger_buffer(triton_device, backend):
    """``out`` as the VAE passes it: frames 2.. of a channels-last buffer with two extra frames
    (batch items 2 apart in memory); the two leading frames stay untouched."""
    device = triton_device if backend == "triton" else "cpu"
    x, gamma, scale = _inputs((3, 13, 4, 5, 7), torch.float32, device)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    buf = torch.full((3, 13, 6, 5, 7), 7.0, device=device).contiguous(memory_format=torch.channels_last_3d)
    out = buf[:, :, 2:]
    got = channel_rms_norm(x, gamma, scale=scale, silu=True, out=out, backend=backend)
    assert got is out
    _close(out, channel_rms_norm_ref(x, gamma, scale=scale, silu=True), torch.float32)
    assert torch.all(buf[:, :, :2] == 7.0)


def test_bad_out_names_the_argument():
    x, gamma, scale = _inputs((2, 4, 3, 5), torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"'out'.*shape \(2, 4, 'T_k <= 3', 5\)"):
        channel_rms_norm(x, gamma, scale=scale, out=torch.empty(2, 4, 3, 6))
    with pytest.raises(ValueError, match="'out'.*shape"):
        channel_rms_norm(x, gamma, scale=scale, out=torch.empty(2, 4, 4, 5))
    with pytest.raises(ValueError, match="'out'.*dtype"):
        channel_rms_norm(x, gamma, scale=scale, out=torch.empty_like(x, dtype=torch.float16))
    with pytest.raises(ValueError, match="'out'.*positions contiguous"):
        channel_rms_norm(x, gamma, scale=scale, out=torch.empty_like(x, memory_format=torch.channels_last))
    with pytest.raises(ValueError, match=r"'out\[1\]'.*channels innermost"):
        xc = x.contiguous(memory_format=torch.channels_last)
        channel_rms_norm(xc, gamma, scale=scale, out=[torch.empty_like(xc), torch.empty_like(x)])
    with pytest.raises(ValueError, match="'out'.*overlapping"):
        channel_rms_norm(x, gamma, scale=scale, out=torch.empty(1, 4, 3, 5).expand(2, 4, 3, 5))
    with pytest.raises(ValueError, match="'bias'.*4 elements"):
        channel_rms_norm(x, gamma, scale=scale, bias=torch.ones(3))
    with pytest.raises(ValueError, match="'bias'.*dtype"):
        channel_rms_norm(x, gamma, scale=scale, bias=torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="'out'.*1 to 3 tensors"):
        channel_rms_norm(x, gamma, scale=scale, out=[torch.empty_like(x)] * 4)


@pytest.mark.parametrize("backend", IMPLEMENTED)
def test_out_into_three_time_shifted_channel_blocks(triton_device, backend):
    """Three destinations, as the VAE's time-folded convolution uses them: channel block k of a
    (B, 3C, T, H, W) channels-last buffer, frames 2 - k .. T - 1, receives x's first T - 2 + k frames;
    with a per-channel bias added to x first."""
    device = triton_device if backend == "triton" else "cpu"
    B, C, T, H, W = 2, 13, 4, 3, 5
    x, gamma, scale = _inputs((B, C, T, H, W), torch.float32, device)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    buf = torch.full((B, 3 * C, T, H, W), 7.0, device=device).contiguous(memory_format=torch.channels_last_3d)
    outs = [buf[:, k * C:(k + 1) * C, 2 - k:] for k in range(3)]
    bias = torch.randn(C, device=device)  # a deferred conv bias, added before the norm
    channel_rms_norm(x, gamma, scale=scale, bias=bias, out=outs, backend=backend)
    want = channel_rms_norm_ref(x + bias.reshape(1, C, 1, 1, 1), gamma, scale=scale, silu=False)
    for k in range(3):
        _close(buf[:, k * C:(k + 1) * C, 2 - k:], want[:, :, :T - 2 + k], torch.float32)
        assert torch.all(buf[:, k * C:(k + 1) * C, :2 - k] == 7.0)


@pytest.mark.parametrize("silu", [False, True])
def test_triton_small_blocks_cover_every_tail(triton_device, silu):
    """Blocks much smaller than the shape: several position blocks per batch item (the last one
    partial) and a partial last channel block, through the launcher directly."""
    from spiral_rt.kernels import channel_rms_norm as kernel

    x, gamma, scale = _inputs((2, 13, 3, 5, 7), torch.float32, triton_device)
    y = torch.empty_like(x)
    kernel.channel_rms_norm(x, gamma, y, scale, 1e-12, silu, block_n=16, block_c=4)
    _close(y, channel_rms_norm_ref(x, gamma, scale=scale, silu=silu), torch.float32)


@pytest.mark.parametrize("backend", IMPLEMENTED)
def test_zero_channel_vectors_give_zeros(triton_device, backend):
    """Positions whose channels are all zero: x / max(0, eps) = 0, not NaN (F.normalize's eps)."""
    device = triton_device if backend == "triton" else "cpu"
    x, gamma, scale = _inputs((2, 6, 4, 5), torch.float32, device)
    x[0, :, 1, 2] = 0
    x[1, :, :, 0] = 0
    for silu in (False, True):
        y = channel_rms_norm(x, gamma, scale=scale, silu=silu, backend=backend)
        assert torch.isfinite(y).all()
        assert (y[0, :, 1, 2] == 0).all() and (y[1, :, :, 0] == 0).all()


def test_reference_backend_through_op_and_cpu_choice():
    x, gamma, scale = _inputs((2, 7, 3, 4, 5), torch.float32, "cpu", (7, 1, 1, 1))
    y = channel_rms_norm(x, gamma, scale=scale, silu=True, backend="reference")
    torch.testing.assert_close(y, channel_rms_norm_ref(x, gamma, scale=scale, silu=True), rtol=0, atol=0)
    assert select_backend("channel_rms_norm", torch.device("cpu"), IMPLEMENTED) == "reference"
    empty = torch.empty(0, 7, 3, 4, 5)
    assert channel_rms_norm(empty, gamma, scale=scale).shape == empty.shape


def test_empty_input_triton(triton_device):
    x = torch.empty(2, 5, 0, 3, device=triton_device)
    y = channel_rms_norm(x, torch.ones(5, device=triton_device), scale=1.0, backend="triton")
    assert y.shape == x.shape


def test_bad_arguments_name_the_argument():
    x, gamma, scale = _inputs((1, 4, 3, 5), torch.float32, "cpu")
    with pytest.raises(ValueError, match="'x'.*at least 3"):
        channel_rms_norm(x[0, 0], gamma[:3], scale=scale)
    with pytest.raises(ValueError, match="'x'.*dtype"):
        channel_rms_norm(x.double(), gamma, scale=scale)
    with pytest.raises(ValueError, match="'x'.*dtype"):
        channel_rms_norm(x.to(torch.int32), gamma, scale=scale)
    with pytest.raises(ValueError, match="'x'.*contiguous or channels-last"):
        channel_rms_norm(x.transpose(2, 3), gamma, scale=scale)
    with pytest.raises(ValueError, match="'x'.*contiguous or channels-last"):
        channel_rms_norm(x.contiguous(memory_format=torch.channels_last)[..., ::2], gamma, scale=scale)
    with pytest.raises(ValueError, match="'x'.*Tensor"):
        channel_rms_norm(x.tolist(), gamma, scale=scale)
    with pytest.raises(ValueError, match="'gamma'.*4 elements"):
        channel_rms_norm(x, torch.ones(5), scale=scale)
    with pytest.raises(ValueError, match="'gamma'.*dtype"):
        channel_rms_norm(x, torch.ones(4, dtype=torch.int64), scale=scale)
    for bad in (0.0, -1.0, True, torch.tensor(2.0), "2"):
        with pytest.raises(ValueError, match="'scale'"):
            channel_rms_norm(x, gamma, scale=bad)
    for bad in (0.0, -1e-6, None):
        with pytest.raises(ValueError, match="'eps'"):
            channel_rms_norm(x, gamma, scale=scale, eps=bad)
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match="'silu'"):
            channel_rms_norm(x, gamma, scale=scale, silu=bad)
    with pytest.raises(ValueError, match="backend"):
        channel_rms_norm(x, gamma, scale=scale, backend="cuda")


def test_traces_through_torch_compile():
    x, gamma, scale = _inputs((2, 6, 3, 4, 5), torch.float32, "cpu", (6, 1, 1, 1))

    def fn(x, gamma):
        return channel_rms_norm(x, gamma, scale=scale, silu=True, backend="reference") * 2

    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, gamma)
    torch.testing.assert_close(got, fn(x, gamma))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
class TestGPU:
    @pytest.mark.parametrize("silu", [False, True])
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
    def test_vae_stage_shape_all_dtypes(self, dtype, silu):
        x, gamma, scale = _inputs((1, 96, 3, 60, 104), dtype, "cuda", (96, 1, 1, 1))
        gamma = gamma.to(dtype)  # model.to(dtype) rounds gamma too
        y = channel_rms_norm(x, gamma, scale=scale, silu=silu)  # automatic choice: triton
        _close(y, channel_rms_norm_ref(x, gamma, scale=scale, silu=silu), dtype)

    @pytest.mark.parametrize("shape", [(1, 384, 3, 120, 208), (2, 192, 5, 61, 103), (12, 384, 30, 52)])
    def test_vae_shapes_bf16(self, shape):
        x, gamma, scale = _inputs(shape, torch.bfloat16, "cuda", (shape[1],) + (1,) * (len(shape) - 2))
        gamma = gamma.bfloat16()
        y = channel_rms_norm(x, gamma, scale=scale, silu=True, backend="triton")
        _close(y, channel_rms_norm_ref(x, gamma, scale=scale, silu=True), torch.bfloat16)

    def test_automatic_choice_is_triton(self):
        assert select_backend("channel_rms_norm", torch.device("cuda"), IMPLEMENTED) == "triton"

    def test_torch_compile_inductor(self):
        x, gamma, scale = _inputs((1, 96, 3, 30, 52), torch.bfloat16, "cuda", (96, 1, 1, 1))
        gamma = gamma.bfloat16()

        def fn(x, gamma):
            return channel_rms_norm(x, gamma, scale=scale, silu=True).float() * 2

        got = torch.compile(fn, fullgraph=True)(x, gamma)
        assert torch.equal(got, fn(x, gamma))

    def test_cuda_graph_capture_and_replay(self):
        shape = (1, 96, 3, 30, 52)
        x, gamma, scale = _inputs(shape, torch.bfloat16, "cuda", (96, 1, 1, 1))
        gamma = gamma.bfloat16()
        channel_rms_norm(x, gamma, scale=scale, silu=True)  # warm up (compile the kernel)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            with torch.cuda.graph(graph, stream=stream):
                out = channel_rms_norm(x, gamma, scale=scale, silu=True)
        for _ in range(3):  # new inputs written in place, then replay
            x.copy_(torch.randn(shape, device="cuda"))
            graph.replay()
            assert torch.equal(out, channel_rms_norm(x, gamma, scale=scale, silu=True))
