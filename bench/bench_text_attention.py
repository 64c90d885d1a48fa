"""The DiT's cross-attention on one chunk: SDPA over all 512 text rows (what Wan computes; cuDNN on
the H100) against ``spiral_rt.ops.chunk_attention`` over a prompt's distinct rows
(``ChunkAttentionPlan.with_distinct_keys``: the padding rows' shared K/V read once, counted).

Shapes: B x 4680 queries (one 3-frame chunk at 832x480; B = 8: a rollout batch), 12 heads of 128,
512 text rows of which the first ``distinct`` differ (a prompt of that many tokens; 511 and 512: no
repeated row). Each output is checked against SDPA's (bf16: 1.6e-2 of max |O|) before it is timed.
Timing: ``common.time_per_call_ms``, a CUDA graph of back-to-back calls on distinct query buffers,
median of the graph's replays. "distinct rows" times the kernel on a plan rewritten beforehand (the
DiT rewrites it once a forward for 30 layers); "+ plan rewrite" also rewrites it in every call.

    python bench/bench_text_attention.py [--batch 1,8] [--distinct 16,128,256,511]   (GPU)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, time_per_call_ms, write_result  # noqa: E402

from spiral_rt.models.attention import sdpa_blhd  # noqa: E402
from spiral_rt.ops import chunk_attention, plan_chunk_attention  # noqa: E402

CALLS = 8
LEN_Q, HEADS, DIM, ROWS = 4680, 12, 128, 512


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--distinct", default="16,128,256,511", help="distinct text rows (prompt tokens)")
    args = ap.parse_args(argv)
    batches, counts = ([int(v) for v in a.split(",")] for a in (args.batch, args.distinct))
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    torch.manual_seed(0)
    rows = []
    for batch in batches:
        qs = [torch.randn(batch, LEN_Q, HEADS, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(CALLS)]
        plan = plan_chunk_attention([b * LEN_Q for b in range(batch + 1)], list(range(batch + 1)), list(range(batch)),
                                    [ROWS] * batch, page_size=ROWS, num_pages=batch, num_qo_heads=HEADS, head_dim=DIM,
                                    dtype=torch.bfloat16, device="cuda")
        for distinct in counts:
            k = torch.randn(batch, ROWS, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(batch, ROWS, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
            k[:, distinct:] = k[:, distinct:distinct + 1]
            v[:, distinct:] = v[:, distinct:distinct + 1]
            counted = torch.full((batch,), distinct, dtype=torch.int32, device="cuda")
            plan_distinct = plan.with_distinct_keys(counted)

            def ours(q):
                return chunk_attention(q.flatten(0, 1), k, v, plan_distinct).o

            def ours_with_rewrite(q):
                return chunk_attention(q.flatten(0, 1), k, v, plan.with_distinct_keys(counted)).o

            def ours_all_rows(q):
                return chunk_attention(q.flatten(0, 1), k, v, plan).o

            want = sdpa_blhd(qs[0], k, v).float()
            scale = want.abs().max().item()
            for name, fn in (("sdpa, every row", lambda q: sdpa_blhd(q, k, v)),
                             ("chunk_attention, every row", ours_all_rows),
                             ("chunk_attention, distinct rows", ours),
                             ("distinct rows + plan rewrite", ours_with_rewrite)):
                err = (fn(qs[0]).float().view_as(want) - want).abs().max().item() / scale
                assert err < 1.6e-2, (name, distinct, err)
                us = time_per_call_ms([lambda q=q, fn=fn: fn(q) for q in qs])["median_ms"] * 1e3
                rows.append({"batch": batch, "distinct": distinct, "variant": name, "us": us, "max_err": err})
            for r in rows[-4:]:  # this count's rows, SDPA's first
                r["x_sdpa"] = rows[-4]["us"] / r["us"]
    print_table(rows, ["batch", "distinct", "variant", "us", "x_sdpa", "max_err"])
    write_result("text_attention_cuda", {"len_q": LEN_Q, "heads": HEADS, "head_dim": DIM, "text_rows": ROWS,
                                         "dtype": "bfloat16", "calls_per_graph": CALLS}, rows)


if __name__ == "__main__":
    main()
