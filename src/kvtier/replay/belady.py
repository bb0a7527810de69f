"""Belady's offline optimum for a prefix cache: the bound every online policy is measured by.

At each step the cache keeps the blocks whose next use is nearest and drops (or never admits)
the block whose next use is farthest. With bypass allowed, this maximises the number of cached
block accesses for a given capacity. Two details make it exact for *prefix* hits:

* ties on the next use are broken by evicting the deeper block first. A block's parent is used
  whenever the block is (chained ids), so its next use is never later; with the tie rule the
  cache stays prefix-closed (no cached block without its parent) and every cached block a
  request touches is a prefix hit;
* a block with no next use is dropped at once.

The next use of every access is precomputed in one backward pass; the replay keeps one max-heap
of encoded ints ``(next_use, depth, key)`` with lazy deletion: O(log n) per access and no
per-access Python objects besides the heap's ints.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from kvtier.replay.stats import HitStats
from kvtier.replay.trace import Trace


class BeladyOracle:
    """Precomputes next-use indices for a trace; :meth:`replay` runs one capacity."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        dense: dict[int, int] = {}
        ids: list[int] = []
        offsets = [0]
        for request in trace.requests:
            for block in request.hash_ids:
                ids.append(dense.setdefault(block, len(dense)))
            offsets.append(len(ids))
        self._ids = ids
        self._offsets = offsets
        self._num_keys = max(1, len(dense))
        self._max_depth = max((len(r.hash_ids) for r in trace.requests), default=0) + 1
        never = len(trace.requests)  # "no next use"
        next_use = [never] * len(ids)
        last_seen = [never] * self._num_keys
        for req_idx in range(len(trace.requests) - 1, -1, -1):
            for pos in range(offsets[req_idx], offsets[req_idx + 1]):
                key = ids[pos]
                next_use[pos] = last_seen[key]
                last_seen[key] = req_idx
        self._next_use = next_use
        self._never = never

    @property
    def num_unique_blocks(self) -> int:
        return self._num_keys

    def replay(self, capacity_blocks: int,
               progress: Callable[[int], None] | None = None) -> HitStats:
        """Prefix-hit counts of the optimal cache with ``capacity_blocks`` blocks."""
        trace = self.trace
        ids, offsets, next_use = self._ids, self._offsets, self._next_use
        never, num_keys, max_depth = self._never, self._num_keys, self._max_depth
        block_tokens = trace.block_tokens
        cached = [0] * num_keys  # the key's live heap value, 0 when not cached
        heap: list[int] = []
        size = 0
        stats = HitStats()
        push, pop = heapq.heappush, heapq.heappop
        for req_idx, request in enumerate(trace.requests):
            start, end = offsets[req_idx], offsets[req_idx + 1]
            hits = 0
            for pos in range(start, end):
                if not cached[ids[pos]]:
                    break
                hits += 1
            stats.add(end - start, hits, request.input_length, block_tokens)
            for pos in range(start, end):
                key = ids[pos]
                nxt = next_use[pos]
                if nxt == never:
                    if cached[key]:
                        cached[key] = 0
                        size -= 1
                    continue
                if not cached[key]:
                    size += 1
                # +1 keeps the value non-zero (0 means "not cached").
                value = ((nxt * max_depth + (pos - start)) * num_keys + key) + 1
                cached[key] = value
                push(heap, -value)
            while size > capacity_blocks:
                value = -pop(heap)
                key = (value - 1) % num_keys
                if cached[key] == value:
                    cached[key] = 0
                    size -= 1
            if progress is not None:
                progress(1)
        return stats


def belady_stats(trace: Trace, capacity_blocks: int) -> HitStats:
    """One-shot helper: Belady's prefix hits for ``trace`` at ``capacity_blocks``."""
    return BeladyOracle(trace).replay(capacity_blocks)
