"""One executor per tier pair: the code that actually moves a batch of blocks in the background.

The transfer engine knows nothing about tiers beyond this protocol; a new pair (G2 <-> G4, a
direct G1 -> G3) is one ``TransferEngine.add_executor(src, dst, executor)`` call. Here: G2 <-> G3
(disk); ``remote.py`` has G2 <-> G4. G1 <-> G2 is not an executor: the worker copies between the
device and the host synchronously, on its own thread, with ``copy.copy_device_to_host`` /
``copy.copy_host_to_device`` (the one G1 <-> G2 copy path).

Protocol (duck-typed):

- ``needs_keys: bool`` — whether requests must carry one block key per block.
- ``check(src_ids, dst_ids)`` — raise ``TransferError`` for ids out of range or a destination
  named twice. Called in ``submit`` (the caller's thread) before anything is queued.
- ``prepare()`` — called in ``submit`` too; returns an opaque token handed to ``start`` (state
  of the submitting thread a transfer must capture there; None for the pairs here).
- ``start(src_ids, dst_ids, keys, token) -> Pending`` — runs on a transfer worker thread and
  moves the blocks. Per-block failures are ``False`` in the result, never exceptions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kvtier.errors import TransferError
from kvtier.storage.disk import DiskStorage
from kvtier.storage.host import HostArena
from kvtier.tiers import BlockKey


class Pending:
    """The outcome of a moved batch: ``result()`` is per-block success (``ok`` None: all)."""

    __slots__ = ("_ok",)

    def __init__(self, ok: list[bool] | None = None):
        self._ok = ok

    def result(self, count: int) -> list[bool]:
        return self._ok if self._ok is not None else [True] * count


def check_ids(ids: np.ndarray, limit: int, what: str) -> None:
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= limit):
        bad = ids[(ids < 0) | (ids >= limit)][0]
        raise TransferError(f"{what} {int(bad)} out of range [0, {limit})")


def check_unique(ids: np.ndarray, what: str) -> None:
    if np.unique(ids).size != ids.size:
        raise TransferError(f"a transfer names the same {what} twice")


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

