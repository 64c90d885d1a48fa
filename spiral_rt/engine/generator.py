"""EngineGenerator: the streaming engine as the closed loop's ``Generator``.

Role: adapts one ``StreamSession`` of an ``Engine`` to ``spiral_rt.agents.protocols.Generator``, the
interface ``spiral_rt.agents.loop.ClosedLoop`` drives:

- ``generate(prompt, span_chunks, seed)``: switches the session's prompt at the current chunk
  boundary (no LongLive re-cache by default; ``EngineGeneratorConfig.recache``), sets the session's
  Philox seed to ``seed`` (the engine keys noise by (seed, noise id, chunk index, step), so a segment's
  noise is a function of ``seed`` and its position: a retry with a new seed differs, the same seed at
  the same position replays bit for bit), runs ``span_chunks`` chunks and returns their decoded frames
  as one (F, H, W, 3) uint8 array on the host;
- ``snapshot`` / ``rollback`` / ``release_snapshot``: the session's (refcounted KV pages, position,
  prompt schedule, streaming-decoder state);
- ``start_speculation`` / ``commit_speculation`` / ``drop_speculation``: the session's
  ``begin_speculation`` / ``commit_speculation`` / ``drop_speculation`` (droppable pages).

Between segments the session is paused, so an ``Engine.step()`` driven by someone else on the same
engine never advances it behind the loop's back. The adapter checks the loop's contract (at most one
open speculation; no snapshot or rollback while one is open; tokens of this generator only) and
raises ``RuntimeError`` on misuse, ``ValueError`` naming the argument on bad arguments.

``HashTextEncoder`` is a deterministic stand-in text encoder (token hashes -> fixed random vectors)
for random-weight smoke runs and tests, where no trained encoder exists; it carries no meaning.

Boundaries: no tensor math beyond moving frames to the host; the engine, the cache manager and the
session are used, not changed. One thread drives a generator (the loop's contract).
"""

from __future__ import annotations

import contextlib
import logging
import re
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from spiral_rt.models.text import TextEmbeddings
from spiral_rt.transfer import to_host

from .config import PromptSpan
from .engine import Engine
from .session import SessionSnapshot, StreamSession

logger = logging.getLogger(__name__)

__all__ = ["EngineGenerator", "EngineGeneratorConfig", "HashTextEncoder"]


@dataclass
class EngineGeneratorConfig:
    """How ``EngineGenerator`` turns a loop segment into engine chunks."""

    recache: bool | None = False
    """LongLive re-cache of the visible frames' K/V when a segment's prompt differs from the previous
    segment's: False (default) keeps the old K/V, True recomputes it with the new prompt, None uses the
    engine's ``EngineConfig.recache_on_switch``."""
    max_span_chunks: int | None = None
    """Refuse segments longer than this many chunks (None: no limit); a guard against runaway plans."""
    pause_between_segments: bool = True
    """Keep the session paused between ``generate`` calls, so other users of the engine's ``step()`` do
    not advance it."""

    def validate(self) -> None:
        if self.recache is not None and not isinstance(self.recache, bool):
            raise ValueError(f"EngineGeneratorConfig: 'recache' must be True, False or None, got {self.recache!r}")
        if self.max_span_chunks is not None and (isinstance(self.max_span_chunks, bool)
                                                 or not isinstance(self.max_span_chunks, int) or self.max_span_chunks < 1):
            raise ValueError(f"EngineGeneratorConfig: 'max_span_chunks' must be None or an int >= 1, got {self.max_span_chunks!r}")
        if not isinstance(self.pause_between_segments, bool):
            raise ValueError(f"EngineGeneratorConfig: 'pause_between_segments' must be a bool, got {self.pause_between_segments!r}")


def _frames_to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(F, H, W, 3) uint8 or float in [-1, 1] device frames -> host uint8 array."""
    if frames.dtype != torch.uint8:
        frames = ((frames.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return to_host(frames).numpy()


class EngineGenerator:
    """``Generator`` over one session of an ``Engine`` (module docstring).

    Args:
        engine: the engine; its ``config.output`` must be "uint8" or "float" (decoded frames).
        config: ``EngineGeneratorConfig``.
        session: drive this open session of ``engine`` (e.g. one holding a visual prefix); default:
            open a new one. The generator closes only a session it opened itself.
        seed: Philox seed of a session opened here before the first segment (each ``generate`` sets
            its own); default ``engine.config.seed``.
        noise_id: noise id of a session opened here (default: its session id).
        policy: cache policy of a session opened here (default ``engine.config.policy``).
    """

    def __init__(self, engine: Engine, config: EngineGeneratorConfig | None = None, *,
                 session: StreamSession | None = None, seed: int | None = None, noise_id: int | None = None,
                 policy=None):
        if not isinstance(engine, Engine):
            raise ValueError(f"EngineGenerator: argument 'engine' must be an Engine, got {type(engine).__name__}")
        if engine.config.output == "latents":
            raise ValueError("EngineGenerator: argument 'engine' has config.output='latents'; the loop needs decoded "
                             "frames ('uint8' or 'float') and therefore a VAE")
        config = config or EngineGeneratorConfig()
        if not isinstance(config, EngineGeneratorConfig):
            raise ValueError(f"EngineGenerator: argument 'config' must be an EngineGeneratorConfig, got {type(config).__name__}")
        config.validate()
        self.engine = engine
        self.config = config
        if session is not None:
            if not isinstance(session, StreamSession) or session.engine is not engine or session.status == "closed":
                raise ValueError("EngineGenerator: argument 'session' must be an open StreamSession of 'engine'")
            if not any(s is session for s in engine.sessions):
                raise ValueError("EngineGenerator: argument 'session' is not open in 'engine'")
            self.session = session
            self._owns_session = False
        else:
            # The placeholder prompt is never generated with: every generate() sets its own prompt first.
            self.session = engine.open_session("", seed=seed, noise_id=noise_id, policy=policy)
            self._owns_session = True
        if config.pause_between_segments and self.session.status == "ready":
            self.session.pause()
        self._snapshots: dict[int, SessionSnapshot] = {}
        self._speculation: SessionSnapshot | None = None
        self.chunks_generated = 0
        """Chunks generated through this adapter, dropped and rolled-back ones included."""

    # ------------------------------------------------------------------------------ generation
    def generate(self, prompt: str, span_chunks: int, seed: int) -> np.ndarray:
        """Generate ``span_chunks`` chunks with ``prompt`` and noise from ``seed``; (F, H, W, 3) uint8 frames."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"EngineGenerator.generate: argument 'prompt' must be a non-empty str, got {prompt!r}")
        if isinstance(span_chunks, bool) or not isinstance(span_chunks, int) or span_chunks < 1:
            raise ValueError(f"EngineGenerator.generate: argument 'span_chunks' must be an int >= 1, got {span_chunks!r}")
        limit = self.config.max_span_chunks
        if limit is not None and span_chunks > limit:
            raise ValueError(f"EngineGenerator.generate: argument 'span_chunks'={span_chunks} exceeds "
                             f"config.max_span_chunks={limit}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
            raise ValueError(f"EngineGenerator.generate: argument 'seed' must be an int in [0, 2**64), got {seed!r}")
        s = self._open_session("generate")
        s.seed = int(seed)
        with self._segment(s, prompt):
            chunks = []
            for _ in range(span_chunks):
                frames = s.next_chunk()
                self.chunks_generated += 1
                chunks.append(frames)
            out = _frames_to_uint8(torch.cat(chunks, dim=0))
        logger.debug("EngineGenerator: %d chunk(s) of %r with seed %d -> %d frame(s), session at chunk %d",
                     span_chunks, prompt, seed, out.shape[0], s.chunk_index)
        return out

    def observe(self, prompt: str, latents: torch.Tensor) -> np.ndarray:
        """Append observed chunks instead of generating them (``Engine.observe``): e.g. a world's start
        scene, which the loop then continues; returns their decoded (F, H, W, 3) uint8 frames.

        Args:
            prompt: the prompt their K/V are written under (e.g. the scene's description).
            latents: (C, F, h, w) clean latents, F a multiple of the engine's chunk frames.
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"EngineGenerator.observe: argument 'prompt' must be a non-empty str, got {prompt!r}")
        F = self.engine.config.chunk_frames
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or latents.shape[1] == 0 or latents.shape[1] % F:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"EngineGenerator.observe: argument 'latents' must be (C, F, h, w) with F a positive multiple "
                             f"of the chunk's {F} latent frames, got {got}")
        s = self._open_session("observe")
        with self._segment(s, prompt):
            chunks = [s.observe(latents[:, i:i + F]) for i in range(0, latents.shape[1], F)]
        return _frames_to_uint8(torch.cat(chunks, dim=0))

    def warmup(self, prompt: str, seed: int = 0) -> None:
        """One throwaway chunk on a temporary session (allocations, kernel selection, text encoding of
        ``prompt``); the generator's own session is untouched. Meant for ``ClosedLoop.run(warmup=...)``."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"EngineGenerator.warmup: argument 'prompt' must be a non-empty str, got {prompt!r}")
        tmp = self.engine.open_session(prompt, seed=seed)  # open-ended: its chunk runs the clean pass, as real chunks do
        try:
            tmp.next_chunk()
        finally:
            tmp.close()

    # ------------------------------------------------------------------------------ snapshots
    def snapshot(self) -> SessionSnapshot:
        """The session's current chunk boundary (holds its KV pages until ``release_snapshot``)."""
        s = self._open_session("snapshot")
        if self._speculation is not None:
            raise RuntimeError("EngineGenerator.snapshot: called while a speculation is open (the loop's contract forbids it)")
        snap = s.snapshot()
        self._snapshots[id(snap)] = snap
        return snap

    def rollback(self, token: SessionSnapshot) -> None:
        """Back to ``token``'s chunk boundary; the token stays valid."""
        s = self._open_session("rollback")
        if self._speculation is not None:
            raise RuntimeError("EngineGenerator.rollback: called while a speculation is open (the loop's contract forbids it)")
        s.rollback(self._check_token(token, "rollback"), release=False)
        if self.config.pause_between_segments and s.status == "ready":
            s.pause()

    def release_snapshot(self, token: SessionSnapshot) -> None:
        """Forget ``token``; pages only it kept alive go back to the pool."""
        snap = self._check_token(token, "release_snapshot")
        del self._snapshots[id(snap)]
        if self.session.status != "closed":
            self.session.release_snapshot(snap)

    # ------------------------------------------------------------------------------ speculation
    def start_speculation(self) -> SessionSnapshot:
        """Open a speculation: chunks generated from now on sit on droppable pages."""
        s = self._open_session("start_speculation")
        if self._speculation is not None:
            raise RuntimeError("EngineGenerator.start_speculation: a speculation is already open")
        self._speculation = s.begin_speculation()
        return self._speculation

    def commit_speculation(self, token: SessionSnapshot) -> None:
        """Keep the speculative chunks as ordinary state."""
        marker = self._check_speculation(token, "commit_speculation")
        self.session.commit_speculation(marker)
        self._speculation = None

    def drop_speculation(self, token: SessionSnapshot) -> None:
        """Discard the speculative chunks: their pages are freed and the session is back at the marker."""
        marker = self._check_speculation(token, "drop_speculation")
        self.session.drop_speculation(marker)
        self._speculation = None
        if self.config.pause_between_segments and self.session.status == "ready":
            self.session.pause()

    # ------------------------------------------------------------------------------ lifetime
    @property
    def live_snapshots(self) -> int:
        """Snapshots handed out and not yet released."""
        return len(self._snapshots)

    def close(self) -> None:
        """Release every snapshot still held and close the session if this generator opened it."""
        s = self.session
        if s.status != "closed":
            if self._speculation is not None:
                s.drop_speculation(self._speculation)
                self._speculation = None
            for snap in list(self._snapshots.values()):
                s.release_snapshot(snap)
        self._snapshots.clear()
        if self._owns_session and s.status != "closed":
            s.close()

    def __enter__(self) -> "EngineGenerator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------ internals
    @contextlib.contextmanager
    def _segment(self, s: StreamSession, prompt: str) -> Iterator[None]:
        """One segment's chunks under ``prompt``: the session set to it and resumed, paused again after."""
        s.set_prompt(PromptSpan(prompt, None), recache=self.config.recache)
        if s.status == "paused":
            s.resume()
        try:
            yield
        finally:
            if self.config.pause_between_segments and s.status == "ready":
                s.pause()

    def _open_session(self, what: str) -> StreamSession:
        if self.session.status == "closed":
            raise RuntimeError(f"EngineGenerator.{what}: the session is closed")
        return self.session

    def _check_token(self, token, what: str) -> SessionSnapshot:
        if not isinstance(token, SessionSnapshot) or self._snapshots.get(id(token)) is not token:
            raise ValueError(f"EngineGenerator.{what}: argument 'token' is not a live snapshot of this generator")
        return token

    def _check_speculation(self, token, what: str) -> SessionSnapshot:
        if self._speculation is None:
            raise RuntimeError(f"EngineGenerator.{what}: no speculation is open")
        if token is not self._speculation:
            raise ValueError(f"EngineGenerator.{what}: argument 'token' is not the open speculation's token")
        return token

    def __repr__(self) -> str:
        return (f"EngineGenerator({self.session!r}, snapshots={len(self._snapshots)}, "
                f"speculating={self._speculation is not None})")


_TOKEN = re.compile(r"\w+|[^\w\s]")


class HashTextEncoder:
    """A deterministic ``TextEncoder`` without a language model: each token (lower-cased word or
    punctuation) maps to a fixed unit-variance random vector seeded by its CRC32, plus a small position
    term. Equal prompts give equal embeddings, different prompts different ones; there is no meaning.
    For random-weight smoke runs and tests only.

    Args:
        dim: embedding width (the DiT's ``text_dim``).
        max_length: tokens per prompt after padding / truncation (the DiT's ``text_len`` is typical).
    """

    def __init__(self, dim: int, max_length: int = 16):
        for name, value in (("dim", dim), ("max_length", max_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"HashTextEncoder: argument '{name}' must be a positive int, got {value!r}")
        self.dim = dim
        self.max_length = max_length

    def _vector(self, token: str, position: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(token.encode()))
        v = torch.randn(self.dim, generator=g)
        return v + 0.1 * torch.sin(torch.arange(self.dim, dtype=torch.float32) * (position + 1) / self.dim)

    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts \
                or not all(isinstance(p, str) for p in prompts):
            raise ValueError("HashTextEncoder.encode: argument 'prompts' must be a non-empty list of strings")
        emb = torch.zeros(len(prompts), self.max_length, self.dim)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool)
        for i, p in enumerate(prompts):
            tokens = _TOKEN.findall(p.lower())[: self.max_length] or ["<empty>"]
            for j, tok in enumerate(tokens):
                emb[i, j] = self._vector(tok, j)
                mask[i, j] = True
        return TextEmbeddings(emb, mask)
