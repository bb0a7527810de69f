"""The offload pipeline: device blocks that became full go down the tiers.

G1 -> G2 first (write-through: a *store*), then, once every rank has the bytes in G2, G2 -> G3
(a *disk write*) and G2 -> G4 (a *remote put*) if those tiers admit the block. Where the host
tier caches, disk and remote admission are decided when the store lands (a block the host
already holds counts as offered again); where G2 only stages, they are decided before the
device copy, so nothing is copied out that no tier below wants.

The G2 slot a disk write and a remote put read from is one pin shared as a lease
(``HostManager.lease``): the last of them to finish releases it.
"""

from __future__ import annotations

import dataclasses

from kvtier.events.types import BlockOrigin
from kvtier.managers.disk import DiskManager
from kvtier.managers.host import HostManager
from kvtier.managers.operations import Operation, Operations
from kvtier.managers.remote import RemoteManager
from kvtier.pools.block_pool import MAX_PRIORITY
from kvtier.tiers import BlockKey


@dataclasses.dataclass(slots=True)
class _Store:          # G1 -> G2
    g2_slot: int
    key: BlockKey
    to_disk: bool      # decided when planned where G2 only stages
    to_remote: bool
    origin: BlockOrigin | None
    priority: int      # retention priority: lower is evicted first


@dataclasses.dataclass(slots=True)
class _DiskWrite:      # G2 -> G3
    g2_slot: int
    g3_slot: int
    key: BlockKey
    origin: BlockOrigin | None
    priority: int


@dataclasses.dataclass(slots=True)
class _RemotePut:      # G2 -> G4
    g2_slot: int
    key: BlockKey


class OffloadPipeline:
    def __init__(self, host: HostManager, disk: DiskManager | None,
                 remote: RemoteManager | None, ops: Operations) -> None:
        self.host, self.disk, self.remote, self.ops = host, disk, remote, ops
        self._storing: set[BlockKey] = set()

    def offer(self, key: BlockKey, device_block_id: int,
              origin: BlockOrigin | None = None, priority: int = MAX_PRIORITY) -> None:
        """Device block ``device_block_id`` holds ``key`` in full: offload it where wanted
        (``origin``: for the Stored events, when events are on; ``priority``: its retention
        priority in the tiers, lower is evicted first)."""
        host = self.host
        if key in self._storing or key in host.arriving:
            return
        if host.caches and host.holds(key):
            # Already on the host: a re-offer counts toward disk and remote admission.
            host.pool.touch([key])
            to_disk, to_remote = self._wants_disk(key), self._wants_remote(key)
            if to_disk or to_remote:
                slot = host.pin(key)
                if slot is not None:
                    self._fan_out(slot, key, to_disk, to_remote, origin, priority)
            return
        if host.caches:
            to_disk = to_remote = False   # decided once the host holds the bytes
        else:
            to_disk, to_remote = self._wants_disk(key), self._wants_remote(key)
            if not (to_disk or to_remote):
                return
        slot = host.prepare_store()
        if slot is None:
            return
        op_id = self.ops.start(_Store(slot, key, to_disk, to_remote, origin, priority), self)
        self.ops.plan.stores.add(device_block_id, slot, key, op_id)
        self._storing.add(key)

    def _wants_disk(self, key: BlockKey) -> bool:
        return self.disk is not None and self.disk.wants(key)

    def _wants_remote(self, key: BlockKey) -> bool:
        return self.remote is not None and self.remote.wants(key)

    def _fan_out(self, g2_slot: int, key: BlockKey, to_disk: bool, to_remote: bool,
                 origin: BlockOrigin | None, priority: int) -> None:
        """Hand the caller's pin on a G2 block to a disk write and/or a remote put as a lease,
        or release it when neither wants the block."""
        to_disk = to_disk and self.disk is not None
        self.host.lease(g2_slot, to_disk + to_remote)
        if to_disk:
            g3_slot = self.disk.prepare_store(key)
            if g3_slot is None:
                self.host.end_lease(g2_slot)
            else:
                op_id = self.ops.start(_DiskWrite(g2_slot, g3_slot, key, origin, priority), self)
                self.ops.plan.disk_writes.add(g2_slot, g3_slot, key, op_id)
        if to_remote:
            self.remote.prepare_store(key)
            op_id = self.ops.start(_RemotePut(g2_slot, key), self)
            self.ops.plan.remote_puts.add(g2_slot, key, op_id)

    # -- operations -----------------------------------------------------------------------
    def commit(self, op: Operation) -> None:
        """Every rank has reported ``op``. ``op.timed_out``: its key was handed back when the
        deadline passed (it may belong to a newer operation by now)."""
        work, ok, timed_out = op.work, op.ok, op.timed_out
        if isinstance(work, _Store):
            if not timed_out:
                self._storing.discard(work.key)
            slot = self.host.complete_store(work.g2_slot, work.key, ok, work.origin,
                                            work.priority)
            if slot is None:
                return
            to_disk, to_remote = work.to_disk, work.to_remote
            if self.host.caches:
                to_disk, to_remote = self._wants_disk(work.key), self._wants_remote(work.key)
            self._fan_out(slot, work.key, to_disk, to_remote, work.origin, work.priority)
        elif isinstance(work, _DiskWrite):
            self.host.end_lease(work.g2_slot)
            self.disk.complete_store(work.g3_slot, work.key, ok, timed_out, work.origin,
                                     work.priority)
        else:
            self.host.end_lease(work.g2_slot)
            self.remote.complete_store(work.key, ok, timed_out)

    def time_out(self, op: Operation) -> None:
        work = op.work
        if isinstance(work, _Store):
            self._storing.discard(work.key)
        elif isinstance(work, _DiskWrite):
            self.disk.abandon(work.key)
        else:
            self.remote.abandon(work.key)
