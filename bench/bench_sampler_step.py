"""Benchmark of the fused sampler step on one chunk's latents (B, 16, 3, 60, 104), bf16.

Bytes counted: read x and m, write x_next and mu (4 * numel * 2). Philox noise is generated
in-kernel (no noise bytes). Reports GB/s against the measured device-to-device copy bandwidth
(large copy), and against a copy of the same byte count (what a kernel this small can reach).

    python bench/bench_sampler_step.py [--batches 1 2 4 8 16] [--backends cuda triton reference]
"""

from __future__ import annotations

import argparse

import torch

from common import copy_bandwidth_gbs, print_table, time_ms, write_result
from spiral_rt.ops import noise_key, sampler_step

LATENT = (16, 3, 60, 104)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--backends", nargs="+", default=["cuda", "triton", "reference"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    copy_gbs = copy_bandwidth_gbs()
    rows = []
    for batch in args.batches:
        shape = (batch, *LATENT)
        x = torch.randn(shape, device="cuda").to(dtype)
        m = torch.randn(shape, device="cuda").to(dtype)
        a = torch.rand(batch, device="cuda")
        b = torch.rand(batch, device="cuda")
        c = torch.rand(batch, device="cuda")
        key = noise_key(1234, range(batch), 3, 1, device="cuda")
        nbytes = 4 * x.numel() * x.element_size()
        src = torch.randn(nbytes // 2 // x.element_size(), device="cuda").to(dtype)
        dst = torch.empty_like(src)
        same_size_copy = time_ms(lambda: dst.copy_(src))["median_ms"]
        for backend in args.backends:
            if backend == "reference" and batch not in (1, 8):
                continue  # eager PyTorch with emulated Philox: shown for scale only
            t = time_ms(lambda: sampler_step(x, m, a, b, c, noise_key=key, backend=backend))
            gbs = nbytes / (t["median_ms"] * 1e-3) / 1e9
            rows.append({
                "batch": batch, "backend": backend, "median_us": t["median_ms"] * 1e3,
                "p20_us": t["p20_ms"] * 1e3, "p80_us": t["p80_ms"] * 1e3, "MB": nbytes / 1e6,
                "GB/s": gbs, "frac_copy_bw": gbs / copy_gbs,
                "same_size_copy_us": same_size_copy * 1e3,
                "frac_same_size_copy": same_size_copy / t["median_ms"],
            })
    print(f"measured copy bandwidth: {copy_gbs:.0f} GB/s (1 GiB device-to-device, read + write)")
    print_table(rows, ["batch", "backend", "median_us", "p20_us", "p80_us", "MB", "GB/s", "frac_copy_bw",
                       "same_size_copy_us", "frac_same_size_copy"])
    write_result(
        "sampler_step",
        {"latent_per_sequence": list(LATENT), "dtype": args.dtype, "noise": "philox", "return_mu": True,
         "bytes": "read x, m; write x_next, mu", "timing": "triton.testing.do_bench median, L2 flushed"},
        rows,
        {"copy_bandwidth_gbs": copy_gbs},
    )


if __name__ == "__main__":
    main()
