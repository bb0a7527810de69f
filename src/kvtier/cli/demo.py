"""`kvtier demo`: a real vLLM serving evicted conversation prefixes from kvtier's tiers.

Three engines, one after the other, on a tiny random-weight Llama (no download):
  1. vLLM alone: every turn recomputes its whole conversation (the device cache is reset
     before every prompt, as if it were too small to keep the conversations);
  2. vLLM + kvtier (host + disk tiers under a temp dir) on all turns but the last: turns
     reload their history from the host tier (G2);
  3. a new vLLM + kvtier process on the last turn: the host tier died with the old process,
     the histories load from the disk tier (G3).
It prints TTFT per turn for each, tokens served per tier, whether outputs are identical (greedy
tokens, and every token's logprob within the tolerance of ``kvtier.cli.oracle``, in float32),
and writes a PNG chart of TTFT per turn. It exits non-zero only when the outputs differ.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

from kvtier.cli.oracle import compare, join
from kvtier.cli.tiny_model import make_tiny_llama, random_words
from kvtier.cli.vllm_job import run_job_process


def conversation_prompts(num_users: int, num_turns: int, system_words: int,
                         turn_words: int | list[int], seed: int = 0) -> list[list[str]]:
    """prompts[turn][user]: a shared system prompt, then each user's growing history
    (``turn_words`` new words per turn, or a list with one count per turn)."""
    rng = random.Random(seed)
    if isinstance(turn_words, int):
        turn_words = [turn_words] * num_turns
    system = random_words(rng, system_words)
    histories = [system] * num_users
    prompts = []
    for turn in range(num_turns):
        row = []
        for u in range(num_users):
            histories[u] = f"{histories[u]} {random_words(rng, turn_words[turn])}"
            row.append(histories[u])
            # The assistant's reply joins the history for the next turn.
            histories[u] = f"{histories[u]} {random_words(rng, 32)}"
        prompts.append(row)
    return prompts


def build_parser(sub) -> None:
    p = sub.add_parser("demo", help="run vLLM with and without kvtier on a multi-turn chat")
    p.add_argument("--users", type=int, default=3)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-words", type=int, default=2048)
    p.add_argument("--turn-words", type=int, default=512, help="new user words per turn")
    p.add_argument("--workdir", default=None, help="keep files here (default: a temp dir)")
    p.add_argument("--chart", default="kvtier-demo.png")
    p.add_argument("--json", action="store_true", help="print the results as JSON too")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kvtier-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log = str(workdir / "engines.log")
    model = str(make_tiny_llama(workdir / "tiny-llama"))
    prompts = conversation_prompts(args.users, args.turns, args.system_words, args.turn_words)
    flat = [p for row in prompts for p in row]
    longest = max(len(p.split()) for p in flat)
    max_len = 1024 * (longest // 1024 + 2)
    base_job = {"model": model, "block_size": 32, "max_model_len": max_len, "kv_cache_gb": 1,
                "phases": [{"prompts": flat, "max_tokens": 8, "reset_device_cache": True}]}
    kvtier_extra = {"host_cache_gb": 1, "disk_cache_gb": 2, "disk_dir": str(workdir / "disk"),
                    "disk_admission": "always"}

    def kvtier_job(turn_prompts: list[str]) -> dict:
        extra = {**kvtier_extra, "metrics_port": _free_port()}
        return {**base_job, "connector": {"name": "KvtierConnector",
                                          "module": "kvtier.connectors.vllm", "extra": extra},
                "phases": [{"prompts": turn_prompts, "max_tokens": 8,
                            "reset_device_cache": True}]}

    early = [p for row in prompts[:-1] for p in row]
    runs = [("vLLM alone (recompute)", base_job),
            (f"vLLM + kvtier, turns 1..{len(prompts) - 1}", kvtier_job(early)),
            # A new engine process: its host tier is empty, the histories are on disk.
            ("kvtier after a restart, last turn", kvtier_job(prompts[-1]))]
    results = []
    print(f"kvtier demo: {args.users} conversations x {args.turns} turns, prompts up to "
          f"{longest} tokens; engines log to {log}", flush=True)
    with tqdm(total=len(runs), desc="engines", unit="engine", file=sys.stderr) as bar:
        for name, job in runs:
            bar.set_postfix_str(name)
            results.append(run_job_process(job, log_path=log))
            bar.update(1)

    base, tiered, restarted = (r["phases"][0] for r in results)
    kv_ttft = tiered["ttft_s"] + restarted["ttft_s"]
    verdict = compare(base, join([tiered, restarted]))
    print()
    print(_table(prompts, base["ttft_s"], kv_ttft))
    print()
    print(_served(results[1].get("metrics", {}), results[2].get("metrics", {})))
    n_first, n_last = len(prompts[0]), len(prompts[-1])
    middle = slice(n_first, len(flat) - n_last)
    speedup_g2 = (statistics.median(base["ttft_s"][middle])
                  / statistics.median(kv_ttft[middle])) if len(prompts) > 2 else float("nan")
    speedup_g3 = (statistics.median(base["ttft_s"][-n_last:])
                  / statistics.median(restarted["ttft_s"]))
    print()
    print(f"median TTFT speed-up: {speedup_g2:.1f}x on turns 2..{len(prompts) - 1} (host tier), "
          f"{speedup_g3:.1f}x on turn {len(prompts)} after a restart (disk tier)")
    print(f"outputs identical: {'yes' if verdict.ok else 'NO'} ({verdict})")
    chart = _chart(args.chart, prompts, base["ttft_s"], kv_ttft)
    if chart:
        print(f"chart: {chart}")
    if args.json:
        print(json.dumps({"identical": verdict.ok,
                          "max_logprob_diff": verdict.max_logprob_diff, "speedup_g2": speedup_g2,
                          "speedup_g3": speedup_g3, "results": results}))
    return 0 if verdict.ok else 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _table(prompts, base, kvtier) -> str:
    users, last = len(prompts[0]), len(prompts) - 1
    rows = [(f"{'turn':>4} {'user':>4} {'prompt tokens':>13} {'TTFT vLLM':>10} "
             f"{'TTFT kvtier':>11}  history from")]
    for t, row in enumerate(prompts):
        for u, p in enumerate(row):
            i = t * users + u
            source = ("disk (G3), after a restart" if t == last
                      else "-" if t == 0 and u == 0 else "host (G2)")
            rows.append(f"{t + 1:>4} {u + 1:>4} {len(p.split()):>13} {base[i] * 1000:7.0f} ms "
                        f"{kvtier[i] * 1000:8.0f} ms  {source}")
    return "\n".join(rows)


def _served(tiered_metrics: dict, restart_metrics: dict) -> str:
    def tokens(metrics, tier):
        return int(metrics.get(f'kvtier_matched_tokens_total{{tier="{tier}"}}', 0))

    return ("tokens served by kvtier: "
            f"host (G2) {tokens(tiered_metrics, 'G2')}, disk (G3) {tokens(tiered_metrics, 'G3')}"
            f"; after the restart: disk (G3) {tokens(restart_metrics, 'G3')}, host (G2) "
            f"{tokens(restart_metrics, 'G2')} (blocks shared by several conversations are "
            "promoted to G2 by their first load)")


def _chart(path: str, prompts, base, kvtier) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no chart; pip install 'kvtier[plot]')")
        return None
    users = len(prompts[0])
    turns = list(range(1, len(prompts) + 1))

    def per_turn(values):
        return [statistics.median(values[t * users:(t + 1) * users]) * 1000
                for t in range(len(prompts))]

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(turns, per_turn(base), "o-", label="vLLM alone (recompute)")
    kv = per_turn(kvtier)
    ax.plot(turns[:-1], kv[:-1], "s-", color="tab:green", label="vLLM + kvtier (host tier)")
    ax.plot(turns[-1:], kv[-1:], "D", color="tab:red",
            label="vLLM + kvtier after a restart (disk tier)")
    ax.set_xlabel("conversation turn")
    ax.set_ylabel("median TTFT (ms)")
    ax.set_xticks(turns)
    ax.set_ylim(bottom=0)
    ax.set_title("Time to first token, tiny Llama on vLLM (CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
