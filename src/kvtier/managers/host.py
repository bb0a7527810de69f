"""G2, the host tier: the slots of the workers' host arena.

With ``host_cache_gb`` > 0 the host tier caches blocks (write-through from the device, promoted
from disk and remote loads). Without it, G2 only stages: disk and remote transfers pass through
a bounded window of slots and nothing stays there.

A slot a transfer reads or writes holds a pool reference (a pin) until the transfer's result
arrives, so it is never evicted or reused under the transfer. One pin may be shared as a
*lease* by several transfers of the same bytes (a disk write and a remote put of one block):
the last holder to finish releases it.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvtier.events.types import BlockOrigin, EventBuffer
from kvtier.metrics import KvtierMetrics
from kvtier.pools.block_pool import MAX_PRIORITY, BlockPool
from kvtier.tiers import BlockKey, Tier

# Slots kept free for offloads when a match is cut to the staging room.
RESERVED_STAGING_BLOCKS = 64


def register_one(pool: BlockPool, slot: int, key: BlockKey, origin: BlockOrigin | None,
                 priority: int) -> int:
    """Register ``slot`` under ``key`` with retention ``priority`` (lower is evicted first);
    ``origin`` goes into the Stored event."""
    if origin is None:
        return pool.register([slot], [key], priority=priority)[0]
    return pool.register([slot], [key], parent=origin.parent, token_ids=origin.token_ids,
                         lora_name=origin.lora_name, priority=priority)[0]


class HostManager:
    def __init__(self, num_slots: int, *, caches: bool, eviction: str,
                 events: EventBuffer | None, block_tokens: int,
                 metrics: KvtierMetrics) -> None:
        self.caches = caches
        self.pool = BlockPool(Tier.G2, num_slots, eviction=eviction,
                              events=events if caches else None, block_size=block_tokens)
        self.metrics = metrics
        # Slot -> holders of its lease beyond the first (the first holder is the pin itself).
        self._extra_holders: dict[int, int] = {}
        # Keys whose bytes a load is staging into G2 (registered when it lands).
        self.arriving: set[BlockKey] = set()
        # Staging slot -> ranks whose timed-out remote read may still write into it; the slot
        # is freed when its load is committed and every one of them released it.
        self._held: dict[int, set[int]] = {}
        self._parked: set[int] = set()   # committed, waiting for those releases

    # -- lookup ---------------------------------------------------------------------------
    def lookup(self, keys: Sequence[BlockKey]) -> int:
        """Leading ``keys`` the host tier caches (0 when it only stages)."""
        return self.pool.lookup(keys) if self.caches else 0

    def holds(self, key: BlockKey) -> bool:
        return self.caches and self.pool.lookup((key,)) == 1

    def staging_room(self) -> int:
        """Slots a match may still take for staging and pinning (some stay for offloads)."""
        reserve = min(RESERVED_STAGING_BLOCKS, self.pool.num_blocks // 8)
        return max(self.pool.num_free + self.pool.num_inactive - reserve, 0)

    # -- loads ----------------------------------------------------------------------------
    def pin(self, key: BlockKey) -> int | None:
        """Pin a cached block as a load's source (None: it was evicted meanwhile)."""
        slots = self.pool.match([key])
        return slots[0] if slots else None

    def stage(self) -> int | None:
        """A slot for bytes arriving from disk or the remote store."""
        slots = self.pool.allocate(1)
        if not slots:
            self.metrics.dropped_offloads.labels("G2").inc()
            return None
        return slots[0]

    def complete_load(self, slot: int, key: BlockKey, *, staged: bool, ok: bool,
                      corrupt: bool, origin: BlockOrigin | None = None,
                      priority: int = MAX_PRIORITY) -> None:
        """A load from ``slot`` (a pinned source, or a ``staged`` arrival) is committed."""
        if staged and ok and self.caches:
            # Promotion: the host tier keeps what it staged.
            self.pool.complete([slot])
            slot = register_one(self.pool, slot, key, origin, priority)
        self.pool.release([slot])
        if corrupt and not staged:
            self.pool.discard([key])

    def hold(self, slot: int, rank: int) -> None:
        """``rank``'s timed-out remote read may still write into staging ``slot``."""
        self._held.setdefault(slot, set()).add(rank)

    def is_held(self, slot: int) -> bool:
        return slot in self._held

    def park(self, slot: int) -> None:
        """The load of held ``slot`` is committed: free it once every holder released it."""
        self._parked.add(slot)

    def released(self, slot: int, rank: int) -> None:
        """``rank`` will write nothing more into ``slot``."""
        holders = self._held.get(slot)
        if holders is None or rank not in holders:
            return
        holders.discard(rank)
        if not holders:
            del self._held[slot]
            if slot in self._parked:
                self._parked.discard(slot)
                self.pool.release([slot])

    # -- stores ---------------------------------------------------------------------------
    def prepare_store(self) -> int | None:
        """A slot for a block copied out of the device."""
        return self.stage()

    def complete_store(self, slot: int, key: BlockKey, ok: bool,
                       origin: BlockOrigin | None = None,
                       priority: int = MAX_PRIORITY) -> int | None:
        """The store into ``slot`` is committed. Returns the slot holding the bytes, still
        pinned (registered when the host tier caches), or None when the store failed."""
        if not ok:
            self.pool.release([slot])
            self.metrics.dropped_offloads.labels("G2").inc()
            return None
        self.pool.complete([slot])
        if self.caches:
            slot = register_one(self.pool, slot, key, origin, priority)
        return slot

    # -- leases ---------------------------------------------------------------------------
    def lease(self, slot: int, holders: int) -> None:
        """Share the caller's pin on ``slot`` among ``holders`` transfers (0: release it)."""
        if holders <= 0:
            self.pool.release([slot])
        elif holders > 1:
            self._extra_holders[slot] = self._extra_holders.get(slot, 0) + holders - 1

    def end_lease(self, slot: int) -> None:
        """One holder of ``slot``'s lease is done; the last one releases the pin."""
        extra = self._extra_holders.get(slot, 0)
        if extra > 1:
            self._extra_holders[slot] = extra - 1
        elif extra == 1:
            del self._extra_holders[slot]
        else:
            self.pool.release([slot])

    @property
    def busy(self) -> bool:
        """Staging slots still wait for a stalled rank's release."""
        return bool(self._held or self._parked)
