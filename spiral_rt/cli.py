"""The ``spiral-rt`` command.

Subcommands:
  info    what this installation can run: versions, devices, the native build, and which
          backend each op would use on each device.
"""

from __future__ import annotations

import argparse
import sys

import torch

import spiral_rt
from spiral_rt.ops import OP_BACKENDS, available_backends, dispatch


def _info(_: argparse.Namespace) -> int:
    native = dispatch.NATIVE
    build = native.build_info() if native is not None else None
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    lines = [
        f"spiral_rt {spiral_rt.__version__}  torch {torch.__version__}  python {sys.version.split()[0]}",
        "native module: " + (
            "not built" if build is None
            else f"CUDA {build['cuda_version']} ({build['cuda_archs']})" if build["cuda"]
            else "CPU-only (no CUDA compiler at build time)"
        ),
        "triton: " + ("installed" if dispatch.TRITON_INSTALLED else "not installed"),
        "devices: " + ", ".join(devices + ([torch.cuda.get_device_name(0)] if torch.cuda.is_available() else [])),
        "ops (backends usable per device; the first is the automatic choice):",
    ]
    for op, backends in OP_BACKENDS.items():
        per_device = []
        for dev in devices[:2]:
            usable = [b for b in available_backends(backends, dev) if not (b == "triton" and dev == "cpu")]
            per_device.append(f"{dev}: {'/'.join(usable) or '-'}")
        lines.append(f"  {op:<24} " + "   ".join(per_device))
    print("\n".join(lines))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spiral-rt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, native build and op backends").set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
