"""Streaming benchmark of spiral_rt.engine (issue 5, DESIGN §4): Wan2.1-1.3B config, random weights,
832x480 (latents 60x104), Self-Forcing's 4 steps + the clean pass, bf16, text embeddings precomputed
(``--prompt-tokens`` random rows, zero-padded to 512 by the DiT as Wan does).

Parts (``--parts a,b,c``):
  a  81 frames (21 latent frames, global cache): end-to-end FPS incl. streaming VAE decode, time to
     the first decoded frames, DiT-only FPS (output="latents"), peak memory, per-stage breakdown,
     fraction of the roofline (1.6 s for 81 frames, DESIGN §4);
  b  LongLive: its ``local_attn_size`` 12 with ``sink_size`` 3, i.e. each chunk attends to 12 latent
     frames: the 3 sink frames, the 6 most recent context frames and its own 3
     (``SinkWindowPolicy.from_local_attn(12, 3, 3)``; ``--long-policy`` S,W sets sink and window
     directly), 477 frames (40 chunks), a prompt switch every 120 frames (10 chunks), with LongLive's
     KV re-cache of the visible frames and without (``--recache``): FPS, stall per switch (switch
     chunk minus the median chunk), peak memory after 81 frames vs after 477 frames;
  c  1, 2, 4, 8 concurrent streams of 81 frames batched by Engine.step(): aggregate FPS and
     per-stream chunk latency;
  f  (not in the default parts) FP8 linears (``spiral_rt.models.fp8``): part (a)'s FPS with the DiT's
     block linears in e4m3, and the PSNR of the decoded frames against bf16 on the same noise. It
     converts the model in place, so it runs after every other part.

Timing: CUDA events around each engine step (the decoded frames' stream dependency included), after
warm-up videos (with --graphs the first video runs eagerly, the second captures, later ones replay);
medians over --repeats videos. ``--smoke`` runs every part on the CPU with a tiny model so the script
is known to run; it writes bench/results/stream_smoke.json instead of stream.json.
``--profile PATH`` writes a torch.profiler trace of one part-(a) video.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROMPT_TOKENS, print_table, prompt_embedding, write_result  # noqa: E402

from spiral_rt.cache import GlobalPolicy, SinkWindowPolicy  # noqa: E402
from spiral_rt.engine import Engine, EngineConfig, PromptSpan  # noqa: E402
from spiral_rt.models.config import tiny_test, wan21_t2v_1_3b  # noqa: E402
from spiral_rt.ops import dispatch  # noqa: E402
from spiral_rt.ops.chunk_attention import cuda_unavailable_reason  # noqa: E402
from spiral_rt.models.dit import build_dit  # noqa: E402
from spiral_rt.models.vae import build_vae_decoder, tiny_vae, wan21_vae  # noqa: E402

ROOFLINE_81_S = 1.6  # DESIGN §4: 81 frames end to end on the H100
CHUNK_FRAMES = 3  # latent frames per chunk (Self-Forcing / LongLive)


class Clock:
    """CUDA events on the GPU (read after one sync), perf_counter on the CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b)
        return (b - a) * 1e3


def video_frames(latent_frames: int) -> int:
    return 1 + 4 * (latent_frames - 1)


def run_video(engine, clock, num_chunks, prompts, seed=0):
    """One stream: returns per-chunk ms (chunk i = step i incl. its frames), total ms, and video frames."""
    s = engine.open_session(prompts, seed=seed, max_chunks=num_chunks)
    marks = [clock.mark()]
    frames = 0
    for _ in range(num_chunks):
        out = engine.step([s])[s.session_id]
        f = out.frames
        frames += f.shape[0] if f is not None else 0
        marks.append(clock.mark())
    per = [clock.ms(marks[i], marks[i + 1]) for i in range(num_chunks)]
    total = clock.ms(marks[0], marks[-1])
    s.close()
    return per, total, frames


def run_streams(engine, clock, num_streams, num_chunks, prompts):
    sessions = [engine.open_session(prompts, seed=i, max_chunks=num_chunks) for i in range(num_streams)]
    marks = [clock.mark()]
    for _ in range(num_chunks):
        outs = engine.step(sessions)
        for o in outs.values():
            o.frames
        marks.append(clock.mark())
    per = [clock.ms(marks[i], marks[i + 1]) for i in range(num_chunks)]
    total = clock.ms(marks[0], marks[-1])
    for s in sessions:
        s.close()
    return per, total


def make_engine(model, vae, args, *, policy, output="uint8", timing=False, kv_frames=None, recache=False):
    cfg = EngineConfig(
        latent_size=args.latent_hw, chunk_frames=CHUNK_FRAMES, policy=policy, output=output, timing=timing,
        cuda_graphs=args.graphs, vae_side_stream=args.vae_stream == "side", recache_on_switch=recache, latent_dtype=torch.float32,
        kv_num_pages=kv_frames, device=args.device, max_batch_size=8,
    )
    return Engine(model, vae, cfg)


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def reset_peak():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def free(*objs):
    """Close engines and return their GPU memory (the caller must drop its own references: ``del``)."""
    for o in objs:
        if o is not None:
            o.close()
    objs = o = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def part_a(model, vae, args, clock, prompt, rows, extra):
    n = args.chunks_81
    latent = n * 3
    eng = make_engine(model, vae, args, policy=GlobalPolicy(), kv_frames=latent + 3)
    for _ in range(args.warmup):
        run_video(eng, clock, n, prompt)
    reset_peak()
    runs = [run_video(eng, clock, n, prompt) for _ in range(args.repeats)]
    peak = peak_gib()
    totals = sorted(r[1] for r in runs)
    frames = runs[0][2]
    med = statistics.median(totals)
    ttff = statistics.median(r[0][0] for r in runs)
    if args.profile:
        with eng.profile(args.profile):
            run_video(eng, clock, n, prompt)
    free(eng)
    del eng
    timed = make_engine(model, vae, args, policy=GlobalPolicy(), kv_frames=latent + 3, timing=True)
    for _ in range(args.warmup):
        run_video(timed, clock, n, prompt)
    timed.stage_times(reset=True)
    run_video(timed, clock, n, prompt)
    stages = timed.stage_times()
    free(timed)
    del timed
    dit = make_engine(model, None, args, policy=GlobalPolicy(), output="latents", kv_frames=latent + 3)
    for _ in range(args.warmup):
        run_video(dit, clock, n, prompt)
    dit_ms = statistics.median(run_video(dit, clock, n, prompt)[1] for _ in range(args.repeats))
    free(dit)
    del dit
    row = {
        "part": "a", "setting": f"{frames} frames, global cache", "fps": frames / (med / 1e3),
        "fps_p20": frames / (totals[int(0.8 * (len(totals) - 1))] / 1e3), "fps_p80": frames / (totals[int(0.2 * (len(totals) - 1))] / 1e3),
        "first_frames_ms": ttff, "dit_fps": frames / (dit_ms / 1e3), "peak_gib": peak,
        "roofline_fraction": (ROOFLINE_81_S * 1e3 / med) if not args.smoke else float("nan"),
    }
    rows.append(row)
    extra["stages_81"] = {k: {"count": v["count"], "total_ms": round(v["total_ms"], 3), "median_ms": round(v["median_ms"], 3)}
                          for k, v in stages.items()}
    print_table([{"stage": k, **{kk: (round(vv, 3) if isinstance(vv, float) else vv) for kk, vv in v.items()}}
                 for k, v in extra["stages_81"].items()], ["stage", "count", "total_ms", "median_ms"])


def part_b(model, vae, args, clock, prompts, rows, extra):
    for recache in {"on": (True,), "off": (False,), "both": (True, False)}[args.recache]:
        _part_b(model, vae, args, clock, prompts, rows, extra, recache)


def _part_b(model, vae, args, clock, prompts, rows, extra, recache: bool):
    n, every = args.chunks_long, args.switch_every
    pol = args.long_policy
    sink, window = pol.sink_frames, pol.window_frames
    spans = []
    for i in range(0, n, every):
        spans.append(PromptSpan(prompts[(i // every) % len(prompts)], min(every, n - i)))
    eng = make_engine(model, vae, args, policy=pol, kv_frames=sink + window + 6, recache=recache)
    warm = spans[:2] if len(spans) > 1 else spans
    for _ in range(args.warmup):
        run_video(eng, clock, min(n, 2 * every), warm)
    reset_peak()
    s = eng.open_session(spans, max_chunks=n)
    marks = [clock.mark()]
    frames, peak_81 = 0, None
    for c in range(n):
        out = eng.step([s])[s.session_id]
        frames += out.frames.shape[0]
        marks.append(clock.mark())
        if c == args.chunks_81 - 1 and torch.cuda.is_available():
            torch.cuda.synchronize()
            peak_81 = peak_gib()
    per = [clock.ms(marks[i], marks[i + 1]) for i in range(n)]
    total = clock.ms(marks[0], marks[-1])
    peak_end = peak_gib()
    s.close()
    free(eng)
    del eng, s
    switch_chunks = list(range(every, n, every))
    steady = statistics.median(p for i, p in enumerate(per) if i not in switch_chunks and i > 0)
    stalls = [per[i] - steady for i in switch_chunks]
    rows.append({
        "part": "b", "setting": f"{frames} frames, sink {sink} + window {window} + chunk {CHUNK_FRAMES} frames attended, "
                                f"switch every {every} chunks, "
                                f"{'LongLive re-cache' if recache else 'no re-cache'}",
        "fps": frames / (total / 1e3), "chunk_ms": steady, "stall_ms": statistics.median(stalls) if stalls else float("nan"),
        "stall_max_ms": max(stalls) if stalls else float("nan"),
        "peak_gib_81": peak_81 if peak_81 is not None else float("nan"), "peak_gib": peak_end,
    })
    extra["long_chunk_ms" + ("" if recache else "_no_recache")] = [round(p, 3) for p in per]


def part_c(model, vae, args, clock, prompt, rows, extra):
    n = args.chunks_81
    for streams in args.streams:
        if args.streams_policy == "global":  # every stream keeps all its frames (8 x 81 frames: ~51 GiB of K/V)
            policy, kv_frames = GlobalPolicy(), streams * (n * 3 + 3)
        else:  # LongLive's span: constant K/V per stream
            pol = args.long_policy
            policy, kv_frames = pol, streams * (pol.sink_frames + pol.window_frames + 6)
        eng = make_engine(model, vae, args, policy=policy, kv_frames=kv_frames)
        for _ in range(args.warmup):
            run_streams(eng, clock, streams, n, prompt)
        runs = [run_streams(eng, clock, streams, n, prompt) for _ in range(args.repeats)]
        free(eng)
        del eng
        total = statistics.median(r[1] for r in runs)
        per_chunk = statistics.median(p for r in runs for p in r[0])
        frames = video_frames(n * 3) * streams
        rows.append({"part": "c", "setting": f"{streams} stream(s) x {video_frames(n * 3)} frames, {args.streams_policy} cache",
                     "streams": streams,
                     "fps": frames / (total / 1e3), "per_stream_fps": frames / streams / (total / 1e3),
                     "chunk_latency_ms": per_chunk, "first_frames_ms": statistics.median(r[0][0] for r in runs)})


def part_f(model, vae, args, clock, prompt, rows, extra):
    from spiral_rt.models.fp8 import apply_fp8_linears

    n = args.chunks_81
    kv = n * 3 + 3

    def frames_of(engine):  # one video, fixed seed and noise id: the same noise in both runs
        s = engine.open_session(prompt, seed=0, noise_id=0, max_chunks=n)
        out = [engine.step([s])[s.session_id].frames for _ in range(n)]
        s.close()
        return torch.cat(out).float()

    eng = make_engine(model, vae, args, policy=GlobalPolicy(), kv_frames=kv)
    ref = frames_of(eng)
    free(eng)
    del eng
    swapped = apply_fp8_linears(model)
    eng = make_engine(model, vae, args, policy=GlobalPolicy(), kv_frames=kv)
    for _ in range(args.warmup):
        run_video(eng, clock, n, prompt)
    runs = [run_video(eng, clock, n, prompt) for _ in range(args.repeats)]
    got = frames_of(eng)
    free(eng)
    del eng
    mse = float(((got - ref) ** 2).mean())
    med = statistics.median(r[1] for r in runs)
    rows.append({"part": "f", "setting": f"{runs[0][2]} frames, global cache, FP8 linears ({len(swapped)})",
                 "fps": runs[0][2] / (med / 1e3),
                 "psnr_db": 10 * math.log10(255.0**2 / mse) if mse > 0 else float("inf")})


def attention_kernel(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """Which chunk_attention kernel the engine's automatic backend choice runs here."""
    if device.type != "cuda":
        return "reference"
    forced = dispatch.requested_backend("chunk_attention")
    if forced is not None:
        return forced
    return "cuda" if cuda_unavailable_reason(head_dim, dtype, 1560, device) is None else "triton"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (checks that the script runs)")
    ap.add_argument("--parts", default="a,b,c", help="comma-separated parts to run (a, b, c; f: FP8, converts the model)")
    ap.add_argument("--no-graphs", dest="graphs", action="store_false", help="run eagerly (no CUDA graphs)")
    ap.add_argument("--vae-stream", choices=("side", "main"), default="side",
                    help="decode each chunk on a second CUDA stream, overlapped with the next chunk's DiT work (the "
                         "engine's default), or on the DiT's stream after it")
    ap.add_argument("--recache", choices=("on", "off", "both"), default="both",
                    help="part b: prompt switches with LongLive's re-cache of the window, without, or both")
    ap.add_argument("--warmup", type=int, default=2,
                    help="warm-up videos per configuration (>= 2 with CUDA graphs: a context length's graph is captured "
                         "the second time it is met, so with 1 the first timed video captures)")
    ap.add_argument("--repeats", type=int, default=3, help="timed videos per configuration")
    ap.add_argument("--streams", default="1,2,4,8", help="stream counts of part c")
    ap.add_argument("--streams-policy", choices=("global", "longlive"), default="global",
                    help="part c's cache: every frame kept (as part a; 8 streams need more than an 80 GB H100), or "
                         "--long-policy's sink + window (constant memory per stream)")
    ap.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS,
                    help="tokens per prompt (the rest of the 512 text rows are Wan's zero padding)")
    ap.add_argument("--name", default=None, help="result name (bench/results/<name>.json); default stream / stream_smoke")
    ap.add_argument("--profile", default=None, help="write a torch.profiler trace of one part-a video here")
    ap.add_argument("--long-policy", default=None, metavar="SINK,WINDOW",
                    help="part b: sink and window context frames (default: LongLive's local_attn_size 12, sink 3)")
    args = ap.parse_args(argv)
    if args.graphs and not args.smoke and args.warmup < 2:
        logging.warning("--warmup %d < 2 with CUDA graphs: the first timed video captures graphs (slower)", args.warmup)
    if args.long_policy:
        try:
            sink, window = (int(v) for v in args.long_policy.split(","))
            args.long_policy = SinkWindowPolicy(sink_frames=sink, window_frames=window)
        except ValueError as err:
            ap.error(f"--long-policy: expected SINK,WINDOW frame counts, got {args.long_policy!r} ({err})")
    else:
        args.long_policy = SinkWindowPolicy.from_local_attn(12, 3, CHUNK_FRAMES)
    logging.basicConfig(level=logging.WARNING)
    args.streams = [int(s) for s in args.streams.split(",")]
    parts = set(args.parts.split(","))
    if parts - {"a", "b", "c", "f"}:
        ap.error(f"--parts: unknown part(s) {sorted(parts - {'a', 'b', 'c', 'f'})}; choose from a, b, c, f")
    if args.smoke:
        args.device = "cpu"
        args.latent_hw = (4, 6)
        args.chunks_81, args.chunks_long, args.switch_every = 3, 8, 3
        args.warmup, args.repeats = 1, 1
        args.streams = [s for s in args.streams if s <= 2]
        args.graphs = False
        dcfg = tiny_test(num_layers=2, dim=128, num_heads=2, ffn_dim=256, text_dim=64, freq_dim=32, in_channels=16)
        dtype, vcfg, text_len = torch.float32, tiny_vae(base_dim=8), 16
        name = "stream_smoke"
    else:
        if not torch.cuda.is_available():
            ap.error("needs a CUDA GPU (or --smoke)")
        args.device = "cuda"
        args.latent_hw = (60, 104)
        args.chunks_81, args.chunks_long, args.switch_every = 7, 40, 10
        dcfg, dtype, vcfg, text_len = wan21_t2v_1_3b(), torch.bfloat16, wan21_vae(), 512
        name = "stream"
    torch.manual_seed(0)
    model = build_dit(dcfg, device=args.device, dtype=dtype)
    vae = build_vae_decoder(vcfg, device=args.device, dtype=dtype)
    prompts = [prompt_embedding(min(args.prompt_tokens, text_len), dcfg.text_dim, args.device, dtype) for _ in range(2)]
    clock = Clock(args.device == "cuda")
    rows, extra = [], {}
    settings = {"model": dcfg.name, "latent_hw": list(args.latent_hw), "steps": 4, "clean_pass": True,
                "dtype": str(dtype).replace("torch.", ""), "cuda_graphs": args.graphs, "vae_stream": args.vae_stream, "warmup": args.warmup,
                "repeats": args.repeats, "prompt_tokens": min(args.prompt_tokens, text_len), "parts": sorted(parts), "smoke": args.smoke, "streams_policy": args.streams_policy,
                "attention_kernel": attention_kernel(torch.device(args.device), dtype, dcfg.head_dim)}
    columns = ["part", "setting", "fps", "psnr_db", "first_frames_ms", "dit_fps", "chunk_ms", "stall_ms", "peak_gib_81",
               "peak_gib", "chunk_latency_ms", "per_stream_fps", "roofline_fraction"]
    runners = {"a": lambda: part_a(model, vae, args, clock, prompts[0], rows, extra),
               "b": lambda: part_b(model, vae, args, clock, prompts, rows, extra),
               "c": lambda: part_c(model, vae, args, clock, prompts[0], rows, extra),
               "f": lambda: part_f(model, vae, args, clock, prompts[0], rows, extra)}
    failed = []
    with torch.inference_mode():
        for part in sorted(parts):
            try:
                runners[part]()
            except Exception as exc:  # one part's failure (e.g. out of memory) must not lose the others' numbers
                logging.exception("part %s failed", part)
                failed.append(part)
                extra.setdefault("errors", {})[part] = f"{type(exc).__name__}: {str(exc)[:300]}"
                free()
            print_table(rows, columns)
            write_result(args.name or name, settings, rows, extra)  # after every part: partial runs keep their rows
    if failed:
        raise SystemExit(f"parts failed: {failed}")


if __name__ == "__main__":
    main()
