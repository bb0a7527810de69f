"""One executor per tier pair: the code that actually moves a batch of blocks.

The transfer engine knows nothing about tiers beyond this protocol; a new pair (G2 <-> G4, a
direct G1 -> G3) is one ``TransferEngine.add_executor(src, dst, executor)`` call.

Protocol (duck-typed):

- ``needs_keys: bool`` — whether requests must carry one block key per block.
- ``check(src_ids, dst_ids)`` — raise ``TransferError`` for ids out of range or a destination
  named twice. Called in ``submit`` (the caller's thread) before anything is queued.
- ``prepare()`` — called in ``submit`` too; returns an opaque token handed to ``start`` (the CUDA
  executors record an event on the caller's stream, so copies wait for queued kernels).
- ``start(src_ids, dst_ids, keys, token) -> Pending`` — runs on a transfer worker thread; moves
  the blocks or starts moving them. Per-block failures are ``False`` in the result, never
  exceptions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kvtier.errors import TransferError
from kvtier.storage.disk import DiskStorage
from kvtier.storage.host import HostArena
from kvtier.tiers import BlockKey
from kvtier.transfer.copy import BlockCopier, Completion


class Pending:
    """A batch in flight: ``done()`` never blocks; ``result()`` is per-block success."""

    __slots__ = ("_completion", "_ok")

    def __init__(self, ok: list[bool] | None = None, completion: Completion | None = None):
        self._ok = ok
        self._completion = completion

    def done(self) -> bool:
        return self._completion is None or self._completion.done()

    def wait(self, timeout: float | None = None) -> bool:
        return self._completion is None or self._completion.wait(timeout)

    def result(self, count: int) -> list[bool]:
        return self._ok if self._ok is not None else [True] * count


def check_ids(ids: np.ndarray, limit: int, what: str) -> None:
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= limit):
        bad = ids[(ids < 0) | (ids >= limit)][0]
        raise TransferError(f"{what} {int(bad)} out of range [0, {limit})")


def check_unique(ids: np.ndarray, what: str) -> None:
    if np.unique(ids).size != ids.size:
        raise TransferError(f"a transfer names the same {what} twice")


class DeviceToHost:
    """G1 -> G2: gather device blocks into arena slots."""

    needs_keys = False

    def __init__(self, copier: BlockCopier):
        self.copier = copier

    def check(self, src_ids: np.ndarray, dst_ids: np.ndarray) -> None:
        check_ids(src_ids, self.copier.dev.num_blocks, "device block")
        check_ids(dst_ids, self.copier.arena.num_slots, "arena slot")
        check_unique(dst_ids, "arena slot")

    def prepare(self) -> Any:
        return _stream_event(self.copier)

    def start(self, src_ids, dst_ids, keys: Sequence[BlockKey], token: Any) -> Pending:
        return Pending(completion=self.copier.to_host(src_ids, dst_ids, after=token))


class HostToDevice:
    """G2 -> G1: scatter arena slots into device blocks."""

    needs_keys = False

    def __init__(self, copier: BlockCopier):
        self.copier = copier

    def check(self, src_ids: np.ndarray, dst_ids: np.ndarray) -> None:
        check_ids(src_ids, self.copier.arena.num_slots, "arena slot")
        check_ids(dst_ids, self.copier.dev.num_blocks, "device block")
        check_unique(dst_ids, "device block")

    def prepare(self) -> Any:
        return _stream_event(self.copier)

    def start(self, src_ids, dst_ids, keys: Sequence[BlockKey], token: Any) -> Pending:
        return Pending(completion=self.copier.to_device(src_ids, dst_ids, after=token))


class HostToDisk:
    """G2 -> G3: stamp headers, write durably, record in the disk index."""

    needs_keys = True

    def __init__(self, arena: HostArena, disk: DiskStorage):
        self.arena = arena
        self.disk = disk

    def check(self, src_ids: np.ndarray, dst_ids: np.ndarray) -> None:
        check_ids(src_ids, self.arena.num_slots, "arena slot")
        check_ids(dst_ids, self.disk.num_slots, "disk slot")
        check_unique(dst_ids, "disk slot")

    def prepare(self) -> Any:
        return None

    def start(self, src_ids, dst_ids, keys: Sequence[BlockKey], token: Any) -> Pending:
        pairs = list(zip(src_ids.tolist(), dst_ids.tolist(), keys))
        return Pending(ok=self.disk.write(self.arena, pairs))


class DiskToHost:
    """G3 -> G2: vectored reads, every block verified."""

    needs_keys = True

    def __init__(self, disk: DiskStorage, arena: HostArena):
        self.disk = disk
        self.arena = arena

    def check(self, src_ids: np.ndarray, dst_ids: np.ndarray) -> None:
        check_ids(src_ids, self.disk.num_slots, "disk slot")
        check_ids(dst_ids, self.arena.num_slots, "arena slot")
        check_unique(dst_ids, "arena slot")

    def prepare(self) -> Any:
        return None

    def start(self, src_ids, dst_ids, keys: Sequence[BlockKey], token: Any) -> Pending:
        pairs = list(zip(src_ids.tolist(), dst_ids.tolist(), keys))
        return Pending(ok=self.disk.read(self.arena, pairs))


def _stream_event(copier: BlockCopier) -> Any:
    if not copier.is_cuda:
        return None
    import torch

    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(copier.dev.device))
    return event
