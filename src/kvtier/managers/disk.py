"""G3, the disk tier: the slots of the workers' disk file.

A block is written from G2 after the disk admission policy accepts it (by default KVBM's
frequency filter: offered twice). A written block is matchable once every rank has reported its
write durable; a block being read is pinned until the read's result arrives. At start-up every
rank reports the index a previous run left on its disk, and the tier keeps the blocks all of
them hold.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from kvtier.events.types import BlockOrigin, EventBuffer
from kvtier.managers.host import register_one
from kvtier.metrics import KvtierMetrics
from kvtier.offload.admission import make_admission_policy
from kvtier.pools.block_pool import MAX_PRIORITY, BlockPool
from kvtier.tiers import BlockKey, Tier

logger = logging.getLogger(__name__)

# Engine steps a request may wait for the workers' disk index before matching without it.
MAX_RECOVERY_WAITS = 50


def disk_admission_policy(name: str, *, host_caches: bool) -> str:
    """The admission policy ``disk_admission`` names. ``auto``: KVBM's frequency filter (a
    block reaches disk from its second offer) when the host tier caches, since the host keeps
    the first copy meanwhile; every block when the disk is the first tier below the device,
    where refusing a first sighting leaves no copy to serve its next one."""
    if name != "auto":
        return name
    return "frequency" if host_caches else "always"


class DiskManager:
    def __init__(self, num_slots: int, *, eviction: str, admission: str,
                 events: EventBuffer | None, block_tokens: int, world_size: int,
                 metrics: KvtierMetrics, clock: Callable[[], float] | None = None) -> None:
        self.pool = BlockPool(Tier.G3, num_slots, eviction=eviction, events=events,
                              block_size=block_tokens)
        self.admission = make_admission_policy(admission, clock=clock)
        # Hooks go to the policy itself (a replay wraps ``admission`` to count offers).
        self._admission_hooks = self.admission
        self._admission_hooks.bind(num_slots, lambda: self.pool.num_free)
        self.metrics = metrics
        self.world_size = world_size
        self._writing: set[BlockKey] = set()
        # Recovery: every rank's index of what a previous run left on its disk.
        self.recovered = False
        self._recovered_by_rank: dict[int, list[tuple[int, BlockKey]]] = {}
        self._waits = 0

    # -- recovery -------------------------------------------------------------------------
    def ready(self) -> bool:
        """False while requests should wait for the workers' disk index (a bounded wait)."""
        if self.recovered:
            return True
        self._waits += 1
        if self._waits <= MAX_RECOVERY_WAITS:
            return False
        logger.warning("kvtier: no disk index from the workers; starting the disk tier empty")
        self.recovered = True
        return True

    def recover(self, rank: int, entries: list[tuple[int, BlockKey]]) -> None:
        """``rank``'s disk index; once every rank sent one, keep what all of them hold."""
        self._recovered_by_rank[rank] = entries
        if self.recovered or len(self._recovered_by_rank) < self.world_size:
            return
        parts = iter(self._recovered_by_rank.values())
        common = set(next(parts)).intersection(*parts)
        self.recovered = True
        valid = [(slot, key) for slot, key in sorted(common) if 0 <= slot < self.pool.num_blocks]
        self.pool.restore(valid)
        logger.info("kvtier: disk tier recovered %d blocks from a previous run", len(valid))

    # -- lookup and loads -----------------------------------------------------------------
    def holds(self, key: BlockKey) -> bool:
        return self.pool.lookup((key,)) == 1

    def pin(self, key: BlockKey) -> int | None:
        """Pin a block as a load's source (None: it was evicted meanwhile)."""
        slots = self.pool.match([key])
        if not slots:
            return None
        self._admission_hooks.on_hit(key)
        return slots[0]

    def unpin(self, slots: Sequence[int]) -> None:
        self.pool.release(slots)

    def discard(self, keys: Sequence[BlockKey]) -> None:
        """Forget blocks whose bytes failed verification."""
        self.pool.discard(keys)

    # -- stores ---------------------------------------------------------------------------
    def wants(self, key: BlockKey) -> bool:
        """Whether a G2 copy of ``key`` should be written to disk (counts as an offer)."""
        if key in self._writing or self.holds(key):
            return False
        return self.admission.admit(key)

    def prepare_store(self, key: BlockKey) -> int | None:
        """A slot for writing ``key`` (None: the tier is full of pinned blocks)."""
        slots = self.pool.allocate(1)
        if not slots:
            self.metrics.dropped_offloads.labels("G3").inc()
            return None
        self._writing.add(key)
        return slots[0]

    def complete_store(self, slot: int, key: BlockKey, ok: bool, timed_out: bool,
                       origin: BlockOrigin | None = None,
                       priority: int = MAX_PRIORITY) -> None:
        if not timed_out:
            self._writing.discard(key)
        if not ok:
            self.pool.release([slot])
            self.metrics.dropped_offloads.labels("G3").inc()
            return
        self.pool.complete([slot])
        self.pool.release([register_one(self.pool, slot, key, origin, priority)])

    def abandon(self, key: BlockKey) -> None:
        """A write of ``key`` timed out: another may be planned (its slot stays pinned)."""
        self._writing.discard(key)
