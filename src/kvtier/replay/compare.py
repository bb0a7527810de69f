"""Policy comparison: one cache tier per (policy, capacity), plus Belady's bound per capacity."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from kvtier.errors import ConfigError
from kvtier.pools.eviction import eviction_policy_names, make_eviction_policy
from kvtier.replay.belady import BeladyOracle
from kvtier.replay.simulator import CostModel, TierSpec, replay
from kvtier.replay.trace import Trace
from kvtier.tiers import Tier

BELADY = "belady"                # offline optimum of prefix hits (see replay.belady)
BELADY_BLOCKS = "belady_blocks"  # textbook Belady, every cached block access a hit
BOUNDS = (BELADY, BELADY_BLOCKS)
# "all": the policies a deployment can choose, LRU first (the baseline). FIFO is left out: it is
# a building block, never better than LRU for prefix caches.
ALL_POLICIES = ("lru", "lru_freq", "s3fifo", "arc", "tinylfu", "prefix_lru", "prefix_gdsf",
                "prefix_learned", "prefix_reuse", "dueling")


@dataclasses.dataclass(frozen=True)
class ComparisonRow:
    policy: str
    capacity_blocks: int
    block_hit_ratio: float
    token_hit_ratio: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_policies(text: str) -> list[str]:
    """``"lru,arc"`` or ``"all"`` (may be mixed: ``"all,my.module.Policy"``); order kept, no
    duplicates; ``belady`` is always added by the comparison and may be named."""
    names: list[str] = []
    for item in (part.strip() for part in str(text).split(",")):
        if not item:
            continue
        expanded = ALL_POLICIES if item == "all" else (item,)
        for name in expanded:
            if name not in names and name not in BOUNDS:
                names.append(name)
    if not names and BELADY not in str(text):
        raise ConfigError(f"policies={text!r}: name at least one policy, or 'all'")
    known = set(eviction_policy_names())
    for name in names:
        if name not in known and "." not in name:
            raise ConfigError(f"policy {name!r} is not known: use one of "
                              f"{', '.join(sorted(known | {'all'}))} or a 'module.Class' path")
        make_eviction_policy(name, 1)  # imports a dotted path now, not after hours of replay
    return names


def compare_policies(trace: Trace, capacities: Sequence[int], policies: Sequence[str], *,
                     cost: CostModel, progress: Callable[[int], None] | None = None,
                     on_run: Callable[[str, int], None] | None = None) -> list[ComparisonRow]:
    """Rows for every (policy, capacity) and the two Belady rows (``belady``,
    ``belady_blocks``) per capacity, capacity-major."""
    oracle = BeladyOracle(trace)
    rows: list[ComparisonRow] = []
    for capacity in capacities:
        for policy in policies:
            if on_run is not None:
                on_run(policy, capacity)
            result = replay(trace, [TierSpec(Tier.G1, capacity, eviction=policy)], cost=cost,
                            progress=progress)
            rows.append(ComparisonRow(policy, capacity, result.total.block_hit_ratio,
                                      result.total.token_hit_ratio))
        for name in BOUNDS:
            if on_run is not None:
                on_run(name, capacity)
            bound = oracle.replay(capacity, progress=progress, prefix=name == BELADY)
            rows.append(ComparisonRow(name, capacity, bound.block_hit_ratio,
                                      bound.token_hit_ratio))
    return rows


@dataclasses.dataclass(frozen=True)
class CapacitySummary:
    """The best online policy at one capacity against LRU and both offline bounds."""

    capacity_blocks: int
    best_policy: str
    best_hit_ratio: float
    lru_hit_ratio: float | None
    belady_hit_ratio: float
    belady_blocks_hit_ratio: float

    @property
    def vs_lru(self) -> float | None:
        if self.lru_hit_ratio is None:
            return None
        return self.best_hit_ratio / self.lru_hit_ratio if self.lru_hit_ratio else 1.0

    @property
    def vs_belady(self) -> float:
        return self.best_hit_ratio / self.belady_hit_ratio if self.belady_hit_ratio else 1.0

    @property
    def vs_belady_blocks(self) -> float:
        return (self.best_hit_ratio / self.belady_blocks_hit_ratio
                if self.belady_blocks_hit_ratio else 1.0)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "best_vs_lru": self.vs_lru,
                "best_vs_belady": self.vs_belady,
                "best_vs_belady_blocks": self.vs_belady_blocks}


def summarize(rows: Sequence[ComparisonRow], baseline: str = "lru") -> list[CapacitySummary]:
    """Per capacity, in order: the online policy with the highest block hit ratio (the first
    listed wins a tie, so LRU when nothing beats it) and its ratios to LRU and the bounds."""
    out: list[CapacitySummary] = []
    for capacity in dict.fromkeys(r.capacity_blocks for r in rows):
        here = [r for r in rows if r.capacity_blocks == capacity]
        online = [r for r in here if r.policy not in BOUNDS]
        if not online:
            continue
        best = max(online, key=lambda r: r.block_hit_ratio)  # max keeps the first of equals
        by_name = {r.policy: r.block_hit_ratio for r in here}
        out.append(CapacitySummary(capacity, best.policy, best.block_hit_ratio,
                                   by_name.get(baseline), by_name.get(BELADY, 0.0),
                                   by_name.get(BELADY_BLOCKS, 0.0)))
    return out
