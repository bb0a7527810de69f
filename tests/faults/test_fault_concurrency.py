"""Several threads writing, reading and evicting on the storage layer at once, with faults.

A block's payload is a function of its key, so any read reported good can be checked exactly.
Threads race on purpose: readers ask for blocks that writers are overwriting and evictors are
dropping; a read must then fail, never return other bytes. Every thread is joined with a
timeout, so a deadlock fails the test instead of hanging it.
"""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest

from kvtier.layout import KVGeometry, LayoutKind
from kvtier.storage import faults
from kvtier.storage.disk import DiskStorage
from kvtier.storage.host import HostArena
from kvtier.tiers import Tier
from kvtier.transfer import TransferEngine, TransferKind, TransferRequest

FP = 0xC0C0_0000_0000_0007
NUM_THREADS = 4
SLOTS_PER_THREAD = 8
ARENA_PER_THREAD = 6
JOIN_TIMEOUT_S = 120.0


def payload_for(key: int, n: int) -> np.ndarray:
    return np.random.default_rng(key).integers(0, 256, n, dtype=np.uint8)


@pytest.fixture
def arena():
    geometry = KVGeometry(2, 2, 16, 2, 32, "bfloat16", LayoutKind.VLLM_CPU)
    a = HostArena(NUM_THREADS * ARENA_PER_THREAD + 8, geometry, pin=False)
    yield a
    a.close()


def run_threads(targets) -> list[BaseException]:
    errors: list[BaseException] = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)
        return run

    threads = [threading.Thread(target=wrap(fn), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "a storage thread deadlocked"
    return errors


def check_index_reads_back(disk: DiskStorage, arena: HostArena, scratch: int) -> int:
    entries = disk.recover()
    for slot, key in entries:
        assert disk.read(arena, [(slot, scratch, key)]) == [True], (slot, key)
        assert np.array_equal(arena.payload(scratch), payload_for(key, arena.payload_bytes))
    return len(entries)


def test_disk_writes_reads_and_evictions_race_without_wrong_bytes(tmp_path, arena):
    disk = DiskStorage(str(tmp_path / "g3"), NUM_THREADS * SLOTS_PER_THREAD, arena.slot_bytes,
                       FP, io_threads=3)
    n = arena.payload_bytes
    good_reads = [0] * NUM_THREADS
    refused_reads = [0] * NUM_THREADS
    stop = threading.Event()

    def worker(tid: int):
        rng = random.Random(tid)
        mine = list(range(tid * SLOTS_PER_THREAD, (tid + 1) * SLOTS_PER_THREAD))
        scratch = list(range(tid * ARENA_PER_THREAD, (tid + 1) * ARENA_PER_THREAD))
        for step in range(150):
            action = rng.random()
            if action < 0.45:  # write a run of my slots, one batch
                count = rng.randint(1, 3)
                dslots = rng.sample(mine, count)
                keys = [(tid << 40) | (step << 8) | i for i in range(count)]
                for a, key in zip(scratch, keys):
                    arena.payload(a)[:] = payload_for(key, n)
                disk.write(arena, list(zip(scratch, dslots, keys)))
            else:  # read anything the index names now (others may overwrite it meanwhile)
                entries = disk.recover()
                if not entries:
                    continue
                picks = rng.sample(entries, min(3, len(entries)))
                if rng.random() < 0.2:  # ask for a wrong key: never served
                    slot, key = picks[0]
                    picks[0] = (slot, key ^ 0x5A5A)
                ok = disk.read(arena, [(s, a, k) for (s, k), a in zip(picks, scratch)])
                for (_slot, key), a, good in zip(picks, scratch, ok):
                    if good:
                        assert np.array_equal(arena.payload(a), payload_for(key, n)), key
                        good_reads[tid] += 1
                    else:
                        refused_reads[tid] += 1

    def evictor():
        rng = random.Random(99)
        while not stop.is_set():
            disk.invalidate(rng.sample(range(disk.num_slots), 3))

    with faults.armed("disk.read", "flip", probability=0.05, seed=5), \
            faults.armed("disk.write", "eio", probability=0.05, seed=6):
        evict = threading.Thread(target=evictor, daemon=True)
        evict.start()
        errors = run_threads([lambda t=t: worker(t) for t in range(NUM_THREADS)])
        stop.set()
        evict.join(JOIN_TIMEOUT_S)
        assert not evict.is_alive()
    assert not errors, errors
    assert sum(good_reads) > 50 and sum(refused_reads) > 0
    assert disk.stats.failed_reads.get("checksum", 0) > 0
    # The index is consistent with the bytes, now and after a reopen from the journal.
    scratch = NUM_THREADS * ARENA_PER_THREAD
    before = sorted(disk.recover())
    check_index_reads_back(disk, arena, scratch)
    disk.close()
    reopened = DiskStorage(str(tmp_path / "g3"), disk.num_slots, arena.slot_bytes, FP)
    try:
        assert sorted(reopened.recover()) == before
        check_index_reads_back(reopened, arena, scratch)
    finally:
        reopened.close()


def test_transfer_engine_serves_many_submitters_and_closes(tmp_path, arena):
    disk = DiskStorage(str(tmp_path / "g3"), NUM_THREADS * SLOTS_PER_THREAD, arena.slot_bytes,
                       FP)
    engine = TransferEngine(arena=arena, disk=disk, max_batch_blocks=2, max_concurrent=3)
    n = arena.payload_bytes
    stats = {"ok": 0, "failed": 0}
    lock = threading.Lock()

    def submitter(tid: int):
        rng = random.Random(tid)
        mine = list(range(tid * SLOTS_PER_THREAD, (tid + 1) * SLOTS_PER_THREAD))
        src = list(range(tid * ARENA_PER_THREAD, tid * ARENA_PER_THREAD + 3))
        dst = list(range(tid * ARENA_PER_THREAD + 3, (tid + 1) * ARENA_PER_THREAD))
        for step in range(40):
            dslots = rng.sample(mine, 3)
            keys = [(tid << 40) | (step << 8) | i for i in range(3)]
            for a, key in zip(src, keys):
                arena.payload(a)[:] = payload_for(key, n)
            wid = engine.submit(TransferRequest(TransferKind.OFFLOAD, Tier.G2, Tier.G3, src,
                                                dslots, keys))
            [written] = engine.wait([wid], timeout=JOIN_TIMEOUT_S)
            rid = engine.submit(TransferRequest(TransferKind.ONBOARD, Tier.G3, Tier.G2, dslots,
                                                dst, keys))
            [read] = engine.wait([rid], timeout=JOIN_TIMEOUT_S)
            for a, key, w, r in zip(dst, keys, written.ok, read.ok):
                assert not (r and not w), "a block whose write failed was read back"
                if r:
                    assert np.array_equal(arena.payload(a), payload_for(key, n))
            with lock:
                stats["ok"] += sum(read.ok)
                stats["failed"] += read.ok.count(False)

    with faults.armed("disk.read", "eio", probability=0.1, seed=7), \
            faults.armed("disk.write", "delay", probability=0.2, delay_s=0.002, seed=8):
        errors = run_threads([lambda t=t: submitter(t) for t in range(NUM_THREADS)])
    assert not errors, errors
    assert stats["ok"] > 100 and stats["failed"] > 0
    assert engine.pending() == 0
    closer = threading.Thread(target=engine.close, daemon=True)
    closer.start()
    closer.join(JOIN_TIMEOUT_S)
    assert not closer.is_alive(), "the transfer engine did not close"
    disk.close()
