"""Two ranks under vLLM's real Scheduler: the leader commits an operation only once both
ranks reported it, however many steps apart they finish.

Rank 1 is made slow (it does not poll its background transfers for a while), so its disk
writes and reads finish, and are reported, steps after rank 0's. Every loaded block is
checked byte for byte on both ranks' KV tensors, and every test ends with no leaked block.
"""

from __future__ import annotations

import logging
import os
import random
import time

import pytest
from multirank_harness import make_multirank_harness
from sched_harness import BLOCK
from vllm.v1.request import RequestStatus

from kvtier.hashing import salt_hash

pytestmark = pytest.mark.timeout(300)


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(3, 1000) for _ in range(n)]


def disk_only(tmp_path, **kw):
    # Asynchronous loads (between steps), always loaded: the harness's forward pass is free.
    return {"disk_cache_blocks": 512, "disk_dir": str(tmp_path / "disk"),
            "disk_admission": "always", "onboard_mode": "always", "sync_load_max_ms": 0,
            **kw}


@pytest.fixture
def harness(tiny_model, tmp_path):
    made = []

    def make(**kw):
        h = make_multirank_harness(tiny_model, disk_only(tmp_path, **kw))
        made.append(h)
        return h

    yield make
    for h in made:
        h.shutdown()


def rank1_lags(h) -> None:
    h.lagging[1] = lambda step: True


def step_until_rank0_idle(h, max_steps: int = 2000) -> None:
    """Step until rank 0 has finished and reported everything (rank 1 still lagging)."""
    for _ in range(max_steps):
        h.step()
        if not h.workers[0].worker.busy:
            return
        time.sleep(0.002)
    raise AssertionError("rank 0 never finished its transfers")


def offload_round(h, p: list[int]) -> None:
    h.add("r0", p)
    h.run()


def test_disk_writes_register_only_when_both_ranks_wrote(harness):
    h = harness()
    leader = h.leader
    rank1_lags(h)
    offload_round(h, prompt(1, 12 * BLOCK))
    step_until_rank0_idle(h)
    assert h.workers[1].worker.busy, "rank 1 must still hold its writes"
    assert leader.g3.num_registered == 0, "registered on rank 0's word alone"
    assert leader.g3.num_active == 12, "G3 slots unpinned while rank 1 still writes them"
    assert leader.busy
    h.lagging.clear()
    h.drain()
    assert leader.g3.num_registered == 12
    h.assert_no_leaks()


def test_disk_loads_commit_only_when_both_ranks_reported(harness):
    h = harness()
    leader = h.leader
    p = prompt(1, 12 * BLOCK)
    offload_round(h, p)
    h.drain()
    assert leader.g3.num_registered == 12
    # Rank 0's reads land first; the pins and staging slots wait for rank 1.
    assert h.scheduler.reset_prefix_cache()
    rank1_lags(h)
    req = h.add("r1", p + [7, 8, 9])
    step_until_rank0_idle(h)
    assert h.workers[1].worker.busy
    assert req.status == RequestStatus.WAITING_FOR_REMOTE_KVS, (
        "vLLM finishes a load only when every rank reported it")
    assert leader.g3.num_active == 12, "disk blocks unpinned while rank 1 still reads them"
    assert leader.g2.num_active == 12, "staging slots freed while rank 1 still reads into them"
    assert leader.busy
    assert leader.metrics.value("kvtier_matched_tokens", tier="G3") == 0
    h.lagging.clear()
    h.run()
    assert h.verified_loads == 12, "every block right on both ranks"
    assert leader.metrics.value("kvtier_matched_tokens", tier="G3") == 12 * BLOCK
    assert not h.load_errors_seen
    h.assert_no_leaks()


def flip_a_stored_block(worker) -> int:
    """Flip one payload byte of one block in this rank's disk file; returns its slot."""
    disk = worker.disk
    slot = sorted(s for s, _key in disk.recover())[3]
    pos = slot * disk.slot_bytes + 64 + 100
    with open(disk.data_path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0x5A]))
        f.flush()
        os.fsync(f.fileno())
    return slot


def test_a_block_bad_on_one_late_rank_is_a_load_error_on_both(harness):
    h = harness()
    leader = h.leader
    p = prompt(2, 12 * BLOCK)
    offload_round(h, p)
    h.drain()
    assert leader.g3.num_registered == 12
    flip_a_stored_block(h.workers[1].worker)   # rank 0's copy of the block is intact

    assert h.scheduler.reset_prefix_cache()
    rank1_lags(h)
    h.add("r1", p + [7, 8, 9])
    step_until_rank0_idle(h)
    assert leader.metrics.value("kvtier_load_errors") == 0, "committed on rank 0's word"
    h.lagging.clear()
    h.run()
    # vLLM recomputes the block on both ranks; kvtier drops it from its disk tier.
    assert len(h.load_errors_seen) == 1
    assert leader.metrics.value("kvtier_load_errors") == 1
    assert leader.metrics.value("kvtier_checksum_failures") == 1
    assert leader.metrics.value("kvtier_matched_tokens", tier="G3") == 11 * BLOCK
    assert h.verified_loads == 11
    h.drain()
    assert leader.g3.num_registered == 12, "dropped, then offloaded again recomputed"
    h.assert_no_leaks()


def test_a_rank_past_the_deadline_fails_the_operation_and_its_late_report_is_ignored(
        harness, caplog):
    h = harness()
    leader = h.leader
    leader.op_deadline_s = 0.2
    p = prompt(3, 6 * BLOCK)
    rank1_lags(h)
    with caplog.at_level(logging.WARNING, logger="kvtier.leader"):
        offload_round(h, p)
        step_until_rank0_idle(h)
        time.sleep(0.3)
        h.step()   # the leader notices the deadline passed
    assert any("did not report operation" in r.message for r in caplog.records)
    assert leader.g3.num_registered == 0
    assert leader.g3.num_active >= 5, "slots rank 1 may still write must stay pinned"
    # Rank 1 reports at last: its writes succeeded, but the operations are over.
    h.lagging.clear()
    h.drain()
    assert leader.g3.num_registered == 0, "a late report must not commit a failed operation"
    h.assert_no_leaks()
    # The blocks can be written again (their keys were handed back at the deadline).
    h.add("r1", p)
    h.run()
    h.drain()
    assert leader.g3.num_registered >= 5
    h.assert_no_leaks()


def test_remote_puts_and_probes_count_only_when_both_ranks_answered(
        redis_server, tiny_model, request):
    def remote(**kw):
        return {"remote_url": redis_server.url, "model_id": f"test/{request.node.name}",
                "onboard_mode": "always", "remote_timeout_ms": 1000, "sync_load_max_ms": 0,
                **kw}

    a = make_multirank_harness(tiny_model, remote(host_cache_blocks=512))
    b = make_multirank_harness(tiny_model, remote())   # staging slots only
    try:
        p = prompt(5, 8 * BLOCK + 3)
        keys = a.leader.hasher.hash_blocks(p, salt=salt_hash())
        # A's puts: each rank puts its own shard; the store holds the block once both did.
        rank1_lags(a)
        a.add("a0", p)
        a.run()
        step_until_rank0_idle(a)
        assert not any(a.leader.remote_holds(k) for k in keys), "trusted rank 0 alone"
        a.lagging.clear()
        a.drain()
        assert all(a.leader.remote_holds(k) for k in keys)

        # B's probe: rank 0 answers at once, rank 1 later; B waits for both answers.
        rank1_lags(b)
        req = b.add("b0", p)
        step_until_rank0_idle(b)
        assert req.status == RequestStatus.WAITING, "matched on rank 0's answer alone"
        assert b.leader.metrics.value("kvtier_matched_tokens", tier="G4") == 0
        b.lagging.clear()
        b.run()
        assert b.verified_loads == 8, "every block from G4, right on both ranks"
        assert b.leader.metrics.value("kvtier_matched_tokens", tier="G4") == 8 * BLOCK
        assert not b.load_errors_seen
        a.assert_no_leaks()
        b.assert_no_leaks()
    finally:
        a.shutdown()
        b.shutdown()
