"""Prefix-aware eviction (prefix_lru, prefix_gdsf), both Belady bounds against brute force, and
the Azure-to-prefix-sessions conversion."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import random

import pytest
from policy_cases import make_trace

from kvtier.pools import BlockPool
from kvtier.replay.azure import AzurePrefixSpec, load_azure_trace
from kvtier.replay.belady import BeladyOracle
from kvtier.replay.compare import compare_policies, summarize
from kvtier.replay.simulator import CostModel
from kvtier.replay.trace import load_trace
from kvtier.tiers import Tier
from need import data_dir, need_file

AZURE_CONV = data_dir() / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv"


def serve(pool: BlockPool, chain: list[int], release_tail_first: bool = True) -> None:
    """One request: match, compute the rest, release (like the replay's device tier)."""
    held = pool.match(chain)
    fresh = pool.allocate(len(chain) - len(held))
    pool.complete(fresh)
    held += pool.register(fresh, chain[len(held):],
                          parent=chain[len(held) - 1] if held else None)
    pool.release(held[::-1] if release_tail_first else held)


def evicted_key(pool: BlockPool) -> int:
    before = {pool.key_of(b) for b in range(pool.num_blocks)} - {None}
    taken = pool.allocate(pool.num_free + 1)  # the free blocks, then one victim
    after = {pool.key_of(b) for b in range(pool.num_blocks)} - {None}
    pool.release(taken)  # unregistered: straight back to the free list
    (key,) = before - after
    return key


# -- leaf-first rule ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["prefix_lru", "prefix_gdsf"])
def test_parent_outlives_its_children_even_when_released_first(name):
    # Released head first, the parent is the oldest block; LRU (the negative control) evicts it
    # and strands 2 and 3, a leaf-first policy evicts the chain from its tail.
    for policy, expected in (("lru", [1, 2, 3]), (name, [3, 2, 1])):
        pool = BlockPool(Tier.G1, 3, eviction=policy)
        serve(pool, [1, 2, 3], release_tail_first=False)
        order = []
        for _ in range(3):
            order.append(evicted_key(pool))
            pool.check_invariants()
        assert order == expected, policy


def test_prefix_lru_victim_is_least_recent_leaf_by_brute_force():
    """Random prefix traffic; each victim is checked against a reference computed from the
    pool's own contents: the least recently released or touched block among those no other
    cached block names as parent."""
    rng = random.Random(7)
    pool = BlockPool(Tier.G1, 10, eviction="prefix_lru")
    parent_of: dict[int, int | None] = {}
    last_use: dict[int, int] = {}
    clock = 0
    checked = 0
    for _ in range(400):
        root = rng.randrange(4)
        chain = [root * 100 + d for d in range(rng.randint(1, 5))]
        if rng.random() < 0.3:  # a sibling branch under a shared prefix
            chain = chain[:2] + [root * 100 + 50 + rng.randrange(3)]
        for i, key in enumerate(chain):
            parent_of.setdefault(key, chain[i - 1] if i else None)
        if parent_of[chain[-1]] != (chain[-2] if len(chain) > 1 else None):
            continue  # keep ids chained (one parent per key)
        cached = {k for k in parent_of if k in pool}
        need = len(chain) - pool.lookup(chain)
        to_evict = max(0, need - pool.num_free)
        for _ in range(to_evict):
            cached = {k for k in parent_of if k in pool}
            leaves = [k for k in cached
                      if not any(parent_of[c] == k for c in cached)]
            expected = min(leaves, key=lambda k: last_use[k])
            assert evicted_key(pool) == expected
            checked += 1
        serve(pool, chain)
        for key in reversed(chain):  # released tail first: the head is the most recent
            clock += 1
            last_use[key] = clock
        pool.check_invariants()
    assert checked > 100


def test_prefix_lru_never_starves_when_every_block_has_children():
    # 2 is active (held) and is the only child of 1: 1 is not a leaf but must still go when
    # nothing else is evictable.
    pool = BlockPool(Tier.G2, 2, eviction="prefix_lru")
    ids = pool.allocate(2)
    pool.complete(ids)
    first, _second = pool.register(ids, [1, 2])
    pool.release([first])
    assert pool.allocate(1) == [first]
    pool.check_invariants()


def test_discarded_child_makes_its_parent_a_leaf_again():
    pool = BlockPool(Tier.G1, 4, eviction="prefix_lru")
    serve(pool, [1, 2])
    serve(pool, [5, 6])   # more recent than 1, 2
    pool.discard([2])
    # 1 is a leaf again and the least recent: it goes before 6 (5 is 6's parent).
    assert evicted_key(pool) == 1


def test_prefix_gdsf_keeps_the_shared_root_over_a_newer_leaf():
    # Root 1 is used by three conversations; when the pool must make room it evicts leaves,
    # and among leaves the one used once, never the shared root.
    pool = BlockPool(Tier.G1, 4, eviction="prefix_gdsf")
    for chain in ([1, 2], [1, 3], [1, 4]):
        serve(pool, chain)
    serve(pool, [9])  # full: one of 2, 3, 4 goes
    assert 1 in pool and 9 in pool
    for _ in range(3):
        assert evicted_key(pool) != 1 or not any(k in pool for k in (2, 3, 4, 9))


# -- bounds against brute force -----------------------------------------------------------------
def brute_force_optimum(chains: list[list[int]], capacity: int, *, prefix: bool) -> int:
    """Best total hits over every choice of what to keep after each request (bypass
    allowed): prefix hits stop at a request's first uncached block, single-block hits count
    every cached block."""

    @functools.cache
    def best(idx: int, cache: frozenset) -> int:
        if idx == len(chains):
            return 0
        chain = chains[idx]
        if prefix:
            hits = next((i for i, k in enumerate(chain) if k not in cache), len(chain))
        else:
            hits = sum(1 for k in chain if k in cache)
        pool = sorted(cache | set(chain))
        top = 0
        for size in range(min(capacity, len(pool)) + 1):
            for keep in itertools.combinations(pool, size):
                top = max(top, best(idx + 1, frozenset(keep)))
        return hits + top

    return best(0, frozenset())


def random_chained(rng: random.Random, num_requests: int) -> list[list[int]]:
    """Requests walking a small prefix tree: node id = its path, so ids are chained."""
    ids: dict[tuple, int] = {}
    chains = []
    for _ in range(num_requests):
        path: tuple = ()
        chain = []
        for _ in range(rng.randint(1, 3)):
            path += (rng.randrange(2),)
            chain.append(ids.setdefault(path, len(ids)))
        chains.append(chain)
    return chains


@pytest.mark.parametrize("seed", range(6))
def test_both_bounds_equal_brute_force_on_chained_traces(seed):
    rng = random.Random(seed)
    chains = random_chained(rng, 6)
    oracle = BeladyOracle(make_trace(chains))
    for capacity in (1, 2, 3):
        optimum = brute_force_optimum(chains, capacity, prefix=True)
        assert oracle.replay(capacity).blocks_hit == optimum, (chains, capacity)
        assert oracle.replay(capacity, prefix=False).blocks_hit == brute_force_optimum(
            chains, capacity, prefix=False) == optimum


@pytest.mark.parametrize("seed", range(4))
def test_single_block_bound_is_brute_force_and_looser_without_chaining(seed):
    # Ids that repeat after different prefixes (not chained): a prefix cache cannot hit a
    # block behind a miss, the single-block bound counts it.
    rng = random.Random(100 + seed)
    chains = [[rng.randrange(4) for _ in range(rng.randint(1, 3))] for _ in range(6)]
    chains = [list(dict.fromkeys(c)) for c in chains]  # no key twice in one request
    oracle = BeladyOracle(make_trace(chains))
    for capacity in (1, 2):
        blocks = oracle.replay(capacity, prefix=False).blocks_hit
        assert blocks == brute_force_optimum(chains, capacity, prefix=False), (chains, capacity)
        assert blocks >= brute_force_optimum(chains, capacity, prefix=True)
    loose = [[1, 2], [3, 2]]
    assert BeladyOracle(make_trace(loose)).replay(2, prefix=False).blocks_hit == 1
    assert brute_force_optimum(loose, 2, prefix=True) == 0


def test_summary_picks_the_best_policy_per_capacity():
    chains = random_chained(random.Random(3), 40)
    rows = compare_policies(make_trace(chains), [2, 4], ["lru", "prefix_gdsf", "arc"],
                            cost=CostModel(bytes_per_token=1))
    for item in summarize(rows):
        here = {r.policy: r.block_hit_ratio for r in rows
                if r.capacity_blocks == item.capacity_blocks}
        assert item.best_hit_ratio == max(here[p] for p in ("lru", "prefix_gdsf", "arc"))
        assert item.belady_hit_ratio == here["belady"] >= item.best_hit_ratio
        assert item.belady_blocks_hit_ratio == here["belady_blocks"]


# -- Azure traces as prefix sessions ------------------------------------------------------------
def write_csv(path, rows) -> None:
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    lines += [f"2023-11-16 18:{m:02d}:{s:02d}.1234567,{c},{g}" for m, s, c, g in rows]
    path.write_text("\n".join(lines) + "\n")


def test_azure_follow_up_resends_the_history(tmp_path):
    csv = tmp_path / "a.csv"
    # Second request: 1000 + 200 history plus 848 new tokens; third starts after the timeout.
    write_csv(csv, [(0, 0, 1000, 200), (0, 30, 2048, 10), (30, 0, 4096, 10)])
    spec = AzurePrefixSpec(follow_up=1.0, num_system_prompts=1, system_prompt_tokens=(512, 512),
                           block_tokens=256)
    first, second, third = load_azure_trace(csv, spec).requests
    assert second.timestamp_ms == 30_000.0 and third.timestamp_ms == 1_800_000.0
    assert len(second.hash_ids) == 8 and len(first.hash_ids) == 4
    # The first request's 3 full blocks are the second's first 3 (its partial 4th is not);
    # the history's full blocks up to 1200 tokens (4) are shared as well.
    assert second.hash_ids[:3] == first.hash_ids[:3]
    assert second.hash_ids[3] != first.hash_ids[3]
    # A new session shares only the system prompt (2 blocks of 256).
    assert third.hash_ids[:2] == first.hash_ids[:2] and third.hash_ids[2] != first.hash_ids[2]
    # Negative control: no follow-ups, so only the system prompt is shared.
    no_follow = load_azure_trace(csv, dataclasses.replace(spec, follow_up=0.0)).requests
    assert no_follow[1].hash_ids[:2] == first.hash_ids[:2]
    assert no_follow[1].hash_ids[2] != first.hash_ids[2]


def test_azure_conversion_is_deterministic_chained_and_seeded(tmp_path):
    csv = need_file(AZURE_CONV)
    one = load_azure_trace(csv, AzurePrefixSpec(seed=1), limit=2000)
    assert one == load_azure_trace(csv, AzurePrefixSpec(seed=1), limit=2000)
    other = load_azure_trace(csv, AzurePrefixSpec(seed=2), limit=2000)
    assert [r.input_length for r in one.requests] == [r.input_length for r in other.requests]
    assert [r.hash_ids for r in one.requests] != [r.hash_ids for r in other.requests]
    # The Mooncake loader checks chaining and lengths: the written trace must pass it.
    path = tmp_path / "azure.jsonl"
    one.write_jsonl(path)
    assert load_trace(path).requests == one.requests
    # It has reuse to measure: an infinite cache hits something.
    assert BeladyOracle(one).replay(10**6).blocks_hit > 0


def test_azure_bad_header_is_a_trace_error(tmp_path):
    from kvtier.errors import TraceError

    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(TraceError, match="header"):
        load_azure_trace(bad)


# -- the connector's tiers learn parents too ------------------------------------------------------
@pytest.mark.parametrize("events", [False, True])
def test_leader_tiers_link_parents_with_events_on_or_off(events):
    from kvtier.config import KvtierConfig
    from kvtier.leader import Leader

    config = KvtierConfig(host_cache_blocks=16, host_eviction_policy="prefix_lru")
    leader = Leader(config, block_tokens=4, block_bytes=64, max_blocks_per_request=8,
                    events=events)
    tokens = list(range(12))
    assert leader.match("r", tokens, 0) == 0
    leader.progress("r", tokens, 12, [0, 1, 2])
    plan = leader.take_plan()
    from kvtier.protocol import WorkerReport
    leader.on_report(WorkerReport(ops_ok=list(plan.stores.op_ids), recovered=[]))
    pool = leader.host.pool
    slots = [pool.block_of(key) for key in leader._requests["r"].hashes]
    assert None not in slots
    # Each block's parent is the block before it in the request (the policy's own record).
    assert [pool.eviction._parent[s] for s in slots] == [-1, slots[0], slots[1]]


def test_cli_replays_an_azure_csv(tmp_path, capsys):
    import json

    from kvtier.cli.replay import main as replay_main

    csv = tmp_path / "a.csv"
    write_csv(csv, [(0, i, 600 + 300 * i, 100) for i in range(8)])
    assert replay_main(["--azure", str(csv), "--block-tokens", "256", "--capacities", "6",
                        "--policies", "lru,prefix_gdsf", "--json", "--no-progress"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["policy"] for r in doc["results"]] == ["lru", "prefix_gdsf", "belady",
                                                     "belady_blocks"]
    assert doc["results"][2]["block_hit_ratio"] > 0   # the sessions share prefixes
    assert replay_main(["--azure", str(csv), "--synthetic", "--capacities", "6"]) == 2
