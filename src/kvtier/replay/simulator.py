"""Trace replay over the connector's own code: its leader, tier managers and policies.

The device (G1) is vLLM's prefix cache, simulated by a :class:`~kvtier.pools.BlockPool` with
the given eviction policy. Everything below it is the real :class:`~kvtier.leader.Leader` the
vLLM connector runs, configured from the tier specs as a deployment would be (host, disk and
remote tiers; their eviction and admission policies; the onboard-or-recompute decision), and
driven through the calls the connector makes for each request:

Only a request's full blocks are cached, matched and counted as hits, in every tier
(``TraceRequest.cacheable_ids``): vLLM hashes a block once it is full, and a prompt's partial
last block never comes back (the next turn extends it). Until this rule the device tier cached
those blocks too; on the Azure-derived sessions they were a third of the blocks, never hit, and
a policy that learned to drop them first looked up to 7 % better than LRU for it.

1. **Device prefix.** The leading blocks G1 holds are hits (matched, referenced).
2. **Lookup.** ``Leader.match`` walks the rest in the lower tiers (the fastest tier holding
   each block, stopping at the first miss, G4 through probes) and decides how many leading
   found blocks to load; the others are recomputed (``not_onboarded_blocks``). Only full
   blocks are matched and never the whole prompt, as in the engine.
3. **Onboard and offload.** ``begin_onboard`` plans the loads, ``progress`` offers the
   request's full blocks, and stand-in workers execute every plan at once (a load from the
   store fails if the store no longer holds the block), so the leader's own promotion,
   write-through, admission and fan-out decide what each tier keeps.
4. **Release** tail-first on the device, so a request's deepest blocks become evictable first
   (as vLLM does).

G4, the shared store, is simulated as a block pool of the spec's capacity. A single-tier
replay (the policy comparison) keeps only G1 and skips the leader.

Cost model (estimate): a block loaded from tier ``t`` saves recomputing its tokens at
``prefill_tokens_per_s`` and costs loading its bytes at ``t``'s bandwidth; the leader's
onboard policy sees these rates instead of measured ones, so a tier slower than recompute is
not used for onboarding and a hit never costs more than it saves. G1 hits cost nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

# Importing registers the extra eviction policies and the tinylfu admission policy by name.
import kvtier.offload.tinylfu
from kvtier.config import KvtierConfig, default_eviction_policy
from kvtier.errors import ConfigError
from kvtier.leader import Leader
from kvtier.managers.disk import disk_admission_policy
from kvtier.offload.admission import AdmissionPolicy
from kvtier.offload.onboard import Ewma
from kvtier.pools.block_pool import BlockPool
from kvtier.pools.eviction import make_eviction_policy
from kvtier.protocol import NO_SLOT, LoadResult, WorkerReport
from kvtier.replay.stats import HitStats
from kvtier.replay.trace import Trace
from kvtier.tiers import BlockKey, Tier

# Registers the extra eviction policies (and, through them, the tinylfu admission policy).
import kvtier.pools.policies  # noqa: F401  isort: skip

# Read bandwidth into the device per tier (GB/s, 10**9 bytes) when none is given: pinned host
# memory over PCIe 4/5, a datacenter NVMe SSD, a 100 Gb/s RDMA store.
DEFAULT_READ_GBPS = {Tier.G2: 25.0, Tier.G3: 3.0, Tier.G4: 10.0}
DEFAULT_PREFILL_TOKENS_PER_S = 10_000.0
# G3 "auto": the connector's default (managers.disk.disk_admission_policy).
DEFAULT_ADMISSION = {Tier.G1: "always", Tier.G2: "always", Tier.G3: "auto",
                     Tier.G4: "always"}


@dataclasses.dataclass(frozen=True)
class TierSpec:
    """One simulated tier: capacity, policies and read bandwidth into the device."""

    tier: Tier
    num_blocks: int
    eviction: str | None = None  # None: the connector's default for the tier
    admission: str | None = None  # None: DEFAULT_ADMISSION; G1 always takes computed blocks
    read_gbps: float | None = None  # None: DEFAULT_READ_GBPS (G1: not read)

    def __post_init__(self) -> None:
        if self.eviction is None:
            object.__setattr__(self, "eviction", default_eviction_policy(self.tier))
        if self.num_blocks < 1:
            raise ConfigError(f"{self.tier.name}: num_blocks={self.num_blocks} must be >= 1")
        if self.read_gbps is not None and not self.read_gbps > 0:
            raise ConfigError(f"{self.tier.name}: read bandwidth {self.read_gbps} GB/s "
                              "must be > 0")


@dataclasses.dataclass(frozen=True)
class CostModel:
    """What a hit is worth: recompute speed and bytes per token."""

    bytes_per_token: int
    prefill_tokens_per_s: float = DEFAULT_PREFILL_TOKENS_PER_S

    def __post_init__(self) -> None:
        if self.bytes_per_token < 1:
            raise ConfigError(f"bytes_per_token={self.bytes_per_token} must be >= 1")
        if not self.prefill_tokens_per_s > 0:
            raise ConfigError(f"prefill rate {self.prefill_tokens_per_s} tokens/s must be > 0")


@dataclasses.dataclass
class TierStats:
    """What one tier did over a replay."""

    tier: Tier
    num_blocks: int
    eviction: str
    admission: str
    read_gbps: float | None
    blocks_hit: int = 0        # request blocks served from this tier
    tokens_hit: int = 0
    onboard_bytes: int = 0     # read from this tier into the device
    blocks_written: int = 0    # blocks placed: G1 computes/onboards, else offloads + staging
    offload_bytes: int = 0     # = blocks_written x block bytes (SSD write volume for G3)
    offers: int = 0            # computed blocks offered to the admission policy
    rejected: int = 0          # offers the admission policy turned down
    not_onboarded_blocks: int = 0  # hits recomputed because loading would be slower
    evictions: int = 0
    ttft_saved_s: float = 0.0

    def to_dict(self, blocks_total: int, tokens_total: int) -> dict:
        return {
            "tier": self.tier.name, "medium": self.tier.medium, "capacity_blocks": self.num_blocks,
            "eviction": self.eviction, "admission": self.admission, "read_gbps": self.read_gbps,
            "blocks_hit": self.blocks_hit, "tokens_hit": self.tokens_hit,
            "block_hit_ratio": self.blocks_hit / blocks_total if blocks_total else 0.0,
            "token_hit_ratio": self.tokens_hit / tokens_total if tokens_total else 0.0,
            "onboard_bytes": self.onboard_bytes, "blocks_written": self.blocks_written,
            "offload_bytes": self.offload_bytes, "offers": self.offers, "rejected": self.rejected,
            "evictions": self.evictions, "not_onboarded_blocks": self.not_onboarded_blocks,
            "ttft_saved_s": self.ttft_saved_s,
        }


@dataclasses.dataclass
class ReplayResult:
    """Hits over all tiers (``total``), per tier, and the TTFT estimate."""

    source: str
    block_tokens: int
    block_bytes: int
    total: HitStats
    tiers: list[TierStats]
    prefill_tokens_per_s: float
    ttft_baseline_s: float     # sum over requests: prefill of the whole prompt
    ttft_saved_s: float        # sum over requests of the estimated saving

    def to_dict(self) -> dict:
        total = self.total
        n = max(1, total.num_requests)
        return {
            "trace": self.source, "requests": total.num_requests,
            "block_tokens": self.block_tokens, "block_bytes": self.block_bytes,
            **{k: v for k, v in total.to_dict().items() if k != "num_requests"},
            "tiers": [t.to_dict(total.blocks_total, total.tokens_total) for t in self.tiers],
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "mean_ttft_baseline_s": self.ttft_baseline_s / n,
            "mean_ttft_s": (self.ttft_baseline_s - self.ttft_saved_s) / n,
            "ttft_saving_ratio": (self.ttft_saved_s / self.ttft_baseline_s
                                  if self.ttft_baseline_s else 0.0),
        }


class _TierState:
    __slots__ = ("pool", "seconds_per_token", "spec", "stats")

    def __init__(self, spec: TierSpec, stats: TierStats, seconds_per_token: float) -> None:
        self.spec = spec
        self.pool: BlockPool | None = None   # G1's, the leader's, or the simulated store
        self.stats = stats
        self.seconds_per_token = seconds_per_token  # load time per token, 0 for G1


class ReplaySimulator:
    """Replays traces over a fresh set of tiers (build one simulator per replay)."""

    def __init__(self, tiers: Sequence[TierSpec], *, block_tokens: int, cost: CostModel) -> None:
        specs = sorted(tiers, key=lambda spec: spec.tier)
        if not specs or specs[0].tier != Tier.G1:
            raise ConfigError("a replay needs a device tier (G1)")
        if len({spec.tier for spec in specs}) != len(specs):
            raise ConfigError("each tier may be given once")
        if block_tokens < 1:
            raise ConfigError(f"block_tokens={block_tokens} must be >= 1")
        self.block_tokens = block_tokens
        self.cost = cost
        self.block_bytes = cost.bytes_per_token * block_tokens
        self.now_s = 0.0  # trace time, the clock of time-based policies (frequency filter)
        seconds_per_recompute = 1.0 / cost.prefill_tokens_per_s
        self._seconds_per_recompute = seconds_per_recompute
        self._tiers: list[_TierState] = []
        for spec in specs:
            admission_name = spec.admission or DEFAULT_ADMISSION[spec.tier]
            if spec.tier == Tier.G3:
                admission_name = disk_admission_policy(
                    admission_name, host_caches=any(s.tier == Tier.G2 for s in specs))
            if spec.tier == Tier.G2 and admission_name != "always":
                raise ConfigError(f"G2: admission {admission_name!r} is not supported: the "
                                  "host tier takes every block offloaded from the device")
            gbps = None if spec.tier == Tier.G1 else (spec.read_gbps
                                                     or DEFAULT_READ_GBPS[spec.tier])
            per_token = 0.0 if gbps is None else cost.bytes_per_token / (gbps * 1e9)
            stats = TierStats(spec.tier, spec.num_blocks, spec.eviction,
                              admission_name if spec.tier != Tier.G1 else "-", gbps)
            self._tiers.append(_TierState(spec, stats, per_token))
        self._by_tier = {state.spec.tier: state for state in self._tiers}
        device = self._tiers[0]
        device.pool = self._pool(device.spec)
        self._leader: Leader | None = None
        if len(self._tiers) > 1:
            self._leader = self._build_leader()
            self._workers = _ReplayWorkers(self._leader, self._by_tier.get(Tier.G4) and
                                           self._by_tier[Tier.G4].pool,
                                           {t.spec.tier: t.stats for t in self._tiers[1:]})

    def _pool(self, spec: TierSpec) -> BlockPool:
        policy = make_eviction_policy(spec.eviction, spec.num_blocks)
        set_clock = getattr(policy, "set_clock", None)
        if callable(set_clock):
            set_clock(self._clock)
        return BlockPool(spec.tier, spec.num_blocks, eviction=policy,
                         block_size=self.block_tokens)

    def _build_leader(self) -> Leader:
        """The connector's leader over the lower tiers, configured as a deployment would be,
        with the workers' measured bandwidths replaced by the cost model's."""
        specs = self._by_tier
        g2, g3, g4 = specs.get(Tier.G2), specs.get(Tier.G3), specs.get(Tier.G4)
        config = KvtierConfig(
            host_cache_blocks=g2.spec.num_blocks if g2 else 0,
            host_eviction_policy=g2.spec.eviction if g2 else "lru",
            disk_cache_blocks=g3.spec.num_blocks if g3 else 0,
            disk_eviction_policy=g3.spec.eviction if g3 else "lru",
            disk_admission=g3.stats.admission if g3 else "frequency",
            disk_dir="(replay)" if g3 else "",
            remote_url="replay://store" if g4 else "",
            remote_admission=g4.stats.admission if g4 else "always",
            onboard_mode="auto")
        leader = Leader(config, block_tokens=self.block_tokens, block_bytes=self.block_bytes,
                        max_blocks_per_request=1 << 20, clock=self._clock)
        onboard = leader.onboard
        onboard.prefill_rate = Ewma(self.cost.prefill_tokens_per_s)
        for tier in (Tier.G2, Tier.G3, Tier.G4):
            state = specs.get(tier)
            if state is not None:
                onboard.bandwidth[tier] = Ewma(self.cost.bytes_per_token
                                               / state.seconds_per_token)
        for state, manager in ((g2, leader.host), (g3, leader.disk), (g4, leader.remote)):
            if state is None:
                continue
            if manager is leader.remote:
                state.pool = self._pool(state.spec)   # the store
            else:
                state.pool = manager.pool
                set_clock = getattr(state.pool.eviction, "set_clock", None)
                if callable(set_clock):
                    set_clock(self._clock)
            if manager is not leader.host:
                manager.admission = _CountingAdmission(manager.admission, state.stats)
        return leader

    def _clock(self) -> float:
        return self.now_s

    @property
    def leader(self) -> Leader | None:
        """The connector's leader the lower tiers run in (None for a device-only replay)."""
        return self._leader

    @property
    def pools(self) -> list[BlockPool]:
        return [t.pool for t in self._tiers]

    def run(self, trace: Trace, progress: Callable[[int], None] | None = None) -> ReplayResult:
        if trace.block_tokens != self.block_tokens:
            raise ConfigError(f"trace has {trace.block_tokens} tokens per block, the simulator "
                              f"{self.block_tokens}")
        total = HitStats()
        baseline_s = saved_s = 0.0
        per_recompute = self._seconds_per_recompute
        single = len(self._tiers) == 1
        for number, request in enumerate(trace.requests):
            self.now_s = request.timestamp_ms / 1000.0
            keys = request.cacheable_ids(self.block_tokens)
            if single:
                hits = self._serve_device_only(keys)
                tokens = hits * self.block_tokens   # full blocks only: each holds them all
                saved = tokens * per_recompute
                g1 = self._tiers[0].stats
                g1.blocks_hit += hits
                g1.tokens_hit += tokens
                g1.ttft_saved_s += saved
            else:
                hits, saved = self._serve(str(number), keys, request.input_length)
            # A partial last block counts as a block that missed: it is always recomputed.
            total.add(len(request.hash_ids), hits, request.input_length, self.block_tokens)
            baseline_s += request.input_length * per_recompute
            saved_s += saved
            if progress is not None:
                progress(1)
        for state in self._tiers[1:]:  # G1 fills are computes and onboards, not offloads
            state.stats.offload_bytes = state.stats.blocks_written * self.block_bytes
            state.stats.evictions = state.pool.num_evicted
        return ReplayResult(source=trace.source, block_tokens=self.block_tokens,
                            block_bytes=self.block_bytes, total=total,
                            tiers=[t.stats for t in self._tiers],
                            prefill_tokens_per_s=self.cost.prefill_tokens_per_s,
                            ttft_baseline_s=baseline_s, ttft_saved_s=saved_s)

    # -- one tier: the policy comparison's hot path ----------------------------------------------
    def _serve_device_only(self, keys: Sequence[int]) -> int:
        device = self._tiers[0]
        held, hits = self._place_on_device(device, keys)
        held.reverse()
        device.pool.release(held)
        return hits

    # -- several tiers: the connector's own leader ----------------------------------------------
    def _serve(self, req_id: str, keys: Sequence[int], input_length: int) -> tuple[int, float]:
        leader, bt = self._leader, self.block_tokens
        tokens = range(input_length)   # stands in for the tokens: block_keys are the hashes
        g1_hits = self._tiers[0].pool.lookup(keys)
        external = leader.match(req_id, tokens, g1_hits * bt, block_keys=keys)
        while external is None:          # the disk index or a G4 probe answer is on its way
            self._workers.step()
            external = leader.match(req_id, tokens, g1_hits * bt, block_keys=keys)
        num_loaded = external // bt
        leader.begin_onboard(req_id, range(len(keys)), external)
        self._workers.step()
        failed = self._workers.failed_loads.pop(req_id, ())
        device = self._tiers[0]
        device.stats.blocks_hit += g1_hits
        g1_tokens = g1_hits * bt
        device.stats.tokens_hit += g1_tokens
        saved = g1_tokens * self._seconds_per_recompute
        device.stats.ttft_saved_s += saved
        hits = g1_hits
        for pos, tier in enumerate(leader.found_tiers(req_id)):
            if pos in failed:
                continue   # the store lost it: computed after all
            state = self._by_tier[tier]
            stats = state.stats
            stats.blocks_hit += 1
            stats.tokens_hit += bt
            hits += 1
            if pos < num_loaded:
                gain = bt * (self._seconds_per_recompute - state.seconds_per_token)
                stats.ttft_saved_s += gain
                stats.onboard_bytes += bt * self.cost.bytes_per_token
                saved += gain
            else:
                stats.not_onboarded_blocks += 1
        held, _ = self._place_on_device(device, keys, g1_hits)
        leader.progress(req_id, tokens, input_length, range(len(keys)), block_keys=keys)
        while leader.busy:
            self._workers.step()
        leader.finish(req_id)
        held.reverse()
        device.pool.release(held)
        return hits, saved

    def _place_on_device(self, device: _TierState, keys: Sequence[int],
                         num_cached: int | None = None) -> tuple[list[int], int]:
        """The device prefix cache holds the whole request: its leading cached blocks (at most
        ``num_cached``) are matched, the rest (loaded or computed) allocated; if the device is
        smaller than the request, the leading blocks that fit are kept. Returns the blocks
        held and how many were cached."""
        pool = device.pool
        held = pool.match(keys if num_cached is None else keys[:num_cached])
        num_cached = len(held)
        room = min(len(keys) - num_cached, pool.num_free + pool.num_inactive)
        if room:
            device.stats.evictions += max(0, room - pool.num_free)
            fresh = pool.allocate(room)
            pool.complete(fresh)
            held += pool.register(fresh, keys[num_cached:num_cached + room],
                                  parent=keys[num_cached - 1] if num_cached else None)
            device.stats.blocks_written += room
        return held, num_cached


class _CountingAdmission(AdmissionPolicy):
    """A tier's admission policy, with its offers and refusals counted into the tier's stats."""

    def __init__(self, policy: AdmissionPolicy, stats: TierStats) -> None:
        self.policy, self.stats = policy, stats
        self.name = policy.name

    def admit(self, key: BlockKey) -> bool:
        self.stats.offers += 1
        admitted = self.policy.admit(key)
        if not admitted:
            self.stats.rejected += 1
        return admitted


class _ReplayWorkers:
    """The workers, for a replay: every planned transfer lands at once and intact, except a
    remote read of a block the simulated store no longer holds. The store (G4) is a block pool
    of its spec's capacity and eviction policy, shared by nobody else."""

    def __init__(self, leader: Leader, store: BlockPool | None,
                 stats: dict[Tier, TierStats]) -> None:
        self.leader = leader
        self.store = store
        self.stats = stats
        self.failed_loads: dict[str, set[int]] = {}
        self._first = True

    def step(self) -> None:
        plan = self.leader.take_plan()
        # The first report carries the disk index of the previous run: none.
        report = WorkerReport(recovered=[] if self._first else None)
        self._first = False
        written = dict.fromkeys(Tier, 0)
        for op in plan.loads:
            remote = set(op.remote_idx)
            failed = [i for i, (slot, key) in enumerate(zip(op.g2_slots, op.keys))
                      if slot == NO_SLOT or i in remote and not self._get(key)]
            if failed:
                self.failed_loads[op.req_id] = set(failed)
            # Staged blocks that arrived are promoted into a caching host tier.
            written[Tier.G2] += sum(1 for i, g3 in enumerate(op.g3_slots)
                                    if (g3 != NO_SLOT or i in remote) and i not in failed)
            report.loads.append(LoadResult(op.req_id, failed, [], op_id=op.op_id))
        written[Tier.G2] += len(plan.stores)
        written[Tier.G3] = len(plan.disk_writes)
        for key in plan.remote_puts.keys:
            written[Tier.G4] += self._put(key)
        report.ops_ok.extend(plan.stores.op_ids)
        report.ops_ok.extend(plan.disk_writes.op_ids)
        report.ops_ok.extend(plan.remote_puts.op_ids)
        for op_id, keys in plan.remote_probes.items():
            present = 0
            while present < len(keys) and keys[present] in self.store:
                present += 1
            report.remote_present[op_id] = present
        for tier, stats in self.stats.items():
            stats.blocks_written += written.get(tier, 0)
        self.leader.on_report(report)

    def _get(self, key: BlockKey) -> bool:
        held = self.store.match((key,))
        self.store.release(held)
        return bool(held)

    def _put(self, key: BlockKey) -> int:
        store = self.store
        if key in store:
            return 0
        fresh = store.allocate(1)
        store.complete(fresh)
        store.release(store.register(fresh, [key]))
        return 1


def replay(trace: Trace, tiers: Sequence[TierSpec], *, cost: CostModel,
           progress: Callable[[int], None] | None = None) -> ReplayResult:
    """Replay ``trace`` over fresh ``tiers``."""
    return ReplaySimulator(tiers, block_tokens=trace.block_tokens, cost=cost).run(trace, progress)
