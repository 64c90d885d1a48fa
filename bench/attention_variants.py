"""Variants of the Hopper chunk-attention kernel, built side by side and timed in one process.

Each variant is csrc/chunk_attention_sm90.cu with text patches applied (PATCHES below; a name
like "hint+warp_arrive" applies several in order), compiled by nvcc into its own shared
library with a flat C entry point, then run as the op's CUDA path (kernel, then the merge of the
plan's pieces) on the bench_attention shapes (Lq 4680, Lk 4680..32760, 12 x 128 heads, bf16,
1560-token shuffled pages) at each block_n. Every variant's output is checked against
PyTorch's SDPA on the same keys before it is timed; FA3 (when importable) is timed on the same
data for the ratio. A patch that no longer applies (the source moved on) is reported and skipped.

GPU machine, from the repository root (after bench/gpu_env.sh built the package):
    python3 bench/attention_variants.py [--variants cur,no_pp,...] [--block-n 112,176] [--splits 0] [--rounds 3]
    ncu ... python3 bench/attention_variants.py --profile cur,no_pp --lk 18720 --block-n 112
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import functools
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import common  # noqa: E402
from bench_attention import HEAD_DIM, HEADS, LKS, LQ, PAGE, _import_fa3, make_plan, paged_layout  # noqa: E402

from spiral_rt.kernels.chunk_attention import merge_pieces  # noqa: E402
from spiral_rt.ops.chunk_attention import AttentionConfig  # noqa: E402

SOURCE = ROOT / "csrc" / "chunk_attention_sm90.cu"
BUILD = Path("/tmp/attention_variants")

ENTRY = r"""
extern "C" int av_launch(const void* q, const void* k, const void* v, void* o, float* lse, float* part_o,
                         float* part_lse, const int32_t* work, const int32_t* tiles, long long q_row_stride,
                         long long total_q, long long num_work, long long num_pieces, long long num_pages,
                         int page_size, int heads, int kv_heads, int block_n, float scale, void* stream) {
  spiral_rt::ChunkAttentionArgs a;
  a.q = q; a.k = k; a.v = v; a.o = o; a.lse = lse; a.partial_o = part_o; a.partial_lse = part_lse;
  a.work = work; a.tiles = tiles; a.q_row_stride = q_row_stride; a.total_q = total_q; a.num_work = num_work;
  a.num_pieces = num_pieces; a.num_pages = num_pages; a.page_size = page_size; a.num_heads = heads;
  a.num_kv_heads = kv_heads; a.head_dim = 128; a.block_n = block_n; a.sm_scale = scale;
  a.dtype = spiral_rt::DType::kBFloat16;
  int device = 0;
  cudaGetDevice(&device);
  return spiral_rt::chunk_attention_sm90_launch(a, device, stream);
}
"""

def _replace(old: str, new: str):
    def patch(src: str) -> str:
        if old not in src:
            raise LookupError(f"text not found: {old[:60]!r}")
        return src.replace(old, new)
    return patch


_HINTED_WAIT = """__device__ __forceinline__ void mbar_wait_hinted(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\\n.reg .pred done;\\n"
      "WAIT:\\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1, 1000000;\\n"
      "@!done bra WAIT;\\n}\\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

__device__ __forceinline__ void tma_load_2d("""

PATCHES = {  # each a list of source -> source functions; they apply to csrc as of the commit named
    "cur": [],
    # every wgmma descriptor built from its address instead of offsets to three precomputed ones
    "desc_each": [
        _replace("q_desc + (((kk / 4) * kQHalfBytes + off) >> 4)",
                 "smem_desc(base + L::kQ + 2 * c * kQHalfBytes + (kk / 4) * kQHalfBytes + off, 16)"),
        _replace("k_stage + (((kk / 4) * BN * kHalfBytes + off) >> 4)",
                 "smem_desc(base + L::kK + stage_of(t) * L::kTileBytes + (kk / 4) * BN * kHalfBytes + off, 16)"),
        _replace("v_stage + ((kk * 16 * kHalfBytes) >> 4)",
                 "smem_desc(base + L::kV + v_offset + kk * 16 * kHalfBytes, BN * kHalfBytes)")],
    # the producer's waits for free buffers suspend (up to 1 ms) instead of spinning
    "hint": [_replace("__device__ __forceinline__ void tma_load_2d(", _HINTED_WAIT),
             _replace("mbar_wait(bar_k_free(s), phase ^ 1);", "mbar_wait_hinted(bar_k_free(s), phase ^ 1);"),
             _replace("mbar_wait(bar_v_free(s), phase ^ 1);", "mbar_wait_hinted(bar_v_free(s), phase ^ 1);")],
    # one free-barrier arrival per consumer warp instead of per thread
    "warp_arrive": [_replace("mbar_init(bar_k_free(s), 2 * 128);", "mbar_init(bar_k_free(s), 2 * 4);"),
                    _replace("mbar_init(bar_v_free(s), 2 * 128);", "mbar_init(bar_v_free(s), 2 * 4);"),
                    _replace("__device__ __forceinline__ void mbar_arrive(uint32_t bar) {\n  asm volatile(",
                             "__device__ __forceinline__ void mbar_arrive(uint32_t bar) {\n  __syncwarp();\n"
                             "  if (threadIdx.x % 32 == 0) asm volatile(")],
    # no scheduler barrier between the two consumers
    "no_pp": [_replace('auto wait_turn = [&]() { asm volatile("bar.sync %0, 256;" ::"r"(3 + c) : "memory"); };',
                       "auto wait_turn = [&]() {};"),
              _replace('auto pass_turn = [&]() { asm volatile("bar.arrive %0, 256;" ::"r"(4 - c) : "memory"); };',
                       "auto pass_turn = [&]() {};"),
              _replace('if (c == 0) asm volatile("bar.arrive 3, 256;" ::: "memory");', "")],
    # one CTA per work item instead of one persistent CTA per SM
    "nonpersistent": [_replace("p.num_whole = static_cast<int>(a.num_work - a.num_pieces);", "p.num_whole = 0;")],
    # every short tile's V rows past its keys zeroed, also at a page end where TMA filled zeros
    "zero_all": [_replace("return valid_in(word) < BN && (word & 0xFFFF) + valid_in(word) < p.page_size;",
                          "return valid_in(word) < BN;")],
    # the warpgroup index from threadIdx directly (not through a warp broadcast): the S wgmmas'
    # Q descriptors then sit in vector registers, each moved to a uniform one (R2UR) before its MMA
    "thread_wg": [_replace("const int wg = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x / 128), 0), tid",
                           "const int wg = threadIdx.x / 128, tid")],
    # the ring stage and phase by signed division, each V descriptor offset from stage 0's
    "signed_stage": [_replace("return static_cast<int>(static_cast<uint32_t>(t + shift) % STAGES);",
                              "return (t + shift) % STAGES;"),
                     _replace("return (static_cast<uint32_t>(t + shift) / STAGES) & 1u;",
                              "return static_cast<uint32_t>(((t + shift) / STAGES) & 1);"),
                     _replace("v_stage + ((kk * 16 * kHalfBytes) >> 4)", "v_desc + ((v_offset + kk * 16 * kHalfBytes) >> 4)")],
    # the register split before FA3's (producer 40, consumers 232)
    "reg232": [_replace("setmaxnreg.dec.sync.aligned.u32 24;", "setmaxnreg.dec.sync.aligned.u32 40;"),
               _replace("setmaxnreg.inc.sync.aligned.u32 240;", "setmaxnreg.inc.sync.aligned.u32 232;")],
}


def variant_source(name: str) -> str:
    src = SOURCE.read_text()
    for part in name.split("+"):
        for patch in PATCHES[part]:
            src = patch(src)
    return src + ENTRY


def build(name: str) -> tuple[str, Path | None, str]:
    """Compile one variant; returns (name, library or None, a one-line build report)."""
    try:
        src = variant_source(name)
    except LookupError as err:
        return name, None, f"patch does not apply: {err}"
    d = BUILD / name.replace("+", "_")
    d.mkdir(parents=True, exist_ok=True)
    (d / "k.cu").write_text(src)
    cmd = ["nvcc", "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-gencode", "arch=compute_90a,code=sm_90a",
           "-Xptxas", "-v", f"-I{ROOT / 'csrc'}", "-o", str(d / "lib.so"), str(d / "k.cu")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    log = res.stdout + res.stderr
    if res.returncode != 0:
        return name, None, "build failed: " + log[-400:]
    injected = len(re.findall(r"C7519", log))
    spills = sorted(set(re.findall(r"(\d+) bytes spill stores", log)))
    return name, d / "lib.so", f"C7519 x{injected}, spill stores {','.join(spills)}"


def launcher(lib: Path):
    fn = ctypes.CDLL(str(lib)).av_launch
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_longlong] * 5 + [ctypes.c_int] * 4 + [ctypes.c_float, ctypes.c_void_p]

    def run(q, k_pages, v_pages, plan, o, lse, part_o, part_lse, block_n):
        """The op's CUDA path with this variant's kernel: launch, then merge the plan's pieces."""
        err = fn(q.data_ptr(), k_pages.data_ptr(), v_pages.data_ptr(), o.data_ptr(), lse.data_ptr(), part_o.data_ptr(),
                 part_lse.data_ptr(), plan.cuda_work.data_ptr(), plan.cuda_tiles.data_ptr(), q.stride(0), q.shape[0],
                 plan.cuda_work.shape[0], plan.cuda_pieces, k_pages.shape[0], k_pages.shape[1], HEADS,
                 k_pages.shape[2], block_n, HEAD_DIM ** -0.5, torch.cuda.current_stream().cuda_stream)
        if err:
            raise RuntimeError(f"launch failed: cudaError {err}")
        if plan.cuda_pieces:
            merge_pieces(part_o, part_lse, plan.cuda_merge, o, lse)
    return run


def inputs(lk: int):
    torch.manual_seed(lk)
    num_pages, (pages,) = paged_layout([[lk // PAGE]])
    k_pages = torch.randn(num_pages, PAGE, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v_pages = torch.randn_like(k_pages)
    q = torch.randn(LQ, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    return q, k_pages, v_pages, pages, num_pages


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="cur,thread_wg,signed_stage,thread_wg+signed_stage")
    ap.add_argument("--block-n", default="112,176")
    ap.add_argument("--lk", default=",".join(map(str, LKS)))
    ap.add_argument("--rep-ms", type=float, default=300)
    ap.add_argument("--splits", type=int, default=0, help="AttentionConfig.num_splits (0: the plan's choice)")
    ap.add_argument("--rounds", type=int, default=1, help="time every variant this many times, interleaved")
    ap.add_argument("--profile", help="comma-separated variants to run (after FA3) three times each, untimed, for ncu")
    args = ap.parse_args()
    names = (args.profile or args.variants).split(",")
    block_ns = [int(b) for b in args.block_n.split(",")]
    lks = [int(x) for x in args.lk.split(",")]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        built = list(pool.map(build, names))
    runners = {}
    for name, lib, report in built:
        print(f"{name:28s} {report}", file=sys.stderr)
        if lib is not None:
            runners[name] = launcher(lib)
    fa3 = _import_fa3()
    rows = []
    for lk in lks:
        q, k_pages, v_pages, pages, num_pages = inputs(lk)
        flops = 4 * LQ * lk * HEADS * HEAD_DIM
        idx = torch.tensor(pages, device="cuda")
        k = k_pages[idx].reshape(1, lk, HEADS, HEAD_DIM)
        v = v_pages[idx].reshape(1, lk, HEADS, HEAD_DIM)
        row = {"Lk": lk}
        ref = F.scaled_dot_product_attention(q[None].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        ref = ref[0].transpose(0, 1)
        timed = {}  # column -> zero-argument call
        if fa3 is not None:
            timed["fa3"] = lambda: fa3.flash_attn_func(q[None], k, v)
        for bn in block_ns:
            plan = make_plan([LQ], [pages], num_pages, AttentionConfig(cuda_block_n=bn, num_splits=args.splits))
            o, lse = torch.empty_like(q), torch.empty(LQ, HEADS, device="cuda")
            part_o = torch.empty(max(plan.cuda_pieces, 1), 128, HEAD_DIM, device="cuda")
            part_lse = torch.empty(max(plan.cuda_pieces, 1), 128, device="cuda")
            for name, run in runners.items():
                call = functools.partial(run, q, k_pages, v_pages, plan, o, lse, part_o, part_lse, bn)
                call()
                torch.cuda.synchronize()
                err = (o.float() - ref.float()).abs().max().item()
                if not err < 2e-2:
                    print(f"{name} n{bn} Lk {lk}: max |O - SDPA's O| = {err:.3g}, not timed", file=sys.stderr)
                    continue
                timed[f"{name} n{bn}"] = call
        if args.profile:
            for call in timed.values():
                for _ in range(3):
                    call()
        else:
            times = {c: [] for c in timed}
            for _ in range(args.rounds):
                for c, call in timed.items():
                    times[c].append(common.time_ms(call, rep_ms=args.rep_ms)["median_ms"])
            row.update({c: flops / statistics.median(t) / 1e9 for c, t in times.items()})
        rows.append(row)
        print(row, file=sys.stderr)
    if args.profile:
        torch.cuda.synchronize()
        return
    cols = [c for c in rows[0] if c != "Lk"]
    print(f"TFLOP/s, num_splits {args.splits} (0: the plan's choice), median of {args.rounds} round(s); fa3: dense K/V")
    print(f"{'variant':34s}" + "".join(f"{r['Lk']:>9d}" for r in rows))
    for c in cols:
        print(f"{c:34s}" + "".join(f"{r.get(c, float('nan')):9.1f}" for r in rows))


if __name__ == "__main__":
    main()
