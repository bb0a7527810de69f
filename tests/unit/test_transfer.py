"""G1 <-> G2 copies (the worker's synchronous path) and the transfer engine (G2 <-> G3 and other
background pairs): byte-exact round trips for every layout and dtype, validation, ordering and
failure handling."""

from __future__ import annotations

import threading
import time
import zlib

import numpy as np
import pytest
import torch

from kvtier.errors import LayoutError, TransferError
from kvtier.layout import DeviceKV
from kvtier.storage.disk import DiskStorage
from kvtier.storage.host import HostArena
from kvtier.tiers import Tier
from kvtier.transfer import (
    BlockCopier,
    Pending,
    TransferEngine,
    TransferKind,
    TransferRequest,
    copy_device_to_host,
    copy_host_to_device,
)

L, NB, BS, H, D = 3, 8, 16, 2, 8
DTYPES = [torch.bfloat16, torch.float16, torch.float32] + [
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)]


def random_tensor(shape, dtype, gen):
    """Random bytes viewed as ``dtype`` (every bit pattern, NaNs included, must survive)."""
    item = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * item), dtype=torch.uint8,
                        generator=gen)
    return raw.view(dtype)


def names(n=L):
    return [f"model.layers.{i}.self_attn.attn" for i in range(n)]


# Each case: (tensors, block axis of each tensor). The block axis is stated independently of
# kvtier's detection, so the checks below do not trust the code under test.
def case(kind: str, dtype, gen):
    if kind == "vllm_cpu":
        return {n: random_tensor((NB, H, BS, 2 * D), dtype, gen) for n in names()}, 0
    if kind == "kv_first":
        return {n: random_tensor((2, NB, BS, H, D), dtype, gen) for n in names()}, 1
    if kind == "kv_first_hnd":
        return {n: random_tensor((2, NB, H, BS, D), dtype, gen).transpose(2, 3)
                for n in names()}, 1
    if kind == "block_first":
        return {n: random_tensor((NB, 2, BS, H, D), dtype, gen) for n in names()}, 0
    if kind == "mla":
        return {n: random_tensor((NB, BS, 4 * D), dtype, gen) for n in names()}, 0
    if kind == "cross_layer":
        return {"cross_layers": random_tensor((NB, L, 2, BS, H, D), dtype, gen)}, 0
    if kind == "cross_layer_views":
        big = random_tensor((NB, L, 2, BS, H, D), dtype, gen)
        return {n: big[:, i].transpose(0, 1) for i, n in enumerate(names())}, 1
    if kind == "fully_contiguous":
        return {"kv": random_tensor((NB, L, 2, BS, H * D), dtype, gen)}, 0
    raise AssertionError(kind)


KINDS = ["vllm_cpu", "kv_first", "kv_first_hnd", "block_first", "mla", "cross_layer",
         "cross_layer_views", "fully_contiguous"]


def block_bytes(kv: dict, axis: int, block: int) -> bytes:
    """One block's bytes in memory order (its stored payload), layer after layer."""
    parts = []
    for t in kv.values():
        one = t.select(axis, block)
        order = sorted(range(one.dim()), key=lambda i: -one.stride(i))
        parts.append(one.permute(order).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return b"".join(parts)


def zero_(kv: dict) -> None:
    """Zero every byte (through an integer view: fill_ is not defined for every float8)."""
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    for t in kv.values():
        t.view(as_int[t.element_size()]).zero_()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_g1_g2_g3_g2_g1_is_byte_exact(kind, dtype, tmp_path):
    # Fixed per case (hash() of a str varies per process with PYTHONHASHSEED).
    gen = torch.Generator().manual_seed(zlib.crc32(f"{kind}/{dtype}".encode()) & 0xFFFF)
    kv, axis = case(kind, dtype, gen)
    dev = DeviceKV.from_tensors(kv, BS, num_kv_heads=H if kind == "fully_contiguous" else None)
    fp = dev.geometry.fingerprint("model")
    arena = HostArena(8, dev.geometry, pin=False)
    disk = DiskStorage(str(tmp_path / "g3"), 12, arena.slot_bytes, fp)
    engine = TransferEngine(arena=arena, disk=disk, max_batch_blocks=2, max_concurrent=2)
    try:
        src_blocks, keys = [5, 1, 3, 6], [11, b"twelve", 13, 14]
        expected = [block_bytes(kv, axis, b) for b in src_blocks]

        def run(kind_, src, dst, src_ids, dst_ids):
            rid = engine.submit(TransferRequest(kind_, src, dst, src_ids, dst_ids, keys))
            (result,) = engine.wait([rid], timeout=30)
            assert result.ok == [True] * len(src_ids), (src, dst)

        # G1 <-> G2 as the worker does it: stamped offload, verified onboard.
        copy_device_to_host(dev, src_blocks, arena, [2, 0, 7, 4], keys=keys, fingerprint=fp)
        run(TransferKind.OFFLOAD, Tier.G2, Tier.G3, [2, 0, 7, 4], [4, 5, 9, 10])
        arena.array[:] = 0
        zero_(kv)
        run(TransferKind.ONBOARD, Tier.G3, Tier.G2, [4, 5, 9, 10], [6, 1, 3, 5])
        assert copy_host_to_device(arena, [6, 1, 3, 5], dev, [0, 2, 4, 7], keys=keys,
                                   fingerprint=fp) == []
        for dst, want in zip([0, 2, 4, 7], expected):
            assert block_bytes(kv, axis, dst) == want
        untouched = bytes(len(expected[0]))
        for other in (1, 3, 5, 6):
            assert block_bytes(kv, axis, other) == untouched  # no stray writes
    finally:
        engine.close()
        disk.close()
        arena.close()


def cpu_setup(num_slots=16):
    gen = torch.Generator().manual_seed(7)
    kv, axis = case("vllm_cpu", torch.bfloat16, gen)
    dev = DeviceKV.from_tensors(kv, BS)
    return kv, axis, dev, HostArena(num_slots, dev.geometry, pin=False)


def test_direct_copies_and_their_validation():
    kv, axis, dev, arena = cpu_setup()
    want = [block_bytes(kv, axis, b) for b in (0, 7)]
    copy_device_to_host(dev, [0, 7], arena, [15, 3])
    assert bytes(arena.payload(15)) == want[0] and bytes(arena.payload(3)) == want[1]
    copy_host_to_device(arena, [3, 15], dev, [1, 2])
    assert block_bytes(kv, axis, 1) == want[1] and block_bytes(kv, axis, 2) == want[0]
    with pytest.raises(TransferError, match="out of range"):
        copy_device_to_host(dev, [NB], arena, [0])
    with pytest.raises(TransferError, match="out of range"):
        copy_host_to_device(arena, [16], dev, [0])
    with pytest.raises(TransferError, match="twice"):
        copy_device_to_host(dev, [0, 1], arena, [2, 2])
    with pytest.raises(TransferError, match="twice"):
        copy_host_to_device(arena, [0, 1], dev, [4, 4])
    with pytest.raises(TransferError, match="2 device blocks but 1"):
        copy_device_to_host(dev, [0, 1], arena, [2])
    copy_device_to_host(dev, [], arena, [])  # an empty batch is fine


def test_copier_refuses_an_arena_of_another_geometry():
    kv, _axis, dev, _arena = cpu_setup()
    other = DeviceKV.from_tensors({n: t.clone().view(torch.float16) for n, t in kv.items()}, BS)
    other_arena = HostArena(2, other.geometry, pin=False)
    with pytest.raises(LayoutError, match="does not match"):
        BlockCopier(dev, other_arena)


def filled_arena_and_disk(tmp_path, num_slots=16, disk_slots=16):
    """A CPU arena whose payloads are random bytes, and an empty disk tier of its geometry."""
    _kv, _axis, dev, arena = cpu_setup(num_slots)
    rng = np.random.default_rng(5)
    for slot in range(num_slots):
        arena.payload(slot)[:] = rng.integers(0, 256, arena.payload_bytes, dtype=np.uint8)
    disk = DiskStorage(str(tmp_path / "g3"), disk_slots, arena.slot_bytes,
                       dev.geometry.fingerprint())
    return arena, disk


def test_large_requests_are_chunked_and_reassembled(tmp_path):
    arena, disk = filled_arena_and_disk(tmp_path)
    engine = TransferEngine(arena=arena, disk=disk, max_batch_blocks=3, max_concurrent=3)
    try:
        slots, keys = [7, 6, 5, 4, 3, 2, 1], [100 + i for i in range(7)]
        want = [bytes(arena.payload(s)) for s in slots]
        rid = engine.submit(TransferRequest(TransferKind.OFFLOAD, Tier.G2, Tier.G3, slots,
                                            list(range(7)), keys))
        (result,) = engine.wait([rid], timeout=10)
        assert result.ok == [True] * 7 and result.all_ok and result.failed_dst_ids == []
        assert engine.stats[(Tier.G2, Tier.G3)].blocks == 7
        back = [8, 9, 10, 11, 12, 13, 14]
        rid = engine.submit(TransferRequest(TransferKind.ONBOARD, Tier.G3, Tier.G2,
                                            list(range(7)), back, keys))
        (result,) = engine.wait([rid], timeout=10)
        assert result.all_ok
        assert [bytes(arena.payload(s)) for s in back] == want
    finally:
        engine.close()
        disk.close()


class GatedExecutor:
    """A test tier pair whose blocks finish when the test opens the gate."""

    needs_keys = False

    def __init__(self, gate: threading.Event, log: list, fail_ids=()):
        self.gate, self.log, self.fail_ids = gate, log, set(fail_ids)

    def check(self, src_ids, dst_ids):
        if (src_ids < 0).any():
            raise TransferError("negative id")

    def prepare(self):
        return None

    def start(self, src_ids, dst_ids, keys, token):
        self.log.append(int(src_ids[0]))
        self.gate.wait(10)
        return Pending(ok=[int(s) not in self.fail_ids for s in src_ids])


def gated_engine(fail_ids=(), max_concurrent=1):
    gate, log = threading.Event(), []
    engine = TransferEngine(max_concurrent=max_concurrent)
    executor = GatedExecutor(gate, log, fail_ids)
    engine.add_executor(Tier.G2, Tier.G4, executor)
    engine.add_executor(Tier.G4, Tier.G2, executor)
    return engine, gate, log


def req(kind, first, n=1):
    src, dst = (Tier.G2, Tier.G4) if kind is TransferKind.OFFLOAD else (Tier.G4, Tier.G2)
    return TransferRequest(kind, src, dst, list(range(first, first + n)),
                           list(range(first, first + n)))


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_onboard_is_served_before_queued_offload():
    engine, gate, log = gated_engine()
    try:
        blocker = engine.submit(req(TransferKind.OFFLOAD, 100))
        wait_for(lambda: log == [100])  # the only worker is busy
        offload = engine.submit(req(TransferKind.OFFLOAD, 200))
        onboard = engine.submit(req(TransferKind.ONBOARD, 300))
        assert engine.poll() == []  # poll never waits
        assert engine.pending() == 3
        gate.set()
        results = engine.wait([blocker, offload, onboard], timeout=10)
        assert [r.id for r in results] == [blocker, offload, onboard]
        assert log == [100, 300, 200]
        assert engine.pending() == 0
    finally:
        gate.set()
        engine.close()


def test_per_block_failures_and_executor_crashes_are_reported():
    engine, gate, _log = gated_engine(fail_ids={2})
    gate.set()

    class Crashing(GatedExecutor):
        def start(self, *args):
            raise RuntimeError("boom")

    engine.add_executor(Tier.G3, Tier.G4, Crashing(gate, []))
    try:
        partial = engine.submit(req(TransferKind.OFFLOAD, 1, n=3))
        crash = engine.submit(TransferRequest(TransferKind.OFFLOAD, Tier.G3, Tier.G4, [0, 1],
                                              [0, 1]))
        results = {r.id: r for r in engine.wait([partial, crash], timeout=10)}
        assert results[partial].ok == [True, False, True]
        assert results[partial].failed_dst_ids == [2]
        assert results[crash].ok == [False, False]
    finally:
        engine.close()


def test_submit_validation(tmp_path):
    arena, disk = filled_arena_and_disk(tmp_path)
    engine = TransferEngine(arena=arena, disk=disk)
    try:
        with pytest.raises(TransferError, match="no transfer path G1 -> G2"):
            engine.submit(TransferRequest(TransferKind.OFFLOAD, Tier.G1, Tier.G2, [0], [0]))
        with pytest.raises(TransferError, match="is an OFFLOAD"):
            engine.submit(TransferRequest(TransferKind.ONBOARD, Tier.G2, Tier.G3, [0], [0], [1]))
        with pytest.raises(TransferError, match="2 source ids but 1"):
            engine.submit(TransferRequest(TransferKind.OFFLOAD, Tier.G2, Tier.G3, [0, 1], [0],
                                          [1, 2]))
        with pytest.raises(TransferError, match="disk slot 99 out of range"):
            engine.submit(TransferRequest(TransferKind.OFFLOAD, Tier.G2, Tier.G3, [0], [99], [1]))
        with pytest.raises(TransferError, match="arena slot 16 out of range"):
            engine.submit(TransferRequest(TransferKind.ONBOARD, Tier.G3, Tier.G2, [0], [16], [1]))
        with pytest.raises(TransferError, match="same disk slot twice"):
            engine.submit(TransferRequest(TransferKind.OFFLOAD, Tier.G2, Tier.G3, [0, 1],
                                          [3, 3], [1, 2]))
        with pytest.raises(TransferError, match="1 blocks but 2 keys"):
            engine.submit(TransferRequest(TransferKind.OFFLOAD, Tier.G2, Tier.G3, [0], [0],
                                          [1, 2]))
        empty = engine.submit(TransferRequest(TransferKind.OFFLOAD, Tier.G2, Tier.G3, [], []))
        assert [(r.id, r.ok) for r in engine.poll()] == [(empty, [])]
    finally:
        engine.close()
        disk.close()


def test_the_engine_has_no_device_paths():
    """G1 <-> G2 is the worker's synchronous copy (copy.py), never an engine transfer."""
    _kv, _axis, _dev, arena = cpu_setup()
    engine = TransferEngine(arena=arena)
    try:
        assert engine.paths() == []
    finally:
        engine.close()


def test_disk_pairs_need_keys(tmp_path):
    _kv, _axis, dev, arena = cpu_setup()
    disk = DiskStorage(str(tmp_path / "g3"), 4, arena.slot_bytes, dev.geometry.fingerprint())
    engine = TransferEngine(arena=arena, disk=disk)
    try:
        assert engine.paths() == [(Tier.G2, Tier.G3), (Tier.G3, Tier.G2)]
        with pytest.raises(TransferError, match="needs one key per block"):
            engine.submit(TransferRequest(TransferKind.OFFLOAD, Tier.G2, Tier.G3, [0], [0]))
        # A read of a block the disk never stored is a failed block, not an exception.
        rid = engine.submit(TransferRequest(TransferKind.ONBOARD, Tier.G3, Tier.G2, [1], [0],
                                            [42]))
        (result,) = engine.wait([rid], timeout=10)
        assert result.ok == [False]
    finally:
        engine.close()
        disk.close()


def test_close_fails_queued_work_and_refuses_new():
    engine, gate, log = gated_engine()
    running = engine.submit(req(TransferKind.OFFLOAD, 1))
    wait_for(lambda: log == [1])
    queued = engine.submit(req(TransferKind.OFFLOAD, 2, n=2))
    assert engine.wait([queued], timeout=0.05) == []  # not finished: nothing returned
    threading.Timer(0.1, gate.set).start()
    engine.close()
    results = {r.id: r.ok for r in engine.poll()}
    assert results == {running: [True], queued: [False, False]}
    with pytest.raises(TransferError, match="closed"):
        engine.submit(req(TransferKind.OFFLOAD, 5))


def test_executors_are_pluggable_and_checked():
    engine = TransferEngine()
    try:
        with pytest.raises(TransferError, match="lacks 'needs_keys'"):
            engine.add_executor(Tier.G2, Tier.G4, object())
        with pytest.raises(TransferError, match="two tiers"):
            engine.add_executor(Tier.G2, Tier.G2, GatedExecutor(threading.Event(), []))
    finally:
        engine.close()


def test_concurrent_submitters_get_every_result(tmp_path):
    arena, disk = filled_arena_and_disk(tmp_path, num_slots=64, disk_slots=32)
    engine = TransferEngine(arena=arena, disk=disk, max_batch_blocks=2, max_concurrent=2)
    ids, lock = [], threading.Lock()

    def submit(base):
        for i in range(8):
            slot = base * 8 + i
            rid = engine.submit(TransferRequest(TransferKind.OFFLOAD, Tier.G2, Tier.G3,
                                                [slot], [slot], [slot]))
            with lock:
                ids.append(rid)

    threads = [threading.Thread(target=submit, args=(b,)) for b in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        results = engine.wait(ids, timeout=10)
        assert sorted(r.id for r in results) == sorted(ids) and len(set(ids)) == 32
        assert all(r.all_ok for r in results)
        rid = engine.submit(TransferRequest(TransferKind.ONBOARD, Tier.G3, Tier.G2,
                                            list(range(32)), list(range(32, 64)),
                                            list(range(32))))
        (result,) = engine.wait([rid], timeout=10)
        assert result.all_ok
        for slot in range(32):
            assert bytes(arena.payload(32 + slot)) == bytes(arena.payload(slot))
    finally:
        engine.close()
        disk.close()


def test_numpy_ids_are_accepted():
    kv, axis, dev, arena = cpu_setup()
    copy_device_to_host(dev, np.array([2, 3]), arena, np.array([0, 1], dtype=np.int32))
    assert bytes(arena.payload(1)) == block_bytes(kv, axis, 3)


def test_parallel_cpu_copy_is_byte_exact(monkeypatch):
    from kvtier.transfer import copy as copy_module

    monkeypatch.setattr(copy_module, "_PARALLEL_MIN_BYTES", 0)  # split even tiny batches
    kv, axis, dev, arena = cpu_setup()
    copier = BlockCopier(dev, arena, copy_threads=3)
    blocks, slots = [7, 0, 3, 5, 1], [9, 2, 4, 11, 0]
    want = [block_bytes(kv, axis, b) for b in blocks]
    copier.to_host(blocks, slots).wait()
    assert [bytes(arena.payload(s)) for s in slots] == want
    zero_(kv)
    copier.to_device(slots, [0, 1, 2, 3, 4]).wait()
    assert [block_bytes(kv, axis, b) for b in range(5)] == want
    assert all(block_bytes(kv, axis, b) == bytes(len(want[0])) for b in (5, 6, 7))


def test_the_streaming_copy_is_built_and_exact_at_every_alignment():
    """The block copy's C helper (``make setup`` builds it; the copier falls back to memmove
    only in a source tree that was never built): byte-exact for sizes around its streaming
    threshold and its 64-byte loop, at every destination alignment, writing nothing outside."""
    from kvtier.transfer import _stream
    from kvtier.transfer import copy as copy_module

    assert copy_module._copy_bytes is _stream.copy
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, 80_000, dtype=np.uint8)
    for size in (0, 1, 15, 63, 4095, 4096, 4097, 4096 + 63, 65536 + 13):
        for align in range(17):
            dst = np.full(size + 128, 0xEE, dtype=np.uint8)
            lo = 32 - dst.ctypes.data % 16 + align  # the destination starts `align` past 16
            _stream.copy(dst.ctypes.data + lo, src.ctypes.data + align, size)
            assert bytes(dst[lo:lo + size]) == bytes(src[align:align + size]), (size, align)
            assert not np.any(dst[:lo] != 0xEE) and not np.any(dst[lo + size:] != 0xEE)
    with pytest.raises(TypeError, match="3 arguments"):
        _stream.copy(1, 2)
    with pytest.raises(ValueError, match="null address"):
        _stream.copy(0, src.ctypes.data, 8)


@pytest.mark.parametrize("threads", [1, 2])
def test_checked_copies_of_blocks_longer_than_one_checksum_run(monkeypatch, threads):
    """Blocks spanning several checksum runs (each run hashed while it is in cache): a stamped
    offload writes the checksum of the whole payload; a verified onboard copies good blocks
    exactly, zeroes a block whose payload fails in its first or last run (its bytes were copied
    before the checksum was complete), and never touches a block whose header is wrong."""
    from kvtier.storage.block_format import checksum
    from kvtier.transfer import copy as copy_module

    # 3 segments of 1 KiB a block, runs of 768 B: 4 runs, segments split across runs.
    monkeypatch.setattr(copy_module, "_STAMP_RUN_BYTES", 768)
    monkeypatch.setattr(copy_module, "_PARALLEL_MIN_BYTES", 0)
    kv, axis, dev, arena = cpu_setup()
    copier = BlockCopier(dev, arena, copy_threads=threads)
    assert dev.geometry.block_bytes == 4 * 768
    fp, keys = dev.geometry.fingerprint("m"), [21, 22, 23, 24]
    blocks, slots = [1, 2, 3, 4], [5, 6, 7, 8]
    want = [block_bytes(kv, axis, b) for b in blocks]
    copier.to_host(blocks, slots, keys=keys, fingerprint=fp).wait()
    for slot, data in zip(slots, want):
        assert bytes(arena.payload(slot)) == data
        assert int.from_bytes(bytes(arena.header(slot))[-8:], "little") == checksum(data)

    arena.payload(6)[3] ^= 0x10                      # first run of slot 6
    arena.payload(7)[len(want[0]) - 2] ^= 0x01       # last run of slot 7
    arena.header(8)[8] ^= 0x01                       # slot 8's header: geometry field
    for t in kv.values():
        t.view(torch.int16).fill_(0x5A5A)            # targets hold recognisable old bytes
    old = block_bytes(kv, axis, 0)
    done, bad = copier.to_device_verified(slots, [0, 5, 6, 7], keys, fp)
    done.wait()
    assert bad == [1, 2, 3]
    assert block_bytes(kv, axis, 0) == want[0]
    assert block_bytes(kv, axis, 5) == block_bytes(kv, axis, 6) == bytes(len(want[0]))
    assert block_bytes(kv, axis, 7) == old             # header refused: nothing copied


class _FakeStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_event(self, event):
        pass


class _FakeEvent:
    def record(self, stream=None):
        pass

    def query(self):
        return True

    def synchronize(self):
        pass


@pytest.mark.parametrize("kind", KINDS)
def test_cuda_copy_logic_on_cpu_tensors(kind, monkeypatch):
    """The CUDA copier's staging, slot runs, wide-dtype views and chunking, run on CPU tensors
    with stand-in streams and events (CI has no GPU; tests/gpu checks the real thing)."""
    import contextlib

    from kvtier.transfer import copy as copy_module

    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    gen = torch.Generator().manual_seed(3)
    kv, axis = case(kind, torch.bfloat16, gen)
    dev = DeviceKV.from_tensors(kv, BS, num_kv_heads=H if kind == "fully_contiguous" else None)
    arena = HostArena(12, dev.geometry, pin=False)
    copier = copy_module._CudaCopier(dev, arena, max_batch_blocks=3)  # 7 blocks: 3 chunks
    blocks = np.array([5, 1, 3, 6, 0, 2, 7])
    slots = np.array([2, 3, 4, 9, 0, 1, 11])  # runs and gaps
    want = [block_bytes(kv, axis, int(b)) for b in blocks]
    assert copier.to_host(blocks, slots, None).done()
    assert [bytes(arena.payload(int(s))) for s in slots] == want
    zero_(kv)
    targets = np.array([7, 6, 5, 4, 3, 2, 1])
    copier.to_device(slots, targets, None).wait()
    assert [block_bytes(kv, axis, int(b)) for b in targets] == want
    assert block_bytes(kv, axis, 0) == bytes(len(want[0]))
