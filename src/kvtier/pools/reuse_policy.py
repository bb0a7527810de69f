"""``prefix_reuse``: evict the block whose next use is predicted farthest (Belady, estimated).

Belady evicts the block used farthest in the future. A multi-turn conversation re-sends its
whole history at its next turn, so its blocks come back after about the same interval as last
time; the policy predicts a block's next use as ``last use + reuse interval`` and evicts the
latest prediction first. A block's interval is the one it showed the last time it came back
(averaged with the one before); blocks a request computes for the first time take the
interval of the deepest block of the same request that had been seen before (the
conversation's own history, not the shared system prompt above it). A request with no block
seen before predicts nothing: its blocks are overdue at once (below), so one-time prompts go
first and a new conversation is learned at its second turn. Time is counted in releases.

Two ways a prediction is wrong, and what the policy does about them:

* *Overdue*: a block not back by ``last + DEAD_FACTOR x interval`` is taken for dead (its
  conversation ended) and goes before every block still expected, oldest deadline first. With
  no history every block is overdue at once, which makes a cold cache plain LRU.
* *Evicted, then needed*: a key that comes back after its block was evicted keeps its last use
  in a bounded history (``HISTORY_FACTOR`` x the pool, as ``arc``'s ghosts), so its interval is
  still learned.

Where it wins: periodic reuse longer than the cache (users taking turns, as in multi-round QA),
where LRU evicts every conversation just before it returns and this policy keeps a stable subset
(it degrades to MRU among equals, which is optimal for cycles). Where it loses: memoryless
reuse (Poisson arrivals of shared prompts, as in the Azure-derived sessions), where an interval
seen once predicts little and frequency (``prefix_gdsf``) does better. It is therefore an option,
not the default; ``benchmarks/replay.py`` reports it on every trace.

Order: lowest priority first, then overdue blocks (earliest deadline), then the farthest
predicted use, deeper blocks first on ties (a chain is cut from its tail). Two heaps with lazy
deletion; every hook is O(log n).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Sequence

from kvtier.pools.eviction import EvictionPolicy, register_policy
from kvtier.tiers import BlockKey

__all__ = ["PrefixReuseEviction"]


@register_policy
class PrefixReuseEviction(EvictionPolicy):
    """Evict the latest predicted next use first; overdue blocks before all (module doc)."""

    name = "prefix_reuse"
    hits_while_active = False  # a match is seen as remove + insert of the same key
    DEAD_FACTOR = 2.0
    HISTORY_FACTOR = 8
    MAX_HISTORY = 1_000_000

    def __init__(self, num_blocks: int) -> None:
        super().__init__(num_blocks)
        self._keys: list[BlockKey | None] = [None] * num_blocks
        self._last = [0] * num_blocks
        self._interval = [0.0] * num_blocks
        self._depth = [0] * num_blocks
        self._priority = [0] * num_blocks
        self._live = [0] * num_blocks  # sequence number of the block's live entries, 0: none
        self._by_next_use: list[tuple] = []  # (priority, -next use, -depth, seq, block)
        self._by_deadline: list[tuple] = []  # (priority, deadline, seq, block)
        self._seq = 0
        self._size = 0
        self._now = 0
        # Evicted key -> (last use, interval); the interval only for ``adopt``.
        self._history: OrderedDict[BlockKey, tuple[int, float]] = OrderedDict()
        self._history_max = max(num_blocks, min(self.HISTORY_FACTOR * num_blocks,
                                                self.MAX_HISTORY))

    # -- EvictionPolicy hooks -----------------------------------------------------------------
    def on_link(self, block_id: int, parent_id: int) -> None:
        self._depth[block_id] = self._depth[parent_id] + 1 if parent_id >= 0 else 0

    def on_unlink(self, block_id: int) -> None:
        self._keys[block_id] = None

    def on_insert(self, block_id: int, key: BlockKey, priority: int) -> None:
        # A release of one block (the host and disk tiers' every release): on_insert_batch
        # without building the batch, a fifth of this policy's time there.
        self._now += 1
        interval = self._observed(block_id, key)
        self._learn(block_id, key, priority, interval, 0.0 if interval is None else interval)

    def on_insert_batch(self, block_ids: Sequence[int], key_of: Sequence[BlockKey],
                        priority_of: Sequence[int]) -> None:
        """One release is one step of the clock; the blocks' intervals are learned together,
        so that new blocks can take their request's interval."""
        self._now += 1
        depth, observed = self._depth, self._observed
        seen: list[int | None] = []  # each block's observed interval, None: first sighting
        request_interval, deepest = None, -1
        for block_id in block_ids:
            interval = observed(block_id, key_of[block_id])
            seen.append(interval)
            if interval is not None and depth[block_id] > deepest:
                deepest, request_interval = depth[block_id], interval
        if request_interval is None:
            request_interval = 0.0  # nothing seen before: overdue at once
        learn = self._learn
        for block_id, interval in zip(block_ids, seen):
            learn(block_id, key_of[block_id], priority_of[block_id], interval, request_interval)

    def _observed(self, block_id: int, key: BlockKey) -> int | None:
        """The interval ``key`` shows by coming back now in ``block_id``; None: first sighting."""
        if self._keys[block_id] == key:  # came back from a match: a hit
            return self._now - self._last[block_id]
        self._interval[block_id] = 0.0  # a new block, or a key back from the history
        previous = self._history.pop(key, None)
        return None if previous is None else self._now - previous[0]

    def _learn(self, block_id: int, key: BlockKey, priority: int, interval: int | None,
               request_interval: float) -> None:
        """Insert a released block, its interval updated by what it showed (``_observed``);
        a block seen for the first time takes its request's."""
        self._keys[block_id] = key
        self._priority[block_id] = priority
        intervals = self._interval
        if interval is None:
            intervals[block_id] = request_interval
        elif intervals[block_id]:
            intervals[block_id] = 0.5 * (intervals[block_id] + interval)
        else:
            intervals[block_id] = interval
        self._last[block_id] = self._now
        self._size += 1
        self._push(block_id)

    def on_remove(self, block_id: int) -> None:
        if self._live[block_id]:
            self._live[block_id] = 0
            self._size -= 1

    def on_hit(self, block_id: int, key: BlockKey) -> None:
        if self._live[block_id]:  # touch of an evictable block: a use now
            interval = self._now - self._last[block_id]
            if interval:
                self._interval[block_id] = 0.5 * (self._interval[block_id] + interval)
                self._last[block_id] = self._now
                self._push(block_id)

    def victim(self) -> int | None:
        expected = self._top(self._by_next_use)
        if expected is None:
            return None
        overdue = self._top(self._by_deadline)
        # Both heaps hold the same blocks, so their tops share the lowest priority.
        block_id = overdue[-1] if overdue is not None and overdue[1] < self._now else expected[-1]
        self.evict(block_id)
        return block_id

    def evict(self, block_id: int) -> None:
        if self._live[block_id]:
            self._live[block_id] = 0  # its heap entries are garbage now
            self._size -= 1
        key = self._keys[block_id]
        self._keys[block_id] = None
        if key is not None:
            history = self._history
            history[key] = (self._last[block_id], self._interval[block_id])
            if len(history) > self._history_max:
                history.popitem(last=False)

    def adopt(self, source: EvictionPolicy,
              blocks: Sequence[tuple[int, BlockKey, int, int]]) -> None:
        """Copy ``source``'s clock and history; a block ``source`` holds keeps its last use,
        interval and depth (and the order of its last push among equals), one it evicted takes
        them from its history, one it never saw is new now: overdue at the next release."""
        if not isinstance(source, PrefixReuseEviction):
            super().adopt(source, blocks)
            return
        self._now = source._now
        history = self._history = OrderedDict(source._history)
        live = source._live
        for block_id, key, priority, theirs in sorted(
                blocks, key=lambda block: live[block[3]] if block[3] >= 0 else 0):  # stable
            self._keys[block_id] = key
            self._priority[block_id] = priority
            if theirs >= 0 and live[theirs]:
                last, interval = source._last[theirs], source._interval[theirs]
                # Its depth as linked then: a parent evicted since is no longer in the links.
                self._depth[block_id] = source._depth[theirs]
            else:
                last, interval = history.pop(key, (self._now, 0.0))
            self._last[block_id], self._interval[block_id] = last, interval
            self._size += 1
            self._push(block_id)

    def __len__(self) -> int:
        return self._size

    # -- internals ------------------------------------------------------------------------------
    def _push(self, block_id: int) -> None:
        self._seq += 1
        seq = self._seq
        self._live[block_id] = seq
        priority, last = self._priority[block_id], self._last[block_id]
        interval = self._interval[block_id]
        heapq.heappush(self._by_next_use,
                       (priority, -(last + interval), -self._depth[block_id], seq, block_id))
        heapq.heappush(self._by_deadline,
                       (priority, last + self.DEAD_FACTOR * interval, seq, block_id))
        if len(self._by_next_use) > 4 * self._size + 64:
            self._compact()

    def _compact(self) -> None:
        live = self._live
        self._by_next_use = [e for e in self._by_next_use if live[e[-1]] == e[-2]]
        self._by_deadline = [e for e in self._by_deadline if live[e[-1]] == e[-2]]
        heapq.heapify(self._by_next_use)
        heapq.heapify(self._by_deadline)

    def _top(self, heap: list[tuple]) -> tuple | None:
        live = self._live
        while heap:
            entry = heap[0]
            if live[entry[-1]] == entry[-2]:
                return entry
            heapq.heappop(heap)
        return None
