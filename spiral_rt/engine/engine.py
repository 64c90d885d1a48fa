"""Engine: the streaming chunk loop over many sessions, batched into one DiT call per step.

One ``Engine.step()`` follows schedule -> execute -> update:

1. schedule: the ready sessions (``StreamSession.status == "ready"``), in batches of at most
   ``max_batch_size``; each session's prompt for its next chunk is resolved and its text
   conditioning built or taken from the per-prompt cache; sessions switching prompt with re-cache on
   get LongLive's re-cache first (one clean pass with the new prompt over their visible frames past
   the sink, through ``PagedKVCache.plan_rewrite``); the cache reserves the batch's chunk pages
   (``plan_chunk``: eviction, copy-on-write, one upload of the index tables).
2. execute, per batch (one DiT call per forward, varlen over sequences through the plan)::

       x = noise                                   (Philox key (seed, noise id, chunk, 0), or given)
       for k, (sigma, sigma') in schedule:         N denoising forwards, reading the context pages
           v = DiT(x, t_k | pages, text)           (the chunk's own reserved slots are scratch)
           x = step_policy(x, v, sigma, sigma')    (sampler_step; noise key (.., k + 1))
       DiT(x (+ context noise), t = context | pages, text)   the clean pass writes the chunk's K/V
       cache.commit(plan)                          (skipped at the sessions' last chunk: no reader)

   An observed chunk (``Engine.observe``: given clean latents, e.g. a world model's current
   observation) skips the denoising forwards and runs only the clean pass over them.
   The attention plan is built once per chunk and reused by every layer, step and the clean pass.
   With ``cuda_graphs`` the whole sequence replays from a CUDA graph per context-length bucket
   (``spiral_rt.engine.cuda_paths``).
3. update: positions advance, clean latents are kept for re-cache, and each chunk is decoded by
   the session's streaming VAE decoder (on a second CUDA stream when available, overlapping the
   next step's DiT work).

Nothing in the loop reads device values on the host (no ``.item()``, no blocking copies): page
tables are host lists, index tables and noise keys go up in pinned non-blocking copies, and
decoded frames come back as device tensors.

Boundaries: the model (``spiral_rt.models``), the cache manager (``spiral_rt.cache``), the schedules
and step policies (``spiral_rt.sampling``) and the ops are used, not changed; the attention context
lives in ``spiral_rt.engine.paged_context``; CUDA-only paths in ``spiral_rt.engine.cuda_paths``.
Not thread safe: one thread drives an engine.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from typing import Iterable, Iterator

import torch

from spiral_rt.cache import KVCacheConfig, KVCacheExhausted, PagedKVCache, visible_context_frames
from spiral_rt.models.dit import CausalWanDiT, TextConditioning
from spiral_rt.models.text import TextEmbeddings, TextEncoder
from spiral_rt.models.vae import DecoderState, WanVAEDecoder
from spiral_rt.ops import sampler_step
from spiral_rt.sampling import StepPolicy

from .config import EngineConfig, Prompt, as_schedule
from .paged_context import PagedAttentionContext, build_attention_plan, plan_positions
from .profiling import Stages, profile_trace
from .session import ChunkOutput, StreamSession

logger = logging.getLogger(__name__)

_TEXT_CACHE_ENTRIES = 64


def _prompt_key(prompt: Prompt):
    if isinstance(prompt, str):
        return ("text", prompt)
    return ("tensor", id(prompt))


def frames_from_video(video: torch.Tensor, fmt: str) -> torch.Tensor:
    """(1, 3, T, H, W) decoder output in [-1, 1] -> (T, H, W, 3) uint8 (round to nearest) or float."""
    frames = video[0].permute(1, 2, 3, 0)
    if fmt == "uint8":
        return ((frames.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return frames.contiguous()


class Engine:
    """Streaming generation over many sessions (module docstring).

    Args:
        model: the causal DiT (its dtype is the KV cache's dtype).
        vae: the streaming VAE decoder; None requires ``config.output == "latents"``.
        config: ``EngineConfig``.
        text_encoder: encodes string prompts (e.g. ``CachedTextEncoder(UMT5TextEncoder(...))``); None
            when every prompt comes as precomputed embeddings.
        cache: an existing ``PagedKVCache`` to use (its shape must match the model); default: one is
            built from the config's budget.
    """

    def __init__(self, model: CausalWanDiT, vae: WanVAEDecoder | None = None, config: EngineConfig | None = None, *,
                 text_encoder: TextEncoder | None = None, cache: PagedKVCache | None = None):
        if not isinstance(model, CausalWanDiT):
            raise ValueError(f"Engine: 'model' must be a CausalWanDiT, got {type(model).__name__}")
        config = config or EngineConfig()
        if not isinstance(config, EngineConfig):
            raise ValueError(f"Engine: 'config' must be an EngineConfig, got {type(config).__name__}")
        config.validate()
        if vae is None and config.output != "latents":
            raise ValueError("Engine: 'vae' is None; pass a WanVAEDecoder or set config.output='latents'")
        if vae is not None and vae.config.z_dim != model.config.out_channels:
            raise ValueError(f"Engine: 'vae' decodes {vae.config.z_dim} latent channels, the model makes "
                             f"{model.config.out_channels}")
        if config.fused_ops:
            model.pack_qkv()  # q, k, v weights in one buffer: the fused path's one QKV GEMM
        self.model = model
        self.vae = vae
        self.config = config
        self.text_encoder = text_encoder
        self.device = torch.device(config.device) if config.device is not None else model.patch_embedding.weight.device
        mcfg = model.config
        h, w = config.latent_size
        if h % mcfg.patch_size[1] or w % mcfg.patch_size[2]:
            raise ValueError(f"Engine: config.latent_size {config.latent_size} must be a multiple of the patch {mcfg.patch_size}")
        self.tokens_per_frame = mcfg.tokens_per_frame(h, w)
        self._owns_cache = cache is None
        self.cache = cache if cache is not None else self._build_cache()
        self.closed = False
        if (self.cache.config.num_layers, self.cache.config.num_heads, self.cache.config.head_dim,
                self.cache.tokens_per_frame) != (mcfg.num_layers, mcfg.num_heads, mcfg.head_dim, self.tokens_per_frame):
            raise ValueError("Engine: 'cache' shape (layers, heads, head_dim, tokens_per_frame) does not match the model")
        self.stages = Stages(self.device, config.timing)
        sched = config.schedule
        self._transitions = sched.transitions()
        self._model_t = sched.model_timesteps
        self._context_t = config.context_noise * sched.num_train_timesteps
        self._sessions: dict[int, StreamSession] = {}
        self._next_session_id = 0
        self._text_cache: OrderedDict = OrderedDict()
        self._batch_text: tuple[tuple, TextConditioning] | None = None
        self._cuda = self.device.type == "cuda"
        self._decoder = None
        self._graphs = None
        if self._cuda:
            from .cuda_paths import ChunkGraphRunner, SideStreamDecoder

            if config.vae_side_stream and vae is not None:
                self._decoder = SideStreamDecoder(self.device)
            if config.cuda_graphs:
                self._graphs = ChunkGraphRunner(self)
        elif config.cuda_graphs:
            logger.info("Engine: cuda_graphs needs a CUDA device; running eagerly on %s", self.device)

    # ------------------------------------------------------------------ construction helpers

    def _build_cache(self) -> PagedKVCache:
        cfg, mcfg = self.config, self.model.config
        budget = cfg.kv_memory_bytes
        if budget is None and cfg.kv_num_pages is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(0.4 * free)
            else:
                budget = 256 * 2**20
        return PagedKVCache(KVCacheConfig(
            num_layers=mcfg.num_layers, num_heads=mcfg.num_heads, head_dim=mcfg.head_dim,
            tokens_per_frame=self.tokens_per_frame, frames_per_page=cfg.frames_per_page,
            memory_budget_bytes=budget, num_pages=cfg.kv_num_pages, dtype=self.model.dtype, device=self.device,
            policy=cfg.policy,
        ))

    # ------------------------------------------------------------------ sessions

    def open_session(self, prompts, *, seed: int | None = None, policy=None, max_chunks: int | None = None,
                     noise_id: int | None = None) -> StreamSession:
        """A new stream.

        Args:
            prompts: a prompt (str or precomputed embeddings), a ``PromptSpan``, or a list of them.
            seed: Philox seed (default ``config.seed``).
            policy: cache policy of this session (default ``config.policy``).
            max_chunks: finish after this many chunks (default: when a finite schedule ends).
            noise_id: second field of the noise key (default: the session id).
        """
        if self.closed:
            raise ValueError("Engine.open_session: the engine is closed (Engine.close() gave its memory back)")
        schedule = as_schedule(prompts)
        if max_chunks is not None and (isinstance(max_chunks, bool) or not isinstance(max_chunks, int) or max_chunks < 1):
            raise ValueError(f"open_session: 'max_chunks' must be a positive int or None, got {max_chunks!r}")
        seed = self.config.seed if seed is None else seed
        if not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"open_session: 'seed' must be an int in [0, 2**64), got {seed!r}")
        seq_id = self.cache.add_sequence(policy)
        sid = self._next_session_id
        self._next_session_id += 1
        session = StreamSession(self, sid, seq_id, schedule, seed=seed, noise_id=sid if noise_id is None else noise_id,
                                max_chunks=max_chunks)
        self._sessions[sid] = session
        return session

    @property
    def sessions(self) -> list[StreamSession]:
        """Open sessions, in creation order."""
        return list(self._sessions.values())

    def close_session(self, session: StreamSession) -> None:
        if self._sessions.get(session.session_id) is not session:
            raise ValueError(f"close_session: session {session.session_id} is not open in this engine")
        self.cache.release(session.seq_id)
        session.decoder_state = None
        session.latent_frames.clear()
        session.status = "closed"
        del self._sessions[session.session_id]

    def close(self) -> None:
        """Close every session and give back the memory the engine holds: its KV pool (unless the cache
        was passed in), CUDA graphs with their memory pools, the side-stream decoder and cached text.
        A closed engine opens no sessions; closing twice is harmless."""
        for s in list(self._sessions.values()):
            self.close_session(s)
        self._graphs = self._decoder = self._batch_text = None
        self._text_cache.clear()
        if self._owns_cache:
            self.cache.kv = self.cache.kv.new_empty((0,))  # bookkeeping stays (page counts, checks)
        self.closed = True

    def fork_session(self, parent: StreamSession, num_children: int = 1, share_noise: bool = False) -> list[StreamSession]:
        """Children of ``parent`` at its current chunk boundary (see ``StreamSession.fork``)."""
        seq_ids = self.cache.fork(parent.seq_id, num_children)
        children = []
        for seq_id in seq_ids:
            sid = self._next_session_id
            self._next_session_id += 1
            child = StreamSession(self, sid, seq_id, list(parent._schedule), seed=parent.seed,
                                  noise_id=parent.noise_id if share_noise else sid, max_chunks=parent.max_chunks)
            child.chunk_index = parent.chunk_index
            child._schedule_start = parent._schedule_start
            child._last_prompt_key = parent._last_prompt_key
            child._recache_next = parent._recache_next
            child.decoder_state = self._clone_decoder_state(parent.decoder_state)
            child.latent_frames = dict(parent.latent_frames)
            child.status = "ready" if parent.status != "closed" else "closed"
            child._update_finished()
            self._sessions[sid] = child
            children.append(child)
        return children

    def _clone_decoder_state(self, state: DecoderState | None) -> DecoderState | None:
        if state is None:
            return None
        if self._decoder is not None:
            return self._decoder.clone_state(state)
        return DecoderState(buffers=[b.clone() for b in state.buffers], started=state.started, latent_size=state.latent_size)

    def _visible_at(self, seq_id: int, num_frames: int) -> list[int]:
        policy = self.cache.policy(seq_id)
        return visible_context_frames(policy, num_frames, self.cache.frames_per_page)

    # ------------------------------------------------------------------ text

    def conditioning(self, prompt: Prompt) -> TextConditioning:
        """The DiT's text conditioning of one prompt (batch 1), cached per prompt."""
        key = _prompt_key(prompt)
        hit = self._text_cache.get(key)
        if hit is not None:
            self._text_cache.move_to_end(key)
            return hit[0]
        with self.stages("text"):
            if isinstance(prompt, str):
                if self.text_encoder is None:
                    raise ValueError(f"Engine: prompt {prompt[:40]!r} is a string but the engine has no text_encoder; "
                                     "pass text_encoder= or precomputed embeddings")
                emb = self.text_encoder.encode([prompt]).embeddings
            elif isinstance(prompt, TextEmbeddings):
                emb = prompt.embeddings
            else:
                emb = prompt
            if emb.dim() == 2:
                emb = emb[None]
            if emb.dim() != 3 or emb.shape[0] != 1:
                raise ValueError(f"Engine: prompt embeddings must be (Lt, text_dim) or (1, Lt, text_dim), got {tuple(emb.shape)}")
            cond = self.model.encode_text(emb.to(self.device, non_blocking=True))
        self._text_cache[key] = (cond, prompt)  # the prompt object pins id()-based keys
        while len(self._text_cache) > _TEXT_CACHE_ENTRIES:
            self._text_cache.popitem(last=False)
        return cond

    def _batched_text(self, keys: list, conds: list[TextConditioning]) -> TextConditioning:
        if all(k == keys[0] for k in keys):
            return conds[0]
        sig = tuple(keys)
        if self._batch_text is not None and self._batch_text[0] == sig:
            return self._batch_text[1]
        text = TextConditioning.cat(conds)
        self._batch_text = (sig, text)
        return text

    # ------------------------------------------------------------------ the step

    def step(self, sessions: Iterable[StreamSession] | None = None,
             noise: dict[int, torch.Tensor] | None = None, step_policy: StepPolicy | None = None) -> dict[int, ChunkOutput]:
        """Generate the next chunk of every ready session (or of ``sessions``); returns outputs by session id.

        Args:
            sessions: restrict the step to these sessions (default: all open ones); not-ready ones are skipped.
            noise: explicit noise per session id, (num_steps + 1, C, F, h, w) (see ``StreamSession.next_chunk``);
                sessions without an entry use Philox noise.
            step_policy: the step policy of this step instead of ``config.step_policy`` (e.g. a GRPO
                rollout's policy, wrapped to record transitions); such a step runs eagerly (no CUDA graph).
        """
        candidates = list(self._sessions.values()) if sessions is None else list(sessions)
        for s in candidates:
            if self._sessions.get(s.session_id) is not s:
                raise ValueError(f"step: session {s.session_id} is not open in this engine")
        ready = [s for s in candidates if s.ready]
        noise = noise or {}
        for sid in noise:
            if sid not in {s.session_id for s in ready}:
                raise ValueError(f"step: 'noise' has an entry for session {sid}, which is not ready in this step")
        outputs: dict[int, ChunkOutput] = {}
        size = self.config.max_batch_size
        with torch.inference_mode():
            for i in range(0, len(ready), size):
                outputs.update(self._step_batch(ready[i:i + size], noise, step_policy))
        return outputs

    def observe(self, session: StreamSession, latents: torch.Tensor) -> ChunkOutput:
        """Append an observed chunk to ``session`` instead of generating one: video continuation from
        real frames (a world model's current observation, an image-to-video start).

        The given clean latents take the place of the denoising steps; the clean pass writes their K/V
        under the session's prompt for this chunk exactly as for a generated chunk (with the configured
        context noise), and they are decoded like a generated chunk, so the decoder's streaming state
        continues across them. Runs eagerly (no CUDA graph); the session must be ready.

        Args:
            latents: (C, F, h, w) clean latents of one chunk (e.g. the VAE or codec encoding of the
                observed frames), F = ``config.chunk_frames``.
        """
        if self._sessions.get(session.session_id) is not session:
            raise ValueError(f"observe: session {session.session_id} is not open in this engine")
        if not session.ready:
            raise ValueError(f"observe: session {session.session_id} is {session.status}, not ready")
        shape = self._latent_shape(1)[1:]
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape or not latents.is_floating_point():
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"observe: 'latents' must be a float tensor (C, F, h, w) = {shape}, got {got}")
        observed = latents.to(self.device, self.config.latent_dtype)[None].contiguous()
        with torch.inference_mode():
            return self._step_batch([session], {}, observed=observed)[session.session_id]

    def run(self, max_steps: int | None = None) -> Iterator[dict[int, ChunkOutput]]:
        """Step until no session is ready (or ``max_steps``), yielding each step's outputs."""
        n = 0
        while any(s.ready for s in self._sessions.values()) and (max_steps is None or n < max_steps):
            yield self.step()
            n += 1

    def _step_batch(self, batch: list[StreamSession], noise: dict[int, torch.Tensor],
                    step_policy: StepPolicy | None = None, observed: torch.Tensor | None = None) -> dict[int, ChunkOutput]:
        cfg = self.config
        # schedule: prompts, re-cache at switches, page reservation
        prompts = [s.prompt_for_chunk() for s in batch]
        keys = [_prompt_key(p) for p in prompts]
        conds = [self.conditioning(p) for p in prompts]
        for s, key, cond in zip(batch, keys, conds):
            switching = s._last_prompt_key is not None and key != s._last_prompt_key
            recache = cfg.recache_on_switch if s._recache_next is None else s._recache_next
            if switching and recache and self.cache.rewrite_frames(s.seq_id):
                self._recache(s, cond)
            s._recache_next = None
        with self.stages("plan"):
            plan = self._reserve(batch)
        n = plan.num_seqs
        batch, keys, conds, prompts = batch[:n], keys[:n], conds[:n], prompts[:n]
        text = self._batched_text(keys, conds)
        if observed is not None:
            x = self._write_observed(plan, batch, text, observed[:n])
        else:
            x = self._generate(plan, batch, text, [noise.get(s.session_id) for s in batch], step_policy)
        self.cache.commit(plan)
        # update
        outputs = {}
        F = cfg.chunk_frames
        for i, (s, key, prompt) in enumerate(zip(batch, keys, prompts)):
            latents = x[i]
            first = s.num_frames
            for f in range(F):
                s.latent_frames[first + f] = latents[:, f]
            out = ChunkOutput(session_id=s.session_id, chunk_index=s.chunk_index, first_frame=first, latents=latents,
                              prompt=prompt)
            if cfg.output != "latents":
                out._frames, out._ready = self._decode(s, latents)
            s.chunk_index += 1
            s._last_prompt_key = key
            s._update_finished()
            s._prune_latents()
            outputs[s.session_id] = out
        return outputs

    def _reserve(self, batch: list[StreamSession]):
        """Plan the batch's chunk pages; with on_cache_full="wait", the sessions that do not fit (the plan
        covers a prefix of the batch) wait for a later step."""
        seq_ids = [s.seq_id for s in batch]
        F = self.config.chunk_frames
        plan = self.cache.plan_chunk(seq_ids, F)
        n = len(batch)
        if plan is None and self.config.on_cache_full == "wait":
            while n > 1 and plan is None:
                n -= 1
                plan = self.cache.plan_chunk(seq_ids[:n], F)
            if plan is not None:
                logger.info("Engine: KV pool full; %d of %d sessions wait for a later step", len(batch) - n, len(batch))
        if plan is None:
            plan = self.cache.require_chunk(seq_ids[:n], F)  # raises KVCacheExhausted with what to change
        return plan

    def _noise_keys(self, batch: list[StreamSession]) -> torch.Tensor:
        """(num_steps + 2, B, 4) int64 Philox keys (seed, noise id, chunk, step) on the device, one upload."""
        steps = len(self._transitions) + 2
        rows = []
        for step in range(steps):
            for s in batch:
                seed = s.seed - 2**64 if s.seed >= 2**63 else s.seed
                rows.append((seed, s.noise_id, s.chunk_index, step))
        keys = torch.tensor(rows, dtype=torch.int64).view(steps, len(batch), 4)
        if self._cuda:
            keys = keys.pin_memory().to(self.device, non_blocking=True)
        return keys

    def _generate(self, plan, batch, text, given, step_policy: StepPolicy | None = None) -> torch.Tensor:
        """The chunk's denoising forwards and clean pass for the batch; returns (B, C, F, h, w) latents."""
        cfg = self.config
        attn_plan = build_attention_plan(self.cache, plan)
        keys = self._noise_keys(batch)
        explicit = None
        if any(g is not None for g in given):
            explicit = self._explicit_noise(batch, given, keys)
        clean_pass = cfg.clean_pass_last_chunk or not all(s.next_is_last for s in batch)
        if self._graphs is not None and explicit is None and step_policy is None:
            x = self._graphs.run(plan, attn_plan, text, keys, clean_pass)
            if x is not None:
                return x
        ctx = self.attention_context(plan, attn_plan)
        return self.chunk_sequence(ctx, text, keys, explicit, plan.device.q_frame_idx, len(batch), step_policy,
                                   clean_pass)

    def _write_observed(self, plan, batch, text, latents: torch.Tensor) -> torch.Tensor:
        """The clean pass alone over given latents (``observe``); returns them."""
        ctx = self.attention_context(plan)
        self._clean_pass(ctx, latents, text, self._noise_keys(batch), None,
                         plan_positions(plan.device.q_frame_idx, len(batch)), len(batch))
        return latents

    def attention_context(self, plan, attn_plan=None) -> PagedAttentionContext:
        """The DiT's attention context for one chunk plan of this engine's cache (backend and fused path
        as configured); ``attn_plan`` reuses an already built ``build_attention_plan``."""
        return PagedAttentionContext(self.cache, plan, attn_plan if attn_plan is not None else build_attention_plan(self.cache, plan),
                                     backend=self.config.attention_backend, fused=self.config.fused_ops,
                                     own_kv=self.config.denoising_kv_from_qkv)

    def _latent_shape(self, batch_size: int) -> tuple[int, ...]:
        h, w = self.config.latent_size
        return (batch_size, self.model.config.in_channels, self.config.chunk_frames, h, w)

    def _philox(self, shape, key: torch.Tensor) -> torch.Tensor:
        zeros = torch.zeros(shape, dtype=self.config.latent_dtype, device=self.device)
        return sampler_step(zeros, zeros, 0.0, 0.0, 1.0, noise_key=key, return_mu=False,
                            backend=self.config.sampler_backend).x_next

    def _explicit_noise(self, batch, given, keys) -> torch.Tensor:
        """(B, num_steps + 1, C, F, h, w): given noise, or the session's Philox noise where none is given."""
        shape = self._latent_shape(1)[1:]
        num_steps = len(self._transitions)
        steps = num_steps + 1
        # explicit slot k is Philox step k, except the last slot (the clean pass's context noise),
        # which the Philox path draws as step num_steps + 1 (see chunk_sequence)
        philox_step = [*range(num_steps), num_steps + 1]
        per = []
        for i, g in enumerate(given):
            if g is None:
                g = torch.stack([self._philox((1, *shape), keys[philox_step[k], i:i + 1])[0] for k in range(steps)])
            elif tuple(g.shape) != (steps, *shape):
                raise ValueError(f"step: 'noise' for session {batch[i].session_id} must be (num_steps + 1, C, F, h, w) = "
                                 f"{(steps, *shape)}, got {tuple(g.shape)}")
            per.append(g.to(self.device, self.config.latent_dtype))
        return torch.stack(per)

    def chunk_sequence(self, ctx, text: TextConditioning, keys: torch.Tensor, explicit: torch.Tensor | None,
                       frame_idx: torch.Tensor, batch_size: int, step_policy: StepPolicy | None = None,
                       clean_pass: bool = True) -> torch.Tensor:
        """The fixed per-chunk forward sequence (also what a CUDA graph captures).

        Args:
            ctx: the chunk's ``PagedAttentionContext``.
            text: batch 1 or ``batch_size`` conditioning.
            keys: (num_steps + 2, B, 4) Philox keys; step 0 = initial noise, k + 1 = re-noise after step k,
                num_steps + 1 = the clean pass's context noise.
            explicit: (B, num_steps + 1, C, F, h, w) explicit noise, or None for Philox.
            frame_idx: (B * F,) int32 absolute frame of each query frame (RoPE).
            step_policy: the policy of the denoising steps (default ``config.step_policy``).
            clean_pass: run the clean pass that writes the chunk's K/V (False: the sessions' last chunk).
        Returns:
            (B, C, F, h, w) clean latents in ``config.latent_dtype``.
        """
        cfg, model = self.config, self.model
        B = batch_size
        shape = self._latent_shape(B)
        policy, backend = step_policy or cfg.step_policy, cfg.sampler_backend
        positions = plan_positions(frame_idx, B)
        x = explicit[:, 0].contiguous() if explicit is not None else self._philox(shape, keys[0])
        for k, (sigma, sigma_next) in enumerate(self._transitions):
            with self.stages(f"denoise_{k}"):
                # one number for every frame: the DiT keeps its time tables per t (no time MLP per forward)
                v = model(x, float(self._model_t[k]), positions, ctx, text).to(cfg.latent_dtype)
                kw = {}
                if sigma_next > 0:
                    kw = ({"noise": explicit[:, k + 1].contiguous()} if explicit is not None
                          else {"noise_key": keys[k + 1]})
                x = policy.step(x, v, sigma, sigma_next, return_mu=False, backend=backend, **kw).x_next
        if clean_pass:
            self._clean_pass(ctx, x, text, keys, explicit, positions, B)
        return x

    def _clean_pass(self, ctx, x: torch.Tensor, text: TextConditioning, keys: torch.Tensor,
                    explicit: torch.Tensor | None, positions, batch_size: int) -> None:
        """The forward at the context timestep that writes the chunk's K/V (after the context noise, if any)."""
        cfg = self.config
        num_steps = len(self._transitions)
        with self.stages("clean"):
            x_in = x
            if cfg.context_noise > 0:
                s = float(cfg.context_noise)
                kw = ({"noise": explicit[:, num_steps].contiguous()} if explicit is not None
                      else {"noise_key": keys[num_steps + 1]})
                x_in = sampler_step(x, x, 1.0 - s, 0.0, s, return_mu=False, backend=cfg.sampler_backend, **kw).x_next
            self.model(x_in, float(self._context_t), positions, ctx, text, kv_only=True)

    def _recache(self, session: StreamSession, cond: TextConditioning) -> None:
        """LongLive re-cache: rewrite the K/V of the session's visible frames past the sink with the new
        prompt (they attend to each other and to the sink, which keeps its K/V)."""
        cache = self.cache
        with self.stages("recache"):
            plan = cache.plan_rewrite([session.seq_id])
            if plan is None:
                raise KVCacheExhausted(1, cache.num_free_pages, cache.num_pages, cache.config.page_bytes,
                                       cache.frames_per_page, cache.config.policy,
                                       f"the re-cache of session {session.session_id} (copy-on-write of shared pages)")
            frames = plan.host.q_frame_idx.tolist()  # host tensor: no device sync
            missing = [f for f in frames if f not in session.latent_frames]
            if missing:
                cache.abort(plan)
                raise ValueError(f"recache: session {session.session_id} lacks the latents of frames {missing[:6]}")
            x = torch.stack([session.latent_frames[f] for f in frames], dim=1)[None]
            if self.config.context_noise > 0:
                s = float(self.config.context_noise)
                key = self._noise_keys([session])[-1]
                x = sampler_step(x.contiguous(), x.contiguous(), 1.0 - s, 0.0, s, noise_key=key, return_mu=False,
                                 backend=self.config.sampler_backend).x_next
            ctx = self.attention_context(plan)
            self.model(x, float(self._context_t), plan_positions(plan.device.q_frame_idx, 1), ctx, cond, kv_only=True)
            cache.commit(plan)

    # ------------------------------------------------------------------ decode

    def _decode(self, session: StreamSession, latents: torch.Tensor):
        """Decode one chunk's latents (C, F, h, w) with the session's streaming state -> (frames, ready event)."""
        h, w = self.config.latent_size
        if self._decoder is not None:
            return self._decoder.decode(self, session, latents)
        with self.stages("vae"):
            if session.decoder_state is None:
                session.decoder_state = self.vae.new_state(1, h, w, device=self.device)
            video = self.vae.decode_chunk(latents[None], session.decoder_state)
            return frames_from_video(video, self.config.output), None

    # ------------------------------------------------------------------ measurement

    def stage_times(self, reset: bool = False) -> dict[str, dict[str, float]]:
        """Per-stage count / total_ms / median_ms since the last reset (needs ``config.timing``; syncs)."""
        out = self.stages.summary()
        if reset:
            self.stages.reset()
        return out

    @contextlib.contextmanager
    def profile(self, path: str | None) -> Iterator[object]:
        """Write a torch.profiler Chrome trace of the block to ``path`` (None: no profiling)."""
        with profile_trace(path) as prof:
            yield prof
