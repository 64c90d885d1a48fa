"""Shared helpers of the benchmarks: environment record, timing, tables and result files.

Every benchmark times with ``triton.testing.do_bench`` (CUDA events, warm-up, L2 flushed between
runs) and reports the median with p20/p80, prints a table, writes ``bench/results/<name>.json``
(gpu, torch, commit, date, settings, rows) and ends with one JSON line on stdout.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


PROMPT_TOKENS = 128
"""Tokens in the benchmarks' prompts (a Self-Forcing-style prompt of ~100 words); ``--prompt-tokens``."""


def prompt_embedding(tokens: int, text_dim: int, device, dtype) -> torch.Tensor:
    """A text encoder's output for a prompt of ``tokens`` tokens, (tokens, text_dim) random rows; the
    DiT's ``encode_text`` zero-pads it to ``text_len`` rows as Wan does, so the padding is as real."""
    return torch.randn(tokens, text_dim, device=device, dtype=dtype) * 0.1


def env_info() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=Path(__file__).parent).stdout.strip())
    except OSError:
        commit, dirty = None, False
    info = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        # SPIRAL_RT_COMMIT wins: the device machine's copy of the tree has no (or a stale) git history
        "commit": os.environ.get("SPIRAL_RT_COMMIT") or (commit + ("-dirty" if dirty else "") if commit else None),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def time_ms(fn, warmup_ms: float = 25, rep_ms: float = 200) -> dict:
    """Median and p20/p80 of ``fn``'s GPU time in ms (CUDA events; L2 flushed before each run)."""
    from triton.testing import do_bench

    med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}


def event_times_ms(fn, iters: int, warmup: int = 0) -> dict:
    """Median / p20 / p80 of fn's GPU time in ms, one pair of CUDA events per call, after ``warmup``
    calls: for work whose calls must each be timed (a stream's chunks, a model's forwards). On a
    CPU (smoke runs only) wall-clock time."""
    import statistics
    import time

    for _ in range(warmup):
        fn()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7]}


def graphed(fns):
    """One CUDA graph of one call of each function in ``fns``, back to back; returns its replay."""
    for fn in fns:
        fn()  # warm up: compile, allocate workspaces
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        # Each call's results stay alive until the capture ends, so no call's outputs reuse an
        # earlier call's memory: a reused output would stay in L2 and flatter the timing.
        outputs = [fn() for fn in fns]
    del outputs
    return graph.replay


def time_per_call_ms(fns, rep_ms: float = 200) -> dict:
    """``time_ms`` of a CUDA graph of back-to-back calls, divided by the number of calls: what a call
    costs inside a graph between other kernels (as the engine runs it), without the Python call or
    the graph launch. Give each call its own buffers, together larger than L2, so that every call
    reads from DRAM."""
    t = time_ms(graphed(fns), rep_ms=rep_ms)
    return {k: v / len(fns) for k, v in t.items()}


def buffer_sets(nbytes: int, l2_bytes: int = 50 << 20, most: int = 16) -> int:
    """How many distinct buffer sets a graph of back-to-back calls moving ``nbytes`` each needs so
    that consecutive calls never find their inputs in L2 (at least 4x L2 in all, 2 to ``most`` sets)."""
    return max(2, min(most, -(-4 * l2_bytes // max(1, nbytes))))


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second), in GB/s."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src))["median_ms"]
    return 2 * src.numel() / (t * 1e-3) / 1e9


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    widths = [max([len(c)] + [len(fmt(r.get(c, ""))) for r in rows]) for c in columns]  # rows may be empty
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).rjust(w) for c, w in zip(columns, widths)))


def write_result(name: str, settings: dict, rows: list[dict], extra: dict | None = None) -> dict:
    """Write bench/results/<name>.json and print it as the last line of output."""
    result = {"benchmark": name, **env_info(), "settings": settings, "results": rows, **(extra or {})}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    out = os.environ.get("OUT")
    if out:  # on the device machine: also hand the file back
        Path(out, f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result
