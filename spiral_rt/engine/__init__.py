"""spiral_rt.engine: the streaming runtime (DESIGN §3): sessions, the batched chunk loop, prompt
switching, streaming decode, CUDA graphs.

- ``engine``: ``Engine`` (owns model, VAE, text conditioning, the paged KV cache, schedule and step
  policy; ``step()`` runs one chunk of every ready session in one batched DiT call per forward);
- ``session``: ``StreamSession`` (one video: prompts, position, cache sequence, decoder state;
  ``next_chunk()``, fork, snapshot/rollback, speculation), ``ChunkOutput``, ``SessionSnapshot``;
- ``config``: ``EngineConfig``, ``PromptSpan``;
- ``paged_context``: ``PagedAttentionContext`` (the DiT's attention over paged K/V),
  ``build_attention_plan``, ``plan_positions``;
- ``profiling``: nvtx ranges, stage timings, torch.profiler traces;
- ``cuda_paths``: side-stream VAE decode and CUDA graphs (CUDA only, imported lazily).
"""

from .config import EngineConfig, PromptSpan
from .engine import Engine, frames_from_video
from .paged_context import PagedAttentionContext, build_attention_plan, plan_positions
from .profiling import Stages, profile_trace
from .session import ChunkOutput, SessionSnapshot, StreamSession

__all__ = [
    "Engine", "EngineConfig", "PromptSpan", "StreamSession", "ChunkOutput", "SessionSnapshot",
    "PagedAttentionContext", "build_attention_plan", "plan_positions", "frames_from_video",
    "Stages", "profile_trace",
]
