"""Memory-bound fused ops on one Wan chunk vs the measured copy bandwidth: modulated_norm (plain
and fused with the gated residual add), qk_norm_rope_kv_write, and the VAE's channel_rms_norm
(+ SiLU) at the decoder's stage sizes.

Shapes: L = 4680 tokens (3 latent frames at 832x480), C = 1536 = 12 heads x 128, bf16 activations,
fp32 modulation; a batch of 8 such sequences for comparison. GB/s counts the bytes each op must
move (reads + writes of its activations; the per-frame modulation rows and norm weights are
counted too, they are negligible). The fraction is against the 1 GiB device copy bandwidth
(``common.copy_bandwidth_gbs``) and against a copy of the op's own byte count (same launch-size
overheads). Launch variants (num_warps) are timed; "best" is reported with the default's numbers.
Eager PyTorch (the reference implementations) is timed for context.

Timing: per call inside a CUDA graph of back-to-back calls on distinct buffer sets (together >= 4x
L2, so every call reads from DRAM), as the engine runs these ops (graphed, between other kernels):
neither the Python call nor the graph launch is counted. The Python call of the op timed alone
(``python_call_ms``: validation, dispatch, launch; at one chunk it exceeds the kernel several times
over) is reported beside it; the eager reference is timed as a Python call too.

channel_rms_norm runs at the activation sizes of one 12-frame chunk of the 832x480 Wan2.1 VAE
decoder (C x T x H x W: 384 x 3 x 60 x 104 up to 96 x 12 x 480 x 832, bf16, SiLU fused). Its bytes
are what the kernel's two-pass design moves: x read twice (once to reduce, once to write) plus y
written once; the second read partly hits L2, so GB/s can exceed the copy bandwidth at small C.
Its "eager" is the VAE's former path (F.normalize in fp32, cast, * scale * gamma in bf16, SiLU).

Run on the GPU machine: ``python bench/bench_fused_ops.py`` (writes bench/results/fused_ops.json).
``--smoke`` runs the same code on CPU through the Triton interpreter at toy sizes (no timing
meaning, no result file): a check that the script itself works.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import buffer_sets, print_table, write_result  # noqa: E402

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from spiral_rt.kernels import channel_rms_norm as crn_kernel  # noqa: E402
from spiral_rt.kernels import modulated_norm as mn_kernel  # noqa: E402
from spiral_rt.kernels import qk_norm_rope_kv_write as qk_kernel  # noqa: E402
from spiral_rt.ops.channel_rms_norm import channel_rms_norm  # noqa: E402
from spiral_rt.ops.modulated_norm import modulated_norm  # noqa: E402
from spiral_rt.ops.qk_norm_rope_kv_write import _inv_freq, qk_norm_rope_kv_write  # noqa: E402
from spiral_rt.reference import modulated_norm as mn_ref  # noqa: E402
from spiral_rt.reference import qk_norm_rope_kv_write as qk_ref  # noqa: E402

DEVICE = "cuda"
PAGE, GRID = 1560, (30, 52)
HEADS, HEAD_DIM = 12, 128
C = HEADS * HEAD_DIM
WARPS = (2, 4, 8, 16)
MN_ROWS = (1, 2, 4, 8)  # modulated_norm rows per program
# (C, T, H, W) of the VAE decoder's norms for a 3-latent-frame chunk at 832x480, stage by stage
VAE_SHAPES = ((384, 3, 60, 104), (384, 6, 120, 208), (192, 12, 240, 416), (96, 12, 480, 832))
VAE_BLOCKS_N = (128, 256, 512)
SMOKE = False


def configure_smoke():
    global DEVICE, PAGE, GRID, HEADS, HEAD_DIM, C, WARPS, MN_ROWS, VAE_SHAPES, VAE_BLOCKS_N, SMOKE
    DEVICE, PAGE, GRID, HEADS, HEAD_DIM, WARPS, MN_ROWS, SMOKE = "cpu", 12, (3, 4), 2, 32, (4,), (4,), True
    C = HEADS * HEAD_DIM
    VAE_SHAPES, VAE_BLOCKS_N = ((24, 2, 6, 10), (12, 3, 12, 20)), (256,)


def time_ms(fn, rep_ms):
    """GPU time of one Python call of ``fn`` (do_bench)."""
    if SMOKE:  # one wall-clock run: the interpreter's timing means nothing
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return {"median_ms": ms, "p20_ms": ms, "p80_ms": ms}
    return common.time_ms(fn, rep_ms=rep_ms)


def per_call_ms(fns, rep_ms):
    """Time per call of a CUDA graph of the calls ``fns`` (each on its own buffers)."""
    if SMOKE:
        return time_ms(fns[0], rep_ms)
    return common.time_per_call_ms(fns, rep_ms=rep_ms)


def gbs(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def same_size_copy_gbs(nbytes: int, rep_ms: float) -> float:
    """Copy bandwidth of a copy moving ``nbytes`` (read + write), timed like the ops."""
    sets = [torch.empty(nbytes // 2, dtype=torch.uint8, device=DEVICE).random_() for _ in range(buffer_sets(nbytes))]
    pairs = [(src, torch.empty_like(src)) for src in sets]
    return gbs(2 * sets[0].numel(), per_call_ms([lambda s=s, d=d: d.copy_(s) for s, d in pairs], rep_ms)["median_ms"])


def measure(name, nbytes, default_calls, variant_calls, eager_fn, copy_peak, rep_ms):
    """``default_calls`` / each of ``variant_calls``: one callable per buffer set (see per_call_ms)."""
    t_default = per_call_ms(default_calls, rep_ms)
    best_name, best_ms = "default", t_default["median_ms"]
    for vname, fns in variant_calls.items():
        try:
            t = per_call_ms(fns, rep_ms)["median_ms"]
        except Exception as err:
            print(f"{name} variant {vname} failed: {type(err).__name__}: {str(err)[:200]}", file=sys.stderr)
            continue
        if t < best_ms:
            best_name, best_ms = vname, t
    t_python = time_ms(default_calls[0], rep_ms)["median_ms"]
    t_eager = time_ms(eager_fn, rep_ms=rep_ms)["median_ms"]
    same = same_size_copy_gbs(nbytes, rep_ms)
    return {
        "op": name, "MB": nbytes / 1e6, **t_default, "sets": len(default_calls),
        "GBs": gbs(nbytes, t_default["median_ms"]), "frac_copy": gbs(nbytes, t_default["median_ms"]) / copy_peak,
        "best_variant": best_name, "best_GBs": gbs(nbytes, best_ms), "best_frac_copy": gbs(nbytes, best_ms) / copy_peak,
        "same_size_copy_GBs": same, "frac_same_size_copy": gbs(nbytes, best_ms) / same,
        "python_call_ms": t_python, "eager_ms": t_eager, "speedup_vs_eager": t_eager / best_ms,
    }


def bench_modulated_norm(batch, seq_len, fused, copy_peak, rep_ms):
    act = batch * seq_len * C * 2
    nbytes = act * (4 if fused else 2) + (3 if fused else 2) * batch * 3 * C * 4
    sets = []
    for _ in range(buffer_sets(nbytes)):
        x = torch.randn(batch, seq_len, C, device=DEVICE, dtype=torch.bfloat16)
        shift, scale, gate = (torch.randn(batch, 3, C, device=DEVICE) for _ in range(3))
        branch = torch.randn_like(x) if fused else None
        sets.append((x, shift, scale, gate if fused else None, branch, torch.empty_like(x),
                     torch.empty_like(x) if fused else None))
    default = [lambda b=b: modulated_norm(b[0], b[1], b[2], gate=b[3], branch=b[4]) for b in sets]
    variants = {f"r{r}w{w}": [lambda b=b, r=r, w=w: mn_kernel.modulated_norm(*b, 3, 1e-6, w, rows=r) for b in sets]
                for r in MN_ROWS for w in WARPS}
    x, shift, scale, gate, branch = sets[0][:5]
    eager = lambda: mn_ref.modulated_norm(x, shift, scale, gate, branch)  # noqa: E731
    name = f"modulated_norm{'+gated_residual' if fused else ''} B={batch}"
    return measure(name, nbytes, default, variants, eager, copy_peak, rep_ms)


def bench_qk(batch, copy_peak, rep_ms):
    total = batch * 3 * PAGE
    nbytes = 6 * total * C * 2 + 2 * C * 4
    num_pages = batch * 3 + 4
    cu = torch.arange(0, total + 1, 3 * PAGE, dtype=torch.int32, device=DEVICE) if batch > 1 else None
    offsets = torch.full((batch,), 6, dtype=torch.int32, device=DEVICE)
    qw, kw = torch.rand(C, device=DEVICE) + 0.5, torch.rand(C, device=DEVICE) + 0.5
    sets = []
    for _ in range(buffer_sets(nbytes)):
        qkv = torch.randn(total, 3, HEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)  # fused projection output
        k_pages = torch.empty(num_pages, PAGE, HEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
        pages = torch.randperm(num_pages, device=DEVICE)[:batch * 3]
        slots = (pages[:, None] * PAGE + torch.arange(PAGE, device=DEVICE)).reshape(-1)
        q_out = torch.empty(total, HEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
        sets.append((*qkv.unbind(1), k_pages, torch.empty_like(k_pages), slots, q_out))
    kwargs = dict(grid_hw=GRID, frame_offset=offsets, cu_seqlens=cu)
    default = [lambda b=b: qk_norm_rope_kv_write(b[0], b[1], b[2], qw, kw, b[3], b[4], b[5], **kwargs) for b in sets]
    inv = _inv_freq(HEAD_DIM, DEVICE)
    PAIRS = [d // 2 for d in qk_ref.rope_parts(HEAD_DIM)]
    variants = {f"w{w}": [lambda b=b, w=w: qk_kernel.qk_norm_rope_kv_write(
        b[0], b[1], b[2], qw, kw, inv, b[6], b[3], b[4], b[5], cu, offsets, 0, GRID[0], GRID[1], PAIRS[0], PAIRS[1],
        1e-6, w) for b in sets] for w in WARPS}
    cu_list = cu.tolist() if cu is not None else None
    off_list = offsets.tolist()
    q, k, v, k_pages, v_pages, slots = sets[0][:6]
    eager = lambda: qk_ref.qk_norm_rope_kv_write(q, k, v, qw, kw, k_pages, v_pages, slots, GRID[0], GRID[1],  # noqa: E731
                                                 off_list, cu_list)
    return measure(f"qk_norm_rope_kv_write B={batch}", nbytes, default, variants, eager, copy_peak, rep_ms)


def bench_channel_rms_norm(shape, copy_peak, rep_ms):
    c = shape[0]
    numel = c * shape[1] * shape[2] * shape[3]
    nbytes = 3 * numel * 2 + c * 2
    gamma = (1 + 0.1 * torch.randn(c, 1, 1, 1, device=DEVICE)).to(torch.bfloat16)
    g_flat = gamma.reshape(c)
    scale = c**0.5
    sets = []
    for _ in range(buffer_sets(nbytes)):
        x = torch.randn(1, *shape, device=DEVICE, dtype=torch.bfloat16)
        sets.append((x, torch.empty_like(x)))
    default = [lambda x=x: channel_rms_norm(x, gamma, scale=scale, silu=True) for x, _ in sets]
    variants = {f"n{n}w{w}": [lambda x=x, y=y, n=n, w=w: crn_kernel.channel_rms_norm(x, g_flat, y, scale, 1e-12, True,
                                                                                    block_n=n, num_warps=w)
                              for x, y in sets]
                for n in VAE_BLOCKS_N for w in WARPS}
    x = sets[0][0]
    eager = lambda: torch.nn.functional.silu(  # noqa: E731
        torch.nn.functional.normalize(x.float(), dim=1).to(x.dtype) * scale * gamma)
    return measure("channel_rms_norm+silu C={} T={} {}x{}".format(*shape), nbytes, default, variants, eager, copy_peak, rep_ms)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rep-ms", type=float, default=100, help="timing budget per measurement (do_bench rep)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on CPU through the Triton interpreter")
    args = parser.parse_args()
    if args.smoke:
        configure_smoke()
    elif not torch.cuda.is_available():
        sys.exit("bench_fused_ops needs a CUDA GPU (or --smoke)")
    torch.manual_seed(0)
    copy_peak = same_size_copy_gbs(1 << 20, args.rep_ms) if SMOKE else common.copy_bandwidth_gbs()
    rows = []
    for batch in (1, 8):
        rows.append(bench_modulated_norm(batch, 3 * PAGE, False, copy_peak, args.rep_ms))
        rows.append(bench_modulated_norm(batch, 3 * PAGE, True, copy_peak, args.rep_ms))
        rows.append(bench_qk(batch, copy_peak, args.rep_ms))
    for shape in VAE_SHAPES:
        rows.append(bench_channel_rms_norm(shape, copy_peak, args.rep_ms))
    print(f"copy bandwidth (1 GiB): {copy_peak:.0f} GB/s")
    print_table(rows, ["op", "MB", "median_ms", "GBs", "frac_copy", "best_variant", "best_GBs", "best_frac_copy",
                       "same_size_copy_GBs", "frac_same_size_copy", "python_call_ms", "eager_ms", "speedup_vs_eager"])
    settings = {"L": 3 * PAGE, "C": C, "heads": HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16",
                "modulation_dtype": "float32", "frames": 3, "grid_hw": GRID, "page_size": PAGE,
                "vae_shapes_cthw": VAE_SHAPES, "vae_bytes": "channel_rms_norm: 2 reads of x + 1 write of y",
                "timing": "per call: triton.testing.do_bench median of a CUDA graph of back-to-back calls on "
                          "'sets' distinct buffer sets (>= 4x L2) / sets; python_call_ms and eager_ms: do_bench of "
                          "one Python call"}
    if not SMOKE:
        write_result("fused_ops", settings, rows, {"copy_bandwidth_gbs": copy_peak, "target_frac_copy": 0.8})


if __name__ == "__main__":
    main()
