"""Chunk attention over paged K/V on the H100 vs cuDNN SDPA, PyTorch flash SDPA, compiled
flex_attention and FA3 (when ``flash_attn_interface`` imports), plus the shared-prefix path.

Part 1, one Wan chunk: Lq = 4680 (3 latent frames at 832x480), Lk in {4680, 15600, 18720, 32760},
12 heads x 128, bf16. Ours reads K/V through a page table (1560-token pages, ids shuffled over the
pool); the competitors read dense contiguous (B, L, H, D) tensors. Every kernel variant in
VARIANTS is checked against cuDNN's output first (a wrong variant is reported, never timed), then
timed; "ours" is the best variant per shape, "ours_default" what the op picks by itself (the CUDA
kernel where it runs, else the Triton default config). Variants named "cuda-*" run the Hopper
kernel of csrc/ (backend="cuda"), the others the Triton kernel. TFLOP/s =
4 * Lq * Lk * H * D / time; ratio = ours / best competitor.

Part 2, shared prefix: G members (G = 4, 8) each with a 3-frame own chunk after a shared prefix of
6 or 12 frames. "alone": G launches, one per member over prefix + own pages; "batched": one varlen
launch of the G members whose page tables list the same prefix pages (what a forked group runs in
the engine: the pages are shared, refcounted, never copied); "shared": one launch of all G members'
queries over the prefix pages, one over each member's own pages, and merge_states. The three are
timed in turn for ``--rounds`` rounds and each one's median over the rounds is reported, so a
drift of the GPU's clock during the run does not favour whichever was timed first.

Run on the GPU machine: ``python bench/bench_attention.py`` (writes bench/results/attention.json).
``--smoke`` runs the same code on CPU through the Triton interpreter at toy sizes (no timing
meaning, no result file): a check that the script itself works.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import print_table, write_result  # noqa: E402

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from spiral_rt.ops.chunk_attention import (  # noqa: E402
    AttentionConfig,
    default_config,
    chunk_attention,
    chunk_attention_shared_prefix,
    plan_chunk_attention,
)

DEVICE = "cuda"
PAGE = 1560  # tokens per latent frame at 832x480
HEADS, HEAD_DIM, DTYPE = 12, 128, torch.bfloat16
LQ = 3 * PAGE
LKS = [3 * PAGE, 10 * PAGE, 12 * PAGE, 21 * PAGE]
SMOKE = False
def _default_variant() -> str | None:
    """The name of the variant the op runs for these shapes without being told (auto backend)."""
    if CUDA_VARIANTS and plan_for_default().cuda_reason is None:
        return "cuda-n176"
    chosen = default_config(HEAD_DIM, DTYPE, LQ, SMOKE)
    return next((name for name, cfg in VARIANTS.items() if cfg == chosen), None)


def plan_for_default():
    return make_plan([LQ], [list(range(LQ // PAGE))], LQ // PAGE)


VARIANTS = {  # name -> AttentionConfig (num_splits 0 = the plan's choice by shape)
    "m128n64w8s3": AttentionConfig(128, 64, 8, 3, 0),
    "m128n64w8s3-split1": AttentionConfig(128, 64, 8, 3, 1),
    "m128n64w8s3-split2": AttentionConfig(128, 64, 8, 3, 2),
    "m128n64w8s4": AttentionConfig(128, 64, 8, 4, 0),
    "m128n128w8s2": AttentionConfig(128, 128, 8, 2, 0),
    "m128n128w8s3": AttentionConfig(128, 128, 8, 3, 0),
    "m128n64w4s3": AttentionConfig(128, 64, 4, 3, 0),
    "m64n64w4s3": AttentionConfig(64, 64, 4, 3, 0),
    "m128n64w8s3-gather": AttentionConfig(128, 64, 8, 3, 0, hoist_pages=False),
    "m128n128w8s2-gather": AttentionConfig(128, 128, 8, 2, 0, hoist_pages=False),
    "m128n64w8s3-ws": AttentionConfig(128, 64, 8, 3, 0, warp_specialize=True),
    "m128n64w8s3-tma": AttentionConfig(128, 64, 8, 3, 0, kv_load="tma"),
    "m128n128w8s2-tma": AttentionConfig(128, 128, 8, 2, 0, kv_load="tma"),
    "m128n64w8s3-tma-ws": AttentionConfig(128, 64, 8, 3, 0, kv_load="tma", warp_specialize=True),
    "m128n128w8s2-tma-ws": AttentionConfig(128, 128, 8, 2, 0, kv_load="tma", warp_specialize=True),
}
CUDA_VARIANTS = {  # name -> AttentionConfig of the CUDA kernel (backend="cuda")
    "cuda-n176": AttentionConfig(),
    "cuda-n176-split1": AttentionConfig(num_splits=1, cuda_block_n=176),
    "cuda-n176-split2": AttentionConfig(num_splits=2, cuda_block_n=176),
    "cuda-n112": AttentionConfig(cuda_block_n=112),
    "cuda-n112-split2": AttentionConfig(num_splits=2, cuda_block_n=112),
    "cuda-n128": AttentionConfig(cuda_block_n=128),
}


def configure_smoke():
    """Toy sizes on CPU (Triton interpreter) to exercise the script end to end."""
    global DEVICE, PAGE, HEADS, HEAD_DIM, DTYPE, LQ, LKS, SMOKE, VARIANTS, CUDA_VARIANTS
    DEVICE, PAGE, HEADS, HEAD_DIM, DTYPE, SMOKE = "cpu", 24, 2, 64, torch.float16, True
    CUDA_VARIANTS = {}
    LQ, LKS = 3 * PAGE, [3 * PAGE, 5 * PAGE]
    VARIANTS = {"m16n16": AttentionConfig(16, 16, 4, 1, 0), "m32n16-split2": AttentionConfig(32, 16, 4, 1, 2),
                "m16n16-gather": AttentionConfig(16, 16, 4, 1, 1, hoist_pages=False),
                "m16n16-tma": AttentionConfig(16, 16, 4, 1, 0, kv_load="tma"),
                "m16n16-tma-ws": AttentionConfig(16, 16, 4, 1, 0, kv_load="tma", warp_specialize=True)}


def time_ms(fn, rep_ms):
    if SMOKE:  # one wall-clock run: the interpreter's timing means nothing
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return {"median_ms": ms, "p20_ms": ms, "p80_ms": ms}
    return common.time_ms(fn, rep_ms=rep_ms)


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def paged_layout(kv_lens: list[list[int]], shared: int = 0):
    """Page tables for sequences given as lists of segment lengths in pages; pages shuffled.

    Returns (num_pages, per-sequence page lists); the first ``shared`` pages of every sequence are
    the same physical pages (a shared prefix)."""
    total = shared + sum(sum(segs) - shared for segs in kv_lens)
    perm = torch.randperm(total).tolist()
    prefix, pos, lists = perm[:shared], shared, []
    for segs in kv_lens:
        own = sum(segs) - shared
        lists.append(prefix + perm[pos:pos + own])
        pos += own
    return total, lists


def make_plan(q_lens, page_lists, num_pages, config=None):
    q_ptr, kv_ptr, idx, last = [0], [0], [], []
    for ql, pages in zip(q_lens, page_lists):
        q_ptr.append(q_ptr[-1] + ql)
        kv_ptr.append(kv_ptr[-1] + len(pages))
        idx += pages
        last.append(PAGE if pages else 0)
    return plan_chunk_attention(q_ptr, kv_ptr, idx, last, page_size=PAGE, num_pages=num_pages, num_qo_heads=HEADS,
                                head_dim=HEAD_DIM, dtype=DTYPE, device=DEVICE, config=config)


def competitors(q, k, v):
    """name -> zero-arg callable on dense (1, L, H, D) tensors; missing ones are skipped."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (1, H, L, D) views of (1, L, H, D)
    out = {}

    def sdpa(backend):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt)
        return run

    out["cudnn"] = sdpa(SDPBackend.CUDNN_ATTENTION)
    out["flash2_sdpa"] = sdpa(SDPBackend.FLASH_ATTENTION)
    if SMOKE:
        return out
    try:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        out["flex_compiled"] = lambda: flex(qt, kt, vt)
    except Exception as err:  # pragma: no cover - depends on the install
        print(f"flex_attention unavailable: {err}", file=sys.stderr)
    fa3 = _import_fa3()
    if fa3 is not None:
        out["fa3"] = lambda: fa3.flash_attn_func(q, k, v)
    return out


def _import_fa3():
    """FA3's forward: the `fa3-fwd` wheel (module fa3_fwd_interface) or a flash-attn hopper build."""
    errors = []
    for name in ("fa3_fwd_interface", "flash_attn_interface"):
        try:
            return importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - any failure means "not available here"
            errors.append(f"{name}: {err}")
    print("FA3 unavailable (" + "; ".join(errors) + ")", file=sys.stderr)
    return None


def first_tensor(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def bench_chunk(args, variants_to_try: dict, rows: list[dict] | None = None) -> list[dict]:
    """Time competitors (first pass) and our variants per Lk; with ``rows`` (a later pass) only
    the given variants are timed and merged into the existing rows."""
    first_pass = rows is None
    rows = rows if rows is not None else [{"Lq": LQ, "Lk": lk, "variants": {}} for lk in LKS]
    for row in rows:
        lk = row["Lk"]
        torch.manual_seed(lk)
        num_pages, (pages,) = paged_layout([[lk // PAGE]])
        k_pages = torch.randn(num_pages, PAGE, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
        v_pages = torch.randn_like(k_pages)
        q = torch.randn(LQ, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
        idx = torch.tensor(pages, device=DEVICE)
        k = k_pages[idx].reshape(1, lk, HEADS, HEAD_DIM)
        v = v_pages[idx].reshape(1, lk, HEADS, HEAD_DIM)
        flops = 4 * LQ * lk * HEADS * HEAD_DIM
        ref = None
        if first_pass:
            for name, fn in competitors(q[None], k, v).items():
                try:
                    out = first_tensor(fn())
                    if ref is None and name == "cudnn":
                        ref = out.transpose(1, 2)[0] if out.shape[1] == HEADS else out[0]
                    row[f"{name}_tflops"] = tflops(flops, time_ms(fn, rep_ms=args.rep_ms)["median_ms"])
                except Exception as err:
                    print(f"{name} failed at Lk={lk}: {type(err).__name__}: {str(err)[:200]}", file=sys.stderr)
        if ref is None:  # fp32 reference
            ref = F.scaled_dot_product_attention(q[None].transpose(1, 2).float(), k.transpose(1, 2).float(),
                                                 v.transpose(1, 2).float())[0].transpose(0, 1).to(DTYPE)
        variants = row["variants"]
        for vname, cfg in variants_to_try.items():
            backend = "cuda" if vname.startswith("cuda-") else "triton"
            try:
                plan = make_plan([LQ], [pages], num_pages, cfg)
                o, _ = chunk_attention(q, k_pages, v_pages, plan, backend=backend)
                err = (o.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
                if not err < 2e-2:  # relative to max |O|; bf16 vs bf16 differ by a few ulps
                    print(f"variant {vname} at Lk={lk}: max error {err:.3g} vs cuDNN, not timed", file=sys.stderr)
                    continue
                t = time_ms(lambda: chunk_attention(q, k_pages, v_pages, plan, backend=backend), rep_ms=args.rep_ms)
                splits = f"{plan.cuda_pieces} pieces" if backend == "cuda" else plan.num_splits
                variants[vname] = {"tflops": tflops(flops, t["median_ms"]), **t, "num_splits": splits,
                                   "max_rel_err_vs_cudnn": err}
            except Exception as err:
                print(f"variant {vname} failed at Lk={lk}: {type(err).__name__}: {str(err)[:200]}", file=sys.stderr)
        summarize(row)
    return rows


def summarize(row: dict) -> None:
    """Best variant, default variant, best competitor (of cuDNN and FA3) and the ratio."""
    variants = row["variants"]
    if variants:
        best = max(variants, key=lambda n: variants[n]["tflops"])
        row["ours_tflops"], row["ours_variant"] = variants[best]["tflops"], best
        row["ours_split"] = variants[best]["num_splits"]
        row["ours_default_tflops"] = variants.get(_default_variant(), {}).get("tflops")
    comp = {n: row[f"{n}_tflops"] for n in ("cudnn", "fa3", "flash2_sdpa", "flex_compiled") if f"{n}_tflops" in row}
    target = {n: comp[n] for n in ("cudnn", "fa3") if n in comp} or comp
    if target and "ours_tflops" in row:
        best_comp = max(target, key=target.get)
        row["best_competitor"] = best_comp
        row["ratio"] = row["ours_tflops"] / target[best_comp]


def bench_shared_prefix(args) -> list[dict]:
    rows = []
    own_frames = 3
    for group in (4, 8):
        for prefix_frames in (6, 12):
            segs = [[prefix_frames, own_frames]] * group
            num_pages, lists = paged_layout(segs, shared=prefix_frames)
            k_pages = torch.randn(num_pages, PAGE, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
            v_pages = torch.randn_like(k_pages)
            q = torch.randn(group * LQ, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
            alone_plans = [make_plan([LQ], [pl], num_pages) for pl in lists]
            batched = make_plan([LQ] * group, lists, num_pages)
            prefix = make_plan([group * LQ], [lists[0][:prefix_frames]], num_pages)
            suffix = make_plan([LQ] * group, [pl[prefix_frames:] for pl in lists], num_pages)

            def alone():
                return [chunk_attention(q[i * LQ:(i + 1) * LQ], k_pages, v_pages, p) for i, p in enumerate(alone_plans)]

            def shared():
                return chunk_attention_shared_prefix(q, k_pages, v_pages, prefix, suffix)

            o_b, _ = chunk_attention(q, k_pages, v_pages, batched)
            o_s, _ = shared()
            err = (o_b.float() - o_s.float()).abs().max().item()
            schedules = {"alone": alone, "batched": lambda: chunk_attention(q, k_pages, v_pages, batched), "shared": shared}
            times = {name: [] for name in schedules}
            for _ in range(1 if SMOKE else args.rounds):
                for name, fn in schedules.items():
                    times[name].append(time_ms(fn, rep_ms=args.rep_ms)["median_ms"])
            t_alone, t_batched, t_shared = (statistics.median(times[n]) for n in ("alone", "batched", "shared"))
            rows.append({
                "G": group, "prefix_frames": prefix_frames, "own_frames": own_frames,
                "alone_ms": t_alone, "batched_ms": t_batched, "shared_ms": t_shared,
                "batched_vs_alone": t_alone / t_batched,
                "speedup_vs_alone": t_alone / t_shared, "speedup_vs_batched": t_batched / t_shared,
                "shared_tflops": tflops(batched.flops, t_shared), "batched_tflops": tflops(batched.flops, t_batched),
                "max_diff_shared_vs_batched": err, "rounds_ms": times,
            })
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rep-ms", type=float, default=150, help="timing budget per measurement (do_bench rep)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on CPU through the Triton interpreter")
    parser.add_argument("--no-ws", action="store_true", help="skip the warp-specialized variants (last phase)")
    parser.add_argument("--kernels", default="cuda,triton",
                        help="comma list of kernel families to time: cuda (the Hopper kernel), triton")
    parser.add_argument("--parts", default="chunk,prefix",
                        help="comma list: chunk (part 1, one chunk vs the competitors), prefix (part 2, shared prefix)")
    parser.add_argument("--rounds", type=int, default=3, help="shared prefix: rounds of timing the three schedules in turn")
    args = parser.parse_args()
    if args.smoke:
        configure_smoke()
    elif not torch.cuda.is_available():
        sys.exit("bench_attention needs a CUDA GPU (or --smoke)")
    torch.manual_seed(0)
    families = set(args.kernels.split(","))
    triton_variants = VARIANTS if "triton" in families else {}
    plain = {**(CUDA_VARIANTS if "cuda" in families else {}),
             **{n: c for n, c in triton_variants.items() if not c.warp_specialize}}
    ws = {n: c for n, c in triton_variants.items() if c.warp_specialize}
    columns = ["Lq", "Lk", "ours_tflops", "ours_variant", "ours_split", "ours_default_tflops", "cudnn_tflops",
               "fa3_tflops", "flash2_sdpa_tflops", "flex_compiled_tflops", "best_competitor", "ratio"]
    parts = set(args.parts.split(","))
    chunk_rows = bench_chunk(args, plain) if "chunk" in parts else []
    print_table(chunk_rows, columns)
    prefix_rows = bench_shared_prefix(args) if "prefix" in parts else []
    print_table(prefix_rows, ["G", "prefix_frames", "alone_ms", "batched_ms", "shared_ms", "batched_vs_alone",
                              "speedup_vs_alone", "speedup_vs_batched", "shared_tflops", "max_diff_shared_vs_batched"])
    settings = {"Lq": LQ, "Lk": LKS, "heads": HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16", "page_size": PAGE,
                "tflops_formula": "4*Lq*Lk*H*D/time", "timing": "triton.testing.do_bench median, L2 flushed",
                "variants": {n: str(c) for n, c in {**CUDA_VARIANTS, **VARIANTS}.items()}, "ws_phase": "pending",
                "kernels": sorted(families)}
    # a partial run writes its own file, so it never replaces the full result
    name = "attention" if parts >= {"chunk", "prefix"} else "attention_" + "_".join(sorted(parts))
    if not SMOKE:  # written before the experimental phase, so a failure there loses nothing
        write_result(name, settings, chunk_rows, {"shared_prefix": prefix_rows})
    if ws and not args.no_ws and "chunk" in parts:
        print("warp-specialized variants (experimental on Hopper):", ", ".join(ws), file=sys.stderr)
        bench_chunk(args, ws, chunk_rows)
        print_table(chunk_rows, columns)
        settings["ws_phase"] = "done"
        if not SMOKE:
            write_result(name, settings, chunk_rows, {"shared_prefix": prefix_rows})


if __name__ == "__main__":
    main()
