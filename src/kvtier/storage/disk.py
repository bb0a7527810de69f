"""G3: the local disk tier. Preallocated slots, O_DIRECT vectored I/O, a durable index.

Files in ``directory`` (created 0700; files 0600):

- ``kvtier-g3.data``: ``num_slots`` slots of ``slot_bytes`` (a multiple of 4096), preallocated
  with ``posix_fallocate``. A slot holds a block exactly as a host-arena slot does (64-byte
  header with key, geometry fingerprint and checksum, then the payload), so a block moves between
  G2 and G3 in one aligned I/O, and runs of consecutive slots in one ``pwritev``/``preadv``.
- ``kvtier-g3.journal``: the durable index. A 64-byte superblock (slot size, slot count), then
  64-byte records ``ADD(slot, fingerprint, key)`` / ``DEL(slot)``, each with its own checksum.
- ``kvtier-g3.lock``: ``flock``-ed by the one process that owns the tier.

Warm-restart rule: a block's ADD record is appended only after its bytes are durable
(``fdatasync`` of the data file), and a slot about to be overwritten gets a durable DEL first.
So after any crash (SIGKILL included) the journal names only blocks whose bytes and checksum are
on disk; a torn write can lose a block, never expose it. A torn journal tail fails its record
checksum and is dropped. On open the journal is compacted (rewritten with the live entries of
this fingerprint) and atomically renamed into place. Every read is verified anyway: a bad
checksum, short read or I/O error is a failed block, never data.

Expected failures (ENOSPC, EIO, EFBIG...) are per-block ``False`` results and counters; only
broken contracts (slot out of range, wrong arena) and set-up failures raise ``StorageError``.

A journal append that fails (write or ``fdatasync`` error) leaves the journal's tail in an
unknown state: its records may or may not be durable, and a torn record would hide every record
after it on replay. The index in memory is updated first (an invalidated slot is gone at once),
then the journal is rewritten from it (atomically, as at open). If that rewrite fails too the
tier is *degraded*: it appends nothing and refuses every write, so a slot whose DEL may not be
durable keeps the bytes of the block its surviving ADD names, and a restart can at most bring
back an intact block (verified on read like any other), never a slot with other contents.
Reads of indexed blocks go on; the rewrite is retried now and then and, once it succeeds,
writes resume.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import xxhash

from kvtier.errors import StorageError
from kvtier.storage import faults
from kvtier.storage.block_format import (
    FORMAT_VERSION,
    HEADER,
    HEADER_BYTES,
    MAGIC,
    checksum,
    key_bytes,
)
from kvtier.storage.host import PAGE_BYTES, HostArena
from kvtier.tiers import BlockKey

if TYPE_CHECKING:  # never imported at run time: typing.Self needs Python 3.11
    from typing_extensions import Self

logger = logging.getLogger(__name__)

DATA_NAME = "kvtier-g3.data"
JOURNAL_NAME = "kvtier-g3.journal"
LOCK_NAME = "kvtier-g3.lock"

JOURNAL_VERSION = 1
_SUPER = struct.Struct("<4sHHQQ32sQ")  # magic, version, flags, slot_bytes, num_slots, pad, crc
_RECORD = struct.Struct("<4sBBBxQQ32sQ")  # magic, op, key kind, key len, slot, fp, key, crc
_SUPER_MAGIC = b"KVTJ"
_RECORD_MAGIC = b"KVTR"
_OP_ADD, _OP_DEL = 1, 2
_KEY_INT, _KEY_BYTES = 0, 1
RECORD_BYTES = _RECORD.size  # 64, as is the superblock

_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_HEAL_INTERVAL_S = 30.0  # a degraded tier retries its journal rewrite at most this often
DEGRADED = "degraded"  # write_errors reason: refused while the journal cannot be trusted


@dataclass
class DiskStats:
    """Counters of one DiskStorage (read by metrics; updated under the storage's lock)."""

    bytes_written: int = 0
    blocks_written: int = 0
    dropped_writes: int = 0  # blocks whose write failed (ENOSPC, EIO...)
    write_errors: Counter = field(default_factory=Counter)  # errno name -> blocks
    bytes_read: int = 0
    blocks_read: int = 0
    failed_reads: Counter = field(default_factory=Counter)  # reason -> blocks
    write_ios: int = 0  # vectored system calls issued
    read_ios: int = 0
    invalidated: int = 0
    journal_compactions: int = 0
    journal_errors: int = 0  # journal appends or rewrites that failed (write or sync error)
    degraded: bool = False  # the journal cannot be trusted: no writes until a rewrite works

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if not isinstance(v, Counter)}
        out["write_errors"] = dict(self.write_errors)
        out["failed_reads"] = dict(self.failed_reads)
        return out


# -- journal encoding -------------------------------------------------------------------------


def _crc(prefix: bytes) -> int:
    return xxhash.xxh3_64_intdigest(prefix)


def _pack_super(slot_bytes: int, num_slots: int) -> bytes:
    head = _SUPER.pack(_SUPER_MAGIC, JOURNAL_VERSION, 0, slot_bytes, num_slots, bytes(32), 0)
    return head[:56] + struct.pack("<Q", _crc(head[:56]))


def _pack_record(op: int, slot: int, fingerprint: int, key: BlockKey | None) -> bytes:
    if key is None:
        kind, length, raw = _KEY_INT, 0, bytes(32)
    elif isinstance(key, int):
        kind, length, raw = _KEY_INT, 8, key_bytes(key)
    else:
        kind, length, raw = _KEY_BYTES, len(key), key_bytes(key)
    head = _RECORD.pack(_RECORD_MAGIC, op, kind, length, slot, fingerprint, raw, 0)
    return head[:56] + struct.pack("<Q", _crc(head[:56]))


def _unpack_key(kind: int, length: int, raw: bytes) -> BlockKey:
    if kind == _KEY_INT:
        return int.from_bytes(raw[:8], "little")
    return bytes(raw[:length])


@dataclass
class _JournalState:
    slot_bytes: int
    num_slots: int
    entries: dict[int, tuple[int, BlockKey]]  # slot -> (fingerprint, key)
    valid_bytes: int  # length of the intact prefix
    torn: bool  # a record failed its checksum (a crash mid-append)


def _parse_journal(data: bytes) -> _JournalState | None:
    """Replay a journal image; None if it has no intact superblock."""
    if len(data) < RECORD_BYTES:
        return None
    magic, version, _flags, slot_bytes, num_slots, _pad, crc = _SUPER.unpack_from(data, 0)
    if magic != _SUPER_MAGIC or version != JOURNAL_VERSION or crc != _crc(data[:56]):
        return None
    entries: dict[int, tuple[int, BlockKey]] = {}
    offset, torn = RECORD_BYTES, False
    while offset + RECORD_BYTES <= len(data):
        magic, op, kind, length, slot, fp, raw, crc = _RECORD.unpack_from(data, offset)
        if (magic != _RECORD_MAGIC or crc != _crc(data[offset:offset + 56])
                or op not in (_OP_ADD, _OP_DEL) or length > 32):
            torn = True
            break
        if op == _OP_ADD:
            entries[slot] = (fp, _unpack_key(kind, length, raw))
        else:
            entries.pop(slot, None)
        offset += RECORD_BYTES
    torn = torn or offset != len(data)
    return _JournalState(slot_bytes, num_slots, entries, offset, torn)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _JournalReplacedError(OSError):
    """A journal rewrite failed after the new file was renamed into place: the directory entry
    may not be durable, or appends may still go to the old, unlinked file."""


def _failure_reason(header, payload, key: BlockKey, fingerprint: int) -> str:
    """The counter label of a block that failed verification: the first header field (in
    ``block_format.verify``'s order) that is not what the reader expects, from the fields
    themselves, never from an error message."""
    if len(header) < HEADER_BYTES:
        return "short_read"
    magic, version, _flags, geometry, stored_key, length, stored_sum = HEADER.unpack_from(header)
    if magic != MAGIC:
        return "magic"
    if version != FORMAT_VERSION:
        return "version"
    if geometry != fingerprint:
        return "geometry"
    if stored_key != key_bytes(key):
        return "key"
    if length != len(payload):
        return "length"
    if checksum(payload) != stored_sum:
        return "checksum"
    return "format"


# -- the tier ---------------------------------------------------------------------------------


class DiskStorage:
    """The G3 tier of one worker: ``num_slots`` block slots in one preallocated file."""

    def __init__(self, directory: str, num_slots: int, slot_bytes: int, fingerprint: int, *,
                 o_direct: bool = True, io_threads: int = 4, max_io_bytes: int = 8 << 20):
        if not isinstance(num_slots, int) or num_slots <= 0:
            raise StorageError(f"disk tier {directory!r}: num_slots must be a positive int, "
                               f"got {num_slots!r}")
        if slot_bytes <= HEADER_BYTES or slot_bytes % PAGE_BYTES:
            raise StorageError(f"disk tier {directory!r}: slot_bytes {slot_bytes} must be a "
                               f"multiple of {PAGE_BYTES} larger than the header")
        if io_threads <= 0:
            raise StorageError(f"disk tier {directory!r}: io_threads must be positive")
        self.directory = os.path.abspath(directory)
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.fingerprint = fingerprint & 0xFFFF_FFFF_FFFF_FFFF
        self.stats = DiskStats()
        self.data_path = os.path.join(self.directory, DATA_NAME)
        self.journal_path = os.path.join(self.directory, JOURNAL_NAME)
        self._max_run = max(1, min(_IOV_MAX, max_io_bytes // slot_bytes))
        self._lock = threading.Lock()  # index, journal appends, stats
        self._keys: list[BlockKey | None] = []  # slot -> key of the durable block there
        self._lock_fd = self._data_fd = self._journal_fd = -1
        self._journal_records = 0
        self._compact_after = 2 * num_slots + 4096  # records, before an online compaction
        self._journal_error_logged = False  # the first journal error logs a warning, later ones
        # ("write" | "read", reason) pairs already warned about: later ones log at debug.
        self._failures_logged: set[tuple[str, str]] = set()
        self._heal_at = 0.0  # degraded: monotonic time of the next journal rewrite attempt
        self._pool: ThreadPoolExecutor | None = None
        try:
            self._open(o_direct)
        except BaseException:
            self._close_fds()
            raise
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="kvtier-disk")

    # -- set-up -----------------------------------------------------------------------------

    def _open(self, o_direct: bool) -> None:
        directory = self.directory
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"disk tier: cannot create directory {directory!r}: "
                               f"{exc.strerror or exc}") from exc
        if not os.path.isdir(directory):
            raise StorageError(f"disk tier: {directory!r} is not a directory")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise StorageError(f"disk tier: directory {directory!r} is not writable")
        self._lock_fd = self._open_file(os.path.join(directory, LOCK_NAME), os.O_RDWR)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise StorageError(f"disk tier {directory!r} is in use by another process "
                               f"(lock {LOCK_NAME})") from exc
        self._open_data(o_direct)
        self._preallocate()
        self._keys = [None] * self.num_slots
        self._load_journal()

    def _open_file(self, path: str, flags: int) -> int:
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StorageError(f"disk tier: cannot open {path!r}: {exc.strerror or exc}"
                               ) from exc
        os.fchmod(fd, 0o600)
        return fd

    def _open_data(self, o_direct: bool) -> None:
        self.o_direct = False
        if o_direct and hasattr(os, "O_DIRECT"):
            try:
                self._data_fd = os.open(self.data_path,
                                        os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_DIRECT,
                                        0o600)
                os.fchmod(self._data_fd, 0o600)
                self.o_direct = True
                return
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise StorageError(f"disk tier: cannot open {self.data_path!r}: "
                                       f"{exc.strerror or exc}") from exc
                logger.warning("disk tier %s: the file system refuses O_DIRECT (%s); using "
                               "buffered I/O (slower, and it fills the page cache)",
                               self.directory, exc.strerror)
        self._data_fd = self._open_file(self.data_path, os.O_RDWR)

    def _preallocate(self) -> None:
        need = self.num_slots * self.slot_bytes
        st = os.fstat(self._data_fd)
        if st.st_size > need:
            os.ftruncate(self._data_fd, need)
        missing = max(0, need - st.st_blocks * 512)
        if missing:
            vfs = os.statvfs(self.directory)
            free = vfs.f_bavail * vfs.f_frsize
            if vfs.f_blocks and missing > free:  # f_blocks 0: no size limit known (ramfs)
                raise StorageError(
                    f"disk tier {self.data_path!r}: not enough space for {need} bytes "
                    f"({self.num_slots} slots x {self.slot_bytes} B): {missing} more bytes "
                    f"needed, {free} free")
        try:
            os.posix_fallocate(self._data_fd, 0, need)
        except OSError as exc:
            if exc.errno == errno.EOPNOTSUPP:  # no preallocation here: extend the file
                os.ftruncate(self._data_fd, max(need, st.st_size))
            else:
                raise StorageError(f"disk tier {self.data_path!r}: cannot preallocate {need} "
                                   f"bytes: {exc.strerror or exc}") from exc

    def _load_journal(self) -> None:
        try:
            with open(self.journal_path, "rb") as f:
                image = f.read()
        except FileNotFoundError:
            image = b""
        state = _parse_journal(image)
        live: dict[int, tuple[int, BlockKey]] = {}
        if state is None:
            if image:
                logger.warning("disk tier %s: journal has no valid superblock; starting empty",
                               self.directory)
        elif state.slot_bytes != self.slot_bytes:
            logger.warning("disk tier %s: slot size changed (%d -> %d); starting empty",
                           self.directory, state.slot_bytes, self.slot_bytes)
        else:
            if state.torn:
                logger.warning("disk tier %s: journal tail torn at byte %d (a crash "
                               "mid-append); dropping it", self.directory, state.valid_bytes)
            other = 0
            for slot, (fp, key) in state.entries.items():
                if fp != self.fingerprint:
                    other += 1
                elif slot < self.num_slots:
                    live[slot] = (fp, key)
            if other:
                logger.info("disk tier %s: dropped %d blocks of another geometry/model",
                            self.directory, other)
        for slot, (_fp, key) in live.items():
            self._keys[slot] = key
        try:
            self._rewrite_journal()
        except OSError as exc:
            raise StorageError(f"disk tier: cannot write the journal {self.journal_path!r}: "
                               f"{exc.strerror or exc}") from exc
        logger.info("disk tier %s: %d slots x %d B, recovered %d blocks, %s I/O",
                    self.directory, self.num_slots, self.slot_bytes, len(live),
                    "O_DIRECT" if self.o_direct else "buffered")

    def _rewrite_journal(self) -> None:
        """Atomically replace the journal with a superblock + one ADD per live block."""
        records = [_pack_super(self.slot_bytes, self.num_slots)]
        records += [_pack_record(_OP_ADD, slot, self.fingerprint, key)
                    for slot, key in enumerate(self._keys) if key is not None]
        tmp = self.journal_path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            _write_all(fd, b"".join(records))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.journal_path)
        try:
            new_fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            old_fd, self._journal_fd = self._journal_fd, new_fd
            if old_fd >= 0:
                os.close(old_fd)
            self._journal_records = len(records) - 1
            _fsync_dir(self.directory)
        except OSError as exc:
            raise _JournalReplacedError(exc.errno, exc.strerror) from exc

    def _append_journal(self, records: list[bytes]) -> None:
        """Append and make durable (caller holds the lock). On OSError the caller must call
        ``_journal_failed``: the records may be partly written, and not durable."""
        _write_all(self._journal_fd, b"".join(records))
        if faults.active:  # FAULT HOOK: tests only, see storage/faults.py
            faults.before_sync()
        os.fdatasync(self._journal_fd)
        self._journal_records += len(records)

    def _journal_failed(self, exc: OSError, what: str) -> None:
        """A journal append failed (caller holds the lock, and has already dropped from the
        index whatever the append was to remove). Rewrite the journal from the index, which
        also drops a torn tail; if even that fails, degrade the tier."""
        self.stats.journal_errors += 1
        reason = errno.errorcode.get(exc.errno, str(exc.errno))
        if not self._journal_error_logged:
            self._journal_error_logged = True
            logger.warning("disk tier %s: journal %s failed (%s); rewriting the journal from "
                           "the index (later journal errors are counted, not logged)",
                           self.directory, what, reason)
        else:
            logger.debug("disk tier %s: journal %s failed (%s)", self.directory, what, reason)
        if self.stats.degraded:
            return
        try:
            self._rewrite_journal()
        except OSError as rewrite_exc:
            self.stats.journal_errors += 1
            self._degrade(rewrite_exc)

    def _degrade(self, exc: OSError) -> None:
        """Stop writing: the journal on disk may name slots the index no longer holds."""
        self.stats.degraded = True
        self._heal_at = time.monotonic() + _HEAL_INTERVAL_S
        logger.error("disk tier %s: the journal cannot be rewritten (%s); the tier is degraded:"
                     " it serves the blocks it holds and refuses writes until a rewrite "
                     "succeeds (retried every %.0f s)", self.directory,
                     errno.errorcode.get(exc.errno, str(exc.errno)), _HEAL_INTERVAL_S)

    def _maybe_heal(self) -> None:
        """Degraded: retry the journal rewrite now and then (caller holds the lock)."""
        if not self.stats.degraded or time.monotonic() < self._heal_at:
            return
        try:
            self._rewrite_journal()
        except OSError as exc:
            self.stats.journal_errors += 1
            self._heal_at = time.monotonic() + _HEAL_INTERVAL_S
            logger.debug("disk tier %s: journal rewrite still fails (%s)", self.directory, exc)
            return
        self.stats.degraded = False
        logger.info("disk tier %s: journal rewritten; writes resume", self.directory)

    @property
    def degraded(self) -> bool:
        """True while the journal cannot be trusted and every write is refused."""
        return self.stats.degraded

    def _maybe_compact(self) -> None:
        """Rewrite a journal grown large (caller holds the lock and has updated the index)."""
        if self._journal_records > self._compact_after:
            try:
                self._rewrite_journal()
            except _JournalReplacedError as exc:  # which journal a restart finds is unknown
                self.stats.journal_errors += 1
                self._degrade(exc)
                return
            except OSError as exc:  # the long journal is still valid: keep appending to it
                logger.warning("disk tier %s: journal compaction failed: %s", self.directory,
                               exc)
                self._compact_after += self.num_slots + 4096  # do not retry on every write
                return
            self.stats.journal_compactions += 1

    # -- index ------------------------------------------------------------------------------

    def recover(self) -> list[tuple[int, BlockKey]]:
        """(disk_slot, key) of every block durable on disk under this fingerprint."""
        with self._lock:
            return [(slot, key) for slot, key in enumerate(self._keys) if key is not None]

    @staticmethod
    def read_index(directory: str, fingerprint: int) -> list[tuple[int, BlockKey]]:
        """The durable index of the tier in ``directory``, read-only (for another process).

        Blocks of another fingerprint are left out. A missing directory or journal reads as
        empty. The owner may compact the journal meanwhile; the rename is atomic, so this sees
        the old or the new one, both correct.
        """
        path = os.path.join(directory, JOURNAL_NAME)
        try:
            with open(path, "rb") as f:
                image = f.read()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageError(f"disk tier: cannot read {path!r}: {exc.strerror or exc}") from exc
        state = _parse_journal(image)
        if state is None:
            return []
        fingerprint &= 0xFFFF_FFFF_FFFF_FFFF
        return sorted((slot, key) for slot, (fp, key) in state.entries.items()
                      if fp == fingerprint and slot < state.num_slots)

    def contains(self, disk_slot: int, key: BlockKey) -> bool:
        stored = self._keys[disk_slot] if 0 <= disk_slot < self.num_slots else None
        return stored is not None and key_bytes(stored) == key_bytes(key)

    def invalidate(self, disk_slots: Sequence[int]) -> None:
        """Durably drop ``disk_slots`` from the index before they are reused.

        The slots leave the index at once, whatever happens. A journal error never raises: the
        journal is rewritten from the index, or else the tier degrades (no writes, so the slots
        keep their bytes and a restart cannot find other contents under their old keys).
        """
        self._check_open()
        with self._lock:
            slots = [s for s in dict.fromkeys(disk_slots) if self._check_slot(s) is not None
                     and self._keys[s] is not None]
            if not slots:
                return
            for s in slots:
                self._keys[s] = None
            self.stats.invalidated += len(slots)
            was_degraded = self.stats.degraded
            self._maybe_heal()
            if was_degraded:
                # Healed: the rewrite already left these slots out. Still degraded: append
                # nothing (a record after a torn one would be lost on replay).
                return
            try:
                self._append_journal([_pack_record(_OP_DEL, s, self.fingerprint, None)
                                      for s in slots])
            except OSError as exc:
                self._journal_failed(exc, "invalidation")
                return
            self._maybe_compact()

    def _check_slot(self, slot: int) -> int:
        if not 0 <= slot < self.num_slots:
            raise StorageError(f"disk tier {self.directory}: slot {slot} out of range "
                               f"[0, {self.num_slots})")
        return slot

    def _check_arena(self, arena: HostArena) -> None:
        if arena.slot_bytes != self.slot_bytes:
            raise StorageError(f"disk tier {self.directory}: arena slots are "
                               f"{arena.slot_bytes} B, disk slots {self.slot_bytes} B")

    def _check_open(self) -> None:
        if self._pool is None:
            raise StorageError(f"disk tier {self.directory} is closed")

    # -- I/O --------------------------------------------------------------------------------

    def _runs(self, order: list[int], disk_slots: list[int]) -> list[list[int]]:
        """Split ``order`` (indices sorted by disk slot) into runs of consecutive slots."""
        runs: list[list[int]] = []
        for i in order:
            if (runs and len(runs[-1]) < self._max_run
                    and disk_slots[runs[-1][-1]] + 1 == disk_slots[i]):
                runs[-1].append(i)
            else:
                runs.append([i])
        return runs

    def _vector_io(self, write: bool, arena: HostArena, first_slot: int,
                   arena_slots: list[int]) -> tuple[int, str | None]:
        """Move whole slots between the arena and consecutive disk slots from ``first_slot``.

        Returns (number of slots fully moved, reason the rest failed or None).
        """
        done = 0
        while done < len(arena_slots):
            buffers = [arena.slot_view(s) for s in arena_slots[done:]]
            offset = (first_slot + done) * self.slot_bytes
            try:
                if faults.active:  # FAULT HOOK: tests only, see storage/faults.py
                    moved = faults.vector_io(write, self._data_fd, buffers, offset)
                elif write:
                    moved = os.pwritev(self._data_fd, buffers, offset)
                else:
                    moved = os.preadv(self._data_fd, buffers, offset)
            except OSError as exc:
                return done, errno.errorcode.get(exc.errno, str(exc.errno))
            finally:
                with self._lock:
                    if write:
                        self.stats.write_ios += 1
                    else:
                        self.stats.read_ios += 1
            if moved < self.slot_bytes:  # end of file, or a limit inside this slot
                return done, "short_write" if write else "short_read"
            # A partial last slot is retried from its start (keeps O_DIRECT alignment).
            done += moved // self.slot_bytes
        return done, None

    def write(self, arena: HostArena, pairs: Sequence[tuple[int, int, BlockKey]]) -> list[bool]:
        """Store ``(arena_slot, disk_slot, key)`` blocks; per-block success.

        Headers are stamped in the arena, each run of consecutive disk slots goes out as one
        vectored write, the data is made durable, and only then are the blocks recorded in the
        journal. Failures (disk full, I/O errors) are False results and counters.
        """
        self._check_open()
        self._check_arena(arena)
        n = len(pairs)
        ok = [False] * n
        if n == 0:
            return ok
        arena_slots = [p[0] for p in pairs]
        disk_slots = [self._check_slot(p[1]) for p in pairs]
        keys = [p[2] for p in pairs]
        for s in arena_slots:
            arena.check_slot(s)
        for key in keys:
            key_bytes(key)  # a malformed key is refused before any I/O
        if len(set(disk_slots)) != n:
            raise StorageError(f"disk tier {self.directory}: a write names a disk slot twice")
        # A slot that still holds an indexed block is dropped from the index first, so a crash
        # mid-overwrite cannot expose it.
        self.invalidate([s for s in disk_slots if self._keys[s] is not None])
        with self._lock:
            self._maybe_heal()
            degraded = self.stats.degraded
        if degraded:  # a DEL may not be durable: overwrite nothing
            return self._refuse(n, DEGRADED)

        def write_run(run: list[int]) -> tuple[list[int], int, str | None]:
            run_slots = [arena_slots[i] for i in run]
            arena.write_header(run_slots, [keys[i] for i in run], self.fingerprint)
            done, reason = self._vector_io(True, arena, disk_slots[run[0]], run_slots)
            return run, done, reason

        runs = self._runs(sorted(range(n), key=disk_slots.__getitem__), disk_slots)
        errors: Counter = Counter()
        for run, done, reason in self._map(write_run, runs):
            for i in run[:done]:
                ok[i] = True
            if reason is not None:
                errors[reason] += len(run) - done
        written = [i for i in range(n) if ok[i]]
        if written:
            failure = None
            try:
                if faults.active:  # FAULT HOOK: tests only, see storage/faults.py
                    faults.before_sync()
                os.fdatasync(self._data_fd)
            except OSError as exc:
                failure = errno.errorcode.get(exc.errno, str(exc.errno))
            else:
                with self._lock:
                    if self.stats.degraded:  # degraded meanwhile: append nothing
                        failure = DEGRADED
                    else:
                        try:
                            self._append_journal([_pack_record(
                                _OP_ADD, disk_slots[i], self.fingerprint, keys[i])
                                for i in written])
                        except OSError as exc:
                            failure = errno.errorcode.get(exc.errno, str(exc.errno))
                            self._journal_failed(exc, "append")
                        else:
                            for i in written:
                                self._keys[disk_slots[i]] = keys[i]
                            self._maybe_compact()
            if failure is not None:
                errors[failure] += len(written)
                for i in written:
                    ok[i] = False
                written = []
        with self._lock:
            self.stats.blocks_written += len(written)
            self.stats.bytes_written += len(written) * self.slot_bytes
            dropped = n - len(written)
            if dropped:
                self.stats.dropped_writes += dropped
                self.stats.write_errors.update(errors)
        if errors:
            self._log_failures("write", n - len(written), n, errors)
        return ok

    def _log_failures(self, what: str, num_failed: int, num: int, reasons: Counter) -> None:
        """The first failure of each kind (write or read, reason) logs a warning; later ones
        are counted in ``stats`` and logged at debug, so a full or failing disk does not
        repeat the same warning every step."""
        with self._lock:
            new = {(what, reason) for reason in reasons} - self._failures_logged
            self._failures_logged |= new
        if new:
            logger.warning("disk tier %s: %d of %d block %ss failed (%s); later %s failures "
                           "of this kind are counted, logged at debug", self.directory,
                           num_failed, num, what, dict(reasons), what)
        else:
            logger.debug("disk tier %s: %d of %d block %ss failed (%s)", self.directory,
                         num_failed, num, what, dict(reasons))

    def _refuse(self, n: int, reason: str) -> list[bool]:
        """Every block of a write fails for ``reason`` (counted, logged at debug)."""
        with self._lock:
            self.stats.dropped_writes += n
            self.stats.write_errors[reason] += n
        logger.debug("disk tier %s: %d block writes refused (%s)", self.directory, n, reason)
        return [False] * n

    def read(self, arena: HostArena, pairs: Sequence[tuple[int, int, BlockKey]]) -> list[bool]:
        """Load ``(disk_slot, arena_slot, key)`` blocks into the arena; per-block success.

        Runs of consecutive disk slots are read with one vectored read each; every block is
        verified (header, key, fingerprint, checksum) in the arena. A block that is not in the
        index, fails verification, or hits a short read or I/O error is False, and its arena
        header is wiped so the bytes cannot be mistaken for a block later.
        """
        self._check_open()
        self._check_arena(arena)
        n = len(pairs)
        ok = [False] * n
        if n == 0:
            return ok
        disk_slots = [self._check_slot(p[0]) for p in pairs]
        arena_slots = [p[1] for p in pairs]
        keys = [p[2] for p in pairs]
        for s in arena_slots:
            arena.check_slot(s)
        if len(set(arena_slots)) != n:
            raise StorageError(f"disk tier {self.directory}: a read names an arena slot twice")
        reasons: Counter = Counter()
        wanted = []
        for i in range(n):
            if self.contains(disk_slots[i], keys[i]):
                wanted.append(i)
            else:
                reasons["not_indexed"] += 1

        def read_run(run: list[int]) -> tuple[list[int], Counter]:
            run_slots = [arena_slots[i] for i in run]
            done, reason = self._vector_io(False, arena, disk_slots[run[0]], run_slots)
            failed: Counter = Counter()
            if reason is not None:
                failed[reason] += len(run) - done
            for i in run[:done]:
                slot = arena_slots[i]
                problem = arena.check(slot, keys[i], self.fingerprint)
                if problem is None:
                    ok[i] = True
                else:
                    failed[_failure_reason(arena.header(slot), arena.payload(slot), keys[i],
                                           self.fingerprint)] += 1
                    logger.debug("disk tier: slot %d: %s", disk_slots[i], problem)
            return run, failed

        for run, failed in self._map(read_run, self._runs(
                sorted(wanted, key=disk_slots.__getitem__), disk_slots)):
            reasons.update(failed)
        for i in range(n):
            if not ok[i]:
                arena.header(arena_slots[i])[:] = 0
        good = sum(ok)
        with self._lock:
            self.stats.blocks_read += good
            self.stats.bytes_read += good * self.slot_bytes
            self.stats.failed_reads.update(reasons)
        if good != n:
            self._log_failures("read", n - good, n, reasons)
        return ok

    def _map(self, fn, runs: list):
        """Run ``fn`` over ``runs`` on the I/O threads (the last in the calling thread)."""
        if not runs:
            return []
        futures = [self._pool.submit(fn, run) for run in runs[:-1]]
        last = fn(runs[-1])
        return [f.result() for f in futures] + [last]

    # -- shutdown ---------------------------------------------------------------------------

    def _close_fds(self) -> None:
        for name in ("_data_fd", "_journal_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)  # closing the lock fd releases the flock
                setattr(self, name, -1)

    def close(self) -> None:
        """Finish in-flight I/O and release the files. The index is already durable."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        with self._lock:
            self._close_fds()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"DiskStorage({self.directory!r}, {self.num_slots} slots x {self.slot_bytes} B, "
                f"{'O_DIRECT' if self.o_direct else 'buffered'})")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class DiskReader:
    """A read-only view of a disk tier that another process owns (its ``DiskStorage``).

    For engines whose ranks hold the same KV (SGLang's MLA: rank 0 writes, every rank reads):
    the other ranks read the owner's slots without its lock. The index is the owner's durable
    journal (``DiskStorage.read_index``), re-read when a lookup misses and the journal file has
    changed. The owner may overwrite a slot at any time, so every block read is verified
    against its header (key, fingerprint, checksum): a slot that now holds another block, or
    is half rewritten, is a miss, never data.
    """

    def __init__(self, directory: str, fingerprint: int, slot_bytes: int, *,
                 o_direct: bool = True) -> None:
        self.directory = os.path.abspath(directory)
        self.fingerprint = fingerprint & 0xFFFF_FFFF_FFFF_FFFF
        self.slot_bytes = slot_bytes
        self._o_direct = o_direct
        self._fd = -1
        self._slot_of: dict[bytes, int] = {}
        self._journal_id: tuple[int, int, int] | None = None
        self._lock = threading.Lock()
        self.failed_reads: Counter = Counter()

    def lookup(self, key: BlockKey) -> int | None:
        """The owner's slot holding ``key`` per its journal (None: not indexed)."""
        slot = self._slot_of.get(key_bytes(key))
        if slot is None and self._refresh():
            slot = self._slot_of.get(key_bytes(key))
        return slot

    def _refresh(self) -> bool:
        """Re-read the journal if it changed since the last read; True if it was re-read."""
        path = os.path.join(self.directory, JOURNAL_NAME)
        try:
            st = os.stat(path)
        except OSError:
            return False
        journal_id = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if journal_id == self._journal_id:
                return False
            try:
                entries = DiskStorage.read_index(self.directory, self.fingerprint)
            except StorageError as exc:
                logger.debug("disk reader %s: %s", self.directory, exc)
                return False
            self._slot_of = {key_bytes(key): slot for slot, key in entries}
            self._journal_id = journal_id
        return True

    def _data_fd(self) -> int:
        if self._fd < 0:
            path = os.path.join(self.directory, DATA_NAME)
            flags = os.O_RDONLY | os.O_CLOEXEC
            if self._o_direct and hasattr(os, "O_DIRECT"):
                try:
                    self._fd = os.open(path, flags | os.O_DIRECT)
                    return self._fd
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                        raise
            self._fd = os.open(path, flags)
        return self._fd

    def read(self, arena: HostArena, pairs: Sequence[tuple[int, int, BlockKey]]) -> list[bool]:
        """Load ``(disk_slot, arena_slot, key)`` blocks into the arena, verified; per-block
        success (a failed block's arena header is wiped)."""
        if arena.slot_bytes != self.slot_bytes:
            raise StorageError(f"disk reader {self.directory}: arena slots are "
                               f"{arena.slot_bytes} B, disk slots {self.slot_bytes} B")
        ok = [False] * len(pairs)
        for i, (disk_slot, arena_slot, key) in enumerate(pairs):
            view = arena.slot_view(arena_slot)
            try:
                moved = os.preadv(self._data_fd(), [view], disk_slot * self.slot_bytes)
            except OSError as exc:
                self.failed_reads[errno.errorcode.get(exc.errno, str(exc.errno))] += 1
                moved = -1
            if moved == self.slot_bytes and arena.check(arena_slot, key, self.fingerprint) is None:
                ok[i] = True
                continue
            if moved == self.slot_bytes:
                self.failed_reads[_failure_reason(arena.header(arena_slot),
                                                  arena.payload(arena_slot), key,
                                                  self.fingerprint)] += 1
            elif moved >= 0:
                self.failed_reads["short_read"] += 1
            arena.header(arena_slot)[:] = 0
            # Forget the entry: the next lookup re-reads the journal (the slot was reused).
            self._slot_of.pop(key_bytes(key), None)
        return ok

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
