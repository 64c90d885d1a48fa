"""The DiT's cross-attention on one chunk: SDPA over all 512 text rows (what Wan computes) against
``spiral_rt.ops.text_attention``, which reads a prompt's repeated padding rows once.

Shapes: B x 4680 queries (one 3-frame chunk at 832x480; B = 8: a rollout batch), 12 heads of 128,
512 text rows of which the first ``distinct`` differ (a prompt of ``distinct`` tokens; 511: no
padding at all). Each output is checked against the reference (fp32 attention over every row,
bf16 tolerance 1.6e-2 of max |O|) before it is timed. Timing: ``common.time_per_call_ms``, a CUDA
graph of back-to-back calls on distinct query buffers (together larger than L2), median of the
graph's replays. ``--configs`` also times other tile shapes of the Triton kernel (block_m, block_n,
warps, stages) to choose its defaults.

    python bench/bench_text_attention.py [--batch 1,8] [--distinct 16,64,128,256,511] [--configs]
    python bench/bench_text_attention.py --smoke        (CPU interpreter, toy sizes: checks the script runs)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, time_per_call_ms, write_result  # noqa: E402

CALLS = 8
CONFIGS = [(128, 64, 8, 2), (128, 64, 4, 2), (128, 128, 8, 2), (64, 64, 4, 2), (128, 32, 4, 2), (128, 64, 8, 3)]
"""(block_m, block_n, num_warps, num_stages) tried with --configs; the first is the kernel's default."""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--distinct", default="16,64,128,256,511", help="distinct text rows (prompt tokens)")
    ap.add_argument("--configs", action="store_true", help="also time the Triton kernel's other tile shapes")
    ap.add_argument("--smoke", action="store_true", help="CPU, toy sizes, no timing meaning, no result file")
    args = ap.parse_args(argv)
    if args.smoke:
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")
    from spiral_rt.kernels import text_attention as kernel
    from spiral_rt.models.attention import sdpa_blhd
    from spiral_rt.ops import text_attention
    from spiral_rt.reference.text_attention import text_attention as reference

    if args.smoke:
        device, dtype, len_q, heads, dim, len_t, batches, counts = "cpu", torch.float32, 40, 2, 16, 24, [1], [5, 23]
    else:
        if not torch.cuda.is_available():
            ap.error("needs a CUDA GPU (or --smoke)")
        device, dtype, len_q, heads, dim, len_t = "cuda", torch.bfloat16, 4680, 12, 128, 512
        batches, counts = [int(v) for v in args.batch.split(",")], [int(v) for v in args.distinct.split(",")]
    tol = 1.6e-2 if dtype == torch.bfloat16 else 1e-5
    torch.manual_seed(0)

    def per_call_ms(fns) -> float:
        if args.smoke:
            for fn in fns:
                fn()
            return float("nan")
        return time_per_call_ms(fns)["median_ms"]

    rows = []
    for batch in batches:
        qs = [torch.randn(batch, len_q, heads, dim, device=device, dtype=dtype) for _ in range(CALLS)]
        for distinct in counts:
            k = torch.randn(batch, len_t, heads, dim, device=device, dtype=dtype)
            v = torch.randn(batch, len_t, heads, dim, device=device, dtype=dtype)
            k[:, distinct:] = k[:, distinct:distinct + 1]
            v[:, distinct:] = v[:, distinct:distinct + 1]
            n = torch.full((batch,), distinct, dtype=torch.int32, device=device)
            want = reference(qs[0], k, v, n).float()
            variants = {"sdpa, every row": lambda q: sdpa_blhd(q, k, v),
                        "text_attention": lambda q: text_attention(q, k, v, n)}
            if args.configs:
                for bm, bn, warps, stages in CONFIGS[1:]:
                    def fn(q, cfg=(bm, bn, warps, stages)):
                        o = torch.empty_like(q)
                        kernel.text_attention(q, k, v, n, o, *cfg)
                        return o
                    variants[f"triton {bm}x{bn} w{warps} s{stages}"] = fn
            base = None
            for name, fn in variants.items():
                err = ((fn(qs[0]).float() - want).abs().max() / want.abs().max()).item()
                if err > tol:
                    raise SystemExit(f"{name} differs from the reference by {err:.2e} of max |O| (batch {batch}, distinct {distinct})")
                us = per_call_ms([lambda q=q, fn=fn: fn(q) for q in qs]) * 1e3
                base = us if base is None else base
                rows.append({"batch": batch, "distinct_rows": distinct, "variant": name, "us": us,
                             "x_sdpa": base / us, "max_err": err})
    print_table([{k: (round(v, 2) if isinstance(v, float) and k != "max_err" else v) for k, v in r.items()} for r in rows],
                ["batch", "distinct_rows", "variant", "us", "x_sdpa", "max_err"])
    if not args.smoke:
        write_result("text_attention", {"dtype": "bfloat16", "len_q": len_q, "heads": heads, "head_dim": dim,
                                        "text_rows": len_t, "calls_per_graph": CALLS,
                                        "default_config": CONFIGS[0]}, rows)


if __name__ == "__main__":
    main()
