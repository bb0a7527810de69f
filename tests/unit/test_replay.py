"""kvtier.replay: trace parsing, the multi-round QA generator, Belady, the simulator, the CLI."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest

from kvtier.cli.replay import main as replay_main
from kvtier.config import KvtierConfig
from kvtier.errors import ConfigError, TraceError
from kvtier.replay import (
    ALL_POLICIES,
    BeladyOracle,
    CostModel,
    MultiRoundQASpec,
    ReplaySimulator,
    TierSpec,
    Trace,
    TraceRequest,
    generate_multi_round_qa,
    load_trace,
    model_geometry,
    parse_capacity,
    parse_trace_lines,
    replay,
)
from kvtier.tiers import Tier
from need import data_dir, need_file

# ../shared/data beside the repository, or $TEST_DATA_DIR. Missing, the tests that read it skip,
# or fail with REQUIRE_TEST_SERVERS=1 (CI).
MOONCAKE = data_dir() / "mooncake_fast25" / "conversation_trace.jsonl"
COST = CostModel(bytes_per_token=1024)


def line(ts=0, n_in=1000, n_out=10, ids=(1, 2)) -> str:
    return json.dumps({"timestamp": ts, "input_length": n_in, "output_length": n_out,
                       "hash_ids": list(ids)})


def make_trace(chains: list[list[int]], block_tokens: int = 4) -> Trace:
    return Trace(tuple(TraceRequest(float(i), len(ids) * block_tokens, 1, tuple(ids))
                       for i, ids in enumerate(chains)), block_tokens, "test")


def generated_workload() -> Trace:
    return generate_multi_round_qa(MultiRoundQASpec(
        num_users=30, num_rounds=6, concurrent_users=8, system_prompt_tokens=64,
        history_tokens=200, question_tokens=20, answer_tokens=30, min_rounds=1,
        jitter=0.3, block_tokens=16, seed=7))


@functools.cache
def mooncake_head() -> Trace:
    return load_trace(need_file(MOONCAKE), limit=600)


SMALL_WORKLOADS = {"multi_round_qa": generated_workload, "mooncake_600": mooncake_head}


# -- trace parsing ----------------------------------------------------------------------------
def test_parse_valid_lines_and_skip_blank():
    requests = parse_trace_lines([line(0, 1000, ids=(1, 2)), "\n",
                                  line(5, 1100, ids=(1, 2, 3))], block_tokens=512)
    assert [r.hash_ids for r in requests] == [(1, 2), (1, 2, 3)]
    assert requests[1].timestamp_ms == 5.0 and requests[1].input_length == 1100


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"timestamp": 0, "input_length": 10, "output_length": 1}), "missing field 'hash_ids'"),
    (line(ts="soon"), "'timestamp' must be a number"),
    (line(ts=-1), "'timestamp' must be a number"),
    (line(n_in=-5), "'input_length' must be an integer >= 0"),
    (line(n_in=12.5), "'input_length' must be an integer"),
    (line(n_out=True), "'output_length' must be an integer"),
    (json.dumps({"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": "1,2"}),
     "'hash_ids' must be a list"),
    (line(ids=(1, "x")), r"hash_ids\[1\] must be an integer"),
    (line(n_in=2000, ids=(1, 2)), r"hash_ids has 2 entries but input_length 2000 needs"),
    (line(ts=1, ids=(9, 2)), r"hash_ids\[1\] = 2 follows id 9, but on line 1 it follows id 1"),
    (line(ts=-0.0 - 1e-3), "'timestamp' must be a number"),
])
def test_bad_line_names_line_number(bad, message):
    lines = [line(0, 1000, ids=(1, 2)), line(1, 600, ids=(1, 5)), bad]
    with pytest.raises(TraceError, match=message) as info:
        parse_trace_lines(lines, block_tokens=512, source="t.jsonl")
    assert "t.jsonl line 3" in str(info.value)


def test_timestamps_must_not_go_back():
    with pytest.raises(TraceError, match="line 2: timestamp 3 is earlier than 7 on line 1"):
        parse_trace_lines([line(7), line(3)], block_tokens=512)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(TraceError, match="no requests"):
        load_trace(empty)
    with pytest.raises(TraceError, match="cannot read trace"):
        load_trace(tmp_path / "nope.jsonl")


def test_limit_and_roundtrip(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join([line(0, 1000, ids=(1, 2)), line(1, 1500, ids=(1, 2, 3)),
                               line(2, 10, ids=(4,))]) + "\n")
    assert len(load_trace(path, limit=2)) == 2
    trace = load_trace(path)
    out = tmp_path / "copy.jsonl"
    trace.write_jsonl(out)
    assert load_trace(out).requests == trace.requests


# -- synthetic generator ----------------------------------------------------------------------
def test_generator_shares_system_prompt_and_grows_history():
    spec = MultiRoundQASpec(num_users=4, num_rounds=5, concurrent_users=1,
                            system_prompt_tokens=1100, history_tokens=700, question_tokens=90,
                            answer_tokens=130, block_tokens=256)
    trace = generate_multi_round_qa(spec)
    assert len(trace) == 4 * 5
    shared = 1100 // 256  # blocks made only of system prompt
    first_blocks = {r.hash_ids[:shared] for r in trace.requests}
    assert len(first_blocks) == 1  # every user's prompt starts with the same blocks
    # concurrent_users=1: users run one after another, 5 rounds each.
    users = [trace.requests[u * 5:(u + 1) * 5] for u in range(4)]
    for rounds in users:
        for before, after in itertools.pairwise(rounds):
            assert after.input_length == before.input_length + 130 + 90
            full = before.input_length // 256
            assert after.hash_ids[:full] == before.hash_ids[:full]  # history is re-sent
            assert len(after.hash_ids) >= len(before.hash_ids)
    # Users share nothing beyond the system prompt blocks.
    a, b = users[0][-1].hash_ids, users[1][-1].hash_ids
    assert a[shared] != b[shared]
    # The output is a valid trace: lengths match the block count, ids are chained.
    lines = [r.to_json() for r in trace.requests]
    assert parse_trace_lines(lines, block_tokens=256) == list(trace.requests)


def test_generator_is_deterministic_and_varies_with_seed():
    spec = MultiRoundQASpec(num_users=6, num_rounds=4, min_rounds=1, jitter=0.5,
                            poisson=True, seed=3)
    assert generate_multi_round_qa(spec).requests == generate_multi_round_qa(spec).requests
    other = MultiRoundQASpec(num_users=6, num_rounds=4, min_rounds=1, jitter=0.5, poisson=True,
                             seed=4)
    assert generate_multi_round_qa(other).requests != generate_multi_round_qa(spec).requests


def test_generator_rejects_bad_specs():
    with pytest.raises(ConfigError, match="qps"):
        MultiRoundQASpec(qps=0)
    with pytest.raises(ConfigError, match="min_rounds"):
        MultiRoundQASpec(num_rounds=3, min_rounds=4)


# -- Belady -----------------------------------------------------------------------------------
def infinite_cache_hits(trace: Trace) -> int:
    seen: set[int] = set()
    hits = 0
    for request in trace.requests:
        keys = request.cacheable_ids(trace.block_tokens)   # full blocks only, as engines cache
        for key in keys:
            if key not in seen:
                break
            hits += 1
        seen.update(keys)
    return hits


@pytest.mark.parametrize("workload", SMALL_WORKLOADS)
def test_belady_bounds_every_policy(workload):
    trace = SMALL_WORKLOADS[workload]()
    oracle = BeladyOracle(trace)
    unique = oracle.num_unique_blocks
    for capacity in (max(2, unique // 50), unique // 10, unique // 3):
        bound = oracle.replay(capacity).blocks_hit
        for policy in ALL_POLICIES:
            got = replay(trace, [TierSpec(Tier.G1, capacity, eviction=policy)], cost=COST)
            assert got.total.blocks_hit <= bound, (policy, capacity)
    assert oracle.replay(unique).blocks_hit == infinite_cache_hits(trace)


def test_belady_small_example():
    # Capacity 2: keep what is used next, not what was used last.
    trace = make_trace([[1, 2], [3], [1, 2], [3], [1, 2]])
    assert BeladyOracle(trace).replay(2).blocks_hit == 4
    assert BeladyOracle(trace).replay(3).blocks_hit == 5


# -- simulator --------------------------------------------------------------------------------
def reference_lru_hits(trace: Trace, capacity: int) -> int:
    """Independent LRU: prefix hits, then the request's blocks inserted tail first."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for request in trace.requests:
        keys = request.cacheable_ids(trace.block_tokens)
        k = 0
        while k < len(keys) and keys[k] in cache:
            k += 1
        hits += k
        for key in reversed(keys[:k + min(len(keys) - k, capacity - k)]):
            cache[key] = None
            cache.move_to_end(key)
        # The pool keeps the request's own blocks (active) and evicts others first.
        while len(cache) > capacity:
            cache.popitem(last=False)
    return hits


@pytest.mark.parametrize("workload", SMALL_WORKLOADS)
def test_lru_replay_matches_reference(workload):
    trace = SMALL_WORKLOADS[workload]()
    for capacity in (20, 200, 2000):
        got = replay(trace, [TierSpec(Tier.G1, capacity)], cost=COST)
        assert got.total.blocks_hit == reference_lru_hits(trace, capacity), capacity


def test_lru_matches_data_readme_sanity_numbers():
    trace = load_trace(need_file(MOONCAKE))
    bt = trace.block_tokens
    # shared/data/README.md caches every block, a prompt's partial last one too, where an
    # engine caches full blocks only: with each prompt padded to full blocks the replay gives
    # its LRU token hit ratios over the real prompts, 4.5 % at 1,000 blocks, 31.3 % at 24,000.
    padded = dataclasses.replace(trace, requests=tuple(
        dataclasses.replace(r, input_length=len(r.hash_ids) * bt) for r in trace.requests))
    tokens = sum(r.input_length for r in trace.requests)
    for capacity, expected in ((1000, 0.045), (24000, 0.313)):
        got = replay(padded, [TierSpec(Tier.G1, capacity)], cost=COST).total.tokens_hit
        assert abs(got / tokens - expected) < 0.0006, (capacity, got / tokens)
        # As it is, a partial block is never hit: every hit saves a whole block's tokens
        # (exact repeats of a prompt hit their partial block when it is cached).
        real = replay(trace, [TierSpec(Tier.G1, capacity)], cost=COST).total
        assert real.tokens_hit == real.blocks_hit * bt


@pytest.mark.parametrize("policy", ["lru", *ALL_POLICIES[1:]])
def test_simulated_pools_keep_invariants(policy):
    trace = generated_workload()
    sim = ReplaySimulator([TierSpec(Tier.G1, 30, eviction=policy),
                           TierSpec(Tier.G2, 80, eviction=policy),
                           TierSpec(Tier.G3, 200, eviction=policy, admission="tinylfu")],
                          block_tokens=trace.block_tokens, cost=COST)
    sim.run(trace)
    for pool in sim.pools:
        pool.check_invariants()
        assert pool.num_active == 0  # every request released what it held


def test_tiers_add_hits_and_account_bytes():
    trace = generated_workload()
    device_only = replay(trace, [TierSpec(Tier.G1, 30)], cost=COST)
    tiered = replay(trace, [TierSpec(Tier.G1, 30), TierSpec(Tier.G2, 100),
                            TierSpec(Tier.G3, 400, admission="always")], cost=COST)
    total = tiered.total
    assert total.blocks_hit > device_only.total.blocks_hit
    by_tier = {t.tier: t for t in tiered.tiers}
    assert sum(t.blocks_hit for t in tiered.tiers) == total.blocks_hit
    # G1 sees exactly the same requests with or without lower tiers below it.
    assert by_tier[Tier.G1].blocks_hit == device_only.total.blocks_hit
    block_bytes = trace.block_tokens * COST.bytes_per_token
    for tier in (Tier.G2, Tier.G3):
        stats = by_tier[tier]
        assert stats.offload_bytes == stats.blocks_written * block_bytes
        assert 0 < stats.onboard_bytes <= stats.tokens_hit * COST.bytes_per_token
    assert by_tier[Tier.G3].rejected == 0
    assert 0 < tiered.ttft_saved_s < tiered.ttft_baseline_s


def test_lower_tiers_are_the_connectors_leader():
    # The replay's tiers are the leader's own pools and its hits the leader's own counts, so
    # a change in the connector's tier logic changes the replay's predictions with it.
    trace = generated_workload()
    sim = ReplaySimulator([TierSpec(Tier.G1, 30), TierSpec(Tier.G2, 40),
                           TierSpec(Tier.G3, 60, admission="always"), TierSpec(Tier.G4, 400)],
                          block_tokens=trace.block_tokens, cost=COST)
    result = sim.run(trace)
    leader = sim.leader
    assert sim.pools[1] is leader.g2 and sim.pools[2] is leader.g3
    by_tier = {t.tier: t for t in result.tiers}
    for tier in (Tier.G2, Tier.G3, Tier.G4):
        loaded = by_tier[tier].blocks_hit - by_tier[tier].not_onboarded_blocks
        assert loaded == leader.metrics.value("kvtier_matched_blocks", tier=tier.name), tier
    assert by_tier[Tier.G4].blocks_hit > 0   # found through the leader's probes of the store
    assert not leader.busy
    leader.check_invariants()


def test_a_tier_without_a_policy_runs_the_connector_s_default(monkeypatch):
    # What a user gets without choosing, so `kvtier replay` and the benchmark predict it. The
    # defaults are changed here so that a replay hard-wired to LRU fails.
    monkeypatch.setattr(KvtierConfig, "host_eviction_policy", "arc")
    monkeypatch.setattr(KvtierConfig, "disk_eviction_policy", "prefix_gdsf")
    sim = ReplaySimulator([TierSpec(Tier.G1, 30), TierSpec(Tier.G2, 40), TierSpec(Tier.G3, 60)],
                          block_tokens=16, cost=COST)
    assert [pool.eviction.name for pool in sim.pools] == ["lru", "arc", "prefix_gdsf"]
    assert sim.leader.g2.eviction.name == "arc"
    assert sim.leader.g3.eviction.name == "prefix_gdsf"


def test_disk_admission_gates_writes():
    trace = generated_workload()
    never = replay(trace, [TierSpec(Tier.G1, 30), TierSpec(Tier.G3, 400, admission="never")],
                   cost=COST)
    freq = replay(trace, [TierSpec(Tier.G1, 30), TierSpec(Tier.G3, 400, admission="frequency")],
                  cost=COST)
    always = replay(trace, [TierSpec(Tier.G1, 30),
                            TierSpec(Tier.G3, 400, admission="always")], cost=COST)
    g3 = [next(t for t in r.tiers if t.tier == Tier.G3) for r in (never, freq, always)]
    assert g3[0].blocks_written == 0 and g3[0].blocks_hit == 0
    assert g3[0].rejected == g3[0].offers > 0
    assert 0 < g3[1].blocks_written < g3[2].blocks_written  # the filter saves SSD writes
    assert g3[1].admission == "frequency"


def test_default_disk_admission_filters_only_below_a_caching_host_tier():
    # The connector's default ("auto"): with nothing above the disk to keep a block's first
    # copy, the frequency filter would leave a first sighting uncached anywhere.
    trace = generated_workload()
    alone = replay(trace, [TierSpec(Tier.G1, 30), TierSpec(Tier.G3, 400)], cost=COST)
    filtered = replay(trace, [TierSpec(Tier.G1, 30), TierSpec(Tier.G3, 400, admission="frequency")],
                      cost=COST)
    below_host = replay(trace, [TierSpec(Tier.G1, 30), TierSpec(Tier.G2, 40),
                                TierSpec(Tier.G3, 400)], cost=COST)
    assert alone.tiers[1].admission == "always" and below_host.tiers[2].admission == "frequency"
    assert alone.total.blocks_hit > filtered.total.blocks_hit


def test_slow_tier_is_not_onboarded():
    trace = generated_workload()
    # A 1 MB/s disk is slower than recompute: its hits are recomputed, saving nothing.
    result = replay(trace, [TierSpec(Tier.G1, 30),
                            TierSpec(Tier.G3, 400, admission="always", read_gbps=0.001)],
                    cost=COST)
    g3 = result.tiers[1]
    assert g3.blocks_hit > 0 and g3.onboard_bytes == 0 and g3.ttft_saved_s == 0
    assert g3.not_onboarded_blocks == g3.blocks_hit


def test_capacity_units():
    geometry = model_geometry()  # Llama-3.1-8B bf16: 128 KiB per token, 64 MiB per block
    assert geometry.block_bytes == 512 * 131072
    assert parse_capacity("24000", geometry.block_bytes) == 24000
    assert parse_capacity("64GiB", geometry.block_bytes) == 1024
    assert parse_capacity("1.5 TB", geometry.block_bytes) == int(1.5e12 // (64 * 2**20))
    for bad in ("12XB", "-3", "1.5", "0", "1KB"):
        with pytest.raises(ConfigError):
            parse_capacity(bad, geometry.block_bytes)
    with pytest.raises(ConfigError, match="dtype"):
        model_geometry(dtype="int3")


# -- CLI --------------------------------------------------------------------------------------
def write_trace(path: Path) -> Path:
    trace = generate_multi_round_qa(MultiRoundQASpec(
        num_users=12, num_rounds=4, concurrent_users=4, history_tokens=1500, seed=1))
    trace.write_jsonl(path)
    return path


def test_cli_comparison_json_last_line(tmp_path, capsys):
    trace = write_trace(tmp_path / "t.jsonl")
    png = tmp_path / "chart.png"
    code = replay_main(["--trace", str(trace), "--block-tokens", "512", "--capacities", "10,40",
                        "--policies", "lru,arc", "--json", "--no-progress", "--plot", str(png)])
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    doc = json.loads(out[-1])
    assert list(doc) == ["results", "summary"]
    rows = doc["results"]
    assert {(r["policy"], r["capacity_blocks"]) for r in rows} == {
        (p, c) for p in ("lru", "arc", "belady", "belady_blocks") for c in (10, 40)}
    by = {(r["policy"], r["capacity_blocks"]): r["block_hit_ratio"] for r in rows}
    for item in doc["summary"]:
        cap = item["capacity_blocks"]
        assert item["best_policy"] in ("lru", "arc")
        assert item["best_hit_ratio"] == max(by["lru", cap], by["arc", cap])
        assert item["best_vs_lru"] == pytest.approx(item["best_hit_ratio"] / by["lru", cap])
        assert item["best_vs_belady"] == pytest.approx(item["best_hit_ratio"]
                                                       / by["belady", cap])
    for row in rows:
        assert set(row) == {"policy", "capacity_blocks", "block_hit_ratio", "token_hit_ratio"}
        assert 0 <= row["block_hit_ratio"] <= 1 and 0 <= row["token_hit_ratio"] <= 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_all_policies(tmp_path, capsys):
    trace = write_trace(tmp_path / "t.jsonl")
    assert replay_main(["--trace", str(trace), "--capacities", "30", "--policies", "all",
                        "--json", "--no-progress"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    assert [r["policy"] for r in rows] == [*ALL_POLICIES, "belady", "belady_blocks"]


def test_cli_tiered_json(tmp_path, capsys):
    trace = write_trace(tmp_path / "t.jsonl")
    assert replay_main(["--trace", str(trace), "--g1", "10", "--g2", "1GB", "--g3", "40",
                        "--g3-policy", "s3fifo", "--json", "--no-progress"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [t["tier"] for t in doc["tiers"]] == ["G1", "G2", "G3"]
    assert doc["tiers"][1]["capacity_blocks"] == int(1e9 // (512 * 131072))
    assert doc["tiers"][2]["eviction"] == "s3fifo"
    assert doc["tiers"][2]["admission"] == "frequency"
    assert 0 <= doc["ttft_saving_ratio"] < 1


def test_cli_synthetic(capsys, tmp_path):
    saved = tmp_path / "syn.jsonl"
    assert replay_main(["--synthetic", "--users", "5", "--rounds", "3", "--capacities", "20",
                        "--policies", "lru", "--json", "--no-progress",
                        "--save-trace", str(saved)]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    assert [r["policy"] for r in rows] == ["lru", "belady", "belady_blocks"]
    assert len(load_trace(saved)) == 15


@pytest.mark.parametrize("argv, message", [
    (["--capacities", "10"], "line 2: missing field 'hash_ids'"),
    (["--capacities", "10", "--policies", "lru,nope"], "policy 'nope' is not known"),
    (["--capacities", "ten"], "is not a size"),
    ([], "give --capacities"),
    (["--g2", "10"], "--g1"),
    (["--g1", "10", "--plot", "x.png"], "--plot"),
])
def test_cli_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(line(0, 1000, ids=(1, 2)) + "\n" +
                   json.dumps({"timestamp": 1, "input_length": 3, "output_length": 1}) + "\n")
    code = replay_main(["--trace", str(bad), "--no-progress", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and message in err[0] and err[0].startswith("kvtier replay: error:")


def test_cli_module_entry_point(tmp_path):
    trace = write_trace(tmp_path / "t.jsonl")
    proc = subprocess.run([sys.executable, "-m", "kvtier.cli.replay", "--trace", str(trace),
                           "--capacities", "10", "--policies", "lru", "--json"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["results"][0]["policy"] == "lru"
    assert "req" in proc.stderr  # the progress bar goes to stderr
