"""Every convolution of one streaming Wan2.1 VAE chunk, timed alone with cuDNN's heuristic choice and
with ``cudnn.benchmark`` (which times cuDNN's engines and keeps the fastest), and the whole chunk both ways.

The decoder (832x480, latents (1, 16, 3, 60, 104) -> 12 frames, bf16, channels-last, random weights)
decodes a first and a second chunk while ``F.conv2d`` / ``F.conv3d`` are wrapped to record each call's
input layout, weight, stride, padding and output; each distinct call is then timed with
``triton.testing.do_bench`` (median, L2 flushed) and reported with its TFLOP/s (2 * output elements *
C_in * kernel taps). The question it answers: does cuDNN's heuristic leave time on the table for the
decoder's shapes (e.g. a 128-wide output tile for 96 output channels)?

Run on the GPU machine: ``python bench/probe_vae_convs.py`` (writes bench/results/vae_convs.json).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_result  # noqa: E402

from spiral_rt.models.vae import build_vae_decoder, wan21_vae  # noqa: E402


def record_convs(decode) -> list[dict]:
    """Run ``decode()`` with F.conv2d / F.conv3d wrapped; returns one entry per distinct call."""
    seen: dict[tuple, dict] = {}
    originals = {"conv2d": F.conv2d, "conv3d": F.conv3d}

    def wrap(name):
        fn = originals[name]

        def conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
            y = fn(x, weight, bias, stride, padding, dilation, groups)
            key = (name, tuple(x.shape), tuple(x.stride()), tuple(weight.shape), tuple(weight.stride()),
                   bias is not None, str(stride), str(padding))
            hit = seen.setdefault(key, {"op": name, "x": x.detach().clone(), "w": weight.detach().clone(),
                                        "b": None if bias is None else bias.detach().clone(), "stride": stride,
                                        "padding": padding, "calls": 0, "out": tuple(y.shape)})
            hit["calls"] += 1
            return y
        return conv

    F.conv2d, F.conv3d = wrap("conv2d"), wrap("conv3d")
    try:
        decode()
    finally:
        F.conv2d, F.conv3d = originals["conv2d"], originals["conv3d"]
    return list(seen.values())


def main(argv=None) -> None:
    import triton.testing

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=5, help="timed whole-chunk decodes per setting")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    torch.manual_seed(0)
    vae = build_vae_decoder(wan21_vae(), device="cuda", dtype=torch.bfloat16)
    z = torch.randn(1, 16, 3, 60, 104, device="cuda")
    rows = []
    with torch.inference_mode():
        state = vae.new_state(1, 60, 104)
        vae.decode_chunk(z, state)  # the first chunk (1 + 4 * 2 frames); the recorded one is a later chunk
        calls = record_convs(lambda: vae.decode_chunk(z, state))
        for c in calls:
            fn = F.conv2d if c["op"] == "conv2d" else F.conv3d
            w = c["w"]
            flops = 2 * math.prod(c["out"]) * w.shape[1] * math.prod(w.shape[2:])
            row = {"op": c["op"], "x": "x".join(map(str, c["x"].shape)), "w": "x".join(map(str, w.shape)),
                   "calls": c["calls"], "tflop": flops / 1e12}
            for bench_mode in (False, True):
                with torch.backends.cudnn.flags(enabled=True, benchmark=bench_mode, deterministic=False, allow_tf32=True):
                    run = lambda: fn(c["x"], w, c["b"], c["stride"], c["padding"])  # noqa: E731
                    run()
                    ms = triton.testing.do_bench(run, warmup=25, rep=100)
                tag = "bench" if bench_mode else "heur"
                row[f"{tag}_ms"] = ms
                row[f"{tag}_tflops"] = flops / ms / 1e9
            row["gain_ms"] = (row["heur_ms"] - row["bench_ms"]) * c["calls"]
            rows.append(row)
            del c["x"], c["w"], c["b"]
        chunk = {}
        for bench_mode in (False, True):
            with torch.backends.cudnn.flags(enabled=True, benchmark=bench_mode, deterministic=False, allow_tf32=True):
                for _ in range(2):
                    vae.decode_chunk(z, state)
                times = []
                for _ in range(args.chunks):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    vae.decode_chunk(z, state)
                    b.record()
                    torch.cuda.synchronize()
                    times.append(a.elapsed_time(b))
                chunk["bench" if bench_mode else "heur"] = sorted(times)[len(times) // 2]
    rows.sort(key=lambda r: -r["heur_ms"] * r["calls"])
    print_table([{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                ["op", "x", "w", "calls", "tflop", "heur_ms", "heur_tflops", "bench_ms", "bench_tflops", "gain_ms"])
    print(f"decode_chunk median: heuristic {chunk['heur']:.2f} ms, cudnn.benchmark {chunk['bench']:.2f} ms")
    write_result("vae_convs", {"latents": [1, 16, 3, 60, 104], "dtype": "bfloat16", "layout": "channels_last",
                               "timing": "do_bench median per conv (L2 flushed); decode_chunk: CUDA events, median"},
                 rows, {"decode_chunk_ms": chunk})


if __name__ == "__main__":
    main()
