"""Trace replay: capacity planning for the tiers and the eviction-policy comparison.

Loads Mooncake-format traces (or generates multi-round QA workloads), replays them over the
real block pools and policies, and bounds the result with Belady's offline optimum.
"""

from kvtier.replay.belady import BeladyOracle, belady_stats
from kvtier.replay.capacity import model_geometry, parse_capacity, parse_capacity_list
from kvtier.replay.compare import ALL_POLICIES, ComparisonRow, compare_policies, parse_policies
from kvtier.replay.simulator import CostModel, ReplayResult, ReplaySimulator, TierSpec, replay
from kvtier.replay.stats import HitStats
from kvtier.replay.synthetic import MultiRoundQASpec, generate_multi_round_qa
from kvtier.replay.trace import Trace, TraceRequest, load_trace, parse_trace_lines

__all__ = [
    "ALL_POLICIES",
    "BeladyOracle",
    "ComparisonRow",
    "CostModel",
    "HitStats",
    "MultiRoundQASpec",
    "ReplayResult",
    "ReplaySimulator",
    "TierSpec",
    "Trace",
    "TraceRequest",
    "belady_stats",
    "compare_policies",
    "generate_multi_round_qa",
    "load_trace",
    "model_geometry",
    "parse_capacity",
    "parse_capacity_list",
    "parse_policies",
    "parse_trace_lines",
    "replay",
]
