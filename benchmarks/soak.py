"""Three vLLM + kvtier engines sharing one Redis Cluster under a trace-driven load.

Requests come from the Mooncake conversation trace (``../shared/data/mooncake_fast25``): each of
its 512-token hash blocks becomes ``WORDS_PER_HASH`` words of the tiny test model's vocabulary,
drawn from an RNG seeded by the hash id, so requests that share a prefix in the trace share it
here. The trace's first hundred or so requests share only their first hash block, so the soak
takes its first requests that continue an earlier one (share more than that block with it), and
those earlier ones ("sources"). Sources go round-robin over the three engines, each continuation
to another engine than its source's (but see the damaged engine below).

The three engines run at the same time, each in its own process with its own host tier and no
disk tier, in two waves: their sources, then their continuations. Between the waves each engine
drains kvtier (every put has landed) and waits for the others, so a continuation finds its
source in the store whatever the interleaving. vLLM's device prefix cache is reset before every
prompt (kvtier's host tier keeps its blocks): an engine reuses its own blocks from G2 and the
others' from G4, a 3-master Redis Cluster on loopback started here.

Two negative controls (``kvtier.storage.faults``): on one engine the first G4 read gets a value
corrupted (``remote.get:corrupt``), which verification must catch (one checksum failure counted)
and the block be recomputed, outputs still right; on another the first load gets one block
zeroed on the device after verification (``onboard.bypass:zero``), which only the oracle can
see, so that engine's outputs must differ. The blocks it computes on top of that one are wrong
too and it puts them to the store, so it keeps to a namespace of its own (another model id) and
runs its sources' continuations itself: no other engine ever reads its damage (tried without:
another engine's output differed).

Checked at the end: the outputs of every engine but the damaged one match vLLM alone
(``kvtier.cli.oracle``: float32, same greedy tokens, logprobs within tolerance; the baseline is
one engine with its own prefix cache over all the requests); after a last drain, nothing in
flight (kvtier's ``kvtier_inflight_transfers`` gauges), no tier block pinned, the tier pools'
invariants hold; no load errors or checksum failures other than the injected corruption.
Reported: hit ratios per tier (tokens onboarded from each tier over prompt tokens looked up) per
engine and overall.

The claims are absolute, so their baseline is the target itself (wrong outputs 0, blocks in
flight 0); the hit ratios are what the trace shares, reported against vLLM alone (0: it keeps no
KV beyond its device cache, which is reset here). ``--quick``: 12 continuations and their
sources (24 requests; about a minute on 2 cores, 2-3 when they are shared, vLLM's start
included); default 45. Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "integration"), str(ROOT / "tests")]

from kvtier.cli.tiny_model import random_words
from need import data_dir, missing_file, missing_servers, require_or_note

TRACE = data_dir() / "mooncake_fast25" / "conversation_trace.jsonl"
NUM_ENGINES = 3
BLOCK = 32
WORDS_PER_HASH = 64          # the trace's 512-token hash blocks, scaled down 8x
MAX_PROMPT_HASHES = 16       # prompts of at most 1024 tokens
MAX_MODEL_LEN = 4096
# Negative controls. On this engine the first G4 read gets one value corrupted (its
# continuations read from the store, so it happens in every run).
CORRUPTED_ENGINE = 1
CORRUPT_FAULT = "remote.get:corrupt:times=1"
# On this one the first load gets one block zeroed on the device after verification, which only
# the oracle can see. The blocks computed on top of it are wrong too and go to the store, so this
# engine keeps to a namespace of its own (another model id): its continuations read what it put
# itself, and no other engine can read its damage.
DAMAGED_ENGINE = 2
DAMAGE_FAULT = "onboard.bypass:zero:times=1"
# Draining: a tiny prompt (no full block) at a time until kvtier has nothing in flight.
DRAIN_PROMPT = "w3 w4 w5"
DRAIN_ROUNDS = 400
DRAIN_ROUND_S = 0.05
BARRIER_TIMEOUT_S = 600.0
ENGINE_TIMEOUT_S = 1200.0
TIERS = ("G2", "G3", "G4")
CONNECTOR = {"name": "KvtierConnector", "module": "kvtier.connectors.vllm"}


def hash_block_words(hash_id: int) -> list[str]:
    rng = random.Random(hash_id * 2654435761 + 17)
    return random_words(rng, WORDS_PER_HASH).split()


def trace_requests(num_pairs: int):
    """The trace's first ``num_pairs`` requests that share a prefix beyond the common first
    hash block with an earlier request (each of those is a "continuation"), and the earliest
    request that holds each one's shared prefix (its "source"): (sources, continuations, source
    of each continuation), requests as ``TraceRequest``. The trace's first hundred or so
    requests share only that first block, so a soak of its head would test little."""
    from kvtier.replay.trace import load_trace

    requests = load_trace(TRACE).requests
    holder: dict[int, int] = {}   # hash id -> index of the first request with it
    continuations: list[int] = []
    source_of: dict[int, int] = {}
    for idx, req in enumerate(requests):
        hashes = req.hash_ids[:MAX_PROMPT_HASHES]
        shared = [h for h in hashes[1:] if h in holder]
        source = holder.get(shared[-1]) if shared else None
        if source is not None and source not in source_of:  # a source is never a continuation
            continuations.append(idx)
            source_of[idx] = source
            if len(continuations) == num_pairs:
                break
        for h in hashes:
            holder.setdefault(h, idx)
    sources = sorted(set(source_of.values()))
    return ([requests[i] for i in sources], [requests[i] for i in continuations],
            [sources.index(source_of[i]) for i in continuations])


def prompt_of(req) -> tuple[str, int]:
    """(prompt, max_tokens) of a trace request: prompts share words wherever requests share
    hash ids; 1-4 generated tokens, from the trace's output length."""
    words = [w for h in req.hash_ids[:MAX_PROMPT_HASHES] for w in hash_block_words(h)]
    # The last hash block is partial in the trace, as it is here.
    num_words = min(len(words), max(2, math.ceil(req.input_length * WORDS_PER_HASH / 512)))
    return " ".join(words[:num_words]), 1 + req.output_length % 4


def soak_plan(num_pairs: int) -> tuple[list[tuple[str, int]], list[list[int]], int]:
    """The requests, sources first then continuations, each group in trace order, as
    (prompt, max_tokens); for each engine the indices of its requests, its sources before its
    continuations; and the number of sources.

    Sources go round-robin. A continuation goes to the next engine that shares the namespace of
    its source's, so that its shared prefix can only come from another engine, through G4; the
    damaged engine shares with none, so its continuations stay with it."""
    sources, continuations, source_index = trace_requests(num_pairs)
    requests = [prompt_of(r) for r in sources] + [prompt_of(r) for r in continuations]
    engine_of = [i % NUM_ENGINES for i in range(len(sources))]
    share: list[list[int]] = [[] for _ in range(NUM_ENGINES)]
    for i, engine in enumerate(engine_of):
        share[engine].append(i)
    sharing = [k for k in range(NUM_ENGINES) if k != DAMAGED_ENGINE]
    for j, src in enumerate(source_index):
        engine = engine_of[src]
        if engine != DAMAGED_ENGINE:  # the next engine that shares the namespace
            engine = sharing[(sharing.index(engine) + 1) % len(sharing)]
        share[engine].append(len(sources) + j)
    return requests, share, len(sources)


def free_port() -> int:
    from servers import free_port as pick
    return pick()


def kvtier_connector(store_url: str, model_id: str) -> dict:
    return {**CONNECTOR, "extra": {"metrics_port": free_port(), "onboard_mode": "always",
                                   "host_cache_gb": 0.2, "remote_url": store_url,
                                   "model_id": model_id}}


def subset(phase: dict, indices: list[int]) -> dict:
    return {key: [phase[key][i] for i in indices] for key in ("outputs", "logprobs", "margins")}


def counter(metrics: dict, name: str, **labels: str) -> float:
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return metrics.get(f"{name}_total{{{label_text}}}" if labels else f"{name}_total", 0.0)


def inflight(metrics: dict) -> dict[str, float]:
    prefix = 'kvtier_inflight_transfers{kind="'
    return {key[len(prefix):-2]: value for key, value in metrics.items()
            if key.startswith(prefix)}


# -- one engine (a process of its own: ``soak.py --engine SPEC``) ------------------------------

def run_engine(spec: dict) -> dict:
    """Run ``spec``'s waves of (prompt, max_tokens), each prompt after a reset of vLLM's prefix
    cache (and kvtier's host tier) when kvtier is on. After each wave kvtier is drained (every
    put has landed) and, with ``barrier_dir``, the engine waits until all ``num_engines`` have
    finished that wave: the next wave's reads of the others' blocks never race their puts.
    Returns the outputs, kvtier's metrics and the end-of-run checks."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core, and the leader, here
    from vllm import SamplingParams

    from kvtier.cli.vllm_job import logprobs_of, make_llm, scrape_metrics
    from kvtier.storage import faults

    if spec.get("faults"):
        faults.arm_spec(spec["faults"])
    connector = spec.get("connector")
    # The engine the other real-engine checks run (kvtier.cli.vllm_job).
    llm = make_llm({"model": spec["model"], "block_size": BLOCK, "max_model_len": MAX_MODEL_LEN,
                    "connector": connector})
    leader = None
    if connector is not None:
        leader = llm.llm_engine.engine_core.engine_core.scheduler.connector.leader
    result: dict = {"outputs": [], "logprobs": [], "margins": []}
    drained = True
    for wave_no, wave in enumerate(spec["waves"]):
        for prompt, max_tokens in wave:
            if leader is not None and not llm.reset_prefix_cache():
                raise RuntimeError("vLLM refused to reset its prefix cache")
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                    logprobs=2)
            completion = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
            chosen, lead = logprobs_of(completion)
            result["outputs"].append(list(completion.token_ids))
            result["logprobs"].append(chosen)
            result["margins"].append(lead)
        if leader is not None:
            drained = drain(llm, leader) and drained
        if spec.get("barrier_dir"):
            barrier(Path(spec["barrier_dir"]), spec["name"], wave_no, spec["num_engines"])
    if leader is not None:
        result["drained"] = drained
        result["pinned"] = {pool.tier.name: pool.num_active
                            for pool in (leader.g2, leader.g3) if pool is not None}
        from kvtier.errors import BlockStateError
        try:
            leader.check_invariants()
            result["invariant_error"] = None
        except BlockStateError as exc:
            result["invariant_error"] = str(exc)
        result["metrics"] = scrape_metrics(connector["extra"]["metrics_port"])
        result["faults_fired"] = faults.fired()
    return result


def drain(llm, leader) -> bool:
    """Step the engine, a tiny prompt at a time, until kvtier has nothing in flight (reports
    arrive with steps); then once more, so that the in-flight gauges, set as a step begins,
    show it. False when transfers are still in flight after ``DRAIN_ROUNDS``."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    for _ in range(DRAIN_ROUNDS):
        llm.generate([DRAIN_PROMPT], params, use_tqdm=False)
        if not leader.busy:
            llm.generate([DRAIN_PROMPT], params, use_tqdm=False)
            return True
        time.sleep(DRAIN_ROUND_S)
    return False


def barrier(folder: Path, name: str, wave_no: int, num_engines: int) -> None:
    (folder / f"{name}.wave{wave_no}").touch()
    deadline = time.monotonic() + BARRIER_TIMEOUT_S
    while len(list(folder.glob(f"*.wave{wave_no}"))) < num_engines:
        if (folder / "abort").exists():
            raise RuntimeError("another engine failed")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the other engines did not finish wave {wave_no} within "
                               f"{BARRIER_TIMEOUT_S:.0f} s")
        time.sleep(0.1)


def run_engine_process(spec: dict, workdir: Path) -> dict:
    """``run_engine(spec)`` in a new Python process; its stderr goes to NAME.log."""
    spec_path = workdir / f"{spec['name']}.json"
    spec_path.write_text(json.dumps(spec))
    log_path = workdir / f"{spec['name']}.log"
    try:
        with open(log_path, "a") as log:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--engine",
                                   str(spec_path)], stdout=subprocess.PIPE, stderr=log,
                                  text=True, timeout=ENGINE_TIMEOUT_S, check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"{spec['name']} failed (exit {proc.returncode}); see {log_path}")
    except BaseException:
        (workdir / "abort").touch()  # the others stop waiting for it
        raise
    return json.loads(lines[-1])


# -- the soak ------------------------------------------------------------------------------------

def run_soak(model: str, store_url: str, num_pairs: int, workdir: Path) -> dict:
    """Run the baseline and the three engines at once, each in a process of its own (logs and
    specs in ``workdir``); return the report (``ok`` and its ``problems``, per-engine figures,
    overall hit ratios)."""
    from kvtier.cli.oracle import compare

    requests, share, num_sources = soak_plan(num_pairs)
    barrier_dir = workdir / "barrier"
    barrier_dir.mkdir(exist_ok=True)
    # vLLM alone: one wave, no resets (its own prefix cache kept).
    specs = {"baseline": {"name": "baseline", "model": model, "connector": None,
                          "waves": [requests]}}
    for k, indices in enumerate(share):
        model_id = "tiny/soak-damaged" if k == DAMAGED_ENGINE else "tiny/soak"
        specs[f"engine{k}"] = {
            "name": f"engine{k}", "model": model,
            "connector": kvtier_connector(store_url, model_id),
            "faults": {CORRUPTED_ENGINE: CORRUPT_FAULT, DAMAGED_ENGINE: DAMAGE_FAULT}.get(k),
            "waves": [[requests[i] for i in indices if i < num_sources],
                      [requests[i] for i in indices if i >= num_sources]],
            "barrier_dir": str(barrier_dir), "num_engines": NUM_ENGINES}

    started = time.perf_counter()
    with ThreadPoolExecutor(len(specs)) as pool:
        futures = {name: pool.submit(run_engine_process, spec, workdir)
                   for name, spec in specs.items()}
        results = {name: future.result() for name, future in futures.items()}
    wall_s = time.perf_counter() - started

    baseline = results["baseline"]
    problems: list[str] = []
    engines = []
    for k, indices in enumerate(share):
        name = f"engine{k}"
        result = results[name]
        mine = result
        verdict = compare(subset(baseline, indices), mine)
        m = result["metrics"]
        requested = counter(m, "kvtier_requested_tokens")
        row = {"engine": name, "requests": len(indices), "requested_tokens": requested,
               "matched_tokens": {t: counter(m, "kvtier_matched_tokens", tier=t) for t in TIERS},
               "load_errors": counter(m, "kvtier_load_errors"),
               "checksum_failures": counter(m, "kvtier_checksum_failures"),
               "dropped_offloads_g4": counter(m, "kvtier_dropped_offloads", tier="G4"),
               "put_blocks": counter(m, "kvtier_transfer_blocks", direction="g2_to_g4"),
               "remote_events": {key.split('"')[1]: value for key, value in m.items()
                                 if key.startswith("kvtier_remote_events_total{")},
               "inflight": inflight(m), "drained": result["drained"],
               "pinned": result["pinned"], "invariant_error": result["invariant_error"],
               "faults_fired": result.get("faults_fired", 0),
               "outputs_match": verdict.ok, "verdict": str(verdict)}
        row["hit_ratio"] = {t: round(v / requested, 4) if requested else 0.0
                            for t, v in row["matched_tokens"].items()}
        engines.append(row)
        if k == DAMAGED_ENGINE and verdict.ok:
            problems.append(f"{name}: a block zeroed after verification went unseen: "
                            f"{verdict}")
        elif k != DAMAGED_ENGINE and not verdict.ok:
            problems.append(f"{name}: outputs differ from vLLM alone: {verdict}")
        if any(row["inflight"].values()) or not row["inflight"] or not row["drained"]:
            problems.append(f"{name}: transfers left in flight: {row['inflight']}")
        if any(row["pinned"].values()):
            problems.append(f"{name}: tier blocks still pinned at the end: {row['pinned']}")
        if row["invariant_error"]:
            problems.append(f"{name}: tier pool invariants broken: {row['invariant_error']}")
        if specs[name]["faults"] and row["faults_fired"] != 1:
            problems.append(f"{name}: {specs[name]['faults']} fired {row['faults_fired']} "
                            "times, expected once")
        # Verification sees only the corrupted value (the zeroed block comes after it).
        corrupted = row["faults_fired"] if k == CORRUPTED_ENGINE else 0
        if row["checksum_failures"] != corrupted:
            problems.append(f"{name}: {corrupted} corrupted values, "
                            f"{row['checksum_failures']:.0f} checksum failures counted")
        # A corrupted value is the only load error allowed (it fails one block of one load).
        if row["load_errors"] > corrupted:
            problems.append(f"{name}: {row['load_errors']:.0f} load errors, "
                            f"{corrupted} values corrupted")
        if row["put_blocks"] == 0:
            problems.append(f"{name}: put nothing to the shared store")

    requested = sum(e["requested_tokens"] for e in engines)
    matched = {t: sum(e["matched_tokens"][t] for e in engines) for t in TIERS}
    if matched["G4"] == 0:
        problems.append("no engine onboarded anything from the shared store")
    return {"ok": not problems, "problems": problems, "wall_s": wall_s,
            "requests": len(requests), "engines": engines, "requested_tokens": requested,
            "hit_ratio": {t: round(v / requested, 4) if requested else 0.0
                          for t, v in matched.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="12 continuations and their sources instead of 45")
    parser.add_argument("--pairs", type=int, default=0,
                        help="continuations taken from the trace (each with its source)")
    parser.add_argument("--engine", metavar="SPEC", help=argparse.SUPPRESS)  # one engine
    args = parser.parse_args()
    if args.engine:
        result = run_engine(json.loads(Path(args.engine).read_text()))
        print(json.dumps(result), flush=True)
        return 0
    num_pairs = args.pairs or (12 if args.quick else 45)
    redis_cli = (None if shutil.which("redis-cli")
                 else "redis-cli not installed (Debian redis-tools)")
    if not require_or_note([missing_servers("redis"), redis_cli, missing_file(TRACE)],
                           "soak.py"):
        return 0
    from servers import RedisClusterServers

    from kvtier.cli.tiny_model import make_tiny_llama

    with tempfile.TemporaryDirectory(prefix="kvtier-soak-") as tmp:
        model = str(make_tiny_llama(Path(tmp) / "model"))
        with RedisClusterServers(Path(tmp) / "redis-cluster") as cluster:
            report = run_soak(model, cluster.url, num_pairs, Path(tmp))
    for row in report["engines"]:
        print(f"{row['engine']}: {row['requests']} requests, {row['requested_tokens']:.0f} "
              f"prompt tokens, hit ratio {row['hit_ratio']}, load errors "
              f"{row['load_errors']:.0f}, checksum failures {row['checksum_failures']:.0f}, "
              f"in flight {row['inflight']}; {row['verdict']}")
    print(f"{report['requests']} requests on {NUM_ENGINES} engines in {report['wall_s']:.0f} s; "
          f"hit ratio {report['hit_ratio']}")
    for problem in report["problems"]:
        print(f"FAILED: {problem}", file=sys.stderr)
    wrong = sum(1 for k, row in enumerate(report["engines"])
                if k != DAMAGED_ENGINE and not row["outputs_match"])
    damage_seen = 0 if report["engines"][DAMAGED_ENGINE]["outputs_match"] else 1
    leaked = sum(sum(row["inflight"].values()) for row in report["engines"])
    results = [
        {"metric": f"{tier.lower()}_hit_ratio", "value": report["hit_ratio"][tier],
         "unit": "fraction", "baseline": "vLLM alone", "baseline_value": 0.0, "ratio": None}
        for tier in ("G2", "G4")
    ] + [
        {"metric": "engines_with_wrong_outputs", "value": wrong, "unit": "engines",
         "baseline": "target", "baseline_value": 0, "ratio": None},
        {"metric": "zeroed_block_seen_by_oracle", "value": damage_seen, "unit": "engines",
         "baseline": "target", "baseline_value": 1, "ratio": None},
        {"metric": "blocks_in_flight_at_end", "value": leaked, "unit": "blocks",
         "baseline": "target", "baseline_value": 0, "ratio": None},
        {"metric": "soak_wall", "value": round(report["wall_s"], 1), "unit": "s",
         "baseline": None, "baseline_value": None, "ratio": None},
    ]
    print(json.dumps({"bench": "soak", "results": results}))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
