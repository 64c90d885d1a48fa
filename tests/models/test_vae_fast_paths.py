"""The Wan VAE decoder's fast paths against the plain ones, on random weights with the tiny config:
the sub-pixel upsample conv of every ``Resample`` (``phase_upsample``) vs the explicit nearest 2x +
3x3 conv, the head conv's three implementations (``head_impl``: direct / conv / padded), the wide
(int64-word) cache copies vs plain ``copy_``; each whole-clip and chunk by chunk, contiguous and
channels-last (the GPU's layout, forced on the CPU, with the time-folded convs), with the Triton
kernels through the interpreter; the phase weights' cache follows weight changes.

Tolerances (relative, ||a - b|| / ||b||): fp32 1e-5 (the phase weights are fp32 sums, one extra
rounding; convolutions of different shapes pick different algorithms; measured ~7e-7). bf16: the
phase weights round once in bf16 where the 3x3 path sums bf16 weights exactly in its fp32
accumulator, so the two paths differ by ~8e-3 on this config (CPU); each is checked against the
fp32 decoder instead: <= 2.5e-2, the phase path at most 1.15x the explicit path's error (measured
on the CPU: 1.32e-2 vs 1.28e-2). Wide copies are bit exact: equal outputs.
"""

import pytest
import torch

from model_helpers import randomize_, rel_err
from spiral_rt.models import vae as vae_module
from spiral_rt.models.checkpoints import export_vae_state_dict, load_vae
from spiral_rt.models.vae import HEAD_IMPLS, CausalConv3d, Resample, build_vae_decoder, tiny_vae


def _vae(cfg=None, **kw):
    return randomize_(build_vae_decoder(cfg or tiny_vae(), **kw), std=0.15)


def _decode(model, z, chunks=None):
    if chunks is None:
        return model.decode(z, clamp=False)
    state = model.new_state(z.shape[0], z.shape[3], z.shape[4], device=z.device)
    parts, start = [], 0
    for n in chunks:
        parts.append(model.decode_chunk(z[:, :, start:start + n], state, clamp=False))
        start += n
    return torch.cat(parts, dim=2)


def _set_layout(model, layout):
    model.channels_last = layout != "contiguous"
    for m in model.modules():
        if isinstance(m, CausalConv3d) and m.time_context:
            m.fold_time = True if layout == "folded" else None


LAYOUTS = ["contiguous", "channels_last", "folded"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("chunks", [None, [1, 2, 1]], ids=["whole", "chunked"])
@torch.no_grad()
def test_phase_upsample_equals_explicit_upsample_conv(layout, chunks):
    model = _vae()
    _set_layout(model, layout)
    z = torch.randn(2, 16, 4, 3, 5)
    assert model.phase_upsample
    calls = []
    hooks = [m.resample[0].register_forward_hook(lambda *a: calls.append(1)) for m in model.modules()
             if isinstance(m, Resample)]
    phased = _decode(model, z, chunks)
    assert not calls  # no explicit upsample ran
    model.phase_upsample = False
    explicit = _decode(model, z, chunks)
    for h in hooks:
        h.remove()
    assert calls and not model.phase_upsample
    assert phased.shape == explicit.shape == (2, 3, 13, 24, 40)
    assert rel_err(phased, explicit) <= 1e-5


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("impl", ["direct", "padded"])
@pytest.mark.parametrize("chunks", [None, [1, 1, 2]], ids=["whole", "chunked"])
@torch.no_grad()
def test_head_impls_equal_generic_conv(layout, impl, chunks):
    """One-frame chunks too (fewer new frames than the two cached ones)."""
    model = _vae()
    _set_layout(model, layout)
    z = torch.randn(1, 16, 4, 3, 5)
    model.head_impl = "conv"
    generic = _decode(model, z, chunks)
    model.head_impl = impl
    assert rel_err(_decode(model, z, chunks), generic) <= 1e-5


def test_head_impl_is_checked():
    model = build_vae_decoder(tiny_vae())
    assert model.head_impl == "auto" and HEAD_IMPLS == ("auto", "conv", "padded", "direct")
    with pytest.raises(ValueError, match="'head_impl' must be one of"):
        model.head_impl = "cudnn"


@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_wide_copies_are_bit_exact(layout, monkeypatch):
    model = _vae()
    _set_layout(model, layout)
    z = torch.randn(2, 16, 4, 3, 5)
    wide = _decode(model, z, [1, 3])
    monkeypatch.setattr(vae_module, "WIDE_COPIES", False)
    assert torch.equal(_decode(model, z, [1, 3]), wide)


def test_wide_copy_views():
    """_copy_ moves bf16 channels-last slices as int64 words, falls back where the memory does not allow."""
    src = torch.randn(2, 8, 3, 4, 5).to(torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    folded = torch.zeros(2, 24, 3, 4, 5, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    dst = folded[:, 8:16, 1:]
    assert vae_module._as_words(dst) is not None and vae_module._as_words(src[:, :, :2]) is not None
    vae_module._copy_(dst, src[:, :, :2])
    assert torch.equal(dst, src[:, :, :2]) and folded[:, :8].abs().sum() == 0 and folded[:, 16:].abs().sum() == 0
    assert vae_module._as_words(src[:, 1:7]) is None              # 6 channels: 12 bytes a pixel
    assert vae_module._as_words(src.contiguous()) is None         # channels not innermost
    odd = torch.zeros(1, 6, 2, 3, 3).contiguous(memory_format=torch.channels_last_3d)
    vae_module._copy_(odd, torch.ones(1, 6, 2, 3, 3))               # plain copy_ fallback
    assert odd.sum() == 108


@torch.no_grad()
def test_decoder_triton_kernels_equal_reference(monkeypatch, triton_device):
    """phase_interleave and narrow_causal_conv3d forced to Triton (the interpreter on CPU) == forced
    to the reference, channels-last, chunk by chunk, fp32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = _vae().to(triton_device)
    model.channels_last = True
    model.head_impl = "direct"
    z = torch.randn(1, 16, 3, 2, 3, device=triton_device)
    outs = []
    for backend in ("reference", "triton"):
        monkeypatch.setenv("SPIRAL_RT_BACKEND", f"phase_interleave={backend},narrow_causal_conv3d={backend}")
        outs.append(_decode(model, z, [2, 1]))
    assert rel_err(outs[1], outs[0]) <= 1e-5


@torch.no_grad()
def test_phase_weights_cache_follows_weight_changes():
    """Cached once per weight tensor; recomputed after an in-place write, a load, a dtype move, a
    layout change; never used for another weight that takes the same address."""
    cfg = tiny_vae()
    model = _vae(cfg)
    z = torch.randn(1, 16, 2, 2, 3)
    resamples = [m for m in model.modules() if isinstance(m, Resample)]
    first = _decode(model, z)
    caches = [m._phase_cache[1] for m in resamples]
    _decode(model, z)
    assert all(m._phase_cache[1] is c for m, c in zip(resamples, caches))      # reused
    other = _vae(cfg)
    model.load_state_dict(other.state_dict())                                 # in-place copy_: new version
    assert rel_err(_decode(model, z), _decode(other, z)) <= 1e-5
    assert all(m._phase_cache[1] is not c for m, c in zip(resamples, caches))
    with torch.no_grad():
        resamples[0].resample[1].weight.mul_(2)
    model.phase_upsample = False
    want = _decode(model, z)
    model.phase_upsample = True
    assert rel_err(_decode(model, z), want) <= 1e-5
    model.channels_last = True                                                # weights to channels-last
    assert rel_err(_decode(model, z), want) <= 1e-5
    assert resamples[0]._phase_cache[1].is_contiguous(memory_format=torch.channels_last)
    model.to(torch.float64).to(torch.float32)                                 # new tensors
    assert rel_err(_decode(model, z), want) <= 1e-5
    assert first.shape == want.shape


@torch.no_grad()
def test_phase_weights_follow_checkpoint_round_trip():
    """Wan's keys (decoder.upsamples.N.resample.1.weight/bias) load unchanged into the phase path."""
    cfg = tiny_vae()
    model = _vae(cfg)
    sd = export_vae_state_dict(model, "wan")
    assert any(k.endswith("resample.1.weight") for k in sd) and not any("phase" in k for k in sd)
    loaded = load_vae(sd, cfg)
    z = torch.randn(1, 16, 2, 2, 3)
    assert torch.equal(loaded.decode(z), model.decode(z))


def test_phase_path_is_differentiable():
    """With autograd on, the phase weights are built in the graph (not cached): gradients reach
    the 3x3 conv's weights as through the explicit path."""
    model = _vae()
    z = torch.randn(1, 16, 2, 2, 3)
    grads = []
    for on in (True, False):
        model.phase_upsample = on
        model.zero_grad()
        model.decode(z, clamp=False).square().sum().backward()
        grads.append(model.decoder.upsamples[3].resample[1].weight.grad.clone())
    assert rel_err(grads[0], grads[1]) <= 1e-5
    assert model.decoder.upsamples[3]._phase_cache is None


@torch.no_grad()
def test_bf16_phase_path_no_worse_than_explicit():
    model = _vae(tiny_vae(base_dim=16))
    z = torch.randn(1, 16, 3, 6, 10)
    exact = model.decode(z, clamp=False)
    model.to(torch.bfloat16)
    phased = model.decode(z, clamp=False)
    model.phase_upsample = False
    explicit = model.decode(z, clamp=False)
    assert rel_err(phased, exact) <= 2.5e-2
    assert rel_err(phased, exact) <= 1.15 * rel_err(explicit, exact)


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_fast_paths_equal_plain_paths(monkeypatch):
    """On the GPU (channels-last, time-folded convs, Triton interleave and head): fp32 (TF32 off)
    phase vs explicit upsample and each head impl within 1e-5, chunk by chunk; bf16 each within
    2.5e-2 of the fp32 decoder, the fast paths at most 1.15x the plain paths' error."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = _vae(tiny_vae(base_dim=16), device="cuda", dtype=torch.float32)
    z = torch.randn(1, 16, 4, 6, 10, device="cuda")
    chunks = [1, 3]
    fast = _decode(model, z, chunks)  # auto: phase upsample, direct head
    model.phase_upsample = False
    model.head_impl = "conv"
    plain = _decode(model, z, chunks)
    assert rel_err(fast, plain) <= 1e-5
    for impl in ("padded", "direct"):
        model.head_impl = impl
        assert rel_err(_decode(model, z, chunks), plain) <= 1e-5
    model.to(torch.bfloat16)
    plain16 = _decode(model, z, chunks)
    model.phase_upsample = True
    model.head_impl = "auto"
    fast16 = _decode(model, z, chunks)
    assert rel_err(plain16, plain) <= 2.5e-2 and rel_err(fast16, plain) <= 2.5e-2
    assert rel_err(fast16, plain) <= 1.15 * rel_err(plain16, plain)
