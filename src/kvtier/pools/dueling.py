"""``dueling``: run several eviction policies side by side and follow the one that hits most.

No single policy wins everywhere (``benchmarks/replay.py``): frequency (``prefix_gdsf``) wins
where shared prompts recur at random, the reuse-interval estimate (``prefix_reuse``) where
conversations return after more traffic than the tier holds, ``arc`` in between, and each falls
below LRU somewhere. This policy keeps every expert's order over the pool's blocks at once and
evicts the block the current *lead* chooses (the others forget it as evicted, see
``EvictionPolicy.evict``). To know which expert would do best here, each expert also runs alone
in a *shadow*: a ``BlockPool`` of the same size that holds keys only and sees the same
releases. A
shadow counts the prefix hits its expert would have had; the counts decay by ``DECAY`` per
release (a memory of about a thousand requests), and the lead changes when another expert's
count beats it by more than ``Z`` standard deviations of Poisson noise (``Z x sqrt(sum)``), so
that a few lucky hits in a cold or tiny tier do not flip it back and forth.

A release is taken as one request's chain, tail first (the pool's and vLLM's order). Where a
release holds something else (the connector's host tier sees store batches) a shadow's prefix
hits are an estimate; the real pool's hits are unaffected. Cost: every hook runs in each
expert and each shadow, about ``2 x len(EXPERTS)`` times one policy's work per block.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvtier.pools.block_pool import BlockPool
from kvtier.pools.eviction import EvictionPolicy, make_eviction_policy, register_policy
from kvtier.tiers import BlockKey, Tier

__all__ = ["DuelingEviction"]


class _Shadow:
    """One expert alone in a pool of ``num_blocks`` keys (no data): its prefix hits. A real
    ``BlockPool``, served as the replay serves its device tier."""

    def __init__(self, name: str, num_blocks: int) -> None:
        self.pool = BlockPool(Tier.G1, num_blocks, eviction=name)

    def request(self, chain: Sequence[BlockKey], priorities: Sequence[int]) -> int:
        """Serve ``chain`` (head first): match its prefix, register the rest that fits,
        release tail first. Returns the prefix hits."""
        pool = self.pool
        held = pool.match(chain)
        hits = len(held)
        room = min(len(chain) - hits, pool.num_free + pool.num_inactive)
        if room:
            fresh = pool.allocate(room)
            pool.complete(fresh)
            held += pool.register(fresh, chain[hits:hits + room],
                                  parent=chain[hits - 1] if hits else None,
                                  priority=priorities[hits:hits + room])
        held.reverse()
        pool.release(held)
        return hits


@register_policy
class DuelingEviction(EvictionPolicy):
    """Evict as the expert whose shadow cache hits most lately (module doc)."""

    name = "dueling"
    # Hits on active blocks too: an expert that counts them (arc's clock) hears them; the
    # others hear only hits on inactive blocks, as the pool would tell them alone.
    hits_while_active = True
    EXPERTS = ("lru", "arc", "prefix_gdsf", "prefix_reuse")
    DECAY = 0.999  # per release
    Z = 2.0        # lead changes need a lead this many standard deviations of noise wide

    def __init__(self, num_blocks: int) -> None:
        super().__init__(num_blocks)
        self._experts = [make_eviction_policy(name, num_blocks) for name in self.EXPERTS]
        self._shadows = [_Shadow(name, num_blocks) for name in self.EXPERTS]
        self._hits = [0.0] * len(self.EXPERTS)
        self._lead = 0
        self._active_hits = [expert for expert in self._experts if expert.hits_while_active]
        self._inactive = bytearray(num_blocks)  # 1 while the block is in the eviction order

    @property
    def lead(self) -> str:
        """The expert whose order evicts now."""
        return self.EXPERTS[self._lead]

    def on_insert(self, block_id: int, key: BlockKey, priority: int) -> None:
        self.on_insert_batch((block_id,), {block_id: key}, {block_id: priority})

    def on_insert_batch(self, block_ids: Sequence[int], key_of: Sequence[BlockKey],
                        priority_of: Sequence[int]) -> None:
        chain = [key_of[b] for b in reversed(block_ids)]
        priorities = [priority_of[b] for b in reversed(block_ids)]
        hits, decay = self._hits, self.DECAY
        for i, shadow in enumerate(self._shadows):
            hits[i] = hits[i] * decay + shadow.request(chain, priorities)
        self._lead = self.choose_lead(hits, self._lead)
        inactive = self._inactive
        for block_id in block_ids:
            inactive[block_id] = 1
        for expert in self._experts:
            expert.on_insert_batch(block_ids, key_of, priority_of)

    @classmethod
    def choose_lead(cls, hits: Sequence[float], lead: int) -> int:
        """The expert with the most (decayed) shadow hits, if it beats ``lead`` by more than
        ``Z`` standard deviations of Poisson noise; else ``lead``."""
        best = max(range(len(hits)), key=hits.__getitem__)
        if hits[best] - hits[lead] > cls.Z * (hits[best] + hits[lead]) ** 0.5:
            return best
        return lead

    def on_remove(self, block_id: int) -> None:
        self._inactive[block_id] = 0
        for expert in self._experts:
            expert.on_remove(block_id)

    def on_hit(self, block_id: int, key: BlockKey) -> None:
        for expert in self._experts if self._inactive[block_id] else self._active_hits:
            expert.on_hit(block_id, key)

    def on_link(self, block_id: int, parent_id: int) -> None:
        for expert in self._experts:
            expert.on_link(block_id, parent_id)

    def on_unlink(self, block_id: int) -> None:
        for expert in self._experts:
            expert.on_unlink(block_id)

    def victim(self) -> int | None:
        block_id = self._experts[self._lead].victim()
        if block_id is not None:
            self._inactive[block_id] = 0
            for i, expert in enumerate(self._experts):
                if i != self._lead:
                    expert.evict(block_id)
        return block_id

    def evict(self, block_id: int) -> None:
        self._inactive[block_id] = 0
        for expert in self._experts:
            expert.evict(block_id)

    def __len__(self) -> int:
        return len(self._experts[self._lead])
