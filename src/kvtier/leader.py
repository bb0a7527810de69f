"""The leader: scheduler-side orchestration of which KV blocks live in which tier.

Engine-neutral and free of torch and I/O. An engine adapter calls, per request and per step:

  match()         how many tokens beyond the device prefix kvtier can load (no side effects)
  begin_onboard() the engine reserved device blocks for them: plan the load, pin the sources
  progress()      the step computes tokens: plan offloads of blocks that become full
  take_plan()     this step's StepPlan, for the workers
  on_reports()    the ranks' WorkerReports came back: once every rank has reported an
                  operation, its owner commits it
  finish()        the request is done; True while a load still writes its device blocks

The leader keeps requests (their block keys, their last match) and dispatches; what each tier
holds and how its transfers end lives in ``kvtier.managers``: ``HostManager`` (G2),
``DiskManager`` (G3), ``RemoteManager`` (G4, with probes), ``Loads`` (onboarding),
``OffloadPipeline`` (G1 -> G2 -> G3/G4 with leases) and ``Operations`` (per-operation results
from every rank, with a deadline for a lagging rank). The replay simulator drives this same
leader, so its hit ratios are the connector's.

Slots of the G2/G3 pools are the slots of the workers' host arena and disk file. A block is
matchable only once every rank has reported its bytes in place.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

from kvtier.config import KvtierConfig
from kvtier.events.types import BlockOrigin, EventBuffer
from kvtier.hashing import BlockHasher, RequestKeys
from kvtier.managers.disk import DiskManager, disk_admission_policy
from kvtier.managers.host import HostManager
from kvtier.managers.loads import Loads
from kvtier.managers.offload import OffloadPipeline
from kvtier.managers.operations import Operation, Operations
from kvtier.managers.remote import RemoteManager
from kvtier.metrics import KvtierMetrics
from kvtier.offload.onboard import OnboardPolicy
from kvtier.pools.block_pool import MAX_PRIORITY, BlockPool
from kvtier.protocol import StepPlan, TierLayout, WorkerReport
from kvtier.tiers import BlockKey, Tier

logger = logging.getLogger(__name__)

_STAGING_BYTES = 2 * 10**9
_MIN_STAGING_BLOCKS = 64
# kvtier_inflight_transfers labels and the operation kinds they count.
_QUEUE_KINDS = (("store", "Store"), ("disk_write", "DiskWrite"), ("load", "Load"),
                ("remote_put", "RemotePut"))
_DIRECTION_TIER = {"g2_to_g1": Tier.G2, "g3_to_g2": Tier.G3, "g4_to_g2": Tier.G4}
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
    tokens: Sequence[int] = ()   # the engine's token list, as last seen (for KV events)
    priority: int = MAX_PRIORITY   # retention priority, as last given
    # Leading blocks already considered for offload (stored, deduplicated or dropped).
    num_offered: int = 0
    # The last match() answer: first block index and the tier of each block to load.
    match_start: int = 0
    match_tiers: list[Tier] = dataclasses.field(default_factory=list)
    match_found: list[Tier] = dataclasses.field(default_factory=list)  # before the cost cut
    counted: bool = False   # its lookup is in the hit-rate metrics
    match_sync: bool = False  # the last match is small enough to load inside the step
    # Why its blocks cannot be keyed safely; such a request is neither matched nor offloaded.
    unkeyable: str | None = None


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
                 events: bool = False, world_size: int = 1,
                 clock: Callable[[], float] | None = None, remote_loads: bool = True) -> None:
        """``world_size``: the ranks that execute each plan and report it (vLLM: the
        parallel config's world size, the count its own KV output aggregator waits for).
        ``clock``: the time base of admission policies that decay with time (default: the
        monotonic clock; a replay passes its trace's). ``remote_loads=False``: never match
        blocks from G4, only put them there (for an engine that cannot recompute a block whose
        load fails: the store may evict any block between the match and the read)."""
        self.config = config
        self.block_tokens = block_tokens
        self.block_bytes = block_bytes
        self.hasher = BlockHasher(block_tokens, config.hash_mode)
        self.metrics = metrics = metrics or KvtierMetrics()
        self.events = EventBuffer() if events else None
        self.onboard = OnboardPolicy(config.onboard_mode, block_bytes, block_tokens)
        self.layout = plan_tier_layout(config, block_bytes, max_blocks_per_request, world_size)
        self.ops = Operations(world_size, self.layout)
        self.op_deadline_s = max(_RANK_LAG_S, _RANK_LAG_TIMEOUTS * config.remote_timeout_ms / 1000)

        num_g2, num_g3 = self.layout.num_g2_slots, self.layout.num_g3_slots
        self.host = HostManager(num_g2, caches=config.has_host,
                                eviction=config.host_eviction_policy, events=self.events,
                                block_tokens=block_tokens, metrics=metrics) if num_g2 else None
        self.disk = DiskManager(num_g3, eviction=config.disk_eviction_policy,
                                admission=disk_admission_policy(config.disk_admission,
                                                                host_caches=config.has_host),
                                events=self.events,
                                block_tokens=block_tokens, world_size=world_size,
                                metrics=metrics, clock=clock) if num_g3 else None
        self.remote = (RemoteManager(config, self.ops, metrics, clock)
                       if config.has_remote and self.host is not None else None)
        self.loads = self.offloads = None
        if self.host is not None:
            self.loads = Loads(self.host, self.disk, self.remote, self.ops, metrics,
                               block_tokens, self._recompute_from)
            self.offloads = OffloadPipeline(self.host, self.disk, self.remote, self.ops)

        # A prefix-aware tier policy needs each block's parent even with events off.
        self._link_parents = any(m is not None and m.pool.links_parents
                                 for m in (self.host, self.disk))
        self._remote_loads = remote_loads
        self._requests: dict[str, _Request] = {}
        self._rank_lag_logged = False
        self._unkeyable_logged: set[str] = set()
        self._step_started = 0.0
        self._step_prefill_tokens = 0

    @property
    def g2(self) -> BlockPool | None:
        """The host tier's pool (for tests and tools)."""
        return self.host.pool if self.host is not None else None

    @property
    def g3(self) -> BlockPool | None:
        """The disk tier's pool (for tests and tools)."""
        return self.disk.pool if self.disk is not None else None

    # -- requests -----------------------------------------------------------------------
    def match(self, req_id: str, token_ids: Sequence[int], num_computed_tokens: int, *,
              cache_salt: str | None = None, lora_name: str | None = None,
              keys: RequestKeys | None = None,
              block_keys: Sequence[BlockKey] | None = None,
              priority: int = MAX_PRIORITY) -> int | None:
        """Tokens beyond ``num_computed_tokens`` that kvtier will load, or None to ask again
        next step (the disk index of a previous run, or the answer of a G4 probe, has not
        arrived yet). Side-effect free for the tiers (it only caches the request's hashes,
        its probe and this answer).

        ``keys`` names everything else the request's KV depends on (multimodal items, prompt
        embeddings, salt, LoRA); ``cache_salt``/``lora_name`` are its short form. Only the
        first call of a request reads them. A request whose keys cannot be trusted
        (``RequestKeys.unkeyable_reason``) is answered 0 and never offloaded.

        ``block_keys``: the engine's own chained hash of each full block (covering everything
        its KV depends on), used instead of kvtier's; ``token_ids`` are then only counted.
        ``priority``: the request's retention priority (0..100, as for ``progress``)."""
        if keys is None:
            keys = RequestKeys(cache_salt=cache_salt, lora_name=lora_name)
        elif cache_salt is not None or lora_name is not None:
            raise ValueError("match(): pass cache_salt and lora_name inside keys, not beside it")
        req = self._request(req_id, keys)
        if req.unkeyable:
            return 0
        if self.disk is not None and not self.disk.ready():
            return None
        req.tokens, req.priority = token_ids, priority
        self._hash_upto(req, token_ids, len(token_ids), block_keys)
        start = num_computed_tokens // self.block_tokens
        # Never the whole prompt: the engine must compute at least one token.
        limit = min((len(token_ids) - 1) // self.block_tokens, len(req.hashes))
        remote = (self.remote if self.remote is not None and self.remote.healthy
                  and self._remote_loads else None)
        tiers = self._tiers_of_prefix(req, start, limit, remote) if limit > start else []
        if (remote is not None and start + len(tiers) < limit
                and remote.awaits_probe(req_id, start + len(tiers),
                                        req.hashes[start + len(tiers):limit])):
            return None
        decision = self.onboard.decide(self._cap_staging(tiers))
        req.match_start, req.match_tiers = start, tiers[:decision.num_blocks]
        req.match_found = tiers
        req.match_sync = (decision.load_s * 1000 <= self.config.sync_load_max_ms
                          and Tier.G4 not in req.match_tiers)
        if not req.counted:
            req.counted = True
            self._tell_tier_policies(req.hashes[start:limit])
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
        if num_blocks == 0 or self.loads is None:
            return
        req = self._requests.get(req_id)
        start = req.match_start if req is not None else 0
        tiers = req.match_tiers if req is not None else []
        if num_blocks > len(tiers):
            logger.error("request %s: engine expects %d blocks but %d were matched; the rest "
                         "is recomputed", req_id, num_blocks, len(tiers))
        keys = req.hashes[start:start + len(tiers)] if req is not None else []
        origins = ([self._origin(req, start + i) for i in range(len(keys))]
                   if (self.events is not None or self._link_parents) and req is not None
                   else None)
        self.loads.begin(req_id, device_block_ids, start, keys, tiers, num_blocks,
                         sync=req is not None and req.match_sync, origins=origins,
                         priority=req.priority if req is not None else MAX_PRIORITY)

    def progress(self, req_id: str, token_ids: Sequence[int], num_valid_tokens: int,
                 device_block_ids: Sequence[int], priority: int = MAX_PRIORITY,
                 block_keys: Sequence[BlockKey] | None = None) -> None:
        """After this step, the device holds valid KV for ``token_ids[:num_valid_tokens]`` in
        ``device_block_ids``: offload blocks that became full (write-through to G2).
        ``priority`` is the request's retention priority (0..100, KVBM's and TRT-LLM's
        sense): below ``offload_min_priority`` nothing of it is offloaded, and lower-priority
        blocks are evicted from the tiers first. ``block_keys``: as for ``match``."""
        req = self._requests.get(req_id)
        if req is None or self.offloads is None or req.unkeyable:
            return
        num_full = min(num_valid_tokens // self.block_tokens, len(device_block_ids))
        if num_full <= req.num_offered:
            return
        req.tokens, req.priority = token_ids, priority
        self._hash_upto(req, token_ids, num_full * self.block_tokens, block_keys)
        num_full = min(num_full, len(req.hashes))
        if priority >= self.config.offload_min_priority:
            for i in range(req.num_offered, num_full):
                self.offloads.offer(req.hashes[i], device_block_ids[i], self._origin(req, i),
                                    priority)
        # else the priority gate (KVBM): below the minimum, nothing of it is offloaded.
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

    def found_tiers(self, req_id: str) -> list[Tier]:
        """Tier of each block the request's last match found beyond the device prefix,
        loaded or (where loading was estimated slower) recomputed."""
        req = self._requests.get(req_id)
        return req.match_found if req is not None else []

    def onboard_split(self, req_id: str) -> dict[Tier, int]:
        """Tokens of the request's current load, by the tier they come from."""
        load = self.loads.of(req_id) if self.loads is not None else None
        split: dict[Tier, int] = {}
        for tier in load.source_tiers if load is not None else ():
            if tier is not None:
                split[tier] = split.get(tier, 0) + self.block_tokens
        return split

    def finish(self, req_id: str) -> bool:
        """The request ended. True: keep its device blocks until its load is reported done."""
        self._requests.pop(req_id, None)
        if self.remote is not None:
            self.remote.forget_request(req_id)
        load = self.loads.of(req_id) if self.loads is not None else None
        # A synchronous load ran before the step's forward pass: nothing writes the blocks.
        return load is not None and not load.op.sync

    # -- steps --------------------------------------------------------------------------
    def begin_step(self, num_prefill_tokens: int) -> None:
        self._step_started = time.perf_counter()
        self._step_prefill_tokens = num_prefill_tokens

    def take_plan(self) -> StepPlan:
        counts = self.ops.count_kinds()
        for label, kind in _QUEUE_KINDS:
            if kind != "RemotePut" or self.remote is not None:
                self.metrics.queue_depth.labels(label).set(counts.get(kind, 0))
        return self.ops.take_plan()

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
        for op in self.ops.overdue(now):
            self._time_out(op)
        for pool in (self.g2, self.g3):
            if pool is not None:
                self.metrics.tier_blocks.labels(pool.tier.name).set(pool.num_inactive
                                                                    + pool.num_active)

    def _take_report(self, report: WorkerReport, now: float) -> None:
        rank, ops = report.rank, self.ops
        if not 0 <= rank < ops.world_size:
            logger.error("kvtier: report of rank %d ignored: the leader expects ranks 0..%d",
                         rank, ops.world_size - 1)
            return
        if report.recovered is not None and self.disk is not None:
            self.disk.recover(rank, report.recovered)
        if self.remote is not None:
            if report.remote_healthy is not None:
                self.remote.rank_health(rank, report.remote_healthy)
            if report.remote_stats:
                self.metrics.record_remote_events(report.remote_stats)
            for op_id, num in report.remote_present.items():
                if self.remote.answer(rank, op_id, num) is not None:
                    self._commit(ops.report(op_id, rank, True, now, self.op_deadline_s))
        for op_id in report.ops_ok:
            self._commit(ops.report(op_id, rank, True, now, self.op_deadline_s))
        for op_id in report.ops_failed:
            self._commit(ops.report(op_id, rank, False, now, self.op_deadline_s))
        if self.loads is not None:
            for result in report.loads:
                if self.loads.report(rank, result) is not None:
                    self._commit(ops.report(result.op_id, rank, not result.failed_idx, now,
                                            self.op_deadline_s))
            for slot in report.staging_released:
                self.host.released(slot, rank)
        for direction, timing in report.timings.items():
            tier = _DIRECTION_TIER.get(direction)
            if tier is not None:
                self.onboard.observe_transfer(tier, timing.num_bytes, timing.seconds)
            self.metrics.record_transfer(direction, timing.num_bytes // max(self.block_bytes, 1),
                                         timing.num_bytes, timing.seconds)

    @staticmethod
    def _commit(op: Operation | None) -> None:
        """Every rank has reported ``op``: its owner applies the outcome (a failure if any
        rank failed it or it ran past its deadline)."""
        if op is not None:
            op.owner.commit(op)

    def _time_out(self, op: Operation) -> None:
        log = logger.debug if self._rank_lag_logged else logger.warning
        self._rank_lag_logged = True
        log("kvtier: rank(s) %s did not report operation %d (%s) within %.1f s of the other "
            "ranks; it counts as failed (further cases are logged at debug level)",
            sorted(op.waiting), op.op_id, op.kind, self.op_deadline_s)
        self.metrics.rank_timeouts.labels(op.kind).inc()
        op.owner.time_out(op)

    def _recompute_from(self, req_id: str, block: int) -> None:
        """A load failed from ``block`` on: the engine recomputes those blocks, so offer them
        again (one dropped as corrupt returns to the tiers with recomputed bytes)."""
        req = self._requests.get(req_id)
        if req is not None:
            req.num_offered = min(req.num_offered, block)

    def reset(self) -> None:
        """Forget every cached block (blocks pinned by transfers go when those end). The
        shared store is not cleared; only what this leader believed it holds."""
        for pool in (self.g2, self.g3):
            if pool is not None:
                pool.clear()
        if self.remote is not None:
            self.remote.clear()

    def take_events(self) -> list:
        return self.events.take_events() if self.events is not None else []

    @property
    def busy(self) -> bool:
        """Transfers are still in flight (or staging slots wait for a stalled store)."""
        return bool(len(self.ops) or (self.host is not None and self.host.busy))

    def remote_holds(self, key: BlockKey) -> bool:
        """Whether this leader believes G4 holds ``key`` (a hint, for tests and tools)."""
        return self.remote is not None and self.remote.holds(key)

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

    def _hash_upto(self, req: _Request, token_ids: Sequence[int], num_tokens: int,
                   block_keys: Sequence[BlockKey] | None) -> None:
        have = len(req.hashes)
        want = num_tokens // self.block_tokens
        if want <= have:
            return
        if block_keys is not None:
            req.hashes.extend(block_keys[have:want])
            return
        parent = req.hashes[-1] if have else None
        start = have * self.block_tokens
        tokens = token_ids[start:want * self.block_tokens]
        # Multimodal items, prompt embeddings (and, in vLLM's modes, the salt and LoRA) go in
        # as per-block extra keys; the chain carries each one to every later block.
        extra = self.hasher.extra_keys(req.keys, have, want - have)
        req.hashes.extend(self.hasher.hash_blocks(tokens, salt=req.salt, parent=parent,
                                                  extra_keys=extra))

    def _origin(self, req: _Request, block: int) -> BlockOrigin | None:
        """Block ``block``'s parent key and tokens for its Stored events; only the parent key
        when events are off but a tier's policy links parents; else None."""
        if self.events is None:
            if self._link_parents:   # only the parent: nothing builds a Stored event
                return BlockOrigin(req.hashes[block - 1] if block else None)
            return None
        bt = self.block_tokens
        return BlockOrigin(req.hashes[block - 1] if block else None,
                           list(req.tokens[block * bt:(block + 1) * bt]), req.keys.lora_name)

    def _tiers_of_prefix(self, req: _Request, start: int, limit: int,
                         remote: RemoteManager | None) -> list[Tier]:
        """Fastest tier of each of the request's blocks from ``start``, stopping at the
        first block no tier holds (or at ``limit``). G4 counts when ``remote`` is given."""
        keys = req.hashes
        tiers: list[Tier] = []
        i = start
        while i < limit:
            in_g2 = self.host.lookup(keys[i:limit]) if self.host is not None else 0
            if in_g2:
                tiers.extend([Tier.G2] * in_g2)
                i += in_g2
                continue
            if self.disk is not None and self.disk.holds(keys[i]):
                tiers.append(Tier.G3)
            elif remote is not None and remote.found(req.req_id, i, keys[i]):
                tiers.append(Tier.G4)
            else:
                break
            i += 1
        return tiers

    def _tell_tier_policies(self, keys: Sequence[BlockKey]) -> None:
        """Show a request's lookup to the host and disk tiers' policies with what the other
        tier holds: a host block the disk holds too adds nothing to a match, one the disk
        lacks may connect the match to the disk's blocks behind it."""
        if not keys:
            return
        host = self.host if self.host is not None and self.host.caches else None
        disk = self.disk
        if host is not None:
            host.pool.eviction.on_lookup(keys, disk.holds if disk is not None else _nowhere)
        if disk is not None:
            disk.pool.eviction.on_lookup(keys, host.holds if host is not None else _nowhere)

    def _cap_staging(self, tiers: list[Tier]) -> list[Tier]:
        """Cut a match where pinning its G2 sources and staging its disk/remote blocks would
        take more G2 slots than are free or evictable now (a few stay for offloads)."""
        if self.host is None or Tier.G3 not in tiers and Tier.G4 not in tiers:
            return tiers
        return tiers[:self.host.staging_room()]


def _nowhere(key: BlockKey) -> bool:
    return False
