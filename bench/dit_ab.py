"""Same-process A/B of the DiT's fused path: DiT-only 81-frame videos (output="latents", CUDA graphs,
bench_stream's part-a settings) for named variants, interleaved so that clocks and machine drift
hit every variant alike.

Each variant is the current code with one change undone (a patch applied while that variant's
engine runs: warm-up, graph captures and timed videos), so the table reads as "what this change is
worth now". The engines share one model and one prompt; the final latents of each variant are
compared with the first variant's (relative L2).

Variants (``--variants``, the first is the baseline of the ratios):
  current        the code as committed;
  unpacked_qkv   q, k, v as three GEMMs (``CausalWanDiT.pack_qkv`` undone: session 12's change);
  torch_linears  the projections and FFN through PyTorch's own calls (F.linear, and
                 torch._addmm_activation for the FFN's GELU epilogue): cuBLASLt's first heuristic
                 candidate instead of ``spiral_rt.ops.linear``'s timed one (session 14's change);
  all_text_rows  cross-attention by SDPA over all 512 text rows instead of the chunk-attention kernel
                 over the prompt's distinct rows (session 14's change);
  normalized_queries  the cross-attention queries RMS-normalised by F.rms_norm and written, instead of
                 their inverse RMS as a per-row score scale with the norm's weight in the text keys
                 (session 15's change);
  strided_text_items  the cross-attention's row blocks in the kernel's usual strided order, so no
                 CTA's next item reuses its key tile from shared memory (session 15's change; the
                 text plans are rebuilt for this variant).
  one_q_buffer   the cross-attention's row blocks in the kernel's usual variant (one Q buffer, a
                 two-stage K/V ring) instead of the short-item one (two Q buffers: the next item's
                 Q loads while this one's S reads its own; session 16's change; own text plans).
  kv_written     the denoising forwards write their chunk's K/V into the cache and the attention
                 reads them there, instead of from the QKV projection's output (session 19's change);
  time_mlp       the time MLP and the blocks' modulation tables computed in every forward, instead of
                 kept per timestep value (session 19's change);
  torch_qkv      the packed q, k, v GEMM through F.linear (cuBLASLt's first heuristic candidate, and
                 the memset some of them ask for) instead of ``spiral_rt.ops.linear``'s timed choice
                 (session 19's change).
A change under study adds its "undone" variant here. Session 13 measured a cross-attention that read
a prompt's repeated padding rows once (a Triton kernel, commit dca156a, since removed) against SDPA
over every row this way: results/text_attention_ab.json.

    python bench/dit_ab.py [--variants current,unpacked_qkv] [--rounds 5] [--prompt-tokens 128]
    python bench/dit_ab.py --smoke     (CPU, tiny model, no timing meaning, no result file)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stream import CHUNK_FRAMES, Clock, free, make_engine, run_video  # noqa: E402
from common import PROMPT_TOKENS, print_table, prompt_embedding, write_result  # noqa: E402

from spiral_rt.cache import GlobalPolicy  # noqa: E402
from spiral_rt.engine import paged_context  # noqa: E402
from spiral_rt.models import dit as dit_module  # noqa: E402
from spiral_rt.models.config import tiny_test, wan21_t2v_1_3b  # noqa: E402
from spiral_rt.models.dit import build_dit  # noqa: E402
attention_ops = importlib.import_module("spiral_rt.ops.chunk_attention")  # the module (the package exports the function)

NUM_CHUNKS = 7  # 21 latent frames = 81 video frames


@contextlib.contextmanager
def _patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


@contextlib.contextmanager
def _stacked(*contexts):
    with contextlib.ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield


def _time_tables_every_forward(self, timesteps, B, frames, device):
    """``CausalWanDiT._time_conditioning`` without its per-t cache (the DiT before session 19)."""
    if not isinstance(timesteps, torch.Tensor):
        timesteps = torch.full((B, frames), float(timesteps), device=device)
    return self._time_mlp(timesteps if timesteps.dim() == 2 else timesteps[:, None].expand(B, frames))


def _torch_qkv_heads(attn, y):
    """``dit._qkv_heads`` with the packed GEMM through F.linear (the DiT before session 19)."""
    packed = dit_module._packed_qkv(attn)
    if packed is None:
        return attn.heads(attn.q(y)), attn.heads(attn.k(y)), attn.heads(attn.v(y))
    return torch.nn.functional.linear(y, *packed).unflatten(-1, (3, attn.num_heads, -1)).unbind(-3)


def _torch_linear(x, weight, bias=None, *, gelu=False):
    """PyTorch's own calls for what ``spiral_rt.ops.linear`` does (the DiT before session 14)."""
    if not gelu:
        return torch.nn.functional.linear(x, weight, bias)
    y = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
    return y.view(*x.shape[:-1], -1)


# The strided variant's own text plans. They live as long as the process: its engine's CUDA graphs
# read the plans they captured through raw pointers, so a cache dropped when the variant's context
# exits would leave the next replay reading freed memory.
_STRIDED_TEXT_PLANS: dict = {}
_ONE_Q_BUFFER_TEXT_PLANS: dict = {}

VARIANTS = {
    "current": contextlib.nullcontext,
    "torch_linears": lambda: _patched(dit_module, "_tuned_linear", _torch_linear),
    "all_text_rows": lambda: _patched(dit_module, "_text_attention_plan", lambda *args: None),
    "unpacked_qkv": lambda: _patched(dit_module, "_packed_qkv", lambda attn: None),
    "normalized_queries": lambda: _patched(dit_module, "_q_weighted_keys", lambda model, ks: None),
    "strided_text_items": lambda: _stacked(_patched(attention_ops, "_runs_per_cta", lambda items, num_sms: items),
                                           _patched(dit_module, "_TEXT_PLANS", _STRIDED_TEXT_PLANS)),
    "one_q_buffer": lambda: _stacked(_patched(attention_ops, "_short_item_kernel", lambda cuda_work: False),
                                     _patched(dit_module, "_TEXT_PLANS", _ONE_Q_BUFFER_TEXT_PLANS)),
    "kv_written": lambda: _patched(paged_context, "own_pages_of", lambda plan: None),
    "time_mlp": lambda: _patched(dit_module.CausalWanDiT, "_time_conditioning", _time_tables_every_forward),
    "torch_qkv": lambda: _patched(dit_module, "_qkv_heads", _torch_qkv_heads),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="current,unpacked_qkv")
    ap.add_argument("--rounds", type=int, default=5, help="timed videos per variant, interleaved")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up videos per variant (>= 2: graphs capture on the second)")
    ap.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    ap.add_argument("--name", default="dit_ab")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model: checks that the script runs")
    args = ap.parse_args(argv)
    names = args.variants.split(",")
    if unknown := [n for n in names if n not in VARIANTS]:
        ap.error(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)}")
    if args.smoke:
        args.device, args.latent_hw, args.graphs = "cpu", (4, 6), False
        args.rounds, args.warmup, num_chunks = 1, 1, 3
        cfg, dtype = tiny_test(num_layers=2, dim=128, num_heads=2, ffn_dim=256, text_dim=64, freq_dim=32, in_channels=16), torch.float32
    else:
        if not torch.cuda.is_available():
            ap.error("needs a CUDA GPU (or --smoke)")
        args.device, args.latent_hw, args.graphs = "cuda", (60, 104), True
        cfg, dtype, num_chunks = wan21_t2v_1_3b(), torch.bfloat16, NUM_CHUNKS
    torch.manual_seed(0)
    model = build_dit(cfg, device=args.device, dtype=dtype)
    prompt = prompt_embedding(min(args.prompt_tokens, cfg.text_len), cfg.text_dim, args.device, dtype)
    clock = Clock(args.device == "cuda")
    engines = {n: make_engine(model, None, args, policy=GlobalPolicy(), output="latents",
                              kv_frames=num_chunks * CHUNK_FRAMES + 3) for n in names}
    times = {n: [] for n in names}
    latents = {}
    for n in names:
        with VARIANTS[n]():
            for _ in range(args.warmup):
                run_video(engines[n], clock, num_chunks, prompt)
            s = engines[n].open_session(prompt, seed=7, noise_id=0, max_chunks=num_chunks)
            latents[n] = torch.cat([engines[n].step([s])[s.session_id].latents.float() for _ in range(num_chunks)], dim=1)
            s.close()
    for _ in range(args.rounds):
        for n in names:
            with VARIANTS[n]():
                times[n].append(run_video(engines[n], clock, num_chunks, prompt)[1])
    frames = 1 + 4 * (num_chunks * CHUNK_FRAMES - 1)
    base = statistics.median(times[names[0]])
    ref = latents[names[0]]
    rows = []
    for n in names:
        ms = statistics.median(times[n])
        rows.append({"variant": n, "ms_per_video": ms, "dit_fps": frames / (ms / 1e3), "x_first": ms / base,
                     "rel_l2_vs_first": float((latents[n] - ref).norm() / ref.norm()), "all_ms": times[n]})
    print_table([{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "all_ms"} for r in rows],
                ["variant", "ms_per_video", "dit_fps", "x_first", "rel_l2_vs_first"])
    free(*engines.values())
    if args.smoke:
        return
    write_result(args.name, {"model": cfg.name, "latent_hw": list(args.latent_hw), "frames": frames, "cuda_graphs": True,
                             "prompt_tokens": args.prompt_tokens, "rounds": args.rounds, "warmup": args.warmup,
                             "timing": "CUDA events around each engine step, variants interleaved per round"}, rows)


if __name__ == "__main__":
    main()
