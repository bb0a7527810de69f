"""The leader's tier managers through the leader: leases shared by a disk write and a remote
put, and the lineage (parent key, tokens) every Stored event carries."""

from kvtier.config import KvtierConfig
from kvtier.events.types import BlockStored
from kvtier.leader import Leader
from kvtier.protocol import LoadResult, WorkerReport
from kvtier.tiers import Tier

BT = 16


def make(events: bool = False, **kw) -> Leader:
    cfg = KvtierConfig(onboard_mode="always", disk_admission="always", **kw)
    leader = Leader(cfg, block_tokens=BT, block_bytes=4096, max_blocks_per_request=64,
                    events=events)
    if leader.disk is not None:
        leader.on_report(WorkerReport(recovered=[]))
    return leader


def test_a_disk_write_and_a_remote_put_share_one_g2_pin_until_both_end(tmp_path):
    leader = make(host_cache_blocks=8, disk_cache_blocks=8, disk_dir=str(tmp_path),
                  remote_url="redis://127.0.0.1:1/0")
    tokens = list(range(5, 5 + BT + 1))
    leader.match("a", tokens, 0)
    leader.progress("a", tokens, len(tokens), [3])
    first = leader.take_plan()
    leader.on_report(WorkerReport(ops_ok=list(first.stores.op_ids),
                                  remote_present=dict.fromkeys(first.remote_probes, 0)))
    plan = leader.take_plan()
    assert plan.disk_writes.src == plan.remote_puts.slots, "both read the same G2 slot"
    assert leader.g2.num_active == 1
    leader.on_report(WorkerReport(ops_ok=list(plan.disk_writes.op_ids)))
    assert leader.g2.num_active == 1, "the put still reads the slot"
    assert leader.g3.num_registered == 1
    leader.on_report(WorkerReport(ops_ok=list(plan.remote_puts.op_ids)))
    assert leader.g2.num_active == 0 and not leader.busy
    assert leader.remote_holds(plan.remote_puts.keys[0])


def test_a_failed_disk_allocation_hands_the_pin_to_the_put_alone(tmp_path):
    leader = make(host_cache_blocks=8, disk_cache_blocks=1, disk_dir=str(tmp_path),
                  remote_url="redis://127.0.0.1:1/0")
    # Pin the only G3 slot, so the next disk write cannot get one.
    assert leader.g3.allocate(1)
    tokens = list(range(5, 5 + BT + 1))
    leader.match("a", tokens, 0)
    leader.progress("a", tokens, len(tokens), [3])
    leader.on_report(WorkerReport(ops_ok=list(leader.take_plan().stores.op_ids)))
    plan = leader.take_plan()
    assert len(plan.disk_writes) == 0 and len(plan.remote_puts) == 1
    assert leader.metrics.value("kvtier_dropped_offloads", tier="G3") == 1
    leader.on_report(WorkerReport(ops_ok=list(plan.remote_puts.op_ids)))
    assert leader.g2.num_active == 0


def stored(events, tier):
    return [e for e in events if isinstance(e, BlockStored) and e.tier is tier]


def test_stored_events_carry_parent_keys_and_tokens_in_every_tier(tmp_path):
    leader = make(events=True, host_cache_blocks=2, disk_cache_blocks=8,
                  disk_dir=str(tmp_path))
    tokens = list(range(100, 100 + 2 * BT + 1))
    leader.match("a", tokens, 0)
    leader.progress("a", tokens, len(tokens), [1, 2])
    stores = leader.take_plan().stores
    leader.on_report(WorkerReport(ops_ok=list(stores.op_ids)))
    first, second = stores.keys
    g2 = stored(leader.take_events(), Tier.G2)
    assert [(e.block_hashes, e.parent_block_hash, e.token_ids) for e in g2] == [
        ([first], None, tokens[:BT]), ([second], first, tokens[BT:2 * BT])]
    leader.on_report(WorkerReport(ops_ok=list(leader.take_plan().disk_writes.op_ids)))
    g3 = stored(leader.take_events(), Tier.G3)
    assert [(e.parent_block_hash, e.token_ids) for e in g3] == [
        (None, tokens[:BT]), (first, tokens[BT:2 * BT])]
    leader.finish("a")
    # Push both out of the 2-slot host tier, then load them back from disk: the promotion
    # into G2 is announced with the same lineage.
    other = list(range(900, 900 + 2 * BT + 1))
    leader.match("x", other, 0)
    leader.progress("x", other, len(other), [5, 6])
    leader.on_report(WorkerReport(ops_ok=list(leader.take_plan().stores.op_ids)))
    leader.on_report(WorkerReport(ops_ok=list(leader.take_plan().disk_writes.op_ids)))
    leader.finish("x")
    leader.take_events()
    assert leader.match("b", tokens, 0) == 2 * BT
    leader.begin_onboard("b", [7, 8, 9], 2 * BT)
    load = leader.take_plan().loads[0]
    assert all(slot >= 0 for slot in load.g3_slots), "both come from disk"
    leader.on_report(WorkerReport(loads=[LoadResult("b", [], [], op_id=load.op_id)]))
    promoted = stored(leader.take_events(), Tier.G2)
    assert [(e.parent_block_hash, e.token_ids) for e in promoted] == [
        (None, tokens[:BT]), (first, tokens[BT:2 * BT])]


def test_low_retention_priority_blocks_leave_the_host_tier_first():
    leader = make(host_cache_blocks=2)

    def offload(req_id, seed, priority):
        tokens = list(range(seed, seed + BT + 1))
        leader.match(req_id, tokens, 0)
        leader.progress(req_id, tokens, len(tokens), [1], priority=priority)
        leader.on_report(WorkerReport(ops_ok=list(leader.take_plan().stores.op_ids)))
        leader.finish(req_id)
        return tokens

    kept = offload("kept", 100, priority=90)      # older, but kept longer
    dropped = offload("dropped", 200, priority=10)
    offload("new", 300, priority=90)              # needs a slot: the low-priority one goes
    assert leader.match("a", kept, 0) == BT
    assert leader.match("b", dropped, 0) == 0


def test_a_host_hit_keeps_the_disk_copy_recent(tmp_path):
    # The disk copy of a block the host tier serves must not age out as if nobody used it: once
    # the host evicts the block, the disk is what still serves it.
    leader = make(host_cache_blocks=8, disk_cache_blocks=2, disk_dir=str(tmp_path))

    def offload(req_id, tokens):
        leader.match(req_id, tokens, 0)
        leader.progress(req_id, tokens, len(tokens), [1])
        leader.on_report(WorkerReport(ops_ok=list(leader.take_plan().stores.op_ids)))
        leader.on_report(WorkerReport(ops_ok=list(leader.take_plan().disk_writes.op_ids)))
        leader.finish(req_id)

    used, unused = list(range(100, 100 + BT + 1)), list(range(200, 200 + BT + 1))
    offload("used", used)          # the older disk block
    offload("unused", unused)
    assert leader.match("again", used, 0) == BT
    assert leader.found_tiers("again") == [Tier.G2]
    leader.begin_onboard("again", [5, 6], BT)
    (load,) = leader.take_plan().loads
    leader.on_report(WorkerReport(loads=[LoadResult("again", [], [], op_id=load.op_id)]))
    leader.finish("again")
    offload("new", list(range(300, 300 + BT + 1)))   # the 2-slot disk evicts one block
    assert load.keys[0] in leader.g3, "the disk kept the block the host served"
    assert leader.g3.num_registered == 2
