"""The leader's G4 bookkeeping, driven directly: probes, remote loads and puts, pins, faults."""

import time

from kvtier.config import KvtierConfig
from kvtier.hashing import salt_hash
from kvtier.leader import Leader
from kvtier.protocol import NO_SLOT, LoadResult, WorkerReport
from kvtier.tiers import Tier

BT = 16
URL = "redis://127.0.0.1:1/0"


def make(**kw) -> Leader:
    cfg = KvtierConfig(onboard_mode="always", remote_url=URL, **kw)
    return Leader(cfg, block_tokens=BT, block_bytes=4096, max_blocks_per_request=64)


def tokens_of(num_blocks: int, extra: int = 1, seed: int = 3) -> list[int]:
    return list(range(seed, seed + num_blocks * BT + extra))


def keys_of(leader: Leader, tokens: list[int]) -> list:
    return leader.hasher.hash_blocks(tokens, salt=salt_hash())


def probe(leader: Leader, req_id: str, tokens: list[int], num_present: int) -> list:
    """match() asks for a probe; the workers answer ``num_present``. Returns the keys asked."""
    assert leader.match(req_id, tokens, 0) is None, "the store must be asked first"
    plan = leader.take_plan()
    ((op_id, keys),) = plan.remote_probes.items()
    leader.on_report(WorkerReport(remote_present={op_id: num_present}))
    return keys


def test_probe_then_match_and_onboard_through_staging():
    leader = make()
    tokens = tokens_of(5)
    asked = probe(leader, "r", tokens, 3)
    assert asked == keys_of(leader, tokens)
    assert leader.match("r", tokens, 0) == 3 * BT
    assert leader.onboard_split("r") == {}
    leader.begin_onboard("r", [10, 11, 12, 13, 14, 15], 3 * BT)
    assert leader.onboard_split("r") == {Tier.G4: 3 * BT}
    (op,) = leader.take_plan().loads
    assert op.remote_idx == [0, 1, 2]
    assert op.g3_slots == [NO_SLOT] * 3 and NO_SLOT not in op.g2_slots
    op.validate()
    assert leader.g2.num_active == 3, "staging slots are pinned while the read runs"
    leader.on_report(WorkerReport(loads=[LoadResult("r", [], [], op_id=op.op_id)]))
    assert leader.g2.num_active == 0 and not leader.busy
    assert leader.metrics.value("kvtier_matched_tokens", tier="G4") == 3 * BT
    # Without a host cache, staging slots cache nothing.
    assert leader.g2.num_registered == 0


def test_remote_hits_are_promoted_into_the_host_tier_and_not_probed_again():
    leader = make(host_cache_blocks=64)
    tokens = tokens_of(4)
    probe(leader, "r", tokens, 4)
    assert leader.match("r", tokens, 0) == 4 * BT
    leader.begin_onboard("r", [1, 2, 3, 4, 5], 4 * BT)
    (op,) = leader.take_plan().loads
    leader.on_report(WorkerReport(loads=[LoadResult("r", [], [], op_id=op.op_id)]))
    leader.finish("r")
    assert leader.g2.num_registered == 4
    assert leader.match("s", tokens, 0) == 4 * BT, "on the host now: no probe"
    assert not leader.take_plan().remote_probes


def test_known_keys_match_without_a_probe_and_failed_reads_forget_them():
    leader = make()
    tokens = tokens_of(3)
    probe(leader, "r", tokens, 3)
    leader.finish("r")
    assert leader.match("s", tokens, 0) == 3 * BT, "keys learnt from an earlier probe"
    assert not leader.take_plan().remote_probes
    leader.begin_onboard("s", [1, 2, 3, 4], 3 * BT)
    (op,) = leader.take_plan().loads
    leader.on_report(WorkerReport(loads=[LoadResult("s", [1, 2], [], op_id=op.op_id)]))
    keys = keys_of(leader, tokens)
    assert leader.remote_holds(keys[0])
    assert not leader.remote_holds(keys[1]) and not leader.remote_holds(keys[2])
    assert leader.metrics.value("kvtier_load_errors") == 2
    assert leader.metrics.value("kvtier_matched_tokens", tier="G4") == BT
    assert leader.g2.num_active == 0


def test_unanswered_probe_matches_without_the_store_after_a_deadline():
    leader = make(remote_timeout_ms=1)
    tokens = tokens_of(3)
    assert leader.match("r", tokens, 0) is None
    (op_id,) = leader.take_plan().remote_probes
    assert leader.match("r", tokens, 0) is None, "still waiting for the answer"
    time.sleep(0.6)  # past 2 x timeout + 0.5 s
    assert leader.match("r", tokens, 0) == 0
    assert leader.metrics.value("kvtier_remote_events", event="probe_timeouts") == 1
    # A late answer changes nothing.
    leader.on_report(WorkerReport(remote_present={op_id: 3}))
    assert leader.match("r", tokens, 0) == 0


def test_unhealthy_store_is_neither_probed_nor_written():
    leader = make(host_cache_blocks=64)
    tokens = tokens_of(3)
    assert leader.match("r", tokens, 0) is None
    leader.take_plan()
    leader.on_report(WorkerReport(remote_healthy=False))
    assert leader.match("r", tokens, 0) == 0, "a waiting request goes on without G4"
    assert leader.metrics.value("kvtier_remote_healthy") == 0
    leader.progress("r", tokens, len(tokens), [1, 2, 3])
    plan = leader.take_plan()
    leader.on_report(WorkerReport(ops_ok=list(plan.stores.op_ids)))
    assert len(leader.take_plan().remote_puts) == 0
    assert leader.metrics.value("kvtier_dropped_offloads", tier="G4") == 3
    assert leader.match("s", tokens + [1] * BT, 0) == 3 * BT, "no probe while down"
    assert not leader.take_plan().remote_probes
    leader.on_report(WorkerReport(remote_healthy=True))
    assert leader.match("t", tokens + [2] * BT, 0) is None, "probing again once it is back"


def test_confirmed_stores_are_put_and_remembered():
    leader = make(host_cache_blocks=64)
    tokens = tokens_of(3)
    probe(leader, "r", tokens, 0)
    assert leader.match("r", tokens, 0) == 0
    leader.progress("r", tokens, len(tokens), [7, 8, 9])
    plan = leader.take_plan()
    assert len(plan.remote_puts) == 0, "not before the host holds the bytes"
    leader.on_report(WorkerReport(ops_ok=list(plan.stores.op_ids)))
    puts = leader.take_plan().remote_puts
    assert puts.keys == keys_of(leader, tokens)
    assert leader.g2.num_active == 3, "put sources are pinned"
    leader.on_report(WorkerReport(ops_ok=puts.op_ids[:2], ops_failed=puts.op_ids[2:]))
    assert leader.g2.num_active == 0
    keys = keys_of(leader, tokens)
    assert leader.remote_holds(keys[0]) and leader.remote_holds(keys[1])
    assert not leader.remote_holds(keys[2])
    assert leader.metrics.value("kvtier_dropped_offloads", tier="G4") == 1
    # Offered again (another request): only the block the store does not hold is put.
    leader.finish("r")
    assert leader.match("s", tokens, 0) == 3 * BT
    leader.begin_onboard("s", [1, 2, 3, 4], 3 * BT)
    leader.progress("s", tokens, len(tokens), [1, 2, 3])
    plan = leader.take_plan()
    assert plan.remote_puts.keys == [keys[2]]


def test_remote_only_stages_just_what_the_store_admits():
    leader = make(remote_admission="frequency")
    tokens = tokens_of(2)
    probe(leader, "r", tokens, 0)
    leader.match("r", tokens, 0)
    leader.progress("r", tokens, len(tokens), [1, 2])
    assert len(leader.take_plan().stores) == 0, "first offer: not admitted, nothing staged"
    probe(leader, "s", tokens, 0)
    leader.match("s", tokens, 0)
    leader.progress("s", tokens, len(tokens), [3, 4])
    plan = leader.take_plan()
    assert plan.stores.src == [3, 4]
    leader.on_report(WorkerReport(ops_ok=list(plan.stores.op_ids)))
    puts = leader.take_plan().remote_puts
    assert len(puts) == 2
    leader.on_report(WorkerReport(ops_ok=list(puts.op_ids)))
    assert leader.g2.num_active == 0 and leader.g2.num_registered == 0


def test_disk_write_and_remote_put_share_one_pin(tmp_path):
    leader = make(disk_cache_blocks=16, disk_dir=str(tmp_path), disk_admission="always")
    leader.disk.recovered = True
    tokens = tokens_of(2)
    probe(leader, "r", tokens, 0)
    leader.match("r", tokens, 0)
    leader.progress("r", tokens, len(tokens), [1, 2])
    leader.on_report(WorkerReport(ops_ok=list(leader.take_plan().stores.op_ids)))
    plan = leader.take_plan()
    assert len(plan.disk_writes) == 2 and len(plan.remote_puts) == 2
    assert plan.disk_writes.src == plan.remote_puts.slots
    leader.on_report(WorkerReport(ops_ok=list(plan.disk_writes.op_ids)))
    assert leader.g2.num_active == 2, "the put still reads the slots"
    leader.on_report(WorkerReport(ops_ok=list(plan.remote_puts.op_ids)))
    assert leader.g2.num_active == 0 and not leader.busy
    leader.check_invariants()


def test_held_staging_slots_stay_pinned_until_released():
    leader = make()
    tokens = tokens_of(3)
    probe(leader, "r", tokens, 3)
    leader.match("r", tokens, 0)
    leader.begin_onboard("r", [1, 2, 3, 4], 3 * BT)
    (op,) = leader.take_plan().loads
    # A timed-out read of blocks 1 and 2 may still land in their slots.
    leader.on_report(WorkerReport(loads=[LoadResult("r", [1, 2], [], [1, 2], op_id=op.op_id)]))
    assert leader.g2.num_active == 2 and leader.busy
    free_before = leader.g2.num_free
    assert set(leader.g2.allocate(free_before)).isdisjoint(op.g2_slots[1:])
    leader.on_report(WorkerReport(staging_released=op.g2_slots[1:]))
    assert leader.g2.num_active == free_before  # only the test's own allocation is left


def test_remote_stats_feed_the_counters():
    leader = make()
    leader.on_report(WorkerReport(remote_stats={"timeouts": 2, "checksum_failures": 1}))
    assert leader.metrics.value("kvtier_remote_events", event="timeouts") == 2
    assert leader.metrics.value("kvtier_checksum_failures") == 1


def test_without_remote_loads_blocks_go_to_the_store_but_never_come_from_it():
    # TensorRT-LLM's leader: the store may evict a block between the match and the read, and
    # that engine cannot recompute a block whose load fails, so G4 is write-only for it.
    cfg = KvtierConfig(onboard_mode="always", remote_url=URL, host_cache_blocks=1)
    leader = Leader(cfg, block_tokens=BT, block_bytes=4096, max_blocks_per_request=64,
                    remote_loads=False)
    tokens = tokens_of(2)
    assert leader.match("a", tokens, 0) == 0, "no probe, no G4 match"
    assert not leader.take_plan().remote_probes
    leader.progress("a", tokens, len(tokens), [1, 2])
    plan = leader.take_plan()
    leader.on_report(WorkerReport(ops_ok=list(plan.stores.op_ids)))
    puts = leader.take_plan().remote_puts
    assert len(puts) == 1   # the one G2 slot's block goes to the store
    leader.on_report(WorkerReport(ops_ok=list(puts.op_ids)))
    assert leader.remote_holds(puts.keys[0])
    leader.finish("a")
    # Another block takes the one G2 slot: the first is now only in the store.
    other = tokens_of(1, seed=500)
    leader.match("x", other, 0)
    leader.progress("x", other, len(other), [3])
    leader.on_report(WorkerReport(ops_ok=list(leader.take_plan().stores.op_ids)))
    leader.finish("x")
    assert leader.remote_holds(puts.keys[0]) and not leader.g2.lookup([puts.keys[0]])
    assert leader.match("b", tokens, 0) == 0
    assert not leader.take_plan().remote_probes
