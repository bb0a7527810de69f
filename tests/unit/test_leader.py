"""The leader's bookkeeping, driven directly (no engine): plans, reports, pins, leaks."""

import pytest

from kvtier.config import KvtierConfig
from kvtier.hashing import salt_hash
from kvtier.leader import Leader
from kvtier.protocol import NO_SLOT, LoadResult, WorkerReport

BT = 16


def make(**kw) -> Leader:
    cfg = KvtierConfig(onboard_mode="always", **kw)
    return Leader(cfg, block_tokens=BT, block_bytes=4096, max_blocks_per_request=64)


def confirm_stores(leader: Leader, plan) -> None:
    leader.on_report(WorkerReport(ops_ok=list(plan.stores.op_ids)))


def offload(leader: Leader, req_id: str, tokens: list[int]) -> None:
    assert leader.match(req_id, tokens, 0) is not None
    leader.progress(req_id, tokens, len(tokens), list(range(100, 100 + len(tokens) // BT)))
    confirm_stores(leader, leader.take_plan())
    leader.finish(req_id)


def test_offloaded_blocks_become_matchable_only_after_the_worker_confirms():
    leader = make(host_cache_blocks=32)
    tokens = list(range(3, 3 + 4 * BT + 1))
    leader.match("a", tokens, 0)
    leader.progress("a", tokens, len(tokens), [7, 8, 9, 10, 11])
    plan = leader.take_plan()
    assert plan.stores.src == [7, 8, 9, 10]
    assert leader.match("b", tokens, 0) == 0, "bytes not confirmed yet: no match"
    confirm_stores(leader, plan)
    assert leader.match("b", tokens, 0) == 4 * BT


def test_failed_store_frees_the_slot_and_is_counted():
    leader = make(host_cache_blocks=8)
    tokens = list(range(3, 3 + 2 * BT))
    leader.match("a", tokens, 0)
    leader.progress("a", tokens, len(tokens), [1, 2])
    plan = leader.take_plan()
    leader.on_report(WorkerReport(ops_failed=list(plan.stores.op_ids)))
    assert leader.g2.num_free == 8
    assert leader.metrics.value("kvtier_dropped_offloads", tier="G2") == 2


def test_full_host_tier_drops_offloads_instead_of_stalling():
    leader = make(host_cache_blocks=2)
    tokens = list(range(3, 3 + 4 * BT))
    leader.match("a", tokens, 0)
    leader.progress("a", tokens, len(tokens), [1, 2, 3, 4])
    plan = leader.take_plan()
    assert len(plan.stores) == 2
    assert leader.metrics.value("kvtier_dropped_offloads", tier="G2") == 2


def test_load_pins_sources_until_reported_and_never_matches_whole_prompt():
    leader = make(host_cache_blocks=32, sync_load_max_ms=0)  # between steps
    tokens = list(range(3, 3 + 4 * BT))
    offload(leader, "a", tokens)
    assert leader.match("b", tokens, 0) == 3 * BT      # the last token is computed
    leader.begin_onboard("b", [50, 51, 52, 53], 3 * BT)
    plan = leader.take_plan()
    (op,) = plan.loads
    assert op.device_block_ids == [50, 51, 52] and NO_SLOT not in op.g2_slots
    assert leader.g2.num_active == 3
    assert leader.is_async_load("b")
    assert leader.finish("b") is True, "a load in flight keeps the device blocks"
    leader.on_report(WorkerReport(loads=[LoadResult("b", [], [], op_id=op.op_id)]))
    assert leader.g2.num_active == 0 and not leader.busy


def test_engine_expecting_more_than_matched_gets_failing_blocks_not_a_hang():
    leader = make(host_cache_blocks=32)
    tokens = list(range(3, 3 + 4 * BT))
    offload(leader, "a", tokens)
    leader.match("b", tokens, 0)
    leader.g2.clear()                   # everything evicted between match and allocation
    leader.begin_onboard("b", [5, 6, 7], 3 * BT)
    (op,) = leader.take_plan().loads
    assert op.g2_slots == [NO_SLOT] * 3, "unpinnable blocks must fail, not vanish"


def test_disk_admission_frequency_filter_needs_a_second_offer(tmp_path):
    leader = make(host_cache_blocks=32, disk_cache_blocks=32, disk_dir=str(tmp_path))
    leader.disk.recovered = True
    tokens = list(range(3, 3 + 2 * BT))
    offload(leader, "a", tokens)
    assert len(leader.take_plan().disk_writes) == 0, "first offer never reaches disk"
    leader.match("b", tokens, 0)
    leader.progress("b", tokens, len(tokens), [1, 2])  # offered again: now admitted
    plan = leader.take_plan()
    assert len(plan.disk_writes) == 2
    leader.on_report(WorkerReport(ops_ok=list(plan.disk_writes.op_ids)))
    assert leader.g3.num_registered == 2 and leader.g2.num_active == 0


def test_staging_a_disk_block_never_evicts_a_host_block_the_same_load_needs(tmp_path):
    leader = make(host_cache_blocks=3, disk_cache_blocks=8, disk_dir=str(tmp_path),
                  disk_admission="always")
    leader.disk.recovered = True

    def store(req_id: str, tokens: list[int], blocks: list[int]) -> None:
        leader.match(req_id, tokens, 0)
        leader.progress(req_id, tokens, len(tokens), blocks)
        confirm_stores(leader, leader.take_plan())
        leader.on_report(WorkerReport(ops_ok=list(leader.take_plan().disk_writes.op_ids)))
        leader.finish(req_id)

    tokens = list(range(3, 3 + 3 * BT))
    store("a", tokens, [1, 2, 3])                  # host and disk hold a0 a1 a2
    first = leader.hasher.hash_blocks(tokens, salt=salt_hash())[0]
    leader.g2.discard([first])                     # a0 only on disk now
    store("z", list(range(900, 900 + BT)), [4])    # the host is full again: a1 a2 z
    # a0 loads from disk through a staging slot, a1 and a2 from the host. The staging slot
    # takes an inactive host block: z (newest), never a1 or a2, which this load pins.
    assert leader.match("b", tokens + [9], 0) == 3 * BT
    leader.begin_onboard("b", [5, 6, 7], 3 * BT)
    (op,) = leader.take_plan().loads
    assert NO_SLOT not in op.g2_slots and op.g3_slots[0] != NO_SLOT
    leader.on_report(WorkerReport(loads=[LoadResult("b", [], [], op_id=op.op_id)]))
    assert leader.metrics.value("kvtier_load_errors") == 0
    assert leader.metrics.value("kvtier_matched_blocks", tier="G2") == 2
    assert leader.metrics.value("kvtier_matched_blocks", tier="G3") == 1
    leader.check_invariants()


def test_corrupt_disk_block_is_discarded_and_its_slot_dropped_from_the_index(tmp_path):
    leader = make(disk_cache_blocks=32, disk_dir=str(tmp_path), disk_admission="always")
    leader.disk.recovered = True
    tokens = list(range(3, 3 + 3 * BT))
    leader.match("a", tokens, 0)
    leader.progress("a", tokens, len(tokens), [1, 2, 3])
    plan = leader.take_plan()
    confirm_stores(leader, plan)
    writes = leader.take_plan().disk_writes
    leader.on_report(WorkerReport(ops_ok=list(writes.op_ids)))
    leader.finish("a")
    assert leader.match("b", tokens + [9], 0) == 3 * BT
    leader.begin_onboard("b", [4, 5, 6], 3 * BT)
    (op,) = leader.take_plan().loads
    assert all(s != NO_SLOT for s in op.g3_slots)
    leader.on_report(WorkerReport(loads=[LoadResult("b", [1], [1], op_id=op.op_id)]))
    assert leader.metrics.value("kvtier_checksum_failures") == 1
    assert leader.g3.num_registered == 2
    assert leader.take_plan().disk_discards == [op.g3_slots[1]]
    leader.check_invariants()
    assert leader.g2.num_active == 0 and leader.g3.num_active == 0


def test_waits_for_the_disk_index_before_matching(tmp_path):
    leader = make(disk_cache_blocks=32, disk_dir=str(tmp_path))
    tokens = list(range(3, 3 + 3 * BT))
    assert leader.match("a", tokens, 0) is None, "ask again: the disk index is not in yet"
    leader.on_report(WorkerReport(recovered=[(5, leader.hasher.hash_blocks(tokens, salt=salt_hash())[0])]))
    assert leader.g3.num_registered == 1
    assert leader.match("a", tokens, 0) == BT


@pytest.mark.parametrize("salt", ["t1", "t2"])
def test_salts_isolate_tenants(salt):
    leader = make(host_cache_blocks=32)
    tokens = list(range(3, 3 + 2 * BT + 1))
    leader.match("a", tokens, 0, cache_salt="t1")
    leader.progress("a", tokens, len(tokens), [1, 2])
    confirm_stores(leader, leader.take_plan())
    expected = 2 * BT if salt == "t1" else 0
    assert leader.match("b", tokens, 0, cache_salt=salt) == expected


def test_small_loads_run_inside_the_step_and_hold_nothing():
    leader = make(host_cache_blocks=32)     # default: loads up to 20 ms run in the step
    tokens = list(range(3, 3 + 4 * BT))
    offload(leader, "a", tokens)
    assert leader.match("b", tokens, 0) == 3 * BT
    assert not leader.is_async_load("b")
    leader.begin_onboard("b", [50, 51, 52, 53], 3 * BT)
    (op,) = leader.take_plan().loads
    assert op.sync
    assert leader.finish("b") is False, "a synchronous load is done before the step ends"
    leader.on_report(WorkerReport(loads=[LoadResult("b", [], [], op_id=op.op_id)]))
    assert leader.g2.num_active == 0 and not leader.busy


def test_disk_only_staging_is_bounded_and_long_hits_are_cut(tmp_path):
    # No host cache: G2 only stages, one request's worth at most.
    leader = make(disk_cache_blocks=512, disk_dir=str(tmp_path), disk_admission="always")
    assert leader.layout.num_g2_slots == 64 + 64
    assert not leader.host.caches
    leader.disk.recovered = True
    tokens = list(range(3, 3 + 200 * BT))
    leader.g3.restore([(i, k) for i, k in enumerate(
        leader.hasher.hash_blocks(tokens, salt=salt_hash()))])
    # 199 blocks on disk, but one match takes at most the 128 staging slots less a reserve.
    assert leader.match("a", tokens, 0) == (128 - 16) * BT
