"""Helpers shared by the G4 backend tests: stored blocks with real headers, polling."""

from __future__ import annotations

import time

import numpy as np

from kvtier.storage import block_format

FINGERPRINT = 0x5EED_F00D_0000_0001
OTHER_FINGERPRINT = 0x5EED_F00D_0000_0002


def make_blocks(num: int, block_bytes: int, *, fingerprint: int = FINGERPRINT, seed: int = 0,
                bytes_keys: bool = False) -> tuple[list, np.ndarray]:
    """``num`` random blocks (header + payload) in one array, one row per block, and keys."""
    rng = np.random.default_rng(seed)
    if bytes_keys:
        keys = [rng.bytes(32) for _ in range(num)]
    else:
        keys = [int(k) for k in rng.integers(1, 2**63, size=num)]
    rows = np.empty((num, block_bytes), dtype=np.uint8)
    for idx, key in enumerate(keys):
        payload = rows[idx, block_format.HEADER_BYTES:]
        payload[:] = rng.integers(0, 256, size=payload.size, dtype=np.uint8)
        header = block_format.pack_header(key, fingerprint, payload)
        rows[idx, :block_format.HEADER_BYTES] = np.frombuffer(header, dtype=np.uint8)
    return keys, rows


def views(rows: np.ndarray) -> list[memoryview]:
    return [memoryview(row) for row in rows]


def empty_like(rows: np.ndarray) -> np.ndarray:
    return np.zeros_like(rows)


def wait_for(predicate, timeout_s: float = 20.0, step_s: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true; False after ``timeout_s`` (never a test timing)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return predicate()


def check_round_trip(backend, block_bytes: int) -> None:
    """16 blocks put, read back byte-exact, present, and counted as hits."""
    keys, rows = make_blocks(16, block_bytes)
    assert backend.batch_put(keys, views(rows)) == [True] * 16
    out = empty_like(rows)
    assert backend.batch_get_into(keys, views(out)) == [True] * 16
    assert np.array_equal(out, rows)
    assert backend.batch_exists(keys) == [True] * 16
    assert backend.stats["hits"] == 16 and backend.stats["bytes_got"] == rows.nbytes
