"""Real vLLM engines sharing KV through G4: cross-instance reuse (one Redis server, a 3-master
Redis Cluster, a SeaweedFS S3 gateway) and disaggregated prefill/decode (Mooncake Store).

Each engine runs in its own process with its own host tier and no shared disk; the only thing
the engines share is the remote store, and the kvtier engines reset vLLM's device prefix cache
before every prompt, so any reuse comes through G4. Outputs must match vLLM without kvtier
(``kvtier.cli.oracle``: float32, identical greedy tokens, logprobs within tolerance), and the
reuse must show in kvtier's metrics. ``onboard_mode: always`` keeps the machine's speed from
choosing between loading and recomputing.

The baseline is one vLLM engine without kvtier that keeps its own prefix cache across the same
sequence of prompts: prefilling on top of cached KV, the computation kvtier's runs do.
"""

from __future__ import annotations

import shutil

import pytest
from servers import RedisClusterServers, SeaweedS3Server, free_port

from kvtier.cli.demo import conversation_prompts
from kvtier.cli.oracle import compare
from kvtier.cli.vllm_job import run_job_process
from need import need, need_servers

pytestmark = pytest.mark.slow

CONNECTOR = {"name": "KvtierConnector", "module": "kvtier.connectors.vllm"}
MAX_TOKENS = 12
BLOCK = 32


@pytest.fixture(scope="module")
def turns():
    # 2 users x 2 turns on a shared system prompt; turn 2 extends turn 1's history.
    return conversation_prompts(num_users=2, num_turns=2, system_words=500,
                                turn_words=[300, 300], seed=21)


@pytest.fixture(scope="module")
def pd_prompts():
    # Prompts of their own (another seed): no prefix in common with the conversations.
    return conversation_prompts(num_users=2, num_turns=1, system_words=400, turn_words=300,
                                seed=22)[0]


def job(tiny_model, phases, connector=None):
    return {"model": tiny_model, "block_size": BLOCK, "max_model_len": 4096,
            "connector": connector, "phases": phases}


def phase(prompts, max_tokens=MAX_TOKENS):
    return {"prompts": prompts, "max_tokens": max_tokens, "reset_device_cache": True}


def kvtier(extra: dict) -> dict:
    return {**CONNECTOR, "extra": {"metrics_port": free_port(), "onboard_mode": "always",
                                   **extra}}


def metric(result, name: str, **labels) -> float:
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    key = f"{name}_total{{{label_text}}}" if labels else f"{name}_total"
    return result["metrics"].get(key, 0.0)


def assert_matches(baseline_phase: dict, result: dict) -> None:
    verdict = compare(baseline_phase, result["phases"][0])
    assert verdict.ok, verdict


@pytest.fixture(scope="module")
def baseline(tiny_model, turns, pd_prompts, tmp_path_factory):
    """vLLM alone, its prefix cache kept: [turn 1, turn 2, P/D prompts (1 token), P/D]."""
    log = str(tmp_path_factory.mktemp("logs") / "baseline.log")
    phases = [phase(turns[0]), phase(turns[1]), phase(pd_prompts, max_tokens=1),
              phase(pd_prompts)]
    for p in phases:
        p["reset_device_cache"] = False
    result = run_job_process(job(tiny_model, phases), log_path=log)
    assert all(len(o) == p["max_tokens"] for p, r in zip(phases, result["phases"])
               for o in r["outputs"])
    return result["phases"]


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    """Three masters on loopback, no replicas: keys of one batch live on different masters."""
    need_servers("redis")
    need(None if shutil.which("redis-cli") else "redis-cli not installed (Debian redis-tools)")
    with RedisClusterServers(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    need("; ".join(SeaweedS3Server.missing()))
    with SeaweedS3Server(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture(params=["redis", "redis-cluster", "s3"])
def shared_store(request, monkeypatch) -> str:
    """The URL of a store both engines reach; S3 credentials reach the engines' processes
    through the AWS chain (their environment), never the URL."""
    if request.param == "redis":
        return request.getfixturevalue("redis_server").url
    if request.param == "redis-cluster":
        return request.getfixturevalue("redis_cluster").url
    server = request.getfixturevalue("s3_server")
    for name, value in server.credentials_env().items():
        monkeypatch.setenv(name, value)
    return server.url(prefix="cross-instance")


def test_cross_instance_reuse_through_shared_store(tiny_model, turns, baseline, shared_store,
                                                   tmp_path):
    """A computes turn 1; B, with no host cache of its own, serves turn 2 (which extends turn
    1) from what A left in the store."""
    url, model_id = shared_store, "tiny/cross"
    a_extra = {"host_cache_gb": 0.2, "remote_url": url, "model_id": model_id}
    a = run_job_process(job(tiny_model, [phase(turns[0])], kvtier(a_extra)),
                        log_path=str(tmp_path / "a.log"))
    assert_matches(baseline[0], a)
    assert metric(a, "kvtier_transfer_blocks", direction="g2_to_g4") > 0
    assert metric(a, "kvtier_dropped_offloads", tier="G4") == 0

    b_extra = {"remote_url": url, "model_id": model_id}
    b = run_job_process(job(tiny_model, [phase(turns[1])], kvtier(b_extra)),
                        log_path=str(tmp_path / "b.log"))
    assert_matches(baseline[1], b)
    # Turn 2 extends turn 1, whose prompts A computed: all their full blocks (each prompt
    # loses at most its last partial block) must have come from the store.
    prefix_tokens = metric(a, "kvtier_requested_tokens")
    assert metric(b, "kvtier_matched_tokens", tier="G4") >= prefix_tokens - BLOCK * len(turns[0])
    assert metric(b, "kvtier_matched_tokens", tier="G2") == 0
    assert metric(b, "kvtier_load_errors") == 0
    assert metric(b, "kvtier_checksum_failures") == 0


def test_disaggregated_prefill_then_decode_through_mooncake(tiny_model, pd_prompts, baseline,
                                                            mooncake_server, tmp_path):
    url, model_id = mooncake_server.url, "tiny/pd"
    # Prefill instance: computes each prompt and one token; its KV goes to the store.
    extra = {"host_cache_gb": 0.2, "remote_url": url, "model_id": model_id}
    prefill = run_job_process(job(tiny_model, [phase(pd_prompts, max_tokens=1)],
                                  kvtier(extra)), log_path=str(tmp_path / "prefill.log"))
    assert_matches(baseline[2], prefill)
    assert metric(prefill, "kvtier_dropped_offloads", tier="G4") == 0

    # Decode instance: loads the prompts' KV from the store instead of prefilling them.
    extra = {"remote_url": url, "model_id": model_id}
    decode = run_job_process(job(tiny_model, [phase(pd_prompts)], kvtier(extra)),
                             log_path=str(tmp_path / "decode.log"))
    assert_matches(baseline[3], decode)
    prompt_tokens = metric(decode, "kvtier_requested_tokens")
    # Everything but each prompt's last partial block (at most BLOCK tokens) came from G4.
    assert (metric(decode, "kvtier_matched_tokens", tier="G4")
            >= prompt_tokens - BLOCK * len(pd_prompts))
    assert metric(decode, "kvtier_load_errors") == 0
