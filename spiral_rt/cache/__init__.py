"""spiral_rt.cache: the paged KV cache manager (DESIGN §6).

One pre-allocated K/V pool per cache, ``kv`` of shape (num_layers, 2, num_pages, page_size,
num_heads, head_dim); host-side page tables with refcounts, copy-on-write fork, snapshots and
rollback, speculative segments, and the global or sink + window policies. Per chunk the manager
builds FlashInfer-style index tables (``ChunkPlan``) once; every layer and denoising step reuses
them. Allocation returns None when the pool is short; ``KVCacheExhausted`` is for callers that raise.

- ``manager``: ``PagedKVCache``, ``KVCacheConfig``, ``Snapshot``, ``CacheStats``, ``KVCacheExhausted``;
- ``policy``: ``GlobalPolicy``, ``SinkWindowPolicy``;
- ``plan``: ``ChunkPlan``, ``PlanTables``.
"""

from .manager import EVICTED, CacheStats, KVCacheConfig, KVCacheExhausted, PagedKVCache, Snapshot
from .plan import ChunkPlan, PlanTables
from .policy import CachePolicy, GlobalPolicy, SinkWindowPolicy, visible_context_frames

__all__ = [
    "PagedKVCache",
    "KVCacheConfig",
    "KVCacheExhausted",
    "Snapshot",
    "CacheStats",
    "ChunkPlan",
    "PlanTables",
    "CachePolicy",
    "GlobalPolicy",
    "SinkWindowPolicy",
    "visible_context_frames",
    "EVICTED",
]
