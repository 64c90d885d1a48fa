"""DiT checkpoint formats: write a small random model in each format, load it back, compare
outputs; LongLive LoRA merging; one error listing every problem; no unpickling of code.

Round trips are exact (torch.equal): loading only renames and assigns tensors.
"""

import pickle

import pytest
import torch

from model_helpers import randomize_, rel_err
from spiral_rt.models.checkpoints import (
    CheckpointError,
    detect_dit_format,
    export_dit_state_dict,
    load_dit,
    read_checkpoint,
    save_checkpoint,
)
from spiral_rt.models.config import tiny_test
from spiral_rt.models.dit import build_dit


@pytest.fixture
def model():
    return randomize_(build_dit(tiny_test()))


def _run(m, seed_inputs):
    x, t, emb = seed_inputs
    with torch.no_grad():
        return m(x, t, 2, None, m.encode_text(emb))


@pytest.fixture
def inputs():
    cfg = tiny_test()
    return torch.randn(1, 4, 2, 4, 6), torch.rand(1, 2) * 1000, torch.randn(1, 11, cfg.text_dim)


@pytest.mark.parametrize("fmt, name, ema", [
    ("wan", "wan.safetensors", False),
    ("wan", "wan.pt", False),
    ("diffusers", "diffusion_pytorch_model.safetensors", False),
    ("self_forcing", "self_forcing.pt", False),
    ("self_forcing", "causvid_ema.pt", True),
])
def test_round_trip(tmp_path, model, inputs, fmt, name, ema):
    obj = export_dit_state_dict(model, fmt, ema=ema)
    if fmt == "self_forcing":      # real files carry more than the generator
        obj["critic"] = {"model.head.head.weight": torch.randn(2, 2)}
        obj["step"] = torch.tensor(1000)
    save_checkpoint(obj, tmp_path / name)
    raw = read_checkpoint(tmp_path / name)
    assert detect_dit_format(raw) == fmt
    loaded = load_dit(tmp_path / name, tiny_test(), ema=ema)
    assert torch.equal(_run(loaded, inputs), _run(model, inputs))


def test_diffusers_sharded_directory(tmp_path, model, inputs):
    sd = export_dit_state_dict(model, "diffusers")
    keys = sorted(sd)
    save_checkpoint({k: sd[k] for k in keys[: len(keys) // 2]}, tmp_path / "model-00001-of-00002.safetensors")
    save_checkpoint({k: sd[k] for k in keys[len(keys) // 2:]}, tmp_path / "model-00002-of-00002.safetensors")
    loaded = load_dit(tmp_path, tiny_test())
    assert torch.equal(_run(loaded, inputs), _run(model, inputs))


def test_load_assigns_without_copy(model):
    sd = export_dit_state_dict(model, "wan")
    loaded = load_dit(sd, tiny_test())
    assert loaded.blocks[1].ffn[0].weight.data_ptr() == sd["blocks.1.ffn.0.weight"].data_ptr()


def test_load_dtype_keeps_fp32_modulation(model, inputs):
    loaded = load_dit(export_dit_state_dict(model, "wan"), tiny_test(), dtype=torch.bfloat16)
    assert loaded.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    assert loaded.head.modulation.dtype == torch.float32


@pytest.mark.parametrize("peft_prefix, adapter", [("base_model.model.", ""), ("", ".default")])
def test_longlive_lora_merged_at_load(tmp_path, model, inputs, peft_prefix, adapter):
    rank, alpha = 3, 6.0
    targets = ["blocks.0.self_attn.q", "blocks.1.cross_attn.v", "blocks.1.ffn.0", "blocks.0.ffn.2"]
    base = export_dit_state_dict(model, "self_forcing")
    lora = {}
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for t in targets:
        w = expected[t + ".weight"]
        a, b = torch.randn(rank, w.shape[1]) * 0.3, torch.randn(w.shape[0], rank) * 0.3
        lora[f"{peft_prefix}{t}.lora_A{adapter}.weight"] = a
        lora[f"{peft_prefix}{t}.lora_B{adapter}.weight"] = b
        expected[t + ".weight"] = w + (alpha / rank) * b @ a
    save_checkpoint(base, tmp_path / "longlive_base.pt")
    save_checkpoint({"generator_lora": lora, "critic_lora": {}}, tmp_path / "lora.pt")
    loaded = load_dit(tmp_path / "longlive_base.pt", tiny_test(), lora=tmp_path / "lora.pt", lora_alpha=alpha)
    ref = build_dit(tiny_test())
    ref.load_state_dict(expected)
    out = _run(loaded, inputs)
    assert rel_err(out, _run(ref, inputs)) <= 1e-6
    assert rel_err(out, _run(model, inputs)) > 1e-3      # the LoRA did change the model


def test_lora_problems_reported(model):
    lora = {"blocks.0.self_attn.nope.lora_A.weight": torch.randn(2, 48), "blocks.0.self_attn.nope.lora_B.weight": torch.randn(48, 2),
            "blocks.0.self_attn.q.lora_A.weight": torch.randn(2, 48)}
    with pytest.raises(CheckpointError) as err:
        load_dit(export_dit_state_dict(model, "wan"), tiny_test(), lora=lora)
    assert "blocks.0.self_attn.nope.weight" in str(err.value) and "only lora_A" in str(err.value)


def test_every_problem_in_one_error(model):
    sd = export_dit_state_dict(model, "wan")
    sd.pop("blocks.1.ffn.2.bias")                                                     # missing
    sd["blocks.0.self_attn.query.weight"] = sd.pop("blocks.0.self_attn.q.weight")     # renamed
    sd["head.modulation"] = torch.randn(1, 3, 48)                                     # wrong shape
    with pytest.raises(CheckpointError) as err:
        load_dit(sd, tiny_test())
    msg = str(err.value)
    assert isinstance(err.value, ValueError) and len(err.value.problems) == 3
    for key in ("blocks.1.ffn.2.bias", "blocks.0.self_attn.q.weight", "blocks.0.self_attn.query.weight", "head.modulation"):
        assert key in msg, key


def test_wrong_config_named(model):
    sd = export_dit_state_dict(model, "diffusers")
    with pytest.raises(CheckpointError) as err:
        load_dit(sd, tiny_test(num_layers=3, ffn_dim=96))
    msg = str(err.value)
    assert "num_layers: checkpoint 2, config 3" in msg and "ffn_dim: checkpoint 80, config 96" in msg
    assert "missing keys" in msg      # blocks.2.* listed too, in the same message


def test_missing_ema_entry(tmp_path, model):
    save_checkpoint(export_dit_state_dict(model, "self_forcing"), tmp_path / "sf.pt")
    with pytest.raises(CheckpointError, match="generator_ema"):
        load_dit(tmp_path / "sf.pt", tiny_test(), ema=True)


_CALLED = []


def _side_effect():
    _CALLED.append(1)
    return 0


class _Payload:
    """Unpickling this calls _side_effect: what a malicious checkpoint would do."""

    def __reduce__(self):
        return (_side_effect, ())


@pytest.mark.parametrize("fmt", ["diffusers", "self_forcing"])
def test_full_size_key_maps_on_meta(fmt):
    """The 1.3B model's names survive export -> import in each format, and the config is inferred."""
    from spiral_rt.models.checkpoints import check_state_dict, dit_state_dict_to_wan, infer_dit_config_fields
    from spiral_rt.models.config import wan21_t2v_1_3b
    from spiral_rt.models.dit import CausalWanDiT

    cfg = wan21_t2v_1_3b()
    with torch.device("meta"):
        meta = CausalWanDiT(cfg)
    sd, found = dit_state_dict_to_wan(export_dit_state_dict(meta, fmt))
    assert found == fmt
    check_state_dict(meta, sd, "1.3B on meta")
    fields = infer_dit_config_fields(sd)
    assert all(getattr(cfg, k) == v for k, v in fields.items()) and fields["num_layers"] == 30


def test_never_unpickles_code(tmp_path):
    torch.save({"weights": torch.randn(2), "obj": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError):
        read_checkpoint(tmp_path / "evil.pt")
    assert not _CALLED


def test_unknown_format_and_path(tmp_path):
    with pytest.raises(ValueError, match="cannot tell"):
        detect_dit_format({"foo.weight": torch.randn(1)})
    with pytest.raises(ValueError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.safetensors")
