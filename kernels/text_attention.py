"""Cross-attention to a prompt's text K/V with its repeated padding rows read once, in Triton (math
and contract: ``spiral_rt.reference.text_attention``).

One program takes BLOCK_M queries of one (batch item, head) and streams the distinct key rows
[0, distinct_rows[b]) in tiles of BLOCK_N with an online softmax (base 2), then adds the repeated
row (row distinct_rows[b], standing for the Lt - distinct_rows[b] identical rows from there on) as
a rank-1 update whose score is raised by log2(Lt - distinct_rows[b]): that weights it exactly as
that many copies, without a mostly empty tile for one key. The loop bound is read
from device memory, so a new prompt needs no new launch shape (CUDA-graph safe). Strides are free on
the batch, row and head dims (a batch stride of 0 reads one prompt's K/V for every batch item); the
head dim must be contiguous.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634

BLOCK_M = 128
BLOCK_N = 64
NUM_WARPS = 8
NUM_STAGES = 2


@triton.jit
def _text_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, distinct_ptr,
    q_sb, q_sl, q_sh, k_sb, k_sl, k_sh, v_sb, v_sl, v_sh, o_sb, o_sl, o_sh,
    num_heads, len_q, len_t, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < len_q
    d = tl.arange(0, HEAD_DIM)

    q = tl.load(q_ptr + b * q_sb + h * q_sh + rows.to(tl.int64)[:, None] * q_sl + d[None, :],
                mask=row_mask[:, None], other=0.0)
    distinct = tl.load(distinct_ptr + b).to(tl.int32)
    distinct = tl.minimum(tl.maximum(distinct, 0), len_t - 1)  # never a read past the text rows
    k_base = k_ptr + b * k_sb + h * k_sh
    v_base = v_ptr + b * v_sb + h * v_sh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # the distinct rows [0, distinct), tile by tile on the tensor cores
    for start in range(0, distinct, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < distinct
        offs = cols.to(tl.int64)[:, None]
        k = tl.load(k_base + offs * k_sl + d[None, :], mask=col_mask[:, None], other=0.0)
        v = tl.load(v_base + offs * v_sl + d[None, :], mask=col_mask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        s = tl.where(col_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile has at least one key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    # the repeated row, once, weighted as the len_t - distinct rows it stands for (a rank-1 update
    # on the CUDA cores: its score raised by log2 of the count)
    k_last = tl.load(k_base + distinct.to(tl.int64) * k_sl + d).to(tl.float32)
    v_last = tl.load(v_base + distinct.to(tl.int64) * v_sl + d).to(tl.float32)
    s_last = tl.sum(q.to(tl.float32) * k_last[None, :], axis=1) * scale_log2 + tl.log2((len_t - distinct).to(tl.float32))
    m_new = tl.maximum(m_i, s_last)
    alpha = tl.exp2(m_i - m_new)  # 0 when no distinct row came before (m_i = -inf)
    p_last = tl.exp2(s_last - m_new)
    l_i = l_i * alpha + p_last
    acc = acc * alpha[:, None] + p_last[:, None] * v_last[None, :]
    out = acc / l_i[:, None]
    tl.store(o_ptr + b * o_sb + h * o_sh + rows.to(tl.int64)[:, None] * o_sl + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_mask[:, None])


def text_attention(q, k, v, distinct_rows, o, block_m: int = BLOCK_M, block_n: int = BLOCK_N,
                   num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES):
    """Launch on checked tensors: q, o (B, Lq, H, D), k, v (B or broadcast, Lt, H, D), head dim
    contiguous, D a power of two >= 16; distinct_rows (B,) int32/int64 on q's device."""
    batch, len_q, heads, head_dim = q.shape
    len_t = k.shape[1]
    fp32 = q.dtype.is_floating_point and q.element_size() == 4
    grid = (triton.cdiv(len_q, block_m), batch * heads)
    _text_attention_kernel[grid](
        q, k, v, o, distinct_rows,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        heads, len_q, len_t, LOG2E / head_dim**0.5,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION="ieee" if fp32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
