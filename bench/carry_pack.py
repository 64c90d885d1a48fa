"""Shrink an installed package's safetensors for the trip to the GPU machine, and restore them there.

The device call carries at most 64 MiB (working tree + carried folders). all-MiniLM-L6-v2 (the world
model's text encoder) is 91 MB in fp32: packed at fp16 it is 45 MB (encoder outputs within 8e-4
relative of fp32, measured); with ``--int8-embeddings`` the word-embedding table (11.7 M of its 22.7 M
values) is stored as int8 with one fp32 scale per row, 34 MB in all (outputs within 5e-3, about
bf16's own rounding): small enough to travel beside the 24 MB world weights.

    python bench/carry_pack.py pack SITE_PACKAGE_DIR .whl/site_fp16/PACKAGE [--int8-embeddings]   # here
    python3 bench/carry_pack.py unpack /tmp/site                                                  # there

``unpack`` widens every packed tensor back to fp32 in place (fp16 -> fp32; int8 rows times their
``<name>.__row_scale__``), so the package loads exactly as installed. Used by bench/run_gpu.sh.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROW_SCALE = ".__row_scale__"


def pack(src: Path, dst: Path, int8_embeddings: bool) -> None:
    if not src.is_dir():
        raise SystemExit(f"pack: {src} is not a directory")
    shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for f in dst.rglob("*.safetensors"):
        out = {}
        for name, t in load_file(str(f)).items():
            if t.dtype != torch.float32:
                out[name] = t.contiguous()
            elif int8_embeddings and t.dim() == 2 and "word_embeddings" in name:
                scale = t.abs().amax(1).clamp_min(1e-12) / 127.0
                out[name] = (t / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
                out[name + ROW_SCALE] = scale
            else:
                out[name] = t.half()
        save_file(out, str(f), metadata={"format": "pt"})
        print(f"packed {f} ({f.stat().st_size / 2**20:.1f} MiB)")


def unpack(root: Path) -> None:
    for f in root.rglob("*.safetensors"):
        sd = load_file(str(f))
        if not any(t.dtype in (torch.float16, torch.int8) for t in sd.values()):
            continue
        out = {}
        for name, t in sd.items():
            if name.endswith(ROW_SCALE):
                continue
            if t.dtype == torch.int8 and name + ROW_SCALE in sd:
                out[name] = t.float() * sd[name + ROW_SCALE][:, None]
            elif t.dtype == torch.float16:
                out[name] = t.float()
            else:
                out[name] = t
        save_file(out, str(f), metadata={"format": "pt"})
        print(f"widened to fp32: {f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("src", type=Path)
    a.add_argument("dst", type=Path)
    a.add_argument("--int8-embeddings", action="store_true")
    b = sub.add_parser("unpack")
    b.add_argument("root", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "pack":
        pack(args.src, args.dst, args.int8_embeddings)
    else:
        unpack(args.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
