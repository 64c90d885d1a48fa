"""Cache policies: which context frames a sequence keeps visible, and which pages it may evict.

Boundaries: pure host-side arithmetic on frame and page counts. No tensors, no page ids; the
manager (``spiral_rt.cache.manager``) applies these answers to its page tables.

Two policies:

- ``GlobalPolicy``: every frame written so far stays visible and resident. Memory grows with the
  video; when the pool is exhausted allocation fails (the manager returns None, callers raise
  ``KVCacheExhausted`` or preempt).
- ``SinkWindowPolicy``: the attention sink (the first ``sink_frames`` frames) plus the most recent
  ``window_frames`` context frames stay visible; everything in between is evicted, its pages go
  back to the pool, so memory is constant for any video length. LongLive's setting
  (``local_attn_size`` 12, ``sink_size`` 3, 3-frame chunks) is ``SinkWindowPolicy.from_local_attn(12, 3, 3)``
  = sink 3 + window 6: LongLive's attention span counts the sink and the chunk itself.

Frame arithmetic for a sequence with ``F`` context frames (frames already written before the
chunk about to run; the chunk's own frames are always visible on top of these)::

    frame:    0 .. sink-1 | sink ..  F-window-1 | F-window .. F-1 | chunk frames
              [ sink      | evicted             | window          | own chunk  ]

With ``frames_per_page = k > 1`` eviction works on whole pages: the window's first frame is
rounded down to a page boundary, so up to ``k - 1`` extra frames stay visible, and
``sink_frames`` must be a multiple of ``k`` (a page table cannot express a partially visible page
in the middle of the context).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class GlobalPolicy:
    """Keep every frame: the visible context is the whole history (Self-Forcing, CausVid)."""

    name = "global"

    def validate(self, frames_per_page: int) -> None:
        """Global keeps everything: valid for any page size."""

    def visible_ranges(self, num_context_frames: int, frames_per_page: int) -> list[tuple[int, int]]:
        """Half-open frame ranges visible to the next chunk: the whole history."""
        return [(0, num_context_frames)] if num_context_frames else []

    def evicted_page_range(self, num_context_frames: int, frames_per_page: int) -> tuple[int, int]:
        """Half-open range of logical pages that are no longer visible: none."""
        return (0, 0)

    def max_context_frames(self) -> int | None:
        """Upper bound on resident context frames of one sequence (None: unbounded)."""
        return None


@dataclass(frozen=True)
class SinkWindowPolicy:
    """Rolling window with an attention sink, in latent frames (LongLive: ``from_local_attn(12, 3, 3)``,
    i.e. sink 3 + window 6 context frames + the 3-frame chunk)."""

    sink_frames: int = 3
    """Frames at the start of the video that stay visible forever (the attention sink); 0 for none."""
    window_frames: int = 6
    """Most recent context frames visible to the next chunk, not counting the sink or the chunk itself."""

    name = "sink_window"

    @classmethod
    def from_local_attn(cls, local_attn_size: int, sink_size: int, chunk_frames: int) -> "SinkWindowPolicy":
        """The policy of the Self-Forcing / LongLive code's ``local_attn_size`` and ``sink_size``
        (in latent frames). There the KV cache holds ``local_attn_size`` frames and a chunk writes its
        own frames into it before attending, evicting the oldest non-sink frames: its attention span
        of ``local_attn_size`` frames counts the sink and the chunk itself, so the window of context
        frames is ``local_attn_size - sink_size - chunk_frames`` (LongLive: 12 - 3 - 3 = 6)."""
        for name, v in (("local_attn_size", local_attn_size), ("sink_size", sink_size), ("chunk_frames", chunk_frames)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"SinkWindowPolicy.from_local_attn: '{name}' must be an int >= 0, got {v!r}")
        window = local_attn_size - sink_size - chunk_frames
        if window < 1:
            raise ValueError(f"SinkWindowPolicy.from_local_attn: local_attn_size={local_attn_size} leaves no window "
                             f"after the sink ({sink_size}) and the chunk ({chunk_frames} frames)")
        return cls(sink_frames=sink_size, window_frames=window)

    def __post_init__(self) -> None:
        if isinstance(self.sink_frames, bool) or not isinstance(self.sink_frames, int) or self.sink_frames < 0:
            raise ValueError(f"SinkWindowPolicy: sink_frames must be an int >= 0, got {self.sink_frames!r}")
        if isinstance(self.window_frames, bool) or not isinstance(self.window_frames, int) or self.window_frames < 1:
            raise ValueError(f"SinkWindowPolicy: window_frames must be an int >= 1, got {self.window_frames!r}")

    def validate(self, frames_per_page: int) -> None:
        """Check the policy against the cache's page size (in frames)."""
        if self.sink_frames % frames_per_page:
            raise ValueError(
                f"SinkWindowPolicy: sink_frames={self.sink_frames} must be a multiple of frames_per_page="
                f"{frames_per_page} (a page cannot be half sink, half evicted)"
            )

    def _window_start(self, num_context_frames: int, frames_per_page: int) -> int:
        """First visible non-sink context frame (page aligned); never decreases as frames are added."""
        start = num_context_frames - self.window_frames
        if start <= self.sink_frames:
            return min(self.sink_frames, num_context_frames)
        return start - start % frames_per_page

    def visible_ranges(self, num_context_frames: int, frames_per_page: int) -> list[tuple[int, int]]:
        """Half-open frame ranges visible to the next chunk: the sink, then the window."""
        sink_end = min(self.sink_frames, num_context_frames)
        start = self._window_start(num_context_frames, frames_per_page)
        ranges = [(0, sink_end)] if sink_end else []
        if start < num_context_frames:
            if ranges and start == sink_end:
                ranges[0] = (0, num_context_frames)
            else:
                ranges.append((start, num_context_frames))
        return ranges

    def evicted_page_range(self, num_context_frames: int, frames_per_page: int) -> tuple[int, int]:
        """Half-open range of logical pages no longer visible (they hold only evicted frames)."""
        first = self.sink_frames // frames_per_page
        end = self._window_start(num_context_frames, frames_per_page) // frames_per_page
        return (first, max(first, end))

    def max_context_frames(self) -> int | None:
        """Upper bound on resident context frames of one sequence (before page rounding)."""
        return self.sink_frames + self.window_frames


CachePolicy = Union[GlobalPolicy, SinkWindowPolicy]


def visible_context_frames(policy: CachePolicy, num_context_frames: int, frames_per_page: int) -> list[int]:
    """The context frames a chunk after ``num_context_frames`` frames attends to, in order."""
    return [f for lo, hi in policy.visible_ranges(num_context_frames, frames_per_page) for f in range(lo, hi)]
