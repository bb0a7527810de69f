"""G4 on a real Redis Cluster (3 masters on loopback, started here, password-protected): the
shared Redis cases, batches across slots, a full master, startup nodes, passwords, and a master
lost to SIGKILL whose replica is promoted."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
from remote_cases import FINGERPRINT, empty_like, make_blocks, views, wait_for
from servers import LOOPBACK, RedisClusterServers, free_port

# The single-server cases, run here against the cluster through this module's fixtures.
from test_remote_redis import (  # noqa: F401
    test_bytes_keys_round_trip,
    test_caller_contract_errors_raise,
    test_corrupt_value_is_a_miss_and_heals,
    test_missing_key_is_a_miss,
    test_other_namespaces_never_match,
    test_put_of_held_key_succeeds_and_keeps_first_value,
    test_round_trip_is_byte_exact,
)

from kvtier.errors import ConfigError, StorageError
from kvtier.storage.remote import RetryingBackend, make_backend, make_namespace, remote_key
from need import need, need_servers

pytestmark = pytest.mark.timeout(60)

BLOCK = 64 * 1024 + 64
TIMEOUT_S = 2.0
PASSWORD = "cluster-pw"


def _namespace(test_name: str) -> str:
    return make_namespace(f"test/{test_name}", FINGERPRINT, 0)


def _need_cluster_tools() -> None:
    need_servers("redis")
    need(None if shutil.which("redis-cli") else "redis-cli not installed (Debian redis-tools)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three masters, no replicas, shared by the module's tests (distinct namespaces)."""
    _need_cluster_tools()
    with RedisClusterServers(tmp_path_factory.mktemp("redis-cluster"),
                             password=PASSWORD) as servers:
        yield servers


@pytest.fixture(scope="module")
def redis_server(cluster):
    """The name the shared cases from test_remote_redis.py ask for."""
    return cluster


@pytest.fixture
def backend(cluster, request):
    be = make_backend(cluster.url, namespace=_namespace(request.node.name),
                      timeout_s=TIMEOUT_S)
    yield be
    be.close()


def _owners(servers: RedisClusterServers, namespace: str, keys) -> list[int]:
    """The port of the master that holds each key's slot."""
    raw = servers.raw_client()
    try:
        return [raw.get_node_from_key(remote_key(namespace, key)).port for key in keys]
    finally:
        raw.close()


def _assert_only_true_bytes(got: list[bool], out: np.ndarray, rows: np.ndarray) -> None:
    """Every block reported read holds exactly the bytes that were put."""
    for idx, ok in enumerate(got):
        if ok:
            assert np.array_equal(out[idx], rows[idx]), f"block {idx} served wrong bytes"


def test_one_batch_spans_every_master_without_cross_slot_commands(backend, cluster):
    keys, rows = make_blocks(96, BLOCK, seed=21)
    assert backend.batch_put(keys, views(rows)) == [True] * 96
    out = empty_like(rows)
    assert backend.batch_get_into(keys, views(out)) == [True] * 96
    assert np.array_equal(out, rows)
    assert backend.batch_exists(keys) == [True] * 96
    masters = cluster.masters()
    assert len(masters) == 3
    per_master = {}
    for port in masters:
        client = cluster.node_client(port)
        per_master[port] = sum(1 for _ in client.scan_iter(match=f"{backend.namespace}/*",
                                                           count=1000))
        stats = client.info("commandstats")
        assert not {"cmdstat_mset", "cmdstat_mget", "cmdstat_msetnx"} & set(stats)
        client.close()
    assert all(count > 0 for count in per_master.values()), per_master
    assert sum(per_master.values()) == 96
    assert sorted(set(_owners(cluster, backend.namespace, keys))) == masters


def test_a_full_master_fails_only_its_own_blocks(backend, cluster):
    keys, rows = make_blocks(48, BLOCK, seed=22)
    owners = _owners(cluster, backend.namespace, keys)
    full = cluster.masters()[0]
    client = cluster.node_client(full)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1")  # every write on this master: OOM
    try:
        put = backend.batch_put(keys, views(rows))
    finally:
        client.config_set("maxmemory", "0")
        client.close()
    assert put == [owner != full for owner in owners]
    assert backend.healthy  # a full store is no health problem
    out = empty_like(rows)
    got = backend.batch_get_into(keys, views(out))
    assert got == put
    _assert_only_true_bytes(got, out, rows)
    assert backend.stats["put_failures"] == owners.count(full) > 0


def test_startup_nodes_ttl_and_unreachable_cluster(cluster, request, caplog):
    namespace = _namespace(request.node.name)
    dead = f"{LOOPBACK}:{free_port()}"
    first_port = cluster.masters()[0]
    url = f"redis+cluster://:{PASSWORD}@{dead},{LOOPBACK}:{first_port}/?ttl_s=300"
    with make_backend(url, namespace=namespace, timeout_s=TIMEOUT_S) as be:
        keys, rows = make_blocks(8, BLOCK, seed=23)
        assert all(be.batch_put(keys, views(rows)))
        raw = cluster.raw_client()
        assert all(0 < raw.ttl(remote_key(namespace, key)) <= 300 for key in keys)
        raw.close()
    down = f"redis+cluster://:s3cret-pw@{dead},{LOOPBACK}:{free_port()}/"
    with pytest.raises(StorageError) as info:
        make_backend(down, namespace=namespace, timeout_s=TIMEOUT_S)
    assert dead in str(info.value) and "s3cret-pw" not in str(info.value)
    with caplog.at_level(logging.DEBUG, logger="kvtier"):
        tier = RetryingBackend(down, namespace=namespace, timeout_s=TIMEOUT_S,
                               initial_backoff_s=0.05, max_backoff_s=0.2)
        assert not tier.healthy
        assert tier.batch_get_into(keys[:2], views(empty_like(rows[:2]))) == [False, False]
        tier.close()
    assert "s3cret-pw" not in caplog.text


def test_wrong_password_is_a_storage_error_without_the_password(cluster, request, caplog):
    bad_url = cluster.url.replace(PASSWORD, "wrong-pw")
    with caplog.at_level(logging.DEBUG, logger="kvtier"), pytest.raises(StorageError) as info:
        make_backend(bad_url, namespace=_namespace(request.node.name), timeout_s=TIMEOUT_S)
    assert "wrong-pw" not in str(info.value) and "***" in str(info.value)
    assert "wrong-pw" not in caplog.text


@pytest.mark.parametrize("url", [
    "redis+cluster://127.0.0.1:1/0", "redis+cluster://127.0.0.1:1,127.0.0.1/",
    "redis+cluster://127.0.0.1:1,127.0.0.1:x/", "redis+cluster://127.0.0.1:1/?ttl=5",
    "redis+cluster://127.0.0.1:1/?ttl_s=0"])
def test_bad_cluster_urls_are_config_errors_before_any_connection(url):
    with pytest.raises(ConfigError):
        make_backend(url, namespace=_namespace("bad-url"), timeout_s=TIMEOUT_S)


def test_master_killed_then_replica_promoted(tmp_path, request):
    """SIGKILL a master that has a replica: the same batch still serves the other masters'
    blocks, the tier turns unhealthy and answers misses at once, reconnects once the replica
    is promoted, and no read, before, during or after, returns bytes other than those put."""
    _need_cluster_tools()
    namespace = _namespace(request.node.name)
    # full_coverage=False: the surviving masters keep serving their slots during the failover.
    with RedisClusterServers(tmp_path / "cluster", replicas_per_master=1,
                             full_coverage=False) as servers:
        tier = RetryingBackend(servers.url, namespace=namespace, timeout_s=TIMEOUT_S,
                               initial_backoff_s=0.05, max_backoff_s=0.5)
        keys, rows = make_blocks(48, BLOCK, seed=24)
        assert all(tier.batch_put(keys, views(rows)))
        owners = _owners(servers, namespace, keys)
        victim = owners[0]
        replica = servers.replicas_of(victim)[0]
        source, copy = servers.node_client(victim), servers.node_client(replica)
        assert wait_for(lambda: copy.dbsize() == source.dbsize() > 0)  # replicated
        source.close(), copy.close()

        servers.kill_node(victim)
        on_victim = [owner == victim for owner in owners]
        out = empty_like(rows)
        got = tier.batch_get_into(keys, views(out))
        _assert_only_true_bytes(got, out, rows)
        assert got == [not lost for lost in on_victim]  # per block: only the lost master's
        assert not tier.healthy
        assert tier.batch_get_into(keys, views(out)) == [False] * 48  # fails fast while down
        assert tier.batch_put(keys, views(rows)) == [False] * 48
        assert tier.stats["unavailable"] == 96

        reads = []

        def served_again() -> bool:
            tier.maybe_reconnect()
            got = tier.batch_get_into(keys, views(out))
            _assert_only_true_bytes(got, out, rows)
            reads.append(sum(got))
            return all(got)

        assert wait_for(served_again, timeout_s=45, step_s=0.2), reads
        # The client already follows the new master; the node the harness asks may hear of
        # the promotion a gossip round later (seen once under load: the replica not yet
        # listed as a master although every read was served), so its view gets time too.
        assert wait_for(lambda: replica in servers.masters() and victim not in servers.masters(),
                        timeout_s=30, step_s=0.2), servers.masters()
        keys2, rows2 = make_blocks(24, BLOCK, seed=25)
        assert all(tier.batch_put(keys2, views(rows2)))
        out2 = empty_like(rows2)
        assert all(tier.batch_get_into(keys2, views(out2)))
        assert np.array_equal(out2, rows2)
        stats = tier.stats
        assert stats["reconnects"] == 1 and stats["errors"] >= 1
        assert stats["misses"] >= on_victim.count(True)
        assert stats["checksum_failures"] == 0
        print(f"failover: {on_victim.count(True)} of 48 blocks on the killed master; reads "
              f"while recovering (hits of 48): {reads}; stats {stats}")
        tier.close()
