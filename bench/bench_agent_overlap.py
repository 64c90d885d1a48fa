"""Closed-loop wall time against open-loop generation of the same chunks (how well agent latency is hidden).

A plan of ``--steps`` steps of ``--span-chunks`` chunks each is generated three ways:
- open loop: the generator runs the step prompts back to back, no critic;
- closed loop: ``ClosedLoop`` with a fixed-latency critic (a sleep; ``--critic-ms``, default 200 and
  1000 ms) that accepts everything, speculation on: segment n+1 is generated while n is judged;
- closed loop without speculation: generate, wait for the verdict, generate (the serial baseline).
With no rejections the closed loop generates exactly the open loop's chunks, so the ratio
closed / open is the cost of the critic that speculation could not hide: at best one critic
latency at the very end (the last segment's verdict must be in before the video is final), and
more whenever a critic call outlasts the next segment's generation.

The generator is ``FakeGenerator`` sleeping ``--fake-generator-ms`` per chunk (default 360 ms: a
12-frame chunk at 33 FPS, the engine's target on the H100) unless ``--engine`` names a real engine
(``wan-1.3b``: Wan2.1-1.3B config, random weights, 832x480, bf16, CUDA graphs, the full VAE, window 12 + sink 3, hashed
prompts; ``tiny``: a CPU-sized one) driven through ``EngineGenerator``, or ``--generator
MODULE:CALLABLE`` names a factory returning a ``spiral_rt.agents.protocols.Generator``. The engine is
built once; every run opens a fresh session on it. Each configuration runs ``--repeats`` times; the
table shows medians, the JSON has median, p20 and p80.

    python bench/bench_agent_overlap.py [--fake-generator-ms 360] [--critic-ms 200 1000] [--steps 10]
    python bench/bench_agent_overlap.py --engine wan-1.3b --critic-ms 1000        # the H100 claim
"""

from __future__ import annotations

import argparse
import importlib
import logging
import time

import numpy as np

from common import print_table, write_result
from spiral_rt.agents.loop import ClosedLoop, LoopConfig
from spiral_rt.agents.testing import FakeGenerator, FixedLatencyCritic, ScriptedPlanner
from spiral_rt.agents.types import Goal, Step


_ENGINE = None


def _engine(name: str):
    """The engine named by ``--engine``, built on first use (random weights)."""
    global _ENGINE
    if _ENGINE is None:
        import torch

        from spiral_rt.cache import SinkWindowPolicy
        from spiral_rt.engine import Engine, EngineConfig
        from spiral_rt.engine.generator import HashTextEncoder
        from spiral_rt.models.config import tiny_test, wan21_t2v_1_3b
        from spiral_rt.models.dit import build_dit
        from spiral_rt.models.vae import build_vae_decoder, tiny_vae, wan21_vae

        torch.manual_seed(0)
        if name == "wan-1.3b":
            if not torch.cuda.is_available():
                raise SystemExit("--engine wan-1.3b needs a CUDA GPU")
            dcfg, vcfg, device, dtype, hw, graphs = wan21_t2v_1_3b(), wan21_vae(), "cuda", torch.bfloat16, (60, 104), True
            # LongLive's local_attn_size 12 + sink 3: every chunk costs the same however long the plan runs
            policy = SinkWindowPolicy.from_local_attn(12, 3, 3)
        else:
            dcfg = tiny_test(num_layers=2, dim=128, num_heads=2, ffn_dim=256, text_dim=64, freq_dim=32, in_channels=16)
            vcfg, device, dtype, hw, graphs = tiny_vae(base_dim=8), "cpu", torch.float32, (4, 6), False
            policy = SinkWindowPolicy(sink_frames=1, window_frames=3)
        model = build_dit(dcfg, device=device, dtype=dtype).eval()
        vae = build_vae_decoder(vcfg, device=device, dtype=dtype).eval()
        cfg = EngineConfig(latent_size=hw, chunk_frames=3, policy=policy, output="uint8", cuda_graphs=graphs,
                           vae_side_stream=True, latent_dtype=torch.float32, device=device, max_batch_size=1)
        _ENGINE = Engine(model, vae, cfg, text_encoder=HashTextEncoder(dcfg.text_dim, dcfg.text_len))
    return _ENGINE


def _make_generator(args):
    if args.engine:
        from spiral_rt.engine.generator import EngineGenerator

        for s in list(_engine(args.engine).sessions):  # the previous run's session
            s.close()
        return EngineGenerator(_engine(args.engine), seed=0)
    if args.generator:
        module, _, name = args.generator.partition(":")
        if not name:
            raise SystemExit(f"--generator must be MODULE:CALLABLE, got {args.generator!r}")
        return getattr(importlib.import_module(module), name)()
    return FakeGenerator(height=args.height, width=args.width, chunk_time_s=args.fake_generator_ms / 1e3)


def _steps(args) -> list[Step]:
    return [Step(f"step {k}: the object moves on, phase {k}", args.span_chunks) for k in range(args.steps)]


def _open_loop(args) -> float:
    gen = _make_generator(args)
    t = time.perf_counter()
    for k, s in enumerate(_steps(args)):
        gen.generate(s.prompt, s.span_chunks, k)
    return time.perf_counter() - t


def _closed_loop(args, critic_s: float, speculate: bool) -> tuple[float, dict]:
    gen = _make_generator(args)
    loop = ClosedLoop(gen, ScriptedPlanner([_steps(args)]), FixedLatencyCritic(critic_s),
                      LoopConfig(speculate=speculate, critic_timeout_s=max(60.0, 10 * critic_s)))
    t = time.perf_counter()
    result = loop.run(Goal("benchmark goal"))
    wall = time.perf_counter() - t
    trace = result.trace
    if not trace.completed or trace.fallbacks or trace.counters["speculations_dropped"]:
        raise RuntimeError(f"closed loop did not run clean: {trace.to_dict()['warnings']}")
    return wall, trace.timings


def _stats(values: list[float]) -> dict:
    return {"median_s": float(np.median(values)), "p20_s": float(np.percentile(values, 20)),
            "p80_s": float(np.percentile(values, 80))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fake-generator-ms", type=float, default=360.0, help="per-chunk time of the fake generator")
    parser.add_argument("--critic-ms", type=float, nargs="+", default=[200.0, 1000.0], help="fixed critic latencies")
    parser.add_argument("--steps", type=int, default=10, help="steps in the plan")
    parser.add_argument("--span-chunks", type=int, default=3, help="chunks per step")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each configuration")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--engine", choices=["wan-1.3b", "tiny"], default=None,
                        help="a real engine with random weights (wan-1.3b: the H100 setting; tiny: CPU)")
    source.add_argument("--generator", default=None, help="MODULE:CALLABLE returning a Generator (replaces the fake one)")
    parser.add_argument("--no-serial", action="store_true", help="skip the closed loop without speculation")
    args = parser.parse_args()
    for name in ("steps", "span_chunks", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    logging.basicConfig(level=logging.WARNING)

    # warm-up: imports, allocator; a real engine runs eagerly the first time and captures its CUDA graphs the second
    for _ in range(2 if args.engine else 1):
        _open_loop(args)
    open_s = [_open_loop(args) for _ in range(args.repeats)]
    rows = []
    for critic_ms in args.critic_ms:
        closed, serial, waits = [], [], []
        for _ in range(args.repeats):
            wall, timings = _closed_loop(args, critic_ms / 1e3, speculate=True)
            closed.append(wall)
            waits.append(timings.get("critic_wait_s", 0.0))
            if not args.no_serial:
                serial.append(_closed_loop(args, critic_ms / 1e3, speculate=False)[0])
        o, c = float(np.median(open_s)), float(np.median(closed))
        row = {"critic_ms": critic_ms, "open_s": o, "closed_s": c, "ratio": c / o,
               "overhead_s": c - o, "critic_wait_s": float(np.median(waits)),
               "hidden_frac": 1.0 - (c - o) / (args.steps * critic_ms / 1e3),
               "open": _stats(open_s), "closed": _stats(closed)}
        if serial:
            row.update({"serial_s": float(np.median(serial)), "serial_ratio": float(np.median(serial)) / o, "serial": _stats(serial)})
        rows.append(row)
    print_table(rows, ["critic_ms", "open_s", "closed_s", "ratio", "overhead_s", "critic_wait_s", "hidden_frac",
                       *(["serial_s", "serial_ratio"] if not args.no_serial else [])])
    real = args.engine or args.generator
    settings = {"generator": (f"EngineGenerator({args.engine})" if args.engine else args.generator) or "FakeGenerator",
                "fake_generator_ms": None if real else args.fake_generator_ms,
                "steps": args.steps, "span_chunks": args.span_chunks, "chunks": args.steps * args.span_chunks,
                "repeats": args.repeats, "frame_size": None if real else [args.height, args.width]}
    segment_s = args.span_chunks * args.fake_generator_ms / 1e3 if not real else None
    write_result("agent_overlap", settings, rows, extra={
        "notes": "ratio = closed-loop wall / open-loop wall for the same chunks with an always-accepting critic; "
                 "the floor is open + one critic latency (the last verdict). A critic slower than one segment's "
                 "generation is only partly hidden" + (f" (segment here: {segment_s:.2f} s)" if segment_s else "") + "."})


if __name__ == "__main__":
    main()
