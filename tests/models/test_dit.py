"""CausalWanDiT: parameter counts, config errors, block-causal semantics through the KV cache,
RoPE in fp32, text conditioning, and equality with diffusers' WanTransformer3DModel.

Tolerances: fp32 paths compared with fp32 paths at relative error (||a-b||/||b||) <= 1e-5;
bf16 against fp32 at <= 3e-2.
"""


import pytest
import torch

from model_helpers import randomize_, rel_err
from spiral_rt.models.attention import ContiguousKVCache, DenseAttention, block_causal_mask
from spiral_rt.models.config import WanDiTConfig, tiny_test, wan21_t2v_1_3b, wan21_t2v_14b
from spiral_rt.models.dit import CausalWanDiT, RotaryEmbedding3D, TextConditioning, build_dit


def _model(cfg):
    return randomize_(build_dit(cfg))


def _text(model, batch, length=None):
    cfg = model.config
    return model.encode_text(torch.randn(batch, length or cfg.text_len, cfg.text_dim))


# ----------------------------------------------------------------------------- config / counts


@pytest.mark.parametrize("factory, count", [(wan21_t2v_1_3b, 1_418_996_800), (wan21_t2v_14b, 14_288_491_584)])
def test_parameter_count_on_meta(factory, count):
    cfg = factory()
    with torch.device("meta"):
        model = CausalWanDiT(cfg)
    assert sum(p.numel() for p in model.parameters()) == count
    assert cfg.num_parameters() == count
    assert cfg.rope_split == (44, 42, 42) and cfg.head_dim == 128


@pytest.mark.parametrize("name", ["world-small", "tiny-test"])
def test_preset_count_matches_module(name):
    cfg = WanDiTConfig.from_name(name)
    for c in (cfg, cfg.replace(cross_attn_norm=False, qk_norm=False)):
        with torch.device("meta"):
            model = CausalWanDiT(c)
        assert sum(p.numel() for p in model.parameters()) == c.num_parameters()
    if name == "world-small":
        assert cfg.num_parameters() == 13_281_472


@pytest.mark.parametrize("changes, field", [
    (dict(dim=50, num_heads=4), "num_heads"),
    (dict(num_layers=0), "num_layers"),
    (dict(patch_size=(1, 2)), "patch_size"),
    (dict(freq_dim=33), "freq_dim"),
    (dict(dim=16, num_heads=4), "head_dim"),
    (dict(eps=0.0), "eps"),
])
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        tiny_test().replace(**changes)


def test_unknown_preset():
    with pytest.raises(ValueError, match="not a preset"):
        WanDiTConfig.from_name("wan9")
    assert WanDiTConfig.from_name("wan2.1-t2v-1.3b") == wan21_t2v_1_3b()


# ----------------------------------------------------------------------------- forward checks


def test_forward_argument_errors(tiny_cfg):
    model = _model(tiny_cfg)
    x = torch.randn(2, 4, 3, 6, 10)
    t = torch.rand(2, 3) * 1000
    text = _text(model, 2)
    with pytest.raises(ValueError, match="'x'"):
        model(torch.randn(2, 5, 3, 6, 10), t, 0, None, text)
    with pytest.raises(ValueError, match="multiples of the patch"):
        model(torch.randn(2, 4, 3, 7, 10), t, 0, None, text)
    with pytest.raises(ValueError, match="'timesteps'"):
        model(x, torch.rand(2, 4), 0, None, text)
    with pytest.raises(ValueError, match="'frame_offset'"):
        model(x, t, -1, None, text)
    with pytest.raises(ValueError, match="'text'"):
        model(x, t, 0, None, _text(model, 3))
    with pytest.raises(ValueError, match="text_embeddings"):
        model.encode_text(torch.randn(2, 3, tiny_cfg.text_dim + 1))


@torch.no_grad()
def test_block_causal_cache_equals_masked_full_forward(tiny_cfg):
    """Chunk by chunk through ContiguousKVCache == one forward with a block-causal mask."""
    model = _model(tiny_cfg)
    B, H, W = 2, 6, 10                      # 3 x 5 = 15 tokens per frame (odd)
    blocks = [2, 3, 1, 3]                   # frames per chunk, uneven
    Fr = sum(blocks)
    x = torch.randn(B, 4, Fr, H, W)
    t = torch.rand(B, Fr) * 1000            # every frame its own t
    text = _text(model, B)
    full = model(x, t, 0, DenseAttention(blocks, tokens_per_frame=15), text)

    cache = ContiguousKVCache(tiny_cfg.num_layers)
    start = 0
    for i, nf in enumerate(blocks):
        sl = slice(start, start + nf)
        # a read-only "denoising" forward on other inputs must not disturb the cache
        cache.write = False
        model(torch.randn(B, 4, nf, H, W), torch.rand(B, nf) * 1000, start, cache, text)
        cache.write = True
        out = model(x[:, :, sl], t[:, sl], start, cache, text)
        cache.commit()
        assert rel_err(out, full[:, :, sl]) <= 1e-5, f"chunk {i}"
        start += nf
    assert cache.length == Fr * 15

    # the frame offset matters: the last chunk at offset 0 differs
    cache.truncate(cache.length - blocks[-1] * 15)
    cache.write = False
    wrong = model(x[:, :, -blocks[-1]:], t[:, -blocks[-1]:], 0, cache, text)
    assert rel_err(wrong, full[:, :, -blocks[-1]:]) > 1e-3


def test_block_causal_mask_layout():
    mask = block_causal_mask([1, 2], tokens_per_frame=2)
    expected = torch.tensor([[1, 1, 0, 0, 0, 0]] * 2 + [[1] * 6] * 4, dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_cache_commit_errors(tiny_cfg):
    cache = ContiguousKVCache(2)
    with pytest.raises(ValueError, match="nothing was written"):
        cache.commit()
    q = torch.randn(1, 5, 2, 8)
    cache.write = True
    cache.self_attention(0, q, q, q)
    with pytest.raises(ValueError, match="all 2 layers"):
        cache.commit()
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(3)


@torch.no_grad()
def test_scalar_timesteps_and_text_broadcast(tiny_cfg):
    model = _model(tiny_cfg)
    x = torch.randn(3, 4, 2, 4, 6)
    t = torch.rand(3) * 1000
    emb = torch.randn(1, 9, tiny_cfg.text_dim)   # shorter than text_len: zero-padded
    text1 = model.encode_text(emb)
    text3 = model.encode_text(emb.expand(3, -1, -1))
    a = model(x, t, 5, None, text1)
    b = model(x, t[:, None].expand(3, 2), 5, None, text3)
    assert rel_err(a, b) <= 1e-6
    assert text1.context.shape == (1, tiny_cfg.text_len, tiny_cfg.dim)
    assert text1.cross_k[0].shape == (1, tiny_cfg.text_len, tiny_cfg.num_heads, tiny_cfg.head_dim)


def test_numeric_timesteps_reuse_time_tables_until_the_weights_change(tiny_cfg):
    """A number for timesteps: the same output as the tensor, the time MLP runs once per (t, B, F),
    and an in-place weight change (an optimizer step) refreshes the kept tables in place."""
    model = _model(tiny_cfg)
    x = torch.randn(2, 4, 3, 6, 10)
    text = _text(model, 2)
    runs = []
    model.time_projection.register_forward_hook(lambda *_: runs.append(1))
    with torch.no_grad():
        a = model(x, 750.0, 0, None, text)
        assert torch.equal(a, model(x, torch.full((2, 3), 750.0), 0, None, text))
        assert len(runs) == 2 and len(model._time_tables) == 1
        entry = next(iter(model._time_tables.values()))
        assert torch.equal(model(x, 750.0, 0, None, text), a) and len(runs) == 2  # no time MLP
        with pytest.raises(ValueError, match="'timesteps'"):
            model(x, 1500.0, 0, None, text)

        model.blocks[1].modulation.add_(0.25)
        model.time_projection[1].weight.mul_(1.5)
        ptr = entry.e0.data_ptr()
        b = model(x, 750.0, 0, None, text)
        assert torch.equal(b, model(x, torch.full((2, 3), 750.0), 0, None, text)) and not torch.equal(a, b)
        assert entry.e0.data_ptr() == ptr  # refreshed in place: a captured graph keeps reading it

        model.time_embedding[0].bias.sub_(0.5)
        model.refresh_time_tables()  # what a graph replay does first
        fresh = model._time_mlp(torch.full((2, 3), 750.0))
        assert torch.equal(entry.e, fresh.e) and torch.equal(entry.e0, fresh.e0)

    # autograd on: not cached, and the time MLP's weights get their gradient
    model(x, 500.0, 0, None, text).square().mean().backward()
    assert len(model._time_tables) == 1 and model.time_projection[1].weight.grad is not None

    # weights made under inference mode keep no version counter: never cached, always current
    with torch.inference_mode():
        frozen = _model(tiny_cfg)
        text = _text(frozen, 2)
        a = frozen(x, 750.0, 0, None, text)
        frozen.blocks[0].modulation.add_(0.25)
        b = frozen(x, 750.0, 0, None, text)
        assert not frozen._time_tables and not torch.equal(a, b)
        assert torch.equal(b, frozen(x, torch.full((2, 3), 750.0), 0, None, text))


@torch.no_grad()
def test_text_conditioning_rows_and_cat(tiny_cfg):
    """TextConditioning.rows / cat (the engine's and the trainer's batches of prompts): rows in order."""
    model = build_dit(tiny_cfg)
    text = model.encode_text(torch.randn(3, 5, tiny_cfg.text_dim))
    both = TextConditioning.cat([text.rows(2, 3), text.rows(0, 1)])
    assert both.batch_size == 2 and len(both.cross_k) == tiny_cfg.num_layers
    assert torch.equal(both.context[0], text.context[2]) and torch.equal(both.cross_k[1][1], text.cross_k[1][0])
    assert torch.equal(both.cross_v[0][0], text.cross_v[0][2])


@torch.no_grad()
def test_encode_text_counts_the_rows_before_the_padding(tiny_cfg):
    """distinct_rows: rows up to each prompt's last non-zero one; every padding row's K/V equals the
    first padding row's (what the fused path's cross-attention counts instead of reading)."""
    model = build_dit(tiny_cfg)
    emb = torch.randn(4, 9, tiny_cfg.text_dim)
    emb[1, 5:] = 0   # zero rows at the end of the given ones: padding too
    emb[2, 3] = 0    # a zero row inside the prompt: not padding
    emb[3] = 0       # nothing but padding
    text = model.encode_text(emb)
    assert text.distinct_rows.dtype == torch.int32 and text.distinct_rows.tolist() == [9, 5, 9, 0]
    for b, d in enumerate(text.distinct_rows.tolist()):
        for k in (text.cross_k[0][b], text.cross_v[-1][b]):
            assert torch.equal(k[d:], k[d:d + 1].expand_as(k[d:]))
    both = TextConditioning.cat([text.rows(2, 4), text.rows(0, 1)])
    assert both.distinct_rows.tolist() == [9, 0, 9]


def test_text_rows_and_cat_carry_the_query_weighted_keys():
    """``rows`` and ``cat`` slice and join ``cross_k_q_weighted`` like the keys (None when any part
    lacks it); off CUDA ``encode_text`` leaves it None."""
    def cond(b, weighted=True):
        ks = [torch.randn(b, 5, 2, 4) for _ in range(2)]
        return TextConditioning(context=torch.randn(b, 5, 8), cross_k=ks, cross_v=[torch.randn(b, 5, 2, 4) for _ in ks],
                                cross_k_q_weighted=[k * 3 for k in ks] if weighted else None)

    a, b = cond(3), cond(1)
    both = TextConditioning.cat([a.rows(1, 3), b])
    for i in range(2):
        assert torch.equal(both.cross_k_q_weighted[i], torch.cat([a.cross_k_q_weighted[i][1:3], b.cross_k_q_weighted[i]]))
        assert torch.equal(both.cross_k_q_weighted[i], both.cross_k[i] * 3)
    assert TextConditioning.cat([a, cond(1, weighted=False)]).cross_k_q_weighted is None
    model = build_dit(tiny_test())
    assert model.encode_text(torch.randn(1, 3, model.config.text_dim)).cross_k_q_weighted is None


@torch.no_grad()
def test_frame_positions_tensor_equals_offsets_per_sequence(tiny_cfg):
    """A (B, F) position tensor: consecutive positions equal the int offset; sequences at
    different (and non-consecutive) positions equal separate calls."""
    model = _model(tiny_cfg)
    x = torch.randn(3, 4, 2, 4, 6)
    t = torch.rand(3, 2) * 1000
    text = _text(model, 3)
    as_int = model(x, t, 7, None, text)
    as_tensor = model(x, t, torch.tensor([[7, 8]] * 3), None, text)
    assert rel_err(as_tensor, as_int) <= 1e-6
    positions = torch.tensor([[0, 1], [5, 6], [2, 9]])
    mixed = model(x, t, positions, None, text)
    for b, (p0, p1) in enumerate(positions.tolist()):
        one = text.rows(b, b + 1)
        if p1 == p0 + 1:
            alone = model(x[b:b + 1], t[b:b + 1], p0, None, one)
        else:
            alone = model(x[b:b + 1], t[b:b + 1], positions[b:b + 1], None, one)
            assert rel_err(alone, model(x[b:b + 1], t[b:b + 1], p0, None, one)) > 1e-4  # position 9 != 3
        assert rel_err(mixed[b:b + 1], alone) <= 1e-6
    with pytest.raises(ValueError, match="'frame_offset' as a tensor"):
        model(x, t, torch.zeros(3, 3, dtype=torch.int64), None, text)
    with pytest.raises(ValueError, match="'frame_offset' as a tensor"):
        model(x, t, positions.float(), None, text)


@torch.no_grad()
def test_per_frame_timesteps_modulate_their_frame_only(tiny_cfg):
    """With block-causal attention of 1-frame blocks, changing frame 2's t leaves frames 0, 1 unchanged."""
    model = _model(tiny_cfg)
    x = torch.randn(1, 4, 3, 4, 6)
    t = torch.rand(1, 3) * 1000
    attn = DenseAttention(1, tokens_per_frame=6)
    text = _text(model, 1)
    a = model(x, t, 0, attn, text)
    t2 = t.clone()
    t2[0, 2] = 1000 - t2[0, 2]
    b = model(x, t2, 0, attn, text)
    assert torch.equal(a[:, :, :2], b[:, :, :2])
    assert rel_err(a[:, :, 2], b[:, :, 2]) > 1e-3


def test_rope_fp32_tables_and_cache():
    rope = RotaryEmbedding3D(128, 10000.0)
    cos, sin = rope.tables(37, 3, 4, 5, "cpu")
    assert cos.dtype == torch.float32 and cos.shape == (60, 1, 64)
    assert rope.tables(37, 3, 4, 5, "cpu")[0] is cos        # cached
    # float64 reference: token (f, y, x) at temporal position 37 + f
    d = 128
    parts = [d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)]
    inv = [1.0 / 10000 ** (torch.arange(0, p, 2, dtype=torch.float64) / p) for p in parts]
    f, y, xx = torch.meshgrid(torch.arange(3) + 37, torch.arange(4), torch.arange(5), indexing="ij")
    ang = torch.cat([f.reshape(-1, 1) * inv[0], y.reshape(-1, 1) * inv[1], xx.reshape(-1, 1) * inv[2]], dim=1)
    assert (cos[:, 0].double() - ang.cos()).abs().max() < 2e-5
    assert (sin[:, 0].double() - ang.sin()).abs().max() < 2e-5


@torch.no_grad()
def test_bf16_close_to_fp32(tiny_cfg):
    model = _model(tiny_cfg)
    x = torch.randn(1, 4, 2, 4, 6)
    t = torch.rand(1, 2) * 1000
    emb = torch.randn(1, 8, tiny_cfg.text_dim)
    ref = model(x, t, 3, None, model.encode_text(emb))
    model.to_dtype(torch.bfloat16)
    assert model.time_projection[1].weight.dtype == torch.float32
    assert model.blocks[0].modulation.dtype == torch.float32
    assert model.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    out = model(x, t, 3, None, model.encode_text(emb))
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) <= 3e-2


# ----------------------------------------------------------------------------- diffusers


@torch.no_grad()
def test_equals_diffusers_wan_transformer(tiny_cfg):
    diffusers = pytest.importorskip("diffusers")
    from spiral_rt.models.checkpoints import load_dit

    cfg = tiny_cfg
    ref = diffusers.WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=cfg.eps,
    ).eval()
    randomize_(ref)
    model = load_dit(ref.state_dict(), cfg)      # diffusers names, auto-detected

    B, Fr, H, W = 2, 3, 6, 10
    x = torch.randn(B, cfg.in_channels, Fr, H, W)
    t = torch.rand(B, Fr) * 1000
    emb = torch.randn(B, cfg.text_len, cfg.text_dim)
    ours = model(x, t, 0, None, model.encode_text(emb))
    # diffusers takes one t per token (B, L) (the Wan2.2 TI2V path): repeat each frame's t
    t_tok = t.repeat_interleave((H // 2) * (W // 2), dim=1)
    theirs = ref(hidden_states=x, timestep=t_tok, encoder_hidden_states=emb, return_dict=False)[0]
    assert theirs.shape == ours.shape
    assert rel_err(ours, theirs) <= 1e-5


# ----------------------------------------------------------------------------- fused-path pieces


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 777, 4680])
def test_gpu_fused_ffn_and_query_norm_match_the_modules(rows):
    """The fused path's FFN (bias + tanh-GELU in the GEMM epilogue) and cross-attention query norm
    (F.rms_norm) against the modules: in fp32 the FFN matches the tanh-GELU module (rel. error
    <= 1e-5) far closer than the erf GELU; in bf16 both are within rounding (<= 1e-2) of fp32."""
    import torch.nn as nn

    from spiral_rt.models.dit import RMSNorm, _ffn_fused, _rms_norm_fused

    torch.manual_seed(rows)
    ffn = nn.Sequential(nn.Linear(1536, 8960), nn.GELU(approximate="tanh"), nn.Linear(8960, 1536)).cuda()
    y = torch.randn(2, rows, 1536, device="cuda") * 2  # hidden values where the two GELUs differ most
    want = ffn(y)
    erf = ffn[2](torch.nn.functional.gelu(ffn[0](y)))
    got = _ffn_fused(ffn, y)
    assert rel_err(got, want) <= 1e-5 < rel_err(erf, want) / 10
    got = _ffn_fused(ffn.bfloat16(), y.bfloat16()).float()
    assert rel_err(got, want) <= 1e-2

    norm = RMSNorm(1536, 1e-6).cuda()
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, rows, 1536, device="cuda") * 3
    want = norm(x)
    got = _rms_norm_fused(norm.bfloat16(), x.bfloat16()).float()
    assert rel_err(got, want) <= 1e-2


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_cross_attention_query_norm_as_row_scale():
    """The fused path's cross-attention: the query's inverse RMS as a per-row score scale, the norm's
    weight folded into the text keys (``cross_k_q_weighted``), a prompt's distinct rows read once,
    against the modules' RMSNorm on q and SDPA over every text row (bf16: rel. error <= 1e-2)."""
    from spiral_rt.models.attention import sdpa_blhd
    from spiral_rt.models.dit import _text_attention_plan
    from spiral_rt.ops import chunk_attention, row_inv_rms

    torch.manual_seed(0)
    cfg = tiny_test(num_layers=2, dim=256, num_heads=2, ffn_dim=512, text_dim=64, freq_dim=64, in_channels=16)
    model = build_dit(cfg, device="cuda", dtype=torch.bfloat16)
    for block in model.blocks:
        block.cross_attn.norm_q.weight.data.uniform_(0.5, 1.5)
    emb = torch.randn(2, 9, cfg.text_dim, device="cuda")
    emb[1, 4:] = 0  # a 4-token prompt
    text = model.encode_text(emb)
    assert text.cross_k_q_weighted is not None
    B, L = 2, 333
    plan = _text_attention_plan(B, L, text)
    assert plan is not None and plan.distinct_keys is not None
    for i, block in enumerate(model.blocks):
        ca = block.cross_attn
        y = torch.randn(B, L, cfg.dim, device="cuda", dtype=torch.bfloat16)
        want = sdpa_blhd(ca.heads(ca.norm_q(ca.q(y))), text.cross_k[i], text.cross_v[i]).float()
        q = ca.q(y).view(B * L, cfg.dim)
        got = chunk_attention(q.view(B * L, cfg.num_heads, -1), text.cross_k_q_weighted[i], text.cross_v[i], plan,
                              q_row_scale=row_inv_rms(q, ca.norm_q.eps)).o
        assert rel_err(got.view_as(want).float(), want) <= 1e-2


def test_pack_qkv_one_gemm_equals_three_and_unpacks_on_a_cast(tiny_cfg, tmp_path):
    """``pack_qkv`` moves each block's q, k, v weights and biases into one buffer without changing a
    value or a Parameter object; the one GEMM then gives the three projections (fp32, rel. error
    <= 1e-6); with gradients wanted, or after a dtype cast (which unpacks), three GEMMs run; a
    safetensors round trip of the packed state dict loads back into the packed buffer."""
    from safetensors.torch import load_file, save_file

    from spiral_rt.models.dit import _packed_qkv, _qkv_heads

    torch.manual_seed(21)
    model = _model(tiny_cfg)
    sa = model.blocks[1].self_attn
    params = [p for lin in (sa.q, sa.k, sa.v) for p in (lin.weight, lin.bias)]
    before = [p.detach().clone() for p in params]
    assert _packed_qkv(sa) is None
    model.pack_qkv()
    assert all(p is q for p, q in zip(params, [p for lin in (sa.q, sa.k, sa.v) for p in (lin.weight, lin.bias)]))
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    y = torch.randn(2, 37, tiny_cfg.dim)
    with torch.no_grad():
        weight, bias = _packed_qkv(sa)
        assert weight.shape == (3 * tiny_cfg.dim, tiny_cfg.dim) and bias.shape == (3 * tiny_cfg.dim,)
        got = _qkv_heads(sa, y)
        want = (sa.heads(sa.q(y)), sa.heads(sa.k(y)), sa.heads(sa.v(y)))
        assert all(g.shape == w.shape and rel_err(g, w) <= 1e-6 for g, w in zip(got, want))
    assert _packed_qkv(sa) is None  # gradients wanted: the modules run
    path = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with torch.no_grad():
        for p in params:
            p.zero_()
    model.load_state_dict(load_file(str(path)))
    with torch.no_grad():
        assert _packed_qkv(sa) is not None and all(torch.equal(p, b) for p, b in zip(params, before))
        model.to_dtype(torch.float64)
        assert _packed_qkv(sa) is None
        model.pack_qkv()
        assert _packed_qkv(sa) is not None and sa.q.weight.dtype == torch.float64
