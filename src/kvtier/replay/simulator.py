"""Trace replay over the real per-tier block pools, eviction and admission policies.

Nothing here decides what a cache keeps: every tier is a :class:`~kvtier.pools.BlockPool`
with the eviction policy and admission policy a deployment would configure, driven through
the same calls the connector makes (``match``, ``allocate``, ``complete``, ``register``,
``release``). The simulator only decides *which* calls a request causes:

1. **Lookup, prefix semantics.** Walk the request's block keys in order; each key is served by
   the fastest tier that holds it; stop at the first key no tier holds. The blocks before it
   are hits, the rest are computed (prefill).
2. **Device (G1).** The request needs all its blocks on the device: G1 hits are matched
   (referenced), blocks served by a lower tier are onboarded (allocated and registered in G1),
   computed blocks are allocated and registered. If G1 is smaller than the request, the leading
   blocks that fit are kept.
3. **Lower tiers (G2, G3, G4), inclusive write-through.** A hit in a lower tier is matched there
   (its policy sees the hit). A block served from G3 or G4 is staged through G2 and registered
   there. Every computed block is offered to every lower tier through that tier's admission
   policy (KVBM's frequency filter for disk by default) and written if admitted. Nothing is
   written on eviction (the tiers are inclusive, so a block evicted from G1 may still be below).
4. **Release** tail-first, so a request's deepest blocks become evictable first (as vLLM does).

A single-tier replay (the policy comparison) is the same code with only G1.

Cost model (estimate): a hit served from tier ``t`` saves recomputing its tokens at
``prefill_tokens_per_s`` and costs loading its bytes at ``t``'s bandwidth; a tier slower than
recompute is not used for onboarding (the onboard-or-recompute decision), so a hit never costs
more than it saves. G1 hits cost nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

# Importing registers the extra eviction policies and the tinylfu admission policy by name.
import kvtier.offload.tinylfu
from kvtier.errors import ConfigError
from kvtier.offload.admission import AdmissionPolicy, make_admission_policy
from kvtier.pools.block_pool import BlockPool
from kvtier.pools.eviction import make_eviction_policy
from kvtier.replay.stats import HitStats
from kvtier.replay.trace import Trace
from kvtier.tiers import Tier

# Registers the extra eviction policies (and, through them, the tinylfu admission policy).
import kvtier.pools.policies  # noqa: F401  isort: skip

# Read bandwidth into the device per tier (GB/s, 10**9 bytes) when none is given: pinned host
# memory over PCIe 4/5, a datacenter NVMe SSD, a 100 Gb/s RDMA store.
DEFAULT_READ_GBPS = {Tier.G2: 25.0, Tier.G3: 3.0, Tier.G4: 10.0}
DEFAULT_PREFILL_TOKENS_PER_S = 10_000.0
DEFAULT_ADMISSION = {Tier.G1: "always", Tier.G2: "always", Tier.G3: "frequency",
                     Tier.G4: "always"}


@dataclasses.dataclass(frozen=True)
class TierSpec:
    """One simulated tier: capacity, policies and read bandwidth into the device."""

    tier: Tier
    num_blocks: int
    eviction: str = "lru"
    admission: str | None = None  # None: DEFAULT_ADMISSION; G1 always takes computed blocks
    read_gbps: float | None = None  # None: DEFAULT_READ_GBPS (G1: not read)

    def __post_init__(self) -> None:
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
    __slots__ = ("admission", "onboard", "pool", "seconds_per_token", "spec", "stats")

    def __init__(self, spec: TierSpec, pool: BlockPool, admission: AdmissionPolicy | None,
                 stats: TierStats, seconds_per_token: float, onboard: bool) -> None:
        self.spec = spec
        self.pool = pool
        self.admission = admission
        self.stats = stats
        self.seconds_per_token = seconds_per_token  # load time per token, 0 for G1
        self.onboard = onboard  # False: loading is slower than recompute, hits are recomputed


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
        self._tiers: list[_TierState] = []
        for spec in specs:
            policy = make_eviction_policy(spec.eviction, spec.num_blocks)
            set_clock = getattr(policy, "set_clock", None)
            if callable(set_clock):
                set_clock(self._clock)
            pool = BlockPool(spec.tier, spec.num_blocks, eviction=policy,
                             block_size=block_tokens)
            admission_name = spec.admission or DEFAULT_ADMISSION[spec.tier]
            admission = None
            if spec.tier != Tier.G1:
                options = {"clock": self._clock} if admission_name == "frequency" else {}
                admission = make_admission_policy(admission_name, **options)
            gbps = None if spec.tier == Tier.G1 else (spec.read_gbps
                                                     or DEFAULT_READ_GBPS[spec.tier])
            per_token = 0.0 if gbps is None else cost.bytes_per_token / (gbps * 1e9)
            stats = TierStats(spec.tier, spec.num_blocks, spec.eviction,
                              admission_name if spec.tier != Tier.G1 else "-", gbps)
            self._tiers.append(_TierState(spec, pool, admission, stats, per_token,
                                          onboard=per_token < seconds_per_recompute))
        self._host = next((t for t in self._tiers if t.spec.tier == Tier.G2), None)
        self._seconds_per_recompute = seconds_per_recompute

    def _clock(self) -> float:
        return self.now_s

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
        for request in trace.requests:
            self.now_s = request.timestamp_ms / 1000.0
            if single:
                hits = self._serve_device_only(request.hash_ids)
                saved = min(hits * self.block_tokens, request.input_length) * per_recompute
                g1 = self._tiers[0].stats
                g1.blocks_hit += hits
                g1.tokens_hit += min(hits * self.block_tokens, request.input_length)
                g1.ttft_saved_s += saved
            else:
                hits, saved = self._serve(request.hash_ids, request.input_length)
            total.add(len(request.hash_ids), hits, request.input_length, self.block_tokens)
            baseline_s += request.input_length * per_recompute
            saved_s += saved
            if progress is not None:
                progress(1)
        for state in self._tiers[1:]:  # G1 fills are computes and onboards, not offloads
            state.stats.offload_bytes = state.stats.blocks_written * self.block_bytes
        return ReplayResult(source=trace.source, block_tokens=self.block_tokens,
                            block_bytes=self.block_bytes, total=total,
                            tiers=[t.stats for t in self._tiers],
                            prefill_tokens_per_s=self.cost.prefill_tokens_per_s,
                            ttft_baseline_s=baseline_s, ttft_saved_s=saved_s)

    # -- one tier: the policy comparison's hot path ----------------------------------------------
    def _serve_device_only(self, keys: Sequence[int]) -> int:
        state = self._tiers[0]
        pool = state.pool
        held = pool.match(keys)
        hits = len(held)
        room = min(len(keys) - hits, pool.num_free + pool.num_inactive)
        if room:
            state.stats.evictions += max(0, room - pool.num_free)
            fresh = pool.allocate(room)
            pool.complete(fresh)
            held += pool.register(fresh, keys[hits:hits + room],
                                  parent=keys[hits - 1] if hits else None)
            state.stats.blocks_written += room
        held.reverse()
        pool.release(held)
        return hits

    # -- several tiers ---------------------------------------------------------------------------
    def _serve(self, keys: Sequence[int], input_length: int) -> tuple[int, float]:
        tiers = self._tiers
        block_tokens = self.block_tokens
        # 1. Which tier serves each leading key (the fastest holding it); stop at the first miss.
        sources: list[int] = []
        for key in keys:
            for idx, state in enumerate(tiers):
                if key in state.pool:
                    sources.append(idx)
                    break
            else:
                break
        hits = len(sources)
        # A hit that a too-slow tier would serve is recomputed instead, and so is everything
        # after it (the prefix must be contiguous on the device).
        usable = hits
        for pos, idx in enumerate(sources):
            if not tiers[idx].onboard:
                usable = pos
                break
        saved = 0.0
        for pos in range(hits):
            state = tiers[sources[pos]]
            tokens = min(block_tokens, input_length - pos * block_tokens)
            stats = state.stats
            stats.blocks_hit += 1
            stats.tokens_hit += tokens
            if pos < usable:
                gain = tokens * (self._seconds_per_recompute - state.seconds_per_token)
                stats.ttft_saved_s += gain
                saved += gain
                if state.seconds_per_token:
                    stats.onboard_bytes += tokens * self.cost.bytes_per_token
            else:
                stats.not_onboarded_blocks += 1

        # 2. Lower tiers see their own hits (recency/frequency), then release them.
        for idx in range(1, len(tiers)):
            run_keys = [keys[pos] for pos in range(usable) if sources[pos] == idx]
            if run_keys:
                self._touch_lower(tiers[idx], run_keys)

        # 3. The device holds the whole request: G1 hits matched, the rest allocated.
        device = tiers[0]
        held = self._place_on_device(device, keys, sources, usable)

        # 4. Staging and write-through into the lower tiers.
        computed = keys[usable:]
        for state in tiers[1:]:
            to_write: list[int] = []
            if state is self._host:
                to_write.extend(keys[pos] for pos in range(usable)
                                if tiers[sources[pos]].spec.tier > Tier.G2)
            admission = state.admission
            for key in computed:
                state.stats.offers += 1
                if admission.admit(key):
                    to_write.append(key)
                else:
                    state.stats.rejected += 1
            if to_write:
                self._write(state, to_write)

        held.reverse()
        device.pool.release(held)
        return hits, saved

    def _touch_lower(self, state: _TierState, run_keys: list[int]) -> None:
        pool = state.pool
        held: list[int] = []
        for key in run_keys:  # keys served here need not be contiguous in the request
            held += pool.match((key,))
        held.reverse()
        pool.release(held)

    def _place_on_device(self, device: _TierState, keys: Sequence[int], sources: list[int],
                         usable: int) -> list[int]:
        pool = device.pool
        held: list[int] = []
        pos, num = 0, len(keys)
        while pos < num:
            from_device = pos < usable and sources[pos] == 0
            end = pos + 1
            while end < num and (end < usable and sources[end] == 0) == from_device:
                end += 1
            if from_device:
                held += pool.match(keys[pos:end])
            else:
                room = min(end - pos, pool.num_free + pool.num_inactive)
                if room:
                    device.stats.evictions += max(0, room - pool.num_free)
                    fresh = pool.allocate(room)
                    pool.complete(fresh)
                    held += pool.register(fresh, keys[pos:pos + room],
                                          parent=keys[pos - 1] if pos else None)
                    device.stats.blocks_written += room
                if room < end - pos:
                    break  # the device is full of this request: keep the leading blocks
            pos = end
        return held

    def _write(self, state: _TierState, keys: list[int]) -> None:
        pool = state.pool
        keys = [key for key in keys if key not in pool]
        room = min(len(keys), pool.num_free + pool.num_inactive)
        if not room:
            return
        state.stats.evictions += max(0, room - pool.num_free)
        fresh = pool.allocate(room)
        pool.complete(fresh)
        held = pool.register(fresh, keys[:room])
        state.stats.blocks_written += room
        held.reverse()
        pool.release(held)


def replay(trace: Trace, tiers: Sequence[TierSpec], *, cost: CostModel,
           progress: Callable[[int], None] | None = None) -> ReplayResult:
    """Replay ``trace`` over fresh ``tiers``."""
    return ReplaySimulator(tiers, block_tokens=trace.block_tokens, cost=cost).run(trace, progress)
