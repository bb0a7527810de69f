"""TTFT of a repeated 2-3k-token prefix after device eviction, on the CPU build of vLLM, with the
KV footprint of a real model, and how much of it is the connector's load.

The model is random-weight and tiny in compute, but its KV is the size of Llama-3.1-8B's:
``KV_SIZED_LLAMA`` (32 layers x 4 KV heads x head_dim 128 x K,V in float32 = 128 KiB per
token, the bytes of 32 x 8 x 128 x K,V in bf16) with hidden 256, 4 query heads and a 256-wide
MLP, so a prefill stays affordable on 2 cores while every load moves real-model bytes.

Engines (each in its own process, run in-process there so the connector's methods can be
timed; device prefix cache reset before every prompt so reuse must come from the connector):
  recompute               vLLM alone
  device hit              vLLM's own prefix cache (no reset): the floor every hit sits on
  example_connector       vLLM's built-in ExampleConnector (safetensors files on disk), P
                          stored, then repeated with its files fsync-ed and dropped from the
                          page cache (posix_fadvise DONTNEED) before every prompt: read cold
                          from the disk
  example_connector_warm  the same engine's repeats before that, its files as the store left
                          them, in the page cache (read at memory speed)
  kvtier G2               host + disk tiers: P stored, then repeated (G2 hits)
  kvtier G3               a restarted engine without a host tier on the same disk: P repeated
                          (G3 hits, O_DIRECT reads from the device; its files are evicted
                          before every prompt too, which O_DIRECT does not need)
  kvtier G3 buffered      the same without O_DIRECT: after one cold read P is in the page cache
Every connector call is split (``_child_main``'s timers) into its load (ExampleConnector: its
start_load_kv, file reads and scatter into the KV cache; kvtier: first disk read to last copy
into the device, G2 -> G1 copy for G2) and the rest of TTFT (scheduling, the forward pass of
the prompt's last block, which every path computes); the page-cache share of the connector's
files is recorded before every prompt (mincore), and ``dd iflag=direct`` reads as many bytes of
kvtier's data file in the same run (the device's own speed).
Also the scheduler-side time kvtier adds over a request's whole life (match, allocation, every
step's metadata, worker output, finish), measured on vLLM's real Scheduler with and without
the connector (no model), and the worker-side time of the real engine's connector calls.

Metrics (ratio = the baseline's time / kvtier's):
  g2_hit_vs_recompute, g3_hit_vs_recompute     TTFT, vs vLLM recomputing P
  g3_vs_example_connector                      TTFT, both reading from the disk, cold
  g3_vs_example_connector_warm_page_cache      TTFT, kvtier G3 (O_DIRECT) vs ExampleConnector
                                               with its files in the page cache
  g3_buffered_vs_example_connector_warm_page_cache
                                               TTFT, both from the page cache
  g3_load_vs_example_connector_load            the load alone, both cold (without the floor)
  g3_disk_read_vs_dd_direct                    kvtier's disk reads (preadv + verify) vs dd
                                               iflag=direct of the same bytes
  sched_overhead_us, worker_overhead_us        kvtier's hooks / vLLM's own cost per request
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from kvtier.cli.tiny_model import VOCAB_SIZE, make_tiny_llama, random_words

# The KV of Llama-3.1-8B (32 layers x 8 KV heads x 128 x K,V x 2 B = 128 KiB per token) in
# float32 (the engines run in float32, ENVIRONMENT.md 4a): 4 KV heads of 128 x 4 B. The
# compute is tiny: 4 query heads, hidden 256, MLP 256. Built here, not in kvtier.cli.tiny_model,
# whose make_tiny_llama writes its one geometry only.
KV_SIZED_LLAMA = {"hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 32,
                  "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 128,
                  "initializer_range": 0.02}
KV_DTYPE_BYTES = 4  # float32


def kv_bytes_per_token(geometry: dict = KV_SIZED_LLAMA) -> int:
    return (2 * geometry["num_hidden_layers"] * geometry["num_key_value_heads"]
            * geometry["head_dim"] * KV_DTYPE_BYTES)


def make_kv_sized_llama(out_dir: Path, tiny_dir: Path, *, max_positions: int = 8192) -> Path:
    """KV_SIZED_LLAMA with random float32 weights and the tiny model's tokenizer (idempotent)."""
    out = Path(out_dir)
    marker = out / "kvtier-kv-sized.json"
    settings = {"max_positions": max_positions, "vocab": VOCAB_SIZE, **KV_SIZED_LLAMA}
    if marker.exists() and json.loads(marker.read_text()) == settings:
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    for f in Path(tiny_dir).iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=max_positions,
                         bos_token_id=1, eos_token_id=2, torch_dtype="float32", **KV_SIZED_LLAMA)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(out)
    marker.write_text(json.dumps(settings))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------
# Hook timers: the connector's methods (both roles) and vLLM's own scheduler and engine step,
# wrapped on the live instances of an engine that runs in this process.

SCHEDULER_HOOKS = ("get_num_new_matched_tokens", "update_state_after_alloc",
                   "get_external_cache_hit_sources", "build_connector_meta",
                   "update_connector_output", "request_finished", "take_events")
WORKER_HOOKS = ("start_load_kv", "wait_for_layer_load", "save_kv_layer", "wait_for_save",
                "get_finished", "get_block_ids_with_load_errors", "build_connector_worker_meta")
VLLM_PARTS = ("vllm_schedule", "vllm_update_from_output", "engine_step")


class HookTimers:
    """Cumulative [calls, seconds] per wrapped method."""

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}

    def wrap(self, obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr, None)
        if fn is None:
            return
        slot = self.totals.setdefault(name, [0, 0.0])
        perf = time.perf_counter

        def timed(*args, **kwargs):
            t0 = perf()
            try:
                return fn(*args, **kwargs)
            finally:
                slot[0] += 1
                slot[1] += perf() - t0
        setattr(obj, attr, timed)

    def install(self, llm) -> dict:
        """Wrap the engine's connector (scheduler and worker roles), its scheduler and step.
        Needs the engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
        from vllm.distributed.kv_transfer.kv_transfer_state import (
            get_kv_transfer_group,
            has_kv_transfer_group,
        )
        core = llm.llm_engine.engine_core.engine_core
        scheduler = core.scheduler
        if scheduler.connector is not None:
            for hook in SCHEDULER_HOOKS:
                self.wrap(scheduler.connector, hook, "s." + hook)
        if has_kv_transfer_group():
            worker = get_kv_transfer_group()
            for hook in WORKER_HOOKS:
                self.wrap(worker, hook, "w." + hook)
        self.wrap(scheduler, "schedule", "vllm_schedule")
        self.wrap(scheduler, "update_from_output", "vllm_update_from_output")
        self.wrap(core, "step_fn", "engine_step")
        return {"device_kv_blocks": scheduler.kv_cache_manager.block_pool.num_gpu_blocks}

    def snapshot(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.totals.items()}

    @staticmethod
    def delta(after: dict, before: dict) -> dict[str, list[float]]:
        return {k: [v[0] - before.get(k, [0, 0.0])[0], v[1] - before.get(k, [0, 0.0])[1]]
                for k, v in after.items()}


def split_costs(d: dict[str, list[float]]) -> dict[str, float]:
    """Seconds of kvtier's scheduler hooks, its worker hooks, vLLM's scheduler without them
    and the engine step without kvtier's worker hooks, from one HookTimers delta."""
    sched = sum(v[1] for k, v in d.items() if k.startswith("s."))
    work = sum(v[1] for k, v in d.items() if k.startswith("w."))
    vllm_sched = (d.get("vllm_schedule", [0, 0.0])[1]
                  + d.get("vllm_update_from_output", [0, 0.0])[1] - sched)
    step = d.get("engine_step", [0, 0.0])[1]
    return {"kvtier_sched_s": sched, "kvtier_worker_s": work, "vllm_sched_s": vllm_sched,
            "engine_step_s": step, "engine_step_without_kvtier_s": step - sched - work,
            "steps": d.get("engine_step", [0, 0.0])[0]}


# ---------------------------------------------------------------------------------------
# Page-cache state and load timing (child side).

def _files_under(directory: str) -> list[str]:
    return sorted(str(f) for f in Path(directory).rglob("*") if f.is_file())


def resident_bytes(paths: list[str]) -> tuple[int, int]:
    """(bytes of ``paths`` in the page cache, their total size), by mmap + mincore(2)."""
    import ctypes
    import mmap

    import numpy as np

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = mmap.PAGESIZE
    resident = total = 0
    for path in paths:
        size = os.path.getsize(path)
        total += size
        if not size:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr is None or addr == ctypes.c_void_p(-1).value:
                raise OSError(ctypes.get_errno(), f"mmap {path}")
            try:
                vec = ctypes.create_string_buffer(-(-size // page))
                if libc.mincore(addr, size, vec) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore {path}")
                pages = int((np.frombuffer(vec.raw, np.uint8) & 1).sum())
                resident += min(size, pages * page)
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    return resident, total


def evict_page_cache(paths: list[str]) -> None:
    """Write back and drop ``paths`` from the page cache (DONTNEED skips dirty pages, hence
    the fsync), so the next read of them comes from the device."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class Intervals:
    """(name, start, end) of every call of the wrapped methods, from any thread."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float, float]] = []

    def wrap(self, obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr)
        events, perf = self.events, time.perf_counter

        def timed(*args, **kwargs):
            t0 = perf()
            try:
                return fn(*args, **kwargs)
            finally:
                events.append((name, t0, perf()))  # list.append is atomic
        setattr(obj, attr, timed)

    def install(self, engine_core) -> object | None:
        """Wrap the engine core's steps (``step``) and the load path of its worker-side
        connector: kvtier's disk reads (``disk_read``: preadv + verify; ``preadv``: the system
        calls, writes too) and its copies into the device (``to_device``); ExampleConnector's
        ``start_load_kv`` (``load``: the whole synchronous load) and its safetensors file reads
        (``file_read``). Returns kvtier's DiskStorage, if any."""
        from vllm.distributed.kv_transfer.kv_transfer_state import (
            get_kv_transfer_group,
            has_kv_transfer_group,
        )
        self.wrap(engine_core, "step_fn", "step")
        if not has_kv_transfer_group():
            return None
        connector = get_kv_transfer_group()
        worker = getattr(connector, "worker", None)
        if worker is not None:  # kvtier
            self.wrap(worker, "_finish_load", "to_device")
            if worker.disk is not None:
                self.wrap(worker.disk, "read", "disk_read")
                self.wrap(worker.disk, "_vector_io", "preadv")
            return worker.disk
        import safetensors.torch
        self.wrap(connector, "start_load_kv", "load")
        self.wrap(safetensors.torch, "load_file", "file_read")
        return None

    def summary(self, since: float, until: float) -> dict[str, float]:
        """Per name, over calls inside [since, until]: span_s (first start to last end) and
        busy_s (sum of durations). load_s: from the first read (ExampleConnector: its
        start_load_kv call that loads; kvtier: its first disk read, or copy for G2) to the end
        of the last copy into the device, including any engine steps between them;
        before_load_s and after_load_s: the rest of the call, before and after it."""
        inside = [e for e in self.events if e[1] >= since and e[2] <= until]
        out: dict[str, float] = {}
        for name in {e[0] for e in inside}:
            mine = [e for e in inside if e[0] == name]
            out[name + "_span_s"] = max(e[2] for e in mine) - min(e[1] for e in mine)
            out[name + "_busy_s"] = sum(e[2] - e[1] for e in mine)
        mine = [e for e in inside if e[0] in ("load", "disk_read", "to_device")
                and (e[0] != "load" or e[2] - e[1] > 1e-3)]  # start_load_kv with nothing
        if mine:
            first, last = min(e[1] for e in mine), max(e[2] for e in mine)
            out["load_s"] = last - first
            out["before_load_s"] = first - since  # arrival, scheduling, steps
            out["after_load_s"] = until - last  # the rest of the step, later steps
        out["longest_step_s"] = max((e[2] - e[1] for e in inside if e[0] == "step"),
                                    default=0.0)
        out["steps"] = sum(e[0] == "step" for e in inside)
        return out


def _child_main(spec_path: str) -> int:
    """Run one kvtier.cli.vllm_job job with its engine in this process and every generate()
    call's hook time recorded (one entry per call, in order)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    with open(spec_path) as f:
        job = json.load(f)
    import vllm

    from kvtier.cli import vllm_job

    timers = HookTimers()
    intervals = Intervals()
    calls: list[dict] = []
    loads: list[dict] = []
    info: dict = {}
    base_llm = vllm.LLM
    disk = None
    cache_dir = job.get("page_cache_dir")  # files whose page-cache state each call records
    evict_calls = set(job.get("evict_calls", ()))  # calls preceded by evicting them

    class TimedLLM(base_llm):
        def __init__(self, *args, **kwargs):
            nonlocal disk
            super().__init__(*args, **kwargs)
            info.update(timers.install(self))
            disk = intervals.install(self.llm_engine.engine_core.engine_core)

        def generate(self, *args, **kwargs):
            load: dict = {}
            if cache_dir:
                files = _files_under(cache_dir)
                if len(calls) in evict_calls:
                    evict_page_cache(files)
                load["page_cache_bytes"], load["file_bytes"] = resident_bytes(files)
            read_before = disk.stats.bytes_read if disk is not None else 0
            before = timers.snapshot()
            profile = job.get("profile_call") == len(calls)
            started = time.perf_counter()
            try:
                if not profile:
                    return super().generate(*args, **kwargs)
                import torch.profiler
                cpu = [torch.profiler.ProfilerActivity.CPU]
                with torch.profiler.profile(activities=cpu) as prof:
                    out = super().generate(*args, **kwargs)
                info["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total",
                                                            row_limit=14, max_name_column_width=48)
                return out
            finally:
                calls.append(HookTimers.delta(timers.snapshot(), before))
                load.update(intervals.summary(started, time.perf_counter()))
                if disk is not None:
                    load["disk_bytes_read"] = disk.stats.bytes_read - read_before
                loads.append(load)

    vllm.LLM = TimedLLM
    result = vllm_job.run_job(job)
    result["hook_calls"] = calls
    result["loads"] = loads
    result.update(info)
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    return 0


def run_timed_job(job: dict, log_path: str, timeout_s: float = 1800) -> dict:
    """A vllm_job job in a fresh process, its engine in-process there, hooks timed."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
        spec = f.name
    load_before = os.getloadavg()[0]
    try:
        with open(log_path, "a") as log:
            proc = subprocess.run([sys.executable, __file__, "--child", spec],
                                  stdout=subprocess.PIPE, stderr=log, text=True,
                                  timeout=timeout_s, check=False)
    finally:
        os.unlink(spec)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"')]
    with open(log_path, "a") as log:  # vLLM logs to stdout
        log.writelines(ln + "\n" for ln in proc.stdout.splitlines() if not ln.startswith('{"'))
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM job failed (exit {proc.returncode}); see {log_path}")
    result = json.loads(lines[-1])
    # The machine's 1-minute load average around the engine's run: on a shared machine other
    # jobs slow every compute step (the forward pass of a hit most of all), engine by engine.
    result["loadavg"] = (load_before, os.getloadavg()[0])
    return result


# ---------------------------------------------------------------------------------------

def ttft_jobs(model: str, workdir: Path, tokens: int, repeats: int) -> dict:
    rng = random.Random(0)
    p = random_words(rng, tokens)
    bpt = kv_bytes_per_token()
    blocks = -(-tokens // 32)
    kv_cache_gb = 1
    if (tokens + 64) * bpt > kv_cache_gb * 2**30:
        raise SystemExit(f"the device KV cache ({kv_cache_gb} GiB) cannot hold a {tokens}-token "
                         "prompt: raise kv_cache_gb")
    base = {"model": model, "block_size": 32, "max_model_len": tokens + 64,
            "kv_cache_gb": kv_cache_gb, "dtype": "float32"}

    def phase(prompts):
        return {"prompts": prompts, "max_tokens": 1, "reset_device_cache": True}

    log = str(workdir.parent / f"{workdir.name}-engines.log")  # kept after the run
    # Last phase without resets: vLLM's own device prefix cache serves P, the floor every
    # connector's hit sits on (the engine computing the prompt's last block over the prefix).
    # The last prompt of these runs is profiled (torch.profiler) and left out of the medians.
    # Then P + one block of new words (new each time) on top of the cached P: a second sample
    # of that floor. P is block-aligned, so every path here (vLLM's cache, ExampleConnector,
    # kvtier) serves all blocks but the last and computes its 32 tokens.
    tails = [f"{p} {random_words(rng, 32)}" for _ in range(repeats)]
    recompute = run_timed_job({**base, "max_model_len": tokens + 96,
                               "profile_call": 2 * repeats + 1, "phases": [
        phase([p]), phase([p] * repeats),
        {"prompts": [p] * (repeats + 1) + tails, "max_tokens": 1,
         "reset_device_cache": False}]}, log)
    # P stored, then repeated with its files as the store left them (in the page cache),
    # then repeated with them written back and evicted before every prompt (from the disk).
    example = run_timed_job({**base, "connector": {
        "name": "ExampleConnector", "extra": {"shared_storage_path": str(workdir / "example")}},
        "page_cache_dir": str(workdir / "example"),
        "evict_calls": list(range(repeats + 1, 2 * repeats + 1)),
        "phases": [phase([p]), phase([p] * repeats), phase([p] * repeats)]}, log)
    kvtier = {"name": "KvtierConnector", "module": "kvtier.connectors.vllm"}
    disk = {"disk_cache_blocks": 2 * blocks, "disk_dir": str(workdir / "g3"),
            "disk_admission": "always"}
    # Host + disk: P stored, then repeated (G2 hits).
    host_run = run_timed_job({**base, "profile_call": repeats + 1, "connector": {
        **kvtier, "extra": {"host_cache_blocks": 2 * blocks, **disk,
                            "metrics_port": free_port()}},
        "phases": [phase([p]), phase([p] * (repeats + 1))]}, log)
    # A restarted engine without a host cache: P comes from the disk tier alone (G3 hits).
    # Its files are evicted before every prompt too, though O_DIRECT never reads the cache.
    disk_run = run_timed_job({**base, "connector": {**kvtier, "extra": {
        **disk, "metrics_port": free_port()}},
        "page_cache_dir": disk["disk_dir"], "evict_calls": list(range(repeats + 1)),
        "phases": [phase([p] * (repeats + 1))]}, log)
    dd_s = dd_direct_read(disk_run["loads"][1:], Path(disk["disk_dir"]))
    # The same without O_DIRECT: after its first (cold) read P is in the page cache, as
    # ExampleConnector's files are (written moments before): like-for-like with it.
    buffered_run = run_timed_job({**base, "connector": {**kvtier, "extra": {
        **disk, "disk_o_direct": False}}, "page_cache_dir": disk["disk_dir"],
        "evict_calls": [0], "phases": [phase([p] * (repeats + 1))]}, log)
    # Per path: TTFT samples and the load timings of the same calls (_child_main's "loads").
    # The restarted engines' first request also waits for the disk index: not a steady hit.
    paths = {
        "recompute": (recompute["phases"][1]["ttft_s"], recompute["loads"][1:1 + repeats]),
        "device_hit": (recompute["phases"][2]["ttft_s"][:repeats],
                       recompute["loads"][1 + repeats:1 + 2 * repeats]),
        "device_hit_new_tail": (recompute["phases"][2]["ttft_s"][repeats + 1:],
                                recompute["loads"][2 + 2 * repeats:]),
        "example_connector": (example["phases"][2]["ttft_s"], example["loads"][1 + repeats:]),
        "example_connector_warm": (example["phases"][1]["ttft_s"],
                                   example["loads"][1:1 + repeats]),
        "kvtier_g2": (host_run["phases"][1]["ttft_s"][:repeats],
                      host_run["loads"][1:1 + repeats]),
        "kvtier_g3": (disk_run["phases"][0]["ttft_s"][1:], disk_run["loads"][1:]),
        "kvtier_g3_buffered": (buffered_run["phases"][0]["ttft_s"][1:],
                               buffered_run["loads"][1:]),
    }
    metrics = {f"{name}:{k}": v for name, run in (("host_run", host_run), ("disk_run", disk_run))
               for k, v in run.get("metrics", {}).items()
               if "matched_tokens" in k or "transfer_seconds_sum" in k
               or "transfer_bytes" in k or "checksum" in k}
    # Each prompt is one generate() call: hook_calls[0] is the store (no hit), the rest hits.
    store = split_costs(host_run["hook_calls"][0])
    g2_calls = [split_costs(c) for c in host_run["hook_calls"][1:1 + repeats]]
    g3_calls = [split_costs(c) for c in disk_run["hook_calls"][1:]]
    plain_calls = [split_costs(c) for c in recompute["hook_calls"][1:1 + repeats]]
    engine_of = {"recompute": recompute, "device_hit": recompute,
                 "device_hit_new_tail": recompute, "example_connector": example,
                 "example_connector_warm": example, "kvtier_g2": host_run,
                 "kvtier_g3": disk_run, "kvtier_g3_buffered": buffered_run}
    return {**{name: statistics.median(ttft) for name, (ttft, _) in paths.items()},
            "loadavg": {name: run["loadavg"] for name, run in engine_of.items()},
            "samples": {name: ttft for name, (ttft, _) in paths.items()},
            "loads": {name: loads for name, (_, loads) in paths.items()},
            "dd_direct_s": dd_s,
            "profiles": {"device_hit": recompute.get("profile", ""),
                         "kvtier_g2": host_run.get("profile", "")},
            "metrics": metrics, "store": store, "g2_calls": g2_calls, "g3_calls": g3_calls,
            "plain_calls": plain_calls, "g2_hook_calls": host_run["hook_calls"][1:1 + repeats],
            "g3_hook_calls": disk_run["hook_calls"][1:],
            "device_kv_tokens": host_run.get("device_kv_blocks", 0) * 32,
            "init_s": {"recompute": recompute["init_s"], "example": example["init_s"],
                       "host_run": host_run["init_s"], "disk_run": disk_run["init_s"]}}


def dd_direct_read(loads: list[dict], disk_dir: Path, runs: int = 3) -> float:
    """Median seconds ``dd iflag=direct`` takes to read as many bytes of kvtier's data file as
    one G3 hit read (the device's plain sequential O_DIRECT speed, in the same run)."""
    nbytes = statistics.median(load.get("disk_bytes_read", 0) for load in loads)
    data = next(disk_dir.rglob("kvtier-g3.data"))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(["dd", f"if={data}", "of=/dev/null", "bs=4M", f"count={int(nbytes)}",
                        "iflag=direct,count_bytes", "status=none"], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sched_overhead_us(model: str, num_requests: int, max_tokens: int) -> tuple[float, float]:
    """(us kvtier's scheduler-side hooks take per request over its whole life, us vLLM's
    scheduler takes per request without a connector), on vLLM's real Scheduler driving
    ``num_requests`` requests from arrival (match, allocation, chunked prefill) through
    ``max_tokens`` decode steps to finish (no model; every block stored to the host tier).
    The hooks are timed directly, so the figure is what kvtier adds, not the noise of two
    separate runs."""
    from sched_harness import make_harness

    def run(extra):
        h = make_harness(model, extra, num_blocks=4096, max_num_seqs=num_requests)
        timers = HookTimers()
        connector = h.scheduler.connector
        for hook in SCHEDULER_HOOKS if connector is not None else ():
            timers.wrap(connector, hook, "s." + hook)
        timers.wrap(h.scheduler, "schedule", "vllm_schedule")
        timers.wrap(h.scheduler, "update_from_output", "vllm_update_from_output")
        rng = random.Random(1)
        for i in range(num_requests):
            h.add(f"r{i}", [rng.randint(3, 1000) for _ in range(512)], max_tokens=max_tokens)
        h.run()
        costs = split_costs(timers.totals)
        return (1e6 * costs["kvtier_sched_s"] / num_requests,
                1e6 * costs["vllm_sched_s"] / num_requests)

    run({"host_cache_blocks": 8192})  # warm-up (imports, first allocations)
    hooks_us = statistics.median(run({"host_cache_blocks": 8192})[0] for _ in range(3))
    plain_us = statistics.median(run(None)[1] for _ in range(3))
    return hooks_us, plain_us


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tokens", type=int, default=None,
                        help="prompt length in tokens (default 2048, full run 3072)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child_main(args.child)
    tokens = args.tokens or (2048 if args.quick else 3072)
    repeats = 3 if args.quick else 5
    workdir = Path(tempfile.mkdtemp(prefix="kvtier-e2e-"))
    try:
        return _run(args, workdir, tokens, repeats)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(args, workdir: Path, tokens: int, repeats: int) -> int:
    tiny = make_tiny_llama(workdir / "tiny")
    model = str(make_kv_sized_llama(workdir / "kv-sized", tiny))
    bpt = kv_bytes_per_token()
    g = KV_SIZED_LLAMA
    print(f"geometry: {g['num_hidden_layers']} layers x {g['num_key_value_heads']} KV heads x "
          f"head_dim {g['head_dim']}, hidden {g['hidden_size']}, {g['num_attention_heads']} "
          f"query heads, MLP {g['intermediate_size']}, float32: {bpt} B/token; prompt "
          f"{tokens} tokens = {tokens * bpt / 2**20:.0f} MiB of KV")
    t = ttft_jobs(model, workdir, tokens, repeats)
    overhead, plain = sched_overhead_us(str(tiny), 32, 20 if args.quick else 100)
    print(f"device KV cache: {t['device_kv_tokens']} tokens (prompt {tokens})")
    print(f"{'path':<24}{'TTFT':>7}{'min':>7}{'before':>7}{'load':>7}{'after':>7}{'step':>7}"
          f"{'steps':>7}{'cached':>8}{'load avg':>10}   TTFT samples")
    print("(ms, medians; before / load / after: TTFT before the connector's load, the load, "
          "after it; step: the longest engine step; cached: page-cache share of its files; "
          "load avg: the machine's, before and after that engine's run)")
    for name in PATHS:
        samples, loads = t["samples"][name], t["loads"][name]
        cached = [ld["page_cache_bytes"] / ld["file_bytes"] for ld in loads
                  if ld.get("file_bytes")]
        cols = "".join(f"{_median_load(loads, k) * 1e3:>7.0f}" if any(k in ld for ld in loads)
                       else f"{'-':>7}"
                       for k in ("before_load_s", "load_s", "after_load_s", "longest_step_s"))
        steps = f"{_median_load(loads, 'steps'):>7.0f}" if loads else f"{'-':>7}"
        print(f"{name:<24}{t[name] * 1e3:>7.0f}{min(samples) * 1e3:>7.0f}{cols}{steps}"
              f"{(f'{statistics.median(cached):.0%}' if cached else '-'):>8}"
              f"{'{:.1f}-{:.1f}'.format(*t['loadavg'][name]):>10}   "
              + " ".join(f"{x * 1e3:.0f}" for x in samples))
    print("(device_hit: vLLM's own prefix cache, no reset: the floor of any connector's hit; "
          "device_hit_new_tail: a new block after the cached prefix; example_connector: its "
          "files written back and evicted before each prompt; example_connector_warm: its "
          "files as the store left them; kvtier_g3_buffered: the G3 engine without O_DIRECT, "
          "warm after its first read)")
    g3_loads = t["loads"]["kvtier_g3"]
    read_bytes = statistics.median(ld.get("disk_bytes_read", 0) for ld in g3_loads)
    disk_read = _median_load(g3_loads, "disk_read_span_s")
    preadv = _median_load(g3_loads, "preadv_busy_s")
    print(f"kvtier G3 load, median: {read_bytes / 2**20:.0f} MiB; disk reads (preadv + verify) "
          f"{disk_read * 1e3:.0f} ms, preadv calls busy {preadv * 1e3:.0f} ms "
          f"(summed over I/O threads), copy into the device "
          f"{_median_load(g3_loads, 'to_device_busy_s') * 1e3:.0f} ms, first read to last copy "
          f"{_median_load(g3_loads, 'load_s') * 1e3:.0f} ms; dd iflag=direct of the same bytes "
          f"of its file: {t['dd_direct_s'] * 1e3:.0f} ms")
    ec_loads = t["loads"]["example_connector"]
    warm_loads = t["loads"]["example_connector_warm"]
    print(f"ExampleConnector load, median (cold / warm): start_load_kv "
          f"{_median_load(ec_loads, 'load_s') * 1e3:.0f} / "
          f"{_median_load(warm_loads, 'load_s') * 1e3:.0f} ms, of which safetensors load_file "
          f"{_median_load(ec_loads, 'file_read_busy_s') * 1e3:.0f} / "
          f"{_median_load(warm_loads, 'file_read_busy_s') * 1e3:.0f} ms (it maps the files: "
          "pages not in the cache are read when the scatter into the KV cache touches them), "
          f"{statistics.median(ld.get('file_bytes', 0) for ld in ec_loads) / 2**20:.0f} MiB "
          "of files")
    print("kvtier metrics (tokens served, transfer seconds and bytes):")
    for k, v in sorted(t["metrics"].items()):
        print(f"  {k} = {v:.4g}")
    print("per hit request, median ms: kvtier scheduler hooks / worker hooks / engine step "
          "without them / steps")
    for name in ("plain_calls", "g2_calls", "g3_calls"):
        rows = t[name]
        if rows:
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            print(f"  {name:<12} {med['kvtier_sched_s'] * 1e3:8.2f} "
                  f"{med['kvtier_worker_s'] * 1e3:8.2f} "
                  f"{med['engine_step_without_kvtier_s'] * 1e3:9.1f} {med['steps']:5.0f}")
    for name in ("g2_hook_calls", "g3_hook_calls"):
        if t[name]:
            last = t[name][-1]
            print(f"  {name} (last request): " + ", ".join(
                f"{k}={v[1] * 1e3:.2f}ms/{v[0]}" for k, v in sorted(last.items()) if v[0]))
    for name, table in t["profiles"].items():
        print(f"torch profile of one {name} request (top ops by self CPU time):\n{table}")
    store = t["store"]
    worker_us = store["kvtier_worker_s"] * 1e6
    store_base_us = store["engine_step_without_kvtier_s"] * 1e6
    print(f"store request (no hit, {tokens} tokens stored): kvtier worker hooks "
          f"{worker_us / 1e3:.2f} ms, scheduler hooks {store['kvtier_sched_s'] * 1e3:.2f} ms, "
          f"engine step without them {store_base_us / 1e3:.1f} ms over {store['steps']} steps")
    print(f"kvtier's scheduler hooks over a request's life: {overhead:.1f} us per request "
          f"(vLLM's own scheduler: {plain:.1f} us per request)")
    results = [
        _ratio("g2_hit_vs_recompute", t["recompute"], t["kvtier_g2"], "recompute"),
        _ratio("g3_hit_vs_recompute", t["recompute"], t["kvtier_g3"], "recompute"),
        _ratio("g3_vs_example_connector", t["example_connector"], t["kvtier_g3"],
               "example_connector_cold"),
        _ratio("g3_vs_example_connector_warm_page_cache", t["example_connector_warm"],
               t["kvtier_g3"], "example_connector_warm_page_cache"),
        _ratio("g3_buffered_vs_example_connector_warm_page_cache",
               t["example_connector_warm"], t["kvtier_g3_buffered"],
               "example_connector_warm_page_cache"),
        _ratio("g3_load_vs_example_connector_load",
               _median_load(t["loads"]["example_connector"], "load_s"),
               _median_load(t["loads"]["kvtier_g3"], "load_s"), "example_connector_cold_load",
               unit="ms_load"),
        _ratio("g3_disk_read_vs_dd_direct", t["dd_direct_s"], disk_read, "dd_iflag_direct",
               unit="ms_read"),
        {"metric": "sched_overhead_us", "value": round(overhead, 2), "unit": "us_per_request",
         "baseline": "vllm_scheduler_per_request", "baseline_value": round(plain, 2),
         "ratio": round(overhead / plain, 3) if plain else None},
        {"metric": "worker_overhead_us", "value": round(worker_us, 1),
         "unit": "us_per_request_storing", "baseline": "vllm_engine_steps_per_request",
         "baseline_value": round(store_base_us, 1),
         "ratio": round(worker_us / store_base_us, 4) if store_base_us else None},
    ]
    print(json.dumps({"bench": "e2e_ttft", "results": results}))
    return 0


PATHS = ("recompute", "device_hit", "device_hit_new_tail", "example_connector",
         "example_connector_warm", "kvtier_g2", "kvtier_g3", "kvtier_g3_buffered")


def _median_load(loads: list[dict], key: str) -> float:
    return statistics.median(ld.get(key, 0.0) for ld in loads) if loads else 0.0


def _ratio(metric: str, other_s: float, ours_s: float, baseline: str,
           unit: str = "ms_ttft") -> dict:
    return {"metric": metric, "value": round(ours_s * 1000, 2), "unit": unit,
            "baseline": baseline, "baseline_value": round(other_s * 1000, 2),
            "ratio": round(other_s / ours_s, 2) if ours_s else None}


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
