"""Run one vLLM engine on a job and print its results as JSON (last stdout line).

Each job runs in its own process, so an engine's start and end are real (a "restart" is a
new job on the same disk_dir). Used by ``kvtier demo``, the end-to-end benchmark and tests.

Job (JSON file or string)::

    {"model": DIR, "block_size": 32, "max_model_len": 10240, "kv_cache_gb": 1,
     "dtype": "float32",                     # compare runs in float32 (ENVIRONMENT.md 4a)
     "tensor_parallel_size": 1,              # > 1: one worker process per rank, each bound
                                             # to its own core (VLLM_CPU_OMP_THREADS_BIND
                                             # "0|1|...", unless already set)
     "connector": null | {"name": "KvtierConnector", "module": "kvtier.connectors.vllm",
                          "extra": {...kv_connector_extra_config...}},
     "faults": null | "point:kind:opt=v,...",  # kvtier.storage.faults.arm_spec, for the
                                             # negative controls (runs the engine in-process;
                                             # refused with tensor_parallel_size > 1, whose
                                             # workers are processes of their own)
     "phases": [{"prompts": [str, ...], "max_tokens": 8,
                 "reset_device_cache": true, # reset vLLM's prefix cache before each prompt
                 "batch": false,             # true: all prompts in one generate() call
                 "pause_s": 0}]}             # sleep before the phase (lets asynchronous
                                             # transfers land before a short last phase)

Result: {"phases": [{"outputs": [[ids]], "logprobs": [[lp]], "margins": [[lp1 - lp2]],
                     "ttft_s": [s], "wall_s": s}],
         "init_s": s, "metrics": {name: value}, "faults_fired": n}

``logprobs`` holds the logprob of every generated token, ``margins`` how far the chosen token
led the runner-up at that step (what ``kvtier.cli.oracle`` needs to tell a near-tie from a
wrong token).
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request


def make_llm(job: dict):
    """The engine every real-engine check runs: ``job``'s model, connector and sizes, float32
    by default, vLLM's prefix cache on, eager mode, seed 0."""
    from vllm import LLM
    from vllm.config import KVTransferConfig

    connector = job.get("connector")
    kv_transfer = None
    if connector:
        kv_transfer = KVTransferConfig(kv_connector=connector["name"],
                                       kv_connector_module_path=connector.get("module"),
                                       kv_role="kv_both",
                                       kv_connector_extra_config=connector.get("extra", {}))
    tp = int(job.get("tensor_parallel_size", 1))
    return LLM(model=job["model"], dtype=job.get("dtype", "float32"),
               block_size=job.get("block_size", 32),
               max_model_len=job.get("max_model_len", 10240),
               max_num_batched_tokens=job.get("max_num_batched_tokens",
                                              job.get("max_model_len", 10240)),
               enable_prefix_caching=True, enforce_eager=True, disable_log_stats=False,
               seed=0, kv_transfer_config=kv_transfer,
               **({"tensor_parallel_size": tp} if tp > 1 else {}))


def run_job(job: dict) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(job.get("kv_cache_gb", 1))
    fault_spec = job.get("faults")
    tp = int(job.get("tensor_parallel_size", 1))
    if tp > 1:
        if fault_spec:
            # Faults are armed by a call in one process; with several ranks the workers are
            # vLLM's own processes, where that call never runs.
            raise ValueError("faults cannot be armed with tensor_parallel_size > 1: the "
                             "workers run in processes of their own")
        # The CPU build binds each rank's OpenMP threads to cores; without a binding it
        # refuses to start ranks (ENVIRONMENT.md 4a). One core per rank.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(map(str, range(tp))))
    if fault_spec:
        # Faults are armed by a call in the process that runs the worker: keep the engine
        # core in this process instead of vLLM's spawned one.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import SamplingParams

    from kvtier.storage import faults

    if fault_spec:
        faults.arm_spec(fault_spec)

    started = time.perf_counter()
    llm = make_llm(job)
    result: dict = {"init_s": time.perf_counter() - started, "phases": []}
    for phase in job["phases"]:
        params = SamplingParams(max_tokens=phase.get("max_tokens", 8), temperature=0.0,
                                ignore_eos=True, logprobs=2)
        if phase.get("pause_s"):
            time.sleep(float(phase["pause_s"]))
        outputs, logprobs, margins, ttfts = [], [], [], []
        phase_started = time.perf_counter()
        prompts = phase["prompts"]
        groups = [prompts] if phase.get("batch") else [[p] for p in prompts]
        for group in groups:
            if phase.get("reset_device_cache", True) and not llm.reset_prefix_cache():
                # A reset that did not happen would let vLLM's own cache serve the prompt.
                raise RuntimeError("vLLM refused to reset its prefix cache")
            t0 = time.perf_counter()
            done = llm.generate(group, params, use_tqdm=False)
            wall = time.perf_counter() - t0
            for out in done:
                completion = out.outputs[0]
                outputs.append(list(completion.token_ids))
                chosen, lead = logprobs_of(completion)
                logprobs.append(chosen)
                margins.append(lead)
                latency = getattr(out.metrics, "first_token_latency", 0.0) if out.metrics else 0.0
                ttfts.append(latency if latency > 0 else wall)
        result["phases"].append({"outputs": outputs, "logprobs": logprobs,
                                 "margins": margins, "ttft_s": ttfts,
                                 "wall_s": time.perf_counter() - phase_started})
    port = (job.get("connector") or {}).get("extra", {}).get("metrics_port")
    if port:
        result["metrics"] = scrape_metrics(port)
    if fault_spec:
        result["faults_fired"] = faults.fired()
        faults.disarm()
    del llm
    return result


def logprobs_of(completion) -> tuple[list[float], list[float]]:
    """Per generated token: its logprob, and its lead over the runner-up."""
    chosen, lead = [], []
    for token_id, step in zip(completion.token_ids, completion.logprobs or ()):
        ranked = sorted((lp.logprob for lp in step.values()), reverse=True)
        chosen.append(float(step[token_id].logprob))
        lead.append(float(ranked[0] - ranked[1]) if len(ranked) > 1 else float("inf"))
    return chosen, lead


def scrape_metrics(port: int) -> dict[str, float]:
    """kvtier's Prometheus samples as {name{labels}: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("kvtier_") and "_created" not in line:
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def run_job_process(job: dict, *, timeout_s: float = 900, log_path: str | None = None) -> dict:
    """Run ``job`` in a fresh Python process (its own engine); return its result."""
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
        spec = f.name
    try:
        with open(log_path or os.devnull, "a") as log:
            proc = subprocess.run([sys.executable, "-m", "kvtier.cli.vllm_job", spec],
                                  stdout=subprocess.PIPE, stderr=log, text=True,
                                  timeout=timeout_s, check=False)
    finally:
        os.unlink(spec)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"')]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stdout.splitlines()[-20:])
        raise RuntimeError(f"vLLM job failed (exit {proc.returncode}); see "
                           f"{log_path or 'stderr'}; last output:\n{tail}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = argv[0]
    if os.path.exists(spec):
        with open(spec) as f:
            spec = f.read()
    job = json.loads(spec)
    result = run_job(job)
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
