"""G4 on a real Mooncake Store (mooncake_master + a mooncake_client storage process on
loopback, started by the fixtures): data path, Mooncake's own semantics, and faults."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from remote_cases import FINGERPRINT, OTHER_FINGERPRINT, empty_like, make_blocks, views, wait_for
from servers import MooncakeServer

from kvtier.errors import ConfigError, StorageError
from kvtier.storage.remote import RetryingBackend, make_backend, make_namespace, remote_key

pytestmark = pytest.mark.timeout(90)

BLOCK = 256 * 1024 + 64
TIMEOUT_S = 1.0


def _namespace(test_name: str, fingerprint: int = FINGERPRINT, rank: int = 0) -> str:
    return make_namespace(f"test/{test_name}", fingerprint, rank)


@pytest.fixture(scope="module")
def backend(mooncake_server):
    # One client for the data-path tests: a Mooncake client's close() takes about a second.
    be = make_backend(mooncake_server.url, namespace=_namespace("shared"), timeout_s=TIMEOUT_S)
    yield be
    be.close()


@pytest.fixture(scope="module")
def raw(mooncake_server):
    store = mooncake_server.raw_client()
    yield store
    store.close()


def _delta(backend, before: dict) -> dict:
    return {name: value - before[name] for name, value in backend.stats.items()}


def test_round_trip_is_byte_exact_across_clients(backend, mooncake_server):
    keys, rows = make_blocks(16, BLOCK)
    before = dict(backend.stats)
    assert backend.batch_put(keys, views(rows)) == [True] * 16
    out = empty_like(rows)
    assert backend.batch_get_into(keys, views(out)) == [True] * 16
    assert np.array_equal(out, rows)
    assert backend.batch_exists(keys) == [True] * 16
    stats = _delta(backend, before)
    assert stats["hits"] == 16 and stats["bytes_got"] == rows.nbytes
    # Another client (another engine instance) reads what this one wrote, into an arena it
    # registered with the store (as a G2 arena would be for RDMA).
    with make_backend(mooncake_server.url, namespace=backend.namespace,
                      timeout_s=TIMEOUT_S) as reader:
        out = empty_like(rows)
        reader.register_memory(memoryview(out))
        assert reader.batch_get_into(keys, views(out)) == [True] * 16
    assert np.array_equal(out, rows)


def test_bytes_keys_round_trip(backend):
    keys, rows = make_blocks(4, BLOCK, bytes_keys=True, seed=1)
    assert all(backend.batch_put(keys, views(rows)))
    out = empty_like(rows)
    assert all(backend.batch_get_into(keys, views(out)))
    assert np.array_equal(out, rows)


def test_missing_key_is_a_miss(backend):
    keys, rows = make_blocks(3, BLOCK, seed=2)
    before = dict(backend.stats)
    assert all(backend.batch_put(keys[:2], views(rows[:2])))
    out = empty_like(rows)
    assert backend.batch_get_into(keys, views(out)) == [True, True, False]
    assert backend.batch_exists(keys) == [True, True, False]
    stats = _delta(backend, before)
    assert stats["misses"] == 1 and stats["checksum_failures"] == 0


def test_corrupt_value_is_a_miss_and_heals(backend, raw):
    keys, rows = make_blocks(3, BLOCK, seed=3)
    before = dict(backend.stats)
    assert all(backend.batch_put(keys, views(rows)))
    flipped = bytearray(rows[0].tobytes())
    flipped[-1] ^= 0xFF
    assert raw.upsert(remote_key(backend.namespace, keys[0]), bytes(flipped)) == 0
    assert raw.upsert(remote_key(backend.namespace, keys[1]), rows[1].tobytes()[:-10]) == 0
    out = empty_like(rows)
    assert backend.batch_get_into(keys, views(out)) == [False, False, True]
    assert _delta(backend, before)["checksum_failures"] == 2
    # Put is first-write-wins, so the bad values were force-removed (despite the read lease)
    # and the next offload heals the keys.
    assert all(backend.batch_put(keys, views(rows)))
    out = empty_like(rows)
    assert backend.batch_get_into(keys, views(out)) == [True] * 3
    assert np.array_equal(out, rows)


def test_other_namespaces_never_match(backend, mooncake_server):
    keys, rows = make_blocks(4, BLOCK, seed=4)
    assert all(backend.batch_put(keys, views(rows)))
    # Same model and rank, another KV layout: the one collision that would serve wrong bytes.
    other = make_namespace("test/shared", OTHER_FINGERPRINT, 0)
    with make_backend(mooncake_server.url, namespace=other, timeout_s=TIMEOUT_S) as reader:
        out = empty_like(rows)
        assert reader.batch_get_into(keys, views(out)) == [False] * 4
        assert reader.batch_exists(keys) == [False] * 4
        assert not out.any()
    # Other models and ranks get other store keys (the redis tests read through them too).
    names = {remote_key(ns, keys[0]) for ns in (backend.namespace, other,
                                                _namespace("shared", rank=1),
                                                make_namespace("test/other", FINGERPRINT, 0))}
    assert len(names) == 4


def test_put_of_held_key_succeeds_and_keeps_first_value(backend, raw):
    keys, rows = make_blocks(2, BLOCK, seed=5)
    assert backend.batch_put(keys, views(rows)) == [True, True]
    assert backend.batch_put(keys, views(rows)) == [True, True]
    assert raw.get(remote_key(backend.namespace, keys[0])) == rows[0].tobytes()


def test_bad_urls_are_config_errors(mooncake_server, request):
    namespace = _namespace(request.node.name)
    for url in (f"mooncake://{mooncake_server.master_address}",  # no metadata
                f"{mooncake_server.url}&segmnet_mb=4",  # typo
                "mooncake://:50051?metadata=http://x/metadata",
                f"{mooncake_server.url}&protocol=carrier-pigeon"):
        with pytest.raises(ConfigError):
            make_backend(url, namespace=namespace, timeout_s=TIMEOUT_S)


def test_store_down_at_start_up(make_mooncake, request, tmp_path):
    server = MooncakeServer(tmp_path)  # ports chosen, nothing started yet
    with pytest.raises(StorageError) as info:
        make_backend(server.url, namespace=_namespace(request.node.name), timeout_s=TIMEOUT_S)
    assert server.master_address in str(info.value)
    tier = RetryingBackend(server.url, namespace=_namespace(request.node.name),
                           timeout_s=TIMEOUT_S, initial_backoff_s=0.05, max_backoff_s=0.2)
    keys, rows = make_blocks(2, BLOCK, seed=6)
    assert not tier.healthy
    assert tier.batch_put(keys, views(rows)) == [False, False]
    assert tier.stats["unavailable"] == 2
    with server:
        assert wait_for(tier.maybe_reconnect)
        assert all(tier.batch_put(keys, views(rows)))
        tier.close()


def test_store_killed_mid_run_degrades_and_reconnects(make_mooncake, request):
    server = make_mooncake(segment_mb=64)
    tier = RetryingBackend(server.url, namespace=_namespace(request.node.name),
                           timeout_s=TIMEOUT_S, initial_backoff_s=0.05, max_backoff_s=0.2)
    keys, rows = make_blocks(8, BLOCK, seed=7)
    assert all(tier.batch_put(keys[:4], views(rows[:4])))
    server.kill()
    out = empty_like(rows)
    assert tier.batch_get_into(keys[:4], views(out[:4])) == [False] * 4
    assert tier.batch_put(keys[4:], views(rows[4:])) == [False] * 4
    assert not tier.healthy
    server.start()  # same ports, empty store
    # The storage process mounts its segment a moment after the master is back.
    assert wait_for(lambda: tier.maybe_reconnect() and all(tier.batch_put(keys, views(rows))))
    assert all(tier.batch_get_into(keys, views(out)))
    assert np.array_equal(out, rows)
    tier.close()


def test_slow_master_times_out_then_recovers(make_mooncake, request):
    server = make_mooncake(segment_mb=64)
    tier = RetryingBackend(server.url, namespace=_namespace(request.node.name), timeout_s=0.5,
                           initial_backoff_s=0.05, max_backoff_s=0.2)
    keys, rows = make_blocks(4, BLOCK, seed=8)
    # Another client writes, so the reader holds no location of these blocks from its own put.
    with make_backend(server.url, namespace=tier.namespace, timeout_s=TIMEOUT_S) as writer:
        assert all(writer.batch_put(keys, views(rows)))
    server.pause_master()
    try:
        out = empty_like(rows)
        assert tier.batch_get_into(keys, views(out)) == [False] * 4
        assert tier.stats["timeouts"] == 1
        assert not tier.healthy
        assert tier.batch_put(keys, views(rows)) == [False] * 4  # fails fast while down
    finally:
        server.resume_master()
    assert wait_for(lambda: tier.drained)
    assert wait_for(tier.maybe_reconnect)
    assert all(tier.batch_get_into(keys, views(out)))
    assert np.array_equal(out, rows)
    tier.close()


def test_stalled_transfer_keeps_buffers_fenced_until_drained(make_mooncake, request):
    # The storage process holds the bytes; stopping it stalls the transfer itself. The
    # zero-copy read may still land in the caller's buffers after the call gave up, and
    # ``drained`` says when it no longer can.
    server = make_mooncake(segment_mb=64)
    backend = make_backend(server.url, namespace=_namespace(request.node.name), timeout_s=0.5)
    keys, rows = make_blocks(4, BLOCK, seed=9)
    assert all(backend.batch_put(keys, views(rows)))
    out = empty_like(rows)
    server.pause()
    try:
        assert backend.batch_get_into(keys, views(out)) == [False] * 4
        assert not backend.healthy
        assert not backend.drained
    finally:
        server.resume()
    assert backend.wait_drained(30)
    assert backend.probe()
    assert all(backend.batch_get_into(keys, views(out)))
    assert np.array_equal(out, rows)
    backend.close()


# -- nobody lends the store memory ------------------------------------------------------------
# A Mooncake Store holds only memory that clients lend it. ``segment_mb=0`` below starts the
# master with a storage process that lends nothing: the store a user has who runs only
# ``mooncake_master`` with kvtier's default ``segment_mb=0``.

NO_MEMORY = "has no memory to store blocks into"


def _no_memory_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and NO_MEMORY in r.getMessage()]


def test_store_without_memory_warns_once_naming_the_fix(make_mooncake, request, caplog):
    server = make_mooncake(segment_mb=0)
    namespace = _namespace(request.node.name)
    keys, rows = make_blocks(4, BLOCK, seed=10)
    caplog.set_level(logging.INFO, logger="kvtier.storage.remote.mooncake")
    with make_backend(server.url, namespace=namespace, timeout_s=TIMEOUT_S) as backend:
        for _ in range(3):
            assert backend.batch_put(keys, views(rows)) == [False] * 4
        # The store declined (FULL): counted as failed puts, not an outage.
        assert backend.stats["put_failures"] == 12 and backend.stats["puts"] == 0
        assert backend.stats["errors"] == 0 and backend.healthy
        warnings = _no_memory_warnings(caplog)
        assert len(warnings) == 1, warnings
        assert "mooncake_client" in warnings[0] and "segment_mb=N" in warnings[0]
        assert server.master_address in warnings[0]

        # An instance that lends memory (segment_mb) stores; the first client then can too.
        with make_backend(f"{server.url}&segment_mb=64", namespace=namespace,
                          timeout_s=TIMEOUT_S) as lender:
            assert lender.batch_put(keys[:2], views(rows[:2])) == [True, True]
            assert wait_for(lambda: all(backend.batch_put(keys, views(rows))))
            out = empty_like(rows)
            assert backend.batch_get_into(keys, views(out)) == [True] * 4
            assert np.array_equal(out, rows)
    assert len(_no_memory_warnings(caplog)) == 1
    assert any("accepts puts now" in r.getMessage() for r in caplog.records)


def test_store_without_memory_counts_dropped_g4_offloads(make_mooncake, tiny_model, request,
                                                         caplog):
    """Under vLLM's real scheduler: every G4 offload to a store without memory is dropped and
    counted (``kvtier_dropped_offloads{tier="G4"}``), the tier stays healthy (it is not down),
    and the engine warns once. With ``segment_mb`` the same offloads land in the store."""
    from sched_harness import BLOCK as TOKENS
    from sched_harness import make_harness

    server = make_mooncake(segment_mb=0)
    prompt = [3 + (i * 37) % 1000 for i in range(10 * TOKENS + 5)]  # 10 full blocks
    caplog.set_level(logging.INFO, logger="kvtier.storage.remote.mooncake")
    results = {}
    for case, url in (("no memory", server.url), ("segment_mb", f"{server.url}&segment_mb=64")):
        h = make_harness(tiny_model, {"remote_url": url, "host_cache_blocks": 64,
                                      "model_id": f"test/{request.node.name}/{len(results)}",
                                      "remote_timeout_ms": 1000})
        try:
            h.add("r0", prompt)
            h.run()
            h.drain()
            metrics = h.leader.metrics
            results[case] = {
                "dropped": metrics.value("kvtier_dropped_offloads", tier="G4"),
                "stored": metrics.value("kvtier_transfer_blocks", direction="g2_to_g4"),
                "put_failures": metrics.value("kvtier_remote_events", event="put_failures"),
                "healthy": metrics.value("kvtier_remote_healthy")}
        finally:
            h.worker.shutdown()
    assert results["no memory"] == {"dropped": 10, "stored": 0, "put_failures": 10,
                                    "healthy": 1}, results
    assert results["segment_mb"] == {"dropped": 0, "stored": 10, "put_failures": 0,
                                     "healthy": 1}, results
    assert len(_no_memory_warnings(caplog)) == 1
