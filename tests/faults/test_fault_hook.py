"""The fault-injection hook itself: off unless armed, rules fire as specified, and each fault
looks to the storage code exactly as the kernel or a store client would make it look."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from kvtier.errors import ConfigError
from kvtier.layout import KVGeometry, LayoutKind
from kvtier.storage import faults
from kvtier.storage.disk import DiskStorage
from kvtier.storage.host import HostArena
from kvtier.storage.remote.base import FAILED

FP = 0xFA17_0000_0000_0001


@pytest.fixture
def arena():
    geometry = KVGeometry(2, 2, 16, 2, 32, "bfloat16", LayoutKind.VLLM_CPU)
    a = HostArena(16, geometry, pin=False)
    yield a
    a.close()


def fill(arena, slots, seed=0):
    rng = np.random.default_rng(seed)
    for s in slots:
        arena.payload(s)[:] = rng.integers(0, 256, arena.payload_bytes, dtype=np.uint8)


def test_off_by_default_and_after_disarm():
    assert not faults.active
    rule = faults.arm("disk.read", "eio")
    assert faults.active
    faults.disarm(rule)
    assert not faults.active
    with faults.armed("disk.write", "enospc"):
        assert faults.active
    assert not faults.active


def test_after_times_and_probability_select_calls(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(bytes(8192))
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = [memoryview(bytearray(4096))]
        rule = faults.arm("disk.read", "eio", after=2, times=3)
        outcomes = []
        for _ in range(8):
            try:
                faults.vector_io(False, fd, buf, 0)
                outcomes.append(True)
            except OSError as exc:
                assert exc.errno == errno.EIO
                outcomes.append(False)
        assert outcomes == [True, True, False, False, False, True, True, True]
        assert rule.seen == 8 and rule.fired == 3 == faults.fired("disk.read", "eio")
        faults.disarm()
        half = faults.arm("disk.read", "eio", probability=0.5, seed=3)
        for _ in range(200):
            try:
                faults.vector_io(False, fd, buf, 0)
            except OSError:
                pass
        assert 60 < half.fired < 140
    finally:
        os.close(fd)


def test_specs_parse_and_bad_ones_name_the_problem():
    rules = faults.arm_spec("disk.read:flip:p=0.25:times=2, remote.get:timeout:delay_s=0.1")
    assert [(r.point, r.kind, r.probability, r.times) for r in rules] == [
        ("disk.read", "flip", 0.25, 2), ("remote.get", "timeout", 1.0, None)]
    for bad, word in [("disk.nope:eio", "point"), ("disk.read:enospc", "kind"),
                      ("disk.read:eio:p=2", "probability"), ("disk.read:eio:p", "option"),
                      ("disk.read:eio:colour=red", "option")]:
        with pytest.raises(ConfigError, match=word):
            faults.arm_spec(bad)


def test_disk_faults_look_like_the_kernel_made_them(tmp_path, arena):
    disk = DiskStorage(str(tmp_path / "g3"), 16, arena.slot_bytes, FP)
    try:
        fill(arena, range(8))
        with faults.armed("disk.write", "enospc", times=1):
            assert disk.write(arena, [(0, 0, 100)]) == [False]
        with faults.armed("disk.write", "short", times=1):
            assert disk.write(arena, [(1, 1, 101)]) == [False]
        with faults.armed("disk.sync", "eio", times=1):
            assert disk.write(arena, [(2, 2, 102)]) == [False]
        assert disk.stats.write_errors == {"ENOSPC": 1, "short_write": 1, "EIO": 1}
        assert disk.recover() == []  # no failed write is in the index
        assert disk.write(arena, [(3, 3, 103), (4, 4, 104), (5, 5, 105)]) == [True] * 3
        expected = arena.payload(3).copy()
        with faults.armed("disk.read", "eio", times=1):
            assert disk.read(arena, [(3, 8, 103)]) == [False]
        with faults.armed("disk.read", "short", times=1):
            assert disk.read(arena, [(3, 9, 103)]) == [False]
        with faults.armed("disk.read", "flip", times=1):
            assert disk.read(arena, [(3, 10, 103)]) == [False]
        assert disk.stats.failed_reads == {"EIO": 1, "short_read": 1, "checksum": 1}
        # Once disarmed the same block reads back intact: the faults touched no stored byte.
        assert disk.read(arena, [(3, 11, 103)]) == [True]
        assert np.array_equal(arena.payload(11), expected)
    finally:
        disk.close()


def test_remote_faults_shape_the_store_call():
    def fetch(names, views):
        return [bytes(range(100)) for _ in names]

    names, views = ["a", "b", "c", "d"], [None] * 4
    with faults.armed("remote.get", "error"), pytest.raises(ConnectionError):
        faults.remote_call("remote.get", fetch, 0.01)(names, views)
    with faults.armed("remote.get", "partial", seed=1):
        out = faults.remote_call("remote.get", fetch, 0.01)(names, views)
    assert 0 < out.count(FAILED) < 4
    with faults.armed("remote.get", "corrupt", seed=1):
        out = faults.remote_call("remote.get", fetch, 0.01)(names, views)
    changed = [i for i, v in enumerate(out) if v != bytes(range(100))]
    assert len(changed) == 1 and out[changed[0]][64] == 64 ^ 0xFF
    # A fault armed at another point leaves this call alone.
    with faults.armed("remote.put", "error"):
        assert faults.remote_call("remote.get", fetch, 0.01)(names, views)[0] == bytes(range(100))
