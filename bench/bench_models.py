"""Benchmark of the model layer on the GPU: one DiT chunk forward and one streaming-VAE chunk decode.

Wan2.1-T2V-1.3B at 832x480 (latents (1, 16, 3, 60, 104) per chunk = 4680 tokens), bf16, random
weights, the model's plain PyTorch ops (SDPA attention, eager). Rows:

- ``dit_forward``: one chunk forward with ``context_frames`` latent frames already in the KV cache
  (0 = the first chunk; 18 = the last chunk of an 81-frame video), read-only (a denoising step);
- ``dit_clean_pass``: the same with the cache write (the t = 0 pass that stores the chunk's K/V);
- ``text_conditioning``: text MLP + cross-attention K/V of every block for one 512-token prompt;
- ``vae_decode``: one streaming decode of 3 latent frames (first chunk: 9 frames; later: 12).

Times are CUDA-event medians (p20/p80) after warm-up; TFLOP/s from the cost model (DiT: linear
layers + attention, counted from the config; VAE: convolutions and attention counted with hooks)
and the fraction of the measured bf16 matmul peak; peak memory is torch.cuda.max_memory_allocated
during the timed calls. Writes bench/results/models.json.

    python bench/bench_models.py [--config wan2.1-t2v-1.3b] [--context 0 18] [--iters 10]
    python bench/bench_models.py --smoke-cpu --config tiny-test --vae tiny --height 64 --width 96   # script check
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import event_times_ms, print_table, write_result  # noqa: E402

from spiral_rt.models.attention import ContiguousKVCache  # noqa: E402
from spiral_rt.models.config import WanDiTConfig  # noqa: E402
from spiral_rt.models.dit import build_dit  # noqa: E402
from spiral_rt.models.vae import build_vae_decoder, tiny_vae, wan21_vae  # noqa: E402


def peak_bytes(fn) -> int:
    if not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def matmul_peak_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = event_times_ms(lambda: a @ b, 20, warmup=5)["median_ms"]
    return 2 * n**3 / (t * 1e-3) / 1e12


def dit_flops(cfg: WanDiTConfig, tokens: int, context_tokens: int, text_len: int) -> float:
    """Linear layers (self q/k/v/o, cross q/o, FFN, per token) + self- and cross-attention matmuls."""
    d = cfg.dim
    linear = 2 * tokens * (6 * d * d + 2 * d * cfg.ffn_dim)
    attn = 4 * tokens * (tokens + context_tokens) * d + 4 * tokens * text_len * d
    return cfg.num_layers * (linear + attn)


def count_vae_flops(vae, z, state) -> float:
    """FLOPs of one decode_chunk, counted with forward hooks on the convolutions and attention blocks."""
    from spiral_rt.models.vae import AttentionBlock

    total = [0.0]

    def conv_hook(mod, inp, out):
        k = mod.weight[0].numel()  # in_channels * kernel volume
        total[0] += 2.0 * out.numel() * k

    def attn_hook(mod, inp, out):
        B, C, T, H, W = inp[0].shape
        total[0] += 4.0 * B * T * (H * W) ** 2 * C

    hooks = [m.register_forward_hook(conv_hook) for m in vae.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.Conv2d))]
    hooks += [m.register_forward_hook(attn_hook) for m in vae.modules() if isinstance(m, AttentionBlock)]
    with torch.no_grad():
        vae.decode_chunk(z, state)
    for h in hooks:
        h.remove()
    return total[0]


def _row(stage: str, context_frames: int, tm: dict, flops: float, peak: float, peak_gib: float, **extra) -> dict:
    tfl = flops / (tm["median_ms"] * 1e-3) / 1e12 if flops else float("nan")
    return {"stage": stage, "context_frames": context_frames, **tm, "tflops": tfl, "frac_peak": tfl / peak,
            "peak_gib": peak_gib, **extra}


def bench_dit(args, cfg: WanDiTConfig, dev, dtype, peak: float) -> tuple[list[dict], float]:
    """Text conditioning, then one chunk forward (read-only and writing) per context length."""
    H, W, Fc = args.height // 8, args.width // 8, args.chunk_frames
    tpf = cfg.tokens_per_frame(H, W)
    model = build_dit(cfg, device=dev, dtype=dtype)
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    emb = torch.randn(1, cfg.text_len, cfg.text_dim, device=dev, dtype=dtype)
    text = model.encode_text(emb)

    def encode():
        return model.encode_text(emb)

    rows = [_row("text_conditioning", 0, event_times_ms(encode, args.iters, warmup=args.warmup), 0.0, peak, peak_bytes(encode) / 2**30)]
    for ctx in args.context:
        cache = ContiguousKVCache(cfg.num_layers)
        done = 0
        while done < ctx:  # fill the cache with clean passes, chunk by chunk
            n = min(Fc, ctx - done)
            cache.write = True
            noise = torch.randn(1, cfg.in_channels, n, H, W, device=dev, dtype=dtype)
            model(noise, torch.zeros(1, n, device=dev), done, cache, text)
            cache.commit()
            done += n
        x = torch.randn(1, cfg.in_channels, Fc, H, W, device=dev, dtype=dtype)
        flops = dit_flops(cfg, Fc * tpf, ctx * tpf, cfg.text_len)
        for stage, write in (("dit_forward", False), ("dit_clean_pass", True)):
            cache.write = write
            ts = torch.full((1, Fc), 0.0 if write else 937.5, device=dev)

            def forward(ts=ts, ctx=ctx, cache=cache):
                return model(x, ts, ctx, cache, text)

            tm = event_times_ms(forward, args.iters, warmup=args.warmup)
            rows.append(_row(stage, ctx, tm, flops, peak, peak_bytes(forward) / 2**30))
    return rows, weights_gib


def bench_vae(args, vae_cfg, dev, dtype, peak: float) -> list[dict]:
    """One streaming decode of a chunk: the first chunk of a video, and a later one (steady state)."""
    H, W, Fc = args.height // 8, args.width // 8, args.chunk_frames
    vae = build_vae_decoder(vae_cfg, device=dev, dtype=dtype)
    z = torch.randn(1, vae_cfg.z_dim, Fc, H, W, device=dev, dtype=dtype)
    rows = []
    for stage, first in (("vae_decode_first_chunk", True), ("vae_decode_chunk", False)):
        state = vae.new_state(1, H, W)
        if not first:
            vae.decode_chunk(z, state)
        flops = count_vae_flops(vae, z, vae.new_state(1, H, W) if first else state)

        def decode(state=state, first=first):
            if first:
                state.reset()
            return vae.decode_chunk(z, state)

        tm = event_times_ms(decode, args.iters, warmup=args.warmup)
        rows.append(_row(stage, 0, tm, flops, peak, peak_bytes(decode) / 2**30,
                         frames_out=vae_cfg.output_frames(Fc, first)))
    return rows


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="wan2.1-t2v-1.3b")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--chunk-frames", type=int, default=3)
    parser.add_argument("--context", type=int, nargs="+", default=[0, 18], help="latent frames already cached")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--skip-vae", action="store_true")
    parser.add_argument("--vae", choices=["wan2.1", "tiny"], default="wan2.1")
    parser.add_argument("--smoke-cpu", action="store_true",
                        help="run on the CPU in fp32 to check the script (use --config tiny-test --vae tiny); no result file")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.smoke_cpu:
        raise SystemExit("bench_models.py needs a CUDA GPU (or --smoke-cpu to check the script)")

    torch.manual_seed(0)
    dev, dtype = (torch.device("cpu"), torch.float32) if args.smoke_cpu else (torch.device("cuda"), torch.bfloat16)
    cfg = WanDiTConfig.from_name(args.config)
    peak = matmul_peak_tflops() if not args.smoke_cpu else float("nan")
    rows, weights_gib = bench_dit(args, cfg, dev, dtype, peak)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    vae_name = None
    if not args.skip_vae:
        vae_cfg = wan21_vae() if args.vae == "wan2.1" else tiny_vae()
        vae_name = vae_cfg.name
        rows += bench_vae(args, vae_cfg, dev, dtype, peak)

    print_table(rows, ["stage", "context_frames", "median_ms", "p20_ms", "p80_ms", "tflops", "frac_peak", "peak_gib"])
    if args.smoke_cpu:
        print("smoke run on the CPU: no result file written")
        return
    H, W = args.height // 8, args.width // 8
    settings = {"config": cfg.name, "vae": vae_name, "dtype": "bf16",
                "latents": [1, cfg.in_channels, args.chunk_frames, H, W],
                "tokens": args.chunk_frames * cfg.tokens_per_frame(H, W), "resolution": [args.width, args.height],
                "weights": "random", "ops": "reference (PyTorch SDPA, eager)", "warmup": args.warmup,
                "iters": args.iters, "dit_weights_gib": weights_gib, "matmul_peak_tflops": peak}
    write_result("models", settings, rows)


if __name__ == "__main__":
    main()
