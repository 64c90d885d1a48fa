"""Tests of ``spiral_rt.ops.cublaslt_counters``: the rewiring that keeps a graph's order when its
counter memsets go (CPU, random graphs checked by reachability), the slots' bookkeeping, and on the
GPU a captured sequence of GEMMs whose memsets become one, replayed on fresh inputs and compared
bit for bit with the same configuration run eagerly (same kernel and inputs: no tolerance)."""

import itertools
import random

import pytest
import torch

from spiral_rt.ops import cublaslt, cublaslt_counters
from spiral_rt.ops.cublaslt_counters import rewire

gpu = pytest.mark.gpu


def _reach(nodes, edges):
    """{(u, v): v reachable from u by one or more edges} over ``nodes``."""
    succ = {n: {b for a, b in edges if a == n} for n in nodes}
    pairs = set()
    for u in nodes:
        stack, seen = list(succ[u]), set()
        while stack:
            v = stack.pop()
            if v not in seen:
                seen.add(v)
                stack.extend(succ[v])
        pairs |= {(u, v) for v in seen}
    return pairs


def _random_dag(rng, n):
    """A random DAG over 0..n-1 (edges only forward), with a few chains, as stream captures make."""
    edges = {(i, i + 1) for i in range(n - 1) if rng.random() < 0.8}
    edges |= {(i, j) for i, j in itertools.combinations(range(n), 2) if rng.random() < 0.08}
    return edges


@pytest.mark.parametrize("seed", range(40))
def test_rewire_keeps_the_order_of_the_kept_nodes(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 14)
    edges = _random_dag(rng, n)
    removed = sorted(rng.sample(range(n), rng.randint(1, max(1, n // 2))))
    kept = [v for v in range(n) if v not in removed]
    deps = {r: [a for a, b in edges if b == r] for r in removed}
    dependents = {r: [b for a, b in edges if a == r] for r in removed}
    kept_after = {b for r in removed for b in dependents[r] if b not in removed}
    existing = {(a, b) for a, b in edges if b in kept_after}
    roots = [v for v in kept if not any(b == v for _, b in edges)]
    new_edges, new_roots = rewire(removed, deps, dependents, existing, roots)
    assert len(set(new_edges)) == len(new_edges) and not set(new_edges) & edges
    after = {(a, b) for a, b in edges if a not in removed and b not in removed} | set(new_edges)
    # the kept nodes' order is exactly the old one (the removed memsets only passed it on)
    old = {(u, v) for u, v in _reach(range(n), edges) if u in kept and v in kept}
    assert _reach(kept, after) == old
    # the new root memset precedes every kept node: each is a new root or reachable from one
    from_roots = set(new_roots) | {v for u, v in _reach(kept, after) if u in new_roots}
    assert from_roots == set(kept)
    assert set(new_roots) <= set(kept)


def test_rewire_chain_of_memsets_at_the_root():
    # m0 (root) -> m1 -> gemm0 -> m2 -> gemm1: both gemms ordered, gemm0 becomes a root
    m0, m1, g0, m2, g1 = range(5)
    edges, roots = rewire([m0, m1, m2], {m0: [], m1: [m0], m2: [g0]}, {m0: [m1], m1: [g0], m2: [g1]},
                          existing=set(), roots=[])
    assert edges == [(g0, g1)] and roots == [g0]


def test_capture_slots_hand_out_aligned_distinct_slots_and_refuse_bad_counts(monkeypatch):
    with pytest.raises(ValueError, match="num_slots"):
        cublaslt_counters.CounterSlots(0, num_slots=0)

    class _Buffer:
        def data_ptr(self):
            return 4096

    slots = object.__new__(cublaslt_counters.CounterSlots)
    slots.device, slots.buffer, slots.num_slots, slots.used = 0, _Buffer(), 3, 0
    got = [slots.take(4), slots.take(cublaslt_counters.SLOT_BYTES), slots.take(1)]
    assert got == [4096, 4096 + 256, 4096 + 512] and all(p % 256 == 0 for p in got)
    assert slots.take(4) is None and slots.span == (4096, 4096 + 3 * 256)
    slots.used = 0
    assert slots.take(cublaslt_counters.SLOT_BYTES + 1) is None  # a larger workspace keeps the shared one
    # outside a capture (and with no slots active) a call keeps the shared workspace
    assert cublaslt_counters.slot_for(0, 4) is None


def _memset_nodes(graph) -> int:
    import ctypes
    raw = ctypes.c_void_p(graph.raw_cuda_graph())
    count = 0
    for node in cublaslt_counters._node_list("cuGraphGetNodes", raw):
        kind = ctypes.c_int(0)
        cublaslt_counters._call("cuGraphNodeGetType", ctypes.c_void_p(node), ctypes.byref(kind))
        count += kind.value == cublaslt_counters._MEMSET_NODE
    return count


@gpu
@pytest.mark.parametrize("hoist", [True, False], ids=["one_memset", "as_captured"])
def test_graph_of_counter_gemms_replays_exactly(hoist):
    if not cublaslt.available():
        pytest.skip("no cuBLASLt")
    m, k, n = 4680, 1536, 4608  # the DiT's packed QKV: its configurations want a 4-byte counter
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    plan = cublaslt.plan(cublaslt.Problem(0, torch.bfloat16, m, k, n, k, True, False), x, w, b)
    if plan.candidates[plan.chosen].workspace == 0:
        pytest.skip("the chosen configuration needs no counter on this GPU")
    calls = 5
    static = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(calls)]
    graph = torch.cuda.CUDAGraph(keep_graph=True)
    with cublaslt_counters.capture_slots(0) as slots, torch.cuda.graph(graph):
        for i in range(calls):  # each call's counter must be zero again at every replay
            plan.run(static, w, b, outs[i])
    assert slots.used == calls
    captured = _memset_nodes(graph)
    assert captured >= calls
    removed = cublaslt_counters.hoist_memsets(graph, slots) if hoist else 0
    assert removed == (calls if hoist else 0)
    assert _memset_nodes(graph) == captured - removed + (1 if hoist else 0)
    graph.instantiate()
    for _ in range(3):
        fresh = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        static.copy_(fresh)
        graph.replay()
        want = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        plan.run(fresh, w, b, want)  # the same configuration, eagerly, with the shared workspace
        torch.cuda.synchronize()
        for got in outs:
            assert torch.equal(got, want)
