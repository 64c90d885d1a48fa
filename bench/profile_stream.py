"""Kernel-level breakdown of one streamed video: where the GPU time of a chunk goes.

Builds the bench_stream part-(a) setting (Wan2.1-1.3B config, random weights, 832x480, 4 steps + the
clean pass, bf16, global cache), runs --warmup videos, then profiles one video with torch.profiler
and prints the CUDA kernels grouped by name and stream, sorted by total GPU time, with their share
of the video's kernel time (what to optimise first) and the part of their time another stream's
kernels ran beside them (with the VAE on its side stream, those runs share the SMs, so they are
slower than alone: profile with --no-vae for the DiT kernels' own speed). Eager by default
(graphs hide the kernel names from the profiler's CPU side, not from its GPU side; --graphs
profiles the replayed path).
Then the kernels with the most idle time of their stream just before them (the boundaries between
kernels) and, with ``--sources PATTERN`` (eager runs), the CPU ops that launched the matching ones.
``--trace PATH`` also writes the Chrome trace (large: keep it off the device's return limit).

    python bench/profile_stream.py [--frames 81] [--no-vae] [--graphs] [--top 30] [--sources Memset] [--name profile_stream]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROMPT_TOKENS, prompt_embedding, write_result  # noqa: E402

from spiral_rt.cache import GlobalPolicy  # noqa: E402
from spiral_rt.engine import Engine, EngineConfig  # noqa: E402
from spiral_rt.engine.profiling import idle_before, kernel_timeline, launch_sources, stream_overlap  # noqa: E402
from spiral_rt.models.config import wan21_t2v_1_3b  # noqa: E402
from spiral_rt.models.dit import build_dit  # noqa: E402
from spiral_rt.models.vae import build_vae_decoder, wan21_vae  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=81, help="video frames (12k - 3)")
    ap.add_argument("--warmup", type=int, default=2, help="videos before the profiled one")
    ap.add_argument("--graphs", action="store_true", help="profile the CUDA-graph path")
    ap.add_argument("--no-vae", action="store_true", help="latents only (DiT work alone)")
    ap.add_argument("--top", type=int, default=30, help="kernels listed")
    ap.add_argument("--trace", default=None, help="also write a Chrome trace here")
    ap.add_argument("--sources", default=None, metavar="PATTERN",
                    help="name the CPU ops that launched the kernels matching PATTERN (e.g. Memset; eager runs only)")
    ap.add_argument("--name", default="profile_stream", help="result name (bench/results/<name>.json)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    # chunks of 3 latent frames: the first decodes to 1 + 4 * 2 = 9 frames, each later one to 12
    if args.frames < 9 or (args.frames + 3) % 12:
        ap.error("--frames must be 12k - 3 (k chunks of 3 latent frames: 9, 21, ..., 81)")
    chunks = (args.frames + 3) // 12
    torch.manual_seed(0)
    dcfg = wan21_t2v_1_3b()
    model = build_dit(dcfg, device="cuda", dtype=torch.bfloat16)
    vae = None if args.no_vae else build_vae_decoder(wan21_vae(), device="cuda", dtype=torch.bfloat16)
    cfg = EngineConfig(latent_size=(60, 104), chunk_frames=3, policy=GlobalPolicy(), output="latents" if args.no_vae else "uint8",
                       cuda_graphs=args.graphs, vae_side_stream=True, latent_dtype=torch.float32,
                       kv_num_pages=chunks * 3 + 3, device="cuda", max_batch_size=1)
    engine = Engine(model, vae, cfg)
    prompt = prompt_embedding(PROMPT_TOKENS, dcfg.text_dim, "cuda", torch.bfloat16)

    def video():
        s = engine.open_session(prompt, seed=0, max_chunks=chunks)
        for _ in range(chunks):
            engine.step([s])
        torch.cuda.synchronize()
        s.close()

    with torch.inference_mode():
        for _ in range(args.warmup):
            video()
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            video()
    if args.trace:
        prof.export_chrome_trace(args.trace)
    runs = kernel_timeline(prof)
    timeline = stream_overlap(runs)
    kernels = sorted(timeline["kernels"].items(), key=lambda kv: kv[1]["total_ms"], reverse=True)
    total = sum(r["total_ms"] for _, r in kernels)
    rows = []
    print(f"{'kernel':80s} {'stream':>6s} {'calls':>6s} {'total_ms':>9s} {'share':>6s} {'beside':>6s}")
    for (name, stream), r in kernels[: args.top]:
        row = {"kernel": name[:120], "stream": stream, "calls": r["calls"], "total_ms": r["total_ms"],
               "share": r["total_ms"] / total, "concurrent_ms": r["concurrent_ms"]}
        rows.append(row)
        print(f"{name[:80]:80s} {stream:6d} {r['calls']:6d} {r['total_ms']:9.2f} {row['share']:6.1%} "
              f"{r['concurrent_ms'] / r['total_ms']:6.1%}")
    print(f"kernel time of one {args.frames}-frame video: {total:.1f} ms over {chunks} chunks, "
          f"{timeline['span_ms']:.1f} ms from the first kernel to the last")
    for stream, st in timeline["streams"].items():
        print(f"  stream {stream}: busy {st['busy_ms']:.1f} ms ({st['kernels']} runs), of which "
              f"{st['concurrent_ms']:.1f} ms beside another stream's kernels")
    idle = sorted(idle_before(runs).items(), key=lambda kv: -kv[1]["idle_ms"])
    print(f"idle time of a stream just before a kernel (boundaries < 20 us; {sum(r['idle_ms'] for _, r in idle):.1f} ms):")
    for name, r in idle[:8]:
        print(f"  {name[:80]:80s} {r['calls']:6d} runs {r['idle_ms']:8.2f} ms, {r['stalls']} after a stall")
    sources = launch_sources(prof, args.sources) if args.sources else {}
    for chain, n in list(sources.items())[:10]:
        print(f"  {n:6d} x {args.sources!r} launched by {chain[-160:]}")
    write_result(args.name, {"frames": args.frames, "graphs": args.graphs, "vae": not args.no_vae,
                             "model": dcfg.name, "latent_hw": [60, 104], "prompt_tokens": PROMPT_TOKENS},
                 rows, extra={"kernel_ms_total": total, "span_ms": timeline["span_ms"],
                              "streams": {str(k): v for k, v in timeline["streams"].items()},
                              "idle_before": {name[:120]: r for name, r in idle[:20]},
                              "sources": {args.sources: sources} if args.sources else {}})


if __name__ == "__main__":
    main()
