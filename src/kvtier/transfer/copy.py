"""Batched block copies between the engine's KV tensors (G1) and the host arena (G2).

This is the one G1 <-> G2 path: the worker offloads with ``copy_device_to_host`` (headers
stamped, ``keys`` given) and onboards with ``copy_host_to_device`` (slots verified), both
synchronous on its own thread, through one ``BlockCopier`` per (device, arena) pair.

A block is a list of segments (see ``kvtier.layout``); its payload in an arena slot is those
segments back to back. Two implementations behind one ``BlockCopier``:

- **CPU tensors**: one copy per (block, segment) straight between the engine tensor and the
  arena slot, addresses computed with numpy for the whole batch. The copy (``_stream.copy``)
  releases the GIL and uses streaming stores, which skip reading the destination into the cache
  first; there is no staging pass (each pass costs ~8-15 GB/s here, ENVIRONMENT.md §9), and no
  uint8 ``index_copy_`` trap.
- **CUDA tensors**: one dedicated stream per direction. Offload gathers the blocks on the device
  into a staging buffer shaped like arena slots (``index_select`` per segment), then DMAs each
  run of consecutive arena slots into the pinned arena in one copy. Onboard DMAs runs into the
  staging buffer and scatters with ``index_copy_`` on wide-dtype views. Completion is a CUDA
  event (``Completion.done()`` queries it; the blocking helpers below wait for it).

Block ids and slots are validated for the whole batch before any byte moves; a malformed batch
raises ``TransferError`` and changes nothing.

Checksums (``block_format``) ride along when the caller names the blocks' keys: an offload with
``keys`` stamps each slot's header, and ``to_device_verified`` checks each slot against its key
before the engine may use it; a slot that fails is reported and recomputed by the engine. On CPU
both happen inside the copy loop, so the checksum reads the bytes the copy has just read (the
device block on offload, the slot on onboard) while they are in cache: the extra pass costs
cache bandwidth, not a second trip through memory (a block whose checksum fails at its last
piece is zeroed on the device). On CUDA the host side is checksummed before each chunk's DMA (onboard:
a failing slot is never copied) or after the copy lands (offload).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import xxhash

from kvtier.errors import BlockFormatError, LayoutError, TransferError
from kvtier.layout import DeviceKV
from kvtier.storage.block_format import (
    HEADER_BYTES,
    expected_checksum,
    header_for,
    key_bytes,
)
from kvtier.storage.host import HostArena
from kvtier.tiers import BlockKey

logger = logging.getLogger(__name__)

try:
    # Streaming stores: a copy that does not first read each destination line into the cache
    # (see _stream.c). With it the checked copy keeps up with a plain gather on one core.
    from kvtier.transfer._stream import copy as _copy_bytes
except ImportError as exc:  # a source tree that was never built (pip install builds it)
    logger.warning("kvtier: the streaming block copy is not built (%s); block copies use "
                   "memmove, and the checked copies are slower", exc)
    _copy_bytes = ctypes.memmove

# Checked copies hash each block's payload with one streaming xxh3 per block (the same digest as
# one call) right after copying it, while the bytes the copy read are in L2, in pieces that never
# cross a run of this many bytes of the arena slot: an offload hashes each device piece it has
# copied, an onboard each slot run it has copied.
_STAMP_RUN_BYTES = 256 << 10

# CPU copies of at least this many bytes are split over ``copy_threads`` threads: one thread
# does not saturate memory bandwidth (ENVIRONMENT.md §9: copy_ 8.5 GB/s on 1 thread, 12 on 2).
_PARALLEL_MIN_BYTES = 8 << 20
# Host-side verification before CUDA onboards: checksums run on this many helpers, so they keep
# up with the DMA of the previous chunk.
_VERIFY_THREADS = min(8, os.cpu_count() or 1)
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


def verify_slots(arena: HostArena, slots: Sequence[int], keys: Sequence[BlockKey],
                 fingerprint: int, check: Sequence[bool] | None = None, *,
                 threads: int = 1) -> list[int]:
    """Indices of the ``slots`` that do not hold block ``keys[i]`` of geometry ``fingerprint``
    intact (header fields, payload checksum); ``check[i]`` False skips slot ``i``. With
    ``threads`` > 1 the slots are checksummed on the copy helpers (xxh3 releases the GIL)."""
    todo = [i for i in range(len(slots)) if check is None or check[i]]

    def bad(i: int) -> bool:
        return arena.check(slots[i], keys[i], fingerprint) is not None

    if threads > 1 and len(todo) > 1:
        verdicts = list(_helper_pool(threads).map(bad, todo))
    else:
        verdicts = [bad(i) for i in todo]
    return [i for i, failed in zip(todo, verdicts) if failed]


def _check_keys(keys: Sequence[BlockKey], n: int) -> None:
    if len(keys) != n:
        raise TransferError(f"{n} blocks but {len(keys)} keys")


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

    def to_host(self, block_ids, slots, *, after: Any = None,
                keys: Sequence[BlockKey] | None = None, fingerprint: int = 0) -> Completion:
        """Copy device blocks ``block_ids`` into arena ``slots``. ``after``: a CUDA event to
        wait for. Without ``keys`` only the payload moves (``HostArena.write_header`` stamps it
        later); with ``keys`` slot ``i``'s header is stamped as block ``keys[i]`` of geometry
        ``fingerprint`` (payload checksum included) before this returns or, on CUDA, once the
        copy has landed: the returned completion is then already done."""
        blocks, arena_slots = _check_batch(self.dev, block_ids, self.arena, slots, "slots")
        if keys is not None:
            _check_keys(keys, blocks.size)
            for key in keys:
                key_bytes(key)  # a malformed key is refused before any byte moves
        if blocks.size == 0:
            return DONE
        if keys is None:
            return self._impl.to_host(blocks, arena_slots, after)
        if isinstance(self._impl, _CpuCopier):
            self._impl.to_host_stamped(blocks, arena_slots, keys, fingerprint)
            return DONE
        self._impl.to_host(blocks, arena_slots, after).wait()
        self.arena.write_header(arena_slots.tolist(), keys, fingerprint)
        return DONE

    def to_device(self, slots, block_ids, *, after: Any = None) -> Completion:
        """Copy arena ``slots`` payloads into device blocks ``block_ids``."""
        blocks, arena_slots = _check_batch(self.dev, block_ids, self.arena, slots, "blocks")
        if blocks.size == 0:
            return DONE
        return self._impl.to_device(arena_slots, blocks, after)

    def to_device_verified(self, slots, block_ids, keys: Sequence[BlockKey], fingerprint: int,
                           *, check: Sequence[bool] | None = None,
                           after: Any = None) -> tuple[Completion, list[int]]:
        """``to_device``, but slot ``i`` is verified as block ``keys[i]`` of geometry
        ``fingerprint`` (header fields and payload checksum). ``check[i]`` False trusts slot
        ``i`` (it was verified on its way into the arena).

        Returns the completion and the batch indices that failed, in order. A failed block
        holds none of its slot's bytes: untouched on CUDA (verified before the DMA) and when its
        header is wrong, zeroed on CPU when its payload checksum fails (checked while copying).
        The caller reports it as a load error so the engine recomputes it."""
        blocks, arena_slots = _check_batch(self.dev, block_ids, self.arena, slots, "blocks")
        _check_keys(keys, blocks.size)
        if check is not None and len(check) != blocks.size:
            raise TransferError(f"{blocks.size} blocks but {len(check)} verify flags")
        if blocks.size == 0:
            return DONE, []
        if isinstance(self._impl, _CpuCopier):
            return DONE, self._impl.to_device_verified(arena_slots, blocks, keys, fingerprint,
                                                       check)
        # CUDA: verify one chunk on the host (over the copy helpers) while the previous
        # chunk's DMA runs.
        bad, done = [], DONE
        step = self._impl.capacity
        for first in range(0, blocks.size, step):
            stop = min(first + step, blocks.size)
            failed = {first + i for i in verify_slots(
                self.arena, arena_slots[first:stop].tolist(), keys[first:stop], fingerprint,
                None if check is None else check[first:stop], threads=_VERIFY_THREADS)}
            good = [i for i in range(first, stop) if i not in failed]
            bad.extend(sorted(failed))
            if good:
                done = self._impl.to_device(arena_slots[good], blocks[good], after)
                after = None  # later chunks follow on the same stream
        return done, bad


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
        self._payload_bytes = arena.payload_bytes
        self._arena = arena
        self._keep = (dev, arena)  # the addresses stay valid while these live
        self._runs: tuple | None = None  # the stamping copy's pieces, built on first use
        self._dev_views: list | None = None  # built on first use

    def _stamp_pieces(self) -> tuple:
        """The payload split into pieces that never cross a run of ``_STAMP_RUN_BYTES``: per
        piece its segment, offset in the segment, offset in the payload and length; then the
        runs as (first piece, end piece, payload start, payload end)."""
        if self._runs is None:
            run = _STAMP_RUN_BYTES
            seg_idx, in_seg, offsets, lengths = [], [], [], []
            for i, (start, size) in enumerate(zip(self._slot_offset.tolist(),
                                                  self._nbytes.tolist())):
                start -= HEADER_BYTES
                pos = 0
                while pos < size:
                    at = start + pos
                    take = min(size - pos, (at // run + 1) * run - at)
                    seg_idx.append(i)
                    in_seg.append(pos)
                    offsets.append(at)
                    lengths.append(take)
                    pos += take
            runs, first = [], 0
            for k in range(1, len(offsets) + 1):
                if k == len(offsets) or offsets[k] // run != offsets[first] // run:
                    runs.append((first, k, offsets[first], offsets[k - 1] + lengths[k - 1]))
                    first = k
            self._runs = (np.asarray(seg_idx, dtype=np.int64), np.asarray(in_seg, dtype=np.int64),
                          np.asarray(offsets, dtype=np.int64), lengths, runs)
        return self._runs

    def _addresses(self, blocks: np.ndarray, slots: np.ndarray) -> tuple[list, list]:
        dev = (self._dev_addr[None, :] + blocks[:, None] * self._dev_stride[None, :]).ravel()
        host = (self._arena_base + slots[:, None] * self._slot_bytes
                + self._slot_offset[None, :]).ravel()
        return dev.tolist(), host.tolist()

    def _copy(self, dsts: list, srcs: list, nblocks: int) -> None:
        total = int(self._nbytes.sum()) * nblocks
        if self._threads > 1 and total >= _PARALLEL_MIN_BYTES and len(dsts) > 1:
            # Split the copies evenly; the copy releases the GIL, so the parts run in parallel.
            parts = min(self._threads, len(dsts))
            step = -(-len(dsts) // parts)
            sizes = np.tile(self._nbytes, nblocks).tolist()
            pool = _helper_pool(parts - 1)
            futures = [pool.submit(_copy_all, dsts[i:i + step], srcs[i:i + step],
                                   sizes[i:i + step]) for i in range(step, len(dsts), step)]
            _copy_all(dsts[:step], srcs[:step], sizes[:step])
            for future in futures:
                future.result()
        elif self._uniform:
            size = self._uniform
            for d, s in zip(dsts, srcs):
                _copy_bytes(d, s, size)
        else:
            _copy_all(dsts, srcs, np.tile(self._nbytes, nblocks).tolist())

    def to_host(self, blocks: np.ndarray, slots: np.ndarray, after: Any) -> Completion:
        dev, host = self._addresses(blocks, slots)
        self._copy(host, dev, blocks.size)
        return DONE

    def to_device(self, slots: np.ndarray, blocks: np.ndarray, after: Any) -> Completion:
        dev, host = self._addresses(blocks, slots)
        self._copy(dev, host, blocks.size)
        return DONE

    def _by_block(self, work, nblocks: int) -> None:
        """Run ``work(first, stop)`` over block ranges, split over the copy helpers like
        ``_copy`` (each block's checksum and copy stay on one thread, in cache)."""
        total = int(self._nbytes.sum()) * nblocks
        if self._threads > 1 and total >= _PARALLEL_MIN_BYTES and nblocks > 1:
            parts = min(self._threads, nblocks)
            step = -(-nblocks // parts)
            pool = _helper_pool(parts - 1)
            futures = [pool.submit(work, i, min(i + step, nblocks))
                       for i in range(step, nblocks, step)]
            work(0, step)
            for future in futures:
                future.result()
        else:
            work(0, nblocks)

    def _piece_addresses(self, blocks: np.ndarray, slots: np.ndarray) -> tuple[list, list]:
        """Device and arena addresses of every piece (see ``_stamp_pieces``) of each block."""
        seg_idx, in_seg, offsets, _, _ = self._stamp_pieces()
        dev = (self._dev_addr[seg_idx][None, :] + blocks[:, None] * self._dev_stride[seg_idx]
               + in_seg[None, :]).ravel().tolist()
        host = (self._arena_base + slots[:, None] * self._slot_bytes + HEADER_BYTES
                + offsets[None, :]).ravel().tolist()
        return dev, host

    def _device_views(self) -> list:
        """One byte view per segment over the engine's tensor, for checksumming device pieces."""
        if self._dev_views is None:
            num_blocks = self._keep[0].num_blocks
            self._dev_views = [
                memoryview((ctypes.c_char * (stride * (num_blocks - 1) + size))
                           .from_address(addr)).cast("B")
                for addr, stride, size in zip(self._dev_addr.tolist(), self._dev_stride.tolist(),
                                              self._nbytes.tolist())]
        return self._dev_views

    def to_host_stamped(self, blocks: np.ndarray, slots: np.ndarray,
                        keys: Sequence[BlockKey], fingerprint: int) -> None:
        """Copy each block into its slot piece by piece, checksumming each piece of the device
        block just after the copy read it (still in cache; the copy's streaming stores leave the
        slot's bytes out of it), then stamp the header. The pieces are in payload order, so the
        digest is the payload's."""
        seg_idx, in_seg, _, lengths, _ = self._stamp_pieces()
        num_pieces = len(lengths)
        dev, host = self._piece_addresses(blocks, slots)
        views = [self._device_views()[i] for i in seg_idx.tolist()]
        starts = (blocks[:, None] * self._dev_stride[seg_idx][None, :]
                  + in_seg[None, :]).ravel().tolist()
        slot_list = slots.tolist()
        arena = memoryview(self._arena.array)
        slot_bytes, payload_bytes = self._slot_bytes, self._payload_bytes
        copy = _copy_bytes

        def work(first: int, stop: int) -> None:
            digest = xxhash.xxh3_64()
            for j in range(first, stop):
                at = j * num_pieces
                start = slot_list[j] * slot_bytes
                digest.reset()
                for p in range(num_pieces):
                    k = at + p
                    size = lengths[p]
                    copy(host[k], dev[k], size)
                    digest.update(views[p][starts[k]:starts[k] + size])
                arena[start:start + HEADER_BYTES] = header_for(keys[j], fingerprint,
                                                               payload_bytes, digest.intdigest())

        self._by_block(work, blocks.size)

    def to_device_verified(self, slots: np.ndarray, blocks: np.ndarray,
                           keys: Sequence[BlockKey], fingerprint: int,
                           check: Sequence[bool] | None) -> list[int]:
        """Per block: check the header, then copy the payload run by run (the pieces of one
        ``_STAMP_RUN_BYTES`` run of the slot) and checksum each run of the slot just after its
        pieces were read, while it is still in cache, as ``to_host_stamped`` does after writing
        them. Hashing the slot in a pass of its own before the copy read it from memory twice
        (4.7 GB/s here, against 5.7 for this, the plain copy 6.7); hashing each 64 KiB piece where
        it landed on the device costs a Python call per piece and fell to 0.76 of the plain copy
        under load, this 0.85. The slot is pinned for the load, so nothing writes it between the
        copy and the hash. A block whose header does not match is not copied; one whose payload
        checksum does not match is zeroed on the device once its last piece is in. Either way it
        is reported, and the engine recomputes it before any token attends to it. Returns the
        failed batch indices."""
        _, _, _, lengths, runs = self._stamp_pieces()
        num_pieces = len(lengths)
        dev, host = self._piece_addresses(blocks, slots)
        slot_list = slots.tolist()
        arena = memoryview(self._arena.array)
        slot_bytes, payload_bytes = self._slot_bytes, self._payload_bytes
        copy, memset = _copy_bytes, ctypes.memset
        bad: list[int] = []

        def work(first: int, stop: int) -> None:
            digest = xxhash.xxh3_64()
            for j in range(first, stop):
                at = j * num_pieces
                if check is not None and not check[j]:
                    for k in range(at, at + num_pieces):
                        copy(dev[k], host[k], lengths[k - at])
                    continue
                start = slot_list[j] * slot_bytes
                payload = start + HEADER_BYTES
                try:
                    want = expected_checksum(arena[start:payload], keys[j], fingerprint,
                                             payload_bytes)
                except BlockFormatError:
                    bad.append(j)
                    continue
                digest.reset()
                for piece, end, lo, hi in runs:
                    for k in range(at + piece, at + end):
                        copy(dev[k], host[k], lengths[k - at])
                    digest.update(arena[payload + lo:payload + hi])
                if digest.intdigest() != want:
                    for k in range(at, at + num_pieces):
                        memset(dev[k], 0, lengths[k - at])
                    bad.append(j)

        self._by_block(work, blocks.size)
        return sorted(bad)


def _copy_all(dsts: list, srcs: list, sizes: list) -> None:
    for d, s, size in zip(dsts, srcs, sizes):
        _copy_bytes(d, s, size)


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
        self._capacity = self.capacity = max(1, max_batch_blocks)
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


def copy_device_to_host(dev: DeviceKV, block_ids, arena: HostArena, slots, *,
                        keys: Sequence[BlockKey] | None = None, fingerprint: int = 0) -> None:
    """Copy device blocks into arena slots and return when the bytes are in the arena. With
    ``keys``, each slot's header is stamped too (see ``BlockCopier.to_host``).

    On CUDA the copy waits for work already queued on the caller's current stream."""
    _shared_copier(dev, arena).to_host(block_ids, slots, after=_current_stream_event(dev),
                                       keys=keys, fingerprint=fingerprint).wait()


def copy_host_to_device(arena: HostArena, slots, dev: DeviceKV, block_ids, *,
                        keys: Sequence[BlockKey] | None = None, fingerprint: int = 0,
                        check: Sequence[bool] | None = None) -> list[int]:
    """Copy arena slot payloads into device blocks and return when they are on the device.

    With ``keys``, slots are verified first (see ``BlockCopier.to_device_verified``); returns
    the batch indices that failed (always empty without ``keys``): the engine must recompute them."""
    copier = _shared_copier(dev, arena)
    after = _current_stream_event(dev)
    if keys is None:
        copier.to_device(slots, block_ids, after=after).wait()
        return []
    done, bad = copier.to_device_verified(slots, block_ids, keys, fingerprint, check=check,
                                          after=after)
    done.wait()
    return bad


def _current_stream_event(dev: DeviceKV) -> Any:
    """An event marking the work the caller queued so far on its CUDA stream (None on CPU)."""
    if dev.device.type != "cuda":
        return None
    import torch

    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(dev.device))
    return event
