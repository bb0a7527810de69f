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

BELADY = "belady"
# "all": the policies a deployment can choose, LRU first (the baseline). FIFO is left out: it is
# a building block, never better than LRU for prefix caches.
ALL_POLICIES = ("lru", "lru_freq", "s3fifo", "arc", "tinylfu")


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
            if name not in names and name != BELADY:
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
    """Rows for every (policy, capacity) and a ``belady`` row per capacity, capacity-major."""
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
        if on_run is not None:
            on_run(BELADY, capacity)
        bound = oracle.replay(capacity, progress=progress)
        rows.append(ComparisonRow(BELADY, capacity, bound.block_hit_ratio,
                                  bound.token_hit_ratio))
    return rows
