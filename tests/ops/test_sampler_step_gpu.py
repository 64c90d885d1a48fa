"""sampler_step on the GPU: CUDA and Triton vs the reference, bit-exact replay, CUDA graphs.

Run on the H100 machine with ``python -m pytest -m gpu``. Tolerances as in test_sampler_step.py.
"""

import pytest
import torch

from spiral_rt.ops import noise_key, sampler_step

from .test_sampler_step import _compare_backend, _inputs

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (S, ...) shapes: one Wan chunk, odd lengths (scalar path: N % 8 != 0), tiny, many blocks
SHAPES = [(2, 16, 3, 60, 104), (3, 5, 1001), (1, 3), (5, 40961)]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("mode", ["none", "tensor", "philox"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_backend_equals_reference(backend, dtype, shape, mode):
    _compare_backend(backend, "cuda", shape, dtype, mode)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_without_mu(backend):
    _compare_backend(backend, "cuda", (3, 16, 3, 6, 10), torch.bfloat16, "philox", return_mu=False)


def test_cuda_misaligned_views_take_the_scalar_path():
    base = torch.randn(2 * 4096 + 1, device="cuda", dtype=torch.bfloat16)
    x = base[1:].view(2, 4096)  # 2-byte offset: not 16-byte aligned
    m = torch.randn(2, 4096, device="cuda", dtype=torch.bfloat16)
    key = noise_key(1, [0, 1], 0, 0, device="cuda")
    got = sampler_step(x, m, 0.5, 0.25, 0.75, noise_key=key, backend="cuda")
    ref = sampler_step(x, m, 0.5, 0.25, 0.75, noise_key=key, backend="reference")
    torch.testing.assert_close(got.x_next.float(), ref.x_next.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.sq_sum, ref.sq_sum, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_philox_replay_is_bit_exact_across_runs_and_batches(backend):
    shape = (8, 16, 3, 60, 104)
    x, m, a, b, c = _inputs(shape, torch.bfloat16, "cuda")
    key = noise_key(123456789, range(8), 5, 2, device="cuda")
    first = sampler_step(x, m, a, b, c, noise_key=key, backend=backend)
    for _ in range(3):
        again = sampler_step(x, m, a, b, c, noise_key=key, backend=backend)
        assert torch.equal(again.x_next, first.x_next) and torch.equal(again.sq_sum, first.sq_sum)
    # the same sequence in another batch (other neighbours, other position) gives the same bits
    perm = torch.tensor([5, 3, 0, 7], device="cuda")
    sub = sampler_step(x[perm], m[perm], a[perm], b[perm], c[perm], noise_key=key[perm], backend=backend)
    assert torch.equal(sub.x_next, first.x_next[perm])
    assert torch.equal(sub.sq_sum, first.sq_sum[perm])


def test_group_members_share_noise_through_the_sequence_id():
    x, m, a, b, c = _inputs((4, 3000), torch.float32, "cuda")
    x[:] = x[0]
    m[:] = m[0]
    key = noise_key(7, [0, 0, 0, 1], 1, 1, device="cuda")  # members 0-2 share noise, 3 differs
    out = sampler_step(x, m, 1.0, 0.5, 0.3, noise_key=key, backend="cuda").x_next
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    assert not torch.equal(out[0], out[3])


def test_cuda_and_triton_noise_agree():
    shape = (3, 7, 1000)
    z = torch.zeros(shape, device="cuda")
    key = noise_key(42, [1, 2, 3], 0, 0, device="cuda")
    eps_cuda = sampler_step(z, z, 0.0, 0.0, 1.0, noise_key=key, backend="cuda").x_next
    eps_triton = sampler_step(z, z, 0.0, 0.0, 1.0, noise_key=key, backend="triton").x_next
    eps_ref = sampler_step(z, z, 0.0, 0.0, 1.0, noise_key=key, backend="reference").x_next
    torch.testing.assert_close(eps_cuda, eps_ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(eps_triton, eps_ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_capture_and_replay(backend):
    shape = (4, 16, 3, 6, 10)
    x, m, a, b, c = _inputs(shape, torch.bfloat16, "cuda")
    key = noise_key(9, range(4), 0, 0, device="cuda")
    sampler_step(x, m, a, b, c, noise_key=key, backend=backend)  # warm up (compile, workspace)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            out = sampler_step(x, m, a, b, c, noise_key=key, backend=backend)
    for step in range(3):  # new inputs and a new step index, written in place, then replay
        x.copy_(torch.randn(shape, device="cuda"))
        key[:, 3] = step + 1
        graph.replay()
        eager = sampler_step(x, m, a, b, c, noise_key=key, backend=backend)
        assert torch.equal(out.x_next, eager.x_next)
        assert torch.equal(out.sq_sum, eager.sq_sum)


def test_cuda_graphs_sharing_a_pool_keep_their_tickets():
    """Two graphs captured one after the other on one stream, sharing a memory pool, each with
    two launches: the second capture may reuse the first one's ticket memory for its own tensors,
    so each graph must zero its tickets itself. Interleaved replays must match eager calls."""
    shape = (3, 2000)
    x, m, a, b, c = _inputs(shape, torch.bfloat16, "cuda")
    key = noise_key(5, range(3), 0, 0, device="cuda")
    sampler_step(x, m, a, b, c, noise_key=key, backend="cuda")
    torch.cuda.synchronize()
    pool = torch.cuda.graph_pool_handle()
    stream = torch.cuda.Stream()
    graphs, outs = [], []
    with torch.cuda.stream(stream):
        for scale in (1.0, 3.0):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                first = sampler_step(x * scale, m, a, b, c, noise_key=key, backend="cuda")
                second = sampler_step(first.x_next, m, a, b, c, noise_key=key, backend="cuda")
            graphs.append(graph)
            outs.append((scale, second))
    for order in ([0, 1], [1, 0], [1, 1, 0]):
        for g in order:
            x.copy_(torch.randn(shape, device="cuda"))
            graphs[g].replay()
            scale, got = outs[g]
            first = sampler_step(x * scale, m, a, b, c, noise_key=key, backend="cuda")
            want = sampler_step(first.x_next, m, a, b, c, noise_key=key, backend="cuda")
            assert torch.equal(got.x_next, want.x_next)
            assert torch.equal(got.sq_sum, want.sq_sum)


def test_torch_compile_inductor_on_gpu():
    x, m, a, b, c = _inputs((2, 4, 1000), torch.bfloat16, "cuda")
    key = noise_key(3, [0, 1], 0, 1, device="cuda")

    def step(x, m, a, b, c, key):
        out = sampler_step(x, m, a, b, c, noise_key=key, backend="cuda")
        return out.x_next.float() * 2, out.sq_sum

    got = torch.compile(step, fullgraph=True)(x, m, a, b, c, key)
    expected = step(x, m, a, b, c, key)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_automatic_choice_on_gpu_is_cuda():
    from spiral_rt.ops import select_backend

    assert select_backend("sampler_step", torch.device("cuda"), ("cuda", "triton", "reference")) == "cuda"
