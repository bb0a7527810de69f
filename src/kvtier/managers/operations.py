"""Operations: one planned transfer or probe, executed by every rank, committed once.

Several ranks (tensor and pipeline parallel) execute every step plan, each on its own shard of
the bytes, and finish each transfer in their own time. Every planned load, store, disk write,
remote put and probe is an :class:`Operation` with an id. Its owner (the tier manager or
pipeline that planned it) commits it only when every rank has reported it, and a failure on any
rank fails it for all: vLLM's own aggregator does the same for the device side (a load is
finished only when every rank reported it in ``get_finished``, and a block with a load error on
any rank is recomputed on all).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

from kvtier.protocol import StepPlan, TierLayout


class Owner(Protocol):
    """What planned an operation: it applies the outcome."""

    def commit(self, op: Operation) -> None:
        """Every rank has reported ``op`` (``op.ok``: none failed it, no deadline passed)."""

    def time_out(self, op: Operation) -> None:
        """A rank lags ``op`` past the deadline: it has failed. Its keys may be planned again
        at once; what it pins stays pinned until the late ranks report (``commit`` follows,
        with ``op.timed_out`` set)."""


@dataclasses.dataclass(slots=True)
class Operation:
    op_id: int
    work: object                  # the owner's record of what was planned
    owner: Owner
    waiting: set[int]             # ranks that have not reported it yet
    ok: bool = True               # no rank reported a failure (and no deadline passed)
    deadline: float = math.inf    # set when the first rank reports
    timed_out: bool = False

    @property
    def kind(self) -> str:
        return type(self.work).__name__.lstrip("_")


class Operations:
    """The operations planned and not yet reported by every rank, and the plan being built.

    ``report()`` counts one rank's result and answers the operation once the last rank has
    reported it; a report of an unknown or retired id, or a second one from the same rank, is
    ignored. ``overdue()`` names operations whose last rank lags past the deadline: they fail
    (nothing is committed from them), but every slot they pin stays pinned until each rank has
    reported, since a late rank may still be reading or writing it (a disk write landing in a
    G3 slot, a remote read landing in a G2 staging slot, a put reading a G2 slot). A rank that
    never reports again keeps those few slots out of use for good (bounded by what was in
    flight on it); it never makes a request wait. Probes pin nothing and retire at once."""

    def __init__(self, world_size: int, layout: TierLayout) -> None:
        self.world_size = world_size
        self._next_id = 1
        self._ops: dict[int, Operation] = {}
        # The first plan carries the layout, so every worker checks its tiers against it.
        self.plan = StepPlan(layout=layout)

    def take_plan(self) -> StepPlan:
        plan, self.plan = self.plan, StepPlan()
        return plan

    def start(self, work: object, owner: Owner) -> int:
        op_id = self._next_id
        self._next_id += 1
        self._ops[op_id] = Operation(op_id, work, owner, set(range(self.world_size)))
        return op_id

    def get(self, op_id: int) -> Operation | None:
        return self._ops.get(op_id)

    def awaits(self, op_id: int, rank: int, kind: type) -> Operation | None:
        """The live operation ``op_id`` of type ``kind`` if ``rank`` has not reported it."""
        op = self._ops.get(op_id)
        if op is None or rank not in op.waiting or not isinstance(op.work, kind):
            return None
        return op

    def report(self, op_id: int, rank: int, ok: bool, now: float,
               lag_s: float) -> Operation | None:
        op = self._ops.get(op_id)
        if op is None or rank not in op.waiting:
            return None
        op.waiting.discard(rank)
        op.ok = op.ok and ok
        if op.deadline == math.inf:
            op.deadline = now + lag_s
        if op.waiting:
            return None
        del self._ops[op_id]
        return op

    def retire(self, op_id: int) -> None:
        self._ops.pop(op_id, None)

    def overdue(self, now: float) -> list[Operation]:
        late = [op for op in self._ops.values() if not op.timed_out and op.deadline < now]
        for op in late:
            op.timed_out, op.ok = True, False
        return late

    def count_kinds(self) -> dict[str, int]:
        """Operations in flight by kind ("Load", "Store", "DiskWrite", "RemotePut", "Probe")."""
        counts: dict[str, int] = {}
        for op in self._ops.values():
            counts[op.kind] = counts.get(op.kind, 0) + 1
        return counts

    def __len__(self) -> int:
        return len(self._ops)
