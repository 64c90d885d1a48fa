"""FP8 linears (spiral_rt.models.fp8): row-wise e4m3 quantization error bounds, Fp8Linear against
nn.Linear, the module swap on a tiny DiT, errors; on the GPU, torch._scaled_mm against the fp32
emulation of the same quantized operands."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from spiral_rt.models.config import tiny_test
from spiral_rt.models.dit import build_dit
from spiral_rt.models.fp8 import DEFAULT_FP8_TARGETS, Fp8Linear, apply_fp8_linears, quantize_rowwise



def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_quantize_rowwise_error_bound():
    torch.manual_seed(0)
    t = torch.randn(37, 71) * torch.logspace(-3, 2, 37)[:, None]  # rows of very different magnitude
    q, scale = quantize_rowwise(t)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (37,)
    deq = q.float() * scale[:, None]
    # e4m3: 3 mantissa bits (relative rounding <= 2^-4), subnormal step 2^-9 of the row scale
    assert ((deq - t).abs() <= 2**-4 * t.abs() + 2**-9 * scale[:, None] + 1e-12).all()
    assert torch.allclose(q.float().abs().amax(1), torch.full((37,), 448.0))  # each row uses the full range


@pytest.mark.parametrize("bias", [True, False])
def test_fp8_linear_close_to_linear(bias):
    torch.manual_seed(1)
    lin = nn.Linear(72, 40, bias=bias)
    x = torch.randn(3, 13, 72)
    f8 = Fp8Linear(lin, emulate=True)
    y, ref = f8(x), lin(x).detach()
    assert y.shape == ref.shape == (3, 13, 40)
    assert rel(y, ref) < 0.05  # per-product ~2^-4 rounding, averaged over 72 terms
    assert not any(p.requires_grad for p in f8.parameters())


def test_apply_fp8_linears_on_a_tiny_dit():
    torch.manual_seed(2)
    cfg = tiny_test(num_layers=2, dim=128, num_heads=2, ffn_dim=96, text_dim=24, freq_dim=32, in_channels=16)
    model = build_dit(cfg).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    x = torch.randn(1, 16, 3, 4, 6)
    t = torch.full((1, 3), 700.0)
    text = model.encode_text(torch.randn(1, 7, 24))
    with torch.no_grad():
        ref = model(x, t, 0, None, text)
        names = apply_fp8_linears(model, emulate=True)
        got = model(x, t, 0, None, text)
    assert len(names) == len(DEFAULT_FP8_TARGETS) * cfg.num_layers
    assert all(isinstance(model.get_submodule(n), Fp8Linear) for n in names)
    assert isinstance(model.blocks[0].cross_attn.k, nn.Linear)  # text K/V stay in the model dtype
    assert rel(got, ref) < 0.1


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="targets"):
        apply_fp8_linears(nn.Sequential(nn.Linear(4, 4)), targets=("ffn.0",))
    with pytest.raises(ValueError, match="linear"):
        Fp8Linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="'t'"):
        quantize_rowwise(torch.randn(3))


@pytest.mark.gpu
def test_scaled_mm_equals_emulation_bf16():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a CUDA GPU with fp8 matmuls (sm_89+)")
    torch.manual_seed(3)
    lin = nn.Linear(1536, 8960).cuda().to(torch.bfloat16)
    x = torch.randn(2, 4680, 1536, device="cuda", dtype=torch.bfloat16)
    fast, slow = Fp8Linear(lin), Fp8Linear(lin, emulate=True)
    y, y_ref = fast(x), slow(x)
    assert rel(y.float(), y_ref.float()) < 1e-2  # the same quantized operands; bf16 output rounding
    assert rel(y.float(), lin(x).float()) < 0.05
