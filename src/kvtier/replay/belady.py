"""Belady's offline optimum for a prefix cache: the bound every online policy is measured by.

At each step the cache keeps the blocks whose next use is nearest and drops (or never admits)
the block whose next use is farthest. With bypass allowed, this maximises the number of cached
block accesses for a given capacity. Two details make it exact for *prefix* hits:

* ties on the next use are broken by evicting the deeper block first. A block's parent is used
  whenever the block is (chained ids), so its next use is never later; with the tie rule the
  cache stays prefix-closed (no cached block without its parent) and every cached block a
  request touches is a prefix hit;
* a block with no next use is dropped at once.

Two bounds come out of one replay loop (``prefix``):

* ``prefix=True`` (``belady``): the cache above, hits counted as a prefix cache serves them
  (a request's leading cached blocks, stopping at its first miss). Loaded traces are chained
  (the loader checks it), and then this cache is prefix-closed, so it is the optimum of the
  prefix problem: no policy, online or offline, gets more prefix hits at that capacity;
* ``prefix=False`` (``belady_blocks``): textbook Belady on single blocks, every access to a
  cached block counted as a hit wherever it sits in its request, ties broken by key. It bounds
  any cache's prefix hits from above on every trace, chained or not; on chained traces it
  equals the prefix bound (a prefix-closed optimum exists), on traces whose ids are not chained
  (the same block after different prefixes) it is looser, because it counts blocks behind a
  miss.

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
            # Full blocks only, as the replay caches them (``TraceRequest.cacheable_ids``).
            for block in request.cacheable_ids(trace.block_tokens):
                ids.append(dense.setdefault(block, len(dense)))
            offsets.append(len(ids))
        self._ids = ids
        self._offsets = offsets
        self._num_keys = max(1, len(dense))
        self._max_depth = trace.longest_cacheable + 1
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

    def replay(self, capacity_blocks: int, progress: Callable[[int], None] | None = None, *,
               prefix: bool = True) -> HitStats:
        """Hit counts of the optimal cache with ``capacity_blocks`` blocks: prefix hits
        (``prefix``, the default) or single-block hits (see the module doc)."""
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
            if prefix:
                for pos in range(start, end):
                    if not cached[ids[pos]]:
                        break
                    hits += 1
            else:
                for pos in range(start, end):
                    if cached[ids[pos]]:
                        hits += 1
            depth_of = 1 if prefix else 0
            stats.add(len(request.hash_ids), hits, request.input_length, block_tokens)
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
                value = ((nxt * max_depth + (pos - start) * depth_of) * num_keys + key) + 1
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


def belady_stats(trace: Trace, capacity_blocks: int, *, prefix: bool = True) -> HitStats:
    """One-shot helper: Belady's prefix (or single-block) hits for ``trace`` at
    ``capacity_blocks``."""
    return BeladyOracle(trace).replay(capacity_blocks, prefix=prefix)
