"""CUDA data path: dedicated streams, pinned arena, event completion, byte-exact round trips.

G1 <-> G2 goes through the worker's calls (``copy_device_to_host`` / ``copy_host_to_device``,
or a ``BlockCopier``); G2 <-> G3 through the transfer engine."""

from __future__ import annotations

import time

import pytest
import torch

from kvtier.layout import DeviceKV
from kvtier.storage.disk import DiskStorage
from kvtier.storage.host import HostArena
from kvtier.tiers import Tier
from kvtier.transfer import (
    BlockCopier,
    TransferEngine,
    TransferKind,
    TransferRequest,
    copy_device_to_host,
    copy_host_to_device,
)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

L, NB, BS, H, D = 4, 32, 16, 8, 64
DTYPES = [torch.bfloat16, torch.float16, torch.float32] + [
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)]


def random_tensor(shape, dtype):
    item = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * item), dtype=torch.uint8,
                        device="cuda")
    return raw.view(dtype)


def names():
    return [f"model.layers.{i}.self_attn.attn" for i in range(L)]


def case(kind, dtype):
    if kind == "kv_first":
        return {n: random_tensor((2, NB, BS, H, D), dtype) for n in names()}, 1
    if kind == "kv_first_hnd":
        return {n: random_tensor((2, NB, H, BS, D), dtype).transpose(2, 3) for n in names()}, 1
    if kind == "block_first":
        return {n: random_tensor((NB, 2, BS, H, D), dtype) for n in names()}, 0
    if kind == "mla":
        return {n: random_tensor((NB, BS, 576), dtype) for n in names()}, 0
    if kind == "cross_layer":
        return {"cross_layers": random_tensor((NB, L, 2, BS, H, D), dtype)}, 0
    if kind == "cross_layer_views":
        big = random_tensor((NB, L, 2, BS, H, D), dtype)
        return {n: big[:, i].transpose(0, 1) for i, n in enumerate(names())}, 1
    if kind == "vllm_cpu_shape":
        return {n: random_tensor((NB, H, BS, 2 * D), dtype) for n in names()}, 0
    raise AssertionError(kind)


KINDS = ["kv_first", "kv_first_hnd", "block_first", "mla", "cross_layer", "cross_layer_views",
         "vllm_cpu_shape"]


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


def poll_until(engine, rid, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for result in engine.poll():
            if result.id == rid:
                return result
        time.sleep(0.0005)
    raise AssertionError(f"transfer {rid} did not complete")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_round_trip_through_disk_is_byte_exact(kind, dtype, tmp_path):
    kv, axis = case(kind, dtype)
    dev = DeviceKV.from_tensors(kv, BS)
    arena = HostArena(24, dev.geometry)  # pin=None: pinned, CUDA is here
    disk = DiskStorage(str(tmp_path / "g3"), 24, arena.slot_bytes, dev.geometry.fingerprint())
    engine = TransferEngine(arena=arena, disk=disk, max_batch_blocks=4)
    try:
        blocks = [31, 0, 7, 8, 9, 10, 2, 30, 15]
        slots = [3, 4, 5, 6, 0, 1, 20, 11, 12]  # runs and gaps
        expected = [block_bytes(kv, axis, b) for b in blocks]
        keys = [100 + i for i in range(len(blocks))]
        fingerprint = dev.geometry.fingerprint()
        copy_device_to_host(dev, blocks, arena, slots, keys=keys, fingerprint=fingerprint)
        rid = engine.submit(TransferRequest(TransferKind.OFFLOAD, Tier.G2, Tier.G3, slots,
                                            list(range(len(blocks))), keys))
        assert poll_until(engine, rid).all_ok
        arena.array[:] = 0
        zero_(kv)
        torch.cuda.synchronize()
        back = [13, 14, 15, 16, 17, 18, 19, 21, 22]
        rid = engine.submit(TransferRequest(TransferKind.ONBOARD, Tier.G3, Tier.G2,
                                            list(range(len(blocks))), back, keys))
        assert poll_until(engine, rid).all_ok
        targets = [1, 3, 4, 5, 6, 11, 12, 13, 29]
        assert copy_host_to_device(arena, back, dev, targets, keys=keys,
                                   fingerprint=fingerprint) == []
        for target, want in zip(targets, expected):
            assert block_bytes(kv, axis, target) == want
        zeros = bytes(len(expected[0]))
        assert all(block_bytes(kv, axis, b) == zeros for b in range(NB) if b not in targets)
    finally:
        engine.close()
        disk.close()
        arena.close()


def test_offload_waits_for_work_queued_on_the_callers_stream():
    kv, _axis = case("kv_first", torch.float32)
    dev = DeviceKV.from_tensors(kv, BS)
    arena = HostArena(4, dev.geometry)
    try:
        a = torch.randn(4096, 4096, device="cuda")
        for _ in range(20):  # keep the current stream busy for a while
            a = a @ a
            a = a / a.norm()
        for t in kv.values():
            t[:, 5].fill_(3.0)  # queued after the matmuls
        copy_device_to_host(dev, [5], arena, [0], keys=[7], fingerprint=0)
        payload = torch.from_numpy(arena.payload(0).copy()).view(torch.float32)
        assert torch.all(payload == 3.0)
        assert arena.verify(0, 7, 0)  # stamped after the bytes landed
    finally:
        arena.close()


def test_arena_is_pinned_when_cuda_is_present():
    geometry = DeviceKV.from_tensors(case("block_first", torch.bfloat16)[0], BS).geometry
    arena = HostArena(4, geometry, pin=True)
    try:
        assert arena.pinned
        assert arena.tensor.is_pinned()
    finally:
        arena.close()


def test_unpinned_arena_still_copies_exactly():
    kv, axis = case("block_first", torch.bfloat16)
    dev = DeviceKV.from_tensors(kv, BS)
    arena = HostArena(8, dev.geometry, pin=False)
    try:
        want = [block_bytes(kv, axis, b) for b in (4, 9)]
        copy_device_to_host(dev, [4, 9], arena, [7, 2])
        assert bytes(arena.payload(7)) == want[0] and bytes(arena.payload(2)) == want[1]
        copy_host_to_device(arena, [7, 2], dev, [0, 1])
        assert block_bytes(kv, axis, 0) == want[0] and block_bytes(kv, axis, 1) == want[1]
    finally:
        arena.close()


def test_large_batches_spill_over_the_staging_buffer():
    kv, axis = case("cross_layer", torch.bfloat16)
    dev = DeviceKV.from_tensors(kv, BS)
    arena = HostArena(NB, dev.geometry)
    try:
        copier = BlockCopier(dev, arena, max_batch_blocks=5)
        blocks = list(range(NB))[::-1]
        want = [block_bytes(kv, axis, b) for b in blocks]
        done = copier.to_host(blocks, list(range(NB)))
        assert done.wait(30)
        assert all(bytes(arena.payload(s)) == want[s] for s in range(NB))
        zero_(kv)
        assert copier.to_device(list(range(NB)), blocks).wait(30)
        assert all(block_bytes(kv, axis, b) == want[i] for i, b in enumerate(blocks))
    finally:
        arena.close()
