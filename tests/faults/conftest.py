"""Fixtures for the fault-injection suite: the integration harness on the path, and no fault
left armed after a test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent / "integration"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from kvtier.storage import faults


@pytest.fixture(autouse=True)
def _no_fault_left_armed():
    faults.disarm()
    yield
    faults.disarm()


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The harness runs many tiny tensor ops; on a small shared machine torch's thread pool
    makes them ~5x slower, so these tests use one thread (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
