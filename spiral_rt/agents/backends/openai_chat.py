"""An OpenAI-compatible chat endpoint (vLLM, SGLang, Ollama, hosted APIs) through the ``openai`` client.

Boundaries: transport only. Converts neutral messages to the chat-completions format (images as
base64 PNG data URLs), asks for schema-constrained output (``response_format`` json_schema; if the
server rejects that with HTTP 400 it falls back to json_object, then to no constraint, once per
backend, and the prompt still carries the schema), applies a per-request timeout, and retries
connection errors, timeouts, 408/409/429 and 5xx with exponential backoff and jitter. Other HTTP
errors (401, 404, ...) are raised at once as ``BackendError``. The ``openai`` package is imported
lazily, so the rest of the agents work without it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass

import numpy as np

from . import BackendError, EventLog, png_data_url

logger = logging.getLogger(__name__)

SCHEMA_MODES = ("json_schema", "json_object", "none")


@dataclass
class OpenAIChatConfig:
    """Where the endpoint is and how to talk to it."""

    model: str
    """Model name as the server knows it (e.g. "Qwen/Qwen2.5-VL-7B-Instruct")."""
    base_url: str | None = None
    """Endpoint root including /v1 (e.g. "http://localhost:8000/v1"); None: $OPENAI_BASE_URL or the OpenAI API."""
    api_key: str | None = None
    """API key; None: read from the environment variable ``api_key_env`` (local servers accept any key)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the key when ``api_key`` is None."""
    timeout_s: float = 60.0
    """Per-request timeout (connect + read)."""
    max_retries: int = 3
    """Retries of a retryable failure (so at most max_retries + 1 requests per call)."""
    backoff_s: float = 0.5
    """First backoff delay; doubled after every retry."""
    backoff_max_s: float = 8.0
    """Longest backoff delay."""
    temperature: float = 0.0
    """Sampling temperature."""
    max_tokens: int = 1024
    """Longest reply."""
    schema_mode: str = "json_schema"
    """Output constraint to ask for first: "json_schema", "json_object" or "none"."""
    strict: bool = True
    """``strict`` flag of the json_schema response format."""
    image_max_side: int | None = 512
    """Downscale images so that their longer side is at most this (None: send as they are)."""

    def validate(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"OpenAIChatConfig: model must be a non-empty string, got {self.model!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"OpenAIChatConfig: timeout_s must be > 0, got {self.timeout_s}")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"OpenAIChatConfig: max_retries must be an int >= 0, got {self.max_retries!r}")
        if self.backoff_s < 0 or self.backoff_max_s < 0:
            raise ValueError(f"OpenAIChatConfig: backoff_s and backoff_max_s must be >= 0, got {self.backoff_s}, {self.backoff_max_s}")
        if self.schema_mode not in SCHEMA_MODES:
            raise ValueError(f"OpenAIChatConfig: schema_mode must be one of {SCHEMA_MODES}, got {self.schema_mode!r}")
        if self.max_tokens < 1:
            raise ValueError(f"OpenAIChatConfig: max_tokens must be >= 1, got {self.max_tokens}")


def to_openai_messages(messages: list[dict], image_max_side: int | None) -> list[dict]:
    """Neutral messages -> chat-completions messages (image parts become PNG data URLs)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        parts = []
        for part in content:
            if part["type"] == "text":
                parts.append({"type": "text", "text": part["text"]})
            elif part["type"] == "image":
                parts.append({"type": "image_url", "image_url": {"url": png_data_url(np.asarray(part["image"]), image_max_side)}})
            else:
                raise ValueError(f"to_openai_messages: unknown content part type {part['type']!r}")
        out.append({"role": m["role"], "content": parts})
    return out


class OpenAIChatBackend:
    """``ChatBackend`` over an OpenAI-compatible endpoint; thread safe (the client is)."""

    def __init__(self, config: OpenAIChatConfig):
        if not isinstance(config, OpenAIChatConfig):
            raise ValueError(f"OpenAIChatBackend: argument 'config' must be an OpenAIChatConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self.events = EventLog()
        self._schema_mode = config.schema_mode
        self._lock = threading.Lock()
        self._client = None

    @property
    def client(self):
        with self._lock:
            if self._client is None:
                try:
                    import openai
                except ImportError as exc:
                    raise BackendError("the OpenAI-compatible backend needs the 'openai' package: pip install openai") from exc
                key = self.config.api_key or os.environ.get(self.config.api_key_env) or "EMPTY"
                self._client = openai.OpenAI(base_url=self.config.base_url, api_key=key,
                                             timeout=self.config.timeout_s, max_retries=0)
            return self._client

    def _response_format(self, schema: dict, schema_name: str) -> dict | None:
        if self._schema_mode == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": schema_name, "schema": schema, "strict": self.config.strict}}
        if self._schema_mode == "json_object":
            return {"type": "json_object"}
        return None

    def complete(self, messages: list[dict], schema: dict, schema_name: str) -> str:
        client = self.client  # raises BackendError when the openai package is missing
        import openai

        cfg = self.config
        payload = to_openai_messages(messages, cfg.image_max_side)
        delay = cfg.backoff_s
        retries = 0
        while True:
            kwargs = dict(model=cfg.model, messages=payload, temperature=cfg.temperature, max_tokens=cfg.max_tokens)
            fmt = self._response_format(schema, schema_name)
            if fmt is not None:
                kwargs["response_format"] = fmt
            t0 = time.perf_counter()
            try:
                response = client.chat.completions.create(**kwargs)
            except openai.BadRequestError as exc:
                if fmt is not None and any(w in str(exc).lower() for w in ("response_format", "schema", "json")):
                    new_mode = SCHEMA_MODES[SCHEMA_MODES.index(self._schema_mode) + 1]
                    self.events.add("schema_downgrade", from_mode=self._schema_mode, to_mode=new_mode, error=str(exc)[:300])
                    logger.warning("endpoint rejected response_format %s (%s); using %s", self._schema_mode, exc, new_mode)
                    self._schema_mode = new_mode
                    continue
                raise BackendError(f"endpoint {cfg.base_url} rejected the request: {exc}") from exc
            except (openai.APITimeoutError, openai.APIConnectionError, openai.RateLimitError,
                    openai.InternalServerError, openai.ConflictError) as exc:
                retryable, error = True, exc
            except openai.APIStatusError as exc:
                retryable, error = exc.status_code == 408 or exc.status_code >= 500, exc
            else:
                choice = response.choices[0] if response.choices else None
                text = choice.message.content if choice is not None and choice.message is not None else None
                if not text:
                    refusal = getattr(choice.message, "refusal", None) if choice is not None else None
                    text = json.dumps({"refusal": refusal}) if refusal else ""
                self.events.add("request", latency_s=round(time.perf_counter() - t0, 6), retries=retries,
                                schema_mode=self._schema_mode)
                return text
            if not retryable or retries >= cfg.max_retries:
                self.events.add("request_failed", error=f"{type(error).__name__}: {error}"[:300], retries=retries)
                raise BackendError(f"endpoint {cfg.base_url or 'default'} failed after {retries + 1} request(s): "
                                   f"{type(error).__name__}: {error}") from error
            sleep = min(delay, cfg.backoff_max_s) * (0.5 + random.random() / 2)
            retries += 1
            self.events.add("retry", attempt=retries, sleep_s=round(sleep, 4), error=f"{type(error).__name__}: {error}"[:300])
            logger.warning("endpoint %s: %s: %s; retry %d/%d in %.2f s", cfg.base_url, type(error).__name__, error,
                           retries, cfg.max_retries, sleep)
            time.sleep(sleep)
            delay *= 2

    def drain_events(self) -> list[dict]:
        return self.events.drain()
