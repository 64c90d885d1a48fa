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
op's tuner (CUDA graphs), and reports the best few per shape in the graph timing
(results/linear_search.json). Every row gives its configuration's workspace bytes (nonzero: cuBLASLt
zeroes a counter with a memset before each call, a graph node; removing those from the chunk graphs
gained nothing, bench/NOTES.md session 21).

    python bench/bench_linear.py [--m 4680,37440] [--search]   (GPU; writes results/linear.json)
"""

from __future__ import annotations

import argparse
import ctypes
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


CLUSTERS = (2, 3, 5)
"""cublasLtClusterShape_t: 1x1x1, 2x1x1, 1x2x1."""
_CFG_TILE, _CFG_CUSTOM, _CFG_CLUSTER = 1, 5, 8
_CAP_CUSTOM_OPTION_MAX = 7


def _cfg(lt, algo, attr):
    v, n = ctypes.c_uint32(0), ctypes.c_size_t(0)
    lt.cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(algo), attr, ctypes.byref(v), ctypes.c_size_t(4), ctypes.byref(n))
    return int(v.value)


def search(plan, x, w, b, keep: int = 4):
    """Variants of the heuristic's candidates: (candidate, custom, cluster) accepted by AlgoCheck, timed
    by the op's tuner method; returns [(us, heuristic entry, config)] of the ``keep`` fastest."""
    lt = plan.lt
    variants, seen = [], set()
    for h in plan.candidates:
        cmax = ctypes.c_int32(0)
        lt.cublasLtMatmulAlgoCapGetAttribute(ctypes.byref(h.algo), _CAP_CUSTOM_OPTION_MAX, ctypes.byref(cmax),
                                             ctypes.c_size_t(4), ctypes.byref(ctypes.c_size_t(0)))
        for custom in range(cmax.value + 1):
            for cluster in CLUSTERS:
                v = cublaslt._Heuristic()
                ctypes.memmove(ctypes.byref(v.algo), ctypes.byref(h.algo), ctypes.sizeof(cublaslt._Algo))
                for attr, val in ((_CFG_CUSTOM, custom), (_CFG_CLUSTER, cluster)):
                    c = ctypes.c_uint32(val)
                    lt.cublasLtMatmulAlgoConfigSetAttribute(ctypes.byref(v.algo), attr, ctypes.byref(c), ctypes.c_size_t(4))
                key = (_cfg(lt, v.algo, _CFG_TILE), custom, cluster, bytes(v.algo.data))
                if key[:3] in seen:
                    continue
                res = cublaslt._Heuristic()
                if lt.cublasLtMatmulAlgoCheck(plan.handle, plan.desc, plan.a, plan.b, plan.d, plan.d,
                                              ctypes.byref(v.algo), ctypes.byref(res)) != 0 or res.workspace > cublaslt.WORKSPACE_BYTES:
                    continue
                seen.add(key[:3])
                v.workspace = res.workspace
                variants.append((v, {"tile": key[0], "custom": custom, "cluster": cluster}))
    saved = plan.candidates, plan.chosen, plan.timed_us
    plan.candidates = [v for v, _ in variants]
    plan.tune(x, w, b, rounds=3, calls=6)
    ranked = sorted(zip(plan.timed_us, variants), key=lambda r: r[0])[:keep]
    plan.candidates, plan.chosen, plan.timed_us = saved
    print(f"  searched {len(variants)} variants", flush=True)
    return [(us, v, cfg) for us, (v, cfg) in ranked]


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
