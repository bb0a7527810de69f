"""Batched block copies between the engine's KV tensors (G1) and the host arena (G2).

A block is a list of segments (see ``kvtier.layout``); its payload in an arena slot is those
segments back to back. Two implementations behind one ``BlockCopier``:

- **CPU tensors**: one ``memmove`` per (block, segment) straight between the engine tensor and
  the arena slot, addresses computed with numpy for the whole batch. ``ctypes.memmove`` releases
  the GIL and runs at memcpy speed; there is no staging pass (each pass costs ~8-15 GB/s here,
  ENVIRONMENT.md §9), and no uint8 ``index_copy_`` trap.
- **CUDA tensors**: one dedicated stream per direction. Offload gathers the blocks on the device
  into a staging buffer shaped like arena slots (``index_select`` per segment), then DMAs each
  run of consecutive arena slots into the pinned arena in one copy. Onboard DMAs runs into the
  staging buffer and scatters with ``index_copy_`` on wide-dtype views. Completion is a CUDA
  event, queried (never waited on) by the transfer engine.

Block ids and slots are validated for the whole batch before any byte moves; a malformed batch
raises ``TransferError`` and changes nothing.
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from kvtier.errors import LayoutError, TransferError
from kvtier.layout import DeviceKV
from kvtier.storage.block_format import HEADER_BYTES
from kvtier.storage.host import HostArena

_memmove = ctypes.memmove

# CPU copies of at least this many bytes are split over ``copy_threads`` threads: one thread
# does not saturate memory bandwidth (ENVIRONMENT.md §9: copy_ 8.5 GB/s on 1 thread, 12 on 2).
_PARALLEL_MIN_BYTES = 8 << 20
_helpers: ThreadPoolExecutor | None = None
_helpers_size = 0
_helpers_lock = threading.Lock()


def _helper_pool(threads: int) -> ThreadPoolExecutor:
    """A process-wide pool of at least ``threads`` copy helpers (created on first use)."""
    global _helpers, _helpers_size
    with _helpers_lock:
        if _helpers is None or _helpers_size < threads:
            _helpers = ThreadPoolExecutor(threads, thread_name_prefix="kvtier-copy")
            _helpers_size = threads
        return _helpers


class Completion:
    """A copy in flight. ``done()`` never blocks; ``wait()`` does (tests and shutdown)."""

    __slots__ = ()

    def done(self) -> bool:
        return True

    def wait(self, timeout: float | None = None) -> bool:
        return True


DONE = Completion()  # the shared result of every synchronous (CPU) copy


class CudaCompletion(Completion):
    __slots__ = ("event",)

    def __init__(self, event: Any):
        self.event = event

    def done(self) -> bool:
        return bool(self.event.query())

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is None:
            self.event.synchronize()
            return True
        import time

        deadline = time.monotonic() + timeout
        while not self.event.query():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.0005)
        return True


def _as_ids(values, what: str, limit: int) -> np.ndarray:
    ids = np.asarray(values, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= limit):
        bad = ids[(ids < 0) | (ids >= limit)][0]
        raise TransferError(f"{what} {int(bad)} out of range [0, {limit})")
    return ids


def _check_batch(dev: DeviceKV, block_ids, arena: HostArena, slots,
                 unique: str) -> tuple[np.ndarray, np.ndarray]:
    blocks = _as_ids(block_ids, "device block id", dev.num_blocks)
    arena_slots = _as_ids(slots, "arena slot", arena.num_slots)
    if blocks.size != arena_slots.size:
        raise TransferError(f"{blocks.size} device blocks but {arena_slots.size} arena slots")
    dst = arena_slots if unique == "slots" else blocks
    if np.unique(dst).size != dst.size:
        raise TransferError(f"a copy names the same destination {unique[:-1]} twice")
    return blocks, arena_slots


class BlockCopier:
    """Moves whole blocks between one DeviceKV and one HostArena."""

    def __init__(self, dev: DeviceKV, arena: HostArena, *, max_batch_blocks: int = 64,
                 copy_threads: int | None = None):
        if arena.payload_bytes != dev.geometry.block_bytes:
            raise LayoutError(f"arena payload is {arena.payload_bytes} B per block, device "
                              f"blocks are {dev.geometry.block_bytes} B")
        if arena.geometry.fingerprint() != dev.geometry.fingerprint():
            raise LayoutError(f"arena geometry {arena.geometry} does not match the device's "
                              f"{dev.geometry}")
        self.dev = dev
        self.arena = arena
        if dev.device.type == "cuda":
            self._impl: Any = _CudaCopier(dev, arena, max_batch_blocks)
        else:
            threads = copy_threads or min(2, os.cpu_count() or 1)
            self._impl = _CpuCopier(dev, arena, threads)

    @property
    def is_cuda(self) -> bool:
        return isinstance(self._impl, _CudaCopier)

    def to_host(self, block_ids, slots, *, after: Any = None) -> Completion:
        """Copy device blocks ``block_ids`` into arena ``slots`` (payload only; the header is
        stamped later by ``HostArena.write_header``). ``after``: a CUDA event to wait for."""
        blocks, arena_slots = _check_batch(self.dev, block_ids, self.arena, slots, "slots")
        if blocks.size == 0:
            return DONE
        return self._impl.to_host(blocks, arena_slots, after)

    def to_device(self, slots, block_ids, *, after: Any = None) -> Completion:
        """Copy arena ``slots`` payloads into device blocks ``block_ids``."""
        blocks, arena_slots = _check_batch(self.dev, block_ids, self.arena, slots, "blocks")
        if blocks.size == 0:
            return DONE
        return self._impl.to_device(arena_slots, blocks, after)


class _CpuCopier:
    def __init__(self, dev: DeviceKV, arena: HostArena, threads: int):
        self._threads = max(1, threads)
        seg = dev.segments
        self._dev_addr = seg.addr
        self._dev_stride = seg.stride
        self._slot_offset = seg.payload_offset + HEADER_BYTES
        self._nbytes = seg.nbytes
        self._uniform = int(seg.nbytes[0]) if np.all(seg.nbytes == seg.nbytes[0]) else 0
        self._arena_base = arena.base_addr
        self._slot_bytes = arena.slot_bytes
        self._keep = (dev, arena)  # the addresses stay valid while these live

    def _addresses(self, blocks: np.ndarray, slots: np.ndarray) -> tuple[list, list]:
        dev = (self._dev_addr[None, :] + blocks[:, None] * self._dev_stride[None, :]).ravel()
        host = (self._arena_base + slots[:, None] * self._slot_bytes
                + self._slot_offset[None, :]).ravel()
        return dev.tolist(), host.tolist()

    def _copy(self, dsts: list, srcs: list, nblocks: int) -> None:
        total = int(self._nbytes.sum()) * nblocks
        if self._threads > 1 and total >= _PARALLEL_MIN_BYTES and len(dsts) > 1:
            # Split the copies evenly; memmove releases the GIL, so the parts run in parallel.
            parts = min(self._threads, len(dsts))
            step = -(-len(dsts) // parts)
            sizes = np.tile(self._nbytes, nblocks).tolist()
            pool = _helper_pool(parts - 1)
            futures = [pool.submit(_memmove_all, dsts[i:i + step], srcs[i:i + step],
                                   sizes[i:i + step]) for i in range(step, len(dsts), step)]
            _memmove_all(dsts[:step], srcs[:step], sizes[:step])
            for future in futures:
                future.result()
        elif self._uniform:
            size = self._uniform
            for d, s in zip(dsts, srcs):
                _memmove(d, s, size)
        else:
            _memmove_all(dsts, srcs, np.tile(self._nbytes, nblocks).tolist())

    def to_host(self, blocks: np.ndarray, slots: np.ndarray, after: Any) -> Completion:
        dev, host = self._addresses(blocks, slots)
        self._copy(host, dev, blocks.size)
        return DONE

    def to_device(self, slots: np.ndarray, blocks: np.ndarray, after: Any) -> Completion:
        dev, host = self._addresses(blocks, slots)
        self._copy(dev, host, blocks.size)
        return DONE


def _memmove_all(dsts: list, srcs: list, sizes: list) -> None:
    for d, s, size in zip(dsts, srcs, sizes):
        _memmove(d, s, size)


def _wide_dtype(*values: int):
    import torch

    for width, dtype in ((8, torch.int64), (4, torch.int32), (2, torch.int16)):
        if all(v % width == 0 for v in values):
            return dtype
    return torch.uint8


def _runs(slots: np.ndarray) -> list[tuple[int, int, int]]:
    """(batch index, first slot, length) of each run of consecutive slots, in batch order."""
    breaks = np.flatnonzero(np.diff(slots) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [slots.size]))
    return [(int(a), int(slots[a]), int(b - a)) for a, b in zip(starts, ends)]


class _CudaCopier:
    def __init__(self, dev: DeviceKV, arena: HostArena, max_batch_blocks: int):
        import torch

        self._torch = torch
        self._device = dev.device
        self._arena = arena
        self._capacity = max(1, max_batch_blocks)
        slot_bytes = arena.slot_bytes
        seg = dev.segments
        self._dev_views = []
        self._stage_cols = []  # (start, stop, dtype) of each segment inside a slot row
        for i in range(len(seg)):
            start = HEADER_BYTES + int(seg.payload_offset[i])
            stop = start + int(seg.nbytes[i])
            view = dev.block_bytes_view(i)
            dtype = _wide_dtype(int(seg.nbytes[i]), int(seg.stride[i]), start, slot_bytes,
                                view.storage_offset())
            self._dev_views.append(view.view(dtype))
            self._stage_cols.append((start, stop, dtype))
        self._host_rows = arena.tensor  # (num_slots, slot_bytes) uint8, pinned when possible
        with torch.cuda.device(self._device):
            self._streams = {"off": torch.cuda.Stream(self._device),
                             "on": torch.cuda.Stream(self._device)}
        self._staging: dict[str, Any] = {}
        self._id_buffers: dict[str, list] = {}
        self._locks = {"off": threading.Lock(), "on": threading.Lock()}

    def _device_ids(self, ids: np.ndarray, direction: str):
        # Pinned + non_blocking: a pageable copy would synchronize the stream, waiting for
        # the engine's queued work on this thread. The pinned buffer is allocated once per
        # direction (pinning per call costs more than the copy); before it is refilled, the
        # event of its last upload must have fired.
        torch = self._torch
        if not self._arena.pinned:
            return torch.from_numpy(np.ascontiguousarray(ids)).to(self._device)
        buf = self._id_buffers.get(direction)
        if buf is None:
            buf = [torch.empty(self._capacity, dtype=torch.int64).pin_memory(), None]
            self._id_buffers[direction] = buf
        host, uploaded = buf
        if uploaded is not None:
            uploaded.synchronize()
        host[:ids.size].copy_(torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)))
        dev_ids = host[:ids.size].to(self._device, non_blocking=True)
        buf[1] = torch.cuda.Event()
        buf[1].record()
        return dev_ids

    def _stage(self, direction: str):
        staging = self._staging.get(direction)
        if staging is None:
            staging = self._torch.zeros((self._capacity, self._arena.slot_bytes),
                                        dtype=self._torch.uint8, device=self._device)
            self._staging[direction] = staging
        return staging

    def _seg_stage(self, staging, i: int, rows: int):
        start, stop, dtype = self._stage_cols[i]
        return staging[:rows, start:stop].view(dtype)

    def to_host(self, blocks: np.ndarray, slots: np.ndarray, after: Any) -> Completion:
        torch = self._torch
        with self._locks["off"]:
            stream = self._streams["off"]
            staging = self._stage("off")
            with torch.cuda.device(self._device), torch.cuda.stream(stream):
                if after is not None:
                    stream.wait_event(after)
                for first in range(0, blocks.size, self._capacity):
                    chunk_blocks = blocks[first:first + self._capacity]
                    chunk_slots = slots[first:first + self._capacity]
                    rows = chunk_blocks.size
                    idx = self._device_ids(chunk_blocks, "off")
                    for i, view in enumerate(self._dev_views):
                        self._seg_stage(staging, i, rows).copy_(view.index_select(0, idx))
                    for at, slot, length in _runs(chunk_slots):
                        self._host_rows[slot:slot + length].copy_(staging[at:at + length],
                                                                  non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
        return CudaCompletion(event)

    def to_device(self, slots: np.ndarray, blocks: np.ndarray, after: Any) -> Completion:
        torch = self._torch
        with self._locks["on"]:
            stream = self._streams["on"]
            staging = self._stage("on")
            with torch.cuda.device(self._device), torch.cuda.stream(stream):
                if after is not None:
                    stream.wait_event(after)
                for first in range(0, blocks.size, self._capacity):
                    chunk_blocks = blocks[first:first + self._capacity]
                    chunk_slots = slots[first:first + self._capacity]
                    rows = chunk_blocks.size
                    for at, slot, length in _runs(chunk_slots):
                        staging[at:at + length].copy_(self._host_rows[slot:slot + length],
                                                      non_blocking=True)
                    idx = self._device_ids(chunk_blocks, "on")
                    for i, view in enumerate(self._dev_views):
                        view.index_copy_(0, idx, self._seg_stage(staging, i, rows))
                event = torch.cuda.Event()
                event.record(stream)
        return CudaCompletion(event)


_shared_copiers: dict[tuple[int, int], BlockCopier] = {}
_shared_lock = threading.Lock()


def _shared_copier(dev: DeviceKV, arena: HostArena) -> BlockCopier:
    """One copier per (device, arena) pair for the blocking helpers below (a CUDA copier owns
    streams and staging memory: build them once, not per call)."""
    with _shared_lock:
        copier = _shared_copiers.get((id(dev), id(arena)))
        if copier is None or copier.dev is not dev or copier.arena is not arena:
            if len(_shared_copiers) >= 8:  # old pairs (tests, re-registration) drop out
                _shared_copiers.clear()
            copier = BlockCopier(dev, arena)
            _shared_copiers[(id(dev), id(arena))] = copier
        return copier


def copy_device_to_host(dev: DeviceKV, block_ids, arena: HostArena, slots) -> None:
    """Copy device blocks into arena slots and return when the bytes are in the arena.

    On CUDA the copy waits for work already queued on the caller's current stream."""
    _shared_copier(dev, arena).to_host(block_ids, slots,
                                       after=_current_stream_event(dev)).wait()


def copy_host_to_device(arena: HostArena, slots, dev: DeviceKV, block_ids) -> None:
    """Copy arena slot payloads into device blocks and return when they are on the device."""
    _shared_copier(dev, arena).to_device(slots, block_ids,
                                         after=_current_stream_event(dev)).wait()


def _current_stream_event(dev: DeviceKV) -> Any:
    """An event marking the work the caller queued so far on its CUDA stream (None on CPU)."""
    if dev.device.type != "cuda":
        return None
    import torch

    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(dev.device))
    return event
