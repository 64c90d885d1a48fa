"""Probe: how much do the DiT's linears gain from another cuBLASLt algorithm than the one torch takes?

torch calls cuBLASLt with the first algorithm of its heuristic. This script asks the same library
(the libcublasLt torch loaded, through ctypes) for up to --algos candidates per shape and times each
in a CUDA graph of back-to-back calls on distinct inputs (bench/common.time_per_call_ms), next to
torch's own call of the same shape. Each candidate's output is checked against torch's first.

Shapes: y (M, N) = x (M, K) W^T + b, bf16, the DiT's four linear kinds at M = 4680 (one chunk) and
37440 (a G = 8 batch); the FFN up-projection with the tanh-GELU epilogue (GELU_BIAS).

    python bench/cublaslt_algos.py [--m 4680,37440] [--algos 24]
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, time_per_call_ms, write_result  # noqa: E402

COMPUTE_32F, R_32F, R_16BF = 68, 0, 14
DESC_TRANSA, DESC_TRANSB, DESC_EPILOGUE, DESC_BIAS_POINTER = 3, 4, 7, 8
EPI_BIAS, EPI_GELU_BIAS = 4, 36
PREF_MAX_WORKSPACE = 1
CFG_NAMES = {0: "id", 1: "tile", 2: "splitk", 3: "reduction", 4: "swizzle", 5: "custom", 6: "stages", 7: "inner",
             8: "cluster"}
WORKSPACE = 32 << 20


class Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class Heuristic(ctypes.Structure):
    _fields_ = [("algo", Algo), ("workspace", ctypes.c_size_t), ("state", ctypes.c_int), ("waves", ctypes.c_float),
                ("reserved", ctypes.c_int * 4)]


def load_lt() -> ctypes.CDLL:
    torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")  # makes torch load cuBLASLt
    with open("/proc/self/maps") as f:
        paths = sorted({line.split()[-1] for line in f if "libcublasLt" in line})
    if not paths:
        raise RuntimeError("libcublasLt is not loaded in this process")
    return ctypes.CDLL(paths[0])


def check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what}: cublasStatus {status}")


class LtLinear:
    """y = epilogue(x W^T + b) for one (M, K, N) in row-major bf16, as column-major D (N, M) = op(W) x."""

    def __init__(self, lt, handle, m: int, k: int, n: int, gelu: bool):
        self.lt, self.handle, self.m, self.k, self.n = lt, handle, m, k, n
        self.desc = ctypes.c_void_p()
        check(lt.cublasLtMatmulDescCreate(ctypes.byref(self.desc), COMPUTE_32F, R_32F), "desc")
        for attr, val in ((DESC_TRANSA, 1), (DESC_TRANSB, 0), (DESC_EPILOGUE, EPI_GELU_BIAS if gelu else EPI_BIAS)):
            v = ctypes.c_int32(val)
            check(lt.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(v), ctypes.c_size_t(4)), f"attr {attr}")
        self.a, self.b, self.d = (ctypes.c_void_p() for _ in range(3))
        check(lt.cublasLtMatrixLayoutCreate(ctypes.byref(self.a), R_16BF, ctypes.c_uint64(k), ctypes.c_uint64(n),
                                            ctypes.c_int64(k)), "A")
        check(lt.cublasLtMatrixLayoutCreate(ctypes.byref(self.b), R_16BF, ctypes.c_uint64(k), ctypes.c_uint64(m),
                                            ctypes.c_int64(k)), "B")
        check(lt.cublasLtMatrixLayoutCreate(ctypes.byref(self.d), R_16BF, ctypes.c_uint64(n), ctypes.c_uint64(m),
                                            ctypes.c_int64(n)), "D")
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
        self.workspace = torch.empty(WORKSPACE, dtype=torch.uint8, device="cuda")

    def candidates(self, count: int) -> list[Heuristic]:
        pref = ctypes.c_void_p()
        check(self.lt.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "pref")
        ws = ctypes.c_uint64(WORKSPACE)
        check(self.lt.cublasLtMatmulPreferenceSetAttribute(pref, PREF_MAX_WORKSPACE, ctypes.byref(ws), ctypes.c_size_t(8)), "pref ws")
        results = (Heuristic * count)()
        found = ctypes.c_int(0)
        check(self.lt.cublasLtMatmulAlgoGetHeuristic(self.handle, self.desc, self.a, self.b, self.d, self.d, pref,
                                                      count, results, ctypes.byref(found)), "heuristic")
        self.lt.cublasLtMatmulPreferenceDestroy(pref)
        return [results[i] for i in range(found.value) if results[i].state == 0]

    def config(self, h: Heuristic) -> dict:
        out = {}
        for attr, name in CFG_NAMES.items():
            size = ctypes.c_size_t(0)  # asked with no buffer first: the attribute's size
            self.lt.cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(h.algo), attr, None, ctypes.c_size_t(0),
                                                         ctypes.byref(size))
            v, written = ctypes.c_uint64(0), ctypes.c_size_t(0)
            if 0 < size.value <= 8 and self.lt.cublasLtMatmulAlgoConfigGetAttribute(
                    ctypes.byref(h.algo), attr, ctypes.byref(v), size, ctypes.byref(written)) == 0:
                out[name] = int(v.value)
        return out

    def run(self, x, w, bias, out, h: Heuristic) -> None:
        bp = ctypes.c_void_p(bias.data_ptr())
        check(self.lt.cublasLtMatmulDescSetAttribute(self.desc, DESC_BIAS_POINTER, ctypes.byref(bp), ctypes.c_size_t(8)), "bias")
        check(self.lt.cublasLtMatmul(
            self.handle, self.desc, ctypes.byref(self.alpha), ctypes.c_void_p(w.data_ptr()), self.a,
            ctypes.c_void_p(x.data_ptr()), self.b, ctypes.byref(self.beta), ctypes.c_void_p(out.data_ptr()), self.d,
            ctypes.c_void_p(out.data_ptr()), self.d, ctypes.byref(h.algo), ctypes.c_void_p(self.workspace.data_ptr()),
            ctypes.c_size_t(WORKSPACE), ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)), "matmul")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="4680,37440")
    ap.add_argument("--algos", type=int, default=24)
    ap.add_argument("--calls", type=int, default=8)
    args = ap.parse_args(argv)
    lt = load_lt()
    handle = ctypes.c_void_p()
    check(lt.cublasLtCreate(ctypes.byref(handle)), "create")
    shapes = [("qkv", 1536, 4608, False), ("proj1536", 1536, 1536, False), ("ffn_up_gelu", 1536, 8960, True),
              ("ffn_down", 8960, 1536, False)]
    rows = []
    torch.manual_seed(0)
    for m in [int(v) for v in args.m.split(",")]:
        for name, k, n, gelu in shapes:
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
            b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(args.calls)]
            flops = 2 * m * n * k

            def torch_call(x):
                if gelu:
                    return torch._addmm_activation(b, x, w.t(), use_gelu=True)
                return torch.nn.functional.linear(x, w, b)

            ref = torch_call(xs[0])
            t = time_per_call_ms([lambda x=x: torch_call(x) for x in xs])["median_ms"]
            rows.append({"m": m, "shape": name, "algo": "torch", "us": t * 1e3, "tflops": flops / t / 1e9})
            base = t
            op = LtLinear(lt, handle, m, k, n, gelu)
            for i, h in enumerate(op.candidates(args.algos)):
                outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in xs]
                try:
                    op.run(xs[0], w, b, outs[0], h)
                    torch.cuda.synchronize()
                except RuntimeError as exc:
                    rows.append({"m": m, "shape": name, "algo": i, "error": str(exc)})
                    continue
                err = ((outs[0].float() - ref.float()).norm() / ref.float().norm()).item()
                t = time_per_call_ms([lambda x=x, o=o: op.run(x, w, b, o, h) for x, o in zip(xs, outs)])["median_ms"]
                rows.append({"m": m, "shape": name, "algo": i, "us": t * 1e3, "tflops": flops / t / 1e9,
                             "vs_torch": base / t, "rel_err": err, "workspace": h.workspace, "waves": h.waves,
                             **op.config(h)})
            best = max((r for r in rows if r["m"] == m and r["shape"] == name and "vs_torch" in r),
                       key=lambda r: r["vs_torch"], default=None)
            if best:
                print(f"{name} M={m}: torch {flops / base / 1e9:.0f} TFLOP/s, best algo {best['algo']} "
                      f"{best['tflops']:.0f} ({best['vs_torch']:.3f}x) cfg {({k: best.get(k) for k in CFG_NAMES.values()})}",
                      flush=True)
    print_table(rows, ["m", "shape", "algo", "us", "tflops", "vs_torch", "rel_err", "tile", "stages", "cluster",
                       "custom", "swizzle", "splitk", "workspace", "waves"])
    write_result("cublaslt_algos", {"m": args.m, "algos": args.algos, "calls": args.calls, "dtype": "bfloat16"}, rows)


if __name__ == "__main__":
    main()
