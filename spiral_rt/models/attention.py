"""The attention-context interface between the DiT and whatever holds the KV cache.

The model computes q, k, v for the tokens of one forward (after qk-norm and RoPE) and hands them
to an ``AttentionContext``; the context decides which cached keys and values these tokens see and
whether this forward's k, v are stored for later chunks. The model never learns how a cache is laid
out (contiguous, paged, windowed with a sink): the engine passes a paged implementation, tests
pass the two reference implementations here.

    q, k, v: (B, L, H, D)  ->  context.self_attention(layer, q, k, v)  ->  o: (B, L, H, D)

where o is the attention of q over [the cached context visible to these tokens, then these
tokens], bidirectional within these tokens.

- ``DenseAttention``: no cache; full attention over the forward's own tokens, or a block-causal
  mask (each query sees its own block of frames and every earlier block), which is what
  generating chunk by chunk through a cache computes in one pass.
- ``ContiguousKVCache``: a simple non-paged cache, per layer K/V tensors of shape (B, L, H, D)
  filled chunk by chunk. ``write=True`` makes a forward store its k, v (the clean pass at t = 0);
  ``commit()`` then makes them visible to later forwards. Denoising steps run with
  ``write=False`` and only read.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (scale 1/sqrt(D)).
"""

from __future__ import annotations

import logging
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


@runtime_checkable
class AttentionContext(Protocol):
    """What the DiT needs from a KV cache for one forward."""

    def self_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: (B, L, H, D) for this forward's tokens, after qk-norm and RoPE.

        Returns the attention output (B, L, H, D) of q over [the cached context visible to these
        tokens, then these tokens], bidirectional within these tokens. A context that writes the
        cache stores k, v for later chunks.
        """
        ...


def sdpa_blhd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA on (B, L, H, D) tensors (k, v may be longer than q); mask: bool (Lq, Lk), True = attend."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def block_causal_mask(block_frames: Sequence[int], tokens_per_frame: int, device=None) -> torch.Tensor:
    """Bool (L, L) mask, L = sum(block_frames) * tokens_per_frame: query i may see key j iff j's
    block is i's block or an earlier one."""
    sizes = torch.tensor([f * tokens_per_frame for f in block_frames], device=device)
    block_of = torch.repeat_interleave(torch.arange(len(block_frames), device=device), sizes)
    return block_of[None, :] <= block_of[:, None]


class DenseAttention:
    """Attention over this forward's tokens only (no cache).

    Args:
        block_frames: None for full bidirectional attention; an int (frames per block, the last
            block may be shorter) or a sequence of block sizes in frames for a block-causal mask.
        tokens_per_frame: tokens of one latent frame (needed with ``block_frames``).
    """

    def __init__(self, block_frames: int | Sequence[int] | None = None, tokens_per_frame: int | None = None):
        if block_frames is not None:
            if tokens_per_frame is None or tokens_per_frame <= 0:
                raise ValueError(
                    f"DenseAttention: 'tokens_per_frame' must be a positive int with block_frames, got {tokens_per_frame!r}"
                )
            if isinstance(block_frames, int):
                if block_frames <= 0:
                    raise ValueError(f"DenseAttention: 'block_frames' must be positive, got {block_frames}")
            elif not block_frames or any(int(b) <= 0 for b in block_frames):
                raise ValueError(f"DenseAttention: 'block_frames' must be positive block sizes, got {list(block_frames)}")
        self.block_frames = block_frames
        self.tokens_per_frame = tokens_per_frame
        self._mask: torch.Tensor | None = None

    def _mask_for(self, num_tokens: int, device) -> torch.Tensor:
        tpf = self.tokens_per_frame
        if num_tokens % tpf:
            raise ValueError(f"DenseAttention: {num_tokens} tokens are not a whole number of frames of {tpf} tokens")
        num_frames = num_tokens // tpf
        if isinstance(self.block_frames, int):
            sizes = [self.block_frames] * (num_frames // self.block_frames)
            if num_frames % self.block_frames:
                sizes.append(num_frames % self.block_frames)
        else:
            sizes = [int(b) for b in self.block_frames]
            if sum(sizes) != num_frames:
                raise ValueError(f"DenseAttention: block_frames {sizes} sum to {sum(sizes)} frames, the forward has {num_frames}")
        if self._mask is None or self._mask.shape[0] != num_tokens or self._mask.device != torch.device(device):
            self._mask = block_causal_mask(sizes, tpf, device=device)
        return self._mask

    def self_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        mask = None if self.block_frames is None else self._mask_for(q.shape[1], q.device)
        return sdpa_blhd(q, k, v, mask)


class ContiguousKVCache:
    """Reference KV cache: per layer K and V of shape (B, capacity, H, D), filled chunk by chunk.

    Each forward's queries attend to the committed tokens ``[0, length)`` then to their own
    tokens. With ``write=True`` a forward stores its k, v at ``[length, length + L)`` of every
    layer; ``commit()`` then advances ``length`` (all layers must have been written, with the same
    L). ``truncate(n)`` rolls back to the first n tokens (e.g. to regenerate a rejected segment).
    Storage is allocated on the first write (or up front with ``max_tokens``) and doubles when full.

    ``visible_frames`` limits what the committed context shows, as a KV-cache policy does (e.g. an
    attention sink and a rolling window): called with the number of committed frames, it returns the
    frames the next forward attends to (in order); every token is still stored. It needs
    ``tokens_per_frame``. None: the whole committed context.
    """

    def __init__(self, num_layers: int, max_tokens: int | None = None, *,
                 visible_frames: Callable[[int], Sequence[int]] | None = None, tokens_per_frame: int | None = None):
        if num_layers <= 0:
            raise ValueError(f"ContiguousKVCache: 'num_layers' must be positive, got {num_layers}")
        if visible_frames is not None and (not callable(visible_frames) or not isinstance(tokens_per_frame, int)
                                           or isinstance(tokens_per_frame, bool) or tokens_per_frame < 1):
            raise ValueError("ContiguousKVCache: 'visible_frames' must be a callable and comes with a positive int "
                             f"'tokens_per_frame', got {visible_frames!r} and {tokens_per_frame!r}")
        self.num_layers = num_layers
        self.max_tokens = max_tokens
        self.visible_frames = visible_frames
        self.tokens_per_frame = tokens_per_frame
        self._visible: tuple[int, torch.Tensor | None] | None = None
        self.write = False
        self.length = 0
        self._k: list[torch.Tensor | None] = [None] * num_layers
        self._v: list[torch.Tensor | None] = [None] * num_layers
        self._pending: dict[int, int] = {}

    def _ensure(self, layer: int, k: torch.Tensor, needed: int) -> None:
        cur = self._k[layer]
        if cur is not None:
            if cur.shape[0] != k.shape[0] or cur.shape[2:] != k.shape[2:] or cur.dtype != k.dtype or cur.device != k.device:
                raise ValueError(
                    f"ContiguousKVCache: layer {layer} holds (B, L, H, D) = {tuple(cur.shape)} {cur.dtype} on {cur.device}; "
                    f"got k {tuple(k.shape)} {k.dtype} on {k.device}"
                )
            if cur.shape[1] >= needed:
                return
        capacity = max(needed, self.max_tokens or 0, 2 * (cur.shape[1] if cur is not None else 0))
        shape = (k.shape[0], capacity, k.shape[2], k.shape[3])
        new_k, new_v = k.new_empty(shape), k.new_empty(shape)
        if cur is not None and self.length:
            new_k[:, : self.length] = cur[:, : self.length]
            new_v[:, : self.length] = self._v[layer][:, : self.length]
        self._k[layer], self._v[layer] = new_k, new_v

    def _visible_tokens(self, device) -> torch.Tensor | None:
        """Indices of the committed tokens the next forward sees; None: all of [0, length)."""
        if self.visible_frames is None:
            return None
        if self._visible is None or self._visible[0] != self.length:
            tpf = self.tokens_per_frame
            frames = torch.as_tensor(list(self.visible_frames(self.length // tpf)), dtype=torch.long)
            idx = (frames[:, None] * tpf + torch.arange(tpf)).reshape(-1)
            self._visible = (self.length, idx)
        idx = self._visible[1]
        return idx.to(device) if idx.device != torch.device(device) else idx

    def self_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"ContiguousKVCache: 'layer'={layer} out of range for {self.num_layers} layers")
        n, end = self.length, self.length + k.shape[1]
        if self.write:
            self._ensure(layer, k, end)
            self._k[layer][:, n:end] = k
            self._v[layer][:, n:end] = v
            self._pending[layer] = k.shape[1]
            if self.visible_frames is None:
                return sdpa_blhd(q, self._k[layer][:, :end], self._v[layer][:, :end])
        if n == 0:
            return sdpa_blhd(q, k, v)
        cached_k, cached_v = self._k[layer], self._v[layer]
        if cached_k is None or cached_k.shape[0] != q.shape[0]:
            raise ValueError(f"ContiguousKVCache: layer {layer} has no cache for a batch of {q.shape[0]}")
        idx = self._visible_tokens(q.device)
        ctx_k, ctx_v = (cached_k[:, :n], cached_v[:, :n]) if idx is None else (cached_k[:, idx], cached_v[:, idx])
        return sdpa_blhd(q, torch.cat([ctx_k, k], dim=1), torch.cat([ctx_v, v], dim=1))

    def commit(self) -> int:
        """Make the tokens written by the last ``write=True`` forward visible; returns the new length."""
        if not self._pending:
            raise ValueError("ContiguousKVCache.commit: nothing was written (run a forward with write=True first)")
        counts = set(self._pending.values())
        if len(self._pending) != self.num_layers or len(counts) != 1:
            raise ValueError(
                f"ContiguousKVCache.commit: layers written {sorted(self._pending)} with token counts {sorted(counts)}; "
                f"all {self.num_layers} layers must write the same number of tokens"
            )
        self.length += counts.pop()
        self._pending.clear()
        logger.debug("ContiguousKVCache: committed, length %d", self.length)
        return self.length

    def truncate(self, length: int) -> None:
        """Forget every token from ``length`` on (and anything written but not committed)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"ContiguousKVCache.truncate: 'length' must be in [0, {self.length}], got {length}")
        self.length = length
        self._pending.clear()
