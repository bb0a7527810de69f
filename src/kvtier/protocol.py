"""Messages between the leader (scheduler side) and the workers (one per rank).

The leader decides, once per engine step, which blocks move where and writes a ``StepPlan``;
every worker executes it and answers with a ``WorkerReport``. Both are plain data (lists of
ints and keys) so any engine can ship them between processes; no torch, no I/O here.

Slot ids are the block ids of the leader's tier pools: G2 slot ``s`` is block ``s`` of the G2
pool and the ``s``-th slot of each worker's host arena, likewise for G3 and the disk file.
"""

from __future__ import annotations

import dataclasses

from kvtier.errors import MetadataError
from kvtier.storage.block_format import BlockKey

NO_SLOT = -1


@dataclasses.dataclass(slots=True)
class LoadOp:
    """Onboard one request's matched prefix into its device blocks.

    Block ``i`` goes G3 slot ``g3_slots[i]`` (when not NO_SLOT) -> G2 slot ``g2_slots[i]`` ->
    device block ``device_block_ids[i]``. ``keys[i]`` is checked against the stored header.
    """

    req_id: str
    device_block_ids: list[int]
    g2_slots: list[int]
    g3_slots: list[int]
    keys: list[BlockKey]

    def validate(self) -> None:
        n = len(self.device_block_ids)
        if not (len(self.g2_slots) == len(self.g3_slots) == len(self.keys) == n):
            raise MetadataError(f"load for request {self.req_id!r}: block lists differ in length")


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
    # Requests whose device blocks the engine keeps until the workers report them sent.
    held_req_ids: list[str] = dataclasses.field(default_factory=list)
    layout: TierLayout | None = None

    def is_empty(self) -> bool:
        return not (self.loads or self.stores or self.disk_writes or self.disk_discards
                    or self.held_req_ids or self.layout)

    def validate(self) -> None:
        for load in self.loads:
            load.validate()
        self.stores.validate("stores")
        self.disk_writes.validate("disk writes")


@dataclasses.dataclass(slots=True)
class LoadResult:
    req_id: str
    # Indices (into the LoadOp's lists) of blocks that did not arrive intact.
    failed_idx: list[int]
    # Of those, the ones whose stored bytes were bad (checksum, header, short read), so the
    # leader forgets them rather than trying them again.
    corrupt_idx: list[int]


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

    def is_empty(self) -> bool:
        return not (self.stores_ok or self.stores_failed or self.disk_writes_ok
                    or self.disk_writes_failed or self.loads or self.timings
                    or self.recovered is not None)

    def merge(self, other: WorkerReport) -> WorkerReport:
        """Combine reports of several ranks: a block is good only if every rank has it."""
        failed_stores = set(self.stores_failed) | set(other.stores_failed)
        failed_writes = set(self.disk_writes_failed) | set(other.disk_writes_failed)
        loads: dict[str, LoadResult] = {r.req_id: r for r in self.loads}
        for r in other.loads:
            mine = loads.get(r.req_id)
            if mine is None:
                loads[r.req_id] = r
            else:
                loads[r.req_id] = LoadResult(
                    r.req_id, sorted(set(mine.failed_idx) | set(r.failed_idx)),
                    sorted(set(mine.corrupt_idx) | set(r.corrupt_idx)))
        timings = dict(self.timings)
        for name, t in other.timings.items():
            timings.setdefault(name, TransferTiming()).add(t.num_bytes, t.seconds)
        recovered = self.recovered
        if other.recovered is not None:
            # Keep only what every rank recovered.
            recovered = (other.recovered if recovered is None
                         else sorted(set(recovered) & set(other.recovered)))
        return WorkerReport(
            stores_ok=sorted((set(self.stores_ok) | set(other.stores_ok)) - failed_stores),
            stores_failed=sorted(failed_stores),
            disk_writes_ok=sorted((set(self.disk_writes_ok) | set(other.disk_writes_ok))
                                  - failed_writes),
            disk_writes_failed=sorted(failed_writes),
            loads=list(loads.values()),
            timings=timings,
            recovered=recovered,
        )
