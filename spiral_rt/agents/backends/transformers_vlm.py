"""A local vision-language model (Qwen2.5-VL, Qwen3-VL, ...) through transformers.

Boundaries: loads ``AutoProcessor`` + ``AutoModelForImageTextToText`` from a local directory (no
download: ``local_files_only``), turns neutral messages into the processor's chat format (images as
PIL images), appends the answer schema to the last user turn (local decoding is not constrained)
and returns the decoded new tokens. Generation is serialised with a lock: one model, one request at
a time. It shares the GPU with the video model, so its latency is only hidden when the GPU has room.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import BackendError, EventLog, resize_max_side

logger = logging.getLogger(__name__)

SCHEMA_INSTRUCTION = "\n\nReply with only one JSON object matching this JSON schema (no prose, no code fences):\n{schema}"


@dataclass
class TransformersVLMConfig:
    """Which local model to load and how to decode."""

    model_path: str
    """Local directory holding the processor and model files (a Hugging Face snapshot)."""
    device: str | None = None
    """Device of the model ("cuda", "cuda:1", "cpu"); None: cuda if available, else cpu."""
    dtype: str = "auto"
    """torch dtype name ("bfloat16", "float16", "float32") or "auto" (the checkpoint's)."""
    max_new_tokens: int = 512
    """Longest reply."""
    temperature: float = 0.0
    """0: greedy decoding; > 0: sampling at this temperature."""
    image_max_side: int | None = 448
    """Downscale images so that their longer side is at most this (fewer visual tokens)."""

    def validate(self) -> None:
        if not isinstance(self.model_path, str) or not self.model_path:
            raise ValueError(f"TransformersVLMConfig: model_path must be a non-empty string, got {self.model_path!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"TransformersVLMConfig: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"TransformersVLMConfig: temperature must be >= 0, got {self.temperature}")


def to_hf_messages(messages: list[dict], schema: dict | None, image_max_side: int | None) -> list[dict]:
    """Neutral messages -> the processor's chat format; the schema instruction ends the last user turn."""
    out = []
    for m in messages:
        content = m["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else []
        if not isinstance(content, str):
            for part in content:
                if part["type"] == "text":
                    parts.append({"type": "text", "text": part["text"]})
                elif part["type"] == "image":
                    parts.append({"type": "image", "image": resize_max_side(np.asarray(part["image"]), image_max_side)})
                else:
                    raise ValueError(f"to_hf_messages: unknown content part type {part['type']!r}")
        out.append({"role": m["role"], "content": parts})
    if schema is not None:
        last_user = next((m for m in reversed(out) if m["role"] == "user"), None)
        if last_user is None:
            raise ValueError("to_hf_messages: argument 'messages' has no user turn")
        last_user["content"].append({"type": "text", "text": SCHEMA_INSTRUCTION.format(schema=json.dumps(schema))})
    return out


class TransformersVLMBackend:
    """``ChatBackend`` over a local transformers image-text-to-text model.

    ``processor`` and ``model`` may be passed in (already loaded, or test doubles); otherwise they are
    loaded from ``config.model_path`` on first use.
    """

    def __init__(self, config: TransformersVLMConfig, processor=None, model=None):
        if not isinstance(config, TransformersVLMConfig):
            raise ValueError(f"TransformersVLMBackend: argument 'config' must be a TransformersVLMConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self.processor, self.model = processor, model
        self.events = EventLog()
        self._lock = threading.Lock()

    def load(self) -> None:
        """Load processor and model from ``config.model_path`` (no network)."""
        if self.processor is not None and self.model is not None:
            return
        path = Path(self.config.model_path)
        if not path.is_dir():
            raise BackendError(f"TransformersVLMBackend: model_path {str(path)!r} is not a directory "
                               f"(download the model first, e.g. `huggingface-cli download Qwen/Qwen2.5-VL-3B-Instruct --local-dir {path}`)")
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        device = self.config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = "auto" if self.config.dtype == "auto" else getattr(torch, self.config.dtype)
        logger.info("loading VLM from %s on %s", path, device)
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True).to(device).eval()

    def build_inputs(self, messages: list[dict], schema: dict | None):
        """Tokenised model inputs (a dict of tensors) for ``messages``."""
        hf = to_hf_messages(messages, schema, self.config.image_max_side)
        return self.processor.apply_chat_template(hf, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                  return_tensors="pt")

    def complete(self, messages: list[dict], schema: dict, schema_name: str) -> str:
        with self._lock:
            try:
                self.load()
                inputs = self.build_inputs(messages, schema)
                device = getattr(self.model, "device", None)
                if device is not None and hasattr(inputs, "to"):
                    inputs = inputs.to(device)
                gen_kwargs = {"max_new_tokens": self.config.max_new_tokens, "do_sample": self.config.temperature > 0}
                if self.config.temperature > 0:
                    gen_kwargs["temperature"] = self.config.temperature
                import torch

                with torch.inference_mode():
                    out = self.model.generate(**inputs, **gen_kwargs)
                prompt_len = inputs["input_ids"].shape[1]
                text = self.processor.batch_decode(out[:, prompt_len:], skip_special_tokens=True)[0]
            except BackendError:
                raise
            except Exception as exc:
                raise BackendError(f"local VLM {self.config.model_path!r} failed: {type(exc).__name__}: {exc}") from exc
        self.events.add("local_generate", new_tokens=int(out.shape[1] - prompt_len))
        return text

    def drain_events(self) -> list[dict]:
        return self.events.drain()
