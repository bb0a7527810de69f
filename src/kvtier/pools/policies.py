"""Eviction policies beyond LRU: ``lru_freq``, ``s3fifo``, ``arc``, ``tinylfu`` and the
prefix-aware ``prefix_lru`` and ``prefix_gdsf``.

All of them plug into :class:`~kvtier.pools.block_pool.BlockPool` through the
:class:`~kvtier.pools.eviction.EvictionPolicy` hooks and register by name, so a tier's config
selects them (``host_eviction_policy = "arc"``). Importing this module registers them.

How the pool's hooks map onto the textbook algorithms
-----------------------------------------------------
A prefix-cache pool hands a block to the policy when its last reference drops (``on_insert``)
and takes it back when a request matches it (``on_remove`` then ``on_hit``). A hit therefore
arrives as remove + re-insert of a block whose key the policy already knows; each policy keeps
the key of every block it holds and treats such a re-insert as the hit (ARC: move to T2;
S3-FIFO: count it; W-TinyLFU: promote). ``touch`` reports a hit on a block that stays
evictable (``on_hit`` on a block still in the lists). Ghost histories hold keys only.

A request released tail-first (as vLLM and the replay do) enters every list deepest block
first, so among blocks of equal standing a chain's tail goes before its head (a prefix cache
can only hit a block whose parent hits).

Priorities: every list-based policy here orders the blocks of its *main* priority with its own
algorithm: the priority of the first block it is given (the pool's default 0 in a bare pool;
100 in the connector's host and disk tiers, where requests of vLLM's default scheduling
priority are kept at the maximum retention priority). Blocks of other priorities are kept out
of it, in :class:`~kvtier.pools.eviction.LruEviction` (KVBM's order: lowest priority first,
least recently used first): those below the main priority are evicted before, those above
after every main-priority block. (Until this rule, a policy ordered priority-0 blocks only, so
in the connector's tiers every block went to the LRU side store and ``arc``, ``s3fifo``,
``lru_freq`` and ``tinylfu`` behaved as LRU there.) The prefix-aware policies order by
priority first, then by their own rule, in one heap.

Prefix-aware policies (``prefix_*``) learn each block's parent through ``on_link`` and evict
leaves of the prefix tree first. Replays of the Mooncake, Azure-derived and synthetic traces
(benchmarks/replay.py) show why the others rarely need it: a request released tail first
already puts its chain in leaf-first order, and they strand almost no blocks; the rule matters
when blocks are released in other orders or shared prefixes are hit alone.

Hot paths use per-block lists allocated once and intrusive doubly linked lists over block ids
(:class:`_Lists`); ghost histories are bounded ``OrderedDict`` of keys.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Sequence

from kvtier.offload.admission import FrequencyFilter
from kvtier.offload.tinylfu import FrequencySketch
from kvtier.pools.eviction import EvictionPolicy, LruEviction, register_policy
from kvtier.tiers import BlockKey

__all__ = [
    "ArcEviction",
    "LruFreqEviction",
    "PrefixGdsfEviction",
    "PrefixLruEviction",
    "S3FifoEviction",
    "TinyLfuEviction",
]

_NONE = -1
_MASK64 = (1 << 64) - 1  # low half of ARC's packed ghost entries


class _Lists:
    """Several doubly linked lists over block ids ``0..n-1`` sharing prev/next arrays.

    List ``j``'s sentinel is index ``n + j``. The front is the most recently inserted end, the
    back the next to go. ``owner[b]`` is the list holding ``b`` (or -1).
    """

    __slots__ = ("_base", "next", "owner", "prev", "sizes")

    def __init__(self, num_blocks: int, num_lists: int) -> None:
        size = num_blocks + num_lists
        self.prev = list(range(size))
        self.next = list(range(size))
        self.owner = [_NONE] * num_blocks
        self.sizes = [0] * num_lists
        self._base = num_blocks

    def push_front(self, lst: int, block: int) -> None:
        head = self._base + lst
        after = self.next[head]
        self.prev[block] = head
        self.next[block] = after
        self.prev[after] = block
        self.next[head] = block
        self.owner[block] = lst
        self.sizes[lst] += 1

    def push_back(self, lst: int, block: int) -> None:
        head = self._base + lst
        before = self.prev[head]
        self.next[block] = head
        self.prev[block] = before
        self.next[before] = block
        self.prev[head] = block
        self.owner[block] = lst
        self.sizes[lst] += 1

    def unlink(self, block: int) -> int:
        """Take ``block`` out of its list; return that list, or -1 if it was in none."""
        lst = self.owner[block]
        if lst == _NONE:
            return _NONE
        before, after = self.prev[block], self.next[block]
        self.next[before] = after
        self.prev[after] = before
        self.owner[block] = _NONE
        self.sizes[lst] -= 1
        return lst

    def move_to_front(self, lst: int, block: int) -> None:
        self.unlink(block)
        self.push_front(lst, block)

    def back(self, lst: int) -> int:
        block = self.prev[self._base + lst]
        return _NONE if block >= self._base else block

    def total(self) -> int:
        return sum(self.sizes)

    def oldest_first(self, lst: int) -> list[int]:
        """List ``lst``'s blocks from the back (the next to go) to the front."""
        out, sentinel, prev = [], self._base + lst, self.prev
        block = prev[sentinel]
        while block != sentinel:
            out.append(block)
            block = prev[block]
        return out


class _ListPolicy(EvictionPolicy):
    """Shared plumbing: per-block key memory, intrusive lists, and the priority side store.

    Subclasses implement ``_insert(block_id, key, is_hit)`` (``_was_in[block_id]`` tells where
    a hit block was), ``_touch(block_id, key)`` (a hit on a block that stays evictable) and
    ``_victim()``; subclasses that count hits override ``on_hit`` and call ``super()``.
    """

    def __init__(self, num_blocks: int, num_lists: int) -> None:
        super().__init__(num_blocks)
        self._lists = _Lists(num_blocks, num_lists)
        # Key of each block the policy knows (held, or taken back by a match), else None.
        self._keys: list[BlockKey | None] = [None] * num_blocks
        # The list a block was in when a match took it out, so its hit can be placed.
        self._was_in = [_NONE] * num_blocks
        self._prioritized = LruEviction(num_blocks)
        self._main_priority: int | None = None  # set by the first insert (see the module doc)

    # -- EvictionPolicy hooks -----------------------------------------------------------------
    def on_insert(self, block_id: int, key: BlockKey, priority: int) -> None:
        if self._main_priority is None:
            self._main_priority = priority
        if priority != self._main_priority:
            self._keys[block_id] = None
            self._prioritized.on_insert(block_id, key, priority)
            return
        known = self._keys[block_id]
        # A block the pool took back (match) and returns under the same key: that was a hit.
        is_hit = known is not None and known == key
        self._keys[block_id] = key
        self._insert(block_id, key, is_hit)

    def on_remove(self, block_id: int) -> None:
        # Keep the key: a match hands the block back soon; a discard leaves a stale key that
        # the next on_insert of this block overwrites.
        lst = self._lists.unlink(block_id)
        if lst == _NONE:
            self._prioritized.on_remove(block_id)
        else:
            self._was_in[block_id] = lst

    def on_hit(self, block_id: int, key: BlockKey) -> None:
        if self._lists.owner[block_id] != _NONE:
            self._touch(block_id, key)
        else:
            self._prioritized.on_hit(block_id, key)  # no-op unless it holds the block

    def victim(self) -> int | None:
        side = self._prioritized
        lowest = side.lowest_priority()
        if self._lists.total() and (lowest is None or lowest > self._main_priority):
            block_id = self._victim()
            self._keys[block_id] = None
            return block_id
        return side.victim()

    def __len__(self) -> int:
        return self._lists.total() + len(self._prioritized)

    # -- for subclasses -----------------------------------------------------------------------
    def _insert(self, block_id: int, key: BlockKey, is_hit: bool) -> None:
        raise NotImplementedError

    def _touch(self, block_id: int, key: BlockKey) -> None:
        raise NotImplementedError

    def _victim(self) -> int:
        """Unlink and return a block; called only when the lists hold one."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
@register_policy
class LruFreqEviction(_ListPolicy):
    """LRU with KVBM's frequency filter as admission ("SSD lifespan protection").

    Every new block is an offer to :class:`~kvtier.offload.admission.FrequencyFilter` (counter
    starts at 1, doubles per re-offer, admitted from 2). An admitted block enters at the
    most-recent end; a rejected one at the least-recent end, so it is the next to go and
    occupies space only until the pool needs a block. Hits move blocks to the most-recent end.
    The filter decays by a clock (KVBM: one step per 600 s); :meth:`set_clock` lets a replay
    use trace time.
    """

    name = "lru_freq"

    def __init__(self, num_blocks: int, *, admission: FrequencyFilter | None = None) -> None:
        super().__init__(num_blocks, 1)
        self._admission = admission if admission is not None else FrequencyFilter()

    def set_clock(self, clock: Callable[[], float]) -> None:
        """Use ``clock`` (seconds) for the filter's decay; call before the first insert."""
        filt = self._admission
        self._admission = FrequencyFilter(min_count=filt.min_count,
                                          decay_seconds=filt.decay_seconds,
                                          max_entries=filt.max_entries, clock=clock)

    def _insert(self, block_id: int, key: BlockKey, is_hit: bool) -> None:
        if is_hit or self._admission.admit(key):
            self._lists.push_front(0, block_id)
        else:
            self._lists.push_back(0, block_id)

    def _touch(self, block_id: int, key: BlockKey) -> None:
        self._lists.move_to_front(0, block_id)

    def _victim(self) -> int:
        block_id = self._lists.back(0)
        self._lists.unlink(block_id)
        return block_id


# ---------------------------------------------------------------------------------------------
_SMALL, _MAIN = 0, 1


@register_policy
class S3FifoEviction(_ListPolicy):
    """S3-FIFO (Yang et al., SOSP 2023): a small probationary FIFO, a main FIFO and a ghost.

    New blocks enter the small queue (10 % of the pool) unless their key is in the ghost, then
    they enter main. Hits only count (up to 3). The small queue's oldest block moves to main if
    it was hit, else it is evicted and its key remembered in the ghost (as many keys as main
    holds). Main's oldest block is re-inserted with one count less while it has counts, else
    evicted. One-hit wonders (a long prompt sent once) leave quickly without flushing main.
    """

    name = "s3fifo"
    SMALL_FRACTION = 0.1
    MAX_FREQ = 3

    def __init__(self, num_blocks: int) -> None:
        super().__init__(num_blocks, 2)
        self._freq = [0] * num_blocks
        self._small_target = max(1, int(num_blocks * self.SMALL_FRACTION))
        self._ghost: OrderedDict[BlockKey, None] = OrderedDict()
        self._ghost_max = max(1, num_blocks - self._small_target)

    def on_hit(self, block_id: int, key: BlockKey) -> None:
        if self._freq[block_id] < self.MAX_FREQ:
            self._freq[block_id] += 1

    def _insert(self, block_id: int, key: BlockKey, is_hit: bool) -> None:
        if is_hit:
            # on_hit counted it; the match took it out of its queue, so it re-enters one. A
            # block hit while in probation has earned main (where it would move at the tail).
            self._lists.push_front(_MAIN, block_id)
            return
        self._freq[block_id] = 0
        ghost = self._ghost
        if key in ghost:
            del ghost[key]
            self._lists.push_front(_MAIN, block_id)
        else:
            self._lists.push_front(_SMALL, block_id)

    def _touch(self, block_id: int, key: BlockKey) -> None:
        pass  # lazy promotion: on_hit counted it, the position stays

    def _victim(self) -> int:
        lists, freq = self._lists, self._freq
        while True:
            small = lists.sizes[_SMALL]
            if small and (small >= self._small_target or not lists.sizes[_MAIN]):
                block_id = lists.back(_SMALL)
                lists.unlink(block_id)
                if freq[block_id]:
                    freq[block_id] = 0
                    lists.push_front(_MAIN, block_id)
                    continue
                self._to_ghost(block_id)
                return block_id
            block_id = lists.back(_MAIN)
            lists.unlink(block_id)
            if freq[block_id]:
                freq[block_id] -= 1
                lists.push_front(_MAIN, block_id)
                continue
            return block_id

    def evict(self, block_id: int) -> None:
        # A probationary block another policy evicted is remembered as this policy's own.
        if self._lists.owner[block_id] == _SMALL:
            self._lists.unlink(block_id)
            self._to_ghost(block_id)
            self._keys[block_id] = None
            return
        super().evict(block_id)

    def _to_ghost(self, block_id: int) -> None:
        ghost = self._ghost
        ghost[self._keys[block_id]] = None
        if len(ghost) > self._ghost_max:
            ghost.popitem(last=False)


# ---------------------------------------------------------------------------------------------
_T1, _T2 = 0, 1


@register_policy
class ArcEviction(_ListPolicy):
    """ARC (Megiddo and Modha, FAST 2003) with a long first-use history for prefix caches.

    T1 holds blocks used once, T2 blocks used again; ghosts B1/B2 remember keys evicted from
    each, and the target size ``p`` of T1 adapts: a ghost hit in B1 says T1 was too small, one
    in B2 that T2 was. As in ZFS's ARC, ``p`` starts at half the pool. Each ghost hit moves
    ``p`` by one block (ARC scales the step by the ghost lists' size ratio): a prefix request
    brings its ghost hits in bursts of a whole chain, and the scaled step made ``p`` swing from
    one end to the other within a request.

    Extension: B1 keeps a longer history (``HISTORY_FACTOR`` x the pool, at most
    ``MAX_HISTORY`` keys), because a KV block weighs megabytes and its key a few bytes, and
    conversation turns come back after far more traffic than a small tier holds. Only ghost
    hits within ARC's own B1 bound adapt ``p`` (they are the ones a bigger T1 would have hit).
    An older ghost hit proves reuse but not that it will come back in time: the block enters
    T2 only if its reuse interval is no longer than T2 currently keeps blocks (the age of the
    last block T2 gave up, in accesses), otherwise T1, as LIRS admits to its protected set.
    """

    name = "arc"
    HISTORY_FACTOR = 8
    MAX_HISTORY = 1_000_000

    def __init__(self, num_blocks: int) -> None:
        super().__init__(num_blocks, 2)
        self._p = num_blocks / 2
        # B1: key -> (T1 eviction number << 64) | clock of the block's last access.
        self._b1: OrderedDict[BlockKey, int] = OrderedDict()
        self._b2: OrderedDict[BlockKey, None] = OrderedDict()
        self._b1_max = max(num_blocks, min(self.HISTORY_FACTOR * num_blocks, self.MAX_HISTORY))
        self._t1_evictions = 0
        self._clock = 0  # counts accesses (inserts and hits)
        self._last_access = [0] * num_blocks
        self._t2_horizon = -1  # accesses T2 keeps an unused block; -1 until T2 evicts

    def on_hit(self, block_id: int, key: BlockKey) -> None:
        self._clock += 1
        self._last_access[block_id] = self._clock
        super().on_hit(block_id, key)

    def _touch(self, block_id: int, key: BlockKey) -> None:
        self._lists.move_to_front(_T2, block_id)

    def _insert(self, block_id: int, key: BlockKey, is_hit: bool) -> None:
        lists = self._lists
        if is_hit:
            lists.push_front(_T2, block_id)
            return
        self._clock += 1
        self._last_access[block_id] = self._clock
        capacity = self.num_blocks
        b1, b2 = self._b1, self._b2
        entry = b1.pop(key, None)
        if entry is not None:
            arc_b1_bound = max(1, capacity - lists.sizes[_T1])
            if self._t1_evictions - (entry >> 64) < arc_b1_bound:
                self._p = min(capacity, self._p + 1.0)
                lists.push_front(_T2, block_id)
            elif self._t2_horizon < 0 or self._clock - (entry & _MASK64) <= self._t2_horizon:
                lists.push_front(_T2, block_id)
            else:
                lists.push_front(_T1, block_id)
        elif key in b2:
            del b2[key]
            self._p = max(0.0, self._p - 1.0)
            lists.push_front(_T2, block_id)
        else:
            lists.push_front(_T1, block_id)

    def adopt(self, source: EvictionPolicy,
              blocks: Sequence[tuple[int, BlockKey, int, int]]) -> None:
        """Copy ``source``'s target ``p``, clocks and ghosts; a block ``source`` holds keeps
        its list, place and last access, one it evicted goes back to the list its ghost names,
        first (the next to go), as does one it never saw, to T1."""
        if not isinstance(source, ArcEviction):
            super().adopt(source, blocks)
            return
        self._p, self._clock = source._p, source._clock
        self._t1_evictions, self._t2_horizon = source._t1_evictions, source._t2_horizon
        b1, b2 = self._b1, self._b2 = OrderedDict(source._b1), OrderedDict(source._b2)
        main = self._main_priority = source._main_priority
        theirs_lists = source._lists
        rank = {b: i for i, b in enumerate(theirs_lists.oldest_first(_T1)
                                           + theirs_lists.oldest_first(_T2))}
        side = []
        for block_id, key, priority, theirs in sorted(blocks, key=lambda b: rank.get(b[3], -1)):
            if main is None:
                main = self._main_priority = priority
            if priority != main:
                side.append((block_id, key, priority, theirs))
                continue
            self._keys[block_id] = key
            if theirs in rank:
                self._lists.push_front(theirs_lists.owner[theirs], block_id)
                self._last_access[block_id] = source._last_access[theirs]
            elif key in b2:   # evicted from T2: it had been used again
                del b2[key]
                self._lists.push_front(_T2, block_id)
            else:
                self._last_access[block_id] = b1.pop(key, 0) & _MASK64
                self._lists.push_front(_T1, block_id)
        self._prioritized.adopt(source._prioritized, side)

    def _victim(self) -> int:
        lists = self._lists
        t1 = lists.sizes[_T1]
        if t1 and (t1 > self._p or not lists.sizes[_T2]):
            block_id = lists.back(_T1)
        else:
            block_id = lists.back(_T2)
        self._to_ghost(block_id)
        return block_id

    def evict(self, block_id: int) -> None:
        # A victim another policy chose goes to the ghost lists as this policy's own would:
        # without it a key evicted meanwhile never earns its way into T2 when it returns.
        if self._lists.owner[block_id] == _NONE:
            super().evict(block_id)
            return
        self._to_ghost(block_id)
        self._keys[block_id] = None

    def _to_ghost(self, block_id: int) -> None:
        """Unlink ``block_id`` from T1 or T2 and remember its key in B1 or B2."""
        lists = self._lists
        if lists.owner[block_id] == _T1:
            b1 = self._b1
            b1[self._keys[block_id]] = (self._t1_evictions << 64) | self._last_access[block_id]
            self._t1_evictions += 1
            if len(b1) > self._b1_max:
                b1.popitem(last=False)
        else:
            self._t2_horizon = self._clock - self._last_access[block_id]
            b2 = self._b2
            b2[self._keys[block_id]] = None
            if len(b2) > self.num_blocks:
                b2.popitem(last=False)
        lists.unlink(block_id)


# ---------------------------------------------------------------------------------------------
_WINDOW, _PROBATION, _PROTECTED, _PENDING = 0, 1, 2, 3


@register_policy
class TinyLfuEviction(_ListPolicy):
    """W-TinyLFU (Einziger et al., ACM ToS 2017), as Caffeine implements it.

    New blocks enter a small LRU window (1 % of the pool). Blocks leaving the window are
    candidates for main, a segmented LRU (probation 20 %, protected 80 %; a hit in probation
    promotes). A candidate gets in only by beating main's next victim on estimated frequency (a
    count-min sketch over recent accesses, aged by halving); a tie admits the candidate (the
    blocks of one prefix chain have equal counts, and the newer chain should win). Frequent
    blocks thus survive bursts of one-time prompts that would flush an LRU.

    Caffeine also resizes the window by hill climbing; here it stays at 1 %, which favours
    frequency: on recency-driven traffic (a working set that just fits) it trails LRU.
    """

    name = "tinylfu"
    WINDOW_FRACTION = 0.01
    PROTECTED_FRACTION = 0.8

    def __init__(self, num_blocks: int) -> None:
        super().__init__(num_blocks, 4)
        # TinyLFU's sizing: the sketch remembers about 10 accesses per cached block.
        self._sketch = FrequencySketch(4 * num_blocks, max(16, 10 * num_blocks))
        self._window_target = max(1, int(num_blocks * self.WINDOW_FRACTION))
        self._protected_target = max(1, int((num_blocks - self._window_target)
                                            * self.PROTECTED_FRACTION))

    def on_hit(self, block_id: int, key: BlockKey) -> None:
        self._sketch.increment(key)
        super().on_hit(block_id, key)

    def _touch(self, block_id: int, key: BlockKey) -> None:
        self._promote(block_id, self._lists.owner[block_id])

    def _insert(self, block_id: int, key: BlockKey, is_hit: bool) -> None:
        if is_hit:
            # The match took it out of its segment; it returns where a hit there leads.
            self._promote(block_id, self._was_in[block_id])
            return
        self._sketch.increment(key)
        self._lists.push_front(_WINDOW, block_id)

    def _promote(self, block_id: int, segment: int) -> None:
        lists = self._lists
        if segment == _WINDOW:  # window hits stay in the window (its LRU order)
            lists.move_to_front(_WINDOW, block_id)
            return
        lists.move_to_front(_PROTECTED, block_id)
        if lists.sizes[_PROTECTED] > self._protected_target:
            lists.move_to_front(_PROBATION, lists.back(_PROTECTED))

    def _victim(self) -> int:
        lists = self._lists
        keys, estimate = self._keys, self._sketch.estimate
        # The window's overflow queues up as candidates for main, oldest judged first.
        while lists.sizes[_WINDOW] > self._window_target:
            lists.move_to_front(_PENDING, lists.back(_WINDOW))
        while True:
            candidate = lists.back(_PENDING)
            incumbent = lists.back(_PROBATION)
            if incumbent == _NONE:
                incumbent = lists.back(_PROTECTED)
            if candidate == _NONE:
                victim = incumbent if incumbent != _NONE else lists.back(_WINDOW)
                lists.unlink(victim)
                return victim
            if incumbent == _NONE:  # main is empty: nothing to beat
                lists.move_to_front(_PROBATION, candidate)
                continue
            if estimate(keys[candidate]) >= estimate(keys[incumbent]):
                lists.move_to_front(_PROBATION, candidate)
                lists.unlink(incumbent)
                return incumbent
            lists.unlink(candidate)
            return candidate


# ---------------------------------------------------------------------------------------------
class _LeafFirstPolicy(EvictionPolicy):
    """Leaf-first eviction over the pool's prefix tree (as radix-tree prefix caches do).

    A prefix match stops at the first miss, so a cached block whose parent is gone cannot be
    hit: a block is evicted only once no block of this pool names it as parent (a *leaf*),
    unless every evictable block has children (then the lowest-scored one goes anyway, so the
    pool never starves). Among leaves, lowest priority first, then lowest ``_score``.

    The tree comes from ``on_link``; a child's link carries its parent's generation (bumped
    whenever the parent loses its key), so a stale link after a parent was dropped is ignored
    in O(1) instead of walking children. The order is a heap of
    ``(priority, has_children, score, seq, block)`` entries with lazy deletion: a block's live
    entry is the one in ``_live``; the heap is rebuilt from those when garbage outgrows it.
    Every hook is O(log n).
    """

    hits_while_active = False  # a match is seen as remove + insert of the same key

    def __init__(self, num_blocks: int) -> None:
        super().__init__(num_blocks)
        self._keys: list[BlockKey | None] = [None] * num_blocks
        self._parent = [_NONE] * num_blocks
        self._parent_gen = [0] * num_blocks
        self._gen = [0] * num_blocks
        self._children = [0] * num_blocks
        self._priority = [0] * num_blocks
        self._score = [0.0] * num_blocks
        self._live: list[tuple | None] = [None] * num_blocks
        self._heap: list[tuple] = []
        self._seq = 0
        self._size = 0

    # -- tree -------------------------------------------------------------------------------
    def on_link(self, block_id: int, parent_id: int) -> None:
        self._parent[block_id] = parent_id
        if parent_id >= 0:
            self._parent_gen[block_id] = self._gen[parent_id]
            self._children[parent_id] += 1
            if self._children[parent_id] == 1 and self._live[parent_id] is not None:
                self._push(parent_id)  # no longer a leaf

    def on_unlink(self, block_id: int) -> None:
        parent = self._parent[block_id]
        if parent >= 0 and self._parent_gen[block_id] == self._gen[parent]:
            self._children[parent] -= 1
            if not self._children[parent] and self._live[parent] is not None:
                self._push(parent)  # a leaf now
        self._parent[block_id] = _NONE
        self._gen[block_id] += 1
        self._children[block_id] = 0
        self._keys[block_id] = None
        self._forget(block_id)

    # -- EvictionPolicy hooks -----------------------------------------------------------------
    def on_insert(self, block_id: int, key: BlockKey, priority: int) -> None:
        # A block the pool took back (match) and returns under the same key: that was a hit.
        is_hit = self._keys[block_id] == key
        self._keys[block_id] = key
        self._priority[block_id] = priority
        self._score[block_id] = self._access(block_id, key, is_hit)
        self._size += 1
        self._push(block_id)

    def on_remove(self, block_id: int) -> None:
        if self._live[block_id] is not None:
            self._live[block_id] = None
            self._size -= 1

    def on_hit(self, block_id: int, key: BlockKey) -> None:
        if self._live[block_id] is not None:  # touch of an evictable block
            self._score[block_id] = self._access(block_id, key, True)
            self._push(block_id)

    def victim(self) -> int | None:
        heap, live = self._heap, self._live
        while heap:
            entry = heapq.heappop(heap)
            block_id = entry[4]
            if live[block_id] is entry:
                self.evict(block_id)
                return block_id
        return None

    def evict(self, block_id: int) -> None:
        entry = self._live[block_id]
        if entry is not None:
            self._live[block_id] = None  # its heap entry is garbage now
            self._size -= 1
            self._evicted(block_id, entry[2])
        self.on_unlink(block_id)

    def adopt(self, source: EvictionPolicy,
              blocks: Sequence[tuple[int, BlockKey, int, int]]) -> None:
        """A block ``source`` holds keeps its score (and the order of its last push among
        equals); one it does not scores below the blocks it holds (``_adopted``)."""
        if type(source) is not type(self):
            super().adopt(source, blocks)
            return
        self._adopt_history(source)
        live = source._live

        def pushed(block: tuple) -> int:
            entry = live[block[3]] if block[3] >= 0 else None
            return -1 if entry is None else entry[3]

        for block_id, key, priority, theirs in sorted(blocks, key=pushed):   # stable
            known = theirs >= 0 and live[theirs] is not None
            self._keys[block_id] = key
            self._priority[block_id] = priority
            self._score[block_id] = self._adopted(block_id, key, source, theirs if known else -1)
            self._size += 1
            self._push(block_id)

    def __len__(self) -> int:
        return self._size

    # -- internals ------------------------------------------------------------------------------
    def _push(self, block_id: int) -> None:
        self._seq += 1
        entry = (self._priority[block_id], self._children[block_id] > 0,
                 self._score[block_id], self._seq, block_id)
        self._live[block_id] = entry
        heap = self._heap
        heapq.heappush(heap, entry)
        if len(heap) > 4 * self._size + 64:
            self._heap = [e for e in self._live if e is not None]
            heapq.heapify(self._heap)

    def _forget(self, block_id: int) -> None:
        """Hook for subclasses: ``block_id`` lost its key."""

    # -- for subclasses -----------------------------------------------------------------------
    def _access(self, block_id: int, key: BlockKey, is_hit: bool) -> float:
        """The block's new score on insert (``is_hit``: it came back from a match) or touch."""
        raise NotImplementedError

    def _evicted(self, block_id: int, score: float) -> None:
        """``block_id`` is the victim (its key is still in ``_keys``)."""

    def _adopt_history(self, source: _LeafFirstPolicy) -> None:
        """``adopt``: copy what ``source`` remembers beyond its blocks."""

    def _adopted(self, block_id: int, key: BlockKey, source: _LeafFirstPolicy,
                 theirs: int) -> float:
        """``adopt``: the score of ``block_id``, held by ``source`` as ``theirs`` (-1: not)."""
        return source._score[theirs] if theirs >= 0 else 0.0


@register_policy
class PrefixLruEviction(_LeafFirstPolicy):
    """Leaf-first LRU: the least recently used leaf of the prefix tree goes first.

    With prefix matching a block is used whenever any descendant is, so its recency is its
    subtree's; a parent becomes evictable only after its last cached child.
    """

    name = "prefix_lru"

    def __init__(self, num_blocks: int) -> None:
        super().__init__(num_blocks)
        self._clock = 0

    def _access(self, block_id: int, key: BlockKey, is_hit: bool) -> float:
        self._clock += 1
        return self._clock

    def _adopt_history(self, source: _LeafFirstPolicy) -> None:
        self._clock = source._clock


@register_policy
class PrefixGdsfEviction(_LeafFirstPolicy):
    """Leaf-first GreedyDual-Frequency: a leaf's score is ``L + uses``, lowest goes first.

    ``uses`` counts the requests that used the block; under prefix matching every request
    through a descendant also uses the block, so a block is valued by its whole subtree (a
    shared system prompt counts every conversation under it). ``L`` is the score of the last
    victim: it rises as the cache turns over, so a block's frequency only protects it while it
    keeps being used (GreedyDual's aging, no clock or tuning). A block evicted and computed
    again resumes its count from a bounded ghost history (``HISTORY_FACTOR`` x the pool, as
    ``arc``'s), because conversation turns return after more traffic than a small tier holds.
    """

    name = "prefix_gdsf"
    HISTORY_FACTOR = 8
    MAX_HISTORY = 1_000_000

    def __init__(self, num_blocks: int) -> None:
        super().__init__(num_blocks)
        self._uses = [0] * num_blocks
        self._inflation = 0.0
        self._ghost: OrderedDict[BlockKey, int] = OrderedDict()
        self._ghost_max = max(num_blocks, min(self.HISTORY_FACTOR * num_blocks,
                                              self.MAX_HISTORY))

    def _access(self, block_id: int, key: BlockKey, is_hit: bool) -> float:
        if is_hit:
            self._uses[block_id] += 1
        else:
            self._uses[block_id] = self._ghost.pop(key, 0) + 1
        return self._inflation + self._uses[block_id]

    def _adopt_history(self, source: _LeafFirstPolicy) -> None:
        self._inflation = source._inflation
        self._ghost = OrderedDict(source._ghost)

    def _adopted(self, block_id: int, key: BlockKey, source: _LeafFirstPolicy,
                 theirs: int) -> float:
        if theirs >= 0:
            self._uses[block_id] = source._uses[theirs]
            return source._score[theirs]
        # Evicted by source (its ghost keeps its uses) or never seen: below every block source
        # holds (their scores include the inflation), the more used last.
        uses = self._uses[block_id] = self._ghost.pop(key, 0) + 1
        return float(uses)

    def _evicted(self, block_id: int, score: float) -> None:
        self._inflation = max(self._inflation, score)
        ghost = self._ghost
        ghost[self._keys[block_id]] = self._uses[block_id]
        if len(ghost) > self._ghost_max:
            ghost.popitem(last=False)
