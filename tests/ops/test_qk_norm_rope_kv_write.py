"""Tests of ``spiral_rt.ops.qk_norm_rope_kv_write``: reference vs an fp64 complex-number RoPE (as in
Wan's own code), Triton vs reference.

Awkward cases: token counts that are not whole frames, page_size not a power of two, pages listed
out of order, padding slots (-1) left unwritten, varlen sequences with per-sequence frame offsets,
q/k/v as strided views of one fused QKV tensor, the rotated k written back in place into that
tensor without pages (``k_out=k``). Tolerances, relative to max |ref| (one rounding of
the output): fp32 1e-5, fp16 2e-3, bf16 1.6e-2; v is copied bit-exactly.
"""

import math

import pytest
import torch

from spiral_rt.ops.qk_norm_rope_kv_write import _qk_norm_rope_kv_write_op, qk_norm_rope_kv_write
from spiral_rt.reference import qk_norm_rope_kv_write as ref

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _wan_rope_fp64(x, positions):
    """Wan's formulation: complex multiply by polar(1, pos * theta^(-2i/d)) per part, in fp64."""
    t, h, d = x.shape
    parts = ref.rope_parts(d)
    freqs = []
    for axis, dp in enumerate(parts):
        inv = 1.0 / (10000.0 ** (torch.arange(0, dp, 2, dtype=torch.float64) / dp))
        freqs.append(torch.outer(positions[:, axis].double(), inv))
    rot = torch.polar(torch.ones(t, d // 2, dtype=torch.float64), torch.cat(freqs, dim=1))
    xc = torch.view_as_complex(x.double().reshape(t, h, d // 2, 2))
    return torch.view_as_real(xc * rot[:, None, :]).reshape(t, h, d)


def test_rope_parts_match_wan():
    assert ref.rope_parts(128) == (44, 42, 42)
    assert ref.rope_parts(64) == (24, 20, 20)
    assert ref.rope_inv_freq(128).dtype == torch.float32 and ref.rope_inv_freq(128).shape == (64,)


def test_token_positions_frame_major():
    pos = ref.token_positions([0, 7, 19], [5, 0], grid_h=2, grid_w=3)
    assert pos[0].tolist() == [5, 0, 0] and pos[5].tolist() == [5, 1, 2] and pos[6].tolist() == [6, 0, 0]
    assert pos[7].tolist() == [0, 0, 0] and pos[7 + 11].tolist() == [1, 1, 2]


def test_reference_matches_fp64_wan_rope():
    t, h, d = 40, 3, 24
    q = torch.randn(t, h, d)
    w = torch.rand(h * d) + 0.5
    positions = ref.token_positions([0, t], [9], grid_h=3, grid_w=4)
    got = ref.apply_rope(ref.rms_norm_heads(q, w, 1e-6), positions)
    qd = q.double().reshape(t, -1)
    normed = (qd * torch.rsqrt(qd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()).reshape(t, h, d)
    expected = _wan_rope_fp64(normed, positions)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-5 * expected.abs().max().item())
    # the rotation preserves the norm of every pair
    torch.testing.assert_close(got.reshape(t, h, -1, 2).norm(dim=-1), normed.float().reshape(t, h, -1, 2).norm(dim=-1),
                               rtol=1e-5, atol=1e-5)


def _case(total, heads, head_dim, dtype, device, num_pages, page_size, fused_qkv=False, pad=0):
    if fused_qkv:  # (T, 3, H, D) projection output; q, k, v are strided views
        qkv = torch.randn(total, 3, heads, head_dim, device=device).to(dtype)
        q, k, v = qkv.unbind(1)
    else:
        q, k, v = (torch.randn(total, heads, head_dim, device=device).to(dtype) for _ in range(3))
    qw = (torch.rand(heads * head_dim, device=device) + 0.5)
    kw = (torch.rand(heads * head_dim, device=device) + 0.5).to(dtype)
    k_pages = torch.randn(num_pages, page_size, heads, head_dim, device=device).to(dtype)
    v_pages = torch.randn_like(k_pages)
    slots = torch.randperm(num_pages * page_size, device=device)[:total].to(torch.int64)  # scattered, out of order
    if pad:
        slots[-pad:] = -1
    return q, k, v, qw, kw, k_pages, v_pages, slots


def _compare(dtype, args, kwargs, triton_device):
    q, k, v, qw, kw, k_pages, v_pages, slots = args
    kp_ref, vp_ref = k_pages.clone(), v_pages.clone()
    kp, vp = k_pages.clone(), v_pages.clone()
    q_ref = qk_norm_rope_kv_write(q, k, v, qw, kw, kp_ref, vp_ref, slots, backend="reference", **kwargs)
    q_out = qk_norm_rope_kv_write(q, k, v, qw, kw, kp, vp, slots, backend="triton", **kwargs)
    tol = TOL[dtype]
    torch.testing.assert_close(q_out.double(), q_ref.double(), rtol=0, atol=tol * q_ref.abs().max().item())
    torch.testing.assert_close(kp.double(), kp_ref.double(), rtol=0, atol=tol * kp_ref.abs().max().item())
    assert torch.equal(vp, vp_ref)
    written = torch.zeros(kp.shape[0] * kp.shape[1], dtype=torch.bool, device=kp.device)
    written[slots[slots >= 0]] = True
    assert torch.equal(kp.view(written.numel(), -1)[~written], k_pages.view(written.numel(), -1)[~written])
    assert not torch.equal(kp.view(written.numel(), -1)[written], k_pages.view(written.numel(), -1)[written])
    return q_out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_one_sequence(triton_device, dtype):
    # 2 frames of 3 x 5 tokens plus a partial third frame; page_size 7; 3 padding tokens
    args = _case(37, 3, 24, dtype, triton_device, num_pages=9, page_size=7, pad=3)
    _compare(dtype, args, dict(grid_hw=(3, 5), frame_offset=4), triton_device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_varlen_fused_qkv_frame_offset_tensor(triton_device, dtype):
    lens = [15, 1, 30]  # one frame, a single token, two frames
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=triton_device)
    args = _case(sum(lens), 2, 32, dtype, triton_device, num_pages=10, page_size=5, fused_qkv=True)
    offsets = torch.tensor([0, 7, 3], dtype=torch.int32, device=triton_device)
    _compare(dtype, args, dict(grid_hw=(3, 5), frame_offset=offsets, cu_seqlens=cu), triton_device)


def test_triton_frame_index_table_with_gap(triton_device):
    """Per-frame absolute indices (a cache rewrite plan skipping evicted frames): [0, 1, 5, 6, 2]."""
    args = _case(5 * 6, 2, 32, torch.float32, triton_device, num_pages=4, page_size=9)
    frame_index = torch.tensor([0, 1, 5, 6, 2], dtype=torch.int32, device=triton_device)
    q_out = _compare(torch.float32, args, dict(grid_hw=(2, 3), frame_index=frame_index), triton_device)
    # the third frame is rotated as frame 5: same as a one-frame call at frame_offset 5
    q, k, v, qw, kw, kp, vp, slots = args
    q5 = qk_norm_rope_kv_write(q[12:18], k[12:18], v[12:18], qw, kw, kp.clone(), vp.clone(), slots[12:18],
                               grid_hw=(2, 3), frame_offset=5, backend="triton")
    torch.testing.assert_close(q_out[12:18], q5, rtol=0, atol=1e-6)


def test_triton_head_dim_128_parts(triton_device):
    args = _case(12, 2, 128, torch.float32, triton_device, num_pages=3, page_size=6)
    _compare(torch.float32, args, dict(grid_hw=(2, 3), frame_offset=11), triton_device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_k_out_with_pages_is_the_k_written_to_the_pages(triton_device, backend, dtype):
    # 23 tokens: one frame of 2 x 5, a second, and 3 tokens of a third; page_size 5; 2 padding tokens
    q, k, v, qw, kw, k_pages, v_pages, slots = _case(23, 3, 64, dtype, triton_device, num_pages=6, page_size=5, pad=2)
    call = dict(grid_hw=(2, 5), frame_offset=3, backend=backend)
    kp, vp = k_pages.clone(), v_pages.clone()
    q_plain = qk_norm_rope_kv_write(q, k, v, qw, kw, kp, vp, slots, **call)
    kp_out, vp_out = k_pages.clone(), v_pages.clone()
    k_out = torch.full_like(k, float("nan"))
    q_rot = qk_norm_rope_kv_write(q, k, v, qw, kw, kp_out, vp_out, slots, k_out=k_out, **call)
    assert torch.equal(q_rot, q_plain) and torch.equal(kp_out, kp) and torch.equal(vp_out, vp)
    keep = slots >= 0
    assert torch.equal(k_out[keep], kp.view(-1, 3, 64)[slots[keep]])
    # padding tokens are not in the pages, but k_out gets them too
    k_ref = torch.empty_like(k)
    qk_norm_rope_kv_write(q, k, v, qw, kw, k_pages.clone(), v_pages.clone(), slots, k_out=k_ref,
                          grid_hw=(2, 5), frame_offset=3, backend="reference")
    torch.testing.assert_close(k_out.double(), k_ref.double(), rtol=0, atol=TOL[dtype] * k_ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_in_place_k_out_into_fused_qkv_without_pages(triton_device, backend, dtype):
    """The engine's denoising forward: q, k, v are views of the (T, 3 * H * D) projection output, the
    rotated k goes back into its k third, no page is written and v is not needed."""
    t, h, d, grid = 45, 3, 64, (3, 5)  # three frames, rotated as frames 4, 9, 2
    frame_index = torch.tensor([4, 9, 2], dtype=torch.int32, device=triton_device)
    qkv = torch.randn(t, 3 * h * d, device=triton_device).to(dtype)
    qw = torch.rand(h * d, device=triton_device) + 0.5
    kw = torch.rand(h * d, device=triton_device) + 0.5
    k_pages = torch.zeros(5, 9, h, d, device=triton_device, dtype=dtype)
    slots = torch.randperm(5 * 9, device=triton_device)[:t]
    call = dict(grid_hw=grid, frame_index=frame_index, backend=backend)
    q_page = qk_norm_rope_kv_write(*qkv.view(t, 3, h, d).unbind(1), qw, kw, k_pages, torch.zeros_like(k_pages),
                                   slots, **call)
    k_page = k_pages.view(-1, h, d)[slots].reshape(t, h * d)
    for pass_v in (True, False):
        buf = qkv.clone()
        q, k, v = buf.view(t, 3, h, d).unbind(1)
        q_rot = qk_norm_rope_kv_write(q, k, v if pass_v else None, qw, kw, None, None, None, k_out=k, **call)
        assert torch.equal(q_rot, q_page)
        assert torch.equal(buf[:, h * d:2 * h * d], k_page)
        assert torch.equal(buf[:, :h * d], qkv[:, :h * d]) and torch.equal(buf[:, 2 * h * d:], qkv[:, 2 * h * d:])


def test_registration_declares_every_write():
    """opcheck: the schema's mutated arguments (k_pages, v_pages, k_out) and the fake kernel match
    what the op does, with and without pages (the reference backend; CPU)."""
    q, k, v, qw, kw, kp, vp, slots = _case(7, 3, 12, torch.float32, "cpu", num_pages=2, page_size=4)
    rest = (None, None, None, 1, 2, 2, 1e-6, "reference")
    for args in ((q, k, None, qw, kw, None, None, None, torch.empty_like(k)),
                 (q, k, v, qw, kw, kp, vp, slots, torch.empty_like(k))):
        torch.library.opcheck(_qk_norm_rope_kv_write_op, (*args, *rest))


def test_optional_pages_and_k_out_bad_arguments():
    q, k, v, qw, kw, kp, vp, slots = _case(7, 3, 12, torch.float32, "cpu", num_pages=2, page_size=4)
    call = dict(grid_hw=(2, 2), backend="reference")
    with pytest.raises(ValueError, match="'k_pages' is None but 'v_pages' and 'slot_mapping' are given"):
        qk_norm_rope_kv_write(q, k, v, qw, kw, None, vp, slots, **call)
    with pytest.raises(ValueError, match="'v_pages' is None"):
        qk_norm_rope_kv_write(q, k, v, qw, kw, kp, None, slots, k_out=torch.empty_like(k), **call)
    with pytest.raises(ValueError, match="'k_pages' is None but 'slot_mapping' is given"):
        qk_norm_rope_kv_write(q, k, v, qw, kw, None, None, slots, k_out=k, **call)
    with pytest.raises(ValueError, match="'slot_mapping' is None"):
        qk_norm_rope_kv_write(q, k, v, qw, kw, kp, vp, None, **call)
    with pytest.raises(ValueError, match="no argument 'k_out': the call writes nothing"):
        qk_norm_rope_kv_write(q, k, v, qw, kw, None, None, None, **call)
    with pytest.raises(ValueError, match="'k_out' must have shape"):
        qk_norm_rope_kv_write(q, k, v, qw, kw, None, None, None, k_out=k[:-1], **call)
    with pytest.raises(ValueError, match="'k_out' must have dtype"):
        qk_norm_rope_kv_write(q, k, v, qw, kw, kp, vp, slots, k_out=k.half(), **call)
    with pytest.raises(ValueError, match="'k_out' must have contiguous heads"):
        qk_norm_rope_kv_write(q, k, v, qw, kw, None, None, None, k_out=k.transpose(1, 2).contiguous().transpose(1, 2),
                              **call)
    with pytest.raises(ValueError, match="'v'"):  # the pages need v
        qk_norm_rope_kv_write(q, k, None, qw, kw, kp, vp, slots, **call)
    with pytest.raises(ValueError, match="'v'"):  # not read without pages, but still checked when given
        qk_norm_rope_kv_write(q, k, v.half(), qw, kw, None, None, None, k_out=k, **call)
    # nothing to validate without slots
    qk_norm_rope_kv_write(q, k, None, qw, kw, None, None, None, k_out=k, validate_slots=True, **call)


def test_bad_arguments_name_the_argument():
    q, k, v, qw, kw, kp, vp, slots = _case(6, 2, 8, torch.float32, "cpu", num_pages=2, page_size=4)
    call = dict(grid_hw=(2, 3), backend="reference")
    with pytest.raises(ValueError, match="'k'"):
        qk_norm_rope_kv_write(q, k.half(), v, qw, kw, kp, vp, slots, **call)
    with pytest.raises(ValueError, match="'v'.*contiguous"):
        qk_norm_rope_kv_write(q, k, v.transpose(1, 2).contiguous().transpose(1, 2), qw, kw, kp, vp, slots, **call)
    with pytest.raises(ValueError, match="'q_norm_weight'"):
        qk_norm_rope_kv_write(q, k, v, qw[:-1], kw, kp, vp, slots, **call)
    with pytest.raises(ValueError, match="'k_pages'"):
        qk_norm_rope_kv_write(q, k, v, qw, kw, kp[:, :, :1], vp, slots, **call)
    with pytest.raises(ValueError, match="'slot_mapping'"):
        qk_norm_rope_kv_write(q, k, v, qw, kw, kp, vp, slots.int(), **call)
    with pytest.raises(ValueError, match="'slot_mapping' holds slot 8"):
        qk_norm_rope_kv_write(q, k, v, qw, kw, kp, vp, torch.full_like(slots, 8), validate_slots=True, **call)
    with pytest.raises(ValueError, match="'grid_hw'"):
        qk_norm_rope_kv_write(q, k, v, qw, kw, kp, vp, slots, grid_hw=(0, 3), backend="reference")
    with pytest.raises(ValueError, match="'frame_offset'"):
        qk_norm_rope_kv_write(q, k, v, qw, kw, kp, vp, slots, frame_offset=-1, **call)
    with pytest.raises(ValueError, match="'frame_index' needs whole frames"):
        qk_norm_rope_kv_write(q, k, v, qw, kw, kp, vp, slots, grid_hw=(2, 2), frame_index=torch.zeros(1, dtype=torch.int32),
                              backend="reference")
    with pytest.raises(ValueError, match="head_dim"):
        qk_norm_rope_kv_write(q[..., :5], k[..., :5], v[..., :5], qw, kw, kp, vp, slots, **call)


def test_out_of_range_slot_is_never_written(triton_device):
    q, k, v, qw, kw, kp, vp, slots = _case(6, 2, 8, torch.float32, triton_device, num_pages=2, page_size=4)
    before = kp.clone()
    slots = torch.full_like(slots, 8)  # one past the end
    qk_norm_rope_kv_write(q, k, v, qw, kw, kp, vp, slots, grid_hw=(2, 3), backend="triton")
    assert torch.equal(kp, before)


@pytest.mark.gpu
def test_gpu_wan_chunk():
    dtype, device = torch.bfloat16, "cuda"
    args = _case(4680, 12, 128, dtype, device, num_pages=8, page_size=1560, fused_qkv=True)
    q_out = _compare(dtype, args, dict(grid_hw=(30, 52), frame_offset=18), device)
    assert math.isfinite(q_out.float().abs().max().item())
