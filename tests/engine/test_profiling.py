"""Reading a profile (spiral_rt.engine.profiling): by CUDA stream, the idle time before kernels, and
who launched them, on synthetic runs and events."""

import random

import pytest

from types import SimpleNamespace

from spiral_rt.engine.profiling import KernelRun, idle_before, launch_sources, stream_overlap


def _brute_force(kernels):
    """Per-nanosecond reference: busy time per stream and each run's time shared with another stream."""
    lo = min(k.start_ns for k in kernels)
    hi = max(k.end_ns for k in kernels)
    busy_at = {}
    for k in kernels:
        for t in range(k.start_ns, k.end_ns):
            busy_at.setdefault(t, set()).add(k.stream)
    busy = {s: sum(1 for t in range(lo, hi) if s in busy_at.get(t, ())) for s in {k.stream for k in kernels}}
    shared = [sum(1 for t in range(k.start_ns, k.end_ns) if busy_at[t] - {k.stream}) for k in kernels]
    return busy, shared


def test_two_streams_by_hand():
    # main: [0, 10) and [12, 20); side: [5, 15). Shared: main 5 + 3, side 5 + 3.
    runs = [KernelRun("gemm", 7, 0, 10), KernelRun("gemm", 7, 12, 20), KernelRun("conv", 9, 5, 15)]
    out = stream_overlap(runs)
    assert out["span_ms"] == pytest.approx(20e-6)
    assert out["streams"][7] == {"busy_ms": pytest.approx(18e-6), "kernels": 2, "concurrent_ms": pytest.approx(8e-6)}
    assert out["streams"][9] == {"busy_ms": pytest.approx(10e-6), "kernels": 1, "concurrent_ms": pytest.approx(8e-6)}
    assert out["kernels"][("gemm", 7)]["calls"] == 2
    assert out["kernels"][("gemm", 7)]["total_ms"] == pytest.approx(18e-6)
    assert out["kernels"][("conv", 9)]["concurrent_ms"] == pytest.approx(8e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_per_nanosecond_count(seed):
    rng = random.Random(seed)
    runs = []
    for stream in (3, 4, 5):
        t = rng.randrange(0, 20)
        for _ in range(rng.randrange(1, 12)):  # back-to-back runs of one stream, with gaps of 0 or more
            length = rng.randrange(1, 15)
            runs.append(KernelRun(rng.choice("abc"), stream, t, t + length))
            t += length + rng.choice([0, 0, 1, 4])
    rng.shuffle(runs)
    busy, shared = _brute_force(runs)
    out = stream_overlap(runs)
    for s, b in busy.items():
        assert out["streams"][s]["busy_ms"] == pytest.approx(b / 1e6)
    for s in busy:
        expect = sum(c for k, c in zip(runs, shared) if k.stream == s)
        assert out["streams"][s]["concurrent_ms"] == pytest.approx(expect / 1e6)
    rows = {}
    for k, c in zip(runs, shared):
        rows[(k.name, k.stream)] = rows.get((k.name, k.stream), 0) + c
    assert {key: pytest.approx(v / 1e6) for key, v in rows.items()} == {
        key: r["concurrent_ms"] for key, r in out["kernels"].items()}


def test_empty_profile():
    assert stream_overlap([]) == {"span_ms": 0.0, "streams": {}, "kernels": {}}


@pytest.mark.gpu
def test_kernel_timeline_reads_streams_from_a_cuda_profile():
    import torch

    from spiral_rt.engine.profiling import kernel_timeline

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    a = torch.randn(2048, 2048, device="cuda")
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(4):
            a @ a
        with torch.cuda.stream(side):
            for _ in range(4):
                a @ a
        torch.cuda.synchronize()
    runs = kernel_timeline(prof)
    assert len({r.stream for r in runs}) == 2
    assert all(r.end_ns > r.start_ns for r in runs)
    out = stream_overlap(runs)
    assert sum(s["kernels"] for s in out["streams"].values()) == len(runs) >= 8


def test_idle_before_by_hand():
    # stream 1: a [0, 10), b [11, 20), a [22, 30), b [100000, 100010); stream 2: a [5, 8), c [9, 12)
    runs = [KernelRun("a", 1, 0, 10), KernelRun("b", 1, 11, 20), KernelRun("a", 1, 22, 30),
            KernelRun("b", 1, 100_000, 100_010), KernelRun("a", 2, 5, 8), KernelRun("c", 2, 9, 12)]
    out = idle_before(runs[::-1])
    assert out["a"] == {"calls": 3, "idle_ms": pytest.approx(2e-6), "stalls": 0}
    assert out["b"] == {"calls": 2, "idle_ms": pytest.approx(1e-6), "stalls": 1}  # the long gap is a stall
    assert out["c"] == {"calls": 1, "idle_ms": pytest.approx(1e-6), "stalls": 0}


def test_launch_sources_names_the_op_chain():
    def evt(name, parent=None, kernels=()):
        return SimpleNamespace(name=name, cpu_parent=parent, kernels=[SimpleNamespace(name=k) for k in kernels])

    linear = evt("spiral_rt::linear")
    memset = evt("cudaMemsetAsync", linear, ["Memset (Device)"])
    launch = evt("cudaLaunchKernel", linear, ["nvjet_gemm"])
    other = evt("cudaMemsetAsync", evt("aten::zero_"), ["Memset (Device)", "Memset (Device)"])
    prof = SimpleNamespace(events=lambda: [linear, memset, launch, other])
    assert launch_sources(prof, "Memset") == {"aten::zero_ > cudaMemsetAsync": 2,
                                              "spiral_rt::linear > cudaMemsetAsync": 1}
    assert launch_sources(prof, "nothing") == {}
