"""Exact merge of two partial attention states in Triton (math and contract:
``spiral_rt.reference.merge_states``).

Inputs are viewed as R = N * H rows of D values: o_a, o_b (R, D) contiguous, lse_a, lse_b (R,)
fp32. Each program merges BLOCK_R rows; D is padded to a power of two with masked lanes.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _merge_states_kernel(
    oa_ptr, la_ptr, ob_ptr, lb_ptr, o_ptr, lse_ptr,
    num_rows, head_dim,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < num_rows
    la = tl.load(la_ptr + rows, mask=rmask, other=float("-inf")).to(tl.float32)
    lb = tl.load(lb_ptr + rows, mask=rmask, other=float("-inf")).to(tl.float32)
    m = tl.maximum(la, lb)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    wa = tl.exp2((la - m_safe) * 1.4426950408889634)
    wb = tl.exp2((lb - m_safe) * 1.4426950408889634)
    total = wa + wb
    nonempty = total > 0.0
    safe_total = tl.where(nonempty, total, 1.0)
    lse = tl.where(nonempty, m_safe + tl.log2(safe_total) * 0.6931471805599453, float("-inf"))
    inv = tl.where(nonempty, 1.0 / safe_total, 0.0)
    offs = rows[:, None] * head_dim + cols[None, :]
    mask = rmask[:, None] & (cols[None, :] < head_dim)
    oa = tl.load(oa_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ob = tl.load(ob_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    o = (wa * inv)[:, None] * oa + (wb * inv)[:, None] * ob
    tl.store(o_ptr + offs, o.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + rows, lse, mask=rmask)


def merge_states(o_a, lse_a, o_b, lse_b, o, lse):
    """Launch on checked contiguous tensors: o_* (R, D), lse_* (R,) fp32; writes o, lse."""
    num_rows, head_dim = o_a.shape
    block_d = triton.next_power_of_2(head_dim)
    block_r = max(1, min(64, 4096 // block_d))
    grid = (triton.cdiv(num_rows, block_r),)
    _merge_states_kernel[grid](o_a, lse_a, o_b, lse_b, o, lse, num_rows, head_dim,
                               BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
