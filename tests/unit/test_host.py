"""G2 host arena: slot format, alignment, headers and verification."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtier.errors import StorageError
from kvtier.layout import KVGeometry, LayoutKind
from kvtier.storage.block_format import HEADER_BYTES, unpack_key
from kvtier.storage.host import HostArena, slot_bytes_for

GEOMETRY = KVGeometry(num_layers=2, kv_factor=2, block_size=16, num_kv_heads=2, head_size=32,
                      dtype="bfloat16", layout=LayoutKind.VLLM_CPU)  # 8 KiB payload
FP = GEOMETRY.fingerprint("test")


@pytest.fixture
def arena():
    a = HostArena(6, GEOMETRY, pin=False)
    yield a
    a.close()


def test_slot_is_header_plus_payload_rounded_to_pages():
    assert GEOMETRY.block_bytes == 8192
    assert slot_bytes_for(GEOMETRY) == 12288  # 64 + 8192 -> 3 pages
    odd = KVGeometry(1, 1, 3, 1, 5, "float32", LayoutKind.BLOCK_FIRST)
    assert slot_bytes_for(odd) == 4096


def test_arena_is_page_aligned_and_prefaulted(arena):
    assert arena.base_addr % 4096 == 0
    assert arena.slot_bytes % 4096 == 0
    assert arena.nbytes == 6 * arena.slot_bytes
    assert arena.prefault_seconds > 0
    assert not arena.pinned  # no CUDA here, pin=False
    for slot in range(arena.num_slots):
        view = arena.slot_view(slot)
        assert len(view) == arena.slot_bytes
        assert arena.payload(slot).ctypes.data == arena.base_addr + slot * arena.slot_bytes + 64


def test_views_share_memory(arena):
    arena.payload(2)[:] = 7
    assert arena.tensor[2, HEADER_BYTES:HEADER_BYTES + 8192].eq(7).all()
    assert bytes(arena.slot_view(2)[HEADER_BYTES:HEADER_BYTES + 4]) == b"\x07" * 4
    assert arena.array[2 * arena.slot_bytes + HEADER_BYTES] == 7
    arena.tensor[3, HEADER_BYTES] = 9
    assert arena.payload(3)[0] == 9


def fill(arena, slot, seed):
    arena.payload(slot)[:] = np.random.default_rng(seed).integers(0, 256, arena.payload_bytes,
                                                                  dtype=np.uint8)


def test_write_header_then_verify(arena):
    fill(arena, 0, 1)
    fill(arena, 1, 2)
    arena.write_header([0, 1], [0xDEADBEEF, b"sha256-prefix"], FP)
    assert arena.verify(0, 0xDEADBEEF, FP)
    assert arena.verify(1, b"sha256-prefix", FP)
    key, fp, length = unpack_key(bytes(arena.header(1)))
    assert key.rstrip(b"\0") == b"sha256-prefix" and fp == FP and length == 8192


def test_verify_catches_every_kind_of_mismatch(arena):
    fill(arena, 4, 3)
    arena.write_header([4], [42], FP)
    assert not arena.verify(4, 43, FP)  # another key
    assert not arena.verify(4, 42, FP ^ 1)  # another geometry/model
    assert "key" in arena.check(4, 43, FP)
    assert "geometry" in arena.check(4, 42, FP ^ 1)
    arena.payload(4)[100] ^= 0x01  # one flipped bit
    assert not arena.verify(4, 42, FP)
    assert "checksum" in arena.check(4, 42, FP)
    assert not arena.verify(5, 42, FP)  # never written: zero header
    assert "magic" in arena.check(5, 42, FP)


def test_slot_range_checked(arena):
    with pytest.raises(StorageError, match="out of range"):
        arena.payload(6)
    with pytest.raises(StorageError, match="out of range"):
        arena.write_header([-1], [1], FP)
    with pytest.raises(StorageError, match="2 slots but 1 keys"):
        arena.write_header([0, 1], [1], FP)


def test_bad_sizes_and_pinning_without_cuda():
    with pytest.raises(StorageError, match="positive slot count"):
        HostArena(0, GEOMETRY)
    if not torch.cuda.is_available():
        with pytest.raises(StorageError, match="CUDA"):
            HostArena(1, GEOMETRY, pin=True)
        default = HostArena(1, GEOMETRY)  # pin=None: pinned iff CUDA
        assert not default.pinned
        default.close()


def test_mlock_as_root_or_clear_error():
    try:
        locked = HostArena(2, GEOMETRY, pin=False, mlock=True)
    except StorageError as exc:
        assert "mlock" in str(exc)
        return
    assert locked.locked
    locked.close()


def test_close_is_idempotent():
    a = HostArena(1, GEOMETRY, pin=False)
    a.close()
    a.close()
