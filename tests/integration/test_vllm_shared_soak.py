"""Soak: three real vLLM + kvtier engines at once sharing one 3-master Redis Cluster, under a
load derived from the Mooncake conversation trace (``benchmarks/soak.py``, which this test runs
at its ``--quick`` size and which documents the set-up).

The engines run their sources, then (once all have drained their puts) their continuations,
each continuation on another engine than its source: it must find the shared prefix in G4.
Negative controls: one engine gets one corrupted value on a G4 read (it must be caught and
recomputed, the outputs still match); another, in a namespace of its own, gets one loaded block
zeroed on the device after verification (the oracle must see its outputs differ). At the end:
the other engines' outputs match vLLM alone, nothing is in flight or pinned, the tier pools'
invariants hold, and each sharing engine onboarded blocks from G4.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
from servers import RedisClusterServers

from need import need, need_file, need_servers

pytestmark = pytest.mark.slow

SOAK_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"
NUM_PAIRS = 12  # continuations, each with its source: at most 24 requests


def load_soak():
    spec = importlib.util.spec_from_file_location("kvtier_bench_soak", SOAK_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_three_engines_share_a_redis_cluster(tiny_model, tmp_path):
    soak = load_soak()
    need_servers("redis")
    need(None if shutil.which("redis-cli") else "redis-cli not installed (Debian redis-tools)")
    need_file(soak.TRACE)
    with RedisClusterServers(tmp_path / "redis-cluster") as cluster:
        report = soak.run_soak(tiny_model, cluster.url, NUM_PAIRS, tmp_path)
    assert report["ok"], "\n".join(report["problems"])
    assert sum(row["requests"] for row in report["engines"]) == report["requests"]
    assert report["requests"] > NUM_PAIRS
    for k, row in enumerate(report["engines"]):
        if k != soak.DAMAGED_ENGINE:
            assert row["matched_tokens"]["G4"] > 0, row
    corrupted = report["engines"][soak.CORRUPTED_ENGINE]
    assert corrupted["faults_fired"] == 1 and corrupted["checksum_failures"] == 1
    assert corrupted["outputs_match"]
    damaged = report["engines"][soak.DAMAGED_ENGINE]
    assert damaged["faults_fired"] == 1 and not damaged["outputs_match"]
