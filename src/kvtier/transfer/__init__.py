"""Moving KV blocks between tiers: batched copies, disk I/O, the submit/poll engine.

- ``copy``: G1 <-> G2 gather/scatter (``BlockCopier``, ``copy_device_to_host``,
  ``copy_host_to_device``), the one G1 <-> G2 path: the worker calls it synchronously, stamping
  headers on offload and verifying slots on onboard.
- ``executors``: the background tier pairs' executors (G2 <-> G3); ``remote`` adds G2 <-> G4.
- ``engine``: ``TransferEngine`` with ``submit``/``poll`` for those background pairs.
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
