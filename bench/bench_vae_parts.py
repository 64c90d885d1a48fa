"""The Wan2.1 VAE decoder's per-chunk GPU time, A/B over its fast paths, and the parts they replace.

Decoder variants (``spiral_rt.models.vae``), each a streaming decode of latents (1, 16, 3, 60, 104)
(832x480, 3 latent frames -> 12 frames a chunk), bf16, random weights, channels-last (the GPU
default): after a first chunk and one warm-up chunk, ``--chunks`` later chunks are timed one by
one with CUDA events (L2 not flushed: the decoder's own traffic dwarfs it); median and p20/p80.

- ``phase_upsample``: each Resample's nearest 2x + 3x3 conv as a sub-pixel 2x2 conv + interleave
  (True) or the explicit upsample copy + 3x3 conv (False);
- ``head_impl``: the head conv (96 -> 3, 3x3x3) as the time-folded cuDNN conv2d ("conv"), the same
  with the output channels zero-padded to 16 ("padded"), or the Triton direct conv that reads the
  norm's single output and the cached frames in place ("direct");
- ``wide_copies``: the cache bookkeeping copies as int64 words (True) or plain bf16 ``copy_``.

"baseline" is the decoder before these changes (False / "conv" / False); "default" what the
decoder now runs on CUDA. Parts (``triton.testing.do_bench``, L2 flushed): each Resample's 2-D
stage at its chunk size (explicit vs phase, and the phase path's conv and interleave alone, with
the interleave's GB/s against the measured copy bandwidth), and the head (norm + SiLU + conv + cache
update) per impl, and the Triton head kernel alone per kernel (shift / direct) and launch config
(tile or BLOCK_M, BLOCK_K, warps, stages; the first is the default), with its input's GB/s.

Run on the GPU machine: ``python bench/bench_vae_parts.py`` (about a minute on an H100; writes
bench/results/vae_parts.json). ``--smoke`` runs the same code on the CPU at a toy size with the
tiny config (no timing meaning, no result file): a check of the script.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import print_table, write_result  # noqa: E402

from spiral_rt.models import vae as vae_module  # noqa: E402
from spiral_rt.models.vae import Resample, build_vae_decoder, tiny_vae, wan21_vae  # noqa: E402
from spiral_rt.ops.upsample_conv import phase_interleave  # noqa: E402

VARIANTS = [  # name, phase_upsample, head_impl, wide_copies
    ("baseline", False, "conv", False),
    ("+wide_copies", False, "conv", True),
    ("+phase_upsample", True, "conv", False),
    ("+head_padded", False, "padded", False),
    ("+head_direct", False, "direct", False),
    ("default (phase, direct, wide)", True, "direct", True),
    ("phase, padded, wide", True, "padded", True),
]


class Timer:
    def __init__(self, smoke: bool):
        self.smoke = smoke

    def events(self, fn, n: int) -> dict:
        """Per-call times of n calls (CUDA events around each; wall clock in the smoke run)."""
        return common.event_times_ms(fn, n)

    def bench(self, fn) -> dict:
        if self.smoke:
            return self.events(fn, 1)
        return common.time_ms(fn, warmup_ms=10, rep_ms=100)


def configure(model, phase: bool, head: str, wide: bool) -> None:
    model.phase_upsample = phase
    model.head_impl = head
    vae_module.WIDE_COPIES = wide


def bench_decoder(model, z, chunks: int, timer: Timer) -> list[dict]:
    H, W = z.shape[3], z.shape[4]
    rows = []
    for name, phase, head, wide in VARIANTS:
        configure(model, phase, head, wide)
        state = model.new_state(1, H, W)
        model.decode_chunk(z, state)  # the first chunk (1 + 4 (T - 1) frames): not timed
        model.decode_chunk(z, state)  # warm-up: cuDNN / Triton choices for these shapes
        tm = timer.events(lambda: model.decode_chunk(z, state), chunks)
        rows.append({"part": "decode_chunk", "variant": name, "phase_upsample": phase, "head_impl": head,
                     "wide_copies": wide, **tm})
        del state
    base = rows[0]["median_ms"]
    for r in rows:
        r["vs_baseline"] = r["median_ms"] / base
    return rows


def resample_inputs(model, z) -> list[tuple[Resample, torch.Tensor]]:
    """Each Resample with the (B*T, C, H, W) frames its 2-D stage sees in a later chunk."""
    seen = []

    def hook(mod, inp):
        x = inp[0]
        if mod.mode == "upsample3d":  # the time conv doubles the frames before the 2-D stage
            x = torch.cat([x, x], dim=2)
        B, C, T, H, W = x.shape
        seen.append((mod, x.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W).clone()))

    state = model.new_state(1, z.shape[3], z.shape[4])
    model.decode_chunk(z, state)
    hooks = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, Resample)]
    model.decode_chunk(z, state)
    for h in hooks:
        h.remove()
    return seen


def bench_resamples(model, z, timer: Timer, copy_gbs: float) -> list[dict]:
    from spiral_rt.ops.upsample_conv import upsample_conv2d

    rows = []
    for i, (mod, frames) in enumerate(resample_inputs(model, z)):
        w4, b4 = mod._phase_params()
        y = torch.nn.functional.conv2d(frames, w4, b4, padding=1)
        out = torch.empty((frames.shape[0], w4.shape[0] // 4, 2 * frames.shape[2], 2 * frames.shape[3]),
                          dtype=frames.dtype, device=frames.device, memory_format=torch.channels_last)
        shape = "x".join(map(str, frames.shape))
        parts = {
            "explicit (upsample + 3x3 conv)": lambda: mod.resample(frames),
            "explicit: upsample copy": lambda: mod.resample[0](frames),
            "phase (2x2 conv + interleave)": lambda: upsample_conv2d(frames, w4, b4),
            "phase: 2x2 conv": lambda: torch.nn.functional.conv2d(frames, w4, b4, padding=1),
            "phase: interleave": lambda: phase_interleave(y, out=out),
        }
        for name, fn in parts.items():
            tm = timer.bench(fn)
            row = {"part": f"resample{i} {mod.mode}", "variant": name, "input": shape, **tm}
            if name == "phase: interleave":
                gbs = 2 * out.numel() * out.element_size() / (tm["median_ms"] * 1e-3) / 1e9
                row.update(gbs=gbs, frac_copy_bw=gbs / copy_gbs if copy_gbs else float("nan"))
            rows.append(row)
    return rows


def bench_head(model, z, timer: Timer, copy_gbs: float) -> list[dict]:
    dec = model.decoder
    captured = {}
    norm, conv = dec.head[0], dec.head[2]
    state = model.new_state(1, z.shape[3], z.shape[4])
    model.decode_chunk(z, state)  # the first chunk; the head's input of a later one is captured
    hook = norm.register_forward_pre_hook(lambda mod, inp: captured.setdefault("x", inp[0].clone()))
    model.decode_chunk(z, state)
    hook.remove()
    x = captured["x"]
    rows = []
    for impl in ("conv", "padded", "direct"):
        if impl == "direct":
            fn = lambda: conv.forward_direct(x, state, norm)  # noqa: E731
        else:
            fn = lambda pad=16 if impl == "padded" else 0: conv(x, state, norm=norm, pad_out=pad)  # noqa: E731
        for wide in (False, True):
            vae_module.WIDE_COPIES = wide
            tm = timer.bench(fn)
            rows.append({"part": "head (norm + conv + cache)", "variant": impl, "wide_copies": wide,
                         "input": "x".join(map(str, x.shape)), **tm})
    rows += sweep_head_kernel(conv, norm(x, silu=True), state.buffers[conv.cache_index], timer, copy_gbs)
    return rows


# (variant, tile (shift: rows x cols) or BLOCK_M (direct), BLOCK_K, num_warps, num_stages); first: the default
HEAD_CONFIGS = [("shift", (16, 16), 32, 8, 3), ("shift", (16, 16), 32, 4, 3), ("shift", (8, 32), 32, 8, 3),
                ("shift", (16, 32), 32, 8, 3), ("shift", (32, 16), 32, 8, 3), ("shift", (16, 16), 32, 8, 2),
                ("shift", (16, 16), 32, 8, 4), ("shift", (16, 16), 16, 8, 3), ("direct", 128, 32, 4, 3),
                ("direct", 256, 32, 8, 3), ("direct", 64, 32, 4, 3)]


def sweep_head_kernel(conv, h, past, timer: Timer, copy_gbs: float) -> list[dict]:
    """The Triton head conv alone (no norm, no cache update) per kernel and launch config, with the
    GB/s of its input (x and the cached frames, read once) against the copy bandwidth."""
    if timer.smoke:
        return []
    from spiral_rt.kernels import narrow_causal_conv3d as kernel

    B, C, T, H, W = h.shape
    cout = conv.out_channels
    y = torch.empty((B, cout, T, H, W), dtype=h.dtype, device=h.device)
    bias = torch.zeros(16, dtype=torch.float32, device=h.device)
    bias[:cout] = conv.bias.float()
    nbytes = B * C * (T + 2) * H * W * h.element_size()
    rows = []
    for variant, size, block_k, warps, stages in HEAD_CONFIGS:
        pack = kernel.pack_shift if variant == "shift" else kernel.pack_direct
        packed = pack(conv.weight, block_k)
        name = f"{variant} {'x'.join(map(str, size)) if variant == 'shift' else f'm{size}'} k{block_k} w{warps} s{stages}"
        sizes = {"tile": size} if variant == "shift" else {"block_m": size}

        def fn(packed=packed, variant=variant, sizes=sizes, block_k=block_k, warps=warps, stages=stages):
            kernel.narrow_causal_conv3d(h, past, packed, bias, y, cout, block_k, variant=variant, num_warps=warps,
                                        num_stages=stages, **sizes)

        try:
            tm = timer.bench(fn)
        except Exception as exc:  # a config that does not compile (e.g. out of shared memory) is skipped
            rows.append({"part": "head kernel sweep", "variant": name, "error": f"{type(exc).__name__}: {str(exc)[:160]}"})
            continue
        gbs = nbytes / (tm["median_ms"] * 1e-3) / 1e9
        rows.append({"part": "head kernel sweep", "variant": name, "input": "x".join(map(str, h.shape)), **tm,
                     "gbs": gbs, "frac_copy_bw": gbs / copy_gbs if copy_gbs else float("nan")})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=6, help="timed chunks per decoder variant (>= 5)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--skip-parts", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny config, toy size: a check of the script")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench_vae_parts.py needs a CUDA GPU (or --smoke)")
    torch.manual_seed(0)
    timer = Timer(args.smoke)
    if args.smoke:
        cfg, dev, dtype, lat = tiny_vae(), torch.device("cpu"), torch.float32, (2, 3)
    else:
        cfg, dev, dtype, lat = wan21_vae(), torch.device("cuda"), torch.bfloat16, (args.height // 8, args.width // 8)
    # PyTorch's default (random) init; built outside inference_mode, as the engine does (weights
    # made inside it have no version counter, and the Resamples then recombine theirs per call)
    model = build_vae_decoder(cfg, device=dev, dtype=dtype)
    if args.smoke:
        model.channels_last = True
    z = torch.randn(1, cfg.z_dim, 3, *lat, device=dev, dtype=dtype)
    with torch.inference_mode():
        rows = run(model, z, args, timer)
    configure(model, True, "auto", True)
    print_table(rows, ["part", "variant", "input", "median_ms", "p20_ms", "p80_ms", "vs_baseline", "gbs", "frac_copy_bw",
                       "wide_copies", "error"])
    if args.smoke:
        return
    settings = {"vae": cfg.name, "dtype": "bf16", "latents": [1, cfg.z_dim, 3, *lat], "chunks": args.chunks,
                "layout": "channels_last"}
    write_result("vae_parts", settings, rows)


def run(model, z, args, timer: Timer) -> list[dict]:
    rows = bench_decoder(model, z, max(args.chunks, 5 if not args.smoke else 2), timer)
    if not args.skip_parts:
        configure(model, True, "auto", True)
        copy_gbs = 0.0 if args.smoke else common.copy_bandwidth_gbs()
        rows += bench_resamples(model, z, timer, copy_gbs)
        rows += bench_head(model, z, timer, copy_gbs)
    return rows


if __name__ == "__main__":
    main()
