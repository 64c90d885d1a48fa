"""Chat backends of the LLM/VLM agents: where a list of messages becomes a reply string.

Boundaries: a backend sends messages (the neutral form of ``spiral_rt.agents.prompts``) and a JSON
schema, and returns the model's raw reply text. It handles transport (timeouts, retries, backoff)
and schema-constrained decoding where the server supports it; it does not parse or validate the
reply (``spiral_rt.agents.llm`` does, with one repair turn). Backends: ``openai_chat`` (any
OpenAI-compatible endpoint) and ``transformers_vlm`` (a local Qwen2.5-VL / Qwen3-VL directory).
"""

from __future__ import annotations

import base64
import io
import threading
from typing import Protocol, runtime_checkable

import numpy as np


class BackendError(RuntimeError):
    """A backend could not produce a reply (endpoint down, timeouts after all retries, HTTP error)."""


@runtime_checkable
class ChatBackend(Protocol):
    """Sends messages with a JSON schema for the answer; returns the reply text."""

    def complete(self, messages: list[dict], schema: dict, schema_name: str) -> str:
        ...


class EventLog:
    """A thread-safe list of event dicts that the loop drains into the trace."""

    def __init__(self) -> None:
        self._events: list[dict] = []
        self._lock = threading.Lock()

    def add(self, kind: str, **fields) -> None:
        with self._lock:
            self._events.append({"event": kind, **fields})

    def drain(self) -> list[dict]:
        with self._lock:
            events, self._events = self._events, []
        return events


def resize_max_side(image: np.ndarray, max_side: int | None):
    """The (H, W, 3) uint8 ``image`` as a PIL image whose longer side is at most ``max_side``."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(image), mode="RGB") if image.ndim == 3 else Image.fromarray(image)
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    return img


def png_data_url(image: np.ndarray, max_side: int | None = None) -> str:
    """``data:image/png;base64,...`` of an (H, W, 3) uint8 frame (downscaled to ``max_side`` if given)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"png_data_url: argument 'image' must be (H, W, 3) uint8, got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    resize_max_side(image, max_side).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
