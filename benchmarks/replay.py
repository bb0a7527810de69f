"""Replay benchmark: the best eviction policy against LRU and Belady, and replay speed.

Claims measured (on the Mooncake FAST'25 conversation trace, 512-token blocks):
  * ``arc`` block hit ratio / LRU's at 1,000 / 3,000 / 6,000 / 24,000 blocks (target >= 1.3x at
    1,000 and 3,000, never below 1.0), and its fraction of Belady's optimum;
  * replaying the whole trace at one capacity through the real BlockPool takes well under 20 s;
    the baseline is a bare OrderedDict LRU (the data README's 40-line sanity script), so the
    ratio is the cost of driving the real pool and policies instead of a toy cache.

Prints a table, then one JSON object as the last stdout line.
Usage: python benchmarks/replay.py [--quick] [--trace FILE] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from kvtier.replay import BeladyOracle, CostModel, TierSpec, load_trace, replay
from kvtier.tiers import Tier
from need import data_dir  # ../shared/data beside the repository, or $TEST_DATA_DIR

DEFAULT_TRACE = str(data_dir() / "mooncake_fast25" / "conversation_trace.jsonl")
BEST = "arc"


def bare_lru_hits(trace, capacity: int) -> int:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for request in trace.requests:
        keys = request.hash_ids
        k = 0
        while k < len(keys) and keys[k] in cache:
            k += 1
        hits += k
        for key in reversed(keys):
            cache[key] = None
            cache.move_to_end(key)
        while len(cache) > capacity:
            cache.popitem(last=False)
    return hits


def timed(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default=DEFAULT_TRACE)
    parser.add_argument("--quick", action="store_true",
                        help="first 3,000 requests, two capacities, one timing run")
    parser.add_argument("--repeat", type=int, default=3, help="timing runs (median)")
    args = parser.parse_args()

    trace = load_trace(args.trace, limit=3000 if args.quick else None)
    capacities = (250, 1000) if args.quick else (1000, 3000, 6000, 24000)
    repeat = 1 if args.quick else args.repeat
    cost = CostModel(bytes_per_token=131072)
    oracle = BeladyOracle(trace)

    results = []
    print(f"trace {trace.source}: {len(trace)} requests, {trace.num_block_accesses} block "
          "accesses")
    print(f"{'capacity':>9} {'lru':>8} {BEST:>8} {'belady':>8} {'x lru':>7} {'of belady':>9}")
    for capacity in capacities:
        lru = replay(trace, [TierSpec(Tier.G1, capacity)], cost=cost).total.block_hit_ratio
        best = replay(trace, [TierSpec(Tier.G1, capacity, eviction=BEST)],
                      cost=cost).total.block_hit_ratio
        bound = oracle.replay(capacity).block_hit_ratio
        print(f"{capacity:>9} {100 * lru:7.2f}% {100 * best:7.2f}% {100 * bound:7.2f}% "
              f"{best / lru:7.2f} {best / bound:9.2f}")
        results.append({"metric": f"block_hit_ratio_{BEST}_{capacity}", "value": best,
                        "unit": "ratio", "baseline": f"lru_{capacity}", "baseline_value": lru,
                        "ratio": best / lru})
        results.append({"metric": f"block_hit_ratio_{BEST}_{capacity}_vs_optimum", "value": best,
                        "unit": "ratio", "baseline": f"belady_{capacity}",
                        "baseline_value": bound, "ratio": best / bound})

    capacity = capacities[0]
    pool_s, pool_result = timed(
        lambda: replay(trace, [TierSpec(Tier.G1, capacity)], cost=cost), repeat)
    bare_s, bare_hits = timed(lambda: bare_lru_hits(trace, capacity), repeat)
    print(f"replay at {capacity} blocks, LRU: real pool {pool_s:.2f} s, bare OrderedDict "
          f"{bare_s:.2f} s (median of {repeat}); hits {pool_result.total.blocks_hit} vs "
          f"{bare_hits}")
    results.append({"metric": f"replay_seconds_lru_{capacity}", "value": pool_s, "unit": "s",
                    "baseline": "bare_ordereddict_lru", "baseline_value": bare_s,
                    "ratio": pool_s / bare_s})
    print(json.dumps({"bench": "replay", "results": results}))


if __name__ == "__main__":
    main()
