"""Onboarding: a request's matched prefix, loaded from the tiers into its device blocks.

Every promised block gets a source pinned in its tier (a G2 slot; a G3 slot plus a G2 staging
slot; a G2 staging slot for G4) and a place in one ``LoadOp``. A block whose source cannot be
pinned any more is a load error from the start, so the engine recomputes it instead of waiting.
When every rank has reported the load, blocks that arrived on every rank are counted as hits,
staged ones are promoted into the host tier (where it caches), and blocks that failed
verification are dropped from their tier.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

from kvtier.events.types import BlockOrigin
from kvtier.managers.disk import DiskManager
from kvtier.managers.host import HostManager
from kvtier.managers.operations import Operation, Operations
from kvtier.managers.remote import RemoteManager
from kvtier.metrics import KvtierMetrics
from kvtier.pools.block_pool import MAX_PRIORITY
from kvtier.protocol import NO_SLOT, LoadOp, LoadResult
from kvtier.tiers import BlockKey, Tier

logger = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class _Load:
    op: LoadOp
    first_block: int                  # request block index of op's block 0
    source_tiers: list[Tier | None]   # None: nothing to load (the block failed to pin)
    g3_pins: list[int]                # G3 blocks pinned while they are read
    origins: Sequence[BlockOrigin] | None   # per block, for Stored events of promotions
    priority: int                     # retention priority of what is promoted
    # Reported by any rank so far (a block is good only if it is good on every rank).
    failed: set[int] = dataclasses.field(default_factory=set)
    corrupt: set[int] = dataclasses.field(default_factory=set)


class Loads:
    def __init__(self, host: HostManager, disk: DiskManager | None,
                 remote: RemoteManager | None, ops: Operations, metrics: KvtierMetrics,
                 block_tokens: int, on_failed: Callable[[str, int], None]) -> None:
        """``on_failed(req_id, block)``: the engine recomputes the request from ``block``."""
        self.host, self.disk, self.remote, self.ops = host, disk, remote, ops
        self.metrics = metrics
        self.block_tokens = block_tokens
        self._on_failed = on_failed
        self._latest: dict[str, int] = {}   # request id -> operation id of its latest load

    def begin(self, req_id: str, device_block_ids: Sequence[int], first_block: int,
              keys: Sequence[BlockKey], tiers: Sequence[Tier], num_blocks: int,
              sync: bool, origins: Sequence[BlockOrigin] | None = None,
              priority: int = MAX_PRIORITY) -> None:
        """Plan loading ``num_blocks`` blocks from ``first_block`` on; block ``i`` is
        ``keys[i]`` in ``tiers[i]`` (beyond ``len(tiers)``: nothing to load, an error)."""
        op = LoadOp(req_id, list(device_block_ids[first_block:first_block + num_blocks]),
                    [], [], [], sync=sync)
        load = _Load(op, first_block, [], [], origins, priority)
        op.op_id = self.ops.start(load, self)
        # Pin every host hit before staging anything: a staging slot may evict an inactive
        # host block, and it must not be one this load is about to pin.
        host_pins = {i: self.host.pin(keys[i]) for i in range(min(num_blocks, len(tiers)))
                     if tiers[i] is Tier.G2}
        if self.disk is not None:
            # The disk copy of a block the host serves is in use too: without this it ages out
            # as unused, and once the host evicts the block nobody serves it.
            self.disk.pool.touch([keys[i] for i in host_pins])
        for i in range(num_blocks):
            key, tier = (keys[i], tiers[i]) if i < len(tiers) else (0, None)
            g2_slot = g3_slot = None
            if tier is Tier.G2:
                g2_slot = host_pins[i]
            elif tier is Tier.G3:
                g3_slot = self.disk.pin(key)
                g2_slot = self.host.stage() if g3_slot is not None else None
                if g3_slot is not None and g2_slot is None:
                    self.disk.unpin([g3_slot])
                    g3_slot = None
            elif tier is Tier.G4:
                # Staged through G2 like disk reads; the store may have lost it meanwhile
                # (then the worker reports the block failed and it is recomputed).
                g2_slot = self.host.stage()
                if g2_slot is not None:
                    op.remote_idx.append(i)
            if g2_slot is None:
                tier = None
            if g3_slot is not None:
                load.g3_pins.append(g3_slot)
            op.g2_slots.append(NO_SLOT if g2_slot is None else g2_slot)
            op.g3_slots.append(NO_SLOT if g3_slot is None else g3_slot)
            op.keys.append(key)
            load.source_tiers.append(tier)
            if tier is not None and tier is not Tier.G2:
                self.host.arriving.add(key)   # on the host once the load lands: no store
        self.ops.plan.loads.append(op)
        self._latest[req_id] = op.op_id

    def of(self, req_id: str) -> _Load | None:
        """The request's latest load while some rank has not reported it."""
        op = self.ops.get(self._latest.get(req_id, 0))
        return op.work if op is not None else None

    def report(self, rank: int, result: LoadResult) -> Operation | None:
        """``rank``'s result of a load; the operation once every rank reported it."""
        op = self.ops.awaits(result.op_id, rank, _Load)
        if op is None:
            return None   # retired, or this rank's result counted already
        load = op.work
        load.failed.update(result.failed_idx)
        load.corrupt.update(result.corrupt_idx)
        for i in result.held_idx:
            self.host.hold(load.op.g2_slots[i], rank)
        return op

    def time_out(self, op: Operation) -> None:
        load = op.work
        load.failed.update(range(len(load.op.keys)))
        self._unstage(load)

    def _unstage(self, load: _Load) -> None:
        self.host.arriving.difference_update(
            key for key, tier in zip(load.op.keys, load.source_tiers)
            if tier is not None and tier is not Tier.G2)

    def commit(self, op: Operation) -> None:
        load: _Load = op.work
        lop = load.op
        req_id = lop.req_id
        failed, corrupt = load.failed, load.corrupt
        if self._latest.get(req_id) == op.op_id:
            del self._latest[req_id]
        if not op.timed_out:
            self._unstage(load)
        if load.g3_pins:
            self.disk.unpin(load.g3_pins)
        bad_g3: list[int] = []
        for i, (tier, slot, key) in enumerate(zip(load.source_tiers, lop.g2_slots, lop.keys)):
            if tier is None:
                continue
            if tier is Tier.G4 and i in failed:
                self.remote.load_failed(req_id, load.first_block + i, key)
                if self.host.is_held(slot):
                    self.host.park(slot)   # freed when every rank that holds it released it
                    continue
            self.host.complete_load(slot, key, staged=tier is not Tier.G2,
                                    ok=i not in failed, corrupt=i in corrupt,
                                    origin=load.origins[i] if load.origins else None,
                                    priority=load.priority)
            if i in corrupt and tier is Tier.G3:
                bad_g3.append(i)
        for tier in (Tier.G2, Tier.G3, Tier.G4):
            served = sum(1 for i, t in enumerate(load.source_tiers)
                         if t is tier and i not in failed)
            if served:
                self.metrics.record_match(tier, served, self.block_tokens)
        # Unpinnable blocks (no source) are in the worker's failed list too: count each once.
        all_failed = failed | {i for i, t in enumerate(load.source_tiers) if t is None}
        if all_failed:
            self.metrics.load_errors.inc(len(all_failed))
            self._on_failed(req_id, load.first_block + min(all_failed))
        if corrupt:
            self.metrics.checksum_failures.inc(len(corrupt))
            logger.warning("request %s: %d onboarded blocks failed verification; "
                           "they are recomputed and dropped from the tier", req_id, len(corrupt))
        num_remote_failed = sum(1 for i in failed if load.source_tiers[i] is Tier.G4)
        if num_remote_failed:
            logger.debug("request %s: %d blocks could not be read from the remote tier; they "
                         "are recomputed", req_id, num_remote_failed)
        if bad_g3:
            self.disk.discard([lop.keys[i] for i in bad_g3])
            # The workers drop their index entries, so a restart does not recover them.
            self.ops.plan.disk_discards.extend(lop.g3_slots[i] for i in bad_g3)
