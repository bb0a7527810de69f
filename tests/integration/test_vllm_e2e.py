"""End to end on the CPU build of vLLM: outputs with kvtier are token-identical to vLLM alone.

Multi-turn prompts from ~1k to ~8k tokens; vLLM's device prefix cache is reset before every
prompt, so any reuse must come from kvtier. Each engine runs in its own process (a restart is
a new process on the same disk directory).
"""

from __future__ import annotations

import os

import pytest
from servers import free_port

from kvtier.cli.demo import conversation_prompts
from kvtier.cli.vllm_job import run_job_process

pytestmark = pytest.mark.slow

CONNECTOR = {"name": "KvtierConnector", "module": "kvtier.connectors.vllm"}


@pytest.fixture(scope="module")
def prompts():
    # 2 conversations x 3 turns; turn 1 ~1k tokens, turn 3 ~8k tokens.
    return conversation_prompts(num_users=2, num_turns=3, system_words=600,
                                turn_words=[400, 3500, 3500], seed=7)


@pytest.fixture(scope="module")
def flat(prompts):
    return [p for row in prompts for p in row]


def job(tiny_model, prompts, connector=None, **extra_phases):
    phases = [{"prompts": prompts, "max_tokens": 12, "reset_device_cache": True}]
    return {"model": tiny_model, "block_size": 32, "max_model_len": 10240,
            "connector": connector, "phases": phases, **extra_phases}


def kvtier(extra: dict) -> dict:
    return {**CONNECTOR, "extra": {"metrics_port": free_port(), **extra}}


def matched(result, tier: str) -> float:
    return result["metrics"].get(f'kvtier_matched_tokens_total{{tier="{tier}"}}', 0.0)


@pytest.fixture(scope="module")
def baseline(tiny_model, flat, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("logs") / "baseline.log")
    result = run_job_process(job(tiny_model, flat), log_path=log)
    outputs = result["phases"][0]["outputs"]
    assert all(len(o) == 12 for o in outputs)
    return outputs


def test_prompts_span_1k_to_8k_tokens(flat):
    lengths = [len(p.split()) for p in flat]
    assert min(lengths) < 1500 and 7000 < max(lengths) < 10000


def test_host_tier_identical_outputs_and_determinism(tiny_model, flat, baseline, tmp_path):
    j = job(tiny_model, flat, kvtier({"host_cache_gb": 1}))
    # Determinism loop: the same prompts again, concurrently in one batch, twice.
    j["phases"] += [{"prompts": flat, "max_tokens": 12, "reset_device_cache": True,
                     "batch": True}] * 2
    result = run_job_process(j, log_path=str(tmp_path / "host.log"))
    for phase in result["phases"]:
        assert phase["outputs"] == baseline
    # Turns 2 and 3 extend turn 1's history, so they must have been served from G2.
    assert matched(result, "G2") >= 2 * 4000
    assert result["metrics"].get("kvtier_load_errors_total", 0) == 0


def test_disk_only_then_restart_with_corruption(tiny_model, flat, prompts, baseline, tmp_path):
    disk = {"host_cache_gb": 0, "disk_cache_gb": 1, "disk_dir": str(tmp_path / "g3"),
            "disk_admission": "always"}
    first = run_job_process(job(tiny_model, flat, kvtier(disk)),
                            log_path=str(tmp_path / "disk.log"))
    assert first["phases"][0]["outputs"] == baseline
    assert matched(first, "G3") >= 2 * 4000
    assert matched(first, "G2") == 0

    # Restart: a new engine process finds the blocks on disk. Corrupt some of them first:
    # they must be detected and recomputed, never served.
    data = tmp_path / "g3" / "rank0" / "kvtier-g3.data"
    slot = 4096 * ((64 + 2 * 2 * 32 * 2 * 32 * 2 + 4095) // 4096)
    with open(data, "r+b") as f:
        for i in range(100, 140, 3):  # blocks of turn 2's history, past the shared prefix
            f.seek(i * slot + 1000)
            f.write(os.urandom(16))
    last_turn = prompts[-1]
    second = run_job_process(job(tiny_model, last_turn, kvtier(disk)),
                             log_path=str(tmp_path / "restart.log"))
    assert second["phases"][0]["outputs"] == baseline[-len(last_turn):]
    assert matched(second, "G3") > 0, "after a restart the disk tier must serve hits"
    assert second["metrics"].get("kvtier_checksum_failures_total", 0) > 0
