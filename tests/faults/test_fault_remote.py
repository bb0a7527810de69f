"""The G4 backends' own fault behaviour against a real Redis on loopback (not yet wired into
the leader and worker, so tested at the backend): partial batch failures, injected timeouts,
errors and corrupt values, a store killed under concurrent load, and credentials that never
reach a log line or an error message.

Complements tests/integration/test_remote_*.py (store down at start, killed, paused), which
these tests do not repeat. Every block reported read is checked byte for byte.
"""

from __future__ import annotations

import logging
import random
import threading

import numpy as np
import pytest
from remote_cases import FINGERPRINT, empty_like, make_blocks, views, wait_for
from servers import RedisServer

from kvtier.errors import StorageError
from kvtier.storage import faults
from kvtier.storage.remote import RetryingBackend, make_backend, make_namespace
from need import need_servers

BLOCK = 4096 + 64
SECRET = "Faults-Secret-pw-9"


@pytest.fixture(autouse=True)
def _redis_installed():
    """No redis-server: skipped, or failed with REQUIRE_TEST_SERVERS=1 (CI)."""
    need_servers("redis")


@pytest.fixture
def redis_factory(tmp_path_factory):
    started = []

    def start(**kw) -> RedisServer:
        server = RedisServer(tmp_path_factory.mktemp("redis"), **kw)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.close()


def ns(name: str) -> str:
    return make_namespace(f"faults-{name}", FINGERPRINT)


def check_exact(ok, out, rows) -> int:
    for i, good in enumerate(ok):
        if good:
            assert np.array_equal(out[i], rows[i]), f"block {i} served with wrong bytes"
    return sum(ok)


def test_partial_batch_failure_from_a_full_store(redis_factory, request):
    """Redis refuses some SETs of one pipeline (maxmemory, noeviction): those blocks are False,
    counted, the store stays healthy, and what was stored reads back exact."""
    server = redis_factory()
    raw = server.raw_client()
    used = int(raw.info("memory")["used_memory"])
    raw.config_set("maxmemory-policy", "noeviction")
    raw.config_set("maxmemory", str(used + 32 * BLOCK))
    backend = make_backend(server.url, namespace=ns(request.node.name), timeout_s=5.0)
    try:
        keys, rows = make_blocks(96, BLOCK, seed=1)
        ok = backend.batch_put(keys, views(rows))
        assert 0 < sum(ok) < len(ok), "the store should take some blocks and refuse others"
        assert backend.healthy, "a full store is back-pressure, not an outage"
        assert backend.snapshot_stats()["put_failures"] == ok.count(False)
        out = empty_like(rows)
        got = backend.batch_get_into(keys, views(out))
        assert check_exact(got, out, rows) == sum(ok)
        assert [g for g, o in zip(got, ok) if not o] == [False] * ok.count(False)
    finally:
        backend.close()
        raw.close()


def test_partial_batch_failure_from_a_foreign_value(redis_factory, request):
    """One key of a batch holds a value of another Redis type (WRONGTYPE on GET): that block
    is a miss, the others hit exact, nothing raises."""
    server = redis_factory()
    backend = make_backend(server.url, namespace=ns(request.node.name), timeout_s=5.0)
    raw = server.raw_client()
    try:
        keys, rows = make_blocks(8, BLOCK, seed=2)
        assert all(backend.batch_put(keys, views(rows)))
        name = f"{ns(request.node.name)}/{keys[3]:016x}"
        raw.delete(name)
        raw.hset(name, "field", "value")
        out = empty_like(rows)
        got = backend.batch_get_into(keys, views(out))
        assert got == [True] * 3 + [False] + [True] * 4
        check_exact(got, out, rows)
        assert backend.snapshot_stats()["errors"] >= 1
    finally:
        backend.close()
        raw.close()


@pytest.mark.parametrize("point,kind", [("remote.get", "timeout"), ("remote.put", "error"),
                                        ("remote.get", "error")])
def test_injected_outage_fails_the_batch_then_the_tier_recovers(redis_factory, request, point,
                                                                kind):
    server = redis_factory()
    tier = RetryingBackend(server.url, namespace=ns(request.node.name), timeout_s=0.3,
                           initial_backoff_s=0.02, max_backoff_s=0.1)
    try:
        keys, rows = make_blocks(6, BLOCK, seed=3)
        assert all(tier.batch_put(keys[:3], views(rows[:3])))
        out = empty_like(rows)
        with faults.armed(point, kind, times=1, delay_s=0.0) as rule:
            if point == "remote.put":
                assert tier.batch_put(keys[3:], views(rows[3:])) == [False] * 3
            else:
                assert tier.batch_get_into(keys[:3], views(out[:3])) == [False] * 3
        assert rule.fired == 1
        assert not tier.healthy
        stats = tier.stats
        assert stats["timeouts" if kind == "timeout" else "errors"] >= 1
        assert wait_for(tier.maybe_reconnect, timeout_s=20)
        assert wait_for(lambda: tier.drained, timeout_s=20)
        assert all(tier.batch_put(keys, views(rows)))
        got = tier.batch_get_into(keys, views(out))
        assert got == [True] * 6 and check_exact(got, out, rows) == 6
    finally:
        tier.close()


def test_injected_partial_and_corrupt_results_are_misses_never_data(redis_factory, request):
    server = redis_factory()
    backend = make_backend(server.url, namespace=ns(request.node.name), timeout_s=5.0)
    try:
        keys, rows = make_blocks(16, BLOCK, seed=4)
        with faults.armed("remote.put", "partial", seed=1):
            ok = backend.batch_put(keys, views(rows))
        assert 0 < ok.count(False) < 16
        assert all(backend.batch_put(keys, views(rows)))  # a retry stores the rest
        out = empty_like(rows)
        with faults.armed("remote.get", "partial", seed=2):
            got = backend.batch_get_into(keys, views(out))
        assert 0 < got.count(False) < 16
        check_exact(got, out, rows)
        with faults.armed("remote.get", "corrupt", seed=3):
            got = backend.batch_get_into(keys, views(out))
        assert got.count(False) == 1
        check_exact(got, out, rows)
        assert backend.snapshot_stats()["checksum_failures"] == 1
        # The corrupt value was dropped from the store, so the next put heals the key.
        bad = got.index(False)
        assert backend.batch_exists([keys[bad]]) == [False]
        assert all(backend.batch_put(keys, views(rows)))
        got = backend.batch_get_into(keys, views(out))
        assert all(got) and check_exact(got, out, rows) == 16
    finally:
        backend.close()


def test_store_killed_under_concurrent_load(redis_factory, request):
    """Four threads put and get through one tier while the store is killed and restarted and
    some calls are faulted: every block reported read is exact, no thread hangs, and the tier
    serves again once the store is back."""
    server = redis_factory()
    tier = RetryingBackend(server.url, namespace=ns(request.node.name), timeout_s=0.5,
                           initial_backoff_s=0.02, max_backoff_s=0.2)
    stop = threading.Event()
    counts = {"hits": 0, "misses": 0}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(tid: int):
        rng = random.Random(tid)
        keys, rows = make_blocks(12, BLOCK, seed=100 + tid)
        out = empty_like(rows[:4])
        try:
            while not stop.is_set():
                pick = rng.sample(range(12), 4)
                tier.maybe_reconnect()
                tier.batch_put([keys[i] for i in pick], views(rows[pick]))
                out[:] = 0
                got = tier.batch_get_into([keys[i] for i in pick], views(out))
                for j, i in enumerate(pick):
                    if got[j]:
                        assert np.array_equal(out[j], rows[i]), "wrong bytes served"
                with lock:
                    counts["hits"] += sum(got)
                    counts["misses"] += got.count(False)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(t,), daemon=True) for t in range(4)]
    with faults.armed("remote.get", "corrupt", probability=0.1, seed=5), \
            faults.armed("remote.put", "partial", probability=0.1, seed=6):
        for t in threads:
            t.start()
        assert wait_for(lambda: counts["hits"] > 50, timeout_s=30)
        server.kill()
        assert wait_for(lambda: not tier.healthy, timeout_s=30)
        server.start()
        hits_before = counts["hits"]
        assert wait_for(lambda: counts["hits"] > hits_before + 50, timeout_s=60), \
            "the tier never served again after the store came back"
        stop.set()
        for t in threads:
            t.join(60)
    try:
        assert not any(t.is_alive() for t in threads), "a client thread hung"
        assert not errors, errors
        assert counts["misses"] > 0
    finally:
        tier.close()


def test_credentials_never_logged_through_an_outage(redis_factory, request, caplog):
    server = redis_factory(password=SECRET)
    messages = []
    with caplog.at_level(logging.DEBUG):
        tier = RetryingBackend(server.url, namespace=ns(request.node.name), timeout_s=0.3,
                               initial_backoff_s=0.02, max_backoff_s=0.1)
        try:
            keys, rows = make_blocks(4, BLOCK, seed=7)
            assert all(tier.batch_put(keys, views(rows)))
            with faults.armed("remote.get", "timeout", times=1):
                tier.batch_get_into(keys, views(empty_like(rows)))
            with faults.armed("remote.put", "error", times=1):
                wait_for(tier.maybe_reconnect, timeout_s=10)
                tier.batch_put(keys, views(rows))
            server.kill()
            tier.maybe_reconnect()
            tier.batch_get_into(keys, views(empty_like(rows)))
            for _ in range(5):
                tier.maybe_reconnect()
            server.start()
            assert wait_for(tier.maybe_reconnect, timeout_s=20)
            for url in (server.url.replace(SECRET, SECRET + "x"),
                        server.url.replace(str(server.port), "1")):
                with pytest.raises(StorageError) as info:
                    make_backend(url, namespace=ns(request.node.name), timeout_s=0.5)
                messages.append(str(info.value))
        finally:
            tier.close()
    assert "unavailable" in caplog.text or "lost" in caplog.text
    assert SECRET not in caplog.text
    for message in messages:
        assert SECRET not in message, message
