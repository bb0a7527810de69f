"""Storage tiers: one backend per tier, each owning bytes (no policy).

- ``host.HostArena``: G2, page-aligned host RAM slots (pinned when CUDA is present).
- ``disk.DiskStorage``: G3, preallocated O_DIRECT file with a durable index (warm restart).
- ``block_format``: the 64-byte header every stored block carries.

Names are loaded lazily so that importing one backend does not pull in the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvtier.storage.disk import DiskStats, DiskStorage
    from kvtier.storage.host import HostArena, slot_bytes_for

_EXPORTS = {
    "HostArena": "kvtier.storage.host",
    "slot_bytes_for": "kvtier.storage.host",
    "DiskStorage": "kvtier.storage.disk",
    "DiskStats": "kvtier.storage.disk",
}

__all__ = ["DiskStats", "DiskStorage", "HostArena", "slot_bytes_for"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvtier.storage' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
