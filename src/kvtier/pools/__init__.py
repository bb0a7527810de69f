"""Per-tier block pools: states, key registry, free list and pluggable eviction. No I/O."""

from kvtier.pools.block_pool import MAX_PRIORITY, BlockPool, BlockState
from kvtier.pools.eviction import (
    EvictionPolicy,
    FifoEviction,
    LruEviction,
    eviction_policy_names,
    make_eviction_policy,
    register_policy,
)

__all__ = [
    "MAX_PRIORITY",
    "BlockPool",
    "BlockState",
    "EvictionPolicy",
    "FifoEviction",
    "LruEviction",
    "eviction_policy_names",
    "make_eviction_policy",
    "register_policy",
]
