"""The worker: owns the bytes of one rank and executes the leader's StepPlans.

It holds the engine's registered KV tensors (G1), the host arena (G2), the disk tier (G3)
and the transfer engine. Per step the engine adapter calls:

  start_loads(plan)  onboard: G2 -> G1 now; G3 -> G2 reads in the background
  save(plan)         after the forward pass: G1 -> G2 copies, then G2 -> G3 writes queued
  poll()             finish background reads (scatter into G1), collect finished transfers
  take_report()      what finished since the last report, for the leader

Nothing here decides policy: which block goes where is the leader's plan.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from kvtier.config import KvtierConfig
from kvtier.errors import LayoutError, StorageError
from kvtier.layout import DeviceKV
from kvtier.protocol import (NO_SLOT, LoadOp, LoadResult, StepPlan, TierLayout, TransferTiming,
                              WorkerReport)
from kvtier.storage.disk import DiskStorage
from kvtier.storage.host import HostArena
from kvtier.tiers import Tier
from kvtier.transfer import (TransferEngine, TransferKind, TransferRequest,
                             copy_device_to_host, copy_host_to_device)

logger = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class _PendingLoad:
    op: LoadOp
    transfer_id: int
    disk_idx: list[int]      # indices of op's blocks read from disk by transfer_id
    started: float


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
        self.engine: TransferEngine | None = None
        self._report = WorkerReport()
        self._pending_loads: list[_PendingLoad] = []
        self._pending_writes: dict[int, tuple[list[int], float]] = {}  # transfer id -> G3 slots
        self._finished_loads: set[str] = set()
        self._load_errors: set[int] = set()
        self._checked_layout = False

    # -- set-up -------------------------------------------------------------------------
    def register(self, kv_caches: dict[str, torch.Tensor], block_tokens: int) -> None:
        self.device = DeviceKV.from_tensors(kv_caches, block_tokens)
        geometry = self.device.geometry
        if geometry.block_bytes != self.layout.block_bytes:
            raise LayoutError(
                f"registered KV tensors hold {geometry.block_bytes} bytes per block, but the "
                f"engine's KV cache spec says {self.layout.block_bytes}: unsupported layout "
                f"{geometry.layout.name} of {len(kv_caches)} layers")
        fingerprint = geometry.fingerprint(self.model_id)
        if self.layout.num_g2_slots:
            started = time.perf_counter()
            self.arena = HostArena(self.layout.num_g2_slots, geometry)
            logger.info("kvtier: host tier of %d blocks (%.2f GB) ready in %.1f s",
                        self.layout.num_g2_slots,
                        self.layout.num_g2_slots * self.arena.slot_bytes / 1e9,
                        time.perf_counter() - started)
        if self.layout.num_g3_slots:
            directory = f"{self.config.disk_dir}/rank{self.rank}"
            self.disk = DiskStorage(directory, self.layout.num_g3_slots, self.arena.slot_bytes,
                                    fingerprint, o_direct=self.config.disk_o_direct,
                                    io_threads=self.config.disk_io_threads)
            self._report.recovered = self.disk.recover()
            logger.info("kvtier: disk tier of %d blocks in %s, %d recovered", self.layout.num_g3_slots,
                        directory, len(self._report.recovered))
        self.engine = TransferEngine(device=self.device, arena=self.arena, disk=self.disk,
                                     max_batch_blocks=self.config.max_transfer_batch_blocks,
                                     max_concurrent=self.config.max_concurrent_transfers)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        if self.disk is not None:
            self.disk.close()

    # -- per step -----------------------------------------------------------------------
    def start_loads(self, plan: StepPlan) -> None:
        self._check_layout(plan)
        for op in plan.loads:
            disk_idx = [i for i, s in enumerate(op.g3_slots) if s != NO_SLOT]
            if not disk_idx:
                self._finish_load(op, failed=set(), corrupt=set())
                continue
            request = TransferRequest(TransferKind.ONBOARD, Tier.G3, Tier.G2,
                                      [op.g3_slots[i] for i in disk_idx],
                                      [op.g2_slots[i] for i in disk_idx],
                                      [op.keys[i] for i in disk_idx])
            transfer_id = self.engine.submit(request)
            self._pending_loads.append(_PendingLoad(op, transfer_id, disk_idx,
                                                    time.perf_counter()))

    def save(self, plan: StepPlan) -> None:
        """Copy this step's completed blocks to the host; queue disk writes. Runs after the
        forward pass, and returns only when the device blocks may be reused."""
        self._check_layout(plan)
        stores = plan.stores
        if len(stores):
            started = time.perf_counter()
            try:
                copy_device_to_host(self.device, stores.src, self.arena, stores.dst)
                self._report.stores_ok.extend(stores.dst)
            except Exception:  # a failed copy is a dropped offload, never a failed step
                logger.exception("kvtier: offload of %d blocks to host failed", len(stores))
                self._report.stores_failed.extend(stores.dst)
            self._time("g1_to_g2", len(stores), started)
        if plan.disk_discards and self.disk is not None:
            self.disk.invalidate(plan.disk_discards)
        writes = plan.disk_writes
        if len(writes):
            request = TransferRequest(TransferKind.OFFLOAD, Tier.G2, Tier.G3, list(writes.src),
                                      list(writes.dst), list(writes.keys))
            self._pending_writes[self.engine.submit(request)] = (list(writes.dst),
                                                                 time.perf_counter())

    def poll(self) -> None:
        """Collect finished background transfers (never waits)."""
        if self.engine is None:
            return
        done = {result.id: result for result in self.engine.poll()}
        if not done:
            return
        for transfer_id, result in done.items():
            entry = self._pending_writes.pop(transfer_id, None)
            if entry is None:
                continue
            slots, started = entry
            for slot, ok in zip(slots, result.ok):
                (self._report.disk_writes_ok if ok else self._report.disk_writes_failed).append(slot)
            self._time("g2_to_g3", sum(result.ok), started)
        still_pending = []
        for load in self._pending_loads:
            result = done.get(load.transfer_id)
            if result is None:
                still_pending.append(load)
                continue
            bad = {i for i, ok in zip(load.disk_idx, result.ok) if not ok}
            self._time("g3_to_g2", len(load.disk_idx) - len(bad), load.started)
            self._finish_load(load.op, failed=bad, corrupt=bad)
        self._pending_loads = still_pending

    def take_finished_loads(self) -> set[str]:
        finished, self._finished_loads = self._finished_loads, set()
        return finished

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def take_report(self) -> WorkerReport | None:
        if self._report.is_empty():
            return None
        report, self._report = self._report, WorkerReport()
        return report

    @property
    def busy(self) -> bool:
        return bool(self._pending_loads or self._pending_writes)

    def drain(self, timeout_s: float = 30.0) -> None:
        """Wait for background transfers (shutdown and tests only, never in a step)."""
        deadline = time.monotonic() + timeout_s
        while self.busy and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.001)

    # -- internals ----------------------------------------------------------------------
    def _finish_load(self, op: LoadOp, failed: set[int], corrupt: set[int]) -> None:
        """Scatter the blocks that arrived intact into the device; report the rest."""
        failed = failed | {i for i, s in enumerate(op.g2_slots) if s == NO_SLOT}
        good = [i for i in range(len(op.keys)) if i not in failed]
        if good:
            started = time.perf_counter()
            try:
                copy_host_to_device(self.arena, [op.g2_slots[i] for i in good], self.device,
                                    [op.device_block_ids[i] for i in good])
                self._time("g2_to_g1", len(good), started)
            except Exception:
                logger.exception("kvtier: onboard of request %s failed", op.req_id)
                failed = set(range(len(op.keys)))
        self._load_errors.update(op.device_block_ids[i] for i in failed)
        self._report.loads.append(LoadResult(op.req_id, sorted(failed), sorted(corrupt)))
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
