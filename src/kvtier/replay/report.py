"""Human-readable tables and the hit-ratio chart for replay results."""

from __future__ import annotations

import os
from collections.abc import Sequence

from kvtier.errors import ConfigError
from kvtier.replay.compare import BELADY, BOUNDS, ComparisonRow, summarize
from kvtier.replay.simulator import ReplayResult


def _pct(value: float) -> str:
    return f"{100 * value:6.2f} %"


def _bytes(num: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if num >= scale:
            return f"{num / scale:.2f} {unit}"
    return f"{int(num)} B"


def comparison_table(rows: Sequence[ComparisonRow], baseline: str = "lru") -> str:
    """One line per (capacity, policy): hit ratios, x baseline, fraction of Belady."""
    base = {r.capacity_blocks: r.block_hit_ratio for r in rows if r.policy == baseline}
    bound = {r.capacity_blocks: r.block_hit_ratio for r in rows if r.policy == BELADY}
    header = (f"{'capacity':>9}  {'policy':<24} {'block hit':>9} {'token hit':>9} "
              f"{'x ' + baseline:>8} {'of belady':>9}")
    lines = [header]
    for row in rows:
        ref = base.get(row.capacity_blocks)
        opt = bound.get(row.capacity_blocks)
        vs_base = f"{row.block_hit_ratio / ref:8.2f}" if ref else f"{'-':>8}"
        vs_opt = f"{row.block_hit_ratio / opt:9.2f}" if opt else f"{'-':>9}"
        lines.append(f"{row.capacity_blocks:>9}  {row.policy:<24} {_pct(row.block_hit_ratio):>9} "
                     f"{_pct(row.token_hit_ratio):>9} {vs_base} {vs_opt}")
    summary = summarize(rows, baseline)
    if summary:
        lines.append("")
        lines.append(f"{'capacity':>9}  {'best policy':<24} {'block hit':>9} "
                     f"{'best/' + baseline:>8} {'best/belady':>11} {'best/belady_blocks':>18}")
        for item in summary:
            vs_base = f"{item.vs_lru:8.2f}" if item.vs_lru is not None else f"{'-':>8}"
            lines.append(f"{item.capacity_blocks:>9}  {item.best_policy:<24} "
                         f"{_pct(item.best_hit_ratio):>9} {vs_base} {item.vs_belady:11.2f} "
                         f"{item.vs_belady_blocks:18.2f}")
    return "\n".join(lines)


def replay_table(result: ReplayResult) -> str:
    """Per-tier hits, bytes moved and the TTFT estimate of a tiered replay."""
    total = result.total
    sizes = (f"requests {total.num_requests}, blocks {total.blocks_total} of "
             f"{result.block_tokens} tokens ({_bytes(result.block_bytes)} each), "
             f"tokens {total.tokens_total}")
    header = (f"{'tier':<4} {'capacity':>18} {'eviction':<10} {'admission':<10} {'block hit':>9} "
              f"{'token hit':>9} {'onboard':>11} {'written':>11} {'rejected':>9}")
    lines = [f"trace: {result.source}", sizes, header]
    for t in result.tiers:
        capacity = f"{t.num_blocks} ({_bytes(t.num_blocks * result.block_bytes)})"
        lines.append(
            f"{t.tier.name:<4} {capacity:>18} {t.eviction:<10} {t.admission:<10} "
            f"{_pct(t.blocks_hit / max(1, total.blocks_total)):>9} "
            f"{_pct(t.tokens_hit / max(1, total.tokens_total)):>9} "
            f"{_bytes(t.onboard_bytes) if t.read_gbps else '-':>11} "
            f"{_bytes(t.offload_bytes) if t.read_gbps else '-':>11} {t.rejected:>9}")
    n = max(1, total.num_requests)
    baseline = result.ttft_baseline_s / n
    after = (result.ttft_baseline_s - result.ttft_saved_s) / n
    lines.append(f"all  block hit {_pct(total.block_hit_ratio)}, token hit "
                 f"{_pct(total.token_hit_ratio)}")
    lines.append(f"TTFT (prefill at {result.prefill_tokens_per_s:,.0f} tokens/s): mean "
                 f"{baseline * 1000:.1f} ms without cache -> {after * 1000:.1f} ms with tiers "
                 f"({_pct(result.ttft_saved_s / result.ttft_baseline_s if result.ttft_baseline_s else 0)} saved)")
    return "\n".join(lines)


def plot_comparison(rows: Sequence[ComparisonRow], path: str | os.PathLike[str], *,
                    title: str = "", block_bytes: int | None = None) -> None:
    """PNG of block hit ratio against capacity, one line per policy, the prefix Belady bound
    dashed and the single-block one (``belady_blocks``) dotted."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib: pip install 'kvtier[plot]'") from exc
    policies: list[str] = []
    for row in rows:
        if row.policy not in policies:
            policies.append(row.policy)
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for policy in policies:
        points = sorted((r.capacity_blocks, r.block_hit_ratio) for r in rows
                        if r.policy == policy)
        xs = [p[0] for p in points]
        ys = [100 * p[1] for p in points]
        style = ({"linestyle": "--" if policy == BELADY else ":", "color": "black"}
                 if policy in BOUNDS else {})
        ax.plot(xs, ys, marker="o", label=policy, **style)
    capacities = sorted({r.capacity_blocks for r in rows})
    if len(capacities) > 1 and capacities[-1] / capacities[0] >= 10:
        ax.set_xscale("log")
    xlabel = "capacity (blocks)"
    if block_bytes:
        xlabel += f", {block_bytes / 2**20:.0f} MiB each"
    ax.set_xlabel(xlabel)
    ax.set_ylabel("block hit ratio (%)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    except OSError as exc:
        raise ConfigError(f"cannot write chart {path}: {exc.strerror or exc}") from exc
    finally:
        plt.close(fig)
