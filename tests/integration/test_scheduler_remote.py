"""G4 end to end under vLLM's real Scheduler: two engine instances share a real Redis or
Mooncake Store, with every onboarded block checked byte for byte by the harness.

Instance A computes and offloads; instance B (its own Leader, Worker and empty host tier)
must find A's blocks in the shared store, load them intact, and never serve a block that is
missing, corrupt, late or of another tenant. Faults (store killed, down at start-up, stalled,
partial batches) degrade to local tiers or recompute: counted, no hang, no wrong bytes.
Every test ends with no leaked block in either instance.
"""

from __future__ import annotations

import logging
import random
import time

import pytest
from remote_cases import wait_for
from sched_harness import BLOCK, make_harness

from kvtier.hashing import salt_hash
from kvtier.storage.remote import remote_key

pytestmark = pytest.mark.timeout(300)


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(3, 1000) for _ in range(n)]


def remote(url: str, request, **kw) -> dict:
    """Extra config of an instance on the shared store. The harness's "forward pass" costs
    nothing, so the cost model would rightly recompute: these tests always load. Each test
    has its own model id, hence its own key namespace on the module's shared servers."""
    return {"remote_url": url, "model_id": f"test/{request.node.name}",
            "onboard_mode": "always", "remote_timeout_ms": 1000, **kw}


def host(url: str, request, **kw) -> dict:
    return remote(url, request, host_cache_blocks=512, **kw)


@pytest.fixture
def instance(tiny_model):
    """Factory of engine instances (harnesses); their workers are shut down afterwards."""
    made = []

    def make(extra: dict, **kw):
        h = make_harness(tiny_model, extra, **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        h.worker.shutdown()


@pytest.fixture(params=["redis", "mooncake"])
def store(request):
    return request.getfixturevalue(f"{request.param}_server")


def matched(h, tier: str) -> float:
    return h.leader.metrics.value("kvtier_matched_tokens", tier=tier)


def remote_events(h, event: str) -> float:
    return h.leader.metrics.value("kvtier_remote_events", event=event)


def run_and_offload(h, req_id: str, p: list[int], **kw) -> None:
    h.add(req_id, p, **kw)
    h.run()
    h.drain()


def store_keys(h, p: list[int], cache_salt: str | None = None) -> list[str]:
    """The store keys of the full blocks of ``p`` in instance ``h``'s namespace."""
    hashes = h.leader.hasher.hash_blocks(p, salt=salt_hash(cache_salt, None))
    return [remote_key(h.worker.worker.remote.namespace, key) for key in hashes]


def first_load_planned(h, action):
    """A ``before_worker`` hook that runs ``action`` once, right after the scheduler planned
    a load (so the worker meets the fault while executing it)."""
    fired = []

    def hook(so):
        if not fired and so.kv_connector_metadata.plan.loads:
            fired.append(True)
            action()

    return hook, fired


def run_with(h, hook, max_steps: int = 2000) -> None:
    for _ in range(max_steps):
        if not h.scheduler.requests:
            return
        h.step(before_worker=hook)
        if h.worker.worker.busy:
            time.sleep(0.001)
    raise AssertionError("requests still pending")


# -- sharing ---------------------------------------------------------------------------------


def test_second_instance_loads_what_the_first_computed(store, instance, request):
    a = instance(host(store.url, request))
    p = prompt(1, 10 * BLOCK + 5)
    run_and_offload(a, "a0", p)
    assert a.leader.metrics.value("kvtier_transfer_blocks", direction="g2_to_g4") == 10
    assert a.leader.metrics.value("kvtier_dropped_offloads", tier="G4") == 0

    # B: a separate engine with nothing of its own but G2 staging slots.
    b = instance(remote(store.url, request))
    assert not b.leader.host.caches
    run_and_offload(b, "b0", p)
    assert b.verified_loads == 10, "the 10 full blocks A computed must come from G4"
    assert matched(b, "G4") == 10 * BLOCK
    assert matched(b, "G2") == 0
    assert not b.load_errors_seen
    assert b.outputs["b0"] == a.outputs["a0"]

    # A longer prompt on B: A's prefix from G4 again (B caches nothing on its host), and
    # only B's new blocks are written to the store, never A's again.
    b.scheduler.reset_prefix_cache()
    run_and_offload(b, "b1", p + prompt(2, 40))
    assert b.verified_loads == 20
    assert matched(b, "G4") == 20 * BLOCK
    assert 1 <= b.leader.metrics.value("kvtier_transfer_blocks", direction="g2_to_g4") <= 3
    a.assert_no_leaks()
    b.assert_no_leaks()


def test_loaded_blocks_are_promoted_into_the_host_tier(redis_server, instance, request):
    a = instance(host(redis_server.url, request))
    p = prompt(3, 8 * BLOCK + 1)
    run_and_offload(a, "a0", p)
    b = instance(host(redis_server.url, request))
    run_and_offload(b, "b0", p)
    assert matched(b, "G4") == 8 * BLOCK
    assert b.leader.g2.num_registered >= 8
    # The next request on B finds them on its own host: no remote read.
    b.scheduler.reset_prefix_cache()
    run_and_offload(b, "b1", p)
    assert matched(b, "G4") == 8 * BLOCK
    assert matched(b, "G2") == 8 * BLOCK
    assert b.outputs["b0"] == b.outputs["b1"] == a.outputs["a0"]
    a.assert_no_leaks()
    b.assert_no_leaks()


def test_salts_never_share_through_the_store(store, instance, request):
    a = instance(host(store.url, request))
    p = prompt(4, 6 * BLOCK + 1)
    run_and_offload(a, "alice", p, cache_salt="tenant-a")
    b = instance(remote(store.url, request))
    run_and_offload(b, "bob", p, cache_salt="tenant-b")
    assert b.verified_loads == 0 and matched(b, "G4") == 0
    run_and_offload(b, "alice2", p, cache_salt="tenant-a")
    assert b.verified_loads == 6 and matched(b, "G4") == 6 * BLOCK
    a.assert_no_leaks()
    b.assert_no_leaks()


def test_frequency_admission_puts_only_reused_blocks(redis_server, instance, request):
    a = instance(host(redis_server.url, request, remote_admission="frequency"))
    p = prompt(5, 5 * BLOCK + 1)
    raw = redis_server.raw_client()
    run_and_offload(a, "a0", p)
    assert raw.exists(*store_keys(a, p)) == 0, "seen once: not admitted to the shared store"
    a.scheduler.reset_prefix_cache()
    run_and_offload(a, "a1", p)  # served from G2 and offered again: now admitted
    assert raw.exists(*store_keys(a, p)) == 5
    a.assert_no_leaks()


# -- faults ----------------------------------------------------------------------------------


def test_corrupt_remote_block_is_recomputed_never_served(redis_server, instance, request):
    a = instance(host(redis_server.url, request))
    p = prompt(6, 8 * BLOCK + 1)
    run_and_offload(a, "a0", p)
    raw = redis_server.raw_client()
    keys = store_keys(a, p)
    bad = keys[3]
    good_value = raw.get(bad)
    raw.setrange(bad, 200, bytes([good_value[200] ^ 0xFF]))

    b = instance(remote(redis_server.url, request))
    run_and_offload(b, "b0", p)
    # Blocks 0-2 load (and are byte-checked by the harness); block 3 fails verification and
    # is recomputed with everything after it.
    assert b.load_errors_seen
    assert b.verified_loads >= 3
    assert b.leader.metrics.value("kvtier_checksum_failures") >= 1
    assert b.outputs["b0"] == a.outputs["a0"]
    # The bad value was dropped from the store, and B's put of the block it recomputed
    # healed the key (the store keeps the first write, so a bad value left there would stay).
    assert raw.get(bad) == good_value
    a.assert_no_leaks()
    b.assert_no_leaks()


def test_partial_batch_failure_loads_the_rest(redis_server, instance, request):
    a = instance(host(redis_server.url, request))
    p = prompt(7, 10 * BLOCK + 3)
    run_and_offload(a, "a0", p)
    raw = redis_server.raw_client()
    keys = store_keys(a, p)

    b = instance(remote(redis_server.url, request))
    b.add("b0", p)
    # The store evicts block 5 between B's lookup and its read.
    hook, fired = first_load_planned(b, lambda: raw.delete(keys[5]))
    run_with(b, hook)
    assert fired
    assert b.load_errors_seen, "the missing block must be a load error"
    assert b.verified_loads >= 5
    assert matched(b, "G4") == 9 * BLOCK
    assert b.outputs["b0"] == a.outputs["a0"]
    b.drain()
    a.assert_no_leaks()
    b.assert_no_leaks()


def test_store_killed_mid_run_recomputes_then_reconnects(make_redis, instance, request):
    server = make_redis()
    a = instance(host(server.url, request))
    p = prompt(8, 8 * BLOCK + 1)
    run_and_offload(a, "a0", p)

    b = instance(host(server.url, request))
    b.add("b0", p)
    hook, fired = first_load_planned(b, server.kill)
    run_with(b, hook)
    assert fired
    assert b.load_errors_seen
    assert b.outputs["b0"] == a.outputs["a0"]
    assert remote_events(b, "errors") + remote_events(b, "unavailable") > 0
    b.drain()
    assert b.leader.metrics.value("kvtier_remote_healthy") == 0

    # While the store is gone, B runs on its host tier: new blocks are dropped for G4 only.
    q = prompt(9, 6 * BLOCK + 1)
    run_and_offload(b, "b1", q)
    assert b.leader.metrics.value("kvtier_dropped_offloads", tier="G4") > 0
    b.scheduler.reset_prefix_cache()
    run_and_offload(b, "b2", q)
    assert matched(b, "G2") >= 6 * BLOCK

    # The store comes back (empty, same port): B reconnects and offloads there again.
    server.start()
    assert wait_for(lambda: b.step() or b.leader.metrics.value("kvtier_remote_healthy") == 1)
    r = prompt(10, 4 * BLOCK + 1)
    run_and_offload(b, "b3", r)
    assert server.raw_client().exists(*store_keys(b, r)) == 4
    a.assert_no_leaks()
    b.assert_no_leaks()


def test_store_down_at_start_warns_once_and_runs_local(make_redis, instance, request, caplog):
    server = make_redis()
    server.stop()
    caplog.set_level(logging.INFO, logger="kvtier")
    b = instance(host(server.url, request))
    p = prompt(11, 6 * BLOCK + 1)
    run_and_offload(b, "b0", p)
    b.scheduler.reset_prefix_cache()
    run_and_offload(b, "b1", p)
    assert matched(b, "G2") == 6 * BLOCK, "the host tier works without the store"
    assert b.outputs["b0"] == b.outputs["b1"]
    warnings = [r for r in caplog.records
                if r.levelno >= logging.WARNING and r.name.startswith("kvtier")]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "unavailable" in warnings[0].getMessage()

    server.start()
    assert wait_for(lambda: b.step() or b.leader.metrics.value("kvtier_remote_healthy") == 1)
    q = prompt(12, 3 * BLOCK + 1)
    run_and_offload(b, "b2", q)
    assert server.raw_client().exists(*store_keys(b, q)) == 3
    b.assert_no_leaks()


def test_slow_store_times_out_and_recomputes(make_redis, instance, request):
    server = make_redis()
    a = instance(host(server.url, request, remote_timeout_ms=300))
    p = prompt(13, 8 * BLOCK + 1)
    run_and_offload(a, "a0", p)

    b = instance(remote(server.url, request, remote_timeout_ms=300))
    b.add("b0", p)
    hook, fired = first_load_planned(b, server.pause)
    try:
        run_with(b, hook)
        assert fired
        assert b.load_errors_seen
        assert remote_events(b, "timeouts") >= 1
        assert b.outputs["b0"] == a.outputs["a0"]
    finally:
        server.resume()
    assert wait_for(lambda: b.step() or b.leader.metrics.value("kvtier_remote_healthy") == 1)
    a.assert_no_leaks()
    b.assert_no_leaks()


def test_stalled_zero_copy_read_keeps_staging_slots_until_drained(make_mooncake, instance,
                                                                  request):
    server = make_mooncake(segment_mb=64)
    a = instance(host(server.url, request, remote_timeout_ms=500))
    p = prompt(14, 8 * BLOCK + 1)
    run_and_offload(a, "a0", p)

    b = instance(remote(server.url, request, remote_timeout_ms=500))
    b.add("b0", p)
    hook, fired = first_load_planned(b, server.pause)
    try:
        run_with(b, hook)
        assert fired
        assert b.load_errors_seen
        assert b.outputs["b0"] == a.outputs["a0"]
        # The abandoned read may still land in its staging slots: they stay pinned, so no
        # other block can be stored or staged there meanwhile.
        b.worker.worker.poll()
        assert not b.worker.worker.remote.drained
        assert b.leader.busy and b.leader.g2.num_active > 0
    finally:
        server.resume()
    assert wait_for(lambda: b.step() or not b.leader.busy, timeout_s=60)
    a.assert_no_leaks()
    b.assert_no_leaks()
