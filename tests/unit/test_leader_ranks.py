"""The leader with several ranks: an operation is committed only when every rank reported it,
by operation id, whatever step each report comes in."""

import time

from kvtier.config import KvtierConfig
from kvtier.hashing import salt_hash
from kvtier.leader import Leader
from kvtier.protocol import LoadResult, WorkerReport

BT = 16


def make(world_size: int = 2, **kw) -> Leader:
    cfg = KvtierConfig(onboard_mode="always", sync_load_max_ms=0, **kw)
    return Leader(cfg, block_tokens=BT, block_bytes=4096, max_blocks_per_request=64,
                  world_size=world_size)


def tokens_of(num_blocks: int, seed: int = 3) -> list[int]:
    return list(range(seed, seed + num_blocks * BT + 1))


def stores(leader: Leader, req_id: str, tokens: list[int]):
    leader.match(req_id, tokens, 0)
    leader.progress(req_id, tokens, len(tokens), list(range(1, len(tokens) // BT + 1)))
    return leader.take_plan().stores


def test_store_registers_only_after_every_rank_reported_it():
    leader = make(host_cache_blocks=16)
    tokens = tokens_of(3)
    plan = stores(leader, "a", tokens)
    leader.on_report(WorkerReport(rank=0, ops_ok=list(plan.op_ids)))
    assert leader.g2.num_registered == 0 and leader.g2.num_active == 3
    leader.on_report(WorkerReport(rank=0, ops_ok=list(plan.op_ids)))  # a repeat counts once
    assert leader.g2.num_registered == 0
    leader.on_report(WorkerReport(rank=1, ops_ok=list(plan.op_ids)))
    assert leader.g2.num_registered == 3 and leader.g2.num_active == 0
    assert not leader.busy


def test_a_failure_on_one_rank_fails_the_operation_for_all():
    leader = make(host_cache_blocks=16)
    plan = stores(leader, "a", tokens_of(2))
    leader.on_reports([WorkerReport(rank=0, ops_ok=list(plan.op_ids)),
                       WorkerReport(rank=1, ops_failed=plan.op_ids[:1],
                                    ops_ok=plan.op_ids[1:])])
    assert leader.g2.num_registered == 1
    assert leader.metrics.value("kvtier_dropped_offloads", tier="G2") == 1
    assert leader.g2.num_active == 0


def test_results_for_a_slot_s_earlier_use_are_not_taken_for_its_next():
    leader = make(host_cache_blocks=1)
    first = stores(leader, "a", tokens_of(1, seed=3))
    leader.on_reports([WorkerReport(rank=0, ops_failed=list(first.op_ids)),
                       WorkerReport(rank=1, ops_failed=list(first.op_ids))])
    second = stores(leader, "b", tokens_of(1, seed=500))
    assert second.dst == first.dst, "the slot is reused"
    # A stale (duplicated) result of the first use arrives: ignored, it names another op.
    leader.on_reports([WorkerReport(rank=0, ops_ok=list(first.op_ids)),
                       WorkerReport(rank=1, ops_ok=list(first.op_ids))])
    assert leader.g2.num_registered == 0 and leader.g2.num_active == 1
    leader.on_reports([WorkerReport(rank=r, ops_ok=list(second.op_ids)) for r in (0, 1)])
    assert leader.g2.num_registered == 1


def test_load_commits_with_the_union_of_the_ranks_failures():
    leader = make(host_cache_blocks=16)
    tokens = tokens_of(3)
    plan = stores(leader, "a", tokens)
    leader.on_reports([WorkerReport(rank=r, ops_ok=list(plan.op_ids)) for r in (0, 1)])
    leader.finish("a")
    assert leader.match("b", tokens, 0) == 3 * BT
    leader.begin_onboard("b", [7, 8, 9, 10], 3 * BT)
    (op,) = leader.take_plan().loads
    leader.on_report(WorkerReport(rank=1, loads=[LoadResult("b", [2], [2], op_id=op.op_id)]))
    assert leader.g2.num_active == 3 and leader.finish("b") is True
    leader.on_report(WorkerReport(rank=0, loads=[LoadResult("b", [], [], op_id=op.op_id)]))
    assert leader.metrics.value("kvtier_load_errors") == 1
    assert leader.metrics.value("kvtier_checksum_failures") == 1
    assert leader.g2.num_registered == 2, "the block bad on rank 1 is dropped"
    assert leader.g2.num_active == 0 and not leader.busy


def test_held_staging_slot_is_freed_when_every_holding_rank_released_it():
    leader = make(remote_url="redis://127.0.0.1:1/0")
    tokens = tokens_of(2)
    assert leader.match("r", tokens, 0) is None
    (probe_id,) = leader.take_plan().remote_probes
    leader.on_report(WorkerReport(rank=0, remote_present={probe_id: 2}))
    assert leader.match("r", tokens, 0) is None, "rank 1 has not answered yet"
    leader.on_report(WorkerReport(rank=1, remote_present={probe_id: 1}))
    assert leader.match("r", tokens, 0) == BT, "the least any rank's store holds"
    leader.begin_onboard("r", [4, 5, 6], BT)
    (op,) = leader.take_plan().loads
    slot = op.g2_slots[0]
    # Both ranks' reads timed out; each may still write into the slot.
    for rank in (0, 1):
        leader.on_report(WorkerReport(rank=rank, loads=[
            LoadResult("r", [0], [], [0], op_id=op.op_id)]))
    leader.on_report(WorkerReport(rank=0, staging_released=[slot]))
    assert leader.g2.num_active == 1, "rank 1 may still write into it"
    leader.on_report(WorkerReport(rank=1, staging_released=[slot]))
    assert leader.g2.num_active == 0 and not leader.busy


def test_disk_index_is_what_every_rank_recovered(tmp_path):
    leader = make(disk_cache_blocks=16, disk_dir=str(tmp_path))
    keys = leader.hasher.hash_blocks(tokens_of(2), salt=salt_hash())
    leader.on_report(WorkerReport(rank=0, recovered=[(3, keys[0]), (4, keys[1])]))
    assert leader.g3.num_registered == 0
    leader.on_report(WorkerReport(rank=1, recovered=[(3, keys[0])]))
    assert leader.g3.num_registered == 1


def test_a_rank_lagging_past_the_deadline_fails_the_op_and_its_late_report_only_unpins():
    leader = make(host_cache_blocks=16)
    leader.op_deadline_s = 0.05
    plan = stores(leader, "a", tokens_of(2))
    leader.on_report(WorkerReport(rank=0, ops_ok=list(plan.op_ids)))
    time.sleep(0.1)
    leader.on_reports([])
    assert leader.g2.num_registered == 0
    assert leader.g2.num_active == 2, "rank 1 may still be writing the slots"
    assert leader.metrics.value("kvtier_rank_timeouts", kind="Store") == 2
    # The keys were handed back: the same blocks can be offloaded again meanwhile.
    again = stores(leader, "b", tokens_of(2))
    assert len(again) == 2 and set(again.dst).isdisjoint(plan.dst)
    leader.on_report(WorkerReport(rank=1, ops_ok=list(plan.op_ids)))
    assert leader.g2.num_registered == 0, "a late report does not commit"
    assert leader.g2.num_active == 2, "only the new stores' slots are pinned"
    leader.on_reports([WorkerReport(rank=r, ops_ok=list(again.op_ids)) for r in (0, 1)])
    assert leader.g2.num_registered == 2 and not leader.busy
