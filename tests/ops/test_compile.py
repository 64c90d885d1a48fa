"""Every op traces through torch.compile with fullgraph=True (its registration and fake kernel),
and the compiled result equals eager. CPU, reference backend, aot_eager (no C++ codegen)."""

import torch

from spiral_rt.ops import chunk_attention, merge_states, modulated_norm, qk_norm_rope_kv_write

from .test_chunk_attention import make_batch, plan_for
from .test_merge_states import _random_states


def _compiled(fn):
    return torch.compile(fn, backend="aot_eager", fullgraph=True)


def test_merge_states_compiles():
    states = _random_states(37, 3, 16, torch.float32, "cpu")

    def fn(o_a, lse_a, o_b, lse_b):
        o, lse = merge_states(o_a, lse_a, o_b, lse_b, backend="reference")
        return o * 2, lse

    for got, want in zip(_compiled(fn)(*states), fn(*states)):
        torch.testing.assert_close(got, want)


def test_modulated_norm_compiles():
    x, branch = torch.randn(2, 12, 16), torch.randn(2, 12, 16)
    shift, scale, gate = torch.randn(2, 3, 16), torch.randn(2, 3, 16), torch.randn(2, 3, 16)

    def fn(x, shift, scale, gate, branch):
        return modulated_norm(x, shift, scale, gate=gate, branch=branch, backend="reference")

    for got, want in zip(_compiled(fn)(x, shift, scale, gate, branch), fn(x, shift, scale, gate, branch)):
        torch.testing.assert_close(got, want)


def test_qk_norm_rope_kv_write_compiles_and_writes_the_pages():
    total, heads, dim, pages, page_size = 15, 2, 24, 4, 8
    q, k, v = (torch.randn(total, heads, dim) for _ in range(3))
    qw, kw = torch.rand(heads * dim) + 0.5, torch.rand(heads * dim) + 0.5
    slots = torch.randperm(pages * page_size)[:total]
    k_pages, v_pages = torch.randn(pages, page_size, heads, dim), torch.randn(pages, page_size, heads, dim)
    kp_eager, vp_eager = k_pages.clone(), v_pages.clone()

    def fn(q, k, v, kp, vp):
        return qk_norm_rope_kv_write(q, k, v, qw, kw, kp, vp, slots, grid_hw=(3, 5), frame_offset=2, backend="reference")

    got = _compiled(fn)(q, k, v, k_pages, v_pages)
    want = fn(q, k, v, kp_eager, vp_eager)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(k_pages, kp_eager)  # the in-place page writes happen under compile too
    torch.testing.assert_close(v_pages, vp_eager)


def test_chunk_attention_compiles():
    b = make_batch([(5, [2, 0], 11), (3, [1], 4)], page_size=6, num_pages=3)
    heads, dim = 2, 64
    q = torch.randn(b.q_indptr[-1], heads, dim)
    k_pages, v_pages = torch.randn(3, 6, heads, dim), torch.randn(3, 6, heads, dim)
    plan = plan_for(b, heads, dim, torch.float32, "cpu")

    def fn(q, k_pages, v_pages):
        o, lse = chunk_attention(q, k_pages, v_pages, plan, backend="reference")
        return o, lse

    for got, want in zip(_compiled(fn)(q, k_pages, v_pages), fn(q, k_pages, v_pages)):
        torch.testing.assert_close(got, want)
