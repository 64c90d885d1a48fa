"""CUDA-only paths of the engine: VAE decode on a side stream, and CUDA graphs of the chunk sequence.

Both are used only when the engine runs on a CUDA device (and, for graphs, ``cuda_graphs=True``);
on the CPU the engine never imports them. They are kept apart from the eager loop so that the
reference path (eager, reference ops) stays easy to read and to compare against.

``SideStreamDecoder``: after the DiT produced a chunk's latents on the main stream, the decode is
queued on a second stream that waits for them (an event), so the next chunk's DiT work on the main
stream overlaps it. Decoder states live on the side stream (snapshots clone them there); the
frames come back with an event that ``ChunkOutput.frames`` makes the reader's stream wait on.

``ChunkGraphRunner``: one CUDA graph per *bucket*, i.e. per exact shape of the chunk's work (batch
size, per-sequence query and key lengths, page-list and work-partition sizes, and whether the clean
pass runs: not at the sessions' last chunk, ``EngineConfig.clean_pass_last_chunk``). With the window
policy the context length stops growing after sink + window frames, so a long video replays one
graph; with the global policy each context length is its own bucket (captured the second time it
is met, e.g. in the second video). A graph holds the whole per-chunk sequence of
``Engine.chunk_sequence``: initial Philox noise, every denoising forward and sampler step, and the
clean pass, so a chunk is one replay. Inputs are copied into static buffers before a replay: the
plan's device tables (page lists, work partition, write slots, RoPE frame indices), the noise keys,
and the batch's text conditioning (copied only when the batch's prompts changed). The page pool is
a fixed tensor, so the captured K/V writes and page reads address it directly. All graphs share
one memory pool and are replayed one at a time.

Boundaries: no scheduling decisions; the engine calls ``decode`` and ``run``.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from spiral_rt.models.dit import TextConditioning
from spiral_rt.models.vae import DecoderState


logger = logging.getLogger(__name__)

# Every device table of a ChunkAttentionPlan (what the Triton kernels and the CUDA kernel read, and
# what ``with_distinct_keys`` derives tiles from): each is copied into the bucket's static copy
# before a replay.
_PLAN_TENSORS = ("q_indptr", "kv_indptr", "kv_indices", "kv_last_page_len", "work", "tile_rows", "left_rows",
                 "cuda_work", "cuda_tiles", "cuda_merge", "cuda_tile_keys", "distinct_keys", "cuda_tile_log2_count",
                 "cuda_own_tiles")


class SideStreamDecoder:
    """Streaming VAE decode on a second CUDA stream (module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def decode(self, engine, session, latents: torch.Tensor):
        from .engine import frames_from_video

        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)  # the latents (and anything before) are ready on the main stream
        h, w = engine.config.latent_size
        with torch.cuda.stream(self.stream), engine.stages("vae", stream=self.stream):
            latents.record_stream(self.stream)
            if session.decoder_state is None:
                session.decoder_state = engine.vae.new_state(1, h, w, device=self.device)
            video = engine.vae.decode_chunk(latents[None], session.decoder_state)
            frames = frames_from_video(video, engine.config.output)
            done = torch.cuda.Event()
            done.record(self.stream)
        return frames, done

    def clone_state(self, state: DecoderState) -> DecoderState:
        """A copy taken in the side stream's order (after every queued decode into ``state``)."""
        with torch.cuda.stream(self.stream):
            buffers = [b.clone() for b in state.buffers]
        main = torch.cuda.current_stream(self.device)
        main.wait_stream(self.stream)
        return DecoderState(buffers=buffers, started=state.started, latent_size=state.latent_size)


@dataclasses.dataclass
class _Bucket:
    seen: int = 0
    graph: "torch.cuda.CUDAGraph | None" = None
    plan_tensors: dict | None = None
    attn_plan: object = None
    write_slots: torch.Tensor | None = None
    frame_idx: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    out: torch.Tensor | None = None
    text: "_StaticText | None" = None


class _StaticText:
    """Static (B, ...) copies of a batch's text conditioning; refilled only when the source changes."""

    def __init__(self, like: TextConditioning, batch: int):
        def alloc(t):
            return torch.empty((batch, *t.shape[1:]), dtype=t.dtype, device=t.device)

        self.cond = TextConditioning(context=alloc(like.context), cross_k=[alloc(k) for k in like.cross_k],
                                     cross_v=[alloc(v) for v in like.cross_v],
                                     distinct_rows=torch.empty(batch, dtype=torch.int32, device=like.context.device),
                                     cross_k_q_weighted=(None if like.cross_k_q_weighted is None
                                                         else [alloc(k) for k in like.cross_k_q_weighted]))
        self.source: TextConditioning | None = None

    def fill(self, text: TextConditioning) -> None:
        if text is self.source:
            return
        dsts = [self.cond.context, *self.cond.cross_k, *self.cond.cross_v]
        srcs = [text.context, *text.cross_k, *text.cross_v]
        if self.cond.cross_k_q_weighted is not None:
            if text.cross_k_q_weighted is None:  # the graphs were captured reading them
                raise ValueError("ChunkGraphRunner: the text conditioning lacks cross_k_q_weighted, which the "
                                 "captured graphs read; build it with CausalWanDiT.encode_text on the GPU")
            dsts += self.cond.cross_k_q_weighted
            srcs += text.cross_k_q_weighted
        for dst, src in zip(dsts, srcs):
            dst.copy_(src.expand_as(dst), non_blocking=True)
        if text.distinct_rows is not None:
            self.cond.distinct_rows.copy_(text.distinct_rows.expand_as(self.cond.distinct_rows), non_blocking=True)
        else:  # counts unknown: every row is read
            self.cond.distinct_rows.fill_(text.context.shape[1])
        self.source = text


class ChunkGraphRunner:
    """CUDA graphs of ``Engine.chunk_sequence``, one per bucket (module docstring)."""

    def __init__(self, engine):
        self.engine = engine
        self.pool = torch.cuda.graph_pool_handle()
        self.buckets: dict[tuple, _Bucket] = {}
        self.texts: dict[int, _StaticText] = {}
        self.num_captures = 0
        self.num_replays = 0

    @staticmethod
    def bucket_key(plan, attn_plan) -> tuple:
        shapes = tuple(tuple(getattr(attn_plan, n).shape) if getattr(attn_plan, n) is not None else None
                       for n in _PLAN_TENSORS)
        return (plan.num_seqs, plan.num_q_frames, attn_plan.kv_lens, attn_plan.config, shapes)

    def run(self, plan, attn_plan, text: TextConditioning, keys: torch.Tensor,
            clean_pass: bool = True) -> torch.Tensor | None:
        """Latents (B, C, F, h, w) from a graph of this bucket, or None: run eagerly (first sighting)."""
        key = (*self.bucket_key(plan, attn_plan), clean_pass)
        b = self.buckets.setdefault(key, _Bucket())
        b.seen += 1
        if b.seen == 1:
            return None  # first sighting: eager (warms up kernels for these shapes)
        engine = self.engine
        B = plan.num_seqs
        if b.graph is None:
            b.plan_tensors = {n: getattr(attn_plan, n).clone() if getattr(attn_plan, n) is not None else None
                              for n in _PLAN_TENSORS}
            b.attn_plan = dataclasses.replace(attn_plan, **b.plan_tensors)
            b.write_slots = plan.device.write_slots.clone()
            b.frame_idx = plan.device.q_frame_idx.clone()
            b.keys = keys.clone()
            b.text = self.texts.get(B) or self.texts.setdefault(B, _StaticText(text, B))
            b.text.fill(text)
            ctx = engine.attention_context(plan, b.attn_plan)
            ctx.write_slots = b.write_slots
            # warm-up on the static buffers (a real run: its result is this chunk's), then capture
            side = torch.cuda.Stream(engine.device)
            side.wait_stream(torch.cuda.current_stream(engine.device))
            with torch.cuda.stream(side):
                result = engine.chunk_sequence(ctx, b.text.cond, b.keys, None, b.frame_idx, B, clean_pass=clean_pass)
            torch.cuda.current_stream(engine.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with engine.stages.suspended(), torch.cuda.graph(graph, pool=self.pool):
                b.out = engine.chunk_sequence(ctx, b.text.cond, b.keys, None, b.frame_idx, B, clean_pass=clean_pass)
            b.graph = graph
            self.num_captures += 1
            logger.info("ChunkGraphRunner: captured bucket %d (batch %d, kv lens %s)", len(self.buckets), B,
                        attn_plan.kv_lens)
            return result
        for n in _PLAN_TENSORS:
            if b.plan_tensors[n] is not None:
                b.plan_tensors[n].copy_(getattr(attn_plan, n), non_blocking=True)
        b.write_slots.copy_(plan.device.write_slots, non_blocking=True)
        b.frame_idx.copy_(plan.device.q_frame_idx, non_blocking=True)
        b.keys.copy_(keys, non_blocking=True)
        b.text.fill(text)
        engine.model.refresh_time_tables()  # the graph reads the DiT's per-t tables: current weights
        with engine.stages("chunk_graph"):
            b.graph.replay()
        self.num_replays += 1
        return b.out.clone()  # the next replay of this bucket overwrites b.out
