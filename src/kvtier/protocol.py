"""Messages between the leader (scheduler side) and the workers (one per rank).

The leader decides, once per engine step, which blocks move where and writes a ``StepPlan``;
every worker executes it and answers with a ``WorkerReport``. Both are plain data (lists of
ints and keys) so any engine can ship them between processes; no torch, no I/O here.

Slot ids are the block ids of the leader's tier pools: G2 slot ``s`` is block ``s`` of the G2
pool and the ``s``-th slot of each worker's host arena, likewise for G3 and the disk file.
G4 (the shared remote store) has no slots: its blocks are named by key only, and every G4
transfer goes through a G2 slot.

Remote existence is asked, not known: the leader cannot see the shared store, so it names the
keys it wants checked (``StepPlan.remote_probes``) and a worker answers how many leading keys the
store holds (``WorkerReport.remote_present``).

Every planned operation (a load, a store, a disk write, a remote put, a probe) carries an
operation id, unique and increasing per leader. Each rank reports its own outcome of each
operation by that id, in whichever step it finishes there; reports of several ranks are not
merged into one but travel side by side (``WorkerReport.rank``), and the leader commits an
operation only once every rank has reported it. Results are never keyed by slot: a slot is
reused, an operation id never is.
"""

from __future__ import annotations

import dataclasses

from kvtier.errors import MetadataError
from kvtier.tiers import BlockKey

NO_SLOT = -1


@dataclasses.dataclass(slots=True)
class LoadOp:
    """Onboard one request's matched prefix into its device blocks.

    Block ``i`` goes G3 slot ``g3_slots[i]`` (when not NO_SLOT), or the remote store when ``i``
    is in ``remote_idx``, -> G2 slot ``g2_slots[i]`` -> device block ``device_block_ids[i]``.
    ``keys[i]`` is checked against the stored header: on arrival in G2 for disk and remote
    blocks, before the copy to the device for blocks already in G2 (``verify_host``).
    """

    req_id: str
    device_block_ids: list[int]
    g2_slots: list[int]
    g3_slots: list[int]
    keys: list[BlockKey]
    # Indices of the blocks staged from G4 (their g3_slots entry is NO_SLOT).
    remote_idx: list[int] = dataclasses.field(default_factory=list)
    # Synchronous: done before this step's forward pass, which uses the blocks (never for G4
    # sources). Asynchronous loads finish between steps and are reported as received.
    sync: bool = False
    op_id: int = 0

    def validate(self) -> None:
        n = len(self.device_block_ids)
        if not (len(self.g2_slots) == len(self.g3_slots) == len(self.keys) == n):
            raise MetadataError(f"load for request {self.req_id!r}: block lists differ in length")
        for i in self.remote_idx:
            if not 0 <= i < n or self.g3_slots[i] != NO_SLOT:
                raise MetadataError(f"load for request {self.req_id!r}: remote block index {i} "
                                    "is out of range or also read from disk")
        if len(set(self.remote_idx)) != len(self.remote_idx):
            raise MetadataError(f"load for request {self.req_id!r}: a remote block is named "
                                "twice")


@dataclasses.dataclass(slots=True)
class CopyOps:
    """A batch of single-block copies between two tiers: ``src[i] -> dst[i]`` holding
    ``keys[i]``, each its own operation ``op_ids[i]``."""

    src: list[int] = dataclasses.field(default_factory=list)
    dst: list[int] = dataclasses.field(default_factory=list)
    keys: list[BlockKey] = dataclasses.field(default_factory=list)
    op_ids: list[int] = dataclasses.field(default_factory=list)

    def add(self, src: int, dst: int, key: BlockKey, op_id: int) -> None:
        self.src.append(src)
        self.dst.append(dst)
        self.keys.append(key)
        self.op_ids.append(op_id)

    def __len__(self) -> int:
        return len(self.src)

    def validate(self, what: str) -> None:
        if not len(self.src) == len(self.dst) == len(self.keys) == len(self.op_ids):
            raise MetadataError(f"{what}: src, dst, keys and op_ids differ in length")


@dataclasses.dataclass(slots=True)
class SlotKeys:
    """G2 slots and the block each holds: ``slots[i]`` holds ``keys[i]`` (G2 -> G4 puts), each
    its own operation ``op_ids[i]``."""

    slots: list[int] = dataclasses.field(default_factory=list)
    keys: list[BlockKey] = dataclasses.field(default_factory=list)
    op_ids: list[int] = dataclasses.field(default_factory=list)

    def add(self, slot: int, key: BlockKey, op_id: int) -> None:
        self.slots.append(slot)
        self.keys.append(key)
        self.op_ids.append(op_id)

    def __len__(self) -> int:
        return len(self.slots)

    def validate(self, what: str) -> None:
        if not len(self.slots) == len(self.keys) == len(self.op_ids):
            raise MetadataError(f"{what}: slots, keys and op_ids differ in length")


@dataclasses.dataclass(frozen=True, slots=True)
class TierLayout:
    """Tier sizes the leader planned with; each worker checks its own against them once."""

    num_g2_slots: int
    num_g3_slots: int
    block_bytes: int


@dataclasses.dataclass(slots=True)
class StepPlan:
    """What the workers do this step (vLLM: the connector metadata)."""

    loads: list[LoadOp] = dataclasses.field(default_factory=list)
    # G1 -> G2, copied after the step's forward pass has written the blocks.
    stores: CopyOps = dataclasses.field(default_factory=CopyOps)
    # G2 -> G3 writes of blocks already registered in G2 (asynchronous).
    disk_writes: CopyOps = dataclasses.field(default_factory=CopyOps)
    # G3 slots whose index entries must go (bad bytes, or about to be reused).
    disk_discards: list[int] = dataclasses.field(default_factory=list)
    # G2 -> G4 puts of blocks already in G2 (asynchronous; the store keeps the first write).
    remote_puts: SlotKeys = dataclasses.field(default_factory=SlotKeys)
    # Probe operation id -> keys to look up in G4 (answered in WorkerReport.remote_present).
    remote_probes: dict[int, list[BlockKey]] = dataclasses.field(default_factory=dict)
    layout: TierLayout | None = None

    def is_empty(self) -> bool:
        return not (self.loads or self.stores or self.disk_writes or self.disk_discards
                    or self.remote_puts or self.remote_probes or self.layout)

    def validate(self) -> None:
        for load in self.loads:
            load.validate()
        self.stores.validate("stores")
        self.disk_writes.validate("disk writes")
        self.remote_puts.validate("remote puts")


@dataclasses.dataclass(slots=True)
class LoadResult:
    """One rank's outcome of one LoadOp."""

    req_id: str
    # Indices (into the LoadOp's lists) of blocks that did not arrive intact.
    failed_idx: list[int]
    # Of those, the ones whose stored bytes were bad (checksum, header, short read), so the
    # leader forgets them rather than trying them again.
    corrupt_idx: list[int]
    # Of the failed ones, blocks whose G2 staging slot a timed-out remote read may still write
    # into: the leader keeps those slots out of use until ``WorkerReport.staging_released``
    # names them.
    held_idx: list[int] = dataclasses.field(default_factory=list)
    op_id: int = 0


@dataclasses.dataclass(slots=True)
class TransferTiming:
    """Bytes moved and seconds spent by one kind of transfer, for bandwidth estimates."""

    num_bytes: int = 0
    seconds: float = 0.0

    def add(self, num_bytes: int, seconds: float) -> None:
        self.num_bytes += num_bytes
        self.seconds += seconds


@dataclasses.dataclass(slots=True)
class WorkerReport:
    """What one rank finished since its last report (vLLM: the connector worker metadata).

    Per-operation results name the operation by id; the leader adds them up across ranks."""

    rank: int = 0
    # Stores, disk writes and remote puts that finished, by operation id.
    ops_ok: list[int] = dataclasses.field(default_factory=list)
    ops_failed: list[int] = dataclasses.field(default_factory=list)
    loads: list[LoadResult] = dataclasses.field(default_factory=list)
    # Direction name ("g1_to_g2", "g3_to_g2", ...) -> timing.
    timings: dict[str, TransferTiming] = dataclasses.field(default_factory=dict)
    # Disk index recovered at start-up: (G3 slot, key); sent once.
    recovered: list[tuple[int, BlockKey]] | None = None
    # Answers to StepPlan.remote_probes: probe operation id -> leading keys the store holds.
    remote_present: dict[int, int] = dataclasses.field(default_factory=dict)
    # G2 staging slots of this rank's LoadResult.held_idx that no late remote write of this
    # rank can touch any more.
    staging_released: list[int] = dataclasses.field(default_factory=list)
    # Whether the remote store answers; sent when it changes (None: no news).
    remote_healthy: bool | None = None
    # Remote tier counters (RetryingBackend.stats names) since the last report.
    remote_stats: dict[str, int] = dataclasses.field(default_factory=dict)

    def is_empty(self) -> bool:
        return not (self.ops_ok or self.ops_failed or self.loads or self.timings
                    or self.recovered is not None or self.remote_present
                    or self.staging_released or self.remote_healthy is not None
                    or self.remote_stats)
