"""The transfer engine: submit a batch, get an id, poll for completions.

The engine's step never waits: ``submit`` validates and queues (returns at once), worker threads
move the bytes (disk I/O and remote calls release the GIL), ``poll`` hands back whatever finished.
It serves the background pairs, G2 <-> G3 and G2 <-> G4. G1 <-> G2 never goes through it: the
worker copies between the device and the host synchronously (``copy.copy_device_to_host`` /
``copy.copy_host_to_device``), the one G1 <-> G2 copy path.

- Two queues: onboard (towards G1, a request is waiting) is always served before offload.
- A request larger than ``max_batch_blocks`` is split into chunks that run in parallel; its
  result is reported once, when every chunk has finished.
- At most ``max_concurrent`` chunks run at once (worker threads).
- Tier pairs are executors in a registry (``add_executor``); see ``executors.py``.
"""

from __future__ import annotations

import enum
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kvtier.errors import TransferError
from kvtier.storage.disk import DiskStorage
from kvtier.storage.host import HostArena
from kvtier.tiers import BlockKey, Tier
from kvtier.transfer.executors import DiskToHost, HostToDisk, Pending

if TYPE_CHECKING:
    from typing_extensions import Self

logger = logging.getLogger(__name__)


class TransferKind(enum.Enum):
    OFFLOAD = "offload"  # towards a lower tier (G1 -> G2 -> G3/G4)
    ONBOARD = "onboard"  # towards the device (G3/G4 -> G2 -> G1)


@dataclass
class TransferRequest:
    kind: TransferKind
    src: Tier
    dst: Tier
    src_ids: list[int]
    dst_ids: list[int]
    keys: list[BlockKey] = field(default_factory=list)


@dataclass
class TransferResult:
    id: int
    ok: list[bool]  # per block, in request order
    request: TransferRequest

    @property
    def all_ok(self) -> bool:
        return all(self.ok)

    @property
    def failed_dst_ids(self) -> list[int]:
        return [d for d, good in zip(self.request.dst_ids, self.ok) if not good]


@dataclass(slots=True)
class _RequestState:
    id: int
    request: TransferRequest
    executor: Any
    src: np.ndarray
    dst: np.ndarray
    token: Any
    ok: list[bool]
    chunks_left: int


@dataclass(slots=True)
class _Chunk:
    state: _RequestState
    start: int
    stop: int


@dataclass
class PairStats:
    requests: int = 0
    blocks: int = 0
    failed_blocks: int = 0


class TransferEngine:
    """Moves blocks between tiers asynchronously; see the module doc.

    With ``arena`` and ``disk`` the G2 <-> G3 pair is registered; other pairs are
    ``add_executor`` calls. G1 <-> G2 copies are not transfers of this engine (see the module
    doc)."""

    def __init__(self, *, arena: HostArena | None = None,
                 disk: DiskStorage | None = None, max_batch_blocks: int = 64,
                 max_concurrent: int = 4):
        if max_batch_blocks <= 0 or max_concurrent <= 0:
            raise TransferError("max_batch_blocks and max_concurrent must be positive")
        self.max_batch_blocks = max_batch_blocks
        self.max_concurrent = max_concurrent
        self._executors: dict[tuple[Tier, Tier], Any] = {}
        self.stats: dict[tuple[Tier, Tier], PairStats] = {}
        if arena is not None and disk is not None:
            if arena.slot_bytes != disk.slot_bytes:
                raise TransferError(f"arena slots ({arena.slot_bytes} B) and disk slots "
                                    f"({disk.slot_bytes} B) differ")
            self.add_executor(Tier.G2, Tier.G3, HostToDisk(arena, disk))
            self.add_executor(Tier.G3, Tier.G2, DiskToHost(disk, arena))
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._onboard: deque[_Chunk] = deque()
        self._offload: deque[_Chunk] = deque()
        self._completed: dict[int, TransferResult] = {}
        self._unfinished = 0
        self._closed = False
        self._workers = [threading.Thread(target=self._work, name=f"kvtier-transfer-{i}",
                                          daemon=True) for i in range(max_concurrent)]
        for worker in self._workers:
            worker.start()

    # -- registry ---------------------------------------------------------------------------

    def add_executor(self, src: Tier, dst: Tier, executor: Any) -> None:
        """Serve transfers ``src -> dst`` with ``executor`` (replacing any earlier one)."""
        src, dst = Tier(src), Tier(dst)
        if src == dst:
            raise TransferError(f"a transfer path needs two tiers, got {src.name} twice")
        for attr in ("needs_keys", "check", "prepare", "start"):
            if not hasattr(executor, attr):
                raise TransferError(f"executor for {src.name} -> {dst.name} lacks {attr!r}")
        self._executors[(src, dst)] = executor
        self.stats.setdefault((src, dst), PairStats())

    def paths(self) -> list[tuple[Tier, Tier]]:
        return sorted(self._executors)

    # -- submit / poll ----------------------------------------------------------------------

    def submit(self, req: TransferRequest) -> int:
        """Validate and queue ``req``; returns its id at once.

        Raises ``TransferError`` for an unknown tier pair, a kind that does not match the
        direction, mismatched list lengths, ids out of range or a destination named twice.
        """
        executor = self._executors.get((req.src, req.dst))
        if executor is None:
            known = ", ".join(f"{a.name}->{b.name}" for a, b in self.paths()) or "none"
            raise TransferError(f"no transfer path {Tier(req.src).name} -> "
                                f"{Tier(req.dst).name} (registered: {known})")
        expected = TransferKind.OFFLOAD if req.dst > req.src else TransferKind.ONBOARD
        if req.kind is not expected:
            raise TransferError(f"{req.src.name} -> {req.dst.name} is an {expected.name}, "
                                f"request says {req.kind.name}")
        n = len(req.src_ids)
        if len(req.dst_ids) != n:
            raise TransferError(f"{n} source ids but {len(req.dst_ids)} destination ids")
        if len(req.keys) != n and (executor.needs_keys or req.keys):
            raise TransferError(f"{n} blocks but {len(req.keys)} keys "
                                f"({req.src.name} -> {req.dst.name} needs one key per block)"
                                if executor.needs_keys else
                                f"{n} blocks but {len(req.keys)} keys")
        src = np.asarray(req.src_ids, dtype=np.int64).reshape(-1)
        dst = np.asarray(req.dst_ids, dtype=np.int64).reshape(-1)
        executor.check(src, dst)
        with self._cv:
            if self._closed:
                raise TransferError("the transfer engine is closed")
            req_id = next(self._ids)
            self.stats[(req.src, req.dst)].requests += 1
            if n == 0:
                self._completed[req_id] = TransferResult(req_id, [], req)
                self._cv.notify_all()
                return req_id
            bounds = list(range(0, n, self.max_batch_blocks))
            state = _RequestState(req_id, req, executor, src, dst, executor.prepare(),
                                  [False] * n, len(bounds))
            queue = self._onboard if req.kind is TransferKind.ONBOARD else self._offload
            for start in bounds:
                queue.append(_Chunk(state, start, min(start + self.max_batch_blocks, n)))
            self._unfinished += 1
            self._cv.notify_all()
        return req_id

    def poll(self) -> list[TransferResult]:
        """Every transfer finished since the last poll (never blocks)."""
        with self._cv:
            if not self._completed:
                return []
            results = list(self._completed.values())
            self._completed.clear()
            return results

    def wait(self, ids: Iterable[int], timeout: float | None = None) -> list[TransferResult]:
        """Block until the transfers ``ids`` finish or ``timeout`` passes (tests, shutdown).

        Returns the results of those that finished (they are not returned by ``poll``).
        """
        wanted = set(ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while True:
                if wanted.issubset(self._completed):
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._cv.wait(remaining)
            return [self._completed.pop(i) for i in sorted(wanted) if i in self._completed]

    def pending(self) -> int:
        """Requests submitted and not yet finished."""
        with self._cv:
            return self._unfinished

    # -- workers ----------------------------------------------------------------------------

    def _next_chunk(self) -> _Chunk | None:
        """Take the next chunk, onboard first (caller holds the lock); None means exit."""
        while True:
            if self._onboard:
                return self._onboard.popleft()
            if self._offload:
                return self._offload.popleft()
            if self._closed:
                return None
            self._cv.wait()

    def _work(self) -> None:
        while True:
            with self._cv:
                chunk = self._next_chunk()
            if chunk is None:
                return
            state = chunk.state
            try:
                pending = state.executor.start(state.src[chunk.start:chunk.stop],
                                               state.dst[chunk.start:chunk.stop],
                                               state.request.keys[chunk.start:chunk.stop],
                                               state.token)
            except Exception:  # an executor bug must fail the blocks, not hang the request
                logger.exception("transfer %d (%s -> %s) failed", state.id,
                                 state.request.src.name, state.request.dst.name)
                pending = Pending(ok=[False] * (chunk.stop - chunk.start))
            with self._cv:
                self._finish(chunk, pending)

    def _finish(self, chunk: _Chunk, pending: Pending) -> None:
        state = chunk.state
        count = chunk.stop - chunk.start
        ok = pending.result(count)
        if len(ok) != count:  # a broken executor: treat the chunk as failed
            logger.error("transfer %d: executor returned %d results for %d blocks", state.id,
                         len(ok), count)
            ok = [False] * count
        state.ok[chunk.start:chunk.stop] = ok
        state.chunks_left -= 1
        if state.chunks_left == 0:
            req = state.request
            stats = self.stats[(req.src, req.dst)]
            stats.blocks += len(state.ok)
            stats.failed_blocks += state.ok.count(False)
            self._completed[state.id] = TransferResult(state.id, state.ok, req)
            self._unfinished -= 1
        self._cv.notify_all()

    # -- shutdown ---------------------------------------------------------------------------

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop: queued chunks fail (their results stay pollable), running ones finish."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            for queue in (self._onboard, self._offload):
                while queue:
                    chunk = queue.popleft()
                    self._finish(chunk, Pending(ok=[False] * (chunk.stop - chunk.start)))
            self._cv.notify_all()
        for worker in self._workers:
            worker.join(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
