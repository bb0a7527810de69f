"""The worker: owns the bytes of one rank and executes the leader's StepPlans.

It holds the engine's registered KV tensors (G1), the host arena (G2), the disk tier (G3),
the client of the shared remote store (G4) and the transfer engine. Per step the engine adapter
calls:

  start_loads(plan)  onboard: G2 -> G1 now; G3/G4 -> G2 reads in the background; G4 lookups
  save(plan)         after the forward pass: G1 -> G2 copies, then G2 -> G3/G4 writes queued
  poll()             finish background reads (scatter into G1), collect finished transfers
  take_report()      what finished since the last report, for the leader

Nothing here decides policy: which block goes where is the leader's plan.

Every block is verified before the device sees it. Blocks read from G3/G4 are checked on
arrival in G2 (header, key, checksum). Blocks offloaded G1 -> G2 get their header stamped as
they are copied (checksum computed while the bytes are in cache), and a load checks every block
that was already in G2 against its key before scattering it (``verify_host``, on by default): a
block that fails stays off the device and is reported failed and corrupt, so vLLM recomputes
it and the leader drops it from G2.

The remote store may be down at start-up, lost or slow at any time: the worker then runs on the
local tiers (every remote call answers "no" at once), reconnects in the background with backoff,
and reports the store's health so the leader stops planning remote work meanwhile. A remote read
that timed out may still land in its staging slots later (zero-copy clients): those slots are
reported held (``LoadResult.held_idx``) and released only once the client says ``drained``.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from kvtier.config import KvtierConfig
from kvtier.errors import LayoutError, StorageError
from kvtier.layout import DeviceKV
from kvtier.protocol import (
    NO_SLOT,
    LoadOp,
    LoadResult,
    StepPlan,
    TierLayout,
    TransferTiming,
    WorkerReport,
)
from kvtier.storage import faults
from kvtier.storage.disk import DiskStorage
from kvtier.storage.host import HostArena
from kvtier.storage.remote import RetryingBackend, make_namespace
from kvtier.tiers import Tier
from kvtier.transfer import (
    TransferEngine,
    TransferKind,
    TransferRequest,
    copy_device_to_host,
    copy_host_to_device,
)
from kvtier.transfer.remote import HostToRemote, RemoteProber, RemoteToHost

logger = logging.getLogger(__name__)

# Remote tier counters passed on to the leader's metrics (RetryingBackend.stats names).
_REMOTE_STATS = ("errors", "timeouts", "unavailable", "put_failures", "misses",
                 "checksum_failures", "reconnects", "connect_failures")


@dataclasses.dataclass(slots=True)
class _PendingLoad:
    op: LoadOp
    # Transfer id -> (source tier, indices of op's blocks that transfer stages into G2).
    parts: dict[int, tuple[Tier, list[int]]]
    started: float
    failed: set[int] = dataclasses.field(default_factory=set)
    corrupt: set[int] = dataclasses.field(default_factory=set)
    held: set[int] = dataclasses.field(default_factory=set)


class Worker:
    def __init__(self, config: KvtierConfig, layout: TierLayout, *, model_id: str = "",
                 rank: int = 0) -> None:
        self.config = config
        self.layout = layout
        self.model_id = model_id
        self.rank = rank
        self.device: DeviceKV | None = None
        self.arena: HostArena | None = None
        self.disk: DiskStorage | None = None
        self.remote: RetryingBackend | None = None
        self.engine: TransferEngine | None = None
        self._prober: RemoteProber | None = None
        self._report = WorkerReport(rank=rank)
        self._pending_loads: list[_PendingLoad] = []
        # Transfer id -> (operation ids of its blocks, start time).
        self._pending_writes: dict[int, tuple[list[int], float]] = {}
        self._pending_puts: dict[int, tuple[list[int], float]] = {}
        # G2 staging slots a timed-out remote read may still write into.
        self._held_slots: list[int] = []
        self._remote_healthy: bool | None = None
        self._remote_stats: dict[str, int] = {}
        self._finished_loads: set[str] = set()
        self._load_errors: set[int] = set()
        self._checked_layout = False
        self._fingerprint = 0

    # -- set-up -------------------------------------------------------------------------
    def register(self, kv_caches: dict[str, torch.Tensor], block_tokens: int) -> None:
        self.device = DeviceKV.from_tensors(kv_caches, block_tokens)
        geometry = self.device.geometry
        if geometry.block_bytes != self.layout.block_bytes:
            raise LayoutError(
                f"registered KV tensors hold {geometry.block_bytes} bytes per block, but the "
                f"engine's KV cache spec says {self.layout.block_bytes}: unsupported layout "
                f"{geometry.layout.name} of {len(kv_caches)} layers")
        fingerprint = self._fingerprint = geometry.fingerprint(self.model_id)
        if self.layout.num_g2_slots:
            started = time.perf_counter()
            self.arena = HostArena(self.layout.num_g2_slots, geometry)
            # KV bytes as the start-up summary counts them; the arena adds a header per slot.
            logger.info("kvtier: rank %d host tier of %d blocks (%.2f GB of KV, %.2f GB "
                        "with headers) ready in %.1f s", self.rank, self.layout.num_g2_slots,
                        self.layout.num_g2_slots * self.layout.block_bytes / 1e9,
                        self.arena.nbytes / 1e9, time.perf_counter() - started)
        if self.layout.num_g3_slots:
            directory = f"{self.config.disk_dir}/rank{self.rank}"
            self.disk = DiskStorage(directory, self.layout.num_g3_slots, self.arena.slot_bytes,
                                    fingerprint, o_direct=self.config.disk_o_direct,
                                    io_threads=self.config.disk_io_threads)
            self._report.recovered = self.disk.recover()
            # DiskStorage logs the tier at INFO (slots, recovered blocks, I/O mode).
            logger.debug("kvtier: disk tier of %d blocks in %s, %d recovered",
                         self.layout.num_g3_slots, directory, len(self._report.recovered))
        self.engine = TransferEngine(arena=self.arena, disk=self.disk,
                                     max_batch_blocks=self.config.max_transfer_batch_blocks,
                                     max_concurrent=self.config.max_concurrent_transfers)
        if self.config.has_remote and self.arena is not None:
            self._open_remote(fingerprint)

    def _open_remote(self, fingerprint: int) -> None:
        """Connect G4. An unreachable store is not an error: the tier retries in the
        background (logged once) and the engine runs on its local tiers meanwhile."""
        namespace = make_namespace(self.model_id or "model", fingerprint, self.rank)
        self.remote = RetryingBackend(self.config.remote_url, namespace=namespace,
                                      timeout_s=self.config.remote_timeout_ms / 1000)
        self.engine.add_executor(Tier.G2, Tier.G4,
                                 HostToRemote(self.arena, self.remote, fingerprint))
        self.engine.add_executor(Tier.G4, Tier.G2, RemoteToHost(self.arena, self.remote))
        self._prober = RemoteProber(self.remote)
        self._remote_stats = {name: 0 for name in _REMOTE_STATS}
        self._note_remote_health()
        logger.info("kvtier: remote tier %s (%s)", self.remote.url,
                    "connected" if self.remote.healthy else "not reachable yet; retrying")

    def close(self) -> None:
        if self._prober is not None:
            self._prober.close()
        if self.engine is not None:
            self.engine.close()
        if self.remote is not None:
            self.remote.close()
        if self.disk is not None:
            self.disk.close()

    # -- per step -----------------------------------------------------------------------
    def start_loads(self, plan: StepPlan) -> None:
        self._check_layout(plan)
        # A malformed plan is a broken contract between the halves: refuse it whole rather
        # than load some blocks and leave others unreported.
        plan.validate()
        for op_id, keys in plan.remote_probes.items():
            if self._prober is None:
                self._report.remote_present[op_id] = 0
            else:
                self._prober.probe(op_id, keys)
        for op in plan.loads:
            load = _PendingLoad(op, {}, time.perf_counter())
            disk_idx = [i for i, s in enumerate(op.g3_slots) if s != NO_SLOT]
            if disk_idx and op.sync:
                # The step's forward pass reads these blocks: read them now, on this thread
                # (the leader makes a load synchronous only when it takes a few ms).
                started = time.perf_counter()
                ok = self.disk.read(self.arena, [(op.g3_slots[i], op.g2_slots[i], op.keys[i])
                                                 for i in disk_idx])
                bad = {i for i, good in zip(disk_idx, ok) if not good}
                load.failed |= bad
                load.corrupt |= bad
                self._time("g3_to_g2", len(disk_idx) - len(bad), started)
            elif disk_idx:
                request = TransferRequest(TransferKind.ONBOARD, Tier.G3, Tier.G2,
                                          [op.g3_slots[i] for i in disk_idx],
                                          [op.g2_slots[i] for i in disk_idx],
                                          [op.keys[i] for i in disk_idx])
                load.parts[self.engine.submit(request)] = (Tier.G3, disk_idx)
            remote_idx = [i for i in op.remote_idx if op.g2_slots[i] != NO_SLOT]
            if remote_idx and self.remote is None:
                load.failed.update(remote_idx)
            elif remote_idx:
                slots = [op.g2_slots[i] for i in remote_idx]
                request = TransferRequest(TransferKind.ONBOARD, Tier.G4, Tier.G2, slots,
                                          slots, [op.keys[i] for i in remote_idx])
                load.parts[self.engine.submit(request)] = (Tier.G4, remote_idx)
            if load.parts:
                self._pending_loads.append(load)
            else:
                self._finish_load(load)

    def save(self, plan: StepPlan) -> None:
        """Copy this step's completed blocks to the host; queue disk writes. Runs after the
        forward pass, and returns only when the device blocks may be reused."""
        self._check_layout(plan)
        stores = plan.stores
        if len(stores):
            started = time.perf_counter()
            try:
                if self.config.verify_host:  # stamp the headers loads will verify
                    copy_device_to_host(self.device, stores.src, self.arena, stores.dst,
                                        keys=stores.keys, fingerprint=self._fingerprint)
                else:
                    copy_device_to_host(self.device, stores.src, self.arena, stores.dst)
                self._report.ops_ok.extend(stores.op_ids)
            except Exception:  # a failed copy is a dropped offload, never a failed step
                logger.exception("kvtier: offload of %d blocks to host failed", len(stores))
                self._report.ops_failed.extend(stores.op_ids)
            self._time("g1_to_g2", len(stores), started)
        if plan.disk_discards and self.disk is not None:
            self.disk.invalidate(plan.disk_discards)
        writes = plan.disk_writes
        if len(writes):
            request = TransferRequest(TransferKind.OFFLOAD, Tier.G2, Tier.G3, list(writes.src),
                                      list(writes.dst), list(writes.keys))
            self._pending_writes[self.engine.submit(request)] = (list(writes.op_ids),
                                                                 time.perf_counter())
        puts = plan.remote_puts
        if len(puts):
            if self.remote is None:
                self._report.ops_failed.extend(puts.op_ids)
            else:
                request = TransferRequest(TransferKind.OFFLOAD, Tier.G2, Tier.G4,
                                          list(puts.slots), list(puts.slots), list(puts.keys))
                self._pending_puts[self.engine.submit(request)] = (list(puts.op_ids),
                                                                   time.perf_counter())

    def poll(self) -> None:
        """Collect finished background transfers (never waits)."""
        if self.engine is None:
            return
        if self.remote is not None:
            self._poll_remote()
        done = {result.id: result for result in self.engine.poll()}
        if done:
            self._collect(done)
        if self._held_slots and self.remote.drained:
            # No abandoned remote read can write into these slots any more.
            self._report.staging_released.extend(self._held_slots)
            self._held_slots = []

    def _collect(self, done: dict) -> None:
        for transfer_id, result in done.items():
            for pending, direction in ((self._pending_writes, "g2_to_g3"),
                                       (self._pending_puts, "g2_to_g4")):
                entry = pending.pop(transfer_id, None)
                if entry is not None:
                    op_ids, started = entry
                    for op_id, ok in zip(op_ids, result.ok):
                        (self._report.ops_ok if ok else self._report.ops_failed).append(op_id)
                    self._time(direction, sum(result.ok), started)
                    break
        still_pending = []
        for load in self._pending_loads:
            for transfer_id in [t for t in load.parts if t in done]:
                tier, idx = load.parts.pop(transfer_id)
                bad = {i for i, ok in zip(idx, done[transfer_id].ok) if not ok}
                load.failed |= bad
                if tier is Tier.G3:
                    load.corrupt |= bad  # a disk block that does not verify is bad bytes
                    self._time("g3_to_g2", len(idx) - len(bad), load.started)
                else:
                    # A remote miss may be eviction or a timeout; the leader forgets the key
                    # either way. After a timeout the read may still land: hold its slots.
                    if bad and not self.remote.drained:
                        load.held |= bad
                    self._time("g4_to_g2", len(idx) - len(bad), load.started)
            if load.parts:
                still_pending.append(load)
            else:
                self._finish_load(load)
        self._pending_loads = still_pending

    def _poll_remote(self) -> None:
        for op_id, num in self._prober.take_answers():
            self._report.remote_present[op_id] = num
        self._note_remote_health()
        stats = self.remote.stats
        last = self._remote_stats
        for name in _REMOTE_STATS:
            delta = stats.get(name, 0) - last[name]
            if delta:
                self._report.remote_stats[name] = (self._report.remote_stats.get(name, 0)
                                                   + delta)
                last[name] += delta

    def _note_remote_health(self) -> None:
        healthy = self.remote.healthy
        if healthy != self._remote_healthy:
            self._remote_healthy = healthy
            self._report.remote_healthy = healthy

    def take_finished_loads(self) -> set[str]:
        finished, self._finished_loads = self._finished_loads, set()
        return finished

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def take_report(self) -> WorkerReport | None:
        if self._report.is_empty():
            return None
        report, self._report = self._report, WorkerReport(rank=self.rank)
        return report

    @property
    def busy(self) -> bool:
        """Transfers or probes in flight, or staging slots still held."""
        return bool(self._in_flight() or self._held_slots)

    def _in_flight(self) -> bool:
        return bool(self._pending_loads or self._pending_writes or self._pending_puts
                    or (self._prober is not None and self._prober.pending))

    def drain(self, timeout_s: float = 30.0) -> None:
        """Wait for background transfers (shutdown and tests only, never in a step). Slots
        held for a stalled remote store are not waited for: the process is going away."""
        deadline = time.monotonic() + timeout_s
        while self._in_flight() and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.001)

    # -- internals ----------------------------------------------------------------------
    def _finish_load(self, load: _PendingLoad) -> None:
        """Verify the G2 blocks, scatter those intact into the device; report the rest."""
        op, corrupt = load.op, load.corrupt
        failed = load.failed | {i for i, s in enumerate(op.g2_slots) if s == NO_SLOT}
        good = [i for i in range(len(op.keys)) if i not in failed]
        if good:
            started = time.perf_counter()
            slots = [op.g2_slots[i] for i in good]
            block_ids = [op.device_block_ids[i] for i in good]
            # Blocks staged from G3/G4 were verified on arrival; the rest were in G2 already.
            staged = set(op.remote_idx)
            resident = [op.g3_slots[i] == NO_SLOT and i not in staged for i in good]
            try:
                if faults.active:
                    faults.host_load(self.arena, [s for s, r in zip(slots, resident) if r])
                if self.config.verify_host:
                    bad = copy_host_to_device(self.arena, slots, self.device, block_ids,
                                              keys=[op.keys[i] for i in good],
                                              fingerprint=self._fingerprint, check=resident)
                else:
                    bad = copy_host_to_device(self.arena, slots, self.device, block_ids)
                if bad:
                    bad_idx = {good[j] for j in bad}
                    logger.debug("kvtier: request %s: %d host blocks failed verification",
                                 op.req_id, len(bad_idx))
                    failed = failed | bad_idx
                    corrupt = corrupt | bad_idx
                    skipped = set(bad)
                    kept = [j for j in range(len(good)) if j not in skipped]
                    slots = [slots[j] for j in kept]
                    block_ids = [block_ids[j] for j in kept]
                self._time("g2_to_g1", len(block_ids), started)
                if faults.active:
                    faults.onboard_bypass(self.device, self.arena, slots, block_ids,
                                          op.g2_slots)
            except Exception:
                logger.exception("kvtier: onboard of request %s failed", op.req_id)
                failed = set(range(len(op.keys)))
        self._load_errors.update(op.device_block_ids[i] for i in failed)
        held = sorted(load.held)
        self._held_slots.extend(op.g2_slots[i] for i in held)
        self._report.loads.append(LoadResult(op.req_id, sorted(failed), sorted(corrupt), held,
                                             op_id=op.op_id))
        if not op.sync:
            # vLLM waits for asynchronous loads only; a synchronous one is not "received".
            self._finished_loads.add(op.req_id)

    def _time(self, direction: str, num_blocks: int, started: float) -> None:
        if num_blocks <= 0:
            return
        timing = self._report.timings.get(direction)
        if timing is None:
            timing = self._report.timings[direction] = TransferTiming()
        timing.add(num_blocks * self.layout.block_bytes, time.perf_counter() - started)

    def _check_layout(self, plan: StepPlan) -> None:
        if plan.layout is None or self._checked_layout:
            return
        if plan.layout != self.layout:
            raise StorageError(f"kvtier worker sized its tiers as {self.layout}, but the leader "
                               f"planned with {plan.layout}; check that every process sees the "
                               "same kvtier config")
        self._checked_layout = True
