"""Eviction policies: which inactive (registered, unreferenced) block a full pool reuses next.

The pool tells a policy when a block becomes evictable (``on_insert``), stops being evictable
without being evicted (``on_remove``), is hit (``on_hit``) and when a key misses (``on_miss``),
and asks it for a ``victim`` when it needs a block. A policy owns only this ordering; the pool
owns states, references and the registry.

Prefix-aware policies also learn the prefix tree: a policy that overrides ``on_link`` hears,
for every block the pool registers, which block in the same pool holds the key before it in
its request (its parent), and through ``on_unlink`` when a block's key is dropped other than by
``victim`` (discard, clear). Policies that do not override them cost the pool nothing more.

Policies register by name with ``@register_policy``; ``make_eviction_policy`` builds one by
name or by a ``"package.module.Class"`` path to a user class. Names it does not know yet are
looked up again after importing the built-in policy modules (``kvtier.registry``), so that a
config can name any built-in policy without importing its module first.
"""

from __future__ import annotations

import abc
import bisect
import functools
import importlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import ClassVar

from kvtier.errors import ConfigError
from kvtier.registry import Registry
from kvtier.tiers import BlockKey

__all__ = [
    "EvictionPolicy",
    "FifoEviction",
    "LruEviction",
    "eviction_policy_names",
    "make_eviction_policy",
    "register_policy",
]


class EvictionPolicy(abc.ABC):
    """The order in which a pool gives up its inactive blocks (see the module doc)."""

    name: ClassVar[str]
    # Optional hint: False when ``on_hit`` only matters while the block is evictable (LRU's
    # recency bump), so the pool may skip it for blocks that are referenced.
    hits_while_active: ClassVar[bool] = True

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks

    @abc.abstractmethod
    def on_insert(self, block_id: int, key: BlockKey, priority: int) -> None:
        """Block ``block_id`` became evictable (inactive)."""

    @abc.abstractmethod
    def on_remove(self, block_id: int) -> None:
        """Block ``block_id`` left the evictable set without eviction (matched again,
        discarded, cleared)."""

    def on_insert_batch(self, block_ids: Sequence[int], key_of: Sequence[BlockKey],
                        priority_of: Sequence[int]) -> None:
        """Optional batch form of ``on_insert``: ``block_ids`` became evictable, in this order;
        ``key_of[b]`` and ``priority_of[b]`` are block ``b``'s key and priority. The default
        calls ``on_insert`` per block. The pool uses an override only when the class that
        defines it also defines ``on_insert`` (so a subclass that changes ``on_insert`` alone
        is never bypassed)."""
        on_insert = self.on_insert
        for block_id in block_ids:
            on_insert(block_id, key_of[block_id], priority_of[block_id])

    def on_hit(self, block_id: int, key: BlockKey) -> None:
        """A registered block was matched or touched (it may be active or inactive)."""

    def on_miss(self, key: BlockKey) -> None:
        """A match missed ``key`` (ghost-based policies learn from it)."""

    def on_link(self, block_id: int, parent_id: int) -> None:
        """Block ``block_id`` was registered; ``parent_id`` is the block of this pool holding
        the key before it in its request's chain, or -1 (first block, or its parent is not in
        this pool). Called before the block is first inserted."""

    def on_unlink(self, block_id: int) -> None:
        """Block ``block_id`` lost its key by discard or clear (it may be active or
        inactive; an inactive one also gets ``on_remove``). Not called for victims."""

    def on_lookup(self, keys: Sequence[BlockKey],
                  served_elsewhere: Callable[[BlockKey], bool]) -> None:
        """Optional: a request looks for ``keys`` (head first, past the device's prefix) in
        this pool's tier and the tiers beside it; ``served_elsewhere(key)``: another of them
        holds ``key``. Prefix matching stops at the first key none holds, so a policy that
        judges what it keeps by the whole stack's hits can count them here. Called once per
        request, by the connector's leader, for its host and disk tiers."""

    def adopt(self, source: EvictionPolicy,
              blocks: Sequence[tuple[int, BlockKey, int, int]]) -> None:
        """Take over from ``source``, a policy of the same class that heard the same traffic
        over another pool (a ``dueling`` shadow), for this pool's evictable ``blocks``: (block
        id, key, priority, the block of ``source``'s pool holding that key or -1), least
        recently used first. Called once, on a new policy, after ``on_link`` for this pool's
        linked blocks. A policy copies what ``source`` learned (its order, ghosts, counts,
        intervals) so that it goes on as ``source`` would; the default inserts the blocks
        ``source`` does not hold first (alone it would have evicted them), then the rest, each
        group in the order given."""
        for block_id, key, priority, _ in sorted(blocks, key=lambda block: block[3] >= 0):
            self.on_insert(block_id, key, priority)

    @abc.abstractmethod
    def victim(self) -> int | None:
        """Choose, forget and return the block to evict next; None if nothing is evictable."""

    def evict(self, block_id: int) -> None:
        """Forget evictable block ``block_id`` as a victim chosen by someone else (a policy
        combining others evicts the block one of them chose from all of them). The default
        forgets it as removed and unlinked; policies that learn from their victims (ghost
        histories) override it to learn from this one too."""
        self.on_remove(block_id)
        self.on_unlink(block_id)

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of evictable blocks the policy holds."""


def insert_batch_hook(policy: EvictionPolicy) -> Callable[..., None]:
    """The ``on_insert_batch`` a pool may call for ``policy``: its own override only when the
    class that defines it also defines ``on_insert`` (so a subclass that changes ``on_insert``
    alone is never bypassed), else the base class's per-block loop."""
    def defined_in(name: str) -> type | None:
        return next((klass for klass in type(policy).__mro__ if name in vars(klass)), None)

    if defined_in("on_insert_batch") is defined_in("on_insert"):
        return policy.on_insert_batch
    return functools.partial(EvictionPolicy.on_insert_batch, policy)


# Built-in policies beyond this module register when their modules are imported.
_REGISTRY: Registry[type[EvictionPolicy]] = Registry(
    "eviction policy", EvictionPolicy,
    ("kvtier.pools.policies", "kvtier.pools.reuse_policy", "kvtier.pools.learned_policy",
     "kvtier.pools.dueling"))
register_policy = _REGISTRY.register


def eviction_policy_names() -> list[str]:
    """Every registered policy name, built-in modules included."""
    return _REGISTRY.names()


def make_eviction_policy(name_or_dotted_path: str, num_blocks: int) -> EvictionPolicy:
    """A policy for a pool of ``num_blocks`` blocks, by registered name or ``"pkg.mod.Class"``."""
    cls = _REGISTRY.get(name_or_dotted_path)
    if cls is None and "." in name_or_dotted_path:
        cls = _import_policy(name_or_dotted_path)
    if cls is None:
        raise ConfigError(f"eviction policy {name_or_dotted_path!r} is not known: use one of "
                          f"{', '.join(eviction_policy_names())} or a 'module.Class' path")
    return cls(num_blocks)


def _import_policy(path: str) -> type[EvictionPolicy]:
    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"eviction policy {path!r} could not be imported: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, EvictionPolicy)):
        raise ConfigError(f"eviction policy {path!r} is not an EvictionPolicy subclass")
    return cls


_NOT_HELD = -1
MAX_PRIORITY = 100  # priorities are ints 0..MAX_PRIORITY (KVBM's retention priority range)


@register_policy
class LruEviction(EvictionPolicy):
    """KVBM's order: lowest priority first, then least recently returned or touched.

    One intrusive doubly linked list per priority over block ids (next/prev lists; list ``p``
    has its sentinel at index ``num_blocks + p``) and a sorted list of the priorities whose list
    is not empty. Every operation is O(1) and allocates nothing, except the first insert into /
    last removal from a priority, O(#priorities in use).
    """

    name = "lru"
    hits_while_active = False

    def __init__(self, num_blocks: int) -> None:
        super().__init__(num_blocks)
        # Sentinels point at themselves: every list starts empty.
        self._next = list(range(num_blocks + MAX_PRIORITY + 1))
        self._prev = list(range(num_blocks + MAX_PRIORITY + 1))
        self._priority_of = [_NOT_HELD] * num_blocks
        self._live_priorities: list[int] = []  # sorted, non-empty lists only
        self._size = 0

    def on_insert(self, block_id: int, key: BlockKey, priority: int) -> None:
        nxt, prev = self._next, self._prev
        sentinel = self.num_blocks + priority
        tail = prev[sentinel]
        if tail == sentinel:
            bisect.insort(self._live_priorities, priority)
        nxt[tail] = block_id
        prev[block_id] = tail
        nxt[block_id] = sentinel
        prev[sentinel] = block_id
        self._priority_of[block_id] = priority
        self._size += 1

    def on_insert_batch(self, block_ids: Sequence[int], key_of: Sequence[BlockKey],
                        priority_of: Sequence[int]) -> None:
        # on_insert, inlined: release hands over a request's blocks at once.
        nxt, prev, priority_held = self._next, self._prev, self._priority_of
        base = self.num_blocks
        for block_id in block_ids:
            priority = priority_of[block_id]
            sentinel = base + priority
            tail = prev[sentinel]
            if tail == sentinel:
                bisect.insort(self._live_priorities, priority)
            nxt[tail] = block_id
            prev[block_id] = tail
            nxt[block_id] = sentinel
            prev[sentinel] = block_id
            priority_held[block_id] = priority
        self._size += len(block_ids)

    def on_remove(self, block_id: int) -> None:
        priority = self._priority_of[block_id]
        if priority == _NOT_HELD:
            return
        nxt, prev = self._next, self._prev
        before, after = prev[block_id], nxt[block_id]
        nxt[before] = after
        prev[after] = before
        if before == after:  # only the sentinel is left
            self._live_priorities.remove(priority)
        self._priority_of[block_id] = _NOT_HELD
        self._size -= 1

    def on_hit(self, block_id: int, key: BlockKey) -> None:
        priority = self._priority_of[block_id]
        if priority == _NOT_HELD:
            return
        nxt, prev = self._next, self._prev
        sentinel = self.num_blocks + priority
        tail = prev[sentinel]
        if tail == block_id:
            return
        before, after = prev[block_id], nxt[block_id]
        nxt[before] = after
        prev[after] = before
        nxt[tail] = block_id
        prev[block_id] = tail
        nxt[block_id] = sentinel
        prev[sentinel] = block_id

    def adopt(self, source: EvictionPolicy,
              blocks: Sequence[tuple[int, BlockKey, int, int]]) -> None:
        # The blocks source holds go in its order (lowest priority and oldest first).
        rank = source._oldest_first() if isinstance(source, LruEviction) else {}
        for block_id, key, priority, _ in sorted(
                blocks, key=lambda block: rank.get(block[3], -1)):   # stable: unknown first
            self.on_insert(block_id, key, priority)

    def _oldest_first(self) -> dict[int, int]:
        """Each held block's place in the eviction order."""
        rank: dict[int, int] = {}
        nxt = self._next
        for priority in self._live_priorities:
            sentinel = self.num_blocks + priority
            block_id = nxt[sentinel]
            while block_id != sentinel:
                rank[block_id] = len(rank)
                block_id = nxt[block_id]
        return rank

    def lowest_priority(self) -> int | None:
        """The priority of the next victim, None when nothing is held."""
        return self._live_priorities[0] if self._live_priorities else None

    def victim(self) -> int | None:
        if not self._live_priorities:
            return None
        priority = self._live_priorities[0]
        nxt = self._next
        sentinel = self.num_blocks + priority
        block_id = nxt[sentinel]
        after = nxt[block_id]
        nxt[sentinel] = after
        self._prev[after] = sentinel
        if after == sentinel:
            del self._live_priorities[0]
        self._priority_of[block_id] = _NOT_HELD
        self._size -= 1
        return block_id

    def __len__(self) -> int:
        return self._size


@register_policy
class FifoEviction(EvictionPolicy):
    """Evicts in the order blocks became evictable; priorities and hits are ignored."""

    name = "fifo"
    hits_while_active = False

    def __init__(self, num_blocks: int) -> None:
        super().__init__(num_blocks)
        self._order: OrderedDict[int, None] = OrderedDict()

    def on_insert(self, block_id: int, key: BlockKey, priority: int) -> None:
        self._order[block_id] = None

    def on_remove(self, block_id: int) -> None:
        self._order.pop(block_id, None)

    def victim(self) -> int | None:
        if not self._order:
            return None
        return self._order.popitem(last=False)[0]

    def __len__(self) -> int:
        return len(self._order)
