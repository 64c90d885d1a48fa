"""Chunk attention over paged K/V, reference implementation (eager PyTorch; any device).

S sequences; sequence s has queries q[q_indptr[s]:q_indptr[s+1]] (total_q, H, D) and keys/values
reached through its page list kv_indices[kv_indptr[s]:kv_indptr[s+1]]: logical key j lives at
page kv_indices[kv_indptr[s] + j // page_size], offset j % page_size, of k_pages / v_pages
(num_pages, page_size, H_kv, D). It has kv_len[s] = (num_pages[s] - 1) * page_size +
kv_last_page_len[s] keys (0 when it lists no pages). Every query attends to all of its
sequence's keys, no mask (block causality comes from which pages are listed). Query head h uses
KV head h // (H / H_kv).

    S_ij = sm_scale * q_i . k_j,   LSE_i = log sum_j exp(S_ij),   O_i = sum_j exp(S_ij - LSE_i) v_j

With ``distinct_keys`` (one int per sequence, d_s), the keys and values of sequence s from index
d_s on are taken to be copies of key d_s (a zero-padded prompt's text rows are): the sequence reads
keys 0 .. d_s, the last one's score raised by log(kv_len - d_s), i.e. counted kv_len - d_s times.
When the copies are exact this equals attention over all kv_len keys.

With ``own`` = (own_k, own_v, own_pages), sequence s's last own_pages[s] pages are read from the rows
own_k / own_v (N * page_size, H_kv, D) instead of the pool: its first own page is own page
sum(own_pages[:s]), own page i being rows [i * page_size, (i + 1) * page_size).

Math in fp32 (fp64 for fp64 inputs). Returns O (total_q, H, D) in q's dtype and LSE (total_q, H)
in fp32 (natural log); a sequence without keys gets O = 0 and LSE = -inf.
"""

from __future__ import annotations

import math

import torch


def kv_lengths(kv_indptr: list[int], kv_last_page_len: list[int], page_size: int) -> list[int]:
    """Keys per sequence: (num_pages - 1) * page_size + last_page_len, or 0 without pages."""
    out = []
    for s in range(len(kv_indptr) - 1):
        n = kv_indptr[s + 1] - kv_indptr[s]
        out.append((n - 1) * page_size + kv_last_page_len[s] if n > 0 else 0)
    return out


def gather_kv(pages: torch.Tensor, page_ids: list[int], kv_len: int) -> torch.Tensor:
    """The first kv_len keys (kv_len, H_kv, D) of the pages page_ids, in logical order."""
    if not page_ids:
        return pages.new_zeros((0, *pages.shape[2:]))
    idx = torch.as_tensor(page_ids, dtype=torch.int64, device=pages.device)
    return pages[idx].reshape(-1, *pages.shape[2:])[:kv_len]


def chunk_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    q_indptr: list[int],
    kv_indptr: list[int],
    kv_indices: list[int],
    kv_last_page_len: list[int],
    sm_scale: float | None = None,
    distinct_keys: list[int] | None = None,
    q_row_scale: torch.Tensor | None = None,
    own: tuple[torch.Tensor, torch.Tensor, list[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``spiral_rt.ops.chunk_attention`` (index tables as host lists). ``q_row_scale``
    (total_q,): query row i's scores are multiplied by q_row_scale[i]; ``own``: see the module docstring."""
    total_q, heads, head_dim = q.shape
    group = heads // k_pages.shape[2]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    o = torch.zeros(total_q, heads, head_dim, dtype=work, device=q.device)
    lse = torch.full((total_q, heads), float("-inf"), dtype=work, device=q.device)
    page_size = k_pages.shape[1]
    lens = kv_lengths(kv_indptr, kv_last_page_len, page_size)
    for s in range(len(q_indptr) - 1):
        q0, q1 = q_indptr[s], q_indptr[s + 1]
        if q1 == q0 or lens[s] == 0:
            continue
        pages = kv_indices[kv_indptr[s]:kv_indptr[s + 1]]
        k = gather_kv(k_pages, pages, lens[s])
        v = gather_kv(v_pages, pages, lens[s])
        if own is not None and own[2][s]:
            own_k, own_v, own_pages = own
            first = sum(own_pages[:s])
            context = (len(pages) - own_pages[s]) * page_size  # keys before the own pages
            rows = slice(first * page_size, first * page_size + lens[s] - context)
            k = torch.cat([k[:context], own_k[rows].to(k.dtype)])
            v = torch.cat([v[:context], own_v[rows].to(v.dtype)])
        k = k.to(work).repeat_interleave(group, dim=1)
        v = v.to(work).repeat_interleave(group, dim=1)
        if distinct_keys is not None and 0 <= distinct_keys[s] < lens[s] - 1:
            d = distinct_keys[s]
            k, v = k[:d + 1], v[:d + 1]
        scores = torch.einsum("qhd,khd->hqk", q[q0:q1].to(work), k) * scale
        if q_row_scale is not None:
            scores = scores * q_row_scale[q0:q1].to(work)[None, :, None]
        if distinct_keys is not None and 0 <= distinct_keys[s] < lens[s] - 1:
            scores[..., -1] += math.log(lens[s] - distinct_keys[s])
        seq_lse = torch.logsumexp(scores, dim=-1)
        o[q0:q1] = torch.einsum("hqk,khd->qhd", torch.exp(scores - seq_lse[..., None]), v)
        lse[q0:q1] = seq_lse.transpose(0, 1)
    return o.to(q.dtype), lse.to(torch.float32) if work == torch.float32 else lse
