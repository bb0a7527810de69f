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

from kvtier.storage import faults  # noqa: E402


@pytest.fixture(autouse=True)
def _no_fault_left_armed():
    faults.disarm()
    yield
    faults.disarm()
