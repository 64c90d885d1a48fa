"""sampler_step: reference vs float64 math, Triton and CUDA vs the reference, Philox replay.

Tolerances (outputs are rounded to the input dtype, so they are stated in units of its rounding):
x_next and mu within one rounding step of the float64 result (fp32 rel 2e-6; fp16 rel 1e-3 +
abs 1e-3; bf16 rel 8e-3 + abs 8e-3). sq_sum is an fp32 sum: rel 1e-4 against float64. Noise
from different backends agrees to abs 2e-5 (same Philox bits; log/sin/cos differ by ~1 ulp).
"""

import math

import pytest
import torch

from spiral_rt.ops import noise_key, sampler_step
from spiral_rt.reference import philox as ref_philox
from spiral_rt.reference.sampler_step import sampler_step as sampler_step_ref

TOL = {torch.float32: (2e-6, 1e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}
# Random123's known-answer vectors for Philox4x32-10: (counter, key, expected output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _inputs(shape, dtype, device="cpu"):
    num_seqs = shape[0]
    x = torch.randn(shape, device=device).to(dtype)
    m = torch.randn(shape, device=device).to(dtype)
    a = torch.rand(num_seqs, device=device) + 0.5
    b = torch.randn(num_seqs, device=device)
    c = torch.rand(num_seqs, device=device) * 0.5 + 0.1
    return x, m, a, b, c


def _float64_step(x, m, a, b, c, eps):
    s = x.shape[0]
    mu = a.double()[:, None] * x.reshape(s, -1).double() + b.double()[:, None] * m.reshape(s, -1).double()
    x_next = mu + c.double()[:, None] * eps.reshape(s, -1).double()
    return x_next, mu


def _assert_close_dtype(actual, expected, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double().reshape(expected.shape), expected, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------- Philox


@pytest.mark.parametrize("ctr,key,expected", PHILOX_KAT)
def test_reference_philox_known_answers(ctr, key, expected):
    out = ref_philox.philox4x32(tuple(torch.tensor([c]) for c in ctr), key)
    assert tuple(int(o) for o in out) == expected
    # the same with the key as tensors (how the batched noise path calls it)
    out = ref_philox.philox4x32(ctr, tuple(torch.tensor([k]) for k in key))
    assert tuple(int(o) for o in out) == expected


@pytest.mark.parametrize("ctr,key,expected", PHILOX_KAT)
def test_native_philox_known_answers(ctr, key, expected):
    from spiral_rt import _C

    assert tuple(_C.philox4x32(*ctr, *key)) == expected


def test_native_normals_equal_reference():
    """csrc/philox.h (evaluated on the host) and the PyTorch reference give the same normals."""
    from spiral_rt import _C

    seed = (7 << 33) + 12345
    native = torch.tensor(_C.philox_normals(seed, 3, 11, 2, 4099))
    ref = ref_philox.philox_normal(seed, 3, 11, 2, 4099)
    torch.testing.assert_close(native, ref, rtol=0, atol=2e-6)


def test_philox_normals_are_standard_normal():
    z = ref_philox.philox_normal(2024, 0, 0, 0, 1 << 20).double()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    # tails: P(|z| > 3) = 0.0027
    assert abs((z.abs() > 3).double().mean().item() - 0.0027) < 5 * math.sqrt(0.0027 / n)
    # adjacent elements (same Philox block and Box-Muller pair) are uncorrelated
    assert abs((z[0::2] * z[1::2]).mean().item()) < 5 / math.sqrt(n / 2)


def test_philox_streams_differ_per_key_and_are_prefix_stable():
    base = ref_philox.philox_normal(1, 2, 3, 4, 1000)
    for key in [(2, 2, 3, 4), (1, 3, 3, 4), (1, 2, 4, 4), (1, 2, 3, 5), (1 + (1 << 32), 2, 3, 4)]:
        other = ref_philox.philox_normal(*key, 1000)
        assert abs(torch.corrcoef(torch.stack([base, other]))[0, 1].item()) < 0.15
    assert torch.equal(ref_philox.philox_normal(1, 2, 3, 4, 37), base[:37])


# ---------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 1001), (4, 16, 3, 6, 10)])
def test_reference_equals_float64_formula(shape, dtype):
    x, m, a, b, c = _inputs(shape, dtype)
    eps = torch.randn(shape).to(dtype)
    x_next, mu, sq = sampler_step_ref(x, m, a, b, c, noise=eps)
    x64, mu64 = _float64_step(x, m, a, b, c, eps)
    _assert_close_dtype(x_next, x64, dtype)
    _assert_close_dtype(mu, mu64, dtype)
    sq64 = ((x_next.reshape(shape[0], -1).double() - mu64) ** 2).sum(1)
    torch.testing.assert_close(sq.double(), sq64, rtol=1e-4, atol=1e-6)


def test_sq_sum_gives_the_gaussian_log_density():
    """-sq/(2c^2) - n log(c sqrt(2 pi)) is the float64 log-density of the stored sample."""
    shape = (3, 2, 333)
    x, m, a, b, c = _inputs(shape, torch.float32)
    out = sampler_step(x, m, a, b, c, noise_key=noise_key(5, [0, 1, 2], 1, 0), backend="reference")
    logp = -out.sq_sum.double() / (2 * c.double() ** 2) - out.count * torch.log(c.double() * math.sqrt(2 * math.pi))
    mu64 = _float64_step(x, m, a, b, c, torch.zeros(shape))[1]
    dist = torch.distributions.Normal(mu64, c.double()[:, None])
    expected = dist.log_prob(out.x_next.reshape(3, -1).double()).sum(1)
    torch.testing.assert_close(logp, expected, rtol=1e-5, atol=1e-3)
    assert out.count == 666


def test_deterministic_step_without_noise():
    x, m, a, b, c = _inputs((2, 50), torch.float32)
    out = sampler_step(x, m, a, b, c, backend="reference")
    torch.testing.assert_close(out.x_next, out.mu)
    assert torch.all(out.sq_sum == 0)


# ------------------------------------------------------------------------------------- Triton


def _compare_backend(backend, device, shape, dtype, mode, return_mu=True):
    x, m, a, b, c = _inputs(shape, dtype, device)
    kwargs = {}
    if mode == "tensor":
        kwargs["noise"] = torch.randn(shape, device=device).to(dtype)
    elif mode == "philox":
        kwargs["noise_key"] = noise_key((3 << 40) + 17, range(100, 100 + shape[0]), 4, 2, device=device)
    got = sampler_step(x, m, a, b, c, return_mu=return_mu, backend=backend, **kwargs)
    ref = sampler_step(x, m, a, b, c, return_mu=return_mu, backend="reference", **kwargs)
    rtol, atol = TOL[dtype]
    if mode == "philox":  # noise differs by ~1e-6 between backends: allow one more rounding step
        rtol, atol = 2 * rtol, 2 * atol + 2e-5
    torch.testing.assert_close(got.x_next.float(), ref.x_next.float(), rtol=rtol, atol=atol)
    if return_mu:
        torch.testing.assert_close(got.mu.float(), ref.mu.float(), rtol=TOL[dtype][0], atol=TOL[dtype][1])
    else:
        assert got.mu is None
    torch.testing.assert_close(got.sq_sum, ref.sq_sum, rtol=1e-3 if mode == "philox" and dtype != torch.float32 else 1e-4, atol=1e-5)
    assert got.count == ref.count


@pytest.mark.parametrize("mode", ["none", "tensor", "philox"])
@pytest.mark.parametrize("shape", [(3, 5, 411), (2, 4100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_equals_reference(triton_device, shape, dtype, mode):
    _compare_backend("triton", triton_device, shape, dtype, mode)


def test_triton_without_mu(triton_device):
    _compare_backend("triton", triton_device, (2, 999), torch.float32, "philox", return_mu=False)


def test_triton_noise_is_independent_of_batch_composition(triton_device):
    shape = (4, 3001)
    x, m, a, b, c = _inputs(shape, torch.float32, triton_device)
    key = noise_key(99, [7, 8, 9, 10], 2, 3, device=triton_device)
    full = sampler_step(x, m, a, b, c, noise_key=key, backend="triton")
    one = sampler_step(x[2:3], m[2:3], a[2:3], b[2:3], c[2:3], noise_key=key[2:3], backend="triton")
    assert torch.equal(full.x_next[2:3], one.x_next)
    assert torch.equal(full.sq_sum[2:3], one.sq_sum)


# -------------------------------------------------------------------------- checks and dispatch


def test_bad_inputs_name_the_argument():
    x, m, a, b, c = _inputs((2, 8), torch.float32)
    cases = [
        (dict(m=m[:, :7].contiguous()), "'m' must have shape (2, 8)"),
        (dict(m=m.double()), "'m' must have dtype"),
        (dict(x=x.int(), m=m.int()), "'x' must have dtype"),
        (dict(x=torch.randn(8, 2).t(), m=m), "'x' must be contiguous"),
        (dict(a=torch.ones(3)), "'a' must have shape (2,)"),
        (dict(c=torch.ones(2, dtype=torch.int64)), "'c' must be floating point"),
        (dict(noise=torch.randn(2, 9)), "'noise' must have shape (2, 8)"),
        (dict(noise_key=torch.zeros(2, 3, dtype=torch.int64)), "'noise_key' must have shape (2, 4)"),
        (dict(noise_key=torch.zeros(2, 4, dtype=torch.int32)), "'noise_key' must have dtype"),
        (dict(noise=torch.randn(2, 8), noise_key=noise_key(0, [0, 1], 0, 0)), "at most one of 'noise' and 'noise_key'"),
        (dict(backend="cuda"), "cuda backend needs CUDA tensors"),
        (dict(backend="fastest"), "'fastest' is not a backend"),
    ]
    for overrides, message in cases:
        args = dict(x=x, m=m, a=a, b=b, c=c)
        args.update(overrides)
        with pytest.raises(ValueError) as err:
            sampler_step(args.pop("x"), args.pop("m"), args.pop("a"), args.pop("b"), args.pop("c"), **args)
        assert message in str(err.value), (message, str(err.value))
        assert "sampler_step" in str(err.value)


def test_noise_key_checks_its_ranges_and_keeps_64_bit_seeds():
    key = noise_key(2**64 - 1, [0, 2**32 - 1], 3, 4)
    assert key[0, 0].item() == -1 and key[1, 1].item() == 2**32 - 1
    z = ref_philox.philox_normal_keyed(key[:1], 16)
    torch.testing.assert_close(z[0], torch.tensor(__import__("spiral_rt._C")._C.philox_normals(2**64 - 1, 0, 3, 4, 16)), rtol=0, atol=2e-6)
    for kwargs, name in [(dict(seed=-1), "seed"), (dict(seed=2**64), "seed"), (dict(chunk=2**32), "chunk"),
                         (dict(step=-1), "step"), (dict(sequence_ids=[2**32]), "sequence_ids")]:
        args = dict(seed=0, sequence_ids=[0], chunk=0, step=0) | kwargs
        with pytest.raises(ValueError, match=f"'{name}'"):
            noise_key(**args)


def test_environment_variable_forces_a_backend(monkeypatch):
    x, m, a, b, c = _inputs((2, 8), torch.float32)
    monkeypatch.setenv("SPIRAL_RT_BACKEND", "sampler_step=cuda,other_op=triton")
    with pytest.raises(ValueError, match="SPIRAL_RT_BACKEND='cuda' cannot run here"):
        sampler_step(x, m, a, b, c)
    monkeypatch.setenv("SPIRAL_RT_BACKEND", "reference")
    assert sampler_step(x, m, a, b, c).count == 8
    # an explicit argument wins over the environment
    monkeypatch.setenv("SPIRAL_RT_BACKEND", "cuda")
    assert sampler_step(x, m, a, b, c, backend="reference").count == 8


def test_automatic_choice_on_cpu_is_the_reference():
    from spiral_rt.ops import select_backend

    assert select_backend("sampler_step", torch.device("cpu"), ("cuda", "triton", "reference")) == "reference"


def test_scalars_broadcast_and_empty_sequences():
    x, m, *_ = _inputs((3, 10), torch.float32)
    out = sampler_step(x, m, 1.0, -0.5, 0.0, backend="reference")
    torch.testing.assert_close(out.x_next, x - 0.5 * m)
    empty = sampler_step(x[:, :0], m[:, :0], 1.0, 1.0, 1.0, backend="reference")
    assert empty.count == 0 and torch.all(empty.sq_sum == 0)


def test_traces_through_torch_compile():
    x, m, a, b, c = _inputs((2, 64), torch.float32)
    key = noise_key(3, [0, 1], 0, 1)

    def step(x, m, a, b, c, key):
        out = sampler_step(x, m, a, b, c, noise_key=key, backend="reference")
        return out.x_next * 2, out.sq_sum

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got, expected = compiled(x, m, a, b, c, key), step(x, m, a, b, c, key)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
