"""The Wan2.1-1.3B DiT's linear layers on one chunk, in TFLOP/s, and ways to run the slowest.

Shapes (M tokens x K -> N, bf16, with bias): the packed q/k/v projection 1536 -> 4608, the output,
cross-attention query and output projections 1536 -> 1536, the FFN up-projection 1536 -> 8960 with
Wan's tanh-GELU, and the FFN down-projection 8960 -> 1536, at M = 4680 (one 3-frame chunk at
832x480), 9360 and 37440 (a G = 8 rollout batch).

The FFN up-projection with cuBLASLt's GELU epilogue (what the DiT's fused path runs) is the slowest
per FLOP (session 12: 554 TFLOP/s against 686 for FFN down at M = 4680). Its variants, each checked
against the first to bf16 rounding before it is timed:

- ``epilogue``: ``torch._addmm_activation(bias, y, W.t(), use_gelu=True)``, W (N, K) as nn.Linear
  stores it (the DiT today);
- ``epilogue_kn``: the same with the weight stored transposed, (K, N) contiguous (cuBLAS sees another
  layout and may choose another kernel);
- ``epilogue_split2``: two GEMMs of N / 2 each (another tile grid);
- ``unfused``: ``F.linear`` then ``F.gelu(approximate="tanh")`` (an extra pass over M x N).

Timing: ``common.time_per_call_ms``, a CUDA graph of back-to-back calls on distinct inputs (as the
engine runs them inside its chunk graph), median of the graph's replays.

    python bench/bench_dit_linears.py [--m 4680,9360,37440]   (GPU; writes results/dit_linears.json)
    python bench/bench_dit_linears.py --smoke                  (CPU, toy sizes: checks the script runs)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, time_per_call_ms, write_result  # noqa: E402

DIM, FFN_DIM = 1536, 8960
CALLS = 8
"""Calls per timed graph, each on its own input."""


def ffn_up_variants(w: torch.Tensor, b: torch.Tensor) -> dict:
    """name -> fn(y) for the FFN up-projection + tanh-GELU, w (N, K), b (N,)."""
    w_kn = w.t().contiguous()
    half = w.shape[0] // 2
    halves = [(w[:half], b[:half]), (w[half:], b[half:])]
    if w.is_cuda:
        def epilogue(y):
            return torch._addmm_activation(b, y, w.t(), use_gelu=True)

        def epilogue_kn(y):
            return torch._addmm_activation(b, y, w_kn, use_gelu=True)

        def epilogue_split2(y):
            return torch.cat([torch._addmm_activation(bh, y, wh.t(), use_gelu=True) for wh, bh in halves], dim=-1)
    else:  # the CPU's addmm GELU is erf's: the smoke run checks the script with the tanh GELU spelled out
        def epilogue(y):
            return F.gelu(F.linear(y, w, b), approximate="tanh")

        epilogue_kn = epilogue_split2 = epilogue

    def unfused(y):
        return F.gelu(F.linear(y, w, b), approximate="tanh")

    return {"epilogue": epilogue, "epilogue_kn": epilogue_kn, "epilogue_split2": epilogue_split2, "unfused": unfused}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", default="4680,9360,37440", help="token counts M (comma-separated)")
    ap.add_argument("--smoke", action="store_true", help="CPU, toy sizes, no timing meaning, no result file")
    args = ap.parse_args(argv)
    if args.smoke:
        device, dtype, dim, ffn, token_counts = "cpu", torch.float32, 64, 96, [37]
    else:
        if not torch.cuda.is_available():
            ap.error("needs a CUDA GPU (or --smoke)")
        device, dtype, dim, ffn, token_counts = "cuda", torch.bfloat16, DIM, FFN_DIM, [int(v) for v in args.m.split(",")]
    torch.manual_seed(0)

    def weight(n, k):
        return (torch.randn(n, k, device=device) / k**0.5).to(dtype), (torch.randn(n, device=device) * 0.1).to(dtype)

    shapes = {"qkv (packed)": weight(3 * dim, dim), "o / cross q / cross o": weight(dim, dim),
              "ffn down": weight(dim, ffn)}
    w_up, b_up = weight(ffn, dim)

    def per_call_ms(fns) -> float:
        if args.smoke:  # no graphs on the CPU: run each call once
            for fn in fns:
                fn()
            return float("nan")
        return time_per_call_ms(fns)["median_ms"]

    rows = []
    for m in token_counts:
        inputs = {k: [torch.randn(m, k, device=device, dtype=dtype) for _ in range(CALLS)] for k in (dim, ffn)}
        for name, (w, b) in shapes.items():
            flops = 2 * m * w.shape[0] * w.shape[1]
            call_ms = per_call_ms([lambda y=y, w=w, b=b: F.linear(y, w, b) for y in inputs[w.shape[1]]])
            rows.append({"M": m, "linear": name, "N": w.shape[0], "K": w.shape[1], "variant": "F.linear",
                         "us": call_ms * 1e3, "tflops": flops / call_ms / 1e9})
        variants = ffn_up_variants(w_up, b_up)
        want = variants["epilogue"](inputs[dim][0]).float()
        flops = 2 * m * ffn * dim
        for name, fn in variants.items():
            err = ((fn(inputs[dim][0]).float() - want).norm() / want.norm()).item()
            if err > (1e-2 if dtype == torch.bfloat16 else 1e-5):
                raise SystemExit(f"ffn up variant {name!r} differs from the epilogue by {err:.2e} (M = {m})")
            call_ms = per_call_ms([lambda y=y, fn=fn: fn(y) for y in inputs[dim]])
            rows.append({"M": m, "linear": "ffn up + tanh-GELU", "N": ffn, "K": dim, "variant": name, "rel_err": err,
                         "us": call_ms * 1e3, "tflops": flops / call_ms / 1e9})
    print_table([{k: (round(v, 1) if isinstance(v, float) and k != "rel_err" else v) for k, v in r.items()} for r in rows],
                ["M", "linear", "N", "K", "variant", "us", "tflops", "rel_err"])
    if not args.smoke:
        write_result("dit_linears", {"dtype": str(dtype).replace("torch.", ""), "calls_per_graph": CALLS, "M": token_counts}, rows)


if __name__ == "__main__":
    main()
