"""G2: the host RAM arena, a page-aligned array of fixed-size block slots.

Slot ``i`` occupies ``slot_bytes`` bytes at ``i * slot_bytes``: the 64-byte block header
(block_format), then the payload, then padding up to a multiple of 4096. A slot is therefore
exactly the on-disk form of a block, and G2 -> G3 is one O_DIRECT write straight from the arena.

The memory is an anonymous mmap (page-aligned), advised for huge pages, pre-faulted once at
start-up (first touch costs ~30x a copy, see ENVIRONMENT.md §9) and optionally mlock-ed. When
CUDA is present it is registered with the driver (pinned) so device copies can be asynchronous.
torch is imported only for the tensor view and pinning; the arena itself is numpy + mmap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvtier.errors import BlockFormatError, StorageError
from kvtier.layout import KVGeometry
from kvtier.storage.block_format import HEADER_BYTES, pack_header, verify
from kvtier.tiers import BlockKey

logger = logging.getLogger(__name__)

PAGE_BYTES = 4096
_PREFAULT_CHUNK = 64 << 20
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14+


def slot_bytes_for(geometry: KVGeometry) -> int:
    """Bytes of one stored block: header + payload, rounded up to a whole page."""
    raw = HEADER_BYTES + geometry.block_bytes
    return -(-raw // PAGE_BYTES) * PAGE_BYTES


def available_memory_bytes() -> int | None:
    """Memory the kernel can hand out without swapping (MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class HostArena:
    """``num_slots`` block slots in host RAM; see the module doc for the slot format."""

    @staticmethod
    def slots_for_bytes(nbytes: float, geometry: KVGeometry) -> int:
        """How many slots of ``geometry`` fit in ``nbytes`` (for sizing by GB)."""
        return int(nbytes // slot_bytes_for(geometry))

    def __init__(self, num_slots: int, geometry: KVGeometry, *, pin: bool | None = None,
                 mlock: bool = False, prefault: bool = True):
        if not isinstance(num_slots, int) or num_slots <= 0:
            raise StorageError(f"host arena needs a positive slot count, got {num_slots!r}")
        self.geometry = geometry
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes_for(geometry)
        self.payload_bytes = geometry.block_bytes
        self.nbytes = num_slots * self.slot_bytes
        available = available_memory_bytes()
        if prefault and available is not None and self.nbytes > available:
            # Faulting it in would swap or wake the OOM killer in the middle of serving.
            raise StorageError(
                f"host arena of {self.nbytes / 1e9:.2f} GB ({num_slots} slots) does not fit in "
                f"the {available / 1e9:.2f} GB of memory this machine has available; lower "
                "host_cache_gb (it counts the whole engine, all ranks together)")
        try:
            self._mmap = mmap.mmap(-1, self.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (OSError, ValueError, OverflowError) as exc:
            raise StorageError(f"cannot allocate a host arena of {self.nbytes} bytes "
                               f"({num_slots} slots): {exc}") from exc
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self._mmap.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass  # no THP on this kernel: 4 KiB pages work, a little slower
        self._array = np.frombuffer(self._mmap, dtype=np.uint8)
        self.base_addr = self._array.ctypes.data
        self._slots = self._array.reshape(num_slots, self.slot_bytes)
        self._tensor = None
        self.pinned = False
        self.locked = False
        self.prefault_seconds = 0.0
        if prefault:
            start = time.perf_counter()
            try:  # the kernel faults pages in without a user-space pass: ~2x faster
                self._mmap.madvise(_MADV_POPULATE_WRITE)
            except (OSError, ValueError):  # kernel < 5.14
                for offset in range(0, self.nbytes, _PREFAULT_CHUNK):
                    self._array[offset:offset + _PREFAULT_CHUNK] = 0
            self.prefault_seconds = time.perf_counter() - start
            logger.info("host arena: pre-faulted %d slots x %d B (%.2f GB) in %.2f s",
                        num_slots, self.slot_bytes, self.nbytes / 1e9, self.prefault_seconds)
        if mlock:
            self._mlock()
        if pin is None:
            if _cuda_available():
                self._pin(required=False)
        elif pin:
            self._pin(required=True)

    # -- memory management ----------------------------------------------------------------

    def _mlock(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        start = time.perf_counter()
        if libc.mlock(ctypes.c_void_p(self.base_addr), ctypes.c_size_t(self.nbytes)) != 0:
            err = ctypes.get_errno()
            raise StorageError(f"mlock of the {self.nbytes}-byte host arena failed: "
                               f"{os.strerror(err)} (raise RLIMIT_MEMLOCK or run without mlock)")
        self.locked = True
        logger.info("host arena: mlock of %.2f GB took %.2f s", self.nbytes / 1e9,
                    time.perf_counter() - start)

    def _pin(self, required: bool) -> None:
        if not _cuda_available():
            raise StorageError("pinned host arena requested but CUDA is not available")
        import torch

        start = time.perf_counter()
        rc = torch.cuda.cudart().cudaHostRegister(self.base_addr, self.nbytes, 0)
        code = int(rc.value) if hasattr(rc, "value") else int(rc)
        if code != 0:
            if required:
                raise StorageError(f"cannot pin the {self.nbytes}-byte host arena "
                                   f"(cudaHostRegister error {code})")
            logger.warning("host arena: cudaHostRegister failed (error %d); device copies "
                           "will be synchronous", code)
            return
        self.pinned = True
        logger.info("host arena: pinned %.2f GB in %.2f s", self.nbytes / 1e9,
                    time.perf_counter() - start)

    def close(self) -> None:
        """Release the memory. Views handed out earlier must not be used afterwards."""
        if self._mmap is None:
            return
        if self.pinned:
            import torch

            torch.cuda.cudart().cudaHostUnregister(self.base_addr)
            self.pinned = False
        self._tensor = None
        self._slots = None
        self._array = None
        try:
            self._mmap.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes when the last view does
        self._mmap = None

    # -- views ------------------------------------------------------------------------------

    @property
    def array(self) -> np.ndarray:
        """The whole arena as a flat uint8 numpy array."""
        return self._array

    @property
    def slots_array(self) -> np.ndarray:
        """The arena as a (num_slots, slot_bytes) uint8 numpy array."""
        return self._slots

    @property
    def tensor(self) -> Any:
        """The whole arena as a (num_slots, slot_bytes) uint8 torch tensor sharing memory."""
        if self._tensor is None:
            import torch

            self._tensor = torch.from_numpy(self._slots)
        return self._tensor

    def check_slot(self, slot: int) -> int:
        if not 0 <= slot < self.num_slots:
            raise StorageError(f"arena slot {slot} out of range [0, {self.num_slots})")
        return slot

    def slot_offset(self, slot: int) -> int:
        return self.check_slot(slot) * self.slot_bytes

    def slot_view(self, slot: int) -> memoryview:
        """The whole slot (header, payload, padding): the unit of one disk/remote I/O."""
        offset = self.slot_offset(slot)
        return memoryview(self._mmap)[offset:offset + self.slot_bytes]

    def payload(self, slot: int) -> np.ndarray:
        """The payload bytes of ``slot`` (a writable uint8 view)."""
        return self._slots[self.check_slot(slot), HEADER_BYTES:HEADER_BYTES + self.payload_bytes]

    def header(self, slot: int) -> np.ndarray:
        """The 64 header bytes of ``slot`` (a writable uint8 view)."""
        return self._slots[self.check_slot(slot), :HEADER_BYTES]

    # -- headers ----------------------------------------------------------------------------

    def write_header(self, slots: Sequence[int], keys: Sequence[BlockKey], fingerprint: int
                     ) -> None:
        """Stamp ``slots`` as blocks ``keys`` (checksum of the current payload) before the slots
        leave for disk or a remote store."""
        if len(slots) != len(keys):
            raise StorageError(f"write_header: {len(slots)} slots but {len(keys)} keys")
        payload_end = HEADER_BYTES + self.payload_bytes
        for slot, key in zip(slots, keys):
            row = self._slots[self.check_slot(slot)]
            row[:HEADER_BYTES] = np.frombuffer(
                pack_header(key, fingerprint, row[HEADER_BYTES:payload_end]), dtype=np.uint8)

    def check(self, slot: int, key: BlockKey, fingerprint: int) -> str | None:
        """None if ``slot`` holds block ``key`` intact, else why not (for counters and logs)."""
        row = self._slots[self.check_slot(slot)]
        try:
            verify(row[:HEADER_BYTES], row[HEADER_BYTES:HEADER_BYTES + self.payload_bytes], key,
                   fingerprint)
        except BlockFormatError as exc:
            return str(exc)
        return None

    def verify(self, slot: int, key: BlockKey, fingerprint: int) -> bool:
        """True if ``slot`` (filled from disk or a remote store) holds block ``key`` intact."""
        return self.check(slot, key, fingerprint) is None


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())
