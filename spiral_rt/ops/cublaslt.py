"""cuBLASLt through ctypes: y = epilogue(x W^T + b) with an algorithm chosen by timing, not by the
library's first guess.

torch runs every linear with the first algorithm of cuBLASLt's heuristic. On the DiT's shapes the
heuristic's other candidates are up to 8% faster (bench/results/cublaslt_algos.json, H100, M = 4680
tokens: FFN down 666 -> 722 TFLOP/s, FFN up with the GELU epilogue 579 -> 615, 1536 x 1536
637 -> 659; bench/bench_linear.py times them against torch's call). A
``LtLinear`` is one problem (device, dtype, M, K, N, x's row stride, bias or not, GELU or not):
descriptors built once, the heuristic's candidates (up to ``CANDIDATES``) timed once in CUDA graphs
on scratch copies of the operands, the fastest kept for every later call. Calls record into CUDA graphs; a
problem first met while a graph is being captured takes the heuristic's first candidate (torch's
choice: timing needs a synchronisation, which capture forbids) and is never re-timed.

The library is the libcublasLt torch already loaded (found in /proc/self/maps, else by soname), so
no header or link step is needed; the few enums used are cuBLASLt's stable ABI values.

Boundaries: forward only (no autograd), 16-bit row-major operands on CUDA with 16-byte aligned
pointers and row strides, output contiguous; ``spiral_rt.ops.linear`` checks arguments and decides
when this path applies.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

CANDIDATES = 8
"""Heuristic candidates timed per problem (cuBLASLt returns at most 8 for these problems on Hopper)."""
WORKSPACE_BYTES = 4 << 20
"""Workspace offered to the algorithms (the DiT's winners use 0-4 bytes)."""
MIN_TUNED_FLOP = 2e9
"""Below this a call takes a few microseconds and launch cost dominates: no timing, first candidate."""

_COMPUTE_32F, _R_32F = 68, 0
_DATA_TYPE = {torch.bfloat16: 14, torch.float16: 2}
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER = 3, 4, 7, 8
_OP_N, _OP_T = 0, 1
_EPILOGUE = {(False, False): 1, (True, False): 4, (False, True): 32, (True, True): 36}  # (bias, gelu)
_PREF_MAX_WORKSPACE = 1


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", _Algo), ("workspace", ctypes.c_size_t), ("state", ctypes.c_int), ("waves", ctypes.c_float),
                ("reserved", ctypes.c_int * 4)]


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_handles: dict[int, ctypes.c_void_p] = {}
_workspaces: dict[tuple[int, int], torch.Tensor] = {}


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLASLt {what} failed (cublasStatus_t {status})")


def library() -> ctypes.CDLL:
    """The libcublasLt that torch loaded (loading it through torch first if needed)."""
    global _lib
    if _lib is None:
        with _lock:
            if _lib is None:
                torch.cuda.init()
                paths: list[str] = []
                try:
                    with open("/proc/self/maps") as f:
                        paths = sorted({line.split()[-1] for line in f if "libcublasLt.so" in line})
                except OSError:
                    pass
                major = (torch.version.cuda or "13").split(".")[0]
                _lib = ctypes.CDLL(paths[0] if paths else f"libcublasLt.so.{major}")
    return _lib


def available() -> bool:
    """Whether this process can call cuBLASLt directly (a CUDA build of torch, a GPU, the library)."""
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return False
    try:
        library()
    except OSError:
        return False
    return True


def _handle(device: int) -> ctypes.c_void_p:
    if device not in _handles:
        h = ctypes.c_void_p()
        with torch.cuda.device(device):
            _check(library().cublasLtCreate(ctypes.byref(h)), "cublasLtCreate")
        _handles[device] = h
    return _handles[device]


def _workspace(device: int, stream: int) -> torch.Tensor:
    """One workspace per stream (two streams never share one); allocated on first use and kept, so
    one allocated during a capture lives as long as the graphs that use it."""
    key = (device, stream)
    if key not in _workspaces:
        _workspaces[key] = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=f"cuda:{device}")
    return _workspaces[key]


@dataclass(frozen=True)
class Problem:
    device: int
    dtype: torch.dtype
    m: int
    k: int
    n: int
    ld_x: int  # x's row stride in elements
    bias: bool
    gelu: bool

    @property
    def flop(self) -> float:
        return 2.0 * self.m * self.n * self.k


class LtLinear:
    """One problem's descriptors and chosen algorithm. Row-major y (M, N) = x (M, K) W^T is column-major
    D (N, M) = op_T(W as K x N) x (as K x M): A = W with TRANSA, B = x, the bias along D's rows."""

    def __init__(self, problem: Problem):
        lt = library()
        p = problem
        self.problem = p
        self.lt = lt
        self.handle = _handle(p.device)
        dtype = _DATA_TYPE[p.dtype]
        self.desc = ctypes.c_void_p()
        _check(lt.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _COMPUTE_32F, _R_32F), "MatmulDescCreate")
        for attr, value in ((_DESC_TRANSA, _OP_T), (_DESC_TRANSB, _OP_N), (_DESC_EPILOGUE, _EPILOGUE[(p.bias, p.gelu)])):
            v = ctypes.c_int32(value)
            _check(lt.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(v), ctypes.c_size_t(4)),
                   f"MatmulDescSetAttribute({attr})")
        self.a, self.b, self.d = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        for layout, rows, cols, ld in ((self.a, p.k, p.n, p.k), (self.b, p.k, p.m, p.ld_x), (self.d, p.n, p.m, p.n)):
            _check(lt.cublasLtMatrixLayoutCreate(ctypes.byref(layout), dtype, ctypes.c_uint64(rows),
                                                 ctypes.c_uint64(cols), ctypes.c_int64(ld)), "MatrixLayoutCreate")
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
        self.candidates = self._heuristic()
        if not self.candidates:
            raise RuntimeError(f"cuBLASLt has no algorithm for {p}")
        self.chosen = 0
        self.timed_us: list[float] | None = None
        self._lock = threading.Lock()  # the bias pointer lives in the shared descriptor until the call

    def _heuristic(self) -> list[_Heuristic]:
        pref = ctypes.c_void_p()
        _check(self.lt.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "MatmulPreferenceCreate")
        try:
            ws = ctypes.c_uint64(WORKSPACE_BYTES)
            _check(self.lt.cublasLtMatmulPreferenceSetAttribute(pref, _PREF_MAX_WORKSPACE, ctypes.byref(ws),
                                                                ctypes.c_size_t(8)), "MatmulPreferenceSetAttribute")
            results = (_Heuristic * CANDIDATES)()
            found = ctypes.c_int(0)
            _check(self.lt.cublasLtMatmulAlgoGetHeuristic(self.handle, self.desc, self.a, self.b, self.d, self.d, pref,
                                                          CANDIDATES, results, ctypes.byref(found)), "AlgoGetHeuristic")
        finally:
            self.lt.cublasLtMatmulPreferenceDestroy(pref)
        return [results[i] for i in range(found.value) if results[i].state == 0]

    def run(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
            candidate: int | None = None) -> None:
        """out = epilogue(x weight^T + bias) on the current stream with the chosen (or given) candidate."""
        algo = self.candidates[self.chosen if candidate is None else candidate]
        stream = torch.cuda.current_stream(x.device).cuda_stream
        ws = _workspace(self.problem.device, stream)
        with self._lock:  # ctypes releases the GIL: another thread must not swap the bias in between
            if bias is not None:
                ptr = ctypes.c_void_p(bias.data_ptr())
                _check(self.lt.cublasLtMatmulDescSetAttribute(self.desc, _DESC_BIAS_POINTER, ctypes.byref(ptr),
                                                              ctypes.c_size_t(8)), "MatmulDescSetAttribute(bias)")
            _check(self.lt.cublasLtMatmul(
                self.handle, self.desc, ctypes.byref(self.alpha), ctypes.c_void_p(weight.data_ptr()), self.a,
                ctypes.c_void_p(x.data_ptr()), self.b, ctypes.byref(self.beta), ctypes.c_void_p(out.data_ptr()),
                self.d, ctypes.c_void_p(out.data_ptr()), self.d, ctypes.byref(algo.algo), ctypes.c_void_p(ws.data_ptr()),
                ctypes.c_size_t(WORKSPACE_BYTES), ctypes.c_void_p(stream)), "Matmul")

    def tune(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rounds: int = 5,
             calls: int = 8) -> None:
        """Time every candidate on scratch copies of the operands (several sets, together at least
        twice L2, so the weights come from DRAM as they do between a model's layers): each
        candidate's ``calls`` back-to-back calls captured in a CUDA graph (as the engine runs them:
        eager timing ranked candidates differently, bench/NOTES.md session 14), its replays timed in
        interleaved rounds; keep the fastest median. Synchronises the device; never inside a capture."""
        if len(self.candidates) == 1 or self.problem.flop < MIN_TUNED_FLOP:
            return
        p = self.problem
        set_bytes = 2 * (x.numel() + weight.numel() + p.m * p.n)
        sets = max(1, min(4, -(-(100 << 20) // set_bytes)))
        scratch = []
        for _ in range(sets):
            xs = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device).copy_(x)  # x's row stride
            scratch.append((xs, weight.clone(), None if bias is None else bias.clone(),
                            torch.empty(p.m, p.n, dtype=p.dtype, device=x.device)))
        stream = torch.cuda.Stream(x.device)
        _workspace(p.device, stream.cuda_stream)  # allocated outside the captures
        graphs = []
        for i in range(len(self.candidates)):
            self.run(*scratch[0], candidate=i)  # first launch loads the kernel (not capturable)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=stream, capture_error_mode="thread_local"):
                for c in range(calls):
                    self.run(*scratch[c % sets], candidate=i)
            g.replay()  # warm-up
            graphs.append(g)
        per_round = [[] for _ in self.candidates]
        for _ in range(rounds):
            for i, g in enumerate(graphs):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                g.replay()
                end.record()
                per_round[i].append((start, end))
        torch.cuda.synchronize(x.device)
        medians = []
        for events in per_round:
            times = sorted(s.elapsed_time(e) * 1e3 / calls for s, e in events)
            medians.append(times[len(times) // 2])
        del graphs
        _workspaces.pop((p.device, stream.cuda_stream), None)
        self.timed_us = medians
        self.chosen = min(range(len(medians)), key=medians.__getitem__)
        logger.debug("cuBLASLt %s: candidates %s us, chose %d", p, [round(t, 1) for t in medians], self.chosen)


_plans: dict[Problem, LtLinear] = {}


def plan(problem: Problem, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> LtLinear:
    """The problem's LtLinear, built (and timed, unless a graph is being captured) on first use."""
    lin = _plans.get(problem)
    if lin is None:
        lin = LtLinear(problem)
        if not torch.cuda.is_current_stream_capturing():
            lin.tune(x, weight, bias)
        _plans[problem] = lin
    return lin
