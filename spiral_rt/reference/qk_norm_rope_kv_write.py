"""RMSNorm over heads + Wan 3D RoPE on q and k, and the write of k, v into KV pages; reference
implementation (eager PyTorch; any device).

Tokens: q, k, v (T, H, D), the T tokens of S sequences back to back (``cu_seqlens`` (S+1,)
offsets; one sequence when None). Token i of sequence s sits at latent (f, y, x) of a chunk laid
out frame-major over a grid of grid_h x grid_w tokens per frame: f = i // (grid_h * grid_w),
y = (i // grid_w) % grid_h, x = i % grid_w. Its RoPE position is (frame_offset[s] + f, y, x).

Math, all fp32 (no float64):

    q' = q * rsqrt(mean over (H, D) of q^2 + eps) * q_weight      (RMSNorm over all heads, H*D)
    pairs (x[2j], x[2j+1]) of each head rotated by angle pos[part(j)] * inv_freq[j],
    part(j) = t for j < d_t / 2, then h for the next d_h / 2 pairs, then w for the last d_w / 2,
    d_h = d_w = 2 * (D // 6), d_t = D - 2 * d_h  (44/42/42 for D = 128),
    inv_freq[j] = 1 / 10000^(2 i / d_part), i = j's index within its part

k is normed and rotated the same way (with k_weight). Writes, either or both:

- k' and v (in the pages' dtype) to flat slots ``slot_mapping[t]`` of the pages: slot = page *
  page_size + offset, i.e. to ``pages.view(-1, H, D)[slot]``; a negative slot means "do not
  write" (padding). Without pages (k_pages, v_pages, slot_mapping all None) v is not read;
- k' of every token to ``k_out`` (T, H, D) in its dtype; k_out may be k itself (in place).

Returns q'.
"""

from __future__ import annotations

import functools

import torch

THETA = 10000.0


def rope_parts(head_dim: int) -> tuple[int, int, int]:
    """Wan's split of head_dim into (d_t, d_h, d_w) rotary dims."""
    d_hw = 2 * (head_dim // 6)
    return head_dim - 2 * d_hw, d_hw, d_hw


@functools.lru_cache(maxsize=None)
def _inv_freq_cpu(head_dim: int) -> torch.Tensor:
    parts = []
    for d in rope_parts(head_dim):
        parts.append(1.0 / (THETA ** (torch.arange(0, d, 2, dtype=torch.float32) / d)))
    return torch.cat(parts)


def rope_inv_freq(head_dim: int, device=None) -> torch.Tensor:
    """(D / 2,) fp32 inverse frequencies of the D / 2 rotated pairs (t part, then h, then w)."""
    table = _inv_freq_cpu(head_dim)
    return table.to(device) if device is not None else table.clone()


def token_positions(cu_seqlens: list[int], frame_offsets: list[int], grid_h: int, grid_w: int) -> torch.Tensor:
    """(T, 3) int64 RoPE positions (t, h, w) of the tokens of all sequences."""
    out = []
    for s in range(len(cu_seqlens) - 1):
        i = torch.arange(cu_seqlens[s + 1] - cu_seqlens[s], dtype=torch.int64)
        f, rem = i // (grid_h * grid_w), i % (grid_h * grid_w)
        out.append(torch.stack([f + frame_offsets[s], rem // grid_w, rem % grid_w], dim=1))
    return torch.cat(out) if out else torch.zeros(0, 3, dtype=torch.int64)


def rms_norm_heads(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of (T, H, D) over the last two dims together, weight (H * D,); fp32 result."""
    xf = x.float().reshape(x.shape[0], -1)
    xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    return xf.reshape(x.shape)


def apply_rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs of x (T, H, D) fp32 by Wan's 3D RoPE at positions (T, 3); fp32 result."""
    head_dim = x.shape[-1]
    d_t, d_h, _ = rope_parts(head_dim)
    inv_freq = rope_inv_freq(head_dim, x.device)
    part = torch.zeros(head_dim // 2, dtype=torch.int64, device=x.device)
    part[d_t // 2:] = 1
    part[(d_t + d_h) // 2:] = 2
    angle = positions.to(x.device).float()[:, part] * inv_freq  # (T, D/2) fp32
    cos, sin = torch.cos(angle)[:, None, :], torch.sin(angle)[:, None, :]
    xe, xo = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = xe * cos - xo * sin
    out[..., 1::2] = xe * sin + xo * cos
    return out


def qk_norm_rope_kv_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    k_pages: torch.Tensor | None,
    v_pages: torch.Tensor | None,
    slot_mapping: torch.Tensor | None,
    grid_h: int,
    grid_w: int,
    frame_offsets: list[int],
    cu_seqlens: list[int] | None = None,
    eps: float = 1e-6,
    k_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference of ``spiral_rt.ops.qk_norm_rope_kv_write``; writes k_pages, v_pages (when not None)
    and k_out (when not None) in place, returns q'."""
    total = q.shape[0]
    cu = cu_seqlens if cu_seqlens is not None else [0, total]
    positions = token_positions(cu, frame_offsets, grid_h, grid_w)
    q_out = apply_rope(rms_norm_heads(q, q_weight, eps), positions).to(q.dtype)
    k_rot = apply_rope(rms_norm_heads(k, k_weight, eps), positions)
    if k_pages is not None:
        slots = slot_mapping.to(torch.int64)
        keep = slots >= 0
        k_flat = k_pages.view(-1, *k_pages.shape[2:])
        v_flat = v_pages.view(-1, *v_pages.shape[2:])
        k_flat[slots[keep]] = k_rot[keep].to(k_pages.dtype)
        v_flat[slots[keep]] = v[keep].to(v_pages.dtype)
    if k_out is not None:  # k_rot is computed from all of k already, so k_out may be k itself
        k_out.copy_(k_rot)
    return q_out
