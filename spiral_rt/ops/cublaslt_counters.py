"""cuBLASLt's counter memsets taken out of CUDA graphs: one memset at the graph's root instead of one
before every GEMM that wants a few bytes of workspace.

At M = 4680 every cuBLASLt configuration of the DiT's packed QKV and FFN-up GEMMs wants a 4-byte
workspace (results/linear_search.json, session 21: 0 of 60 and 0 of 54 variants need none): a
counter that cuBLASLt zeroes with a memset before each call. In a captured chunk graph that is a
memset node between two kernels, 2034 of them a video, and with the idle time they bring ~12 ms of
a 1632 ms DiT-only video (results/profile_dit_s20.json).

``CounterSlots`` gives every such call inside a capture its own slot of workspace (``SLOT_BYTES``
each, from one buffer allocated before the capture). No two calls of the graph then share a
counter, so nothing orders a call's memset after the previous call: ``hoist_memsets`` removes the
per-call memset nodes that target the buffer (each call's predecessors become its dependencies
directly) and adds one memset of the whole buffer that every root of the graph waits for. Each
replay therefore starts with the counters at zero, as each call expects.

The graph must be captured with ``torch.cuda.CUDAGraph(keep_graph=True)`` and instantiated after the
edit. The edit uses the CUDA driver API through ctypes (libcuda, already loaded by torch). Every
query runs before the first change; if one fails (or a memset is not a plain zeroing, or an edge
carries data), the graph is left as captured and correct, and the reason is logged.

Boundaries: only memset nodes whose destination lies in this capture's slot buffer are touched; the
slots serve only graphs replayed one at a time on one stream (the engine's chunk graphs) and must
live as long as the graph (the owner keeps the ``CounterSlots``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading

import torch

logger = logging.getLogger(__name__)

SLOT_BYTES = 256
"""Workspace a slot offers (cuBLASLt wants 256-byte aligned workspaces; the counters are 4 bytes)."""
DEFAULT_SLOTS = 2048
"""Slots per capture: a B = 1 chunk sequence uses 300 (5 forwards x 30 blocks x 2 GEMMs)."""

_MEMSET_NODE = 2  # CUgraphNodeType CU_GRAPH_NODE_TYPE_MEMSET
_EDITS = ("cuGraphAddDependencies_v2", "cuGraphDestroyNode", "cuGraphAddMemsetNode")
_active = threading.local()


class CounterSlots:
    """Per-call workspaces for one capture (module docstring). ``take`` hands out the next slot's
    address, or None once all ``num_slots`` are used (the call then keeps the shared workspace and its
    memset)."""

    def __init__(self, device: int, num_slots: int = DEFAULT_SLOTS):
        if num_slots < 1:
            raise ValueError(f"CounterSlots: argument 'num_slots' must be >= 1, got {num_slots}")
        self.device = device
        self.buffer = torch.zeros(num_slots * SLOT_BYTES, dtype=torch.uint8, device=f"cuda:{device}")
        self.num_slots = num_slots
        self.used = 0

    def take(self, nbytes: int) -> int | None:
        if nbytes > SLOT_BYTES or self.used == self.num_slots:
            return None
        self.used += 1
        return self.buffer.data_ptr() + (self.used - 1) * SLOT_BYTES

    @property
    def span(self) -> tuple[int, int]:
        """[start, end) of the slots handed out."""
        start = self.buffer.data_ptr()
        return start, start + self.used * SLOT_BYTES


@contextlib.contextmanager
def capture_slots(device: int, num_slots: int = DEFAULT_SLOTS):
    """Within this context (around a graph capture on this thread), cuBLASLt calls on ``device`` whose
    algorithm wants at most ``SLOT_BYTES`` of workspace take their own slot. Yields the CounterSlots."""
    slots = CounterSlots(device, num_slots)
    previous = getattr(_active, "slots", None)
    _active.slots = slots
    try:
        yield slots
    finally:
        _active.slots = previous


def slot_for(device: int, nbytes: int) -> int | None:
    """The workspace address a cuBLASLt call wanting ``nbytes`` (> 0) should use inside a capture, or
    None (no slots active for this device on this thread, or none left)."""
    slots = getattr(_active, "slots", None)
    if slots is None or slots.device != device or not torch.cuda.is_current_stream_capturing():
        return None
    return slots.take(nbytes)


# ------------------------------------------------------------------ the graph edit (CUDA driver API)


class _MemsetParams(ctypes.Structure):  # CUDA_MEMSET_NODE_PARAMS
    _fields_ = [("dst", ctypes.c_uint64), ("pitch", ctypes.c_size_t), ("value", ctypes.c_uint),
                ("elementSize", ctypes.c_uint), ("width", ctypes.c_size_t), ("height", ctypes.c_size_t)]


_driver: ctypes.CDLL | None = None


def _cuda() -> ctypes.CDLL:
    global _driver
    if _driver is None:
        _driver = ctypes.CDLL("libcuda.so.1")
    return _driver


class _DriverError(RuntimeError):
    pass


def _call(name: str, *args) -> None:
    status = getattr(_cuda(), name)(*args)
    if status != 0:
        raise _DriverError(f"{name} failed (CUresult {status})")


def _node_list(name: str, handle) -> list[int]:
    """A driver list query (nodes of a graph, or a node's dependencies / dependents) as handles. The
    ``_v2`` edge queries get no edge-data array: they fail (CUDA_ERROR_LOSSY_QUERY) on an edge that
    carries data, which stops the edit before any change."""
    extra = (None,) if name.endswith("_v2") else ()
    count = ctypes.c_size_t(0)
    _call(name, handle, None, *extra, ctypes.byref(count))
    if count.value == 0:
        return []
    nodes = (ctypes.c_void_p * count.value)()
    _call(name, handle, nodes, *extra, ctypes.byref(count))
    return [nodes[i] for i in range(count.value)]


def rewire(removed: list, deps: dict, dependents: dict, existing: set, roots: list) -> tuple[list, list]:
    """The edges that keep a graph's order once the ``removed`` nodes are gone: each removed node's
    nearest kept predecessors (through chains of removed ones) to its kept dependents, less the
    ``existing`` edges; and the kept ``roots`` plus the dependents left without a predecessor (those
    of removed roots), which the new root memset must precede. ``deps`` / ``dependents`` map each
    removed node to its neighbours. Returns (edges as (from, to) pairs, roots), without repeats."""
    gone = set(removed)

    def kept(node, links):  # nearest kept neighbours along ``links``
        for m in links[node]:
            yield from (kept(m, links) if m in gone else (m,))

    edges, roots = {}, list(roots)
    for node in removed:
        before = set(kept(node, deps))
        for a in dependents[node]:
            if a in gone:
                continue
            if not before:
                roots.append(a)
            edges.update(dict.fromkeys((b, a) for b in sorted(before) if (b, a) not in existing))
    return list(edges), list(dict.fromkeys(roots))


def hoist_memsets(graph: torch.cuda.CUDAGraph, slots: CounterSlots) -> int:
    """Replace the memset nodes that target ``slots`` in ``graph`` (captured with keep_graph=True, not
    yet instantiated) by one root memset of the slots; returns how many were removed (0 when the
    graph was left as captured: nothing to do, or a query failed; see the module docstring)."""
    start, end = slots.span
    if end == start:
        return 0
    raw = ctypes.c_void_p(graph.raw_cuda_graph())
    try:
        for name in _EDITS:  # every entry point resolved before the first change
            getattr(_cuda(), name)
        counters = []
        for node in _node_list("cuGraphGetNodes", raw):
            kind = ctypes.c_int(0)
            _call("cuGraphNodeGetType", ctypes.c_void_p(node), ctypes.byref(kind))
            if kind.value != _MEMSET_NODE:
                continue
            p = _MemsetParams()
            _call("cuGraphMemsetNodeGetParams", ctypes.c_void_p(node), ctypes.byref(p))
            if not start <= p.dst < end:
                continue
            if p.value != 0 or p.dst + p.width * p.elementSize > end or p.height > 1:
                raise _DriverError(f"a memset into the slots is not a plain zeroing ({p.value}, {p.width} x "
                                   f"{p.elementSize} bytes, {p.height} rows)")
            counters.append(node)
        if not counters:
            return 0
        removed = set(counters)
        deps = {n: _node_list("cuGraphNodeGetDependencies_v2", ctypes.c_void_p(n)) for n in counters}
        dependents = {n: _node_list("cuGraphNodeGetDependentNodes_v2", ctypes.c_void_p(n)) for n in counters}
        kept_after = {a for n in counters for a in dependents[n] if a not in removed}
        existing = {(b, a) for a in kept_after for b in _node_list("cuGraphNodeGetDependencies_v2", ctypes.c_void_p(a))}
        roots = [n for n in _node_list("cuGraphGetRootNodes", raw) if n not in removed]
        ctx = ctypes.c_void_p()
        _call("cuCtxGetCurrent", ctypes.byref(ctx))
    except (_DriverError, OSError, AttributeError) as e:
        logger.warning("cuBLASLt counter memsets left in the graph: %s", e)
        return 0

    new_edges, roots = rewire(counters, deps, dependents, existing, roots)
    # From here on every change must succeed: a failure leaves a half-edited graph, so it raises.
    if new_edges:
        src = (ctypes.c_void_p * len(new_edges))(*[b for b, _ in new_edges])
        dst = (ctypes.c_void_p * len(new_edges))(*[a for _, a in new_edges])
        _call("cuGraphAddDependencies_v2", raw, src, dst, None, ctypes.c_size_t(len(new_edges)))
    for node in counters:
        _call("cuGraphDestroyNode", ctypes.c_void_p(node))
    params = _MemsetParams(dst=start, pitch=0, value=0, elementSize=4, width=(end - start) // 4, height=1)
    memset = ctypes.c_void_p()
    _call("cuGraphAddMemsetNode", ctypes.byref(memset), raw, None, ctypes.c_size_t(0), ctypes.byref(params), ctx)
    if roots:
        src = (ctypes.c_void_p * len(roots))(*([memset.value] * len(roots)))
        dst = (ctypes.c_void_p * len(roots))(*roots)
        _call("cuGraphAddDependencies_v2", raw, src, dst, None, ctypes.c_size_t(len(roots)))
    return len(counters)
