"""TTFT of a repeated 8k-token prefix after device eviction, on the CPU build of vLLM.

Engines (each in its own process, tiny random-weight Llama, device prefix cache reset before
every prompt so reuse must come from the connector):
  recompute           vLLM alone
  example_connector   vLLM's built-in ExampleConnector (safetensors files on disk)
  kvtier G2           host + disk tiers: P stored, then repeated (G2 hits)
  kvtier G3           a restarted engine without a host tier on the same disk: P repeated
                      (G3 hits)
Also the scheduler-side time kvtier adds per request per step, measured on vLLM's real
Scheduler with and without the connector (no model).

Metrics: g2_hit_vs_recompute, g3_hit_vs_recompute, g3_vs_example_connector (ratio = the
other's TTFT / kvtier's TTFT) and sched_overhead_us (value).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from kvtier.cli.tiny_model import make_tiny_llama, random_words
from kvtier.cli.vllm_job import run_job_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ttft_jobs(model: str, workdir: Path, tokens: int, repeats: int) -> dict[str, float]:
    rng = random.Random(0)
    p = random_words(rng, tokens)
    base = {"model": model, "block_size": 32, "max_model_len": tokens + 2048}
    blocks = tokens // 32

    def phase(prompts):
        return {"prompts": prompts, "max_tokens": 1, "reset_device_cache": True}

    log = str(workdir / "engines.log")
    recompute = run_job_process({**base, "phases": [phase([p]), phase([p] * repeats)]},
                                log_path=log)
    example = run_job_process({**base, "connector": {
        "name": "ExampleConnector", "extra": {"shared_storage_path": str(workdir / "example")}},
        "phases": [phase([p]), phase([p] * repeats)]}, log_path=log)
    kvtier = {"name": "KvtierConnector", "module": "kvtier.connectors.vllm"}
    disk = {"disk_cache_blocks": 4 * blocks, "disk_dir": str(workdir / "g3"),
            "disk_admission": "always"}
    # Host + disk: P stored, then repeated (G2 hits).
    host_run = run_job_process({**base, "connector": {**kvtier, "extra": {
        "host_cache_blocks": 4 * blocks, **disk, "metrics_port": free_port()}},
        "phases": [phase([p]), phase([p] * repeats)]}, log_path=log)
    # A restarted engine without a host cache: P comes from the disk tier alone (G3 hits).
    disk_run = run_job_process({**base, "connector": {**kvtier, "extra": {
        **disk, "metrics_port": free_port()}},
        "phases": [phase([p] * repeats)]}, log_path=log)
    g2 = host_run["phases"][1]["ttft_s"]
    # The restarted engine's first request also waits for the disk index: not a steady hit.
    g3 = disk_run["phases"][0]["ttft_s"][1:]
    served = {f"{name}:{k}": v for name, run in (("host_run", host_run), ("disk_run", disk_run))
              for k, v in run.get("metrics", {}).items() if "matched_tokens" in k}
    return {"recompute": statistics.median(recompute["phases"][1]["ttft_s"]),
            "example_connector": statistics.median(example["phases"][1]["ttft_s"]),
            "kvtier_g2": statistics.median(g2), "kvtier_g3": statistics.median(g3),
            "served": served}


_SCHEDULER_HOOKS = ("get_num_new_matched_tokens", "update_state_after_alloc",
                    "build_connector_meta", "update_connector_output", "request_finished",
                    "take_events")


def sched_overhead_us(model: str, num_requests: int, steps: int) -> tuple[float, float]:
    """(us kvtier's scheduler-side hooks take per request per step, us vLLM's scheduler step
    takes per request without a connector), on vLLM's real Scheduler driving decode steps of
    ``num_requests`` requests (no model). The hooks are timed directly, so the figure is what
    kvtier adds, not the noise of two separate runs."""
    from sched_harness import make_harness

    def run(extra):
        h = make_harness(model, extra, num_blocks=4096, max_num_seqs=num_requests)
        rng = random.Random(1)
        for i in range(num_requests):
            h.add(f"r{i}", [rng.randint(3, 1000) for _ in range(512)], max_tokens=steps + 64)
        for _ in range(4):     # prefill and warm up
            h.step()
        spent = [0.0]
        connector = h.scheduler.connector
        for name in _SCHEDULER_HOOKS if connector is not None else ():
            setattr(connector, name, _timed(getattr(connector, name), spent))
        started = time.perf_counter()
        for _ in range(steps):
            h.step()
        total = time.perf_counter() - started
        per_request_step = 1e6 / (steps * num_requests)
        return spent[0] * per_request_step, total * per_request_step

    hooks_us = statistics.median(run({"host_cache_blocks": 8192})[0] for _ in range(3))
    plain_us = statistics.median(run(None)[1] for _ in range(3))
    return hooks_us, plain_us


def _timed(fn, spent: list[float]):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t0
    return wrapper


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    repeats = 3 if args.quick else 6
    workdir = Path(tempfile.mkdtemp(prefix="kvtier-e2e-"))
    model = str(make_tiny_llama(workdir / "tiny"))
    t = ttft_jobs(model, workdir, args.tokens - 256, repeats)
    overhead, plain = sched_overhead_us(model, 32, 20 if args.quick else 100)
    print(f"{'path':<28}{'median TTFT':>14}")
    for name in ("recompute", "example_connector", "kvtier_g2", "kvtier_g3"):
        print(f"{name:<28}{t[name] * 1000:>11.1f} ms")
    print(f"tokens served: {t['served']}")
    print(f"kvtier's scheduler hooks: {overhead:.1f} us per request per step (vLLM's own "
          f"scheduler step: {plain:.1f} us per request)")
    results = [
        _ratio("g2_hit_vs_recompute", t["recompute"], t["kvtier_g2"], "recompute"),
        _ratio("g3_hit_vs_recompute", t["recompute"], t["kvtier_g3"], "recompute"),
        _ratio("g3_vs_example_connector", t["example_connector"], t["kvtier_g3"],
               "example_connector"),
        {"metric": "sched_overhead_us", "value": round(overhead, 2), "unit": "us",
         "baseline": "vllm_scheduler_step_per_request", "baseline_value": round(plain, 2),
         "ratio": round(overhead / plain, 3) if plain else None},
    ]
    print(json.dumps({"bench": "e2e_ttft", "results": results}))
    return 0


def _ratio(metric: str, other_s: float, ours_s: float, baseline: str) -> dict:
    return {"metric": metric, "value": round(ours_s * 1000, 2), "unit": "ms_ttft",
            "baseline": baseline, "baseline_value": round(other_s * 1000, 2),
            "ratio": round(other_s / ours_s, 2)}


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
