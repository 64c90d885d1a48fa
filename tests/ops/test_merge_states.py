"""Tests of ``spiral_rt.ops.merge_states``: reference vs fp64 attention math, Triton vs reference.

The merge is checked for what it is for: the state over A u B computed by merging the states over A
and B equals attention over A u B computed directly (fp64), including empty key sets (-inf LSE).
Tolerances: fp32 1e-5, fp16 2e-3, bf16 1.6e-2 relative to max |O| (one rounding of the output);
LSE is always fp32: 1e-5 absolute.
"""

import math

import pytest
import torch

from spiral_rt.ops import dispatch
from spiral_rt.ops.merge_states import merge_states
from spiral_rt.reference.merge_states import merge_states as merge_ref

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _attention_fp64(q, k, v):
    """(N, H, D) queries over (M, H, D) keys -> O (N, H, D), LSE (N, H), both fp64."""
    s = torch.einsum("nhd,mhd->hnm", q, k) / math.sqrt(q.shape[-1])
    if k.shape[0] == 0:
        return torch.zeros_like(q), torch.full(q.shape[:2], float("-inf"), dtype=q.dtype)
    lse = torch.logsumexp(s, dim=-1)
    o = torch.einsum("hnm,mhd->nhd", torch.softmax(s, dim=-1), v)
    return o, lse.transpose(0, 1)


@pytest.mark.parametrize("len_a,len_b", [(7, 13), (0, 9), (11, 0), (0, 0)])
def test_reference_merge_equals_attention_over_union(len_a, len_b):
    n, h, d = 5, 3, 24
    q = torch.randn(n, h, d, dtype=torch.float64)
    k = torch.randn(len_a + len_b, h, d, dtype=torch.float64)
    v = torch.randn(len_a + len_b, h, d, dtype=torch.float64)
    o_a, lse_a = _attention_fp64(q, k[:len_a], v[:len_a])
    o_b, lse_b = _attention_fp64(q, k[len_a:], v[len_a:])
    o, lse = merge_ref(o_a, lse_a, o_b, lse_b)
    o_full, lse_full = _attention_fp64(q, k, v)
    torch.testing.assert_close(o, o_full, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, lse_full, rtol=0, atol=1e-12)
    if len_a + len_b == 0:
        assert torch.isneginf(lse).all() and (o == 0).all()


def _random_states(n, h, d, dtype, device, empty_frac=0.2):
    o_a = torch.randn(n, h, d, device=device).to(dtype)
    o_b = torch.randn(n, h, d, device=device).to(dtype)
    lse_a = torch.randn(n, h, device=device) * 4
    lse_b = torch.randn(n, h, device=device) * 4
    lse_a[torch.rand(n, h, device=device) < empty_frac] = float("-inf")
    lse_b[torch.rand(n, h, device=device) < empty_frac] = float("-inf")
    lse_a[0, 0] = lse_b[0, 0] = float("-inf")  # at least one row empty on both sides
    o_a[lse_a == float("-inf")] = 0
    o_b[lse_b == float("-inf")] = 0
    return o_a, lse_a, o_b, lse_b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,h,d", [(37, 3, 64), (5, 2, 40), (1, 1, 128)])
def test_triton_matches_reference(triton_device, dtype, n, h, d):
    o_a, lse_a, o_b, lse_b = _random_states(n, h, d, dtype, triton_device)
    o, lse = merge_states(o_a, lse_a, o_b, lse_b, backend="triton")
    o_ref, lse_ref = merge_ref(o_a.double(), lse_a.double(), o_b.double(), lse_b.double())
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref))
    finite = torch.isfinite(lse_ref)
    torch.testing.assert_close(lse[finite].double(), lse_ref[finite], rtol=0, atol=1e-5)
    torch.testing.assert_close(o.double(), o_ref, rtol=0, atol=ATOL[dtype] * o_ref.abs().max().item())
    assert (o[~finite] == 0).all()


def test_reference_backend_through_op():
    o_a, lse_a, o_b, lse_b = _random_states(9, 4, 32, torch.float32, "cpu")
    o, lse = merge_states(o_a, lse_a, o_b, lse_b, backend="reference")
    o_ref, lse_ref = merge_ref(o_a, lse_a, o_b, lse_b)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(lse, lse_ref)


def test_bad_arguments_name_the_argument():
    o_a, lse_a, o_b, lse_b = _random_states(4, 2, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="'lse_a'"):
        merge_states(o_a, lse_a.double(), o_b, lse_b, backend="reference")
    with pytest.raises(ValueError, match="'o_b'"):
        merge_states(o_a, lse_a, o_b[:3], lse_b, backend="reference")
    with pytest.raises(ValueError, match="'lse_b'"):
        merge_states(o_a, lse_a, o_b, lse_b[:, :1], backend="reference")
    with pytest.raises(ValueError, match="'o_a'"):
        merge_states(o_a.transpose(0, 1), lse_a, o_b, lse_b, backend="reference")


def test_custom_op_traces_with_fake_tensors():
    o_a, lse_a, o_b, lse_b = _random_states(6, 2, 16, torch.float32, "cpu")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fa, fla, fb, flb = (mode.from_tensor(t) for t in (o_a, lse_a, o_b, lse_b))
        o, lse = torch.ops.spiral_rt.merge_states(fa, fla, fb, flb, "reference")
        assert o.shape == o_a.shape and lse.shape == lse_a.shape and lse.dtype == torch.float32


@pytest.mark.gpu
def test_gpu_large_rows_match_reference():
    o_a, lse_a, o_b, lse_b = _random_states(4680, 12, 128, torch.bfloat16, "cuda")
    o, lse = merge_states(o_a, lse_a, o_b, lse_b, backend="triton")
    o_ref, lse_ref = merge_ref(o_a.float(), lse_a, o_b.float(), lse_b)
    finite = torch.isfinite(lse_ref)
    torch.testing.assert_close(lse[finite], lse_ref[finite], rtol=0, atol=1e-5)
    torch.testing.assert_close(o.float(), o_ref, rtol=0, atol=1.6e-2 * o_ref.abs().max().item())
    assert dispatch.select_backend("merge_states", o_a.device, ("triton", "reference")) == "triton"
