"""`kvtier replay`: trace-driven capacity planning and eviction-policy comparison.

Two forms:

* tier sizing: ``kvtier replay --trace FILE --g1 2000 --g2 64GB --g3 1TB`` replays the trace
  over device, host, disk (and remote) tiers and prints per-tier hits, bytes onboarded and
  written, and the estimated TTFT saving;
* policy comparison: ``kvtier replay --trace FILE --capacities 1000,3000 --policies all``
  replays one cache tier per (policy, capacity) and Belady's optimum per capacity.

With ``--json`` the last stdout line is one JSON object; for the comparison
``{"results": [{"policy", "capacity_blocks", "block_hit_ratio", "token_hit_ratio"}, ...],
"summary": [{"capacity_blocks", "best_policy", "best_vs_lru", "best_vs_belady",
"best_vs_belady_blocks", ...}, ...]}`` (``belady`` is the prefix-hit optimum,
``belady_blocks`` textbook Belady on single blocks; see kvtier.replay.belady).
Errors (a malformed trace line, a bad size) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from kvtier.config import default_eviction_policy
from kvtier.errors import KvtierError
from kvtier.tiers import Tier

_LOWER_TIERS = (Tier.G2, Tier.G3, Tier.G4)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``replay`` subcommand to ``subparsers`` (its ``func`` is :func:`run`)."""
    p = subparsers.add_parser(
        "replay", help="replay a request trace: tier sizing and eviction policy comparison",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("input")
    src.add_argument("--trace", metavar="FILE",
                     help="Mooncake-format JSONL trace (timestamp, input_length, output_length, "
                          "hash_ids)")
    src.add_argument("--azure", metavar="CSV",
                     help="Azure LLM inference trace (TIMESTAMP,ContextTokens,GeneratedTokens), "
                          "turned into prefix sessions by kvtier.replay.azure's model (--seed "
                          "picks the sharing pattern)")
    src.add_argument("--synthetic", action="store_true",
                     help="generate a multi-round QA workload instead (see the synthetic options)")
    src.add_argument("--block-tokens", type=int, default=512,
                     help="tokens per hash block of the trace (default 512, as Mooncake's)")
    src.add_argument("--limit", type=int, default=None, metavar="N",
                     help="replay only the first N requests")
    src.add_argument("--save-trace", metavar="FILE", help="also write the replayed trace as JSONL")

    syn = p.add_argument_group("synthetic multi-round QA (with --synthetic)")
    syn.add_argument("--users", type=int, default=40)
    syn.add_argument("--rounds", type=int, default=8)
    syn.add_argument("--min-rounds", type=int, default=None,
                     help="draw each user's rounds from MIN..--rounds")
    syn.add_argument("--concurrent-users", type=int, default=10)
    syn.add_argument("--qps", type=float, default=2.0)
    syn.add_argument("--system-prompt-tokens", type=int, default=1000)
    syn.add_argument("--history-tokens", type=int, default=8000)
    syn.add_argument("--question-tokens", type=int, default=150)
    syn.add_argument("--answer-tokens", type=int, default=250)
    syn.add_argument("--jitter", type=float, default=0.0,
                     help="relative +- noise on lengths (0 <= j < 1)")
    syn.add_argument("--poisson", action="store_true", help="exponential inter-arrival times")
    syn.add_argument("--seed", type=int, default=0, help="also --azure's sharing pattern")

    cmp_ = p.add_argument_group("policy comparison")
    cmp_.add_argument("--capacities", metavar="LIST",
                      help="cache sizes, comma-separated: blocks (1000) or bytes (8GB)")
    cmp_.add_argument("--policies", default="all",
                      help="eviction policies, comma-separated names or module.Class paths, or "
                           "'all' (default); both Belady bounds are always added")

    tiers = p.add_argument_group("tier sizing")
    for tier, what in ((Tier.G1, "device"), (Tier.G2, "host RAM"), (Tier.G3, "local disk"),
                       (Tier.G4, "remote store")):
        low = tier.name.lower()
        tiers.add_argument(f"--{low}", metavar="SIZE",
                           help=f"{tier.name} ({what}) capacity: blocks or bytes (16GB)")
        tiers.add_argument(f"--{low}-policy", default=None, metavar="NAME",
                           help=f"{tier.name} eviction policy (default: the connector's, "
                                f"{default_eviction_policy(tier)})")
        if tier != Tier.G1:
            tiers.add_argument(f"--{low}-admission", default=None, metavar="NAME",
                               help=f"{tier.name} admission policy: always, frequency, tinylfu, "
                                    "never (default: frequency for G3, always otherwise)")
            tiers.add_argument(f"--{low}-gbps", type=float, default=None, metavar="GB/S",
                               help=f"{tier.name} read bandwidth into the device")

    geo = p.add_argument_group("model KV geometry (sizes in bytes, TTFT estimate)")
    geo.add_argument("--layers", type=int, default=32)
    geo.add_argument("--kv-heads", type=int, default=8)
    geo.add_argument("--head-size", type=int, default=128)
    geo.add_argument("--dtype", default="bfloat16", help="bf16, fp16, fp8, fp32, ...")
    geo.add_argument("--mla", action="store_true", help="one latent cache per layer (no K/V pair)")
    geo.add_argument("--prefill-tokens-per-s", type=float, default=10_000.0,
                     help="recompute speed used for the TTFT estimate (default 10000)")

    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="last stdout line: the result as JSON")
    out.add_argument("--plot", metavar="FILE.png",
                     help="chart of hit ratio against capacity (policy comparison)")
    out.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    """Run ``kvtier replay``; 0 on success, 2 on bad input (one line on stderr)."""
    try:
        return _run(args)
    except KvtierError as exc:
        print(f"kvtier replay: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from kvtier.errors import ConfigError
    from kvtier.replay.capacity import bytes_per_token, model_geometry, parse_capacity_list
    from kvtier.replay.simulator import CostModel

    comparing = args.capacities is not None
    sizing = any(getattr(args, t.name.lower()) is not None for t in Tier)
    if comparing == sizing:
        raise ConfigError("give --capacities (policy comparison) or --g1 [--g2 --g3 --g4] "
                          "(tier sizing), not both" if comparing else
                          "nothing to replay: give --capacities LIST (policy comparison) or "
                          "--g1 SIZE [--g2 SIZE --g3 SIZE --g4 SIZE] (tier sizing)")
    if sizing and args.g1 is None:
        raise ConfigError("--g1 (device capacity) is required for tier sizing")
    if args.plot and not comparing:
        raise ConfigError("--plot draws the policy comparison: give --capacities")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit} must be >= 1")

    geometry = model_geometry(num_layers=args.layers, num_kv_heads=args.kv_heads,
                              head_size=args.head_size, dtype=args.dtype,
                              block_tokens=args.block_tokens, kv_factor=1 if args.mla else 2)
    cost = CostModel(bytes_per_token=bytes_per_token(geometry),
                     prefill_tokens_per_s=args.prefill_tokens_per_s)
    # Check every argument before reading the trace (a typo should not wait for a big file).
    if comparing:
        from kvtier.replay.compare import compare_policies, parse_policies
        from kvtier.replay.report import comparison_table, plot_comparison

        capacities = parse_capacity_list(args.capacities, geometry.block_bytes)
        policies = parse_policies(args.policies)
    else:
        specs = _tier_specs(args, geometry.block_bytes)
    trace = _load(args)
    if args.save_trace:
        trace.write_jsonl(args.save_trace)

    if comparing:
        with _progress(args, len(trace) * len(capacities) * (len(policies) + 1)) as bar:
            rows = compare_policies(trace, capacities, policies, cost=cost,
                                    progress=bar.update if bar is not None else None,
                                    on_run=_describer(bar))
        print(f"trace: {trace.source} ({len(trace)} requests, {trace.num_block_accesses} "
              f"block accesses)")
        print(comparison_table(rows))
        if args.plot:
            plot_comparison(rows, args.plot, title=f"{trace.source} ({len(trace)} requests)",
                            block_bytes=geometry.block_bytes)
            print(f"chart: {args.plot}")
        if args.json:
            from kvtier.replay.compare import summarize

            print(json.dumps({"results": [row.to_dict() for row in rows],
                              "summary": [item.to_dict() for item in summarize(rows)]}))
        return 0

    from kvtier.replay.report import replay_table
    from kvtier.replay.simulator import replay

    with _progress(args, len(trace)) as bar:
        if bar is not None:
            bar.set_description("replay")
        result = replay(trace, specs, cost=cost, progress=bar.update if bar is not None else None)
    print(replay_table(result))
    if args.json:
        print(json.dumps(result.to_dict()))
    return 0


def _tier_specs(args: argparse.Namespace, block_bytes: int) -> list:
    from kvtier.replay.capacity import parse_capacity
    from kvtier.replay.simulator import TierSpec

    specs = []
    for tier in Tier:
        size = getattr(args, tier.name.lower())
        if size is None:
            continue
        low = tier.name.lower()
        specs.append(TierSpec(
            tier, parse_capacity(size, block_bytes, name=f"--{low}"),
            eviction=getattr(args, f"{low}_policy"),
            admission=getattr(args, f"{low}_admission", None),
            read_gbps=getattr(args, f"{low}_gbps", None)))
    _check_policy_names(specs)
    return specs


def _load(args: argparse.Namespace):
    from kvtier.errors import ConfigError

    if sum(map(bool, (args.trace, args.synthetic, args.azure))) > 1:
        raise ConfigError("give one of --trace FILE, --azure CSV or --synthetic")
    if args.azure:
        from kvtier.replay.azure import AzurePrefixSpec, load_azure_trace

        return load_azure_trace(args.azure, AzurePrefixSpec(block_tokens=args.block_tokens,
                                                            seed=args.seed), limit=args.limit)
    if args.trace:
        from kvtier.replay.trace import load_trace

        return load_trace(args.trace, block_tokens=args.block_tokens, limit=args.limit)
    if not args.synthetic:
        raise ConfigError("no input: give --trace FILE, --azure CSV or --synthetic")
    from kvtier.replay.synthetic import MultiRoundQASpec, generate_multi_round_qa

    spec = MultiRoundQASpec(
        num_users=args.users, num_rounds=args.rounds, concurrent_users=args.concurrent_users,
        qps=args.qps, system_prompt_tokens=args.system_prompt_tokens,
        history_tokens=args.history_tokens, question_tokens=args.question_tokens,
        answer_tokens=args.answer_tokens, min_rounds=args.min_rounds, jitter=args.jitter,
        poisson=args.poisson, block_tokens=args.block_tokens, seed=args.seed)
    trace = generate_multi_round_qa(spec)
    return trace.head(args.limit) if args.limit else trace


def _check_policy_names(specs) -> None:
    """Fail before replaying if a policy name is unknown (not halfway through)."""
    from kvtier.offload.admission import make_admission_policy
    from kvtier.pools.eviction import make_eviction_policy
    from kvtier.replay.simulator import DEFAULT_ADMISSION

    for spec in specs:
        make_eviction_policy(spec.eviction, 1)
        name = spec.admission or DEFAULT_ADMISSION[spec.tier]
        if spec.tier != Tier.G1 and name != "auto":
            make_admission_policy(name)


class _NoBar:
    def __enter__(self):
        return None

    def __exit__(self, *exc) -> None:
        return None


def _progress(args: argparse.Namespace, total: int):
    if not args.progress:
        return _NoBar()
    from tqdm import tqdm

    # Redraw rarely when stderr is a file or pipe (CI logs), smoothly on a terminal.
    interval = 0.1 if sys.stderr.isatty() else 5.0
    return tqdm(total=total, file=sys.stderr, unit="req", dynamic_ncols=True, leave=False,
                mininterval=interval)


def _describer(bar):
    if bar is None:
        return None

    def describe(policy: str, capacity: int) -> None:
        bar.set_description(f"{policy} @ {capacity}")

    return describe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvtier replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
