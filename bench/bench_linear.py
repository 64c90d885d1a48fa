"""``spiral_rt.ops.linear`` on the DiT's linear shapes against PyTorch's own calls, and every
cuBLASLt heuristic candidate the op chooses among.

Shapes (M tokens x K -> N, bf16, with bias): the packed q/k/v projection 1536 -> 4608, the
1536 -> 1536 projections (self-attention output, cross-attention query and output), the FFN
up-projection 1536 -> 8960 with Wan's tanh-GELU in the epilogue, and the FFN down-projection
8960 -> 1536, at M = 4680 (one 3-frame chunk at 832x480) and 37440 (a G = 8 rollout batch).

Rows per shape: ``torch`` (F.linear; torch._addmm_activation for the GELU: cuBLASLt's first
heuristic candidate), ``op`` (``spiral_rt.ops.linear``, the candidate its timing chose) and each
candidate ``0 .. 7`` by itself, with its relative difference from torch's output. Timing:
``common.time_per_call_ms``, a CUDA graph of back-to-back calls on distinct inputs.

``--search`` also tries configurations the heuristic does not offer: each candidate's tile with every
custom option and the cluster shapes 1x1, 2x1 and 1x2 (those cuBLASLt's check accepts), timed by the
op's tuner, and reports the best few per shape in the graph timing, with the fastest that needs no
workspace (results/linear_search.json). Every row gives its configuration's workspace bytes: a
nonzero one costs a memset node before each call in a graph.

    python bench/bench_linear.py [--m 4680,37440] [--search]   (GPU; writes results/linear.json)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, time_per_call_ms, write_result  # noqa: E402

from spiral_rt.ops import cublaslt, linear  # noqa: E402

SHAPES = (("qkv", 1536, 4608, False), ("proj_1536", 1536, 1536, False), ("ffn_up_gelu", 1536, 8960, True),
          ("ffn_down", 8960, 1536, False))
CALLS = 8
"""Calls per timed graph, each on its own input."""


def torch_linear(x, w, b, gelu):
    if gelu:
        return torch._addmm_activation(b, x, w.t(), use_gelu=True)
    return torch.nn.functional.linear(x, w, b)


def search(plan, x, w, b, keep: int = 4):
    """Variants of the heuristic's candidates (``LtLinear.variants``: tile, custom option and cluster
    shape accepted by cuBLASLt's check), timed by the op's tuner; returns [(us, entry, config)] of the
    ``keep`` fastest, and of the fastest that needs no workspace when none of those ``keep`` does."""
    variants = plan.variants(plan.candidates)
    saved = plan.candidates, plan.chosen, plan.timed_us
    plan.candidates = [v for v, _ in variants]
    plan.tune(x, w, b, rounds=3, calls=6)
    ranked = sorted(zip(plan.timed_us, variants), key=lambda r: r[0])
    plan.candidates, plan.chosen, plan.timed_us = saved
    free = [r for r in ranked if r[1][0].workspace == 0]
    print(f"  searched {len(variants)} variants, {len(free)} of them without workspace", flush=True)
    kept = ranked[:keep] + ([free[0]] if free and all(v.workspace for _, (v, _) in ranked[:keep]) else [])
    return [(us, v, cfg) for us, (v, cfg) in kept]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", default="4680,37440", help="token counts M")
    ap.add_argument("--search", action="store_true", help="also time configurations the heuristic does not offer")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    torch.manual_seed(0)
    rows = []
    for m in [int(v) for v in args.m.split(",")]:
        for name, k, n, gelu in SHAPES:
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
            b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(CALLS)]
            flop = 2 * m * n * k
            want = torch_linear(xs[0], w, b, gelu).float()

            def row(label, fns, out, **extra):
                us = time_per_call_ms(fns)["median_ms"] * 1e3
                err = float((out.float() - want).norm() / want.norm())
                return {"m": m, "shape": name, "run": label, "us": us, "tflops": flop / us / 1e6, "rel_diff": err, **extra}

            base = row("torch", [lambda x=x: torch_linear(x, w, b, gelu) for x in xs], want)
            op_out = linear(xs[0], w, b, gelu=gelu)  # first call: the op times the candidates
            plan = cublaslt.plan(cublaslt.Problem(0, torch.bfloat16, m, k, n, k, True, gelu), xs[0], w, b)
            shape_rows = [base, row("op", [lambda x=x: linear(x, w, b, gelu=gelu) for x in xs], op_out,
                                    chosen=plan.chosen)]
            for i in range(len(plan.candidates)):
                outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in xs]
                plan.run(xs[0], w, b, outs[0], candidate=i)
                shape_rows.append(row(str(i), [lambda x=x, o=o, i=i: plan.run(x, w, b, o, candidate=i)
                                               for x, o in zip(xs, outs)], outs[0],
                                      tuner_us=plan.timed_us[i] if plan.timed_us else float("nan"),
                                      workspace=int(plan.candidates[i].workspace)))
            if args.search:
                for rank, (tuner_us, v, cfg) in enumerate(search(plan, xs[0], w, b)):
                    outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in xs]
                    plan.candidates.append(v)
                    i = len(plan.candidates) - 1
                    plan.run(xs[0], w, b, outs[0], candidate=i)
                    r = row(f"search{rank}", [lambda x=x, o=o, i=i: plan.run(x, w, b, o, candidate=i)
                                              for x, o in zip(xs, outs)], outs[0], tuner_us=tuner_us,
                             workspace=int(v.workspace), **cfg)
                    shape_rows.append(r)
                    plan.candidates.pop()
            for r in shape_rows:
                r["x_torch"] = base["us"] / r["us"]
            rows += shape_rows
            best = max(shape_rows[2:], key=lambda r: r["x_torch"])
            print(f"{name} M={m}: torch {base['tflops']:.0f} TFLOP/s, op {shape_rows[1]['tflops']:.0f} "
                  f"(candidate {plan.chosen}), best candidate {best['run']} {best['tflops']:.0f}", flush=True)
    print_table(rows, ["m", "shape", "run", "us", "tflops", "x_torch", "rel_diff", "chosen", "tuner_us", "workspace",
                       "tile", "custom", "cluster"])
    write_result("linear_search" if args.search else "linear", {"m": args.m, "dtype": "bfloat16", "calls_per_graph": CALLS,
                            "candidates": cublaslt.CANDIDATES}, rows)


if __name__ == "__main__":
    main()
