"""Per-chunk index tables of the paged KV cache ("plan once, run many").

Boundaries: this module holds the plan's data types and the host -> device upload; the manager
(``spiral_rt.cache.manager``) decides which pages go into the tables. A plan is built once per
chunk on the host and reused by every layer, every denoising step and the clean pass; the
attention and KV-write kernels read its device tables.

Tables (FlashInfer's paged-KV naming; S sequences in the batch)::

    kv_indptr         (S + 1,) int32   offsets into kv_indices, kv_indptr[0] = 0
    kv_indices        (kv_indptr[S],) int32   page ids: sequence s's visible context pages followed
                                       by its own chunk's pages, in frame order
    kv_last_page_len  (S,) int32       tokens used in the last page of sequence s (1..page_size)
    kv_len            (S,) int32       keys of sequence s = (pages - 1) * page_size + last_page_len
    kv_context_len    (S,) int32       of which context (written before this chunk); the rest is the chunk
    q_indptr          (S + 1,) int32   offsets of each sequence's query tokens in the packed chunk
    q_frame_idx       (num_q_frames,) int32   absolute frame index of every query frame (for RoPE)
    write_slots       (q_indptr[S],) int64    flat slot of every query token's K/V:
                                       page * page_size + offset, i.e. row of kv[layer, 0].view(-1, H, D)

Every page but the last of a sequence is full (frames start on page boundaries and the sink and
window are page aligned), which is what FlashInfer-style kernels assume.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch

from spiral_rt.transfer import upload_tensors

PlanKind = Literal["append", "rewrite"]

_TABLE_DTYPES = {
    "kv_indptr": torch.int32,
    "kv_indices": torch.int32,
    "kv_last_page_len": torch.int32,
    "kv_len": torch.int32,
    "kv_context_len": torch.int32,
    "q_indptr": torch.int32,
    "q_frame_idx": torch.int32,
    "write_slots": torch.int64,
}


@dataclass(frozen=True)
class PlanTables:
    """The index tensors of one plan, all on one device (see the module docstring for shapes)."""

    kv_indptr: torch.Tensor
    """(S + 1,) int32: offsets of each sequence's pages in ``kv_indices``."""
    kv_indices: torch.Tensor
    """(total pages,) int32: visible context pages then the chunk's own pages, per sequence."""
    kv_last_page_len: torch.Tensor
    """(S,) int32: tokens in each sequence's last page, 1..page_size."""
    kv_len: torch.Tensor
    """(S,) int32: keys visible to each sequence's queries (context + chunk), in tokens."""
    kv_context_len: torch.Tensor
    """(S,) int32: of ``kv_len``, the tokens written before this chunk (a rewrite plan: the keys it
    does not rewrite, i.e. the sink)."""
    q_indptr: torch.Tensor
    """(S + 1,) int32: offsets of each sequence's query tokens in the packed (L, H, D) chunk."""
    q_frame_idx: torch.Tensor
    """(num query frames,) int32: absolute frame index of each query frame, sequence-major."""
    write_slots: torch.Tensor
    """(total query tokens,) int64: flat K/V slot (page * page_size + offset) of every query token."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PlanTables":
        """A copy on ``device`` (one transfer per tensor; the manager uploads with one transfer)."""
        return PlanTables(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})


@dataclass(frozen=True)
class ChunkPlan:
    """One chunk's reservation and index tables for a batch of sequences.

    Created by ``PagedKVCache.plan_chunk`` (``kind="append"``: each sequence adds frames) or
    ``PagedKVCache.plan_rewrite`` (``kind="rewrite"``: each sequence recomputes the K/V of its
    visible context frames past the sink in place, LongLive's re-cache after a prompt switch). Close it
    with ``PagedKVCache.commit(plan)`` after the clean pass, or ``abort(plan)``.
    """

    plan_id: int
    """Manager-unique id; commit/abort check it."""
    kind: PlanKind
    """"append" (new frames) or "rewrite" (visible context frames past the sink rewritten in place)."""
    seq_ids: tuple[int, ...]
    """The batch's sequences, in table order."""
    num_q_frames: tuple[int, ...]
    """Query frames per sequence (the chunk's frames, or the rewritten frames)."""
    q_start_frame: tuple[int, ...]
    """Absolute index of each sequence's first query frame (the RoPE frame offset; every frame's is
    in ``q_frame_idx``)."""
    page_size: int
    """Tokens per page."""
    tokens_per_frame: int
    """Tokens per latent frame."""
    max_q_len: int
    """Largest per-sequence query length in tokens (host int, for kernel grids)."""
    max_kv_len: int
    """Largest per-sequence key length in tokens (host int, for kernel grids and graph buckets)."""
    num_new_pages: int
    """Pages taken from the free list for this plan (fresh pages plus copy-on-write copies)."""
    num_copied_pages: int
    """Of those, copy-on-write copies of shared pages."""
    num_evicted_pages: int
    """Page references dropped by the window policy while planning."""
    host: PlanTables
    """The tables on the CPU (for host-side logic; never read by kernels)."""
    device: PlanTables
    """The tables on the cache's device (what kernels read)."""

    @property
    def num_seqs(self) -> int:
        return len(self.seq_ids)

    @property
    def num_q_tokens(self) -> int:
        return sum(self.num_q_frames) * self.tokens_per_frame


def build_tables(
    pages_per_seq: list[list[int]],
    last_page_len: list[int],
    kv_len: list[int],
    kv_context_len: list[int],
    q_frames_per_seq: list[list[int]],
    q_frame_base_slot: list[int],
    tokens_per_frame: int,
) -> PlanTables:
    """Host (CPU) tables from per-sequence lists; ``q_frame_base_slot`` is each query frame's first slot."""
    kv_indptr = [0]
    for pages in pages_per_seq:
        kv_indptr.append(kv_indptr[-1] + len(pages))
    q_indptr = [0]
    for frames in q_frames_per_seq:
        q_indptr.append(q_indptr[-1] + len(frames) * tokens_per_frame)
    bases = torch.tensor(q_frame_base_slot, dtype=torch.int64)
    write_slots = (bases[:, None] + torch.arange(tokens_per_frame, dtype=torch.int64)).reshape(-1)
    return PlanTables(
        kv_indptr=torch.tensor(kv_indptr, dtype=torch.int32),
        kv_indices=torch.tensor([p for pages in pages_per_seq for p in pages], dtype=torch.int32),
        kv_last_page_len=torch.tensor(last_page_len, dtype=torch.int32),
        kv_len=torch.tensor(kv_len, dtype=torch.int32),
        kv_context_len=torch.tensor(kv_context_len, dtype=torch.int32),
        q_indptr=torch.tensor(q_indptr, dtype=torch.int32),
        q_frame_idx=torch.tensor([f for frames in q_frames_per_seq for f in frames], dtype=torch.int32),
        write_slots=write_slots,
    )


def upload(host: PlanTables, device: torch.device, pin_memory: bool) -> PlanTables:
    """Move all tables to ``device`` in one non-blocking transfer (``spiral_rt.transfer``); on the
    CPU the host tables are used as they are."""
    for f in fields(host):
        src = getattr(host, f.name)
        if src.dtype != _TABLE_DTYPES[f.name]:
            raise ValueError(f"upload: plan table '{f.name}' must be {_TABLE_DTYPES[f.name]}, got {src.dtype}")
    if device.type == "cpu":
        return host
    return PlanTables(**upload_tensors({f.name: getattr(host, f.name) for f in fields(host)}, device, pin_memory))
