"""G4, the remote store many engines share: what this leader knows of it.

The store is not the leader's to see: this manager keeps a bounded set of keys it knows the
store holds (its own confirmed puts, answers to probes). When a request's prefix runs out of
local blocks it asks the workers to probe the rest (``StepPlan.remote_probes``), and the
request waits ("ask again") until the answer arrives or a short deadline passes. G4 blocks
onboard through G2 staging slots; blocks admitted to G4 are put from G2 after their store is
confirmed. While any rank finds the store down, nothing is put or probed and what the store
held before is forgotten (it may be gone after the outage).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from kvtier.config import KvtierConfig
from kvtier.managers.operations import Operation, Operations
from kvtier.metrics import KvtierMetrics
from kvtier.offload.admission import make_admission_policy
from kvtier.tiers import BlockKey

logger = logging.getLogger(__name__)

# Keys the leader remembers as held by G4 (a hint: the store may evict them any time).
MAX_REMOTE_KEYS = 1 << 18
# A probe answer is awaited this many remote timeouts (plus a margin) before matching without
# G4: the workers' own calls give up after one timeout, so an answer is overdue by then.
_PROBE_WAIT_TIMEOUTS = 2.0
_PROBE_WAIT_MARGIN_S = 0.5


@dataclasses.dataclass(slots=True)
class _Probe:
    """A request's G4 lookup: blocks [start, start + present) are in the store."""

    req_id: str
    start: int
    keys: list[BlockKey]
    sent: float
    op_id: int = 0
    answered: bool = False
    present: int = 0
    least_answer: int = 1 << 62   # the least any rank answered so far


class RemoteManager:
    def __init__(self, config: KvtierConfig, ops: Operations, metrics: KvtierMetrics,
                 clock: Callable[[], float] | None = None) -> None:
        self.admission = make_admission_policy(config.remote_admission, clock=clock)
        self.ops = ops
        self.metrics = metrics
        self._known: OrderedDict[BlockKey, None] = OrderedDict()   # oldest first
        self._putting: set[BlockKey] = set()
        self.healthy = True
        self._rank_healthy: dict[int, bool] = {}
        self._probes: dict[str, _Probe] = {}
        self.probe_wait_s = (_PROBE_WAIT_TIMEOUTS * config.remote_timeout_ms / 1000
                             + _PROBE_WAIT_MARGIN_S)
        self._probe_timeout_logged = False
        metrics.remote_healthy.set(1)

    # -- lookup ---------------------------------------------------------------------------
    def holds(self, key: BlockKey) -> bool:
        return key in self._known

    def found(self, req_id: str, block: int, key: BlockKey) -> bool:
        """Whether G4 is believed to hold block ``block`` (``key``) of the request."""
        if key in self._known:
            return True
        probe = self._probes.get(req_id)
        return probe is not None and 0 <= block - probe.start < probe.present

    def awaits_probe(self, req_id: str, first: int, keys: Sequence[BlockKey]) -> bool:
        """True while the request should wait for a probe of its blocks from ``first`` on
        (``keys``); the first call plans the probe. Answered or overdue: False."""
        probe = self._probes.get(req_id)
        now = time.perf_counter()
        if probe is None:
            probe = self._probes[req_id] = _Probe(req_id, first, list(keys), now)
            probe.op_id = self.ops.start(probe, self)
            self.ops.plan.remote_probes[probe.op_id] = probe.keys
            return True
        if probe.answered:
            return False
        if now - probe.sent < self.probe_wait_s:
            return True
        # Never hang a request on the store: match without what the probe would have found.
        log = logger.debug if self._probe_timeout_logged else logger.warning
        self._probe_timeout_logged = True
        log("kvtier: no answer from the remote tier's lookup for request %s after %.1f s; "
            "matching without it (further cases are logged at debug level)", req_id,
            now - probe.sent)
        self.metrics.remote_events.labels("probe_timeouts").inc()
        self.ops.retire(probe.op_id)   # a late answer is ignored
        probe.answered, probe.present = True, 0
        return False

    def answer(self, rank: int, op_id: int, num_present: int) -> Operation | None:
        """``rank``'s answer to a probe; the operation once every rank answered."""
        op = self.ops.awaits(op_id, rank, _Probe)
        if op is None:
            return None   # retired (answered, or past its deadline), or a repeat
        op.work.least_answer = min(op.work.least_answer, num_present)
        return op

    def forget_request(self, req_id: str) -> None:
        self._probes.pop(req_id, None)

    # -- loads ----------------------------------------------------------------------------
    def load_failed(self, req_id: str, block: int, key: BlockKey) -> None:
        """Missing, corrupt or late: the store is not to be trusted with ``key`` for now, nor
        is the request's probe answer from this block on (else the retried request would be
        promised the same bad block again, forever)."""
        self._known.pop(key, None)
        probe = self._probes.get(req_id)
        if probe is not None:
            probe.present = min(probe.present, max(block - probe.start, 0))

    # -- stores ---------------------------------------------------------------------------
    def wants(self, key: BlockKey) -> bool:
        """Whether a G2 copy of ``key`` should be put to the store (counts as an offer)."""
        if key in self._known or key in self._putting:
            return False
        if not self.admission.admit(key):
            return False
        if not self.healthy:
            self.metrics.dropped_offloads.labels("G4").inc()
            return False
        return True

    def prepare_store(self, key: BlockKey) -> None:
        """A put of ``key`` is planned."""
        self._putting.add(key)

    def complete_store(self, key: BlockKey, ok: bool, timed_out: bool) -> None:
        if not timed_out:
            self._putting.discard(key)
        if ok:
            self._remember(key)
        else:
            self.metrics.dropped_offloads.labels("G4").inc()

    def abandon(self, key: BlockKey) -> None:
        self._putting.discard(key)

    # -- health ---------------------------------------------------------------------------
    def rank_health(self, rank: int, healthy: bool) -> None:
        self._rank_healthy[rank] = healthy
        healthy = all(self._rank_healthy.values())
        if healthy == self.healthy:
            return
        self.healthy = healthy
        self.metrics.remote_healthy.set(1 if healthy else 0)
        if not healthy:
            # Requests waiting for a probe match without G4 now; what the store held before
            # the outage may be gone after it.
            for probe in self._probes.values():
                if not probe.answered:
                    probe.answered, probe.present = True, 0
            self._known.clear()

    def clear(self) -> None:
        """Forget what the store holds (the store itself is not cleared)."""
        self._known.clear()

    # -- operations (probes) --------------------------------------------------------------
    def commit(self, op: Operation) -> None:
        probe = op.work
        if self._probes.get(probe.req_id) is not probe or probe.answered:
            return
        probe.answered = True
        probe.present = max(probe.least_answer, 0) if op.ok and not op.timed_out else 0
        for key in probe.keys[:probe.present]:
            self._remember(key)

    def time_out(self, op: Operation) -> None:
        self.ops.retire(op.op_id)
        probe = op.work
        if self._probes.get(probe.req_id) is probe and not probe.answered:
            probe.answered, probe.present = True, 0

    def _remember(self, key: BlockKey) -> None:
        keys = self._known
        if key in keys:
            keys.move_to_end(key)
            return
        keys[key] = None
        if len(keys) > MAX_REMOTE_KEYS:
            keys.popitem(last=False)
