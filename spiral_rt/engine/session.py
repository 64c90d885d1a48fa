"""StreamSession: one video being generated chunk by chunk, and what a chunk step hands back.

A session holds the host-side state of one stream: its prompt schedule, its KV-cache sequence id,
its position (chunks done), its noise identity (seed, noise id), the clean latents of the frames a
LongLive re-cache may need, and its streaming VAE decoder state. The engine
(``spiral_rt.engine.engine.Engine``) owns the model, the cache and the chunk loop; a session's
methods are thin wrappers over it and over the cache manager (fork, snapshot / rollback,
speculative segments).

Lifecycle::

    session = engine.open_session("a red fox in the snow")        # or [PromptSpan(p, num_chunks), ...]
    frames = session.next_chunk()          # (F, H, W, 3) uint8 decoded frames (9, then 12 per chunk)
    session.set_prompt("the fox runs")     # takes effect at the next chunk boundary
    snap = session.snapshot(); ...; session.rollback(snap)     # regenerate from a chunk boundary
    child, = session.fork()                # shares every KV page (copy-on-write)
    session.close()                        # pages back to the pool

Status: "ready" (runs in the next engine step), "paused" (waits for outside work, e.g. a critic;
``pause()`` / ``resume()``), "finished" (its finite prompt schedule is done), "closed".

Boundaries: no tensors are computed here except copies of the decoder state for snapshots.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from spiral_rt.cache import Snapshot
from spiral_rt.models.vae import DecoderState

from .config import Prompt, PromptSpan, as_schedule

if TYPE_CHECKING:
    from .engine import Engine

logger = logging.getLogger(__name__)

Status = Literal["ready", "paused", "finished", "closed"]


@dataclass
class ChunkOutput:
    """What one chunk step produced for one session (tensors stay on the device)."""

    session_id: int
    """The session."""
    chunk_index: int
    """Index of this chunk in the session (0 = first)."""
    first_frame: int
    """Latent frame index of the chunk's first frame."""
    latents: torch.Tensor
    """(C, F, h, w) the chunk's final (clean) latents, in the engine's latent dtype."""
    prompt: Prompt
    """The prompt the chunk was generated with."""
    _frames: torch.Tensor | None = None
    _ready: object = None  # a torch.cuda.Event when decoded on a side stream

    @property
    def frames(self) -> torch.Tensor | None:
        """(F_video, H, W, 3) decoded frames (uint8, or float in [-1, 1]); None with output="latents".

        When decoded on a side stream, reading this makes the current stream wait for the decode
        (stream order only: the host does not block).
        """
        if self._ready is not None:
            stream = torch.cuda.current_stream(self._frames.device)
            stream.wait_event(self._ready)
            self._frames.record_stream(stream)
            self._ready = None
        return self._frames


@dataclass
class SessionSnapshot:
    """A session at a chunk boundary: the cache snapshot plus the host state and decoder state."""

    cache_snapshot: Snapshot
    """The cache manager's snapshot (holds page references)."""
    chunk_index: int
    schedule: list[PromptSpan]
    schedule_start: int
    last_prompt_key: object
    decoder_state: DecoderState | None
    latent_frames: dict[int, torch.Tensor]
    status: Status
    speculative: bool = False


def _clone_state(state: DecoderState | None) -> DecoderState | None:
    if state is None:
        return None
    return DecoderState(buffers=[b.clone() for b in state.buffers], started=state.started, latent_size=state.latent_size)


class StreamSession:
    """One video stream (module docstring). Create with ``Engine.open_session``."""

    def __init__(self, engine: "Engine", session_id: int, seq_id: int, schedule: list[PromptSpan], *, seed: int,
                 noise_id: int, max_chunks: int | None):
        self.engine = engine
        self.session_id = session_id
        """Engine-unique id (keys of ``Engine.step``'s result)."""
        self.seq_id = seq_id
        """The session's sequence in the engine's PagedKVCache."""
        self.seed = seed
        """Philox seed; noise key = (seed, noise_id, chunk_index, step). Change it to regenerate differently."""
        self.noise_id = noise_id
        """Second field of the noise key (the session id unless shared with a fork)."""
        self.max_chunks = max_chunks
        """Chunks after which the session finishes (None: as long as the prompt schedule lasts)."""
        self.chunk_index = 0
        """Chunks generated so far (the next chunk's index)."""
        self.status: Status = "ready"
        self._schedule = schedule
        self._schedule_start = 0
        self._last_prompt_key = None
        self._recache_next: bool | None = None
        self.decoder_state: DecoderState | None = None
        self.latent_frames: dict[int, torch.Tensor] = {}
        """Clean latents (C, h, w) of the frames a re-cache may need, by latent frame index."""
        self._update_finished()

    # ------------------------------------------------------------------ prompts and position

    @property
    def num_frames(self) -> int:
        """Latent frames generated so far."""
        return self.chunk_index * self.engine.config.chunk_frames

    def prompt_for_chunk(self, chunk: int | None = None) -> Prompt | None:
        """The prompt of chunk ``chunk`` (default: the next one), None past a finite schedule."""
        chunk = self.chunk_index if chunk is None else chunk
        offset = chunk - self._schedule_start
        for span in self._schedule:
            if span.num_chunks is None or offset < span.num_chunks:
                return span.prompt
            offset -= span.num_chunks
        return None

    def set_prompt(self, prompts, recache: bool | None = None) -> None:
        """Replace the prompt schedule from the next chunk on (a live prompt switch at the chunk boundary).

        Args:
            prompts: a prompt, a ``PromptSpan`` or a list of them (see ``config.as_schedule``).
            recache: re-cache the visible frames' K/V with the new prompt (LongLive) at this switch;
                None: the engine's ``recache_on_switch``.
        """
        self._check_open("set_prompt")
        self._schedule = as_schedule(prompts)
        self._schedule_start = self.chunk_index
        self._recache_next = recache
        if self.status == "finished":
            self.status = "ready"
        self._update_finished()

    def _update_finished(self) -> None:
        if self.status in ("closed", "paused"):
            return
        done = (self.max_chunks is not None and self.chunk_index >= self.max_chunks) or self.prompt_for_chunk() is None
        self.status = "finished" if done else "ready"

    # ------------------------------------------------------------------ running

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    @property
    def next_is_last(self) -> bool:
        """Whether the next chunk is this session's last (``max_chunks``): nothing will attend to its K/V."""
        return self.max_chunks is not None and self.chunk_index + 1 >= self.max_chunks

    def next_chunk(self, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Generate this session's next chunk alone and return its frames (F, H, W, 3), or its latents
        (C, F, h, w) when the engine's output is "latents".

        Args:
            noise: optional explicit noise (num_steps + 1, C, F, h, w): [0] the initial latents, [k]
                the re-noise after step k - 1, [num_steps] the clean pass's context noise.
        """
        self._check_open("next_chunk")
        if not self.ready:
            raise ValueError(f"next_chunk: session {self.session_id} is {self.status}, not ready")
        out = self.engine.step([self], noise={self.session_id: noise} if noise is not None else None)
        result = out[self.session_id]
        return result.latents if result.frames is None else result.frames

    def observe(self, latents: torch.Tensor) -> torch.Tensor:
        """Append an observed chunk (clean latents (C, F, h, w)) instead of generating one and return
        its decoded frames (or the latents when the engine's output is "latents"); see ``Engine.observe``."""
        self._check_open("observe")
        result = self.engine.observe(self, latents)
        return result.latents if result.frames is None else result.frames

    def pause(self) -> None:
        """Leave the session out of engine steps (e.g. while a critic judges it)."""
        self._check_open("pause")
        self.status = "paused"

    def resume(self) -> None:
        self._check_open("resume")
        self.status = "ready"
        self._update_finished()

    # ------------------------------------------------------------------ cache wrappers

    def fork(self, num_children: int = 1, share_noise: bool = False) -> list["StreamSession"]:
        """Children that continue from this chunk boundary, sharing every KV page (copy-on-write).

        ``share_noise``: children draw the same Philox noise as this session (same noise id);
        default: their own.
        """
        self._check_open("fork")
        return self.engine.fork_session(self, num_children, share_noise)

    def snapshot(self) -> SessionSnapshot:
        """Record this chunk boundary (KV pages, position, prompts, decoder state) for ``rollback``."""
        self._check_open("snapshot")
        return self._capture(self.engine.cache.snapshot(self.seq_id), speculative=False)

    def rollback(self, snapshot: SessionSnapshot, release: bool = False) -> None:
        """Return to ``snapshot``: the same pages, position, prompt schedule and decoder state.
        Regenerating with the same seed reproduces the same chunks; set ``seed`` for new ones."""
        self._check_open("rollback")
        self._check_snapshot(snapshot, "rollback")
        self.engine.cache.rollback(snapshot.cache_snapshot, release=release)
        self._restore(snapshot)

    def release_snapshot(self, snapshot: SessionSnapshot) -> None:
        self._check_snapshot(snapshot, "release_snapshot")
        self.engine.cache.release_snapshot(snapshot.cache_snapshot)
        self._prune_latents()

    def begin_speculation(self) -> SessionSnapshot:
        """Start a speculative segment (e.g. generate chunk n + 1 while a critic judges chunk n)."""
        self._check_open("begin_speculation")
        return self._capture(self.engine.cache.begin_speculation(self.seq_id), speculative=True)

    def commit_speculation(self, marker: SessionSnapshot) -> None:
        """Keep the speculative segment."""
        self._check_snapshot(marker, "commit_speculation")
        self.engine.cache.commit_speculation(marker.cache_snapshot)
        self._prune_latents()

    def drop_speculation(self, marker: SessionSnapshot) -> None:
        """Discard the speculative segment: pages freed, session back at the marker."""
        self._check_snapshot(marker, "drop_speculation")
        self.engine.cache.drop_speculation(marker.cache_snapshot)
        self._restore(marker)

    def close(self) -> None:
        """Release the session's pages, snapshots and decoder state."""
        if self.status == "closed":
            return
        self.engine.close_session(self)

    # ------------------------------------------------------------------ internals

    def _check_open(self, what: str) -> None:
        if self.status == "closed":
            raise ValueError(f"{what}: session {self.session_id} is closed")

    def _check_snapshot(self, snapshot, what: str) -> None:
        if not isinstance(snapshot, SessionSnapshot) or snapshot.cache_snapshot.seq_id != self.seq_id:
            raise ValueError(f"{what}: 'snapshot' must be a SessionSnapshot of session {self.session_id}")

    def _capture(self, cache_snapshot: Snapshot, speculative: bool) -> SessionSnapshot:
        return SessionSnapshot(
            cache_snapshot=cache_snapshot, chunk_index=self.chunk_index, schedule=list(self._schedule),
            schedule_start=self._schedule_start, last_prompt_key=self._last_prompt_key,
            decoder_state=self.engine._clone_decoder_state(self.decoder_state), latent_frames=dict(self.latent_frames),
            status=self.status, speculative=speculative,
        )

    def _restore(self, snap: SessionSnapshot) -> None:
        self.chunk_index = snap.chunk_index
        self._schedule = list(snap.schedule)
        self._schedule_start = snap.schedule_start
        self._last_prompt_key = snap.last_prompt_key
        self.decoder_state = self.engine._clone_decoder_state(snap.decoder_state)
        self.latent_frames = dict(snap.latent_frames)
        self.status = "ready" if snap.status == "finished" else snap.status
        self._update_finished()
        self._prune_latents()

    def _prune_latents(self) -> None:
        """Keep only latents of frames visible to the next chunk or at a live snapshot (for re-cache)."""
        cache = self.engine.cache
        keep = set(cache.visible_frames(self.seq_id))
        for snap in cache.snapshots(self.seq_id):
            keep.update(self.engine._visible_at(self.seq_id, snap.num_frames))
        for f in [f for f in self.latent_frames if f not in keep]:
            del self.latent_frames[f]

    def __repr__(self) -> str:
        return (f"StreamSession(id={self.session_id}, seq={self.seq_id}, chunk={self.chunk_index}, "
                f"status={self.status})")
