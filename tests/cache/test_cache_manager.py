"""Tests of spiral_rt.cache: refcounts, copy-on-write, window + sink, rollback, speculation, plans.

Small CPU pools (fp32, so copies are exact). The property test drives a manager with random
operations from a fixed seed and checks, after every one, the manager's own invariants, the
contents of every live sequence's visible frames against a shadow model, and, at the end, that
releasing everything returns every page.
"""

from __future__ import annotations

import random

import pytest
import torch

from spiral_rt.cache import (
    EVICTED,
    GlobalPolicy,
    KVCacheConfig,
    KVCacheExhausted,
    PagedKVCache,
    SinkWindowPolicy,
    visible_context_frames,
)
from spiral_rt.transfer import pack, unpack

L, H, D, TPF = 2, 2, 3, 5  # layers, heads, head_dim, tokens per frame (odd on purpose)


def make_cache(num_pages=32, frames_per_page=1, policy=None, **kw) -> PagedKVCache:
    cfg = KVCacheConfig(
        num_layers=L, num_heads=H, head_dim=D, tokens_per_frame=TPF, frames_per_page=frames_per_page,
        num_pages=num_pages, dtype=torch.float32, device="cpu", policy=policy or GlobalPolicy(), **kw,
    )
    return PagedKVCache(cfg)


def expected_visible(policy, num_frames: int, k: int) -> list[int]:
    """Independent statement of the visibility rule (not the policy's code)."""
    if isinstance(policy, GlobalPolicy):
        return list(range(num_frames))
    sink = list(range(min(policy.sink_frames, num_frames)))
    start = max(policy.sink_frames, num_frames - policy.window_frames)
    if num_frames - policy.window_frames > policy.sink_frames:
        start -= start % k  # page granularity
    return sink + list(range(start, num_frames))


def read_frame(cache: PagedKVCache, table: list[int], frame: int) -> torch.Tensor:
    k = cache.frames_per_page
    page = table[frame // k]
    assert page != EVICTED, f"frame {frame} is evicted"
    off = (frame % k) * TPF
    return cache.kv[:, :, page, off : off + TPF].clone()


def write_plan(cache: PagedKVCache, plan, gen: torch.Generator) -> list[list[torch.Tensor]]:
    """Write fresh random K/V for every query frame at the plan's write slots (what the kernel does)."""
    flat = cache.kv.view(L, 2, cache.num_pages * cache.page_size, H, D)
    slots = plan.device.write_slots
    values = torch.randn(L, 2, slots.numel(), H, D, generator=gen)
    flat[:, :, slots] = values
    out, pos = [], 0
    for n in plan.num_q_frames:
        out.append([values[:, :, (pos + j) * TPF : (pos + j + 1) * TPF] for j in range(n)])
        pos += n
    return out


def check_plan(cache: PagedKVCache, plan) -> None:
    t = plan.host
    ps, S = cache.page_size, plan.num_seqs
    indptr = t.kv_indptr.tolist()
    assert indptr[0] == 0 and indptr[-1] == t.kv_indices.numel() and len(indptr) == S + 1
    assert all(b > a for a, b in zip(indptr, indptr[1:])), "kv_indptr must be strictly increasing"
    assert t.kv_indices.min() >= 0 and t.kv_indices.max() < cache.num_pages
    last = t.kv_last_page_len.tolist()
    assert all(1 <= x <= ps for x in last)
    for s in range(S):
        npages = indptr[s + 1] - indptr[s]
        assert t.kv_len[s] == (npages - 1) * ps + last[s]
        assert len(set(t.kv_indices[indptr[s] : indptr[s + 1]].tolist())) == npages, "a page listed twice"
    q = t.q_indptr.tolist()
    assert q[0] == 0 and [b - a for a, b in zip(q, q[1:])] == [n * TPF for n in plan.num_q_frames]
    assert t.write_slots.numel() == q[-1] == plan.num_q_tokens
    assert t.q_frame_idx.numel() == sum(plan.num_q_frames)
    slots = t.write_slots.tolist()
    assert len(set(slots)) == len(slots), "two query tokens write the same slot"
    for slot in slots:  # writers own their pages exclusively, and only pages they attend to
        assert cache.refcount(slot // ps) == 1
    if plan.kind == "append":
        assert (t.kv_len - t.kv_context_len).tolist() == [n * TPF for n in plan.num_q_frames]
    assert plan.max_kv_len == max(t.kv_len.tolist())


def gather_keys(cache: PagedKVCache, plan, s: int) -> torch.Tensor:
    """K/V of sequence s as the attention kernel sees them: (L, 2, kv_len, H, D)."""
    t = plan.host
    pages = t.kv_indices[t.kv_indptr[s] : t.kv_indptr[s + 1]].long()
    return cache.kv[:, :, pages].reshape(L, 2, -1, H, D)[:, :, : int(t.kv_len[s])]


# ----------------------------------------------------------------------------- property test


class Shadow:
    """What every sequence and snapshot should contain: frame contents, in frame order."""

    def __init__(self):
        self.seqs: dict[int, list[torch.Tensor]] = {}
        self.snaps: dict[int, tuple[object, list[torch.Tensor]]] = {}


def verify_contents(cache: PagedKVCache, shadow: Shadow, policies: dict[int, object]) -> None:
    k = cache.frames_per_page
    for sid, frames in shadow.seqs.items():
        assert cache.num_frames(sid) == len(frames)
        visible = cache.visible_frames(sid)
        assert visible == expected_visible(policies[sid], len(frames), k)
        table = cache.page_table(sid)
        for f in visible:
            assert torch.equal(read_frame(cache, table, f), frames[f]), f"sequence {sid} frame {f} corrupted"
    live = {s.snapshot_id for sid in shadow.seqs for s in cache.snapshots(sid)}
    assert live == set(shadow.snaps)


@pytest.mark.parametrize(
    "policy,frames_per_page,num_pages",
    [
        (GlobalPolicy(), 1, 40),
        (GlobalPolicy(), 2, 30),
        (SinkWindowPolicy(sink_frames=2, window_frames=4), 1, 36),
        (SinkWindowPolicy(sink_frames=2, window_frames=5), 2, 30),
        (SinkWindowPolicy(sink_frames=0, window_frames=3), 1, 24),
    ],
    ids=["global-k1", "global-k2", "window-k1", "window-k2", "window-nosink"],
)
def test_random_operations_keep_refcounts_and_contents(policy, frames_per_page, num_pages):
    rng = random.Random(1234)
    gen = torch.Generator().manual_seed(99)
    cache = make_cache(num_pages, frames_per_page, policy)
    shadow, policies = Shadow(), {}
    counts = {name: 0 for name in ("chunk", "none", "abort", "fork", "snap", "rollback", "rewrite", "release", "cow")}

    def new_seq():
        sid = cache.add_sequence()
        shadow.seqs[sid], policies[sid] = [], policy
        return sid

    def release(sid):
        cache.release(sid)
        del shadow.seqs[sid]
        for snap_id in [i for i, (snap, _) in shadow.snaps.items() if snap.seq_id == sid]:
            del shadow.snaps[snap_id]

    for _ in range(2):
        new_seq()
    for step in range(1500):
        live = list(shadow.seqs)
        op = rng.choices(
            ["add", "chunk", "fork", "snap", "rollback", "release_snap", "spec", "rewrite", "release"],
            weights=[3, 30, 6, 6, 6, 3, 4, 5, 4],
        )[0]
        if not live:
            op = "add"
        if op == "add":
            new_seq()
        elif op == "chunk":
            batch = rng.sample(live, min(len(live), rng.randint(1, 3)))
            frames = [rng.randint(1, 3) for _ in batch]
            before = ({s: cache.page_table(s) for s in live}, cache.num_free_pages)
            plan = cache.plan_chunk(batch, frames)
            if plan is None:
                counts["none"] += 1
                assert before == ({s: cache.page_table(s) for s in live}, cache.num_free_pages), "failed plan changed state"
                assert cache.pages_needed(batch, frames) > 0
                release(rng.choice(live))  # preempt
            else:
                counts["chunk"] += 1
                counts["cow"] += plan.num_copied_pages
                check_plan(cache, plan)
                written = write_plan(cache, plan, gen)
                for s, sid in enumerate(plan.seq_ids):
                    ctx = [shadow.seqs[sid][f] for f in expected_visible(policy, len(shadow.seqs[sid]), frames_per_page)]
                    assert torch.equal(gather_keys(cache, plan, s), torch.cat(ctx + written[s], dim=2))
                if rng.random() < 0.1:
                    counts["abort"] += 1
                    cache.abort(plan)
                else:
                    cache.commit(plan)
                    for sid, w in zip(plan.seq_ids, written):
                        shadow.seqs[sid] = shadow.seqs[sid] + w
        elif op == "fork":
            parent = rng.choice(live)
            for child in cache.fork(parent, rng.randint(1, 2)):
                shadow.seqs[child], policies[child] = list(shadow.seqs[parent]), policy
            counts["fork"] += 1
        elif op in ("snap", "spec"):
            sid = rng.choice(live)
            snap = cache.begin_speculation(sid) if op == "spec" else cache.snapshot(sid)
            shadow.snaps[snap.snapshot_id] = (snap, list(shadow.seqs[sid]))
            counts["snap"] += 1
        elif op in ("rollback", "release_snap") and shadow.snaps:
            snap, frames = shadow.snaps[rng.choice(list(shadow.snaps))]
            if op == "release_snap":
                (cache.commit_speculation if snap.speculative else cache.release_snapshot)(snap)
                del shadow.snaps[snap.snapshot_id]
            else:
                counts["rollback"] += 1
                release_it = rng.random() < 0.5
                if snap.speculative and release_it:
                    cache.drop_speculation(snap)
                else:
                    cache.rollback(snap, release=release_it)
                shadow.seqs[snap.seq_id] = list(frames)
                for i in [i for i, (s, _) in shadow.snaps.items() if s.seq_id == snap.seq_id and i > snap.snapshot_id]:
                    del shadow.snaps[i]
                if release_it:
                    del shadow.snaps[snap.snapshot_id]
        elif op == "rewrite":
            batch = [s for s in rng.sample(live, min(len(live), 2)) if cache.rewrite_frames(s)]
            if batch:
                plan = cache.plan_rewrite(batch)
                if plan is not None:
                    counts["rewrite"] += 1
                    counts["cow"] += plan.num_copied_pages
                    check_plan(cache, plan)
                    written = write_plan(cache, plan, gen)
                    for sid, w, frames in zip(batch, written, plan.host.q_frame_idx.split(list(plan.num_q_frames))):
                        new = list(shadow.seqs[sid])
                        for f, content in zip(frames.tolist(), w):
                            new[f] = content
                        shadow.seqs[sid] = new
                    cache.commit(plan)
        elif op == "release":
            release(rng.choice(live))
            counts["release"] += 1
        cache.check_invariants()
        verify_contents(cache, shadow, policies)

    # the random walk must have exercised every path it claims to test
    assert counts["chunk"] > 200 and counts["fork"] > 20 and counts["rollback"] > 20 and counts["rewrite"] > 20
    assert counts["cow"] > 0 and counts["abort"] > 0, counts
    for sid in list(shadow.seqs):
        release(sid)
    cache.check_invariants()
    assert cache.num_free_pages == cache.num_pages
    assert all(cache.refcount(p) == 0 for p in range(cache.num_pages))


# ------------------------------------------------------------------------------ focused tests


def run_chunk(cache, seq_ids, frames, gen):
    plan = cache.plan_chunk(seq_ids, frames)
    assert plan is not None
    written = write_plan(cache, plan, gen)
    cache.commit(plan)
    return written


def test_window_sink_memory_constant_and_visible_frames_exact():
    policy = SinkWindowPolicy(sink_frames=3, window_frames=12)  # sink 3 + window 12: more than LongLive's span
    cache = make_cache(num_pages=3 + 12 + 3, policy=policy)  # exactly sink + window + one chunk
    gen = torch.Generator().manual_seed(5)
    sid = cache.add_sequence()
    contents, used = [], []
    for chunk in range(60):  # 180 frames through an 18-page pool
        plan = cache.plan_chunk([sid], 3)
        assert plan is not None, f"chunk {chunk} did not fit"
        n = 3 * chunk
        want = list(range(min(3, n))) + list(range(max(3, n - 12), n))
        assert plan.host.q_frame_idx.tolist() == [n, n + 1, n + 2]
        assert plan.host.kv_context_len.item() == len(want) * TPF
        contents += write_plan(cache, plan, gen)[0]
        assert torch.equal(gather_keys(cache, plan, 0), torch.cat([contents[f] for f in want + [n, n + 1, n + 2]], dim=2))
        cache.commit(plan)
        assert cache.visible_frames(sid) == list(range(min(3, n + 3))) + list(range(max(3, n + 3 - 12), n + 3))
        used.append(cache.num_pages - cache.num_free_pages)
    assert max(used) <= 3 + 12 + 3
    assert len(set(used[10:])) == 1, f"memory not constant: {used}"
    table = cache.page_table(sid)
    assert table.count(EVICTED) == 180 - 3 - 15
    cache.release(sid)
    assert cache.num_free_pages == cache.num_pages


def _local_attn_span(local_attn_size: int, sink_size: int, chunk_frames: int, chunks: int) -> list[list[int]]:
    """Frames each chunk attends to under the Self-Forcing / LongLive code's rolling cache: it holds
    ``local_attn_size`` frames; a chunk writes its frames in first, evicting the oldest non-sink
    frames when full, then attends to everything the cache holds."""
    cache, spans = [], []
    for chunk in range(chunks):
        new = list(range(chunk * chunk_frames, (chunk + 1) * chunk_frames))
        overflow = len(cache) + len(new) - local_attn_size
        if overflow > 0:
            cache = cache[:sink_size] + cache[sink_size + overflow:]
        cache += new
        spans.append(list(cache))
    return spans


@pytest.mark.parametrize("local_attn,sink,chunk", [(12, 3, 3), (9, 1, 3), (7, 0, 2), (6, 2, 1)])
def test_from_local_attn_attends_to_the_reference_codes_frames(local_attn, sink, chunk):
    policy = SinkWindowPolicy.from_local_attn(local_attn, sink, chunk)
    for n, span in enumerate(_local_attn_span(local_attn, sink, chunk, 20)):
        ours = visible_context_frames(policy, n * chunk, 1) + list(range(n * chunk, (n + 1) * chunk))
        assert ours == span, f"chunk {n}: {ours} != {span}"
    assert SinkWindowPolicy.from_local_attn(12, 3, 3) == SinkWindowPolicy(sink_frames=3, window_frames=6)  # LongLive
    with pytest.raises(ValueError, match="local_attn_size=6 leaves no window"):
        SinkWindowPolicy.from_local_attn(6, 3, 3)
    with pytest.raises(ValueError, match="'sink_size'"):
        SinkWindowPolicy.from_local_attn(12, -1, 3)


def test_window_with_two_frames_per_page_rounds_to_pages():
    policy = SinkWindowPolicy(sink_frames=2, window_frames=5)
    cache = make_cache(num_pages=8, frames_per_page=2, policy=policy)
    gen = torch.Generator().manual_seed(1)
    sid = cache.add_sequence()
    for _ in range(10):
        run_chunk(cache, [sid], 3, gen)
        n = cache.num_frames(sid)
        vis = cache.visible_frames(sid)
        assert vis == visible_context_frames(policy, n, 2) == expected_visible(policy, n, 2)
        assert vis[:2] == [0, 1] and vis[-1] == n - 1
        if n - 5 > 2:
            assert 5 <= len(vis) - 2 <= 6  # window rounded out to a page by at most one frame
    cache.check_invariants()


def test_copy_on_write_isolates_writers():
    gen = torch.Generator().manual_seed(2)
    cache = make_cache(num_pages=16, frames_per_page=2)
    parent = cache.add_sequence()
    prefix = run_chunk(cache, [parent], 3, gen)[0]  # frames 0..2: page 1 half full
    shared_last = cache.page_table(parent)[1]
    a, b = cache.fork(parent, 2)
    assert cache.refcount(shared_last) == 3
    plan = cache.plan_chunk([a, b], 1)  # both write frame 3 into the shared half-full page
    assert plan.num_copied_pages == 2  # parent still holds the original, so both writers copy
    wa, wb = write_plan(cache, plan, gen)
    cache.commit(plan)
    ta, tb, tp = cache.page_table(a), cache.page_table(b), cache.page_table(parent)
    assert len({ta[1], tb[1], tp[1]}) == 3 and ta[0] == tb[0] == tp[0]
    for seq, mine in ((a, wa[0]), (b, wb[0])):
        table = cache.page_table(seq)
        for f in range(3):  # the copied page kept the shared prefix frame
            assert torch.equal(read_frame(cache, table, f), prefix[f])
        assert torch.equal(read_frame(cache, table, 3), mine)
    assert not torch.equal(wa[0], wb[0])
    # the parent never saw either write: its next chunk writes in place (sole holder again)
    assert cache.refcount(tp[1]) == 1
    plan = cache.plan_chunk([parent], 1)
    assert plan.num_copied_pages == 0 and plan.num_new_pages == 0
    cache.abort(plan)
    cache.release(parent)
    cache.release(a)
    cache.release(b)
    assert cache.num_free_pages == cache.num_pages


def test_rewrite_copies_shared_pages_and_leaves_parent_intact():
    gen = torch.Generator().manual_seed(3)
    cache = make_cache(num_pages=16, policy=SinkWindowPolicy(sink_frames=1, window_frames=2))
    parent = cache.add_sequence()
    old = [f for _ in range(3) for f in run_chunk(cache, [parent], 2, gen)[0]]
    (child,) = cache.fork(parent)
    assert cache.visible_frames(child) == [0, 4, 5] and cache.rewrite_frames(child) == [4, 5]
    plan = cache.plan_rewrite([child])
    # the window is rewritten (its pages copied away from the parent); the sink is attended, kept and still shared
    assert plan.host.q_frame_idx.tolist() == [4, 5] and plan.num_copied_pages == 2
    assert plan.host.kv_len.tolist() == [3 * TPF] and plan.host.kv_context_len.tolist() == [TPF]
    new = write_plan(cache, plan, gen)[0]
    cache.commit(plan)
    assert cache.num_frames(child) == 6
    assert cache.page_table(child)[0] == cache.page_table(parent)[0]
    for f, content in zip([4, 5], new):
        assert torch.equal(read_frame(cache, cache.page_table(child), f), content)
        assert torch.equal(read_frame(cache, cache.page_table(parent), f), old[f])
    assert torch.equal(read_frame(cache, cache.page_table(child), 0), old[0])
    cache.check_invariants()


def test_rollback_restores_exact_table_and_contents():
    gen = torch.Generator().manual_seed(4)
    cache = make_cache(num_pages=24, frames_per_page=2)
    sid = cache.add_sequence()
    run_chunk(cache, [sid], 3, gen)
    table0 = cache.page_table(sid)
    contents0 = [read_frame(cache, table0, f) for f in range(3)]
    refs0 = [cache.refcount(p) for p in range(cache.num_pages)]
    free0 = cache.num_free_pages
    snap = cache.snapshot(sid)
    run_chunk(cache, [sid], 3, gen)  # writes frame 3 into page 1: copy-on-write against the snapshot
    later = cache.snapshot(sid)
    run_chunk(cache, [sid], 3, gen)
    plan = cache.plan_rewrite([sid])
    write_plan(cache, plan, gen)
    cache.commit(plan)
    cache.rollback(snap)
    assert cache.page_table(sid) == table0 and cache.num_frames(sid) == 3
    assert [s.snapshot_id for s in cache.snapshots(sid)] == [snap.snapshot_id]  # `later` is gone
    with pytest.raises(ValueError, match="not live"):
        cache.rollback(later)
    for f in range(3):
        assert torch.equal(read_frame(cache, table0, f), contents0[f])
    run_chunk(cache, [sid], 2, gen)  # regenerate, then roll back again and release the snapshot
    cache.rollback(snap, release=True)
    assert cache.page_table(sid) == table0 and cache.num_free_pages == free0
    assert [cache.refcount(p) for p in range(cache.num_pages)] == refs0
    cache.check_invariants()


def test_speculation_commit_and_drop():
    gen = torch.Generator().manual_seed(6)
    cache = make_cache(num_pages=20)
    sid = cache.add_sequence()
    run_chunk(cache, [sid], 3, gen)
    free_before = cache.num_free_pages
    marker = cache.begin_speculation(sid)
    run_chunk(cache, [sid], 3, gen)
    spec = cache.speculative_pages(marker)
    assert len(spec) == 3 and cache.num_free_pages == free_before - 3
    cache.drop_speculation(marker)
    assert cache.num_free_pages == free_before and cache.num_frames(sid) == 3
    assert all(cache.refcount(p) == 0 for p in spec)
    marker = cache.begin_speculation(sid)
    run_chunk(cache, [sid], 3, gen)
    kept = cache.speculative_pages(marker)
    cache.commit_speculation(marker)
    assert cache.snapshots(sid) == [] and cache.num_frames(sid) == 6
    assert all(cache.refcount(p) == 1 for p in kept)
    with pytest.raises(ValueError, match="speculation marker"):
        cache.commit_speculation(cache.snapshot(sid))
    cache.check_invariants()


def test_allocation_failure_returns_none_and_require_raises():
    gen = torch.Generator().manual_seed(7)
    cache = make_cache(num_pages=7)
    a, b = cache.add_sequence(), cache.add_sequence()
    run_chunk(cache, [a, b], 3, gen)
    state = (cache.page_table(a), cache.page_table(b), cache.num_free_pages)
    assert cache.plan_chunk([a, b], 1) is None  # needs 2, 1 free
    assert (cache.page_table(a), cache.page_table(b), cache.num_free_pages) == state
    assert cache.pages_needed([a, b], 1) == 1
    with pytest.raises(KVCacheExhausted, match=r"needs 2 free page\(s\), 1 of 7.*SinkWindowPolicy") as err:
        cache.require_chunk([a, b], 1)
    assert err.value.needed == 2 and err.value.free == 1
    cache.release(b)  # preempt, then it fits
    plan = cache.plan_chunk([a], 3)
    assert plan is not None and plan.num_new_pages == 3
    cache.commit(plan)


def test_eviction_pages_count_toward_a_full_pool():
    gen = torch.Generator().manual_seed(8)
    cache = make_cache(num_pages=5, policy=SinkWindowPolicy(sink_frames=1, window_frames=2))
    sid = cache.add_sequence()
    run_chunk(cache, [sid], 2, gen)
    run_chunk(cache, [sid], 2, gen)  # 4 frames, 1 free page
    assert cache.num_free_pages == 1
    plan = cache.plan_chunk([sid], 2)  # needs 2, 1 free + 1 freed by evicting frame 1
    assert plan is not None and plan.num_evicted_pages == 1 and cache.num_free_pages == 0
    cache.commit(plan)


def test_plan_tables_for_a_mixed_batch():
    gen = torch.Generator().manual_seed(9)
    cache = make_cache(num_pages=40, frames_per_page=2)
    a, b = cache.add_sequence(), cache.add_sequence(policy=SinkWindowPolicy(sink_frames=2, window_frames=3))
    run_chunk(cache, [a], 3, gen)
    for _ in range(3):
        run_chunk(cache, [b], 2, gen)
    c = cache.add_sequence()
    plan = cache.plan_chunk([a, b, c], [3, 2, 1])
    check_plan(cache, plan)
    t = plan.host
    assert t.q_frame_idx.tolist() == [3, 4, 5, 6, 7, 0] and plan.q_start_frame == (3, 6, 0)
    assert t.kv_len.tolist() == [6 * TPF, (2 + 4 + 2) * TPF, 1 * TPF]  # b: sink 2 + window 3 rounded to 4
    assert t.kv_last_page_len.tolist() == [2 * TPF, 2 * TPF, TPF]
    pa = cache.page_table(a)
    assert t.kv_indices[: t.kv_indptr[1]].tolist() == pa[:3]  # frame 3 continues a's half-full page 1
    assert t.kv_indptr.dtype == t.kv_indices.dtype == t.q_indptr.dtype == torch.int32
    assert t.write_slots.dtype == torch.int64
    assert plan.device is plan.host  # CPU pool: no transfer
    names = ("kv_indptr", "kv_indices", "kv_last_page_len", "kv_len", "kv_context_len", "q_indptr", "q_frame_idx", "write_slots")
    buffer, layout = pack({n: getattr(t, n) for n in names})
    again = unpack(buffer.clone(), layout)
    for name in names:
        assert torch.equal(again[name], getattr(t, name)) and again[name].dtype == getattr(t, name).dtype
    cache.commit(plan)


def test_fork_prefix_group_has_no_leaks():
    gen = torch.Generator().manual_seed(10)
    cache = make_cache(num_pages=64)
    prefix = cache.add_sequence()
    run_chunk(cache, [prefix], 3, gen)
    run_chunk(cache, [prefix], 3, gen)
    members = cache.fork(prefix, 8)
    assert cache.stats().num_shared_pages == 6 and cache.num_free_pages == 64 - 6
    for _ in range(2):
        plan = cache.plan_chunk(members, 3)
        check_plan(cache, plan)
        assert plan.num_new_pages == 24 and plan.num_copied_pages == 0
        idx, ptr = plan.host.kv_indices.tolist(), plan.host.kv_indptr.tolist()
        assert all(idx[ptr[i] : ptr[i] + 6] == idx[:6] for i in range(8))  # one shared prefix
        write_plan(cache, plan, gen)
        cache.commit(plan)
    cache.release(prefix)
    for m in members:
        cache.release(m)
    assert cache.num_free_pages == 64 and cache.stats().num_shared_pages == 0


def test_protocol_errors_name_the_problem():
    cache = make_cache(num_pages=8)
    sid = cache.add_sequence()
    plan = cache.plan_chunk([sid], 2)
    with pytest.raises(ValueError, match="inside chunk plan"):
        cache.fork(sid)
    with pytest.raises(ValueError, match="inside chunk plan"):
        cache.snapshot(sid)
    with pytest.raises(ValueError, match="repeats"):
        cache.plan_chunk([sid, sid], 1)
    cache.commit(plan)
    with pytest.raises(ValueError, match="not open"):
        cache.commit(plan)
    with pytest.raises(ValueError, match="chunk_frames"):
        cache.plan_chunk([sid], 0)
    with pytest.raises(ValueError, match="seq_id 99"):
        cache.release(99)
    with pytest.raises(ValueError, match="no frames"):
        cache.plan_rewrite([cache.add_sequence()])
    plan = cache.plan_chunk([sid], 1)
    cache.release(sid)  # releasing inside a plan frees its pages; closing the plan afterwards is fine
    cache.abort(plan)
    cache.check_invariants()


def test_config_budget_and_validation():
    cfg = KVCacheConfig(num_layers=3, num_heads=2, head_dim=4, tokens_per_frame=5, frames_per_page=2,
                        memory_budget_bytes=10_000, dtype=torch.float16, device="cpu")
    assert cfg.page_bytes == 3 * 2 * 10 * 2 * 4 * 2
    cache = PagedKVCache(cfg)
    assert cache.num_pages == 10_000 // cfg.page_bytes
    assert cache.kv.shape == (3, 2, cache.num_pages, 10, 2, 4)
    k_pages, v_pages = cache.layer(1)
    assert k_pages.shape == (cache.num_pages, 10, 2, 4) and k_pages.data_ptr() == cache.kv[1, 0].data_ptr()
    with pytest.raises(ValueError, match="memory_budget_bytes=100 is smaller than one page"):
        PagedKVCache(KVCacheConfig(3, 2, 4, 5, memory_budget_bytes=100, device="cpu"))
    with pytest.raises(ValueError, match="give memory_budget_bytes or num_pages"):
        PagedKVCache(KVCacheConfig(3, 2, 4, 5, device="cpu"))
    with pytest.raises(ValueError, match="head_dim"):
        KVCacheConfig(3, 2, 0, 5, num_pages=4).validate()
    with pytest.raises(ValueError, match="sink_frames=3 must be a multiple of frames_per_page=2"):
        KVCacheConfig(3, 2, 4, 5, frames_per_page=2, num_pages=4, policy=SinkWindowPolicy(3, 12)).validate()
    with pytest.raises(ValueError, match="window_frames"):
        SinkWindowPolicy(sink_frames=3, window_frames=0)


@pytest.mark.gpu
def test_plan_tables_reach_the_gpu_in_one_pinned_transfer():
    cfg = KVCacheConfig(num_layers=L, num_heads=H, head_dim=D, tokens_per_frame=TPF, frames_per_page=2,
                        num_pages=16, dtype=torch.bfloat16, device="cuda", policy=SinkWindowPolicy(2, 3))
    cache = PagedKVCache(cfg)
    a = cache.add_sequence()
    for _ in range(3):
        cache.commit(cache.plan_chunk([a], 3))
    (b,) = cache.fork(a)
    plan = cache.plan_chunk([a, b], [3, 1])
    assert plan.device.kv_indices.is_cuda and plan.host.kv_indices.device.type == "cpu"
    ptrs = {getattr(plan.device, n).untyped_storage().data_ptr() for n in ("kv_indptr", "kv_indices", "write_slots")}
    assert len(ptrs) == 1  # views into one device buffer
    torch.cuda.synchronize()
    for name in ("kv_indptr", "kv_indices", "kv_last_page_len", "kv_len", "kv_context_len", "q_indptr", "q_frame_idx", "write_slots"):
        assert torch.equal(getattr(plan.device, name).cpu(), getattr(plan.host, name)), name
    check_plan(cache, plan)
    cache.commit(plan)
    cache.release(a)
    cache.release(b)
    assert cache.num_free_pages == cache.num_pages
