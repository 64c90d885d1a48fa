"""Stage annotation for the engine: nvtx ranges (Nsight) and optional per-stage timing.

Every stage of the chunk loop (text, plan, each denoising step, clean pass, re-cache, VAE) runs
inside ``Stages.__call__(name)``: on CUDA an nvtx range is pushed (a no-op elsewhere), and with
timing on, a pair of CUDA events is recorded on the stage's stream (perf_counter on the CPU).
Recording never synchronises; ``summary()`` does, once, when the numbers are read.
``profile_trace(path)`` wraps a block in ``torch.profiler`` and writes a Chrome trace.

Boundaries: measurement only; the engine decides what a stage is.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from typing import Iterator

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
