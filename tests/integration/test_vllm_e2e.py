"""End to end on the CPU build of vLLM: outputs with kvtier match vLLM alone.

Multi-turn prompts from ~1k to ~8k tokens; vLLM's device prefix cache is reset before every
prompt, so any reuse must come from kvtier. Each engine runs in its own process (a restart is
a new process on the same disk directory). Engines run in float32 and are compared by
``kvtier.cli.oracle``: identical greedy tokens and every token's logprob within its tolerance.
``onboard_mode: always`` pins the compute path (load, never a timing-based recompute).

The negative controls prove the oracle sees wrong KV: with one block damaged after
verification (the ``onboard.bypass`` fault hook), the same check must fail.
"""

from __future__ import annotations

import os
import re

import pytest
from servers import free_port

from kvtier.cli.demo import conversation_prompts
from kvtier.cli.oracle import LOGPROB_TOLERANCE, compare
from kvtier.cli.tiny_model import TINY_LLAMA
from kvtier.cli.vllm_job import run_job_process
from kvtier.layout import KVGeometry, LayoutKind
from kvtier.storage.host import slot_bytes_for

pytestmark = pytest.mark.slow

CONNECTOR = {"name": "KvtierConnector", "module": "kvtier.connectors.vllm"}


@pytest.fixture(scope="module", autouse=True)
def engine_logs_in_log_files():
    """vLLM logs to stdout, which ``run_job_process`` reads for the result only: send vLLM's
    log (and kvtier's, which follows it) to stderr, so each engine's log file holds it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        yield


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
    return {**CONNECTOR, "extra": {"metrics_port": free_port(), "onboard_mode": "always",
                                   **extra}}


def subset(phase: dict, idx: list[int]) -> dict:
    return {key: [phase[key][i] for i in idx] for key in ("outputs", "logprobs", "margins")}


def matched(result, tier: str) -> float:
    return result["metrics"].get(f'kvtier_matched_tokens_total{{tier="{tier}"}}', 0.0)


@pytest.fixture(scope="module")
def baseline(tiny_model, flat, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("logs") / "baseline.log")
    result = run_job_process(job(tiny_model, flat), log_path=log)
    phase = result["phases"][0]
    assert all(len(o) == 12 for o in phase["outputs"])
    return phase


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
        verdict = compare(baseline, phase)
        assert verdict.ok, verdict
    # Turns 2 and 3 extend turn 1's history, so they must have been served from G2.
    assert matched(result, "G2") >= 2 * 4000
    assert result["metrics"].get("kvtier_load_errors_total", 0) == 0


def test_evicting_tiers_with_adaptive_policies_keep_outputs_identical(tiny_model, flat, baseline,
                                                                      tmp_path):
    # A host tier smaller than the prompts' blocks (about 500 unique, 32 tokens each), run by
    # ``dueling``, over a disk tier run by ``prefix_reuse``: both evict inside the real engine.
    host_slots = 320
    tiers = {"host_cache_blocks": host_slots, "host_eviction_policy": "dueling",
             "disk_cache_blocks": 400, "disk_dir": str(tmp_path / "g3"),
             "disk_eviction_policy": "prefix_reuse", "disk_admission": "always"}
    result = run_job_process(job(tiny_model, flat, kvtier(tiers)),
                             log_path=str(tmp_path / "policies.log"))
    verdict = compare(baseline, result["phases"][0])
    assert verdict.ok, verdict
    metrics = result["metrics"]
    assert metrics['kvtier_transfer_blocks_total{direction="g1_to_g2"}'] > host_slots  # evicted
    assert metrics['kvtier_tier_used_blocks{tier="G2"}'] <= host_slots
    assert matched(result, "G2") >= 2 * 4000 and matched(result, "G3") > 0
    # Every promised hit loaded: staging disk blocks into the full host tier once evicted host
    # blocks the same load was about to pin (55 of 846 blocks failed and were recomputed).
    assert metrics.get("kvtier_load_errors_total", 0) == 0


def test_disk_only_then_restart_with_corruption(tiny_model, flat, prompts, baseline, tmp_path):
    disk = {"host_cache_gb": 0, "disk_cache_gb": 1, "disk_dir": str(tmp_path / "g3"),
            "disk_admission": "always"}
    first = run_job_process(job(tiny_model, flat, kvtier(disk)),
                            log_path=str(tmp_path / "disk.log"))
    verdict = compare(baseline, first["phases"][0])
    assert verdict.ok, verdict
    assert matched(first, "G3") >= 2 * 4000
    assert matched(first, "G2") == 0

    # Restart: a new engine process finds the blocks on disk. Corrupt some of them first:
    # they must be detected and recomputed, never served.
    data = tmp_path / "g3" / "rank0" / "kvtier-g3.data"
    geometry = KVGeometry(TINY_LLAMA["num_hidden_layers"], 2, 32,
                          TINY_LLAMA["num_key_value_heads"],
                          TINY_LLAMA["hidden_size"] // TINY_LLAMA["num_attention_heads"],
                          "float32", LayoutKind.VLLM_CPU)
    slot = slot_bytes_for(geometry)
    with open(data, "r+b") as f:
        for i in range(100, 140, 3):  # blocks of turn 2's history, past the shared prefix
            f.seek(i * slot + 1000)
            f.write(os.urandom(16))
    last_turn = prompts[-1]
    second = run_job_process(job(tiny_model, last_turn, kvtier(disk)),
                             log_path=str(tmp_path / "restart.log"))
    n = len(flat)
    verdict = compare(subset(baseline, list(range(n - len(last_turn), n))), second["phases"][0])
    assert verdict.ok, verdict
    assert matched(second, "G3") > 0, "after a restart the disk tier must serve hits"
    assert second["metrics"].get("kvtier_checksum_failures_total", 0) > 0


# -- negative controls: the oracle must see wrong KV ----------------------------------------

# One engine, prompts: another conversation's first turn, then the longest (~8k-token) prompt
# six times. From its second run on, its whole prefix loads from G2 (the first load, of the
# shared system prompt, is skipped by ``after=1``) and the fault hook damages one load each:
DAMAGES = ["zero",   # one block in the middle zeroed on the device, after verification
           "swap",   # that block replaced with a block of another prompt
           "shift",  # every block one position off
           "flip",   # a byte flipped in the host arena before verification: must be caught
           None]     # nothing: the damage before must not have stuck anywhere
FAULTS = ",".join([f"onboard.bypass:{kind}:after=1:times=1" for kind in DAMAGES[:3]]
                  + ["host.load:flip:after=4:times=1"])


@pytest.fixture(scope="module")
def damaged(tiny_model, flat, tmp_path_factory):
    other, longest = 1, len(flat) - 2  # user 2's turn 1; user 1's turn 3
    prompts = [flat[other]] + [flat[longest]] * (1 + len(DAMAGES))
    j = job(tiny_model, prompts, kvtier({"host_cache_gb": 1}))
    j["faults"] = FAULTS
    log = str(tmp_path_factory.mktemp("logs") / "damaged.log")
    result = run_job_process(j, log_path=log)
    assert result["faults_fired"] == 4
    result["log_path"] = log
    return [other] + [longest] * (1 + len(DAMAGES)), result


def test_runs_around_the_damage_match(baseline, damaged):
    index, result = damaged
    clean = [0, 1] + [2 + DAMAGES.index(kind) for kind in ("flip", None)]
    verdict = compare(subset(baseline, [index[i] for i in clean]),
                      subset(result["phases"][0], clean))
    assert verdict.ok, verdict
    assert matched(result, "G2") >= 5 * 7000, "the repeats must load their prefix from G2"


@pytest.mark.parametrize("damage", ["zero", "swap", "shift"])
def test_oracle_fails_on_wrong_kv(baseline, damaged, damage):
    """With verification bypassed, one wrong block (or every block one position off) in an
    ~8k-token prefix must fail the check, by well more than its tolerance."""
    index, result = damaged
    i = 2 + DAMAGES.index(damage)
    verdict = compare(subset(baseline, [index[i]]), subset(result["phases"][0], [i]))
    assert not verdict.ok, f"wrong KV ({damage}) went unnoticed: {verdict}"
    # Not a near miss: measured 7e-3 (shift) to 8e-2 (zero) against noise of ~2e-5.
    assert verdict.max_logprob_diff > 5 * LOGPROB_TOLERANCE, verdict


def test_corrupt_host_block_is_counted_and_recomputed(damaged):
    """The flipped host block was caught by G2 verification, counted, and recomputed by vLLM
    (its output matches: test_runs_around_the_damage_match)."""
    _, result = damaged
    assert result["metrics"].get("kvtier_checksum_failures_total", 0) >= 1
    assert result["metrics"].get("kvtier_load_errors_total", 0) >= 1


# vLLM's format: "(PROCESS pid=N) LEVEL MM-DD HH:MM:SS [FILE:LINE] message" (vllm/logger.py).
VLLM_INFO_LINE = re.compile(r"\(.+ pid=\d+\) INFO \d\d-\d\d \d\d:\d\d:\d\d \[[^\]]+:\d+\] ")


def test_kvtier_startup_line_in_the_engine_log(damaged):
    """kvtier's start-up summary reaches vLLM's log once, in vLLM's format (``kvtier.logs``;
    without it kvtier's INFO lines reach no handler at all)."""
    _, result = damaged
    with open(result["log_path"]) as f:
        lines = [line.rstrip("\n") for line in f if "kvtier: tiers " in line]
    assert len(lines) == 1, lines
    prefix = VLLM_INFO_LINE.match(lines[0])
    assert prefix, lines[0]
    assert lines[0][prefix.end():].startswith("kvtier: tiers G2 host 1.00 GB ("), lines[0]
    assert "hash_mode=xxh3, onboard_mode=always" in lines[0]
