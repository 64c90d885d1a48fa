"""Checkpoint reading, key mapping and loading for the Wan DiT and the Wan VAE.

Reading never unpickles code: ``.safetensors`` files go through ``safe_open`` (tensor by tensor),
everything else through ``torch.load(weights_only=True, mmap=True)`` (tensors are views of the
mapped file). A directory means every ``*.safetensors`` shard in it (diffusers layout).

DiT formats (``detect_dit_format``), all mapped to the original Wan names our module uses:

- ``"wan"``: the original Wan2.1 release (``blocks.N.self_attn.q``, ``blocks.N.cross_attn.k``,
  ``blocks.N.norm3`` (before cross-attention), ``ffn.0/ffn.2``, ``modulation``, ``head.head``,
  ``head.modulation``, ``text_embedding.0``, ``time_projection.1``...): identity map;
- ``"self_forcing"``: Self-Forcing / CausVid / LongLive ``.pt`` files holding ``generator`` and/or
  ``generator_ema`` (the state dict of a wrapper whose ``model.`` is the Wan model): the chosen
  entry with its ``model.`` prefix stripped, then as ``"wan"``;
- ``"diffusers"``: WanTransformer3DModel (``blocks.N.attn1.to_q``, ``attn2``, ``to_out.0``,
  ``ffn.net.0.proj``, ``norm2`` = Wan's ``norm3``, ``scale_shift_table``, ``proj_out``,
  ``condition_embedder.*``).

LongLive = a base checkpoint in any format plus a PEFT LoRA state dict (``generator_lora`` in a
``.pt``, or a plain one), merged at load: W += (alpha / r) * B @ A for every adapted Linear, in
fp32, then cast back. PEFT state dicts carry no alpha: pass ``lora_alpha`` (default: alpha = r,
i.e. scale 1, which is LongLive's released adapter: rank 256, alpha 256).

VAE formats (``detect_vae_format``): the original ``Wan2.1_VAE.pth`` (``decoder.upsamples.N``,
``decoder.middle.N``, ``decoder.head.2``, ``conv2``) and diffusers AutoencoderKLWan
(``decoder.up_blocks.i.resnets.j``, ``decoder.mid_block``, ``decoder.conv_out``,
``post_quant_conv``). Only decoder keys are used; encoder keys are ignored.

Every problem found while loading (missing keys, unexpected keys, shape mismatches, a config that
does not match the checkpoint, LoRA weights without a target) is reported in ONE
``CheckpointError`` (a ``ValueError``) listing them all.

Memory: the model is built on the meta device and filled with ``load_state_dict(assign=True)``
from the mmapped / per-tensor-read tensors, so loading never holds two copies of the weights.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Callable, Mapping

import torch

from .config import WanDiTConfig
from .dit import CausalWanDiT
from .vae import WanVAEConfig, WanVAEDecoder

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
DIT_FORMATS = ("wan", "self_forcing", "diffusers")
VAE_FORMATS = ("wan", "diffusers")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message lists every problem found."""

    def __init__(self, what: str, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{what}: {len(self.problems)} problem(s):\n{lines}")


def _short_list(keys, limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# ----------------------------------------------------------------------------- reading


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint file or a directory of safetensors shards without unpickling code.

    Returns the top-level mapping: a flat {name: tensor} for safetensors; for ``torch.load``
    files whatever dict was saved (possibly nested, e.g. {"generator": {...}}).
    """
    path = Path(path)
    if path.is_dir():
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise ValueError(f"read_checkpoint: 'path' {path} is a directory without *.safetensors files")
        out: dict = {}
        for shard in shards:
            out.update(read_checkpoint(shard))
        return out
    if not path.is_file():
        raise ValueError(f"read_checkpoint: 'path' {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        logger.warning("read_checkpoint: %s is not in the zip format, loading without mmap", path)
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise ValueError(f"read_checkpoint: {path} holds a {type(obj).__name__}, expected a dict of tensors")
    return dict(obj)


def _strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return dict(sd)


def _flat_tensors(sd: Mapping) -> StateDict:
    """Drop non-tensor entries (step counters, configs) and torch.compile / DDP wrapper names."""
    out = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            out[k.replace("_orig_mod.", "").replace("_fsdp_wrapped_module.", "")] = v
    return _strip_prefix(out, "module.")


# ----------------------------------------------------------------------------- DiT key maps

# diffusers name pattern -> Wan name pattern (block-level names use a {n} placeholder)
_DIT_DIFFUSERS_TO_WAN = [
    (r"condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"condition_embedder\.time_proj\.", "time_projection.1."),
    (r"blocks\.(\d+)\.attn1\.to_q\.", r"blocks.\1.self_attn.q."),
    (r"blocks\.(\d+)\.attn1\.to_k\.", r"blocks.\1.self_attn.k."),
    (r"blocks\.(\d+)\.attn1\.to_v\.", r"blocks.\1.self_attn.v."),
    (r"blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"blocks\.(\d+)\.attn1\.norm_q\.", r"blocks.\1.self_attn.norm_q."),
    (r"blocks\.(\d+)\.attn1\.norm_k\.", r"blocks.\1.self_attn.norm_k."),
    (r"blocks\.(\d+)\.attn2\.to_q\.", r"blocks.\1.cross_attn.q."),
    (r"blocks\.(\d+)\.attn2\.to_k\.", r"blocks.\1.cross_attn.k."),
    (r"blocks\.(\d+)\.attn2\.to_v\.", r"blocks.\1.cross_attn.v."),
    (r"blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"blocks\.(\d+)\.attn2\.norm_q\.", r"blocks.\1.cross_attn.norm_q."),
    (r"blocks\.(\d+)\.attn2\.norm_k\.", r"blocks.\1.cross_attn.norm_k."),
    (r"blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
    (r"blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
    (r"blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"proj_out\.", "head.head."),
    (r"scale_shift_table$", "head.modulation"),
]


def _regex_inverse(pairs):
    """Invert a list of (pattern, replacement) pairs whose groups are only (\\d+)."""
    inv = []
    for pat, rep in pairs:
        new_pat = re.escape(rep.replace(r"\1", "\0")).replace("\0", r"(\d+)")
        if pat.endswith("$"):
            new_pat += "$"
        new_rep = pat.rstrip("$").replace(r"(\d+)", r"\1").replace("\\.", ".")
        inv.append((new_pat, new_rep))
    return inv


_DIT_WAN_TO_DIFFUSERS = _regex_inverse(_DIT_DIFFUSERS_TO_WAN)


def _rename(key: str, pairs) -> str:
    for pat, rep in pairs:
        new, n = re.subn("^" + pat, rep, key)
        if n:
            return new
    return key


def detect_dit_format(sd: Mapping) -> str:
    """'self_forcing', 'diffusers' or 'wan' from a checkpoint's top-level keys."""
    if "generator" in sd or "generator_ema" in sd:
        return "self_forcing"
    keys = [k for k in sd if isinstance(k, str)]
    if any(k.startswith("condition_embedder.") or ".attn1." in k or k.startswith("proj_out.") for k in keys):
        return "diffusers"
    if any(".self_attn." in k or k.startswith(("head.", "text_embedding.")) for k in keys):
        return "wan"
    raise ValueError(
        "detect_dit_format: cannot tell the checkpoint format from its keys (first keys: "
        f"{_short_list(keys, 8)}); pass format= one of {DIT_FORMATS}"
    )


def dit_state_dict_to_wan(raw: Mapping, fmt: str = "auto", *, ema: bool = False) -> tuple[StateDict, str]:
    """Map a raw checkpoint mapping (``read_checkpoint``'s result) to Wan names; returns (sd, format)."""
    fmt = detect_dit_format(raw) if fmt == "auto" else fmt
    if fmt not in DIT_FORMATS:
        raise ValueError(f"dit_state_dict_to_wan: 'format'={fmt!r} is not one of {DIT_FORMATS} or 'auto'")
    if fmt == "self_forcing":
        entry = "generator_ema" if ema else "generator"
        if entry not in raw:
            keys = _short_list(map(str, raw))
            raise CheckpointError("Self-Forcing checkpoint", [f"no '{entry}' entry (top-level keys: {keys})"])
        sd = _strip_prefix(_flat_tensors(raw[entry]), "model.")
        inner = detect_dit_format(sd)
        return (_dit_from_diffusers(sd) if inner == "diffusers" else sd), fmt
    sd = _strip_prefix(_flat_tensors(raw), "model.")
    if fmt == "diffusers":
        return _dit_from_diffusers(sd), fmt
    return sd, fmt


def _dit_from_diffusers(sd: Mapping[str, torch.Tensor]) -> StateDict:
    return {_rename(k, _DIT_DIFFUSERS_TO_WAN): v for k, v in sd.items()}


def export_dit_state_dict(model_or_sd, fmt: str = "wan", *, ema: bool = False) -> dict:
    """Our (Wan-named) weights in a checkpoint format: 'wan', 'diffusers' or 'self_forcing'
    ({'generator' or 'generator_ema': {'model.' + name: tensor}})."""
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, torch.nn.Module) else dict(model_or_sd)
    if fmt == "wan":
        return dict(sd)
    if fmt == "diffusers":
        return {_rename(k, _DIT_WAN_TO_DIFFUSERS): v for k, v in sd.items()}
    if fmt == "self_forcing":
        return {"generator_ema" if ema else "generator": {"model." + k: v for k, v in sd.items()}}
    raise ValueError(f"export_dit_state_dict: 'fmt'={fmt!r} is not one of {DIT_FORMATS}")


def infer_dit_config_fields(sd: Mapping[str, torch.Tensor]) -> dict:
    """The WanDiTConfig fields a (Wan-named) state dict determines (num_heads is not among them)."""
    fields: dict = {}
    pe = sd.get("patch_embedding.weight")
    if pe is not None and pe.dim() == 5:
        fields.update(dim=pe.shape[0], in_channels=pe.shape[1], patch_size=tuple(pe.shape[2:]))
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks:
        fields["num_layers"] = max(blocks) + 1
    if (w := sd.get("blocks.0.ffn.0.weight")) is not None:
        fields["ffn_dim"] = w.shape[0]
    if (w := sd.get("text_embedding.0.weight")) is not None:
        fields["text_dim"] = w.shape[1]
    if (w := sd.get("time_embedding.0.weight")) is not None:
        fields["freq_dim"] = w.shape[1]
    if (w := sd.get("head.head.weight")) is not None and "patch_size" in fields:
        vol = fields["patch_size"][0] * fields["patch_size"][1] * fields["patch_size"][2]
        fields["out_channels"] = w.shape[0] // vol
    if blocks:
        fields["cross_attn_norm"] = "blocks.0.norm3.weight" in sd
        fields["qk_norm"] = "blocks.0.self_attn.norm_q.weight" in sd
    return fields


# ----------------------------------------------------------------------------- LoRA


def merge_lora(sd: StateDict, lora: Mapping, *, alpha: float | None = None,
               rename: Callable[[str], str] | None = None) -> list[str]:
    """Merge a PEFT LoRA state dict into ``sd`` in place: W += (alpha / r) * B @ A.

    ``lora``: {'...<module>.lora_A[.adapter].weight': (r, in), '...<module>.lora_B[.adapter].weight': (out, r)},
    optionally under 'generator_lora' and prefixed 'base_model.model.' / 'model.'.
    Returns the list of problems (targets missing from sd, unpaired or mis-shaped factors).
    """
    if "generator_lora" in lora:
        lora = lora["generator_lora"]
    flat = _flat_tensors(lora)
    flat = _strip_prefix(flat, "base_model.model.")
    flat = _strip_prefix(flat, "model.")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    problems = []
    for k, v in flat.items():
        m = re.match(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", k)
        if m is None:
            problems.append(f"LoRA key {k!r} is not a lora_A/lora_B weight")
            continue
        pairs.setdefault(m.group(1), {})[m.group(2)] = v
    for module, ab in sorted(pairs.items()):
        target = (rename(module + ".") if rename else module + ".") + "weight"
        if set(ab) != {"A", "B"}:
            problems.append(f"LoRA for {module!r} has only lora_{''.join(ab)}")
            continue
        a, b = ab["A"], ab["B"]
        if target not in sd:
            problems.append(f"LoRA targets {target!r}, which is not in the base checkpoint")
            continue
        w = sd[target]
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != rank or (b.shape[0], a.shape[1]) != tuple(w.shape):
            problems.append(f"LoRA for {target!r}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit W {tuple(w.shape)}")
            continue
        scale = (alpha if alpha is not None else rank) / rank
        sd[target] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    logger.info("merge_lora: merged %d LoRA pairs (alpha=%s)", len(pairs) - len(problems), alpha)
    return problems


# ----------------------------------------------------------------------------- validation


def check_state_dict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str,
                     config_problems: list[str] | None = None, ignore: Callable[[str], bool] | None = None) -> None:
    """Raise one CheckpointError listing missing/unexpected keys and shape mismatches."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = list(config_problems or [])
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected and not (ignore and ignore(k))]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)}, model {expected[k]}"
              for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_short_list(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): " + "; ".join(shapes[:20]) + (" ..." if len(shapes) > 20 else ""))
    if problems:
        raise CheckpointError(what, problems)


def _materialise(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], device, ignore=None) -> None:
    wanted = {k: sd[k] for k in model.state_dict()}
    model.load_state_dict(wanted, strict=True, assign=True)
    # anything still on meta (non-persistent buffers) would be a bug; the DiT and VAE have none
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_meta:
            raise RuntimeError(f"_materialise: {name} is still on the meta device after loading")
    if device is not None:
        model.to(device)


def load_dit(
    path: str | os.PathLike | Mapping,
    config: WanDiTConfig,
    *,
    format: str = "auto",
    ema: bool = False,
    lora: str | os.PathLike | Mapping | None = None,
    lora_alpha: float | None = None,
    device=None,
    dtype: torch.dtype | None = None,
) -> CausalWanDiT:
    """Build a CausalWanDiT from a checkpoint (file, shard directory, or an already read mapping).

    Args:
        path: checkpoint in any of ``DIT_FORMATS``.
        config: the architecture it must match (the checkpoint's shapes are checked against it).
        format: one of ``DIT_FORMATS`` or 'auto'.
        ema: for Self-Forcing files, load ``generator_ema`` instead of ``generator``.
        lora: LongLive-style PEFT LoRA to merge (file or mapping); ``lora_alpha`` its alpha.
        device, dtype: where and in which dtype the model ends up (dtype via ``to_dtype``).
    """
    what = f"load_dit({path if not isinstance(path, Mapping) else 'state dict'}, {config.name})"
    raw = read_checkpoint(path) if not isinstance(path, Mapping) else path
    sd, fmt = dit_state_dict_to_wan(raw, format, ema=ema)
    problems: list[str] = []
    if lora is not None:
        lora_raw = read_checkpoint(lora) if not isinstance(lora, Mapping) else lora
        problems += merge_lora(sd, lora_raw, alpha=lora_alpha, rename=lambda k: _rename(k, _DIT_DIFFUSERS_TO_WAN))
    found = infer_dit_config_fields(sd)
    diffs = [f"{k}: checkpoint {v!r}, config {getattr(config, k)!r}" for k, v in found.items() if getattr(config, k) != v]
    if diffs:
        problems.insert(0, f"config {config.name!r} does not match the checkpoint ({'; '.join(diffs)})")
    with torch.device("meta"):
        model = CausalWanDiT(config)
    check_state_dict(model, sd, what + f" [format {fmt}]", problems)
    _materialise(model, sd, device)
    if dtype is not None:
        model.to_dtype(dtype)
    logger.info("load_dit: %s loaded as format %s", config.name, fmt)
    return model.eval()


# ----------------------------------------------------------------------------- VAE

_RESNET_DIFFUSERS_TO_WAN = (("norm1.", "residual.0."), ("conv1.", "residual.2."), ("norm2.", "residual.3."),
                            ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut."))
_VAE_UNUSED_PREFIXES = ("encoder.", "conv1.", "quant_conv.")  # encoder side: present in files, unused here


def _vae_prefix_pairs(cfg: WanVAEConfig) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, Wan prefix, is_resnet) for every decoder module."""
    pairs = [("post_quant_conv.", "conv2.", False), ("decoder.conv_in.", "decoder.conv1.", False),
             ("decoder.mid_block.resnets.0.", "decoder.middle.0.", True),
             ("decoder.mid_block.attentions.0.", "decoder.middle.1.", False),
             ("decoder.mid_block.resnets.1.", "decoder.middle.2.", True),
             ("decoder.norm_out.", "decoder.head.0.", False), ("decoder.conv_out.", "decoder.head.2.", False)]
    k = 0
    for i in range(len(cfg.dim_mult)):
        for j in range(cfg.num_res_blocks + 1):
            pairs.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.upsamples.{k}.", True))
            k += 1
        if i != len(cfg.dim_mult) - 1:
            pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.upsamples.{k}.", False))
            k += 1
    return pairs


def _vae_rename(key: str, pairs, to_wan: bool) -> str:
    for dif, wan, resnet in pairs:
        src, dst = (dif, wan) if to_wan else (wan, dif)
        if key.startswith(src):
            rest = key[len(src):]
            if resnet:
                for a, b in _RESNET_DIFFUSERS_TO_WAN:
                    a, b = (a, b) if to_wan else (b, a)
                    if rest.startswith(a):
                        rest = b + rest[len(a):]
                        break
            return dst + rest
    return key


def detect_vae_format(sd: Mapping) -> str:
    keys = [k for k in sd if isinstance(k, str)]
    if any(k.startswith(("decoder.up_blocks.", "decoder.mid_block.", "post_quant_conv.")) for k in keys):
        return "diffusers"
    if any(k.startswith(("decoder.upsamples.", "decoder.middle.", "conv2.")) for k in keys):
        return "wan"
    raise ValueError(f"detect_vae_format: cannot tell the VAE format from its keys (first keys: {_short_list(keys, 8)}); "
                     f"pass format= one of {VAE_FORMATS}")


def vae_state_dict_to_wan(raw: Mapping, cfg: WanVAEConfig, fmt: str = "auto") -> tuple[StateDict, str]:
    sd = _flat_tensors(raw)
    fmt = detect_vae_format(sd) if fmt == "auto" else fmt
    if fmt not in VAE_FORMATS:
        raise ValueError(f"vae_state_dict_to_wan: 'format'={fmt!r} is not one of {VAE_FORMATS} or 'auto'")
    if fmt == "diffusers":
        pairs = _vae_prefix_pairs(cfg)
        sd = {_vae_rename(k, pairs, to_wan=True): v for k, v in sd.items()}
    return sd, fmt


def export_vae_state_dict(model: WanVAEDecoder, fmt: str = "wan") -> StateDict:
    """The decoder's weights with original ('wan') or diffusers AutoencoderKLWan ('diffusers') names."""
    sd = model.state_dict()
    if fmt == "wan":
        return dict(sd)
    if fmt == "diffusers":
        pairs = _vae_prefix_pairs(model.config)
        return {_vae_rename(k, pairs, to_wan=False): v for k, v in sd.items()}
    raise ValueError(f"export_vae_state_dict: 'fmt'={fmt!r} is not one of {VAE_FORMATS}")


def load_vae(path: str | os.PathLike | Mapping, config: WanVAEConfig | None = None, *, format: str = "auto",
             device=None, dtype: torch.dtype | None = None) -> WanVAEDecoder:
    """Build the streaming VAE decoder from ``Wan2.1_VAE.pth`` or a diffusers AutoencoderKLWan checkpoint
    (file, shard directory, or mapping). Encoder weights in the file are ignored."""
    cfg = config or WanVAEConfig()
    what = f"load_vae({path if not isinstance(path, Mapping) else 'state dict'}, {cfg.name})"
    raw = read_checkpoint(path) if not isinstance(path, Mapping) else path
    sd, fmt = vae_state_dict_to_wan(raw, cfg, format)
    problems = []
    if (w := sd.get("conv2.weight")) is not None and w.shape[0] != cfg.z_dim:
        problems.append(f"config {cfg.name!r} does not match the checkpoint (z_dim: checkpoint {w.shape[0]}, config {cfg.z_dim})")
    if (w := sd.get("decoder.head.2.weight")) is not None and w.dim() == 5 and w.shape[1] != cfg.base_dim * cfg.dim_mult[0]:
        problems.append(f"config {cfg.name!r} does not match the checkpoint (base_dim * dim_mult[0]: checkpoint "
                        f"{w.shape[1]}, config {cfg.base_dim * cfg.dim_mult[0]})")
    with torch.device("meta"):
        model = WanVAEDecoder(cfg)
    check_state_dict(model, sd, what + f" [format {fmt}]", problems, ignore=lambda k: k.startswith(_VAE_UNUSED_PREFIXES))
    _materialise(model, sd, device)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def save_checkpoint(obj: Mapping, path: str | os.PathLike) -> None:
    """Write a flat {name: tensor} as safetensors (by suffix) or any mapping with torch.save."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(dict(obj), str(path))


__all__ = [
    "CheckpointError", "read_checkpoint", "detect_dit_format", "dit_state_dict_to_wan", "export_dit_state_dict",
    "infer_dit_config_fields", "merge_lora", "check_state_dict", "load_dit", "save_checkpoint",
    "detect_vae_format", "vae_state_dict_to_wan", "export_vae_state_dict", "load_vae",
]
