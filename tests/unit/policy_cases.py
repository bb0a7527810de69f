"""Helpers shared by the eviction policy tests: small traces, their hits, eviction order."""

from __future__ import annotations

from kvtier.pools import BlockPool
from kvtier.replay.simulator import CostModel, TierSpec, replay
from kvtier.replay.trace import Trace, TraceRequest
from kvtier.tiers import Tier


def make_trace(chains: list[list[int]], block_tokens: int = 4) -> Trace:
    """One request per chain of block ids, in order."""
    requests = tuple(TraceRequest(float(i), len(ids) * block_tokens, 1, tuple(ids))
                     for i, ids in enumerate(chains))
    return Trace(requests, block_tokens, "test")


def hits(trace: Trace, policy: str, capacity: int) -> int:
    """Block hits of ``trace`` replayed through one tier of ``capacity`` blocks."""
    result = replay(trace, [TierSpec(Tier.G1, capacity, eviction=policy)],
                    cost=CostModel(bytes_per_token=1))
    return result.total.blocks_hit


def order_of_one_time_blocks(policy: str, keys=(b"a", b"b", b"c", b"d")) -> list[bytes]:
    """The order in which ``policy`` evicts blocks released once each, in ``keys`` order."""
    pool = BlockPool(Tier.G2, len(keys), eviction=policy)
    for key in keys:
        ids = pool.allocate(1)
        pool.complete(ids)
        pool.release(pool.register(ids, [key]))
    order: list[bytes] = []
    for _ in keys:
        before = [k for k in keys if k in pool]
        pool.allocate(1)
        order += [k for k in before if k not in pool]
    return order
