"""G3 disk tier: durable index, verified reads, failures as results, file hygiene."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kvtier.errors import StorageError
from kvtier.layout import KVGeometry, LayoutKind
from kvtier.storage import disk as disk_module
from kvtier.storage import faults
from kvtier.storage.disk import DATA_NAME, DEGRADED, JOURNAL_NAME, DiskStorage
from kvtier.storage.host import HostArena
from need import need

GEOMETRY = KVGeometry(num_layers=2, kv_factor=2, block_size=16, num_kv_heads=2, head_size=32,
                      dtype="bfloat16", layout=LayoutKind.VLLM_CPU)  # 8 KiB payload
FP = GEOMETRY.fingerprint("test")
NUM_DISK = 16


@pytest.fixture
def arena():
    a = HostArena(16, GEOMETRY, pin=False)
    yield a
    a.close()


@pytest.fixture
def disk(tmp_path, arena):
    d = DiskStorage(str(tmp_path / "g3"), NUM_DISK, arena.slot_bytes, FP)
    yield d
    d.close()


def fill(arena, slots, seed=0):
    rng = np.random.default_rng(seed)
    data = {}
    for s in slots:
        arena.payload(s)[:] = rng.integers(0, 256, arena.payload_bytes, dtype=np.uint8)
        data[s] = arena.payload(s).copy()
    return data


def read_back(disk, arena, disk_slots, keys, into):
    return disk.read(arena, list(zip(disk_slots, into, keys)))


def test_round_trip_int_and_bytes_keys(disk, arena):
    data = fill(arena, [0, 1, 2])
    keys = [7, b"\x01" * 32, b"short"]
    assert disk.write(arena, [(0, 5, keys[0]), (1, 6, keys[1]), (2, 11, keys[2])]) == [True] * 3
    arena.array[:] = 0
    assert read_back(disk, arena, [5, 6, 11], keys, [9, 10, 12]) == [True] * 3
    for src, dst in ((0, 9), (1, 10), (2, 12)):
        assert np.array_equal(arena.payload(dst), data[src])
    assert disk.recover() == [(5, 7), (6, b"\x01" * 32), (11, b"short")]
    assert DiskStorage.read_index(disk.directory, FP) == disk.recover()
    assert DiskStorage.read_index(disk.directory, FP ^ 1) == []
    assert disk.stats.blocks_written == 3 and disk.stats.blocks_read == 3


def test_consecutive_slots_merge_into_one_vectored_io(disk, arena):
    fill(arena, range(8))
    arena_slots = [7, 0, 5, 2, 1, 6, 3, 4]  # scattered in the arena, consecutive on disk
    pairs = [(a, 4 + i, 100 + i) for i, a in enumerate(arena_slots)]
    assert all(disk.write(arena, pairs[::-1]))  # any order in, sorted inside
    assert disk.stats.write_ios == 1
    assert all(disk.read(arena, [(4 + i, 8 + i, 100 + i) for i in range(8)]))
    assert disk.stats.read_ios == 1
    assert all(disk.read(arena, [(4, 8, 100), (6, 9, 102), (8, 10, 104)]))
    assert disk.stats.read_ios == 4


def test_corrupted_byte_on_disk_fails_that_block_only(disk, arena):
    data = fill(arena, [0, 1, 2])
    assert all(disk.write(arena, [(0, 0, 1), (1, 1, 2), (2, 2, 3)]))
    with open(os.path.join(disk.directory, DATA_NAME), "r+b") as f:
        f.seek(1 * disk.slot_bytes + 64 + 1000)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    arena.array[:] = 0
    assert read_back(disk, arena, [0, 1, 2], [1, 2, 3], [5, 6, 7]) == [True, False, True]
    assert disk.stats.failed_reads["checksum"] == 1
    assert np.array_equal(arena.payload(5), data[0]) and np.array_equal(arena.payload(7), data[2])
    assert not arena.header(6).any()  # the bad slot cannot pass for a block later


def test_corrupted_header_is_a_miss(disk, arena):
    fill(arena, [0])
    assert all(disk.write(arena, [(0, 3, 77)]))
    with open(os.path.join(disk.directory, DATA_NAME), "r+b") as f:
        f.seek(3 * disk.slot_bytes)
        f.write(b"XXXX")  # magic
    assert read_back(disk, arena, [3], [77], [1]) == [False]
    assert disk.stats.failed_reads["magic"] == 1


def test_truncated_file_gives_short_reads(disk, arena):
    fill(arena, [0, 1, 2, 3])
    assert all(disk.write(arena, [(i, 8 + i, i) for i in range(4)]))
    os.truncate(os.path.join(disk.directory, DATA_NAME), 9 * disk.slot_bytes + 100)
    assert read_back(disk, arena, [8, 9, 10, 11], [0, 1, 2, 3], [4, 5, 6, 7]) == [
        True, False, False, False]
    assert disk.stats.failed_reads["short_read"] == 3


def test_missing_blocks_and_wrong_keys_are_misses(disk, arena):
    fill(arena, [0])
    assert all(disk.write(arena, [(0, 0, 10)]))
    assert read_back(disk, arena, [1, 0], [10, 11], [2, 3]) == [False, False]
    assert disk.stats.failed_reads["not_indexed"] == 2
    assert disk.stats.read_ios == 0  # misses known from the index cost no I/O


def test_invalidate_is_durable(disk, arena, tmp_path):
    fill(arena, [0, 1])
    assert all(disk.write(arena, [(0, 0, 10), (1, 1, 11)]))
    disk.invalidate([0, 0, 5])  # duplicates and unknown slots are harmless
    assert read_back(disk, arena, [0], [10], [4]) == [False]
    assert disk.recover() == [(1, 11)]
    assert DiskStorage.read_index(disk.directory, FP) == [(1, 11)]
    disk.close()
    again = DiskStorage(disk.directory, NUM_DISK, arena.slot_bytes, FP)
    assert again.recover() == [(1, 11)]
    again.close()


def test_overwrite_replaces_the_old_block(disk, arena):
    fill(arena, [0], seed=1)
    assert all(disk.write(arena, [(0, 2, 100)]))
    data = fill(arena, [1], seed=2)
    assert all(disk.write(arena, [(1, 2, 200)]))
    assert read_back(disk, arena, [2], [100], [3]) == [False]
    assert read_back(disk, arena, [2], [200], [4]) == [True]
    assert np.array_equal(arena.payload(4), data[1])
    assert disk.recover() == [(2, 200)]


def test_reopen_recovers_and_reads_byte_exact(tmp_path, arena):
    directory = str(tmp_path / "g3")
    disk = DiskStorage(directory, NUM_DISK, arena.slot_bytes, FP)
    data = fill(arena, range(5), seed=3)
    assert all(disk.write(arena, [(i, 15 - i, 1000 + i) for i in range(5)]))
    disk.close()
    arena.array[:] = 0
    disk = DiskStorage(directory, NUM_DISK, arena.slot_bytes, FP)
    recovered = disk.recover()
    assert recovered == sorted((15 - i, 1000 + i) for i in range(5))
    ok = disk.read(arena, [(slot, 10 + key - 1000, key) for slot, key in recovered])
    assert all(ok)
    for i in range(5):
        assert np.array_equal(arena.payload(10 + i), data[i])
    disk.close()


def test_other_fingerprint_or_slot_size_starts_empty(tmp_path, arena):
    directory = str(tmp_path / "g3")
    disk = DiskStorage(directory, NUM_DISK, arena.slot_bytes, FP)
    fill(arena, [0])
    assert all(disk.write(arena, [(0, 0, 1)]))
    disk.close()
    other = DiskStorage(directory, NUM_DISK, arena.slot_bytes, FP ^ 0xFF)
    assert other.recover() == []
    assert read_back(other, arena, [0], [1], [1]) == [False]
    other.close()
    bigger = DiskStorage(directory, 4, arena.slot_bytes * 2, FP)
    assert bigger.recover() == []
    bigger.close()


def test_shrinking_drops_blocks_past_the_end(tmp_path, arena):
    directory = str(tmp_path / "g3")
    disk = DiskStorage(directory, NUM_DISK, arena.slot_bytes, FP)
    fill(arena, [0, 1])
    assert all(disk.write(arena, [(0, 1, 1), (1, 12, 2)]))
    disk.close()
    small = DiskStorage(directory, 8, arena.slot_bytes, FP)
    assert small.recover() == [(1, 1)]
    assert os.path.getsize(os.path.join(directory, DATA_NAME)) == 8 * arena.slot_bytes
    small.close()


def test_torn_journal_tail_is_dropped(tmp_path, arena, caplog):
    directory = str(tmp_path / "g3")
    disk = DiskStorage(directory, NUM_DISK, arena.slot_bytes, FP)
    fill(arena, [0, 1])
    assert all(disk.write(arena, [(0, 0, 1), (1, 1, 2)]))
    disk.close()
    journal = os.path.join(directory, JOURNAL_NAME)
    with open(journal, "ab") as f:
        f.write(b"KVTR\x01\x00\x08" + b"\x07" * 30)  # half a record: a crash mid-append
    with caplog.at_level(logging.WARNING):
        disk = DiskStorage(directory, NUM_DISK, arena.slot_bytes, FP)
    assert "torn" in caplog.text
    assert disk.recover() == [(0, 1), (1, 2)]
    assert os.path.getsize(journal) == 64 * 3  # compacted: superblock + 2 records
    disk.close()


def test_journal_is_compacted_while_running(tmp_path, arena):
    directory = str(tmp_path / "g3")
    disk = DiskStorage(directory, 4, arena.slot_bytes, FP)
    disk._compact_after = 6  # the default waits for 2 * num_slots + 4096 records
    data = fill(arena, [0, 1])
    for round_ in range(6):
        assert all(disk.write(arena, [(0, 0, 10 + round_), (1, 1, 20 + round_)]))
    assert disk.stats.journal_compactions >= 1
    assert os.path.getsize(os.path.join(directory, JOURNAL_NAME)) <= 64 * (1 + 2 + 8)
    disk.close()
    disk = DiskStorage(directory, 4, arena.slot_bytes, FP)
    assert disk.recover() == [(0, 15), (1, 25)]
    assert all(disk.read(arena, [(0, 2, 15), (1, 3, 25)]))
    assert np.array_equal(arena.payload(2), data[0]) and np.array_equal(arena.payload(3), data[1])
    disk.close()


def test_files_are_private(tmp_path, disk):
    assert stat.S_IMODE(os.stat(disk.directory).st_mode) == 0o700
    for name in os.listdir(disk.directory):
        assert stat.S_IMODE(os.stat(os.path.join(disk.directory, name)).st_mode) == 0o600, name
    size = os.path.getsize(os.path.join(disk.directory, DATA_NAME))
    assert size == NUM_DISK * disk.slot_bytes
    assert os.stat(os.path.join(disk.directory, DATA_NAME)).st_blocks * 512 >= size  # allocated


def test_unusable_directory_is_a_clear_error(tmp_path, arena):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match=str(blocker)):
        DiskStorage(str(blocker / "g3"), 4, arena.slot_bytes, FP)
    with pytest.raises(StorageError, match="/proc"):
        DiskStorage("/proc/kvtier-g3", 4, arena.slot_bytes, FP)


def test_not_enough_space_is_a_clear_error(tmp_path, arena):
    with pytest.raises(StorageError, match=f"{tmp_path}.*not enough space"):
        DiskStorage(str(tmp_path / "g3"), 1 << 40, arena.slot_bytes, FP)


def test_second_owner_is_refused(disk, arena):
    with pytest.raises(StorageError, match="in use by another process"):
        DiskStorage(disk.directory, NUM_DISK, arena.slot_bytes, FP)


def test_contract_errors(disk, arena):
    with pytest.raises(StorageError, match="out of range"):
        disk.write(arena, [(0, NUM_DISK, 1)])
    with pytest.raises(StorageError, match="twice"):
        disk.write(arena, [(0, 1, 1), (1, 1, 2)])
    other = HostArena(1, KVGeometry(1, 1, 1, 1, 8, "float32", LayoutKind.BLOCK_FIRST), pin=False)
    with pytest.raises(StorageError, match="arena slots"):
        disk.read(other, [(0, 0, 1)])
    other.close()
    with pytest.raises(StorageError, match="multiple of 4096"):
        DiskStorage(disk.directory + "x", 4, 5000, FP)
    disk.close()
    with pytest.raises(StorageError, match="closed"):
        disk.write(arena, [(0, 0, 1)])


# -- file systems that refuse O_DIRECT, or are full -------------------------------------------


def _mount(fstype: str, target, options: str = "") -> bool:
    target.mkdir()
    cmd = ["mount", "-t", fstype] + (["-o", options] if options else []) + [fstype, str(target)]
    try:
        return subprocess.run(cmd, capture_output=True, check=False).returncode == 0
    except FileNotFoundError:
        return False


def _umount(target) -> None:
    subprocess.run(["umount", str(target)], capture_output=True, check=False)


def _refuses_o_direct(directory: str) -> bool:
    probe = os.path.join(directory, ".odirect-probe")
    try:
        os.close(os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600))
        return False
    except OSError:
        return True
    finally:
        if os.path.exists(probe):
            os.unlink(probe)


@pytest.fixture
def no_o_direct_dir(tmp_path):
    """A directory on a file system that refuses O_DIRECT: tmpfs on older kernels, else ramfs."""
    if os.path.isdir("/dev/shm") and _refuses_o_direct("/dev/shm"):
        path = f"/dev/shm/kvtier-test-{os.getpid()}-{tmp_path.name}"
        yield path
        subprocess.run(["rm", "-rf", path], check=False)
        return
    target = tmp_path / "ramfs"
    if not _mount("ramfs", target):
        pytest.skip("no file system refusing O_DIRECT available (needs root to mount ramfs)")
    try:
        assert _refuses_o_direct(str(target))
        yield str(target / "g3")
    finally:
        _umount(target)


def test_buffered_fallback_where_o_direct_is_refused(no_o_direct_dir, arena, caplog):
    with caplog.at_level(logging.WARNING):
        disk = DiskStorage(no_o_direct_dir, 4, arena.slot_bytes, FP)
    try:
        assert not disk.o_direct
        assert sum("O_DIRECT" in r.getMessage() for r in caplog.records) == 1
        data = fill(arena, [0, 1])
        assert all(disk.write(arena, [(0, 0, 1), (1, 1, 2)]))
        assert all(disk.read(arena, [(0, 2, 1), (1, 3, 2)]))
        assert np.array_equal(arena.payload(2), data[0])
        assert np.array_equal(arena.payload(3), data[1])
    finally:
        disk.close()


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def o_direct_dir(tmp_path):
    """A directory on a file system that accepts O_DIRECT: pytest's tmp_path when it does (not
    tmpfs), else one under the repository (``.pytest-odirect/``, git-ignored, removed after)."""
    if not _refuses_o_direct(str(tmp_path)):
        yield str(tmp_path / "g3")
        return
    base = os.path.join(REPO, ".pytest-odirect")
    os.makedirs(base, exist_ok=True)
    path = os.path.join(base, f"{os.getpid()}-{tmp_path.name}")
    os.makedirs(path)
    try:
        if _refuses_o_direct(path):
            need(f"no file system accepting O_DIRECT: neither {tmp_path} nor {base}")
        yield os.path.join(path, "g3")
    finally:
        subprocess.run(["rm", "-rf", path], check=False)
        if not os.listdir(base):
            os.rmdir(base)


def _fd_of(path: str) -> int:
    """This process's open descriptor for ``path``, found through /proc (not DiskStorage)."""
    fds = [int(fd) for fd in os.listdir("/proc/self/fd")
           if os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(path)]
    assert len(fds) == 1, f"expected one open descriptor for {path}, got {fds}"
    return fds[0]


def test_data_file_is_really_opened_with_o_direct(o_direct_dir, arena, caplog):
    """On a normal disk file system the data file's descriptor has O_DIRECT set (the kernel's
    view, twice: F_GETFL and /proc/self/fdinfo), DiskStorage says so, and aligned I/O works."""
    with caplog.at_level(logging.WARNING):
        disk = DiskStorage(o_direct_dir, 4, arena.slot_bytes, FP)
    try:
        assert disk.o_direct is True
        assert not [r for r in caplog.records if "O_DIRECT" in r.getMessage()]
        fd = _fd_of(disk.data_path)
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        with open(f"/proc/self/fdinfo/{fd}") as info:
            flags = next(int(line.split()[1], 8) for line in info if line.startswith("flags:"))
        assert flags & os.O_DIRECT, oct(flags)
        assert "O_DIRECT" in repr(disk)
        data = fill(arena, [0, 1])
        assert all(disk.write(arena, [(0, 0, 1), (1, 3, 2)]))
        assert all(disk.read(arena, [(0, 2, 1), (3, 3, 2)]))
        assert np.array_equal(arena.payload(2), data[0])
        assert np.array_equal(arena.payload(3), data[1])
    finally:
        disk.close()


def test_full_file_system_at_set_up(tmp_path, arena):
    target = tmp_path / "small"
    if not _mount("tmpfs", target, "size=1m"):
        pytest.skip("cannot mount a small tmpfs (needs root)")
    try:
        with pytest.raises(StorageError, match=f"{target}.*not enough space"):
            DiskStorage(str(target / "g3"), 200, arena.slot_bytes, FP)
    finally:
        _umount(target)


def test_write_failures_are_counted_drops_not_exceptions(tmp_path, arena):
    """A file size limit (RLIMIT_FSIZE) makes writes past it fail with EFBIG, the same path as
    ENOSPC/EIO: those blocks are False and counted; the others are durable and readable."""
    directory = str(tmp_path / "g3")
    DiskStorage(directory, 8, arena.slot_bytes, FP).close()  # preallocate as the parent
    child = textwrap.dedent(f"""
        import json, resource, signal
        import numpy as np
        from kvtier.layout import KVGeometry, LayoutKind
        from kvtier.storage.disk import DiskStorage
        from kvtier.storage.host import HostArena
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        geometry = KVGeometry(2, 2, 16, 2, 32, "bfloat16", LayoutKind.VLLM_CPU)
        arena = HostArena(8, geometry, pin=False)
        arena.array[:] = 5
        disk = DiskStorage({directory!r}, 8, arena.slot_bytes, {FP})
        limit = 4 * arena.slot_bytes
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        ok = disk.write(arena, [(i, i, 50 + i) for i in range(8)])
        print(json.dumps({{"ok": ok, "stats": disk.stats.as_dict()}}))
        disk.close()
    """)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ok"] == [True] * 4 + [False] * 4
    assert result["stats"]["dropped_writes"] == 4
    assert sum(result["stats"]["write_errors"].values()) == 4
    disk = DiskStorage(directory, 8, arena.slot_bytes, FP)
    assert disk.recover() == [(i, 50 + i) for i in range(4)]
    assert all(disk.read(arena, [(i, i, 50 + i) for i in range(4)]))
    assert (arena.payload(3) == 5).all()
    disk.close()


# -- journal errors stay per-block failures ----------------------------------------------------


def _stored(disk, arena, pairs, seed):
    """Write ``(arena_slot, disk_slot, key)`` blocks; {key: payload} of what was stored."""
    data = fill(arena, [a for a, _d, _k in pairs], seed=seed)
    assert all(disk.write(arena, pairs))
    return {key: data[a] for a, _d, key in pairs}


def _assert_recovered_blocks_are_intact(disk, arena, payloads):
    """Every block the index names reads back verified, with the bytes stored under its key."""
    recovered = disk.recover()
    into = list(range(8, 8 + len(recovered)))
    assert disk.read(arena, [(slot, a, key) for (slot, key), a in zip(recovered, into)]) == [
        True] * len(recovered)
    for (_slot, key), a in zip(recovered, into):
        assert np.array_equal(arena.payload(a), payloads[key])


def test_invalidate_survives_a_journal_sync_error(tmp_path, arena, caplog):
    """EIO from the journal's fdatasync during invalidate: no exception, the slots leave the
    index at once, the journal is rewritten from the index, and a restart does not bring them
    back (not even once their slots hold other blocks)."""
    directory = str(tmp_path / "g3")
    disk = DiskStorage(directory, NUM_DISK, arena.slot_bytes, FP)
    payloads = _stored(disk, arena, [(0, 0, 10), (1, 1, 11), (2, 2, 12)], seed=1)
    with caplog.at_level(logging.WARNING, logger="kvtier.storage.disk"), \
            faults.armed("disk.sync", "eio", times=1) as rule:
        disk.invalidate([0, 1])  # must not raise
    assert rule.fired == 1
    assert disk.recover() == [(2, 12)]
    assert read_back(disk, arena, [0, 1], [10, 11], [8, 9]) == [False, False]
    assert disk.stats.journal_errors == 1 and disk.stats.invalidated == 2
    assert not disk.degraded
    assert DiskStorage.read_index(directory, FP) == [(2, 12)]  # durable: the rewrite
    assert sum("journal invalidation failed" in r.message for r in caplog.records) == 1
    payloads.update(_stored(disk, arena, [(3, 0, 20)], seed=2))  # slot 0 reused
    disk.close()
    disk = DiskStorage(directory, NUM_DISK, arena.slot_bytes, FP)
    try:
        assert disk.recover() == [(0, 20), (2, 12)]
        _assert_recovered_blocks_are_intact(disk, arena, payloads)
    finally:
        disk.close()


def test_journal_errors_are_logged_once_and_counted(disk, arena, caplog):
    _stored(disk, arena, [(i, i, 10 + i) for i in range(4)], seed=1)
    with caplog.at_level(logging.DEBUG, logger="kvtier.storage.disk"), \
            faults.armed("disk.sync", "eio"):
        for slot in range(4):
            disk.invalidate([slot])
    assert disk.recover() == [] and not disk.degraded
    assert disk.stats.journal_errors == 4
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


def test_unrewritable_journal_degrades_the_tier_and_a_restart_finds_no_wrong_bytes(
        tmp_path, arena, monkeypatch):
    """The journal append and the rewrite both fail: the tier degrades and refuses writes, so
    the invalidated slots keep their blocks' bytes. Even when the DEL records never reached
    the disk (simulated by cutting them off the journal), a restart can only find blocks whose
    bytes are the ones stored under their keys."""
    directory = str(tmp_path / "g3")
    disk = DiskStorage(directory, NUM_DISK, arena.slot_bytes, FP)
    payloads = _stored(disk, arena, [(0, 0, 10), (1, 1, 11), (2, 2, 12)], seed=1)
    journal = os.path.join(directory, JOURNAL_NAME)
    before = os.path.getsize(journal)

    def cannot_rewrite():
        raise OSError(errno.EIO, "injected: journal rewrite fails")

    monkeypatch.setattr(disk, "_rewrite_journal", cannot_rewrite)
    with faults.armed("disk.sync", "eio", times=1):
        disk.invalidate([0, 1])
    assert disk.degraded and disk.stats.degraded
    assert disk.recover() == [(2, 12)]
    assert read_back(disk, arena, [0], [10], [8]) == [False]
    # Degraded: overwriting slot 0 (or writing anywhere) is refused and counted, not raised.
    fill(arena, [3, 4], seed=2)
    assert disk.write(arena, [(3, 0, 20), (4, 5, 21)]) == [False, False]
    assert disk.stats.write_errors[DEGRADED] == 2 and disk.stats.dropped_writes == 2
    disk.invalidate([2])  # no append while degraded, no exception
    assert disk.recover() == []
    disk.close()
    os.truncate(journal, before)  # the DEL records were lost with the page cache
    disk = DiskStorage(directory, NUM_DISK, arena.slot_bytes, FP)
    try:
        assert set(disk.recover()) <= {(0, 10), (1, 11), (2, 12)}
        _assert_recovered_blocks_are_intact(disk, arena, payloads)
        assert read_back(disk, arena, [0, 5], [20, 21], [14, 15]) == [False, False]
    finally:
        disk.close()


def test_degraded_tier_heals_when_the_journal_can_be_rewritten(tmp_path, arena, monkeypatch):
    directory = str(tmp_path / "g3")
    disk = DiskStorage(directory, NUM_DISK, arena.slot_bytes, FP)
    payloads = _stored(disk, arena, [(0, 0, 10), (1, 1, 11), (2, 2, 12)], seed=1)

    def cannot_rewrite():
        raise OSError(errno.EIO, "injected: journal rewrite fails")

    monkeypatch.setattr(disk, "_rewrite_journal", cannot_rewrite)
    with faults.armed("disk.sync", "eio", times=1):
        disk.invalidate([0, 1])
    assert disk.degraded
    fill(arena, [3], seed=2)
    assert disk.write(arena, [(3, 0, 20)]) == [False]  # not yet time to retry
    monkeypatch.undo()
    disk._heal_at = 0.0  # the retry interval has passed
    payloads.update(_stored(disk, arena, [(3, 0, 20)], seed=2))
    assert not disk.degraded
    assert DiskStorage.read_index(directory, FP) == [(0, 20), (2, 12)]
    disk.close()
    disk = DiskStorage(directory, NUM_DISK, arena.slot_bytes, FP)
    try:
        assert disk.recover() == [(0, 20), (2, 12)]
        _assert_recovered_blocks_are_intact(disk, arena, payloads)
    finally:
        disk.close()


def test_write_whose_journal_append_fails_is_dropped_and_not_recovered(tmp_path, arena):
    """The data sync works, the journal's does not: the blocks are False, counted, and the
    rewritten journal does not name them, so a restart does not find them either."""
    directory = str(tmp_path / "g3")
    disk = DiskStorage(directory, NUM_DISK, arena.slot_bytes, FP)
    payloads = _stored(disk, arena, [(0, 0, 10)], seed=1)
    fill(arena, [1, 2], seed=2)
    with faults.armed("disk.sync", "eio", after=1, times=1):  # data sync ok, journal sync not
        assert disk.write(arena, [(1, 1, 11), (2, 2, 12)]) == [False, False]
    assert disk.stats.write_errors["EIO"] == 2 and disk.stats.journal_errors == 1
    assert disk.recover() == [(0, 10)] and not disk.degraded
    disk.close()
    disk = DiskStorage(directory, NUM_DISK, arena.slot_bytes, FP)
    try:
        assert disk.recover() == [(0, 10)]
        _assert_recovered_blocks_are_intact(disk, arena, payloads)
    finally:
        disk.close()


def test_compaction_failing_after_the_rename_degrades_the_tier(disk, arena, monkeypatch):
    """The compacted journal is in place but its directory entry may not be durable: appending
    to it could be lost on a crash, so the tier stops writing instead."""
    fill(arena, [0, 1], seed=1)
    disk._compact_after = 0

    def dir_sync_fails(directory):
        raise OSError(errno.EIO, "injected: directory fsync fails")

    monkeypatch.setattr(disk_module, "_fsync_dir", dir_sync_fails)
    assert disk.write(arena, [(0, 0, 10)]) == [True]  # durable before the compaction
    assert disk.degraded and disk.stats.journal_errors == 1
    assert disk.write(arena, [(1, 1, 11)]) == [False]
    assert disk.recover() == [(0, 10)]


@pytest.mark.parametrize(("offset", "reason"), [
    (0, "magic"), (4, "version"), (8, "geometry"), (16, "key"), (48, "length"),
    (56, "checksum"), (64 + 100, "checksum")])
def test_failed_read_reasons_come_from_the_header_fields(disk, arena, offset, reason,
                                                          monkeypatch):
    """The counter label names the field that failed, whatever the error message says."""
    fill(arena, [0])
    assert all(disk.write(arena, [(0, 3, 77)]))
    with open(os.path.join(disk.directory, DATA_NAME), "r+b") as f:
        f.seek(3 * disk.slot_bytes + offset)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    monkeypatch.setattr(arena, "check", lambda *args: "an unhelpful message")
    assert read_back(disk, arena, [3], [77], [1]) == [False]
    assert dict(disk.stats.failed_reads) == {reason: 1}
