"""G4 on a real redis-server (loopback, started by the fixtures): data path and faults."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from remote_cases import (
    FINGERPRINT,
    OTHER_FINGERPRINT,
    check_round_trip,
    empty_like,
    make_blocks,
    views,
    wait_for,
)

from kvtier.errors import StorageError, TransferError
from kvtier.storage.remote import RetryingBackend, make_backend, make_namespace, remote_key

pytestmark = pytest.mark.timeout(60)

BLOCK = 64 * 1024 + 64
TIMEOUT_S = 1.0


def _namespace(test_name: str, fingerprint: int = FINGERPRINT, rank: int = 0) -> str:
    return make_namespace(f"test/{test_name}", fingerprint, rank)


@pytest.fixture
def backend(redis_server, request):
    be = make_backend(redis_server.url, namespace=_namespace(request.node.name),
                      timeout_s=TIMEOUT_S)
    yield be
    be.close()


def test_round_trip_is_byte_exact(backend):
    check_round_trip(backend, BLOCK)


def test_bytes_keys_round_trip(backend):
    keys, rows = make_blocks(4, BLOCK, bytes_keys=True, seed=3)
    assert all(backend.batch_put(keys, views(rows)))
    out = empty_like(rows)
    assert all(backend.batch_get_into(keys, views(out)))
    assert np.array_equal(out, rows)


def test_missing_key_is_a_miss(backend):
    keys, rows = make_blocks(3, BLOCK)
    assert all(backend.batch_put(keys[:2], views(rows[:2])))
    out = empty_like(rows)
    assert backend.batch_get_into(keys, views(out)) == [True, True, False]
    assert backend.batch_exists(keys) == [True, True, False]
    assert backend.stats["misses"] == 1 and backend.stats["checksum_failures"] == 0


def test_corrupt_value_is_a_miss_and_heals(backend, redis_server):
    keys, rows = make_blocks(3, BLOCK, seed=1)
    assert all(backend.batch_put(keys, views(rows)))
    raw = redis_server.raw_client()
    flipped = bytearray(rows[0].tobytes())
    flipped[-1] ^= 0xFF  # one payload bit pattern changed: checksum mismatch
    raw.set(remote_key(backend.namespace, keys[0]), bytes(flipped))
    raw.set(remote_key(backend.namespace, keys[1]), rows[1].tobytes()[:-10])  # truncated
    out = empty_like(rows)
    assert backend.batch_get_into(keys, views(out)) == [False, False, True]
    assert backend.stats["checksum_failures"] == 2
    # The bad values are dropped, so the next offload of the same blocks heals the keys.
    assert all(backend.batch_put(keys, views(rows)))
    out = empty_like(rows)
    assert backend.batch_get_into(keys, views(out)) == [True] * 3
    assert np.array_equal(out, rows)


def test_other_namespaces_never_match(redis_server, request):
    name = request.node.name
    keys, rows = make_blocks(4, BLOCK, seed=2)
    with make_backend(redis_server.url, namespace=_namespace(name),
                      timeout_s=TIMEOUT_S) as writer:
        assert all(writer.batch_put(keys, views(rows)))
    others = [_namespace(name, fingerprint=OTHER_FINGERPRINT), _namespace(name, rank=1),
              make_namespace(f"test/{name}-other-model", FINGERPRINT, 0)]
    for namespace in others:
        with make_backend(redis_server.url, namespace=namespace,
                          timeout_s=TIMEOUT_S) as reader:
            out = empty_like(rows)
            assert reader.batch_get_into(keys, views(out)) == [False] * 4
            assert reader.batch_exists(keys) == [False] * 4
            assert not out.any()


def test_put_of_held_key_succeeds_and_keeps_first_value(backend, redis_server):
    keys, rows = make_blocks(2, BLOCK, seed=4)
    assert backend.batch_put(keys, views(rows)) == [True, True]
    assert backend.batch_put(keys, views(rows)) == [True, True]
    assert redis_server.raw_client().get(remote_key(backend.namespace, keys[0])) \
        == rows[0].tobytes()


def test_caller_contract_errors_raise(backend):
    keys, rows = make_blocks(2, BLOCK, seed=5)
    with pytest.raises(TransferError):
        backend.batch_put(keys, views(rows[:1]))
    with pytest.raises(TransferError):  # header names another key
        backend.batch_put([keys[1], keys[0]], views(rows))
    _, foreign = make_blocks(1, BLOCK, fingerprint=OTHER_FINGERPRINT)
    with pytest.raises(TransferError):  # header names another geometry
        backend.batch_put(keys[:1], views(foreign))
    with pytest.raises(TransferError):
        backend.batch_get_into(keys[:1], [memoryview(rows[0].tobytes())])  # read-only


def test_store_killed_mid_run_degrades_and_reconnects(make_redis, request):
    server = make_redis()
    tier = RetryingBackend(server.url, namespace=_namespace(request.node.name),
                           timeout_s=TIMEOUT_S, initial_backoff_s=0.05, max_backoff_s=0.2)
    keys, rows = make_blocks(8, BLOCK, seed=6)
    assert all(tier.batch_put(keys[:4], views(rows[:4])))
    server.kill()
    out = empty_like(rows)
    assert tier.batch_get_into(keys[:4], views(out[:4])) == [False] * 4
    assert tier.batch_put(keys[4:], views(rows[4:])) == [False] * 4
    assert not tier.healthy
    assert not tier.maybe_reconnect()
    server.start()  # same port, empty store
    assert wait_for(tier.maybe_reconnect)
    assert all(tier.batch_put(keys, views(rows)))
    assert all(tier.batch_get_into(keys, views(out)))
    assert np.array_equal(out, rows)
    assert tier.stats["reconnects"] == 1 and tier.stats["hits"] == 8
    tier.close()


def test_store_down_at_start_up(make_redis, request, caplog):
    server = make_redis(password="s3cret-pw")
    server.stop()
    with pytest.raises(StorageError) as info:
        make_backend(server.url, namespace=_namespace(request.node.name), timeout_s=TIMEOUT_S)
    assert f"127.0.0.1:{server.port}" in str(info.value)
    assert "s3cret-pw" not in str(info.value)
    # The retrying tier starts anyway, answers misses, and picks the store up once it is up.
    with caplog.at_level(logging.DEBUG, logger="kvtier"):
        tier = RetryingBackend(server.url, namespace=_namespace(request.node.name),
                               timeout_s=TIMEOUT_S, initial_backoff_s=0.05, max_backoff_s=0.2)
        keys, rows = make_blocks(2, BLOCK, seed=7)
        assert not tier.healthy
        assert tier.batch_put(keys, views(rows)) == [False, False]
        assert tier.stats["unavailable"] == 2
        server.start()
        assert wait_for(tier.maybe_reconnect)
        assert all(tier.batch_put(keys, views(rows)))
    assert "s3cret-pw" not in caplog.text
    assert "unavailable" in caplog.text
    tier.close()


def test_wrong_password_is_a_storage_error_without_the_password(make_redis, request):
    server = make_redis(password="right-pw")
    bad_url = server.url.replace("right-pw", "wrong-pw")
    with pytest.raises(StorageError) as info:
        make_backend(bad_url, namespace=_namespace(request.node.name), timeout_s=TIMEOUT_S)
    assert "wrong-pw" not in str(info.value) and "***" in str(info.value)


def test_slow_store_times_out_then_recovers(make_redis, request):
    server = make_redis()
    tier = RetryingBackend(server.url, namespace=_namespace(request.node.name), timeout_s=0.5,
                           initial_backoff_s=0.05, max_backoff_s=0.2)
    keys, rows = make_blocks(4, BLOCK, seed=8)
    assert all(tier.batch_put(keys, views(rows)))
    server.pause()
    try:
        out = empty_like(rows)
        assert tier.batch_get_into(keys, views(out)) == [False] * 4
        assert tier.stats["timeouts"] == 1
        assert not tier.healthy
        assert tier.batch_exists(keys) == [False] * 4  # fails fast while down
    finally:
        server.resume()
    assert wait_for(tier.maybe_reconnect)
    assert tier.drained
    assert all(tier.batch_get_into(keys, views(out)))
    assert np.array_equal(out, rows)
    tier.close()
