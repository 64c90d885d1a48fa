"""Stage annotation for the engine: nvtx ranges (Nsight) and optional per-stage timing.

Every stage of the chunk loop (text, plan, each denoising step, clean pass, re-cache, VAE) runs
inside ``Stages.__call__(name)``: on CUDA an nvtx range is pushed (a no-op elsewhere), and with
timing on, a pair of CUDA events is recorded on the stage's stream (perf_counter on the CPU).
Recording never synchronises; ``summary()`` does, once, when the numbers are read.
``profile_trace(path)`` wraps a block in ``torch.profiler`` and writes a Chrome trace.
``kernel_timeline(prof)`` and ``stream_overlap(kernels)`` read such a profile by CUDA stream: how long
each stream was busy and, per kernel, how much of its run shared the GPU with another stream's
kernels (the VAE's side stream stretches whatever DiT kernel it overlaps, so a per-kernel table
of a run with both is not the kernels' own speed). ``idle_before(kernels)`` sums, per kernel, the
idle time of its stream just before each run (the boundaries between kernels, where a CUDA graph
still loses ~1 us each), and ``launch_sources(prof, pattern)`` names the CPU ops that launched the
device activities matching a pattern (an eager profile: inside a graph replay every kernel's
launcher is the replay).

Boundaries: measurement only; the engine decides what a stage is.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

logger = logging.getLogger(__name__)


class Stages:
    """nvtx ranges and (optional) timings of named stages."""

    def __init__(self, device: torch.device, timing: bool = False):
        self.cuda = device.type == "cuda"
        self.timing = timing
        self._records: list[tuple[str, object, object]] = []
        self._suspended = 0

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """No timing events inside the block (e.g. while a CUDA graph is captured); nvtx stays on."""
        self._suspended += 1
        try:
            yield
        finally:
            self._suspended -= 1

    @contextlib.contextmanager
    def __call__(self, name: str, stream: "torch.cuda.Stream | None" = None) -> Iterator[None]:
        if self.cuda:
            torch.cuda.nvtx.range_push(name)
        start = None
        timing = self.timing and not self._suspended
        if timing:
            if self.cuda:
                start = torch.cuda.Event(enable_timing=True)
                start.record(stream)
            else:
                start = time.perf_counter()
        try:
            yield
        finally:
            if timing:
                if self.cuda:
                    end = torch.cuda.Event(enable_timing=True)
                    end.record(stream)
                else:
                    end = time.perf_counter()
                self._records.append((name, start, end))
            if self.cuda:
                torch.cuda.nvtx.range_pop()

    def reset(self) -> None:
        self._records.clear()

    def summary(self) -> dict[str, dict[str, float]]:
        """Per stage name: count, total_ms, median_ms (synchronises with the device once)."""
        if self.cuda and self._records:
            torch.cuda.synchronize()
        times: dict[str, list[float]] = {}
        for name, start, end in self._records:
            ms = start.elapsed_time(end) if self.cuda else (end - start) * 1e3
            times.setdefault(name, []).append(ms)
        return {name: {"count": len(v), "total_ms": sum(v), "median_ms": statistics.median(v)} for name, v in times.items()}


@contextlib.contextmanager
def profile_trace(path: str | None) -> Iterator[object]:
    """Run the block under ``torch.profiler`` (CPU + CUDA activities) and write a Chrome trace to ``path``.

    ``path=None`` runs the block unprofiled.
    """
    if path is None:
        yield None
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
        yield prof
    prof.export_chrome_trace(str(path))
    logger.info("profiler trace written to %s", path)


@dataclass(frozen=True)
class KernelRun:
    """One GPU kernel (or memcpy / memset) run of a profile: name, stream, [start_ns, end_ns)."""

    name: str
    stream: int
    start_ns: int
    end_ns: int


def kernel_timeline(prof) -> list[KernelRun]:
    """The CUDA device activities of a finished ``torch.profiler.profile``, with their streams."""
    cuda = torch.autograd.DeviceType.CUDA
    return [KernelRun(e.name(), e.device_resource_id(), e.start_ns(), e.end_ns())
            for e in prof.profiler.kineto_results.events() if e.device_type() == cuda and e.end_ns() > e.start_ns()]


def _by_stream(kernels: list[KernelRun]) -> dict[int, list[KernelRun]]:
    """The runs of each stream, in start order."""
    out: dict[int, list[KernelRun]] = {}
    for k in sorted(kernels, key=lambda k: k.start_ns):
        out.setdefault(k.stream, []).append(k)
    return out


def _union(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint [start, end) spans covering the given ones."""
    out: list[list[int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _covered(a: int, b: int, union: list[tuple[int, int]], starts: list[int]) -> int:
    """Length of [a, b) inside the disjoint sorted ``union`` (``starts``: its span starts)."""
    total = 0
    i = max(bisect.bisect_right(starts, a) - 1, 0)
    while i < len(union) and union[i][0] < b:
        lo, hi = max(a, union[i][0]), min(b, union[i][1])
        total += max(hi - lo, 0)
        i += 1
    return total


def stream_overlap(kernels: list[KernelRun]) -> dict:
    """How the streams of ``kernels`` shared the GPU.

    Returns ``{"span_ms": first start to last end, "streams": {stream: {"busy_ms", "kernels",
    "concurrent_ms"}}, "kernels": {(name, stream): {"calls", "total_ms", "concurrent_ms"}}}``, where
    busy is the union of a stream's runs and concurrent is the part of them during which another
    stream also had a run (kernels of one stream never overlap each other).
    """
    by_stream = _by_stream(kernels)
    unions = {s: _union((k.start_ns, k.end_ns) for k in ks) for s, ks in by_stream.items()}
    others = {s: _union(span for t, u in unions.items() if t != s for span in u) for s in unions}
    starts = {s: [a for a, _ in u] for s, u in others.items()}
    streams, rows = {}, {}
    for s, ks in by_stream.items():
        concurrent = 0
        for k in ks:
            c = _covered(k.start_ns, k.end_ns, others[s], starts[s])
            concurrent += c
            row = rows.setdefault((k.name, s), {"calls": 0, "total_ms": 0.0, "concurrent_ms": 0.0})
            row["calls"] += 1
            row["total_ms"] += (k.end_ns - k.start_ns) / 1e6
            row["concurrent_ms"] += c / 1e6
        busy = sum(b - a for a, b in unions[s])
        streams[s] = {"busy_ms": busy / 1e6, "kernels": len(ks), "concurrent_ms": concurrent / 1e6}
    span = (max(k.end_ns for k in kernels) - min(k.start_ns for k in kernels)) / 1e6 if kernels else 0.0
    return {"span_ms": span, "streams": streams, "kernels": rows}


def idle_before(kernels: list[KernelRun], stall_ns: int = 20_000) -> dict[str, dict]:
    """Per kernel name: ``calls``, ``idle_ms`` (the time its stream sat idle just before each of its runs,
    gaps shorter than ``stall_ns`` only: the boundaries between back-to-back kernels) and ``stalls``
    (the runs after a longer gap, which is host work or a wait, not a boundary). A stream's first run
    has no gap."""
    out: dict[str, dict] = {}
    for ks in _by_stream(kernels).values():
        end = None
        for k in ks:
            row = out.setdefault(k.name, {"calls": 0, "idle_ms": 0.0, "stalls": 0})
            row["calls"] += 1
            if end is not None:
                gap = k.start_ns - end
                if gap >= stall_ns:
                    row["stalls"] += 1
                elif gap > 0:
                    row["idle_ms"] += gap / 1e6
            end = k.end_ns if end is None else max(end, k.end_ns)
    return out


def launch_sources(prof, pattern: str) -> dict[str, int]:
    """Device activities whose name contains ``pattern``, counted by the chain of CPU ops that
    launched them (outermost first, e.g. "spiral_rt::linear > cudaMemsetAsync")."""
    counts: dict[str, int] = {}
    for evt in prof.events():
        matched = sum(1 for k in evt.kernels if pattern in k.name)
        if not matched:
            continue
        chain, node = [], evt
        while node is not None:
            chain.append(node.name)
            node = node.cpu_parent
        key = " > ".join(reversed(chain))
        counts[key] = counts.get(key, 0) + matched
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
