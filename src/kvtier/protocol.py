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
"""

from __future__ import annotations

import dataclasses

from kvtier.errors import MetadataError
from kvtier.storage.block_format import BlockKey

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
    """A batch of single-block copies between two tiers: ``src[i] -> dst[i]`` holding ``keys[i]``."""

    src: list[int] = dataclasses.field(default_factory=list)
    dst: list[int] = dataclasses.field(default_factory=list)
    keys: list[BlockKey] = dataclasses.field(default_factory=list)

    def add(self, src: int, dst: int, key: BlockKey) -> None:
        self.src.append(src)
        self.dst.append(dst)
        self.keys.append(key)

    def __len__(self) -> int:
        return len(self.src)

    def validate(self, what: str) -> None:
        if not len(self.src) == len(self.dst) == len(self.keys):
            raise MetadataError(f"{what}: src, dst and keys differ in length")


@dataclasses.dataclass(slots=True)
class SlotKeys:
    """G2 slots and the block each holds: ``slots[i]`` holds ``keys[i]`` (G2 -> G4 puts)."""

    slots: list[int] = dataclasses.field(default_factory=list)
    keys: list[BlockKey] = dataclasses.field(default_factory=list)

    def add(self, slot: int, key: BlockKey) -> None:
        self.slots.append(slot)
        self.keys.append(key)

    def __len__(self) -> int:
        return len(self.slots)

    def validate(self, what: str) -> None:
        if len(self.slots) != len(self.keys):
            raise MetadataError(f"{what}: slots and keys differ in length")


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
    # Request id -> keys to look up in G4 (answered in WorkerReport.remote_present).
    remote_probes: dict[str, list[BlockKey]] = dataclasses.field(default_factory=dict)
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
    """What a worker finished since its last report (vLLM: the connector worker metadata)."""

    stores_ok: list[int] = dataclasses.field(default_factory=list)       # G2 slots
    stores_failed: list[int] = dataclasses.field(default_factory=list)
    disk_writes_ok: list[int] = dataclasses.field(default_factory=list)  # G3 slots
    disk_writes_failed: list[int] = dataclasses.field(default_factory=list)
    loads: list[LoadResult] = dataclasses.field(default_factory=list)
    # Direction name ("g1_to_g2", "g3_to_g2", ...) -> timing.
    timings: dict[str, TransferTiming] = dataclasses.field(default_factory=dict)
    # Disk index recovered at start-up: (G3 slot, key); sent once.
    recovered: list[tuple[int, BlockKey]] | None = None
    # G2 -> G4 puts that finished, by G2 slot.
    remote_puts_ok: list[int] = dataclasses.field(default_factory=list)
    remote_puts_failed: list[int] = dataclasses.field(default_factory=list)
    # Answers to StepPlan.remote_probes: request id -> leading keys the store holds.
    remote_present: dict[str, int] = dataclasses.field(default_factory=dict)
    # G2 staging slots of LoadResult.held_idx that no late remote write can touch any more.
    staging_released: list[int] = dataclasses.field(default_factory=list)
    # Whether the remote store answers; sent when it changes (None: no news).
    remote_healthy: bool | None = None
    # Remote tier counters (RetryingBackend.stats names) since the last report.
    remote_stats: dict[str, int] = dataclasses.field(default_factory=dict)

    def is_empty(self) -> bool:
        return not (self.stores_ok or self.stores_failed or self.disk_writes_ok
                    or self.disk_writes_failed or self.loads or self.timings
                    or self.recovered is not None or self.remote_puts_ok
                    or self.remote_puts_failed or self.remote_present
                    or self.staging_released or self.remote_healthy is not None
                    or self.remote_stats)

    def merge(self, other: WorkerReport) -> WorkerReport:
        """Combine reports of several ranks: a block is good only if every rank has it."""
        failed_stores = set(self.stores_failed) | set(other.stores_failed)
        failed_writes = set(self.disk_writes_failed) | set(other.disk_writes_failed)
        failed_puts = set(self.remote_puts_failed) | set(other.remote_puts_failed)
        loads: dict[str, LoadResult] = {r.req_id: r for r in self.loads}
        for r in other.loads:
            mine = loads.get(r.req_id)
            if mine is None:
                loads[r.req_id] = r
            else:
                loads[r.req_id] = LoadResult(
                    r.req_id, sorted(set(mine.failed_idx) | set(r.failed_idx)),
                    sorted(set(mine.corrupt_idx) | set(r.corrupt_idx)),
                    sorted(set(mine.held_idx) | set(r.held_idx)))
        timings = dict(self.timings)
        for name, t in other.timings.items():
            timings.setdefault(name, TransferTiming()).add(t.num_bytes, t.seconds)
        recovered = self.recovered
        if other.recovered is not None:
            # Keep only what every rank recovered.
            recovered = (other.recovered if recovered is None
                         else sorted(set(recovered) & set(other.recovered)))
        # A key is present only if every rank's store holds it.
        present = dict(self.remote_present)
        for req_id, num in other.remote_present.items():
            present[req_id] = min(num, present.get(req_id, num))
        healthy = self.remote_healthy
        if other.remote_healthy is not None:
            healthy = other.remote_healthy if healthy is None else healthy and other.remote_healthy
        stats = dict(self.remote_stats)
        for name, value in other.remote_stats.items():
            stats[name] = stats.get(name, 0) + value
        return WorkerReport(
            stores_ok=sorted((set(self.stores_ok) | set(other.stores_ok)) - failed_stores),
            stores_failed=sorted(failed_stores),
            disk_writes_ok=sorted((set(self.disk_writes_ok) | set(other.disk_writes_ok))
                                  - failed_writes),
            disk_writes_failed=sorted(failed_writes),
            loads=list(loads.values()),
            timings=timings,
            recovered=recovered,
            remote_puts_ok=sorted((set(self.remote_puts_ok) | set(other.remote_puts_ok))
                                  - failed_puts),
            remote_puts_failed=sorted(failed_puts),
            remote_present=present,
            staging_released=sorted(set(self.staging_released) | set(other.staging_released)),
            remote_healthy=healthy,
            remote_stats=stats,
        )
