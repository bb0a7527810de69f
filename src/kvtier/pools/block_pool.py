"""One tier's block pool: block states, the key registry, free list and eviction. No I/O.

Lifecycle of a block (all transitions live in this module)::

    RESET (free) --allocate--> PARTIAL --complete--> COMPLETE --register--> REGISTERED
       ^                          |                     |                      |
       +------ release of the last reference -----------+          release of the last
       |                                                           reference: inactive
       +--- evicted by allocate / discard / clear <---- inactive   (evictable, matchable)

Every allocated block is *active* (it has references) or, once registered and released,
*inactive*: it keeps its key, can be matched again (which makes it active) and is what
``allocate`` evicts, in the order the eviction policy chooses, when the free list is empty.
Active blocks are never evicted. ``free + inactive + active == num_blocks`` always.

Contract violations (unknown block id, double release, registering a block that is not
COMPLETE, batch length mismatch) raise ``BlockStateError`` naming the block and its state, and
leave the pool unchanged: every batch is validated before anything is mutated. Expected
outcomes are return values: a miss is a short ``match``, a full pool an empty ``allocate``.

Per-block metadata is allocated once, as parallel lists indexed by block id; the free list is
intrusive (next/prev lists with a sentinel), so the hot operations create no per-block objects.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Sequence

from kvtier.errors import BlockStateError
from kvtier.events.types import AllBlocksCleared, BlockRemoved, BlockStored, EventBuffer
from kvtier.pools.eviction import (
    MAX_PRIORITY,
    EvictionPolicy,
    insert_batch_hook,
    make_eviction_policy,
)
from kvtier.tiers import BlockKey, Tier

__all__ = ["MAX_PRIORITY", "BlockPool", "BlockState"]


class BlockState(enum.IntEnum):
    RESET = 0  # free: no key, no references, on the free list
    PARTIAL = 1  # allocated, bytes being written
    COMPLETE = 2  # bytes written, not (or no longer) matchable
    REGISTERED = 3  # matchable by key; active while referenced, else inactive


# Plain ints in the hot paths (IntEnum comparisons are slower).
_RESET, _PARTIAL, _COMPLETE, _REGISTERED = 0, 1, 2, 3
_REGISTERING = -1  # transient mark inside register(); never visible outside it
_KEY_TYPES = frozenset({int, bytes})  # BlockKey, exactly (the hasher makes Python ints/bytes)


class BlockPool:
    """Fixed-capacity block bookkeeping for one tier (see the module doc)."""

    def __init__(self, tier: Tier, num_blocks: int, *, eviction: EvictionPolicy | str = "lru",
                 events: EventBuffer | None = None, block_size: int = 16) -> None:
        if not isinstance(num_blocks, int) or num_blocks <= 0:
            raise BlockStateError(f"{tier.name} pool: num_blocks={num_blocks!r}, "
                                  "expected a positive int")
        self.tier = tier
        self.num_blocks = num_blocks
        self.block_size = block_size
        if isinstance(eviction, str):
            eviction = make_eviction_policy(eviction, num_blocks)
        self._eviction = eviction
        self._events = events
        # Hooks a policy leaves as the base class's no-ops are not called at all.
        policy_cls = type(eviction)
        self._wants_hits = policy_cls.on_hit is not EvictionPolicy.on_hit
        self._wants_active_hits = self._wants_hits and policy_cls.hits_while_active
        self._wants_misses = policy_cls.on_miss is not EvictionPolicy.on_miss
        self._wants_links = policy_cls.on_link is not EvictionPolicy.on_link
        self._wants_unlinks = policy_cls.on_unlink is not EvictionPolicy.on_unlink
        self._insert_batch = insert_batch_hook(eviction)

        self._state = [_RESET] * num_blocks
        self._ref = [0] * num_blocks
        self._key: list[BlockKey | None] = [None] * num_blocks
        self._priority = [0] * num_blocks
        self._registry: dict[BlockKey, int] = {}
        # Free list: block ids in order, sentinel at index num_blocks; head is allocated first.
        sentinel = num_blocks
        self._sentinel = sentinel
        self._next = list(range(1, num_blocks + 1)) + [0]
        self._prev = [sentinel] + list(range(num_blocks))
        self._num_free = num_blocks
        self._num_inactive = 0
        self._num_active = 0
        self.num_evicted = 0   # registered blocks evicted to make room, over the pool's life

    # -- counts ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_inactive(self) -> int:
        return self._num_inactive

    @property
    def num_active(self) -> int:
        return self._num_active

    @property
    def num_registered(self) -> int:
        return len(self._registry)

    @property
    def usage(self) -> float:
        """Fraction of blocks that hold data (active or inactive)."""
        return 1.0 - self._num_free / self.num_blocks

    @property
    def eviction(self) -> EvictionPolicy:
        return self._eviction

    @property
    def links_parents(self) -> bool:
        """Whether the eviction policy learns the prefix tree (pass ``parent`` to register)."""
        return self._wants_links

    # -- per block ------------------------------------------------------------------------
    def key_of(self, block_id: int) -> BlockKey | None:
        self._check_id(block_id)
        return self._key[block_id]

    def state_of(self, block_id: int) -> BlockState:
        self._check_id(block_id)
        return BlockState(self._state[block_id])

    def ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref[block_id]

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._registry

    def block_of(self, key: BlockKey) -> int | None:
        """The block registered under ``key``, without taking a reference."""
        return self._registry.get(key)

    # -- lifecycle ------------------------------------------------------------------------
    def allocate(self, num_blocks: int) -> list[int]:
        """``num_blocks`` blocks in state PARTIAL with one reference each, or ``[]`` when the
        pool cannot supply them all (nothing changes then). Free blocks are taken first, then
        inactive blocks are evicted in the policy's order (emitting one Removed event)."""
        if num_blocks <= 0:
            if num_blocks == 0:
                return []
            raise BlockStateError(f"{self.tier.name} pool: allocate({num_blocks}) is negative")
        if num_blocks > self._num_free + self._num_inactive:
            return []
        state, ref = self._state, self._ref
        num_from_free = min(num_blocks, self._num_free)
        block_ids: list[int] = []
        if num_from_free:
            append = block_ids.append
            nxt = self._next
            block_id = nxt[self._sentinel]
            for _ in range(num_from_free):
                append(block_id)
                state[block_id] = _PARTIAL
                ref[block_id] = 1
                block_id = nxt[block_id]
            nxt[self._sentinel] = block_id
            self._prev[block_id] = self._sentinel
            self._num_free -= num_from_free
        num_to_evict = num_blocks - num_from_free
        if num_to_evict:
            self._evict_into(block_ids, num_to_evict)
        self._num_active += num_blocks
        return block_ids

    def _evict_into(self, block_ids: list[int], count: int) -> None:
        state, ref, keys, registry = self._state, self._ref, self._key, self._registry
        victim = self._eviction.victim
        removed: list[BlockKey] = []
        for _ in range(count):
            block_id = victim()
            if block_id is None or state[block_id] != _REGISTERED or ref[block_id]:
                self._undo_partial_allocation(block_ids, removed)
                raise BlockStateError(
                    f"{self.tier.name} pool: eviction policy {self._eviction.name!r} returned "
                    f"{block_id!r} with {self._num_inactive} blocks inactive")
            key = keys[block_id]
            del registry[key]
            keys[block_id] = None
            removed.append(key)
            state[block_id] = _PARTIAL
            ref[block_id] = 1
            block_ids.append(block_id)
        self._num_inactive -= count
        self.num_evicted += count
        if self._events is not None:
            self._events.add(BlockRemoved(removed, self.tier))

    def _undo_partial_allocation(self, block_ids: list[int], removed: list[BlockKey]) -> None:
        """A broken policy: hand back what was taken (evicted blocks lose their keys)."""
        num_evicted = len(removed)
        self._num_inactive -= num_evicted
        for block_id in block_ids:
            self._state[block_id] = _RESET
            self._ref[block_id] = 0
            self._push_free(block_id)
        self._num_free += len(block_ids)
        if removed and self._events is not None:
            self._events.add(BlockRemoved(removed, self.tier))

    def complete(self, block_ids: Sequence[int]) -> None:
        """PARTIAL -> COMPLETE: the blocks' bytes are written."""
        self._check_ids(block_ids)
        state = self._state
        for idx, block_id in enumerate(block_ids):
            if state[block_id] != _PARTIAL:
                error = self._state_error(block_id, "complete", "PARTIAL")
                for done in block_ids[:idx]:  # undo: the batch is all or nothing
                    state[done] = _PARTIAL
                raise error
            state[block_id] = _COMPLETE

    def register(self, block_ids: Sequence[int], keys: Sequence[BlockKey], *,
                 parent: BlockKey | None = None, token_ids: Sequence[int] | None = None,
                 lora_name: str | None = None, priority: int | Sequence[int] = 0) -> list[int]:
        """COMPLETE -> REGISTERED under ``keys``; returns the canonical block id per key.

        Duplicates: when a key is already registered to another block, that block is kept
        and returned with a reference taken on it (it becomes active), and the caller's
        reference on the new block is dropped (freeing it when that was the last one). The
        caller therefore holds one reference on every returned id, as with fresh blocks.

        ``priority`` (0..100, per block or one for all) orders eviction: lower goes first.
        Emits one Stored event with all ``keys`` (parent = ``parent``, the key before them).
        """
        num = len(block_ids)
        if len(keys) != num:
            raise BlockStateError(f"{self.tier.name} pool: register got {num} block ids and "
                                  f"{len(keys)} keys")
        if isinstance(priority, int):
            priorities: Sequence[int] | None = None
            if not 0 <= priority <= MAX_PRIORITY:
                raise BlockStateError(f"{self.tier.name} pool: priority {priority} is outside "
                                      f"0..{MAX_PRIORITY}")
        else:
            priorities = priority
            if len(priorities) != num:
                raise BlockStateError(f"{self.tier.name} pool: register got {num} block ids "
                                      f"and {len(priorities)} priorities")
            for value in priorities:
                if not isinstance(value, int) or not 0 <= value <= MAX_PRIORITY:
                    raise BlockStateError(f"{self.tier.name} pool: priority {value!r} is "
                                          f"outside 0..{MAX_PRIORITY}")
        self._check_ids(block_ids)
        state = self._state
        # Validate, marking each block so that one listed twice is caught in the same pass.
        for idx, (block_id, key) in enumerate(zip(block_ids, keys)):
            if state[block_id] != _COMPLETE or type(key) not in _KEY_TYPES:
                twice = state[block_id] == _REGISTERING
                for done in block_ids[:idx]:
                    state[done] = _COMPLETE
                if twice:
                    raise BlockStateError(f"{self.tier.name} pool: block {block_id} appears "
                                          "twice in one register call")
                if type(key) not in _KEY_TYPES:
                    raise self._key_error("register", block_id, key)
                raise self._state_error(block_id, "register", "COMPLETE")
            state[block_id] = _REGISTERING

        block_keys, block_priority = self._key, self._priority
        registry = self._registry
        setdefault = registry.setdefault
        on_link = self._eviction.on_link if self._wants_links else None
        canonical: list[int] = []
        append = canonical.append
        for idx, (block_id, key) in enumerate(zip(block_ids, keys)):
            kept = setdefault(key, block_id)
            if kept == block_id:
                state[block_id] = _REGISTERED
                block_keys[block_id] = key
                block_priority[block_id] = priority if priorities is None else priorities[idx]
                if on_link is not None:
                    parent_key = keys[idx - 1] if idx else parent
                    on_link(block_id, -1 if parent_key is None
                            else registry.get(parent_key, -1))
            else:
                # Duplicate: keep the registered block, hand the new one back.
                state[block_id] = _COMPLETE
                self._take_ref(kept, key)
                self._drop_ref(block_id)
            append(kept)
        if self._events is not None:
            self._events.add(BlockStored(
                list(keys), parent, self.block_size, self.tier,
                list(token_ids) if token_ids is not None else None, lora_name))
        return canonical

    def match(self, keys: Iterable[BlockKey]) -> list[int]:
        """Blocks of the longest registered prefix of ``keys``, one reference taken on each
        (inactive blocks become active). Stops at the first miss."""
        registry, ref = self._registry, self._ref
        on_remove = self._eviction.on_remove
        # Every matched block is active afterwards: only policies that count hits on
        # active blocks hear about them.
        on_hit = self._eviction.on_hit if self._wants_active_hits else None
        block_ids: list[int] = []
        append = block_ids.append
        num_reactivated = 0
        for key in keys:
            block_id = registry.get(key)
            if block_id is None:
                if self._wants_misses:
                    self._eviction.on_miss(key)
                break
            count = ref[block_id]
            if not count:
                on_remove(block_id)
                num_reactivated += 1
            ref[block_id] = count + 1
            if on_hit is not None:
                on_hit(block_id, key)
            append(block_id)
        if num_reactivated:
            self._num_inactive -= num_reactivated
            self._num_active += num_reactivated
        return block_ids

    def lookup(self, keys: Iterable[BlockKey]) -> int:
        """How many leading ``keys`` are registered. No references, no recency change, no
        policy calls."""
        registry = self._registry
        count = 0
        for key in keys:
            if key not in registry:
                break
            count += 1
        return count

    def touch(self, keys: Iterable[BlockKey]) -> int:
        """Report a hit to the eviction policy (recency/frequency bump) for the leading
        registered ``keys``, stopping at the first miss; no references are taken. Returns how
        many keys were registered."""
        registry, ref = self._registry, self._ref
        on_hit = self._eviction.on_hit if self._wants_hits else None
        active_too = self._wants_active_hits
        count = 0
        for key in keys:
            block_id = registry.get(key)
            if block_id is None:
                break
            if on_hit is not None and (active_too or not ref[block_id]):
                on_hit(block_id, key)
            count += 1
        return count

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop one reference per listed id (an id may appear as often as it is held).

        A registered block losing its last reference becomes inactive: still matchable, now
        evictable. Blocks released in one call become evictable in the order given (pass a
        request's blocks tail first to have its tail evicted first, as vLLM does). Any other
        block losing its last reference is reset and freed."""
        self._check_ids(block_ids)
        ref = self._ref
        # Phase 1, references only, so that a bad id can be undone exactly.
        state = self._state
        inactivated: list[int] = []  # registered blocks that lost their last reference
        freed: list[int] = []  # other blocks that did
        for idx, block_id in enumerate(block_ids):
            count = ref[block_id]
            if count == 1:
                ref[block_id] = 0
                if state[block_id] == _REGISTERED:
                    inactivated.append(block_id)
                else:
                    freed.append(block_id)
            elif count:
                ref[block_id] = count - 1
            else:
                for done in block_ids[:idx]:
                    ref[done] += 1
                raise self._release_error(block_id, block_ids)
        # Phase 2: registered blocks become inactive (evictable), the others free.
        if inactivated:
            self._insert_batch(inactivated, self._key, self._priority)
        for block_id in freed:
            state[block_id] = _RESET
            self._push_free(block_id)
        self._num_active -= len(inactivated) + len(freed)
        self._num_inactive += len(inactivated)
        self._num_free += len(freed)

    def discard(self, keys: Iterable[BlockKey]) -> int:
        """Unregister ``keys`` (e.g. their bytes failed a checksum). Inactive blocks are freed
        now; active ones become COMPLETE (unmatchable) and are freed when their last reference
        drops. Unknown keys are skipped. Emits one Removed event; returns the number dropped."""
        registry, state, ref, block_keys = self._registry, self._state, self._ref, self._key
        on_unlink = self._eviction.on_unlink if self._wants_unlinks else None
        removed: list[BlockKey] = []
        for key in keys:
            block_id = registry.pop(key, None)
            if block_id is None:
                continue
            removed.append(key)
            block_keys[block_id] = None
            if on_unlink is not None:
                on_unlink(block_id)
            if ref[block_id]:
                state[block_id] = _COMPLETE
            else:
                self._eviction.on_remove(block_id)
                state[block_id] = _RESET
                self._push_free(block_id)
                self._num_inactive -= 1
                self._num_free += 1
        if removed and self._events is not None:
            self._events.add(BlockRemoved(removed, self.tier))
        return len(removed)

    def restore(self, entries: Iterable[tuple[int, BlockKey]], *,
                emit_events: bool = True) -> None:
        """Warm restart (disk index recovery): mark free blocks REGISTERED and inactive under
        the given keys, in the order given (the first is evicted first).

        Every block must be free and every key unregistered, else ``BlockStateError`` and
        nothing changes. With ``emit_events``, one Stored event per block with no parent (the
        chain is not known after a restart), so event consumers learn what the tier holds."""
        entries = list(entries)
        block_ids = [block_id for block_id, _ in entries]
        self._check_ids(block_ids)
        state, registry = self._state, self._registry
        for block_id in block_ids:
            if state[block_id] != _RESET:
                raise self._state_error(block_id, "restore", "RESET (free)")
        if len(set(block_ids)) != len(block_ids):
            dup = next(b for b, n in Counter(block_ids).items() if n > 1)
            raise BlockStateError(f"{self.tier.name} pool: block {dup} appears twice in restore")
        seen: set[BlockKey] = set()
        for block_id, key in entries:
            if type(key) not in _KEY_TYPES:
                raise self._key_error("restore", block_id, key)
            if key in registry or key in seen:
                raise BlockStateError(f"{self.tier.name} pool: restore of block {block_id} "
                                      f"under key {key!r}, which is already registered")
            seen.add(key)
        on_insert = self._eviction.on_insert
        on_link = self._eviction.on_link if self._wants_links else None
        for block_id, key in entries:
            self._unlink_free(block_id)
            state[block_id] = _REGISTERED
            self._key[block_id] = key
            self._priority[block_id] = 0
            registry[key] = block_id
            if on_link is not None:
                on_link(block_id, -1)  # the chain is not known after a restart
            on_insert(block_id, key, 0)
        self._num_free -= len(entries)
        self._num_inactive += len(entries)
        if emit_events and self._events is not None:
            for _, key in entries:
                self._events.add(BlockStored([key], None, self.block_size, self.tier))

    def clear(self) -> None:
        """Drop every registration: inactive blocks are freed, active ones become COMPLETE and
        are freed when released. Emits AllBlocksCleared."""
        state, ref, block_keys = self._state, self._ref, self._key
        on_remove = self._eviction.on_remove
        on_unlink = self._eviction.on_unlink if self._wants_unlinks else None
        for block_id in self._registry.values():
            block_keys[block_id] = None
            if on_unlink is not None:
                on_unlink(block_id)
            if ref[block_id]:
                state[block_id] = _COMPLETE
            else:
                on_remove(block_id)
                state[block_id] = _RESET
                self._push_free(block_id)
        self._registry.clear()
        self._num_free += self._num_inactive
        self._num_inactive = 0
        if self._events is not None:
            self._events.add(AllBlocksCleared(self.tier))

    # -- internals ------------------------------------------------------------------------
    def _take_ref(self, block_id: int, key: BlockKey) -> None:
        if not self._ref[block_id]:
            self._eviction.on_remove(block_id)
            self._num_inactive -= 1
            self._num_active += 1
        self._ref[block_id] += 1
        if self._wants_active_hits:
            self._eviction.on_hit(block_id, key)

    def _drop_ref(self, block_id: int) -> None:
        """Drop a reference on an unregistered block, freeing it on the last one."""
        self._ref[block_id] -= 1
        if not self._ref[block_id]:
            self._state[block_id] = _RESET
            self._push_free(block_id)
            self._num_active -= 1
            self._num_free += 1

    def _push_free(self, block_id: int) -> None:
        """Append to the free list's tail (the caller adjusts the counters)."""
        sentinel = self._sentinel
        tail = self._prev[sentinel]
        self._next[tail] = block_id
        self._prev[block_id] = tail
        self._next[block_id] = sentinel
        self._prev[sentinel] = block_id

    def _unlink_free(self, block_id: int) -> None:
        before, after = self._prev[block_id], self._next[block_id]
        self._next[before] = after
        self._prev[after] = before

    def _check_id(self, block_id: int) -> None:
        if not isinstance(block_id, int) or not 0 <= block_id < self.num_blocks:
            raise BlockStateError(f"{self.tier.name} pool: block id {block_id!r} is not in "
                                  f"0..{self.num_blocks - 1}")

    def _check_ids(self, block_ids: Sequence[int]) -> None:
        if block_ids and (min(block_ids) < 0 or max(block_ids) >= self.num_blocks):
            bad = next(b for b in block_ids if not 0 <= b < self.num_blocks)
            self._check_id(bad)

    def _key_error(self, operation: str, block_id: int, key: object) -> BlockStateError:
        return BlockStateError(f"{self.tier.name} pool: {operation} of block {block_id} under "
                               f"key {key!r} of type {type(key).__name__}; keys are int or bytes")

    def _release_error(self, block_id: int, block_ids: Sequence[int]) -> BlockStateError:
        times = list(block_ids).count(block_id)
        if times > 1:
            return BlockStateError(
                f"{self.tier.name} pool: release of block {block_id} {times} times but it holds "
                f"{self._ref[block_id]} references (double release?)")
        return self._state_error(block_id, "release", "a referenced block (double release?)")

    def _state_error(self, block_id: int, operation: str, expected: str) -> BlockStateError:
        return BlockStateError(
            f"{self.tier.name} pool: {operation} of block {block_id} in state "
            f"{BlockState(self._state[block_id]).name} with {self._ref[block_id]} references; "
            f"expected {expected}")

    # -- checking -------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise ``BlockStateError`` describing the first broken invariant (O(num_blocks))."""
        name = f"{self.tier.name} pool"
        n = self.num_blocks
        sentinel = self._sentinel
        on_free_list = [False] * n
        count = 0
        block_id = self._next[sentinel]
        previous = sentinel
        while block_id != sentinel:
            if not 0 <= block_id < n or on_free_list[block_id] or count > n:
                raise BlockStateError(f"{name}: free list is corrupt at block {block_id}")
            if self._prev[block_id] != previous:
                raise BlockStateError(f"{name}: free list back-link of block {block_id} is "
                                      f"{self._prev[block_id]}, expected {previous}")
            on_free_list[block_id] = True
            count += 1
            previous, block_id = block_id, self._next[block_id]
        if self._prev[sentinel] != previous:
            raise BlockStateError(f"{name}: free list tail is {self._prev[sentinel]}, "
                                  f"expected {previous}")
        num_free = num_inactive = num_active = 0
        for block_id in range(n):
            state, ref, key = self._state[block_id], self._ref[block_id], self._key[block_id]
            where = f"{name}: block {block_id} ({BlockState(state).name}, {ref} refs, key {key!r})"
            if ref < 0:
                raise BlockStateError(f"{where} has a negative reference count")
            if state == _RESET:
                if ref or key is not None or not on_free_list[block_id]:
                    raise BlockStateError(f"{where} is RESET but referenced, keyed or not free")
                num_free += 1
                continue
            if on_free_list[block_id]:
                raise BlockStateError(f"{where} is on the free list")
            if state == _REGISTERED:
                if key is None or self._registry.get(key) != block_id:
                    raise BlockStateError(f"{where} is not the registry's block for its key")
                if ref:
                    num_active += 1
                else:
                    num_inactive += 1
            else:
                if key is not None:
                    raise BlockStateError(f"{where} holds a key but is not REGISTERED")
                if not ref:
                    raise BlockStateError(f"{where} is allocated without references")
                num_active += 1
        for key, block_id in self._registry.items():
            if self._key[block_id] != key or self._state[block_id] != _REGISTERED:
                raise BlockStateError(f"{name}: registry maps {key!r} to block {block_id}, "
                                      f"which does not hold it")
        counted = (num_free, num_inactive, num_active)
        kept = (self._num_free, self._num_inactive, self._num_active)
        if counted != kept:
            raise BlockStateError(f"{name}: (free, inactive, active) counters are {kept}, "
                                  f"blocks say {counted}")
        if num_free + num_inactive + num_active != n or count != num_free:
            raise BlockStateError(f"{name}: {num_free} free ({count} listed) + {num_inactive} "
                                  f"inactive + {num_active} active != {n}")
        if len(self._eviction) != num_inactive:
            raise BlockStateError(f"{name}: eviction policy holds {len(self._eviction)} blocks, "
                                  f"{num_inactive} are inactive")
