"""Disk admission benchmark: ``adaptive`` against the better of ``frequency`` and ``always``.

Each run drives the connector's own Leader through the tiered replay (kvtier.replay): G1 (LRU,
as vLLM's prefix cache), optionally a caching host tier (G2), and the disk tier (G3) whose
admission policy varies. Traces (512-token blocks):
  * ``mooncake``: the Mooncake FAST'25 conversation trace, G1 1,000 blocks, G3 6,000 / 24,000 /
    100,000 blocks. ``adaptive``'s constants were chosen on it (marked ``tuned``);
  * ``azure_conv_s1`` / ``azure_code_s2``: the Azure 2023 traces as prefix sessions
    (kvtier.replay.azure, seeds 1 and 2), and ``synthetic_private_s3``: multi-round QA without
    a shared prompt (kvtier.replay.synthetic, seed 3). G1 at 1 % of the working set (unique full
    blocks), G3 at 3 %, 10 % and 30 %.
Each with no host tier and with G2 at 3 % of the working set (Mooncake: 2,000 blocks).

Metric per run: ``adaptive``'s total block hit ratio; baseline: the better of ``frequency`` and
``always`` on the same run (named in ``baseline``); ratio = adaptive / that. The summary
metrics are the lowest and the mean ratio over the held-out runs.
--quick: Mooncake at 6,000 and 24,000 without G2, azure_code_s2 at 3 % and 10 % with G2.

Prints a table, then one JSON object as the last stdout line.
Usage: python benchmarks/admission.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from kvtier.replay import (
    CostModel,
    MultiRoundQASpec,
    TierSpec,
    generate_multi_round_qa,
    load_trace,
    replay,
)
from kvtier.replay.azure import AzurePrefixSpec, load_azure_trace
from kvtier.tiers import Tier
from need import data_dir  # ../shared/data beside the repository, or $TEST_DATA_DIR

POLICIES = ("frequency", "always", "adaptive")
COST = CostModel(bytes_per_token=131072)
FRACTIONS = (0.03, 0.1, 0.3)


def runs(quick: bool):
    """(trace name, tuned on it, trace, g1 blocks, [(g2 blocks or 0, g3 blocks), ...])."""
    data = data_dir()
    mooncake = load_trace(data / "mooncake_fast25" / "conversation_trace.jsonl")
    if quick:
        yield "mooncake", True, mooncake, 1000, [(0, 6000), (0, 24000)]
    else:
        yield "mooncake", True, mooncake, 1000, [(g2, g3) for g2 in (0, 2000)
                                                for g3 in (6000, 24000, 100000)]
    azure = data / "azure_llm_2023"
    held_out = [("azure_code_s2", load_azure_trace(azure / "AzureLLMInferenceTrace_code.csv",
                                                   AzurePrefixSpec(seed=2)))]
    if not quick:
        held_out.append(("azure_conv_s1", load_azure_trace(
            azure / "AzureLLMInferenceTrace_conv.csv", AzurePrefixSpec(seed=1))))
        held_out.append(("synthetic_private_s3", generate_multi_round_qa(MultiRoundQASpec(
            num_users=200, num_rounds=8, seed=3, concurrent_users=30, system_prompt_tokens=0,
            poisson=True, jitter=0.5, min_rounds=2))))
    for name, trace in held_out:
        unique = trace.num_cacheable_blocks
        longest = trace.longest_cacheable
        def size(fraction: float, longest=longest, unique=unique) -> int:
            return max(longest, round(unique * fraction))
        g2s = (size(0.03),) if quick else (0, size(0.03))
        fractions = (0.03, 0.1) if quick else FRACTIONS
        yield name, False, trace, size(0.01), [(g2, size(f)) for g2 in g2s for f in fractions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="four runs (see above)")
    args = parser.parse_args()
    results, held_out_ratios = [], []
    print(f"{'trace':<22} {'G1':>6} {'G2':>6} {'G3':>7}  " + " ".join(f"{p:>9}" for p in POLICIES)
          + "  adaptive/best")
    for name, tuned, trace, g1, sizes in runs(args.quick):
        for g2, g3 in sizes:
            hit = {}
            for policy in POLICIES:
                tiers = [TierSpec(Tier.G1, g1)]
                if g2:
                    tiers.append(TierSpec(Tier.G2, g2))
                tiers.append(TierSpec(Tier.G3, g3, admission=policy))
                hit[policy] = replay(trace, tiers, cost=COST).total.block_hit_ratio
            best = max(("frequency", "always"), key=hit.get)
            ratio = hit["adaptive"] / hit[best] if hit[best] else 1.0
            if not tuned:
                held_out_ratios.append(ratio)
            print(f"{name:<22} {g1:>6} {g2:>6} {g3:>7}  "
                  + " ".join(f"{100 * hit[p]:8.2f}%" for p in POLICIES) + f"  {ratio:.3f}")
            results.append({"metric": f"adaptive_block_hit_ratio_{name}_g1_{g1}_g2_{g2}_g3_{g3}"
                                      + ("_tuned" if tuned else ""),
                            "value": hit["adaptive"], "unit": "ratio",
                            "baseline": f"best of frequency/always ({best})",
                            "baseline_value": hit[best], "ratio": ratio})
    results.append({"metric": "adaptive_vs_best_held_out_min", "value": min(held_out_ratios),
                    "unit": "ratio", "baseline": "best of frequency/always", "baseline_value": 1.0,
                    "ratio": min(held_out_ratios)})
    mean = statistics.fmean(held_out_ratios)
    results.append({"metric": "adaptive_vs_best_held_out_mean", "value": mean, "unit": "ratio",
                    "baseline": "best of frequency/always", "baseline_value": 1.0, "ratio": mean})
    print(json.dumps({"bench": "admission", "results": results}))


if __name__ == "__main__":
    main()
