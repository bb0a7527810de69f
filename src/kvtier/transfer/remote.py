"""G2 <-> G4: executors that move arena slots to and from a remote store, and existence probes.

The remote tier (``storage.remote.RetryingBackend``) names blocks by key only, so both executors
take G2 slot ids on *both* sides of a ``TransferRequest`` (``src_ids == dst_ids``): the slot a
block is put from or read into. A slot travels as its stored form, header + payload (the
padding up to a page stays home); the backend verifies every block it reads, so a ``False``
from ``RemoteToHost`` is a miss, never data.

``RemoteProber`` runs what the engine's step must not wait for on one daemon thread: existence
probes the leader asked for, and reconnect attempts (``maybe_reconnect``) while the store is
away.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvtier.storage.block_format import HEADER_BYTES
from kvtier.storage.host import HostArena
from kvtier.tiers import BlockKey
from kvtier.transfer.executors import Pending, check_ids, check_unique

logger = logging.getLogger(__name__)

# How often the prober thread checks the store's health while idle.
_RECONNECT_PERIOD_S = 0.2


def _block_views(arena: HostArena, slots: Sequence[int]) -> list[memoryview]:
    """Header + payload of each slot: exactly the bytes of one stored block."""
    size = HEADER_BYTES + arena.payload_bytes
    return [arena.slot_view(slot)[:size] for slot in slots]


class HostToRemote:
    """G2 -> G4: stamp headers, then one batched put per chunk (first write wins)."""

    needs_keys = True

    def __init__(self, arena: HostArena, remote: Any, fingerprint: int):
        self.arena = arena
        self.remote = remote
        self.fingerprint = fingerprint

    def check(self, src_ids: np.ndarray, dst_ids: np.ndarray) -> None:
        check_ids(src_ids, self.arena.num_slots, "arena slot")
        check_ids(dst_ids, self.arena.num_slots, "arena slot")

    def prepare(self) -> Any:
        return None

    def start(self, src_ids, dst_ids, keys: Sequence[BlockKey], token: Any) -> Pending:
        slots = src_ids.tolist()
        self.arena.write_header(slots, keys, self.fingerprint)
        return Pending(ok=self.remote.batch_put(keys, _block_views(self.arena, slots)))


class RemoteToHost:
    """G4 -> G2: one batched, verified read per chunk straight into the staging slots."""

    needs_keys = True

    def __init__(self, arena: HostArena, remote: Any):
        self.arena = arena
        self.remote = remote

    def check(self, src_ids: np.ndarray, dst_ids: np.ndarray) -> None:
        check_ids(dst_ids, self.arena.num_slots, "arena slot")
        check_unique(dst_ids, "arena slot")

    def prepare(self) -> Any:
        return None

    def start(self, src_ids, dst_ids, keys: Sequence[BlockKey], token: Any) -> Pending:
        views = _block_views(self.arena, dst_ids.tolist())
        return Pending(ok=self.remote.batch_get_into(keys, views))


class RemoteProber:
    """Existence probes and reconnects of a remote tier, off the engine's step.

    ``probe(op_id, keys)`` queues a lookup; ``take_answers()`` returns ``(op_id, n)`` pairs, ``n``
    the number of leading keys the store holds (0 when it cannot say). While the store is
    unhealthy the thread calls ``maybe_reconnect()`` every few hundred milliseconds (it backs
    off by itself), so a slow reconnect never stalls a step.
    """

    def __init__(self, remote: Any) -> None:
        self._remote = remote
        self._jobs: queue.SimpleQueue[tuple[int, list[BlockKey]] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._answers: list[tuple[int, int]] = []
        self._num_queued = 0
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="kvtier-remote-probe",
                                        daemon=True)
        self._thread.start()

    @property
    def pending(self) -> bool:
        """Probes whose answers were not taken yet."""
        with self._lock:
            return self._num_queued > 0

    def probe(self, tag: int, keys: list[BlockKey]) -> None:
        with self._lock:
            self._num_queued += 1
        self._jobs.put((tag, keys))

    def take_answers(self) -> list[tuple[int, int]]:
        with self._lock:
            answers, self._answers = self._answers, []
            self._num_queued -= len(answers)
        return answers

    def close(self) -> None:
        self._closed = True
        self._jobs.put(None)

    def _work(self) -> None:
        while not self._closed:
            try:
                job = self._jobs.get(timeout=_RECONNECT_PERIOD_S)
            except queue.Empty:
                job = ()
            if job is None:
                return
            if job:
                tag, keys = job
                num = 0
                try:
                    for present in self._remote.batch_exists(keys):
                        if not present:
                            break
                        num += 1
                except Exception:  # a broken client answers "nothing", never kills the thread
                    logger.exception("kvtier: remote lookup of %d keys failed", len(keys))
                    num = 0
                with self._lock:
                    self._answers.append((tag, num))
            if not self._remote.healthy:
                try:
                    self._remote.maybe_reconnect()
                except Exception:
                    logger.exception("kvtier: reconnecting the remote tier failed")
