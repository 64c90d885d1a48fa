"""The distinct-rows cross-attention kernel alone, a few calls, untimed: the target of a profiler.

One chunk's text cross-attention as the DiT runs it (B x 4680 queries, 12 heads of 128, 512 text rows
of which ``--distinct`` differ, the plan rewritten once beforehand, ``--row-scale``: the queries' inverse
RMS as the kernel's per-row score scale). Under Nsight Compute, skip the first calls (warm-up):

    ncu --clock-control none -k regex:chunk_attention_sm90 --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis \\
        python3 bench/probe_text_attention.py --row-scale        (GPU)
"""

from __future__ import annotations

import argparse

import torch

from spiral_rt.ops import chunk_attention, plan_chunk_attention, row_inv_rms

LEN_Q, HEADS, DIM, ROWS = 4680, 12, 128, 512


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--distinct", type=int, default=128, help="distinct text rows (prompt tokens)")
    ap.add_argument("--row-scale", action="store_true", help="pass the queries' inverse RMS as q_row_scale")
    ap.add_argument("--calls", type=int, default=4)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    B = args.batch
    plan = plan_chunk_attention([b * LEN_Q for b in range(B + 1)], list(range(B + 1)), list(range(B)), [ROWS] * B,
                                page_size=ROWS, num_pages=B, num_qo_heads=HEADS, head_dim=DIM, dtype=torch.bfloat16,
                                device="cuda")
    q = torch.randn(B * LEN_Q, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, ROWS, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    rewritten = plan.with_distinct_keys(torch.full((B,), args.distinct, dtype=torch.int32, device="cuda"))
    scale = row_inv_rms(q.view(B * LEN_Q, HEADS * DIM)) if args.row_scale else None
    for _ in range(args.calls):
        chunk_attention(q, k, v, rewritten, q_row_scale=scale)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
