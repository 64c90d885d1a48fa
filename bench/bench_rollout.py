"""GRPO rollout benchmark of spiral_rt.rollout (issue 7 item 5): Wan2.1-1.3B config, random weights,
832x480 (latents 60x104), 7 chunks (21 latent frames, 81 video frames), K = 1 plan, G = 8 members (and
4, 16), fork after chunk 2, every member decoded by the streaming VAE, FlowGRPO steps with every
stochastic transition after the fork recorded (x, x', mu, log-prob).

Three schedules on our own engine, same spec, same noise keys:
  batched      prefix once, KV pages forked G ways (shared, refcounted), the G members in one batch
               per denoising step (``RolloutRunner`` default);
  prefix_once  prefix once, then each member alone on its own fork of the prefix (TempAct's public
               schedule: cache cloned per member, members one at a time);
  naive        every member from scratch, alone.

Reported per (G, schedule): videos per second (median over --repeats rollouts after --warmup, wall
clock with a device sync at the end: generation, decode, recording and the move of frames and
records to the host), peak device memory (allocator), peak KV pages in use and their bytes
(``one prefix + G suffixes`` for batched), and the speed-ups over prefix_once and naive and over
Self-Forcing's published per-video rate (16.5 FPS = 0.204 videos of 81 frames per second).
``--critic`` also scores every member with a cheap brightness critic on worker threads. ``--stages``
also times one more batched rollout per G by engine stage (the denoising steps, the clean pass, the
VAE decode on its side stream, planning, text), on an engine with timing on, outside the timed rows.

``--smoke`` runs the same code on the CPU with a tiny model (writes rollout_smoke.json instead of
rollout.json).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stream import free  # noqa: E402
from common import PROMPT_TOKENS, print_table, prompt_embedding, write_result  # noqa: E402

from spiral_rt.agents.types import Verdict  # noqa: E402
from spiral_rt.engine import Engine, EngineConfig  # noqa: E402
from spiral_rt.models.config import tiny_test, wan21_t2v_1_3b  # noqa: E402
from spiral_rt.models.dit import build_dit  # noqa: E402
from spiral_rt.models.vae import build_vae_decoder, tiny_vae, wan21_vae  # noqa: E402
from spiral_rt.rollout import RolloutRunner, RolloutSpec  # noqa: E402
from spiral_rt.sampling import FlowGRPOStep  # noqa: E402

SELF_FORCING_VIDEOS_PER_S = 16.5 / 81  # Self-Forcing's 16.5 FPS on one H100, per 81-frame video
SCHEDULES = ("batched", "prefix_once", "naive")


class BrightnessCritic:
    """A cheap CriticAgent: score = mean brightness (exercises the asynchronous scoring path)."""

    def judge(self, frames: np.ndarray, step, memory) -> Verdict:
        return Verdict(score=float(frames.mean()) / 255.0, completed=True)


def make_engine(model, vae, args, group_size: int, schedule: str, timing: bool = False) -> Engine:
    frames = args.chunks * 3
    prefix = args.fork * 3
    need = {"batched": prefix + group_size * (frames - prefix), "prefix_once": frames, "naive": frames}[schedule]
    cfg = EngineConfig(latent_size=args.latent_hw, chunk_frames=3, output="uint8", latent_dtype=torch.float32,
                       kv_num_pages=need + 3, max_batch_size=max(group_size, 1), device=args.device,
                       cuda_graphs=False, vae_side_stream=args.vae_stream == "side", timing=timing)
    return Engine(model, vae, cfg)


def stage_times(model, vae, args, group_size: int, spec, critic, emb) -> list[dict]:
    """One batched rollout (after one warm-up) on an engine with stage timing: per stage, its count
    and total milliseconds in that rollout and its share of their sum (the VAE runs on its own stream,
    so the sum can exceed the wall time)."""
    engine = make_engine(model, vae, args, group_size, "batched", timing=True)
    runner = RolloutRunner(engine, critic, prompt_embeddings=emb)
    runner.run(spec, schedule="batched")
    engine.stage_times(reset=True)
    wall_ms = 1e3 * runner.run(spec, schedule="batched").stats["seconds"]
    stages = engine.stage_times()
    free(engine)
    total = sum(v["total_ms"] for v in stages.values()) or 1.0
    rows = [{"group_size": group_size, "stage": k, "count": v["count"], "total_ms": round(v["total_ms"], 3),
             "share": round(v["total_ms"] / total, 4)} for k, v in stages.items()]
    # the rollout's wall time (stage timing adds an event pair per stage), against which the stages'
    # sum shows how much of it the GPU spent outside any timed stage
    return rows + [{"group_size": group_size, "stage": "wall (timed rollout)", "count": 1, "total_ms": round(wall_ms, 3),
                    "share": round(wall_ms / total, 4)}]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (checks that the script runs)")
    ap.add_argument("--groups", default="4,8,16", help="group sizes G")
    ap.add_argument("--schedules", default=",".join(SCHEDULES), help="schedules to run")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up rollouts per configuration")
    ap.add_argument("--repeats", type=int, default=2, help="timed rollouts per configuration")
    ap.add_argument("--critic", action="store_true", help="score members with a brightness critic (thread pool)")
    ap.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS,
                    help="tokens per prompt (the rest of the 512 text rows are Wan's zero padding)")
    ap.add_argument("--vae-stream", choices=("side", "main"), default="side",
                    help="decode on a second CUDA stream, overlapped with the DiT (the engine's default), or on the DiT's stream")
    ap.add_argument("--stages", action="store_true", help="also time one batched rollout per G by engine stage")
    ap.add_argument("--name", default=None, help="result name (bench/results/<name>.json); default rollout / rollout_smoke")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    groups = [int(g) for g in args.groups.split(",")]
    schedules = [s for s in args.schedules.split(",") if s]
    for s in schedules:
        if s not in SCHEDULES:
            ap.error(f"--schedules: {s!r} is not one of {SCHEDULES}")
    args.chunks, args.fork = 7, 2
    if args.smoke:
        args.device, args.latent_hw = "cpu", (4, 6)
        args.chunks, args.fork = 4, 1
        args.warmup, args.repeats = 0, 1
        groups = [g for g in groups if g <= 4] or [2]
        torch.set_num_threads(1)
        dcfg = tiny_test(num_layers=2, dim=128, num_heads=2, ffn_dim=256, text_dim=64, freq_dim=32, in_channels=16)
        dtype, vcfg, text_len = torch.float32, tiny_vae(base_dim=8), 16
        name = "rollout_smoke"
    else:
        if not torch.cuda.is_available():
            ap.error("needs a CUDA GPU (or --smoke)")
        args.device, args.latent_hw = "cuda", (60, 104)
        dcfg, dtype, vcfg, text_len = wan21_t2v_1_3b(), torch.bfloat16, wan21_vae(), 512
        name = "rollout"
    torch.manual_seed(0)
    model = build_dit(dcfg, device=args.device, dtype=dtype)
    vae = build_vae_decoder(vcfg, device=args.device, dtype=dtype)
    prompt = "a robot arm picks up a red cube"
    emb = {prompt: prompt_embedding(min(args.prompt_tokens, text_len), dcfg.text_dim, args.device, dtype)}
    critic = BrightnessCritic() if args.critic else None
    rows, stage_rows = [], []
    with torch.inference_mode():
        for g in groups:
            spec = RolloutSpec(goals=["pick up the red cube"], plans=[[[prompt]]], num_plans=1, group_size=g,
                               num_chunks=args.chunks, fork_chunk=args.fork, step_policy=FlowGRPOStep(),
                               noise="independent", keep_frames=False, progress=False, critic_workers=4)
            for schedule in schedules:
                engine = make_engine(model, vae, args, g, schedule)
                runner = RolloutRunner(engine, critic, prompt_embeddings=emb)
                for _ in range(args.warmup):
                    runner.run(spec, schedule=schedule)
                sync()
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                stats = [runner.run(spec, schedule=schedule).stats for _ in range(args.repeats)]
                peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
                seconds = statistics.median(s["seconds"] for s in stats)
                rows.append({
                    "group_size": g, "schedule": schedule, "videos": g, "seconds": seconds, "videos_per_s": g / seconds,
                    "fps": g * (1 + 4 * (args.chunks * 3 - 1)) / seconds, "peak_gib": peak,
                    "peak_kv_pages": stats[0]["peak_kv_pages"], "peak_kv_gib": stats[0]["peak_kv_bytes"] / 2**30,
                    "kv_pool_gib": engine.cache.num_pages * engine.cache.config.page_bytes / 2**30,
                    "engine_steps": stats[0]["engine_steps"],
                })
                free(engine)
                del runner, engine
            if args.stages and "batched" in schedules:
                stage_rows += stage_times(model, vae, args, g, spec, critic, emb)
    by = {(r["group_size"], r["schedule"]): r for r in rows}
    for r in rows:
        base = by.get((r["group_size"], "prefix_once"))
        naive = by.get((r["group_size"], "naive"))
        r["x_prefix_once"] = r["videos_per_s"] / base["videos_per_s"] if base else float("nan")
        r["x_naive"] = r["videos_per_s"] / naive["videos_per_s"] if naive else float("nan")
        r["x_self_forcing"] = r["videos_per_s"] / SELF_FORCING_VIDEOS_PER_S if not args.smoke else float("nan")
        frames_per_video = args.chunks * 3
        r["kv_bound_pages"] = args.fork * 3 + r["group_size"] * (frames_per_video - args.fork * 3)
    print_table(rows, ["group_size", "schedule", "videos_per_s", "fps", "peak_gib", "peak_kv_pages", "kv_bound_pages",
                       "peak_kv_gib", "x_prefix_once", "x_naive", "x_self_forcing"])
    settings = {"model": dcfg.name, "latent_hw": list(args.latent_hw), "chunks": args.chunks, "fork_chunk": args.fork,
                "num_plans": 1, "groups": groups, "steps": 4, "step_policy": "flow_grpo", "recorded": "every stochastic step after the fork",
                "decode": "every member, streaming VAE", "vae_stream": args.vae_stream, "dtype": str(dtype).replace("torch.", ""),
                "critic": args.critic, "warmup": args.warmup, "repeats": args.repeats, "smoke": args.smoke,
                "prompt_tokens": min(args.prompt_tokens, text_len),
                "self_forcing_videos_per_s": SELF_FORCING_VIDEOS_PER_S}
    extra = None
    if stage_rows:
        print_table(stage_rows, ["group_size", "stage", "count", "total_ms", "share"])
        extra = {"stages_batched": stage_rows}
    write_result(args.name or name, settings, rows, extra)


if __name__ == "__main__":
    main()
