"""The leader: scheduler-side bookkeeping of which KV blocks live in which tier.

Engine-neutral and free of torch and I/O. An engine adapter calls, per request and per step:

  match()         how many tokens beyond the device prefix kvtier can load (no side effects)
  begin_onboard() the engine reserved device blocks for them: plan the load, pin the sources
  progress()      the step computes tokens: plan offloads of blocks that become full
  take_plan()     this step's StepPlan, for the workers
  on_reports()    the ranks' WorkerReports came back: once every rank has reported an
                  operation, register stored blocks, release pins, learn rates
  finish()        the request is done; True while a load still writes its device blocks

Slots of the G2/G3 pools are the slots of the workers' host arena and disk file. A block is
matchable only once a worker has reported its bytes in place; a block a transfer reads or
writes holds a pool reference until the transfer's result arrives, so it is never evicted
or reused under the transfer.

G4, the remote store shared by many engines, is not the leader's to see: it keeps a bounded set
of keys it knows the store holds (its own confirmed puts, answers to probes), and when a
request's prefix runs out of local blocks it asks the workers to probe the rest
(``StepPlan.remote_probes``), answering "ask again" to the engine until the answer arrives or a
short deadline passes. G4 blocks onboard through G2 staging slots; blocks admitted to G4 are put
from G2 after their store is confirmed.

Several ranks (tensor and pipeline parallel) execute every plan, each on its own shard of the
bytes, and finish each transfer in their own time. Every planned transfer and probe is an
``_Operation`` with an id; the leader commits it (registers blocks, releases pins, promotes,
learns rates) only when every rank has reported it, and a failure on any rank fails it for
all (vLLM's own aggregator does the same for the device side: a load is finished only when
every rank reported it in ``get_finished``, and a block id with a load error on any rank is
recomputed on all). A rank lagging its peers by more than ``op_deadline_s`` fails the
operation; see ``_Operations`` for what a late report may still do.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Sequence

from kvtier.config import KvtierConfig
from kvtier.events.types import EventBuffer
from kvtier.hashing import BlockHasher, RequestKeys
from kvtier.metrics import KvtierMetrics
from kvtier.offload.admission import make_admission_policy
from kvtier.offload.onboard import OnboardPolicy
from kvtier.pools.block_pool import BlockPool
from kvtier.protocol import NO_SLOT, LoadOp, StepPlan, TierLayout, WorkerReport
from kvtier.storage.block_format import BlockKey
from kvtier.tiers import Tier

logger = logging.getLogger(__name__)

_STAGING_BYTES = 2 * 10**9
_MIN_STAGING_BLOCKS = 64
# Engine steps a request may wait for the workers' disk index before matching without it.
_MAX_RECOVERY_WAITS = 50
_DIRECTION_TIER = {"g2_to_g1": Tier.G2, "g3_to_g2": Tier.G3, "g4_to_g2": Tier.G4}
# Keys the leader remembers as held by G4 (a hint: the store may evict them any time).
_MAX_REMOTE_KEYS = 1 << 18
# A probe answer is awaited this many remote timeouts (plus a margin) before matching without
# G4: the workers' own calls give up after one timeout, so an answer is overdue by then.
_PROBE_WAIT_TIMEOUTS = 2.0
_PROBE_WAIT_MARGIN_S = 0.5
# Probe states of a request.
_NOT_PROBED, _PROBING, _PROBED = 0, 1, 2
# How long an operation waits for its last rank once another rank has reported it. Measured
# in wall time, not engine steps: steps stop while the engine idles, and a step's length varies
# a hundredfold. Ranks run the same transfers of equal size, so a rank this late is stalled
# (or its report was lost); the remote tier bounds its own calls by remote_timeout_ms, so the
# deadline is at least two of those.
_RANK_LAG_S = 5.0
_RANK_LAG_TIMEOUTS = 2.0


@dataclasses.dataclass(slots=True)
class _Request:
    req_id: str
    keys: RequestKeys   # what its KV depends on besides its tokens
    salt: int
    hashes: list[BlockKey] = dataclasses.field(default_factory=list)
    # Leading blocks already considered for offload (stored, deduplicated or dropped).
    num_offered: int = 0
    # The last match() answer: first block index and the tier of each block to load.
    match_start: int = 0
    match_tiers: list[Tier] = dataclasses.field(default_factory=list)
    counted: bool = False   # its lookup is in the hit-rate metrics
    match_sync: bool = False  # the last match is small enough to load inside the step
    # Why its blocks cannot be keyed safely; such a request is neither matched nor offloaded.
    unkeyable: str | None = None
    # G4 probe: blocks [probe_start, probe_start + probe_present) are in the store.
    probe_state: int = _NOT_PROBED
    probe_start: int = 0
    probe_present: int = 0
    probe_sent: float = 0.0
    probe_op: int = 0


@dataclasses.dataclass(slots=True)
class _Load:
    op: LoadOp
    source_tiers: list[Tier | None]   # None: nothing to load (the block failed to pin)
    g3_refs: list[int]                # G3 blocks pinned while they are read
    # Reported by any rank so far (a block is good only if it is good on every rank).
    failed: set[int] = dataclasses.field(default_factory=set)
    corrupt: set[int] = dataclasses.field(default_factory=set)


@dataclasses.dataclass(slots=True)
class _Store:          # G1 -> G2 (write-through)
    g2_slot: int
    key: BlockKey
    to_disk: bool      # targets decided when planned (where G2 only stages)
    to_remote: bool


@dataclasses.dataclass(slots=True)
class _DiskWrite:      # G2 -> G3
    g2_slot: int
    g3_slot: int
    key: BlockKey


@dataclasses.dataclass(slots=True)
class _RemotePut:      # G2 -> G4
    g2_slot: int
    key: BlockKey


@dataclasses.dataclass(slots=True)
class _Probe:          # G4 lookup of a request's blocks
    req_id: str
    num_present: int = 1 << 62   # the least any rank answered


@dataclasses.dataclass(slots=True)
class _Operation:
    op_id: int
    work: _Load | _Store | _DiskWrite | _RemotePut | _Probe
    waiting: set[int]             # ranks that have not reported it yet
    ok: bool = True               # no rank reported a failure (and no deadline passed)
    deadline: float = math.inf    # set when the first rank reports
    timed_out: bool = False


class _Operations:
    """The operations planned and not yet reported by every rank: the leader's one registry.

    ``report()`` counts one rank's result and answers the operation once the last rank has
    reported it; a report of an unknown or retired id, or a second one from the same rank, is
    ignored. ``overdue()`` names operations whose last rank lags past the deadline: they fail
    (nothing is committed from them), but every slot they pin stays pinned until each rank has
    reported, since a late rank may still be reading or writing it (a disk write landing in a
    G3 slot, a remote read landing in a G2 staging slot, a put reading a G2 slot). A rank that
    never reports again keeps those few slots out of use for good (bounded by what was in
    flight on it); it never makes a request wait. Probes pin nothing and retire at once."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._next_id = 1
        self._ops: dict[int, _Operation] = {}

    def start(self, work) -> int:
        op_id = self._next_id
        self._next_id += 1
        self._ops[op_id] = _Operation(op_id, work, set(range(self.world_size)))
        return op_id

    def get(self, op_id: int) -> _Operation | None:
        return self._ops.get(op_id)

    def report(self, op_id: int, rank: int, ok: bool, now: float,
               lag_s: float) -> _Operation | None:
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

    def overdue(self, now: float) -> list[_Operation]:
        late = [op for op in self._ops.values() if not op.timed_out and op.deadline < now]
        for op in late:
            op.timed_out, op.ok = True, False
        return late

    def count(self, kind: type) -> int:
        return sum(1 for op in self._ops.values() if type(op.work) is kind)

    def __len__(self) -> int:
        return len(self._ops)


def plan_tier_layout(config: KvtierConfig, block_bytes: int,
                     max_blocks_per_request: int, world_size: int = 1) -> TierLayout:
    """Tier sizes in blocks; leader and workers both derive them from the same inputs.

    ``block_bytes`` is one rank's shard of a block; ``world_size`` the ranks that each hold
    one (vLLM: the parallel config's world size). ``host_cache_gb`` and ``disk_cache_gb`` are
    the whole engine's, as vLLM's ``--kv-offloading-size`` is: every rank gets ``1 /
    world_size`` of them for its shards, so a tier holds ``GB // (block_bytes x world_size)``
    blocks, the same slot count on every rank. ``*_cache_blocks`` are slot counts as given."""
    engine_block_bytes = block_bytes * max(world_size, 1)
    num_g2 = config.num_blocks(config.host_cache_gb, config.host_cache_blocks,
                               engine_block_bytes)
    num_g3 = config.num_blocks(config.disk_cache_gb, config.disk_cache_blocks,
                               engine_block_bytes)
    if (num_g3 or config.has_remote) and num_g2 == 0:
        # G2 stages every disk and remote transfer, so a set-up without a host cache keeps a
        # bounded staging window (one long request, at most _STAGING_BYTES); it caches
        # nothing. A longer disk/remote hit loads its first blocks and recomputes the rest.
        num_g2 = min(max_blocks_per_request + 64,
                     max(_MIN_STAGING_BLOCKS, _STAGING_BYTES // max(block_bytes, 1)))
    return TierLayout(num_g2, num_g3, block_bytes)


class Leader:
    def __init__(self, config: KvtierConfig, *, block_tokens: int, block_bytes: int,
                 max_blocks_per_request: int, metrics: KvtierMetrics | None = None,
                 events: bool = False, world_size: int = 1) -> None:
        """``world_size``: the ranks that execute each plan and report it (vLLM: the
        parallel config's world size, the count its own KV output aggregator waits for)."""
        self.config = config
        self.block_tokens = block_tokens
        self.block_bytes = block_bytes
        self.hasher = BlockHasher(block_tokens, config.hash_mode)
        self.metrics = metrics or KvtierMetrics()
        self.events = EventBuffer() if events else None

        self.layout = plan_tier_layout(config, block_bytes, max_blocks_per_request, world_size)
        num_g2, num_g3 = self.layout.num_g2_slots, self.layout.num_g3_slots
        self.host_caches = config.has_host
        self.g2 = BlockPool(Tier.G2, num_g2, eviction=config.host_eviction_policy,
                            events=self.events if self.host_caches else None,
                            block_size=block_tokens) if num_g2 else None
        self.g3 = BlockPool(Tier.G3, num_g3, eviction=config.disk_eviction_policy,
                            events=self.events, block_size=block_tokens) if num_g3 else None
        self.disk_admission = make_admission_policy(config.disk_admission)
        self.remote_admission = make_admission_policy(config.remote_admission)
        self.onboard = OnboardPolicy(config.onboard_mode, block_bytes, block_tokens)
        self.has_remote = config.has_remote and self.g2 is not None

        self._requests: dict[str, _Request] = {}
        self._ops = _Operations(world_size)
        self.op_deadline_s = max(_RANK_LAG_S, _RANK_LAG_TIMEOUTS * config.remote_timeout_ms / 1000)
        # Request id -> operation id of its latest load.
        self._load_ops: dict[str, int] = {}
        # Keys with a store, a disk write or a remote put in flight.
        self._storing_keys: set[BlockKey] = set()
        self._disk_writing_keys: set[BlockKey] = set()
        self._remote_putting_keys: set[BlockKey] = set()
        # Keys being staged into G2 by loads (registered there when the load lands).
        self._staging_keys: set[BlockKey] = set()
        # G2 slot -> extra holders sharing one pool reference (a disk write and a remote put
        # of the same slot).
        self._g2_shares: dict[int, int] = {}
        # Keys G4 is known to hold, oldest first (bounded).
        self._remote_keys: OrderedDict[BlockKey, None] = OrderedDict()
        self._remote_healthy = True
        self._rank_healthy: dict[int, bool] = {}
        # G2 staging slot -> ranks whose timed-out remote read may still write into it; the
        # slot is freed when its load is committed and every one of them released it.
        self._held_staging: dict[int, set[int]] = {}
        self._parked_staging: set[int] = set()   # committed, waiting for those releases
        self._probe_wait_s = (_PROBE_WAIT_TIMEOUTS * config.remote_timeout_ms / 1000
                              + _PROBE_WAIT_MARGIN_S)
        if self.has_remote:
            self.metrics.remote_healthy.set(1)
        self._probe_timeout_logged = False
        self._rank_lag_logged = False
        self._unkeyable_logged: set[str] = set()
        self._plan = StepPlan(layout=self.layout)
        self._step_started = 0.0
        self._step_prefill_tokens = 0
        # With a disk tier, the workers report what a previous run left there first (every
        # rank its own disk index; the leader keeps what all of them hold).
        self._recovered = self.g3 is None
        self._recovered_by_rank: dict[int, list[tuple[int, BlockKey]]] = {}
        self._match_waits = 0

    # -- requests -----------------------------------------------------------------------
    def match(self, req_id: str, token_ids: Sequence[int], num_computed_tokens: int, *,
              cache_salt: str | None = None, lora_name: str | None = None,
              keys: RequestKeys | None = None) -> int | None:
        """Tokens beyond ``num_computed_tokens`` that kvtier will load, or None to ask again
        next step (the disk index of a previous run, or the answer of a G4 probe, has not
        arrived yet). Side-effect free for the tiers (it only caches the request's hashes,
        its probe and this answer).

        ``keys`` names everything else the request's KV depends on (multimodal items, prompt
        embeddings, salt, LoRA); ``cache_salt``/``lora_name`` are its short form. Only the
        first call of a request reads them. A request whose keys cannot be trusted
        (``RequestKeys.unkeyable_reason``) is answered 0 and never offloaded."""
        if keys is None:
            keys = RequestKeys(cache_salt=cache_salt, lora_name=lora_name)
        elif cache_salt is not None or lora_name is not None:
            raise ValueError("match(): pass cache_salt and lora_name inside keys, not beside it")
        req = self._request(req_id, keys)
        if req.unkeyable:
            return 0
        if not self._recovered:
            self._match_waits += 1
            if self._match_waits <= _MAX_RECOVERY_WAITS:
                return None
            logger.warning("kvtier: no disk index from the workers; starting the disk tier empty")
            self._recovered = True
        self._hash_upto(req, token_ids, len(token_ids))
        start = num_computed_tokens // self.block_tokens
        # Never the whole prompt: the engine must compute at least one token.
        limit = (len(token_ids) - 1) // self.block_tokens
        remote = self.has_remote and self._remote_healthy
        tiers = (self._tiers_of_prefix(req.hashes[start:limit], req if remote else None, start)
                 if limit > start else [])
        if (remote and start + len(tiers) < limit and req.probe_state != _PROBED
                and self._awaits_probe(req, start + len(tiers), limit)):
            return None
        decision = self.onboard.decide(self._cap_staging(tiers))
        req.match_start, req.match_tiers = start, tiers[:decision.num_blocks]
        req.match_sync = (decision.load_s * 1000 <= self.config.sync_load_max_ms
                          and Tier.G4 not in req.match_tiers)
        if not req.counted:
            req.counted = True
            self.metrics.requested_tokens.inc(len(token_ids))
            self.metrics.queried_blocks.inc(max(limit - start, 0))
            self.metrics.skipped_onboards.inc(len(tiers) - decision.num_blocks)
        return decision.num_blocks * self.block_tokens

    def begin_onboard(self, req_id: str, device_block_ids: Sequence[int],
                      num_external_tokens: int) -> None:
        """The engine reserved ``device_block_ids`` (the request's whole block table) and
        waits for ``num_external_tokens`` to arrive. Every promised block gets a load op: one
        that cannot be pinned any more fails, so the engine recomputes it instead of waiting."""
        num_blocks = num_external_tokens // self.block_tokens
        if num_blocks == 0:
            return
        req = self._requests.get(req_id)
        start = req.match_start if req is not None else 0
        tiers = req.match_tiers if req is not None else []
        if num_blocks > len(tiers):
            logger.error("request %s: engine expects %d blocks but %d were matched; the rest "
                         "is recomputed", req_id, num_blocks, len(tiers))
        op = LoadOp(req_id, list(device_block_ids[start:start + num_blocks]), [], [], [],
                    sync=req is not None and req.match_sync)
        load = _Load(op, [], [])
        op.op_id = self._ops.start(load)
        for i in range(num_blocks):
            if i < len(tiers):
                key = req.hashes[start + i]
                tier = self._pin_for_load(key, tiers[i], op, load)
            else:
                key, tier = 0, None
                op.g2_slots.append(NO_SLOT)
                op.g3_slots.append(NO_SLOT)
            load.source_tiers.append(tier)
            op.keys.append(key)
            if tier is not None and tier is not Tier.G2:
                self._staging_keys.add(key)  # on the host once the load lands: no store
        self._plan.loads.append(op)
        self._load_ops[req_id] = op.op_id

    def progress(self, req_id: str, token_ids: Sequence[int], num_valid_tokens: int,
                 device_block_ids: Sequence[int], priority: int = 100) -> None:
        """After this step, the device holds valid KV for ``token_ids[:num_valid_tokens]`` in
        ``device_block_ids``: offload blocks that became full (write-through to G2)."""
        req = self._requests.get(req_id)
        if req is None or self.g2 is None or req.unkeyable:
            return
        num_full = min(num_valid_tokens // self.block_tokens, len(device_block_ids))
        if num_full <= req.num_offered:
            return
        self._hash_upto(req, token_ids, num_full * self.block_tokens)
        if priority < self.config.offload_min_priority:
            # Priority gate (KVBM): below the minimum, nothing of this request is offloaded.
            req.num_offered = num_full
            return
        for i in range(req.num_offered, num_full):
            self._offload(req.hashes[i], device_block_ids[i])
        req.num_offered = num_full

    def preempted(self, req_id: str) -> None:
        """The engine dropped the request's device blocks; tiered copies stay valid."""
        req = self._requests.get(req_id)
        if req is not None:
            req.match_tiers = []

    def is_async_load(self, req_id: str) -> bool:
        """Whether the last match of ``req_id`` loads between steps (else within the step)."""
        req = self._requests.get(req_id)
        return req is None or not req.match_sync

    def onboard_split(self, req_id: str) -> dict[Tier, int]:
        """Tokens of the request's current load, by the tier they come from."""
        load = self._load_of(req_id)
        split: dict[Tier, int] = {}
        for tier in load.source_tiers if load is not None else ():
            if tier is not None:
                split[tier] = split.get(tier, 0) + self.block_tokens
        return split

    def finish(self, req_id: str) -> bool:
        """The request ended. True: keep its device blocks until its load is reported done."""
        self._requests.pop(req_id, None)
        load = self._load_of(req_id)
        # A synchronous load ran before the step's forward pass: nothing writes the blocks.
        return load is not None and not load.op.sync

    # -- steps --------------------------------------------------------------------------
    def begin_step(self, num_prefill_tokens: int) -> None:
        self._step_started = time.perf_counter()
        self._step_prefill_tokens = num_prefill_tokens

    def take_plan(self) -> StepPlan:
        plan, self._plan = self._plan, StepPlan()
        ops = self._ops
        self.metrics.queue_depth.labels("store").set(ops.count(_Store))
        self.metrics.queue_depth.labels("disk_write").set(ops.count(_DiskWrite))
        self.metrics.queue_depth.labels("load").set(ops.count(_Load))
        if self.has_remote:
            self.metrics.queue_depth.labels("remote_put").set(ops.count(_RemotePut))
        return plan

    def on_report(self, report: WorkerReport) -> None:
        """One rank's report (a single-rank engine's whole step)."""
        self.on_reports([report])

    def on_reports(self, reports: Sequence[WorkerReport]) -> None:
        """What the ranks reported this step: any number of them, each for itself."""
        now = time.perf_counter()
        if self._step_started:
            self.onboard.observe_step(self._step_prefill_tokens, now - self._step_started)
            self._step_started = 0.0
        for report in reports:
            self._take_report(report, now)
        for op in self._ops.overdue(now):
            self._time_out(op)
        for pool in (self.g2, self.g3):
            if pool is not None:
                self.metrics.tier_blocks.labels(pool.tier.name).set(pool.num_inactive
                                                                    + pool.num_active)

    def _take_report(self, report: WorkerReport, now: float) -> None:
        rank = report.rank
        if not 0 <= rank < self._ops.world_size:
            logger.error("kvtier: report of rank %d ignored: the leader expects ranks 0..%d",
                         rank, self._ops.world_size - 1)
            return
        if report.recovered is not None:
            self._recovered_by_rank[rank] = report.recovered
            if len(self._recovered_by_rank) == self._ops.world_size:
                # Keep only what every rank recovered.
                parts = iter(self._recovered_by_rank.values())
                common = set(next(parts)).intersection(*parts)
                self._restore_disk_index(sorted(common))
        if report.remote_healthy is not None:
            self._rank_healthy[rank] = report.remote_healthy
            self._set_remote_health(all(self._rank_healthy.values()))
        if report.remote_stats and self.has_remote:
            self.metrics.record_remote_events(report.remote_stats)
        lag_s = self.op_deadline_s
        for op_id, num in report.remote_present.items():
            op = self._ops.get(op_id)
            if op is None or rank not in op.waiting or not isinstance(op.work, _Probe):
                continue   # retired (answered, or past its deadline), or a repeat
            op.work.num_present = min(op.work.num_present, num)
            self._commit(self._ops.report(op_id, rank, True, now, lag_s))
        for op_id in report.ops_ok:
            self._commit(self._ops.report(op_id, rank, True, now, lag_s))
        for op_id in report.ops_failed:
            self._commit(self._ops.report(op_id, rank, False, now, lag_s))
        for result in report.loads:
            op = self._ops.get(result.op_id)
            if op is None or rank not in op.waiting or not isinstance(op.work, _Load):
                continue   # retired, or this rank's result counted already
            load = op.work
            load.failed.update(result.failed_idx)
            load.corrupt.update(result.corrupt_idx)
            for i in result.held_idx:
                self._held_staging.setdefault(load.op.g2_slots[i], set()).add(rank)
            self._commit(self._ops.report(result.op_id, rank, not result.failed_idx, now,
                                          lag_s))
        for slot in report.staging_released:
            holders = self._held_staging.get(slot)
            if holders is None or rank not in holders:
                continue
            holders.discard(rank)
            if not holders:
                del self._held_staging[slot]
                if slot in self._parked_staging:
                    self._parked_staging.discard(slot)
                    self.g2.release([slot])
        for direction, timing in report.timings.items():
            tier = _DIRECTION_TIER.get(direction)
            if tier is not None:
                self.onboard.observe_transfer(tier, timing.num_bytes, timing.seconds)
            self.metrics.record_transfer(direction, timing.num_bytes // max(self.block_bytes, 1),
                                         timing.num_bytes, timing.seconds)

    def _commit(self, op: _Operation | None) -> None:
        """Every rank has reported ``op``: apply its outcome (a failure if any rank failed
        it or it ran past its deadline)."""
        if op is None:
            return
        work = op.work
        if isinstance(work, _Load):
            self._load_done(work, op.timed_out)
        elif isinstance(work, _Store):
            self._store_done(work, op.ok, op.timed_out)
        elif isinstance(work, _DiskWrite):
            self._disk_write_done(work, op.ok, op.timed_out)
        elif isinstance(work, _RemotePut):
            self._remote_put_done(work, op.ok, op.timed_out)
        else:
            self._probe_answered(op.op_id, work.req_id, work.num_present)

    def _time_out(self, op: _Operation) -> None:
        """A rank lags ``op`` past the deadline: it has failed. Its keys may be planned again
        at once; its slots stay pinned until the late ranks report (``_Operations``)."""
        work = op.work
        log = logger.debug if self._rank_lag_logged else logger.warning
        self._rank_lag_logged = True
        log("kvtier: rank(s) %s did not report operation %d (%s) within %.1f s of the other "
            "ranks; it counts as failed (further cases are logged at debug level)",
            sorted(op.waiting), op.op_id, type(work).__name__.lstrip("_"), self.op_deadline_s)
        if isinstance(work, _Load):
            work.failed.update(range(len(work.op.keys)))
            self._unstage(work)
        elif isinstance(work, _Store):
            self._storing_keys.discard(work.key)
        elif isinstance(work, _DiskWrite):
            self._disk_writing_keys.discard(work.key)
        elif isinstance(work, _RemotePut):
            self._remote_putting_keys.discard(work.key)
        else:
            self._ops.retire(op.op_id)
            self._probe_answered(op.op_id, work.req_id, 0)

    def reset(self) -> None:
        """Forget every cached block (blocks pinned by transfers go when those end). The
        shared store is not cleared; only what this leader believed it holds."""
        for pool in (self.g2, self.g3):
            if pool is not None:
                pool.clear()
        self._remote_keys.clear()

    def take_events(self) -> list:
        return self.events.take_events() if self.events is not None else []

    @property
    def busy(self) -> bool:
        """Transfers are still in flight (or staging slots wait for a stalled store)."""
        return bool(len(self._ops) or self._held_staging or self._parked_staging)

    def remote_holds(self, key: BlockKey) -> bool:
        """Whether this leader believes G4 holds ``key`` (a hint, for tests and tools)."""
        return key in self._remote_keys

    def check_invariants(self) -> None:
        for pool in (self.g2, self.g3):
            if pool is not None:
                pool.check_invariants()

    # -- internals ----------------------------------------------------------------------
    def _request(self, req_id: str, keys: RequestKeys) -> _Request:
        req = self._requests.get(req_id)
        if req is None:
            req = _Request(req_id, keys, self.hasher.salt_of(keys))
            reason = keys.unkeyable_reason()
            if reason is not None:
                req.unkeyable = reason
                self.metrics.unkeyable_requests.labels(reason).inc()
                log = logger.debug if reason in self._unkeyable_logged else logger.info
                self._unkeyable_logged.add(reason)
                log("kvtier: request %s cannot be keyed safely (%s); it is served without "
                    "kvtier (further cases are logged at debug level)", req_id, reason)
            self._requests[req_id] = req
        return req

    def _hash_upto(self, req: _Request, token_ids: Sequence[int], num_tokens: int) -> None:
        have = len(req.hashes)
        want = num_tokens // self.block_tokens
        if want <= have:
            return
        parent = req.hashes[-1] if have else None
        start = have * self.block_tokens
        tokens = token_ids[start:want * self.block_tokens]
        # Multimodal items, prompt embeddings (and, in vLLM's modes, the salt and LoRA) go in
        # as per-block extra keys; the chain carries each one to every later block.
        extra = self.hasher.extra_keys(req.keys, have, want - have)
        req.hashes.extend(self.hasher.hash_blocks(tokens, salt=req.salt, parent=parent,
                                                  extra_keys=extra))

    def _tiers_of_prefix(self, keys: list[BlockKey], remote_req: _Request | None = None,
                         first: int = 0) -> list[Tier]:
        """Fastest tier of each leading block, stopping at the first block no tier holds.
        With ``remote_req`` (``keys`` start at its block ``first``), G4 counts too: keys this
        leader knows G4 holds, and the blocks the request's probe found there."""
        tiers: list[Tier] = []
        i = 0
        while i < len(keys):
            in_g2 = self.g2.lookup(keys[i:]) if self.host_caches else 0
            if in_g2:
                tiers.extend([Tier.G2] * in_g2)
                i += in_g2
                continue
            if self.g3 is not None and self.g3.lookup(keys[i:i + 1]):
                tiers.append(Tier.G3)
            elif remote_req is not None and (
                    keys[i] in self._remote_keys
                    or 0 <= first + i - remote_req.probe_start < remote_req.probe_present):
                tiers.append(Tier.G4)
            else:
                break
            i += 1
        return tiers

    def _awaits_probe(self, req: _Request, first: int, limit: int) -> bool:
        """True while the request should wait for a G4 probe of blocks [first, limit)."""
        now = time.perf_counter()
        if req.probe_state == _NOT_PROBED:
            req.probe_state, req.probe_start, req.probe_sent = _PROBING, first, now
            req.probe_op = self._ops.start(_Probe(req.req_id))
            self._plan.remote_probes[req.probe_op] = req.hashes[first:limit]
            return True
        if now - req.probe_sent < self._probe_wait_s:
            return True
        # Never hang a request on the store: match without what the probe would have found.
        log = logger.debug if self._probe_timeout_logged else logger.warning
        self._probe_timeout_logged = True
        log("kvtier: no answer from the remote tier's lookup for request %s after %.1f s; "
            "matching without it (further cases are logged at debug level)", req.req_id,
            now - req.probe_sent)
        self.metrics.remote_events.labels("probe_timeouts").inc()
        req.probe_state, req.probe_present = _PROBED, 0
        self._ops.retire(req.probe_op)   # a late answer is ignored
        return False

    def _probe_answered(self, op_id: int, req_id: str, num_present: int) -> None:
        req = self._requests.get(req_id)
        if req is None or req.probe_state != _PROBING or req.probe_op != op_id:
            return
        req.probe_state, req.probe_present = _PROBED, max(num_present, 0)
        for key in req.hashes[req.probe_start:req.probe_start + req.probe_present]:
            self._remember_remote(key)

    def _set_remote_health(self, healthy: bool) -> None:
        if healthy == self._remote_healthy:
            return
        self._remote_healthy = healthy
        if self.has_remote:
            self.metrics.remote_healthy.set(1 if healthy else 0)
        if not healthy:
            # Requests waiting for a probe match without G4 now; what the store held before
            # the outage may be gone after it.
            for req in self._requests.values():
                if req.probe_state == _PROBING:
                    req.probe_state, req.probe_present = _PROBED, 0
            self._remote_keys.clear()

    def _remember_remote(self, key: BlockKey) -> None:
        keys = self._remote_keys
        if key in keys:
            keys.move_to_end(key)
            return
        keys[key] = None
        if len(keys) > _MAX_REMOTE_KEYS:
            keys.popitem(last=False)

    def _forget_remote(self, key: BlockKey) -> None:
        self._remote_keys.pop(key, None)

    def _cap_staging(self, tiers: list[Tier]) -> list[Tier]:
        """Cut a match where pinning its G2 sources and staging its disk/remote blocks would
        take more G2 slots than are free or evictable now (a few stay for offloads)."""
        if self.g2 is None or Tier.G3 not in tiers and Tier.G4 not in tiers:
            return tiers
        reserve = min(_MIN_STAGING_BLOCKS, self.g2.num_blocks // 8)
        room = self.g2.num_free + self.g2.num_inactive - reserve
        return tiers[:max(room, 0)]

    def _pin_for_load(self, key: BlockKey, tier: Tier, op: LoadOp, load: _Load) -> Tier | None:
        """Pin block ``key``'s source and pick its G2 slot; NO_SLOT makes it a load error."""
        g3_slot = NO_SLOT
        if tier is Tier.G2:
            slots = self.g2.match([key])
            g2_slot = slots[0] if slots else NO_SLOT
        elif tier is Tier.G4:
            # Staged through G2, like disk reads; the store may have lost it meanwhile (then
            # the worker reports the block failed and it is recomputed).
            staging = self.g2.allocate(1)
            if staging:
                g2_slot = staging[0]
                op.remote_idx.append(len(op.g2_slots))
            else:
                g2_slot = NO_SLOT
                self.metrics.dropped_offloads.labels("G2").inc()
        else:
            pinned = self.g3.match([key])
            staging = self.g2.allocate(1) if pinned else []
            if pinned and not staging:
                self.g3.release(pinned)
                self.metrics.dropped_offloads.labels("G2").inc()
            if pinned and staging:
                g3_slot, g2_slot = pinned[0], staging[0]
                load.g3_refs.append(g3_slot)
            else:
                g2_slot = NO_SLOT
        op.g2_slots.append(g2_slot)
        op.g3_slots.append(g3_slot)
        return tier if g2_slot != NO_SLOT else None

    def _offload(self, key: BlockKey, device_block_id: int) -> None:
        if key in self._storing_keys or key in self._staging_keys:
            return
        if self.host_caches and self.g2.lookup([key]):
            # Already on the host: a re-offer counts toward disk and remote admission.
            self.g2.touch([key])
            to_disk, to_remote = self._wants_disk(key), self._wants_remote(key)
            if to_disk or to_remote:
                slots = self.g2.match([key])
                if slots:
                    self._fan_out(slots[0], key, to_disk, to_remote)
            return
        if self.host_caches:
            to_disk = to_remote = False  # decided once the host holds the bytes
        else:
            # G2 only stages: copy the block out of the device only for a tier below.
            to_disk, to_remote = self._wants_disk(key), self._wants_remote(key)
            if not (to_disk or to_remote):
                return
        slots = self.g2.allocate(1)
        if not slots:
            self.metrics.dropped_offloads.labels("G2").inc()
            return
        op_id = self._ops.start(_Store(slots[0], key, to_disk, to_remote))
        self._plan.stores.add(device_block_id, slots[0], key, op_id)
        self._storing_keys.add(key)

    def _wants_disk(self, key: BlockKey) -> bool:
        if self.g3 is None or key in self._disk_writing_keys or self.g3.lookup([key]):
            return False
        return self.disk_admission.admit(key)

    def _wants_remote(self, key: BlockKey) -> bool:
        if (not self.has_remote or key in self._remote_keys
                or key in self._remote_putting_keys):
            return False
        if not self.remote_admission.admit(key):
            return False
        if not self._remote_healthy:
            self.metrics.dropped_offloads.labels("G4").inc()
            return False
        return True

    def _fan_out(self, g2_slot: int, key: BlockKey, to_disk: bool, to_remote: bool) -> None:
        """Hand the caller's pin on a G2 block to its disk write and/or remote put (they
        share it), or release it when neither wants the block."""
        to_disk = to_disk and self.g3 is not None
        if to_disk and to_remote:
            self._g2_shares[g2_slot] = self._g2_shares.get(g2_slot, 0) + 1
        if to_disk:
            self._write_to_disk(g2_slot, key)
        if to_remote:
            self._put_remote(g2_slot, key)
        if not (to_disk or to_remote):
            self.g2.release([g2_slot])

    def _release_shared(self, g2_slot: int) -> None:
        """One holder of a fanned-out G2 pin is done; the last one releases it."""
        extra = self._g2_shares.get(g2_slot, 0)
        if extra > 1:
            self._g2_shares[g2_slot] = extra - 1
        elif extra == 1:
            del self._g2_shares[g2_slot]
        else:
            self.g2.release([g2_slot])

    def _write_to_disk(self, g2_slot: int, key: BlockKey) -> None:
        """Plan G2 -> G3 of a pinned G2 block; the pin is released when the write ends."""
        slots = self.g3.allocate(1)
        if not slots:
            self.metrics.dropped_offloads.labels("G3").inc()
            self._release_shared(g2_slot)
            return
        op_id = self._ops.start(_DiskWrite(g2_slot, slots[0], key))
        self._plan.disk_writes.add(g2_slot, slots[0], key, op_id)
        self._disk_writing_keys.add(key)

    def _put_remote(self, g2_slot: int, key: BlockKey) -> None:
        """Plan G2 -> G4 of a pinned G2 block; the pin is released when the put ends."""
        op_id = self._ops.start(_RemotePut(g2_slot, key))
        self._plan.remote_puts.add(g2_slot, key, op_id)
        self._remote_putting_keys.add(key)

    # Completions: every rank has reported the operation. ``timed_out``: its keys were
    # handed back when the deadline passed (they may belong to a newer operation by now).
    def _store_done(self, store: _Store, ok: bool, timed_out: bool) -> None:
        slot, key = store.g2_slot, store.key
        if not timed_out:
            self._storing_keys.discard(key)
        if not ok:
            self.g2.release([slot])
            self.metrics.dropped_offloads.labels("G2").inc()
            return
        self.g2.complete([slot])
        to_disk, to_remote = store.to_disk, store.to_remote
        if self.host_caches:
            slot = self.g2.register([slot], [key])[0]
            to_disk, to_remote = self._wants_disk(key), self._wants_remote(key)
        self._fan_out(slot, key, to_disk, to_remote)

    def _remote_put_done(self, put: _RemotePut, ok: bool, timed_out: bool) -> None:
        if not timed_out:
            self._remote_putting_keys.discard(put.key)
        self._release_shared(put.g2_slot)
        if ok:
            self._remember_remote(put.key)
        else:
            self.metrics.dropped_offloads.labels("G4").inc()

    def _disk_write_done(self, write: _DiskWrite, ok: bool, timed_out: bool) -> None:
        g3_slot, key = write.g3_slot, write.key
        if not timed_out:
            self._disk_writing_keys.discard(key)
        self._release_shared(write.g2_slot)
        if not ok:
            self.g3.release([g3_slot])
            self.metrics.dropped_offloads.labels("G3").inc()
            return
        self.g3.complete([g3_slot])
        g3_slot = self.g3.register([g3_slot], [key])[0]
        self.g3.release([g3_slot])

    def _unstage(self, load: _Load) -> None:
        self._staging_keys.difference_update(
            key for key, tier in zip(load.op.keys, load.source_tiers)
            if tier is not None and tier is not Tier.G2)

    def _load_of(self, req_id: str) -> _Load | None:
        """The request's latest load while some rank has not reported it."""
        op = self._ops.get(self._load_ops.get(req_id, 0))
        return op.work if op is not None else None

    def _load_done(self, load: _Load, timed_out: bool) -> None:
        op = load.op
        req_id = op.req_id
        failed, corrupt = load.failed, load.corrupt
        if self._load_ops.get(req_id) == op.op_id:
            del self._load_ops[req_id]
        if not timed_out:
            self._unstage(load)
        if load.g3_refs:
            self.g3.release(load.g3_refs)
        bad_g3: list[BlockKey] = []
        bad_g2: list[BlockKey] = []
        for i, (tier, slot, key) in enumerate(zip(load.source_tiers, op.g2_slots, op.keys)):
            if tier is None:
                continue
            if tier is Tier.G2:
                self.g2.release([slot])
                if i in corrupt:
                    bad_g2.append(key)
                continue
            if tier is Tier.G4 and i in failed:
                # Missing, corrupt or late: the store is not to be trusted with it for now,
                # nor is the request's probe answer from this block on (else the retried
                # request would be promised the same bad block again, forever).
                self._forget_remote(key)
                req = self._requests.get(req_id)
                if req is not None:
                    block = req.match_start + i
                    req.probe_present = min(req.probe_present,
                                            max(block - req.probe_start, 0))
                if slot in self._held_staging:
                    # Freed when every rank that holds it released it (no late write).
                    self._parked_staging.add(slot)
                    continue
            # Staged from disk or G4: on success the host tier keeps it (promotion).
            if i not in failed and self.host_caches:
                self.g2.complete([slot])
                slot = self.g2.register([slot], [key])[0]
            self.g2.release([slot])
            if i in corrupt and tier is Tier.G3:
                bad_g3.append(key)
        for tier in (Tier.G2, Tier.G3, Tier.G4):
            served = sum(1 for i, t in enumerate(load.source_tiers)
                         if t is tier and i not in failed)
            if served:
                self.metrics.record_match(tier, served, self.block_tokens)
        # Unpinnable blocks (no source) are in the worker's failed list too: count each once.
        all_failed = failed | {i for i, t in enumerate(load.source_tiers) if t is None}
        num_failed = len(all_failed)
        if num_failed:
            self.metrics.load_errors.inc(num_failed)
            req = self._requests.get(req_id)
            if req is not None:
                # The engine recomputes from the first failed block on: offer those blocks
                # again, so one dropped as corrupt returns to the tiers with recomputed bytes.
                req.num_offered = min(req.num_offered, req.match_start + min(all_failed))
        if corrupt:
            self.metrics.checksum_failures.inc(len(corrupt))
            logger.warning("request %s: %d onboarded blocks failed verification; "
                           "they are recomputed and dropped from the tier", req_id, len(corrupt))
        num_remote_failed = sum(1 for i in failed if load.source_tiers[i] is Tier.G4)
        if num_remote_failed:
            logger.debug("request %s: %d blocks could not be read from the remote tier; they "
                         "are recomputed", req_id, num_remote_failed)
        if bad_g2:
            self.g2.discard(bad_g2)
        if bad_g3:
            self.g3.discard(bad_g3)
            # The worker drops their index entries, so a restart does not recover them.
            self._plan.disk_discards.extend(
                op.g3_slots[i] for i in sorted(corrupt) if load.source_tiers[i] is Tier.G3)

    def _restore_disk_index(self, entries: list[tuple[int, BlockKey]]) -> None:
        if self._recovered or self.g3 is None:
            return
        self._recovered = True
        valid = [(slot, key) for slot, key in entries if 0 <= slot < self.g3.num_blocks]
        self.g3.restore(valid)
        logger.info("kvtier: disk tier recovered %d blocks from a previous run", len(valid))
