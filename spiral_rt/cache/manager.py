"""The paged KV cache manager: one device pool, host-side page tables, refcounts and policies.

Boundaries: this module owns the K/V pool tensor and all bookkeeping about which page holds which
frame of which sequence. It never reads the pool's contents and never synchronises with the device
(no ``.item()``, no waits): the only device work it issues is a page copy for copy-on-write and the
one upload of each plan's index tables. Kernels (attention, KV write) read the pool through the
tables of a ``ChunkPlan``; the engine decides when to plan, commit, fork, snapshot or roll back.
Not thread safe: one engine thread drives a manager.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .plan import ChunkPlan, build_tables, upload
from .policy import CachePolicy, GlobalPolicy, SinkWindowPolicy

logger = logging.getLogger(__name__)

EVICTED = -1
"""Page-table entry of a logical page the window policy has evicted."""


class KVCacheExhausted(RuntimeError):
    """The KV pool has too few free pages for a request.

    The manager itself never raises it for allocation: ``plan_chunk`` and friends return None. It is
    for callers that prefer an error to preemption (``require_chunk`` raises it), with a message that
    says how many pages were needed, how many were free, and what to change.
    """

    def __init__(self, needed: int, free: int, num_pages: int, page_bytes: int, frames_per_page: int, policy: CachePolicy, what: str):
        self.needed, self.free, self.num_pages = needed, free, num_pages
        hint = (
            "the global policy keeps every frame, so a long enough video always fills the pool: raise "
            "memory_budget_bytes/num_pages, use SinkWindowPolicy (constant memory), or preempt (release) a sequence"
            if isinstance(policy, GlobalPolicy)
            else "raise memory_budget_bytes/num_pages, batch fewer sequences, release snapshots, or preempt a sequence"
        )
        super().__init__(
            f"KV cache exhausted: {what} needs {needed} free page(s), {free} of {num_pages} are free "
            f"(page = {frames_per_page} frame(s), {page_bytes / 2**20:.1f} MiB over all layers; policy {policy}); {hint}"
        )


@dataclass
class KVCacheConfig:
    """Shape and budget of a paged KV cache."""

    num_layers: int
    """Transformer blocks whose K/V the pool holds (Wan2.1-1.3B: 30)."""
    num_heads: int
    """Attention heads of K/V (Wan2.1-1.3B: 12)."""
    head_dim: int
    """Channels per head (Wan2.1-1.3B: 128)."""
    tokens_per_frame: int
    """Tokens per latent frame (832x480: 1560)."""
    frames_per_page: int = 1
    """Latent frames per page; page_size = tokens_per_frame * frames_per_page tokens."""
    memory_budget_bytes: int | None = None
    """Bytes of device memory for the pool; the page count is the whole number of pages that fit."""
    num_pages: int | None = None
    """Explicit page count (instead of a byte budget; if both are given the page count wins)."""
    dtype: torch.dtype = torch.bfloat16
    """Element type of K and V."""
    device: torch.device | str | None = None
    """Where the pool lives; None: the current CUDA device if there is one, else the CPU."""
    policy: CachePolicy = field(default_factory=GlobalPolicy)
    """Default cache policy of new sequences (GlobalPolicy or SinkWindowPolicy)."""
    pin_memory: bool = True
    """Stage plan uploads in pinned host memory (CUDA only) so they are truly asynchronous."""

    @property
    def page_size(self) -> int:
        """Tokens per page."""
        return self.tokens_per_frame * self.frames_per_page

    @property
    def page_bytes(self) -> int:
        """Bytes of one page over all layers, K and V."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.page_size * self.num_heads * self.head_dim * itemsize

    def validate(self) -> None:
        for name in ("num_layers", "num_heads", "head_dim", "tokens_per_frame", "frames_per_page"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KVCacheConfig: {name} must be a positive int, got {value!r}")
        if self.num_pages is None and self.memory_budget_bytes is None:
            raise ValueError("KVCacheConfig: give memory_budget_bytes or num_pages")
        if self.num_pages is not None and (isinstance(self.num_pages, bool) or not isinstance(self.num_pages, int) or self.num_pages < 1):
            raise ValueError(f"KVCacheConfig: num_pages must be a positive int, got {self.num_pages!r}")
        if self.num_pages is None and self.memory_budget_bytes < self.page_bytes:
            raise ValueError(
                f"KVCacheConfig: memory_budget_bytes={self.memory_budget_bytes} is smaller than one page "
                f"({self.page_bytes} bytes = {self.num_layers} layers x K,V x {self.page_size} tokens x "
                f"{self.num_heads} heads x {self.head_dim} x {self.dtype})"
            )
        if not isinstance(self.policy, (GlobalPolicy, SinkWindowPolicy)):
            raise ValueError(f"KVCacheConfig: policy must be GlobalPolicy or SinkWindowPolicy, got {type(self.policy).__name__}")
        self.policy.validate(self.frames_per_page)

    def resolved_num_pages(self) -> int:
        return self.num_pages if self.num_pages is not None else self.memory_budget_bytes // self.page_bytes


@dataclass(frozen=True)
class Snapshot:
    """Handle to a sequence's cache state at a chunk boundary (it holds references to its pages)."""

    seq_id: int
    """The sequence it was taken from."""
    snapshot_id: int
    """Manager-unique id."""
    num_frames: int
    """Frames the sequence had when the snapshot was taken."""
    speculative: bool = False
    """Marks the start of a speculative segment (begin_speculation)."""


@dataclass(frozen=True)
class CacheStats:
    """Pool occupancy at one moment."""

    num_pages: int
    """Pages in the pool."""
    num_free_pages: int
    """Pages on the free list."""
    num_shared_pages: int
    """Pages referenced more than once (forks, snapshots)."""
    num_sequences: int
    """Live sequences."""
    num_snapshots: int
    """Live snapshots (including speculation markers)."""
    page_bytes: int
    """Bytes per page over all layers."""

    @property
    def used_bytes(self) -> int:
        return (self.num_pages - self.num_free_pages) * self.page_bytes


@dataclass
class _State:
    """What a snapshot copies: the page table and how far it is filled and evicted."""

    pages: list[int]
    """Logical page -> physical page id (EVICTED for evicted pages), covering every frame so far."""
    num_frames: int
    """Committed frames."""
    evict_cursor: int = 0
    """Logical pages below this (and at or above the sink) have been evicted."""

    def copy(self) -> "_State":
        return _State(list(self.pages), self.num_frames, self.evict_cursor)


@dataclass
class _Sequence:
    state: _State
    policy: CachePolicy
    open_plan: int | None = None
    snapshot_ids: list[int] = field(default_factory=list)


@dataclass
class _OpenPlan:
    plan: ChunkPlan
    live: set[int]
    table_len_before: dict[int, int]


class PagedKVCache:
    """Paged KV cache: one pre-allocated pool, refcounted pages, per-sequence page tables.

    Device layout (allocated once, never resized; ``L`` layers, ``P`` pages, ``T`` = page_size tokens
    = frames_per_page * tokens_per_frame, ``H`` heads, ``D`` head_dim)::

        kv : (L, 2, P, T, H, D)          kv[l, 0] = K pages of layer l, kv[l, 1] = V pages
                   |  |
                   |  +-- page p: tokens of frames_per_page consecutive latent frames of one sequence,
                   |      frame j of the page at tokens [j * tokens_per_frame, (j + 1) * tokens_per_frame)
                   +----- 0 = K, 1 = V

        k_pages, v_pages = cache.layer(l)     # (P, T, H, D) views, what kernels index with page ids

    Host bookkeeping (Python ints and lists only)::

        sequence 7: pages [ 4, 9, -1, -1, 12, 3, 8 ]   logical page i holds frames [i*k, (i+1)*k)
                            sink  evicted  window...    (-1 = EVICTED by the window policy)
        refcount[p]: sequences + snapshots whose table lists p;  free list: pages with refcount 0

    Fork shares pages (refcount + 1); a sequence about to write into a page another holder also
    references gets a private copy first (copy-on-write, one device copy of the page across all
    layers). Snapshots hold references too, so a rollback restores the exact pages and contents.

    Allocation never raises: ``plan_chunk``/``plan_rewrite`` return None when the free pages do not
    suffice, and change nothing. ``require_chunk`` raises ``KVCacheExhausted`` instead.

    Chunk protocol (all host side, no device synchronisation)::

        plan = cache.plan_chunk([s0, s1], chunk_frames=3)   # evict, reserve pages, build + upload tables
        ...   # every denoising step and the clean pass: kernels write K/V at plan.device.write_slots
              # and attend over plan.device.kv_indices
        cache.commit(plan)                                  # the frames become context
    """

    def __init__(self, config: KVCacheConfig):
        config.validate()
        self.config = config
        self.device = torch.device(config.device) if config.device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.num_pages = config.resolved_num_pages()
        self.page_size = config.page_size
        self.tokens_per_frame = config.tokens_per_frame
        self.frames_per_page = config.frames_per_page
        self.kv = torch.empty(
            (config.num_layers, 2, self.num_pages, self.page_size, config.num_heads, config.head_dim),
            dtype=config.dtype,
            device=self.device,
        )
        self._refcount = [0] * self.num_pages
        self._free = list(range(self.num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._seqs: dict[int, _Sequence] = {}
        self._snapshots: dict[int, tuple[Snapshot, _State]] = {}
        self._open: dict[int, _OpenPlan] = {}
        self._next_seq_id = 0
        self._next_snapshot_id = 0
        self._next_plan_id = 0
        logger.info(
            "KV cache: %d pages x %d tokens (%d frame(s)/page) x %d layers, %.1f MiB on %s, policy %s",
            self.num_pages, self.page_size, self.frames_per_page, config.num_layers,
            self.num_pages * config.page_bytes / 2**20, self.device, config.policy,
        )

    # ------------------------------------------------------------------------------ pool views

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_pages, v_pages) of one layer, each (num_pages, page_size, H, D)."""
        return self.kv[layer, 0], self.kv[layer, 1]

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def refcount(self, page: int) -> int:
        """Holders (sequences and snapshots) of physical page ``page``."""
        return self._refcount[page]

    def stats(self) -> CacheStats:
        return CacheStats(
            num_pages=self.num_pages,
            num_free_pages=len(self._free),
            num_shared_pages=sum(1 for r in self._refcount if r > 1),
            num_sequences=len(self._seqs),
            num_snapshots=len(self._snapshots),
            page_bytes=self.config.page_bytes,
        )

    # ------------------------------------------------------------------------------- sequences

    def add_sequence(self, policy: CachePolicy | None = None) -> int:
        """A new empty sequence (no pages yet); ``policy`` overrides the config's default."""
        policy = self.config.policy if policy is None else policy
        if not isinstance(policy, (GlobalPolicy, SinkWindowPolicy)):
            raise ValueError(f"add_sequence: policy must be GlobalPolicy or SinkWindowPolicy, got {type(policy).__name__}")
        policy.validate(self.frames_per_page)
        seq_id = self._next_seq_id
        self._next_seq_id += 1
        self._seqs[seq_id] = _Sequence(_State([], 0), policy)
        return seq_id

    def fork(self, seq_id: int, num_children: int = 1) -> list[int]:
        """New sequences sharing every page of ``seq_id`` (refcounted; written pages are copied first).

        Fork at a chunk boundary: the parent must have no open plan. Forking allocates nothing.
        """
        parent = self._seq(seq_id, "fork")
        self._require_closed(parent, seq_id, "fork")
        if isinstance(num_children, bool) or not isinstance(num_children, int) or num_children < 1:
            raise ValueError(f"fork: num_children must be a positive int, got {num_children!r}")
        children = []
        for _ in range(num_children):
            child = self.add_sequence(parent.policy)
            self._seqs[child].state = parent.state.copy()
            self._incref_all(parent.state.pages)
            children.append(child)
        return children

    def release(self, seq_id: int) -> None:
        """Drop a sequence, its snapshots and any open plan's pages; pages at refcount 0 are freed."""
        seq = self._seq(seq_id, "release")
        for snap_id in list(seq.snapshot_ids):
            self._drop_snapshot(snap_id)
        if seq.open_plan is not None:
            self._open[seq.open_plan].live.discard(seq_id)  # commit/abort skip it
        self._decref_all(seq.state.pages)
        del self._seqs[seq_id]

    def sequences(self) -> list[int]:
        return list(self._seqs)

    def num_frames(self, seq_id: int) -> int:
        """Committed frames of ``seq_id`` (frames of an open plan not included)."""
        return self._seq(seq_id, "num_frames").state.num_frames

    def policy(self, seq_id: int) -> CachePolicy:
        """The cache policy of ``seq_id`` (global, or sink + window)."""
        return self._seq(seq_id, "policy").policy

    def page_table(self, seq_id: int) -> list[int]:
        """A copy of the sequence's page table (logical page -> page id, EVICTED where evicted)."""
        return list(self._seq(seq_id, "page_table").state.pages)

    def visible_frames(self, seq_id: int) -> list[int]:
        """Context frames the sequence's next chunk will attend to (sink + window, or everything)."""
        seq = self._seq(seq_id, "visible_frames")
        n = seq.state.num_frames
        return [f for lo, hi in seq.policy.visible_ranges(n, self.frames_per_page) for f in range(lo, hi)]

    # ----------------------------------------------------------------------------- planning

    def pages_needed(self, seq_ids, chunk_frames) -> int:
        """Net free pages ``plan_chunk(seq_ids, chunk_frames)`` would need now (<= 0: it fits).

        Counts fresh pages and copy-on-write copies, minus pages the window policy would free.
        Preempting callers release sequences until this is <= 0.
        """
        seqs, frames = self._check_batch(seq_ids, chunk_frames, "pages_needed")
        need, freed, _ = self._dry_run_append(seq_ids, seqs, frames)
        return need - freed - len(self._free)

    def plan_chunk(self, seq_ids, chunk_frames) -> ChunkPlan | None:
        """Reserve one chunk's pages for a batch and build its index tables, or None if they do not fit.

        Args:
            seq_ids: distinct sequence ids, none with an open plan.
            chunk_frames: latent frames each sequence adds (an int, or one per sequence).

        Per sequence: the window policy's evictions are applied (pages go back to the pool), a shared
        partially filled last page is copied (copy-on-write, frames_per_page > 1 only), fresh pages
        are taken for the chunk's frames, and the tables list the visible context pages followed by
        the chunk's pages (see ``spiral_rt.cache.plan``). On None nothing has changed.
        """
        seqs, frames = self._check_batch(seq_ids, chunk_frames, "plan_chunk")
        need, freed, evictions = self._dry_run_append(seq_ids, seqs, frames)
        if need > len(self._free) + freed:
            logger.debug("plan_chunk: %d pages needed, %d free + %d freed by eviction", need, len(self._free), freed)
            return None
        k, tpf = self.frames_per_page, self.tokens_per_frame
        num_evicted = sum(len(e) for e in evictions)
        for seq, evict in zip(seqs, evictions):
            self._evict(seq, evict)
        table_len_before, copied, fresh = {}, 0, 0
        pages_per_seq, last_len, kv_len, ctx_len, q_frames, q_bases = [], [], [], [], [], []
        for sid, seq, c in zip(seq_ids, seqs, frames):
            state = seq.state
            n = state.num_frames
            table_len_before[sid] = len(state.pages)
            if n % k:
                copied += self._make_private(state, n // k)
            while len(state.pages) * k < n + c:
                state.pages.append(self._alloc())
                fresh += 1
            ranges = seq.policy.visible_ranges(n, k)
            ctx_frames = sum(hi - lo for lo, hi in ranges)
            logical = _logical_pages(ranges + [(n, n + c)], k)
            pages_per_seq.append([state.pages[lp] for lp in logical])
            last_len.append(((n + c - 1) % k + 1) * tpf)
            kv_len.append((ctx_frames + c) * tpf)
            ctx_len.append(ctx_frames * tpf)
            q_frames.append(list(range(n, n + c)))
            q_bases.extend(state.pages[f // k] * self.page_size + (f % k) * tpf for f in range(n, n + c))
        return self._open_plan(
            "append", seq_ids, frames, pages_per_seq, last_len, kv_len, ctx_len, q_frames, q_bases,
            fresh + copied, copied, num_evicted, table_len_before,
        )

    def require_chunk(self, seq_ids, chunk_frames) -> ChunkPlan:
        """``plan_chunk``, raising ``KVCacheExhausted`` (with what to change) instead of returning None."""
        plan = self.plan_chunk(seq_ids, chunk_frames)
        if plan is None:
            short = self.pages_needed(seq_ids, chunk_frames)
            raise KVCacheExhausted(
                short + len(self._free), len(self._free), self.num_pages, self.config.page_bytes,
                self.frames_per_page, self.config.policy, f"a chunk for sequences {list(seq_ids)}",
            )
        return plan

    def plan_rewrite(self, seq_ids) -> ChunkPlan | None:
        """Plan recomputing, in place, the K/V of every visible context frame past the sink (LongLive's
        re-cache after a prompt switch).

        Queries are those frames (the window of a sink + window policy, the whole history under the
        global policy); keys are every visible frame, so the window attends to the sink as it stands:
        the sink keeps the K/V it was written with, as LongLive's re-cache leaves its sink alone
        (``rewrite_frames`` lists the frames). Pages written are first made private (copy-on-write)
        where shared with a fork or a snapshot. Adds no frames. None (and nothing changed) when the
        copies do not fit; ValueError for a sequence with nothing to rewrite.
        """
        seqs, _ = self._check_batch(seq_ids, 1, "plan_rewrite")
        k, tpf = self.frames_per_page, self.tokens_per_frame
        visible = [seq.policy.visible_ranges(seq.state.num_frames, k) for seq in seqs]
        rewritten = [self._past_sink(seq, ranges) for seq, ranges in zip(seqs, visible)]
        for sid, ranges in zip(seq_ids, rewritten):
            if not ranges:
                raise ValueError(f"plan_rewrite: sequence {sid} has no frames past its sink to rewrite")
        written = [_logical_pages(r, k) for r in rewritten]
        copies = self._count_copies([[seq.state.pages[lp] for lp in lps] for seq, lps in zip(seqs, written)])
        if copies > len(self._free):
            return None
        copied = 0
        pages_per_seq, last_len, kv_len, ctx_len, q_frames, q_bases = [], [], [], [], [], []
        for seq, ranges, rewrite, lps in zip(seqs, visible, rewritten, written):
            for lp in lps:
                copied += self._make_private(seq.state, lp)
            n = seq.state.num_frames
            keys = sum(hi - lo for lo, hi in ranges)
            frames = [f for lo, hi in rewrite for f in range(lo, hi)]
            pages_per_seq.append([seq.state.pages[lp] for lp in _logical_pages(ranges, k)])
            last_len.append(((n - 1) % k + 1) * tpf)
            kv_len.append(keys * tpf)
            ctx_len.append((keys - len(frames)) * tpf)  # the sink: attended, not rewritten
            q_frames.append(frames)
            q_bases.extend(seq.state.pages[f // k] * self.page_size + (f % k) * tpf for f in frames)
        return self._open_plan(
            "rewrite", seq_ids, [len(f) for f in q_frames], pages_per_seq, last_len, kv_len, ctx_len,
            q_frames, q_bases, copied, copied, 0, {sid: len(s.state.pages) for sid, s in zip(seq_ids, seqs)},
        )

    def rewrite_frames(self, seq_id: int) -> list[int]:
        """The frames ``plan_rewrite`` would recompute for ``seq_id`` now: its visible frames past the sink."""
        seq = self._seq(seq_id, "rewrite_frames")
        ranges = self._past_sink(seq, seq.policy.visible_ranges(seq.state.num_frames, self.frames_per_page))
        return [f for lo, hi in ranges for f in range(lo, hi)]

    @staticmethod
    def _past_sink(seq, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        sink = getattr(seq.policy, "sink_frames", 0)
        return [(max(lo, sink), hi) for lo, hi in ranges if hi > sink]

    def commit(self, plan: ChunkPlan) -> None:
        """Close a plan: an append plan's frames become context of each (still live) sequence."""
        record = self._take_open(plan, "commit")
        for sid, c in zip(plan.seq_ids, plan.num_q_frames):
            if sid in record.live:
                seq = self._seqs[sid]
                if plan.kind == "append":
                    seq.state.num_frames += c
                seq.open_plan = None

    def abort(self, plan: ChunkPlan) -> None:
        """Close a plan without keeping its frames: an append plan's fresh pages go back to the pool.

        Evictions and copy-on-write copies made while planning stay (they changed no visible content).
        An aborted rewrite plan leaves whatever the kernels already wrote.
        """
        record = self._take_open(plan, "abort")
        for sid in plan.seq_ids:
            if sid not in record.live:
                continue
            seq = self._seqs[sid]
            if plan.kind == "append":
                keep = record.table_len_before[sid]
                self._decref_all(seq.state.pages[keep:])
                del seq.state.pages[keep:]
            seq.open_plan = None

    # --------------------------------------------------------------- snapshots and speculation

    def snapshot(self, seq_id: int, speculative: bool = False) -> Snapshot:
        """Record the sequence's state at this chunk boundary; its pages gain a reference each.

        While the snapshot lives, pages the window policy evicts from the sequence stay allocated
        (the snapshot still lists them), and the first write into a page it shares is a copy:
        release snapshots once the segment is accepted.
        """
        seq = self._seq(seq_id, "snapshot")
        self._require_closed(seq, seq_id, "snapshot")
        snap = Snapshot(seq_id, self._next_snapshot_id, seq.state.num_frames, speculative)
        self._next_snapshot_id += 1
        self._snapshots[snap.snapshot_id] = (snap, seq.state.copy())
        self._incref_all(seq.state.pages)
        seq.snapshot_ids.append(snap.snapshot_id)
        return snap

    def rollback(self, snapshot: Snapshot, release: bool = False) -> None:
        """Return the sequence to ``snapshot``: same page table, frames and contents.

        Pages written after the snapshot lose the sequence's reference (freed at zero); snapshots
        taken after this one are dropped (they describe a discarded future). The snapshot itself
        stays usable for another rollback unless ``release``.
        """
        state = self._snapshot_state(snapshot, "rollback")
        seq = self._seqs[snapshot.seq_id]
        self._require_closed(seq, snapshot.seq_id, "rollback")
        position = seq.snapshot_ids.index(snapshot.snapshot_id)
        for later in seq.snapshot_ids[position + 1 :]:
            self._drop_snapshot(later)
        self._incref_all(state.pages)
        self._decref_all(seq.state.pages)
        seq.state = state.copy()
        if release:
            self._drop_snapshot(snapshot.snapshot_id)

    def release_snapshot(self, snapshot: Snapshot) -> None:
        """Forget a snapshot; pages only it still held are freed."""
        self._snapshot_state(snapshot, "release_snapshot")
        self._drop_snapshot(snapshot.snapshot_id)

    def begin_speculation(self, seq_id: int) -> Snapshot:
        """Mark the start of a speculative segment (a snapshot flagged speculative).

        Pages allocated from here on are speculative until ``commit_speculation`` (keep them) or
        ``drop_speculation`` (return the sequence to this point and free them).
        """
        return self.snapshot(seq_id, speculative=True)

    def commit_speculation(self, marker: Snapshot) -> None:
        """Keep the speculative segment's pages as ordinary pages."""
        self._check_speculative(marker, "commit_speculation")
        self.release_snapshot(marker)

    def drop_speculation(self, marker: Snapshot) -> None:
        """Discard the speculative segment: its pages are released, the sequence is back at the marker."""
        self._check_speculative(marker, "drop_speculation")
        self.rollback(marker, release=True)

    def speculative_pages(self, marker: Snapshot) -> list[int]:
        """Pages the sequence holds that were not in its table at the marker."""
        self._check_speculative(marker, "speculative_pages")
        state = self._snapshots[marker.snapshot_id][1]
        before = set(state.pages)
        return [p for p in self._seqs[marker.seq_id].state.pages if p != EVICTED and p not in before]

    def snapshots(self, seq_id: int) -> list[Snapshot]:
        """Live snapshots of a sequence, oldest first."""
        return [self._snapshots[i][0] for i in self._seq(seq_id, "snapshots").snapshot_ids]

    # ----------------------------------------------------------------------------- invariants

    def check_invariants(self) -> None:
        """Recount every reference from scratch; raise RuntimeError naming the first inconsistency.

        Checks: refcounts equal the number of tables (sequences + snapshots) listing each page; the
        free list is exactly the pages at refcount 0, without duplicates; every table covers its
        frames; evicted entries lie in the policy's evicted range. O(pool + tables): for tests.
        """
        k = self.frames_per_page
        expected = [0] * self.num_pages
        tables = [(f"sequence {sid}", s.state, s.policy, s.open_plan is not None) for sid, s in self._seqs.items()]
        tables += [(f"snapshot {snap.snapshot_id}", st, self._seqs[snap.seq_id].policy, False) for snap, st in self._snapshots.values()]
        for name, state, policy, is_open in tables:
            for p in state.pages:
                if p != EVICTED:
                    expected[p] += 1
            if not is_open and len(state.pages) != -(-state.num_frames // k):
                raise RuntimeError(f"{name}: {len(state.pages)} pages for {state.num_frames} frames")
            lo, hi = policy.evicted_page_range(state.num_frames, k)
            for lp, p in enumerate(state.pages):
                if p == EVICTED and not lo <= lp < max(hi, state.evict_cursor):
                    raise RuntimeError(f"{name}: logical page {lp} evicted outside the policy's range [{lo}, {hi})")
        for p, (want, have) in enumerate(zip(expected, self._refcount)):
            if want != have:
                raise RuntimeError(f"page {p}: refcount {have}, but {want} table(s) list it")
        free = set(self._free)
        if len(free) != len(self._free):
            raise RuntimeError("free list holds duplicates")
        zero = {p for p, r in enumerate(self._refcount) if r == 0}
        if free != zero:
            raise RuntimeError(f"free list {sorted(free)[:8]}... differs from refcount-0 pages {sorted(zero)[:8]}...")

    # ------------------------------------------------------------------------------ internals

    def _seq(self, seq_id: int, what: str) -> _Sequence:
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise ValueError(f"{what}: seq_id {seq_id!r} is not a live sequence")
        return seq

    @staticmethod
    def _require_closed(seq: _Sequence, seq_id: int, what: str) -> None:
        if seq.open_plan is not None:
            raise ValueError(f"{what}: sequence {seq_id} is inside chunk plan {seq.open_plan}; commit or abort it first")

    def _check_batch(self, seq_ids, chunk_frames, what: str) -> tuple[list[_Sequence], list[int]]:
        seq_ids = list(seq_ids)
        if not seq_ids:
            raise ValueError(f"{what}: seq_ids is empty")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"{what}: seq_ids {seq_ids} repeats a sequence")
        seqs = [self._seq(s, what) for s in seq_ids]
        for sid, seq in zip(seq_ids, seqs):
            self._require_closed(seq, sid, what)
        frames = [chunk_frames] * len(seq_ids) if isinstance(chunk_frames, int) else list(chunk_frames)
        if len(frames) != len(seq_ids) or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in frames):
            raise ValueError(f"{what}: chunk_frames must be a positive int or one per sequence ({len(seq_ids)}), got {chunk_frames!r}")
        return seqs, frames

    def _dry_run_append(self, seq_ids, seqs, frames) -> tuple[int, int, list[list[int]]]:
        """(pages to allocate, pages eviction would free, logical pages to evict per sequence)."""
        k = self.frames_per_page
        evictions, drops = [], {}
        for seq in seqs:
            lo, hi = seq.policy.evicted_page_range(seq.state.num_frames, k)
            evict = [lp for lp in range(max(lo, seq.state.evict_cursor), hi) if seq.state.pages[lp] != EVICTED]
            evictions.append(evict)
            for lp in evict:
                p = seq.state.pages[lp]
                drops[p] = drops.get(p, 0) + 1
        freed = sum(1 for p, n in drops.items() if self._refcount[p] == n)
        writes, fresh = [], 0
        for seq, c in zip(seqs, frames):
            n, have = seq.state.num_frames, len(seq.state.pages)
            if n % k:
                writes.append([seq.state.pages[n // k]])
            fresh += -(-(n + c) // k) - have
        return fresh + self._count_copies(writes, drops), freed, evictions

    def _count_copies(self, writes_per_seq: list[list[int]], drops: dict[int, int] | None = None) -> int:
        """Copy-on-write copies needed when each sequence writes the listed pages (in batch order).

        A page with r holders (after ``drops`` references are evicted) written by m of them: each
        writer copies while others still hold it, so m copies if m < r, else m - 1 (the last writer
        keeps the original).
        """
        drops = drops or {}
        writers: dict[int, int] = {}
        for pages in writes_per_seq:
            for p in pages:
                writers[p] = writers.get(p, 0) + 1
        return sum(m if m < self._refcount[p] - drops.get(p, 0) else m - 1 for p, m in writers.items())

    def _evict(self, seq: _Sequence, logical_pages: list[int]) -> None:
        state = seq.state
        for lp in logical_pages:
            self._decref(state.pages[lp])
            state.pages[lp] = EVICTED
        lo, hi = seq.policy.evicted_page_range(state.num_frames, self.frames_per_page)
        state.evict_cursor = max(state.evict_cursor, hi)

    def _make_private(self, state: _State, logical_page: int) -> int:
        """Give ``state`` its own copy of a shared page (device copy over all layers); 1 if copied."""
        page = state.pages[logical_page]
        if self._refcount[page] == 1:
            return 0
        new = self._alloc()
        self.kv[:, :, new].copy_(self.kv[:, :, page])
        self._decref(page)
        state.pages[logical_page] = new
        return 1

    def _alloc(self) -> int:
        page = self._free.pop()  # callers have checked the count: an empty list here is a bug
        self._refcount[page] = 1
        return page

    def _decref(self, page: int) -> None:
        self._refcount[page] -= 1
        if self._refcount[page] == 0:
            self._free.append(page)

    def _incref_all(self, pages: list[int]) -> None:
        for p in pages:
            if p != EVICTED:
                self._refcount[p] += 1

    def _decref_all(self, pages: list[int]) -> None:
        for p in pages:
            if p != EVICTED:
                self._decref(p)

    def _open_plan(self, kind, seq_ids, q_counts, pages_per_seq, last_len, kv_len, ctx_len, q_frames, q_bases,
                   num_new, num_copied, num_evicted, table_len_before) -> ChunkPlan:
        host = build_tables(pages_per_seq, last_len, kv_len, ctx_len, q_frames, q_bases, self.tokens_per_frame)
        device = upload(host, self.device, self.config.pin_memory)
        plan = ChunkPlan(
            plan_id=self._next_plan_id, kind=kind, seq_ids=tuple(seq_ids), num_q_frames=tuple(q_counts),
            q_start_frame=tuple(frames[0] for frames in q_frames),
            page_size=self.page_size, tokens_per_frame=self.tokens_per_frame,
            max_q_len=max(q_counts) * self.tokens_per_frame, max_kv_len=max(kv_len),
            num_new_pages=num_new, num_copied_pages=num_copied, num_evicted_pages=num_evicted,
            host=host, device=device,
        )
        self._next_plan_id += 1
        self._open[plan.plan_id] = _OpenPlan(plan, set(seq_ids), table_len_before)
        for sid in seq_ids:
            self._seqs[sid].open_plan = plan.plan_id
        return plan

    def _take_open(self, plan: ChunkPlan, what: str) -> _OpenPlan:
        record = self._open.pop(plan.plan_id, None) if isinstance(plan, ChunkPlan) else None
        if record is None or record.plan is not plan:
            raise ValueError(f"{what}: plan {getattr(plan, 'plan_id', plan)!r} is not open (already committed or aborted?)")
        return record

    def _snapshot_state(self, snapshot: Snapshot, what: str) -> _State:
        entry = self._snapshots.get(getattr(snapshot, "snapshot_id", None))
        if entry is None or entry[0] != snapshot:
            raise ValueError(f"{what}: snapshot {snapshot!r} is not live (released, rolled past, or its sequence released)")
        return entry[1]

    def _drop_snapshot(self, snapshot_id: int) -> None:
        snap, state = self._snapshots.pop(snapshot_id)
        self._decref_all(state.pages)
        self._seqs[snap.seq_id].snapshot_ids.remove(snapshot_id)

    def _check_speculative(self, marker: Snapshot, what: str) -> None:
        self._snapshot_state(marker, what)
        if not marker.speculative:
            raise ValueError(f"{what}: snapshot {marker.snapshot_id} is not a speculation marker (use begin_speculation)")


def _logical_pages(ranges: list[tuple[int, int]], frames_per_page: int) -> list[int]:
    """Logical pages covering half-open frame ranges, in order, each listed once."""
    out: list[int] = []
    for lo, hi in ranges:
        if hi <= lo:
            continue
        for lp in range(lo // frames_per_page, (hi - 1) // frames_per_page + 1):
            if not out or lp > out[-1]:
                out.append(lp)
    return out
