"""Text encoders: prompts -> (B, L, dim) embeddings for the DiT's cross-attention.

- ``TextEncoder``: the protocol any encoder implements, ``encode(prompts) -> TextEmbeddings``
  (embeddings (B, L, dim) with padding positions zeroed, mask (B, L) bool, True = real token).
- ``UMT5TextEncoder``: UMT5-XXL (Wan2.1's encoder, dim 4096) through transformers'
  ``UMT5EncoderModel`` and its tokenizer, loaded from a local directory only (no downloads),
  padded / truncated to 512 tokens. Wan feeds the DiT the encoder output cut at each prompt's
  length and zero-padded back to 512; zeroing the padding positions is the same thing.
- ``CachedTextEncoder``: wraps any encoder with a per-prompt-string cache (LRU), so a prompt
  met again (every chunk of a segment, every member of a GRPO group, a replayed plan step) is
  encoded once.

The DiT's own text MLP and cross-attention K/V are a separate, per-prompt step
(``CausalWanDiT.encode_text``); this module stops at the encoder's embeddings.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import torch

logger = logging.getLogger(__name__)


@dataclass
class TextEmbeddings:
    embeddings: torch.Tensor
    """(B, L, dim), zero at padding positions."""
    mask: torch.Tensor
    """(B, L) bool, True at real tokens."""

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) tokens per prompt."""
        return self.mask.sum(dim=1)


@runtime_checkable
class TextEncoder(Protocol):
    dim: int
    """Width of the embeddings."""
    max_length: int
    """Tokens per prompt after padding (L)."""

    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        """Embeddings (B, L, dim) of B prompts, padding positions zero, and their mask (B, L)."""
        ...


def _check_prompts(who: str, prompts) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{who}: 'prompts' must be a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError(f"{who}: 'prompts' is empty")
    return list(prompts)


class UMT5TextEncoder:
    """UMT5 encoder + tokenizer from a local directory.

    Args:
        path: a directory holding the encoder (config.json + weights) and its tokenizer, or a
            diffusers-style directory with ``text_encoder/`` and ``tokenizer/`` subfolders.
        tokenizer_path: the tokenizer's directory when it lives elsewhere.
        max_length: tokens per prompt (Wan: 512).
        device, dtype: where the encoder runs (UMT5-XXL: bf16 on the GPU).
    """

    def __init__(self, path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None, max_length: int = 512,
                 device=None, dtype: torch.dtype | None = None):
        from transformers import AutoTokenizer, UMT5EncoderModel

        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"UMT5TextEncoder: 'path' {path} is not a directory")
        if max_length <= 0:
            raise ValueError(f"UMT5TextEncoder: 'max_length' must be positive, got {max_length}")
        model_dir = path / "text_encoder" if (path / "text_encoder").is_dir() else path
        tok_dir = Path(tokenizer_path) if tokenizer_path else (path / "tokenizer" if (path / "tokenizer").is_dir() else path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        kwargs = {"dtype": dtype} if dtype is not None else {}
        self.model = UMT5EncoderModel.from_pretrained(str(model_dir), local_files_only=True, **kwargs).eval()
        if device is not None:
            self.model.to(device)
        self.dim = self.model.config.d_model
        self.max_length = max_length
        logger.info("UMT5TextEncoder: loaded %s (dim %d, %d tokens)", model_dir, self.dim, max_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        prompts = _check_prompts("UMT5TextEncoder.encode", prompts)
        return encode_padded(self.tokenizer, self.model, prompts, self.max_length, self.device)


@torch.no_grad()
def encode_padded(tokenizer, model, prompts: Sequence[str], max_length: int, device) -> TextEmbeddings:
    """Token states of a transformers encoder for ``prompts``, padded to ``max_length`` with the
    padding positions zeroed: (B, max_length, dim) and the (B, max_length) bool mask."""
    tok = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    ids = tok["input_ids"].to(device)
    mask = tok["attention_mask"].to(device)
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    mask = mask.bool()
    return TextEmbeddings(hidden * mask[..., None].to(hidden.dtype), mask)


class CachedTextEncoder:
    """Any ``TextEncoder`` with a per-prompt-string LRU cache of its embeddings."""

    def __init__(self, encoder: TextEncoder, max_entries: int = 256):
        if max_entries <= 0:
            raise ValueError(f"CachedTextEncoder: 'max_entries' must be positive, got {max_entries}")
        self.encoder = encoder
        self.dim = encoder.dim
        self.max_length = encoder.max_length
        self.max_entries = max_entries
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        self._cache.clear()

    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        prompts = _check_prompts("CachedTextEncoder.encode", prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        self.misses += len(missing)
        self.hits += len(prompts) - sum(1 for p in prompts if p in missing)
        fresh = {}
        if missing:
            out = self.encoder.encode(missing)
            # clones: a cached row must not keep its whole batch alive
            fresh = {p: (out.embeddings[i].clone(), out.mask[i].clone()) for i, p in enumerate(missing)}
        rows = [fresh[p] if p in fresh else self._cache[p] for p in prompts]
        for p, row in fresh.items():
            self._cache[p] = row
        for p in prompts:
            self._cache.move_to_end(p)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return TextEmbeddings(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))
