"""Disk tier with nothing above it, on the real engine: how much reusable prefix it serves.

A new user's set-up: ``host_cache_gb: 0``, a disk tier, multi-turn chats (a shared system
prompt, each user's history growing turn by turn), vLLM's device prefix cache reset before
every prompt so any reuse comes from kvtier. Pass 1 runs the chats once (every later turn
could reuse its history: "first sight"); then the engine restarts on the same disk and pass 2
repeats every prompt ("exact repeats"). Run once per disk admission policy:

  auto       the default: every block when the disk is the first tier (nothing above it holds
             a first copy), KVBM's frequency filter below a caching host tier
  frequency  KVBM's filter everywhere: a block must be offered twice before it is written

Reusable tokens are counted from the prompts' token ids: per prompt, its longest common prefix
with any earlier prompt of the pass (pass 2: the whole prompt), in full blocks, short of the
last token (which the engine always computes). Served tokens are kvtier's
``kvtier_matched_tokens_total`` over every tier. Outputs are checked against vLLM alone
(``kvtier.cli.oracle``) for every run; a wrong output fails the benchmark.

Metrics (fraction of reusable prefix tokens served; ratio = auto / frequency):
  first_sight_hit_fraction   pass 1
  repeat_hit_fraction        pass 2, after the restart
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
from pathlib import Path

from kvtier.cli.demo import conversation_prompts
from kvtier.cli.oracle import compare
from kvtier.cli.tiny_model import make_tiny_llama
from kvtier.cli.vllm_job import run_job_process

BLOCK = 32
CONNECTOR = {"name": "KvtierConnector", "module": "kvtier.connectors.vllm"}
POLICIES = ("auto", "frequency")


def reusable_tokens(token_ids: list[list[int]], repeat: bool) -> int:
    """Tokens of full blocks each prompt shares with an earlier one (all of it when
    ``repeat``), short of the prompt's last token."""
    total = 0
    for i, ids in enumerate(token_ids):
        if repeat:
            shared = len(ids)
        else:
            shared = 0
            for earlier in token_ids[:i]:
                n = 0
                for a, b in zip(ids, earlier):
                    if a != b:
                        break
                    n += 1
                shared = max(shared, n)
        total += min(shared, len(ids) - 1) // BLOCK * BLOCK
    return total


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def served(result: dict) -> float:
    return sum(value for name, value in result["metrics"].items()
               if name.startswith("kvtier_matched_tokens_total"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter chats")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    users, turns = (2, 3) if args.quick else (3, 4)
    chats = conversation_prompts(num_users=users, num_turns=turns,
                                 system_words=300 if args.quick else 600,
                                 turn_words=150 if args.quick else 300, seed=5)
    prompts = [p for row in chats for p in row]  # turn by turn, users interleaved
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kvtier-admission-"))
    model = str(make_tiny_llama(work / "model"))

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model)
    token_ids = [tokenizer(p)["input_ids"] for p in prompts]
    reusable = {"first": reusable_tokens(token_ids, repeat=False),
                "repeat": reusable_tokens(token_ids, repeat=True)}

    def job(connector=None) -> dict:
        return {"model": model, "block_size": BLOCK, "max_model_len": 8192,
                "connector": connector,
                "phases": [{"prompts": prompts, "max_tokens": 8, "reset_device_cache": True}]}

    baseline = run_job_process(job(), log_path=str(work / "baseline.log"))["phases"][0]
    fractions: dict[str, dict[str, float]] = {}
    for policy in POLICIES:
        extra = {"host_cache_gb": 0, "disk_cache_gb": 1, "disk_dir": str(work / policy),
                 "disk_admission": policy, "onboard_mode": "always"}
        runs = [run_job_process(job({**CONNECTOR, "extra": {**extra, "metrics_port": free_port()}}),
                                log_path=str(work / f"{policy}-{n}.log")) for n in (1, 2)]
        first, again = runs
        for run in runs:
            verdict = compare(baseline, run["phases"][0])
            if not verdict.ok:
                print(f"{policy}: outputs differ from vLLM alone: {verdict}", file=sys.stderr)
                return 1
        fractions[policy] = {"first": served(first) / reusable["first"],
                             "repeat": served(again) / reusable["repeat"]}
        print(f"{policy:<10} first sight {fractions[policy]['first']:.3f}  "
              f"exact repeats {fractions[policy]['repeat']:.3f}  (outputs identical)")

    results = []
    for metric, key in (("first_sight_hit_fraction", "first"), ("repeat_hit_fraction", "repeat")):
        ours, base = fractions["auto"][key], fractions["frequency"][key]
        results.append({"metric": metric, "value": round(ours, 4), "unit": "fraction",
                        "baseline": "disk_admission=frequency", "baseline_value": round(base, 4),
                        "ratio": round(ours / base, 3) if base else None})
    print(f"reusable prefix tokens: {reusable['first']} on first sight, {reusable['repeat']} "
          f"on exact repeats ({len(prompts)} prompts)")
    print(json.dumps({"bench": "disk_admission", "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
