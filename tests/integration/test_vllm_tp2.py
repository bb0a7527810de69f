"""Tensor parallelism 2 on the CPU build of vLLM: kvtier's outputs match vLLM alone at TP=2.

Each rank is a worker process of its own (``VLLM_CPU_OMP_THREADS_BIND="0|1"``, one core per
rank, set by ``vllm_job``) that moves its own shard of every block; the leader commits each
operation only once both ranks reported it. Compared with a TP=2 baseline (vLLM alone, device
prefix cache reset before each prompt) by ``kvtier.cli.oracle``: float32, identical greedy
tokens, every token's logprob within tolerance. ``onboard_mode: always`` pins the compute path
and ``sync_load_max_ms: 0`` makes every load asynchronous (between steps, reported by each rank
in its own step).

Tier sizes are the whole engine's (``plan_tier_layout``): with 2 ranks every rank holds
``GB / 2`` of its shards, so a tier has ``GB // (2 x shard bytes)`` slots on each rank. The
host test sizes G2 below what the prompts offload and checks the full pool holds exactly that
many blocks; the disk test checks each rank's preallocated data file.

One rank slowed: ``slow_rank_connector`` (test only) arms ``disk.read:delay`` in rank 1's
worker process alone, so on a restart rank 1 reports each disk load steps after rank 0.

Every kvtier job ends with a pause and a short prompt, so the last asynchronous transfers have
landed and been reported by both ranks before the metrics are read: nothing may stay in flight.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from servers import free_port

from kvtier.cli.demo import conversation_prompts
from kvtier.cli.oracle import compare
from kvtier.cli.tiny_model import TINY_LLAMA
from kvtier.cli.vllm_job import run_job_process
from kvtier.layout import KVGeometry, LayoutKind
from kvtier.storage.host import slot_bytes_for

pytestmark = pytest.mark.slow

HERE = str(Path(__file__).resolve().parent)  # slow_rank_connector.py, for the workers

TP = 2
BLOCK = 32
MAX_TOKENS = 8
CONNECTOR = {"name": "KvtierConnector", "module": "kvtier.connectors.vllm"}
# One rank's shard of a block: 2 of the model's 4 KV heads.
SHARD = KVGeometry(TINY_LLAMA["num_hidden_layers"], 2, BLOCK,
                   TINY_LLAMA["num_key_value_heads"] // TP,
                   TINY_LLAMA["hidden_size"] // TINY_LLAMA["num_attention_heads"],
                   "float32", LayoutKind.VLLM_CPU)
# A short last phase after a pause: lets asynchronous transfers land and be reported.
DRAIN = {"prompts": ["w5 w6 w7 w8"], "max_tokens": 4, "reset_device_cache": True,
         "pause_s": 1.0}
# G2 slots for the host test: fewer than the ~115 distinct full blocks its prompts offload.
HOST_SLOTS = 80


@pytest.fixture(scope="module")
def turns():
    # prompts[turn][user]: 2 users on a shared system prompt; turn 1 ~0.9k tokens, turn 2
    # (extending turn 1's history) ~2.1k tokens.
    return conversation_prompts(num_users=2, num_turns=2, system_words=500,
                                turn_words=[400, 1200], seed=31)


@pytest.fixture(scope="module")
def flat(turns):
    return [p for row in turns for p in row]


def job(tiny_model, prompts, connector=None):
    phases = [{"prompts": prompts, "max_tokens": MAX_TOKENS, "reset_device_cache": True}]
    if connector:
        phases.append(DRAIN)
    return {"model": tiny_model, "block_size": BLOCK, "max_model_len": 4096,
            "tensor_parallel_size": TP, "connector": connector, "phases": phases}


def kvtier(extra: dict) -> dict:
    return {**CONNECTOR, "extra": {"metrics_port": free_port(), "onboard_mode": "always",
                                   "sync_load_max_ms": 0, **extra}}


def metric(result, key: str) -> float:
    return result["metrics"].get(key, 0.0)


def matched(result, tier: str) -> float:
    return metric(result, f'kvtier_matched_tokens_total{{tier="{tier}"}}')


def subset(phase: dict, idx: list[int]) -> dict:
    return {key: [phase[key][i] for i in idx] for key in ("outputs", "logprobs", "margins")}


def assert_clean(result) -> None:
    """No load failed, nothing is left in flight on either rank."""
    assert metric(result, "kvtier_load_errors_total") == 0
    assert metric(result, "kvtier_checksum_failures_total") == 0
    inflight = {k: v for k, v in result["metrics"].items()
                if k.startswith("kvtier_inflight_transfers")}
    assert inflight and not any(inflight.values()), inflight


def tokens(prompt: str) -> int:
    return len(prompt.split()) + 1  # the word-level tokenizer's words, plus <s>


@pytest.fixture(scope="module")
def baseline(tiny_model, flat, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("logs") / "baseline-tp2.log")
    phase = run_job_process(job(tiny_model, flat), log_path=log)["phases"][0]
    assert all(len(o) == MAX_TOKENS for o in phase["outputs"])
    return phase


def test_prompts_span_1k_to_3k_tokens(flat):
    lengths = [tokens(p) for p in flat]
    assert min(lengths) < 1000 and 2000 < max(lengths) < 3000


def test_host_tier_async_loads_tp2(tiny_model, turns, flat, baseline, tmp_path):
    # The whole engine's host cache: HOST_SLOTS blocks of both ranks' shards, plus half a
    # block. Counted per rank (the old sizing) it would be twice as many slots.
    host_gb = (HOST_SLOTS + 0.5) * TP * SHARD.block_bytes / 1e9
    result = run_job_process(job(tiny_model, flat, kvtier({"host_cache_gb": host_gb})),
                             log_path=str(tmp_path / "host.log"))
    verdict = compare(baseline, result["phases"][0])
    assert verdict.ok, verdict
    # Turn 2 extends turn 1: both users' turn-1 prompts (all but a partial last block) and
    # the shared system prompt for user 2's turn 1 came from G2.
    turn1 = sum(tokens(p) for p in turns[0])
    assert matched(result, "G2") >= turn1 - 2 * BLOCK
    assert matched(result, "G3") == 0
    assert_clean(result)
    # The prompts offload more distinct blocks than G2 holds: the pool is full at its size.
    assert metric(result, 'kvtier_tier_used_blocks{tier="G2"}') == HOST_SLOTS


DISK_GB = 0.1  # the whole engine's: 0.05 GB of shards on each rank


def disk_extra(disk_dir) -> dict:
    return {"host_cache_gb": 0, "disk_cache_gb": DISK_GB, "disk_dir": str(disk_dir),
            "disk_admission": "always"}


@pytest.fixture(scope="module")
def disk_run(tiny_model, flat, tmp_path_factory):
    """A TP=2 engine with a disk tier only ran every prompt; its directory is kept pristine
    (restarts run on copies)."""
    tmp = tmp_path_factory.mktemp("disk")
    disk_dir = tmp / "g3"
    result = run_job_process(job(tiny_model, flat, kvtier(disk_extra(disk_dir))),
                             log_path=str(tmp / "disk.log"))
    return result, disk_dir


def restart(tiny_model, turns, disk_run, tmp_path, connector=CONNECTOR, log="restart.log"):
    """A new TP=2 engine process on a copy of the disk tier serves turn 2."""
    disk_dir = tmp_path / "g3"
    shutil.copytree(disk_run[1], disk_dir)
    extra = kvtier(disk_extra(disk_dir))
    return run_job_process(job(tiny_model, turns[1], {**extra, **connector}),
                           log_path=str(tmp_path / log))


def assert_turn2_matches(baseline, flat, turns, result) -> None:
    n = len(flat)
    verdict = compare(subset(baseline, list(range(n - len(turns[1]), n))),
                      result["phases"][0])
    assert verdict.ok, verdict


def test_disk_tier_only_tp2(turns, baseline, disk_run):
    first, disk_dir = disk_run
    verdict = compare(baseline, first["phases"][0])
    assert verdict.ok, verdict
    turn1 = sum(tokens(p) for p in turns[0])
    assert matched(first, "G3") >= turn1 - 2 * BLOCK
    assert matched(first, "G2") == 0
    assert_clean(first)
    # Each rank is its own worker with its own disk tier, sized for its half of DISK_GB.
    slots = int(DISK_GB * 1e9) // (TP * SHARD.block_bytes)
    for rank in range(TP):
        data = disk_dir / f"rank{rank}" / "kvtier-g3.data"
        assert os.path.getsize(data) == slots * slot_bytes_for(SHARD), rank
    assert 0 < metric(first, 'kvtier_tier_used_blocks{tier="G3"}') <= slots


def test_restart_loads_from_disk_async_tp2(tiny_model, turns, flat, baseline, disk_run,
                                           tmp_path):
    # Restart: what both ranks journaled serves turn 2, loaded asynchronously.
    second = restart(tiny_model, turns, disk_run, tmp_path)
    assert_turn2_matches(baseline, flat, turns, second)
    turn1 = sum(tokens(p) for p in turns[0])
    assert matched(second, "G3") >= turn1 - 2 * BLOCK, "the restart must load from disk"
    assert_clean(second)


def test_restart_with_rank1_slow_disk_tp2(tiny_model, turns, flat, baseline, disk_run,
                                          tmp_path, monkeypatch):
    """Rank 1's disk reads are delayed (``disk.read:delay`` armed in its worker process only),
    so the two ranks finish each load in different steps; the leader commits a load only when
    both reported it: outputs still match, every load lands, nothing is left in flight."""
    report = tmp_path / "rank1-faults.json"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [HERE, *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("SLOW_RANK_CONNECTOR_RANK", "1")
    monkeypatch.setenv("SLOW_RANK_CONNECTOR_FAULTS", "disk.read:delay:delay_s=0.3")
    monkeypatch.setenv("SLOW_RANK_CONNECTOR_REPORT", str(report))
    slow = {"name": "SlowRankConnector", "module": "slow_rank_connector"}
    second = restart(tiny_model, turns, disk_run, tmp_path, connector=slow, log="slow.log")
    assert_turn2_matches(baseline, flat, turns, second)
    turn1 = sum(tokens(p) for p in turns[0])
    assert matched(second, "G3") >= turn1 - 2 * BLOCK
    assert_clean(second)
    fired = json.loads(report.read_text())
    assert fired["rank"] == 1 and fired["fired"] > 0, fired


def test_cross_instance_reuse_through_redis_tp2(tiny_model, turns, flat, baseline,
                                                redis_server, tmp_path):
    """TP=2 engine A computes turn 1; TP=2 engine B, without a host cache, serves turn 2 from
    what A's two ranks put in the store (each rank its own shard, keyed by rank)."""
    url, model_id = redis_server.url, "tiny/tp2"
    a = run_job_process(job(tiny_model, turns[0],
                            kvtier({"host_cache_gb": 0.05, "remote_url": url,
                                    "model_id": model_id})),
                        log_path=str(tmp_path / "a.log"))
    verdict = compare(subset(baseline, list(range(len(turns[0])))), a["phases"][0])
    assert verdict.ok, verdict
    assert metric(a, 'kvtier_transfer_blocks_total{direction="g2_to_g4"}') > 0
    assert metric(a, 'kvtier_dropped_offloads_total{tier="G4"}') == 0
    assert_clean(a)

    b = run_job_process(job(tiny_model, turns[1],
                            kvtier({"remote_url": url, "model_id": model_id})),
                        log_path=str(tmp_path / "b.log"))
    n = len(flat)
    verdict = compare(subset(baseline, list(range(n - len(turns[1]), n))), b["phases"][0])
    assert verdict.ok, verdict
    turn1 = sum(tokens(p) for p in turns[0])
    assert matched(b, "G4") >= turn1 - 2 * BLOCK
    assert matched(b, "G2") == 0
    assert_clean(b)
