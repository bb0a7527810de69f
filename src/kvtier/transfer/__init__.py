"""Moving KV blocks between tiers: batched copies, disk I/O, the submit/poll engine.

- ``copy``: G1 <-> G2 gather/scatter (``BlockCopier``, ``copy_device_to_host``,
  ``copy_host_to_device``).
- ``executors``: one executor per tier pair (G1<->G2, G2<->G3); others register theirs.
- ``engine``: ``TransferEngine`` with ``submit``/``poll``.
"""

from kvtier.transfer.copy import BlockCopier, copy_device_to_host, copy_host_to_device
from kvtier.transfer.engine import (
    TransferEngine,
    TransferKind,
    TransferRequest,
    TransferResult,
)
from kvtier.transfer.executors import Pending

__all__ = [
    "BlockCopier",
    "Pending",
    "TransferEngine",
    "TransferKind",
    "TransferRequest",
    "TransferResult",
    "copy_device_to_host",
    "copy_host_to_device",
]
