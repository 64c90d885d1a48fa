"""Benchmark of the fused sampler step on one chunk's latents (B, 16, 3, 60, 104), bf16.

Bytes counted: read x and m, write x_next and mu (4 * numel * 2). Philox noise is generated
in-kernel (no noise bytes). Time per call is measured on a CUDA graph of 16 back-to-back calls on
distinct buffers (as the engine runs it: graphed, between other kernels), so neither the Python
call nor the graph launch is counted and every call reads from DRAM; both are reported beside it. GB/s is compared with the measured device-to-device copy bandwidth
(1 GiB copy) and with a copy of the same byte count (what a transfer this small can reach).

    python bench/bench_sampler_step.py [--batches 1 2 4 8 16] [--backends cuda triton reference]
"""

from __future__ import annotations

import argparse

import torch

from common import copy_bandwidth_gbs, graphed, print_table, time_ms, time_per_call_ms, write_result
from spiral_rt.ops import noise_key, sampler_step

LATENT = (16, 3, 60, 104)


CALLS_PER_GRAPH = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--backends", nargs="+", default=["cuda", "triton", "reference"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--noise", default="philox", choices=["philox", "tensor", "none"],
                        help="noise source: in-kernel Philox (default), a noise tensor (read as a third input), none")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    copy_gbs = copy_bandwidth_gbs()
    rows = []
    for batch in args.batches:
        shape = (batch, *LATENT)
        # CALLS_PER_GRAPH independent input sets, so every call reads from DRAM, not L2
        sets = [(torch.randn(shape, device="cuda").to(dtype), torch.randn(shape, device="cuda").to(dtype))
                for _ in range(CALLS_PER_GRAPH)]
        a = torch.rand(batch, device="cuda")
        b = torch.rand(batch, device="cuda")
        c = torch.rand(batch, device="cuda")
        key = noise_key(1234, range(batch), 3, 1, device="cuda")
        noise = {"philox": {"noise_key": key}, "none": {},
                 "tensor": {"noise": torch.randn(shape, device="cuda").to(dtype)}}[args.noise]
        nbytes = (4 + (args.noise == "tensor")) * sets[0][0].numel() * sets[0][0].element_size()
        copies = [(torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda").random_(),
                   torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")) for _ in range(CALLS_PER_GRAPH)]
        same_size_copy = time_per_call_ms([lambda s=s, d=d: d.copy_(s) for s, d in copies])["median_ms"]
        for backend in args.backends:
            if backend == "reference" and batch not in (1, 8):
                continue  # eager PyTorch with emulated Philox: shown for scale only
            calls = [lambda x=x, m=m: sampler_step(x, m, a, b, c, backend=backend, **noise) for x, m in sets]
            t = time_per_call_ms(calls)
            single = time_ms(graphed(calls[:1]))["median_ms"]
            eager = time_ms(calls[0])["median_ms"]
            gbs = nbytes / (t["median_ms"] * 1e-3) / 1e9
            rows.append({
                "batch": batch, "backend": backend, "median_us": t["median_ms"] * 1e3,
                "p20_us": t["p20_ms"] * 1e3, "p80_us": t["p80_ms"] * 1e3, "MB": nbytes / 1e6,
                "GB/s": gbs, "frac_copy_bw": gbs / copy_gbs,
                "same_size_copy_us": same_size_copy * 1e3,
                "frac_same_size_copy": same_size_copy / t["median_ms"],
                "single_replay_us": single * 1e3, "eager_call_us": eager * 1e3,
            })
        del sets, copies
    print(f"measured copy bandwidth: {copy_gbs:.0f} GB/s (1 GiB device-to-device, read + write)")
    print_table(rows, ["batch", "backend", "median_us", "p20_us", "p80_us", "MB", "GB/s", "frac_copy_bw",
                       "same_size_copy_us", "frac_same_size_copy", "single_replay_us", "eager_call_us"])
    write_result(
        "sampler_step" if args.noise == "philox" else f"sampler_step_noise_{args.noise}",
        {"latent_per_sequence": list(LATENT), "dtype": args.dtype, "noise": args.noise, "return_mu": True,
         "bytes": "read x, m (and noise with --noise tensor); write x_next, mu",
         "timing": f"per call: triton.testing.do_bench median of a CUDA graph of {CALLS_PER_GRAPH} back-to-back "
                   f"calls on distinct buffers / {CALLS_PER_GRAPH}; single_replay_us: a graph of one call "
                   "(includes ~5 us graph-launch and event overhead); eager_call_us: the Python call"},
        rows,
        {"copy_bandwidth_gbs": copy_gbs},
    )


if __name__ == "__main__":
    main()
