"""G4 on a Redis Cluster: ``redis+cluster://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...][/][?ttl_s=N]``.

The hosts are startup nodes: any reachable one is enough to discover the cluster's masters and
slots. The data path is the single-server backend's (``redis.py``): ``SET NX`` / ``GET`` /
``EXISTS`` with the same ``ttl_s`` and the same verification of every block read, except that a
batch is split by hash slot into one non-transactional pipeline per master (never a cross-slot
``MSET``/``MGET``), the masters' pipelines running concurrently. Each key keeps its own result: the keys of a master that fails are misses or
failed puts (and turn the backend unhealthy until ``probe()``), the other masters' keys are
served as usual.

Topology. A ``MOVED``/``ASK``/``CLUSTERDOWN``/``TRYAGAIN`` reply fails that key and makes the
next batch refresh the slot map first. ``probe()`` (``RetryingBackend.maybe_reconnect()``)
refreshes it and pings every master, so after a failover the backend is healthy again once the
replica has been promoted. redis-py's own retries and redirections are off, as on one server:
the caller's backoff decides when to try again.

Cluster mode has one database: the URL has no ``/DB``.
"""

from __future__ import annotations

import threading
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    RedisClusterException,
    TryAgainError,
)
from redis.retry import Retry

from kvtier.errors import ConfigError
from kvtier.storage.remote.base import FAILED
from kvtier.storage.remote.redis import Group, RedisBackend, parse_params

SCHEME = "redis+cluster"

# Replies that mean the client's slot map is out of date (AskError covers MovedError).
_TOPOLOGY_ERRORS = (AskError, ClusterDownError, TryAgainError)


class RedisClusterBackend(RedisBackend):
    """Registered for ``redis+cluster://`` by ``kvtier.storage.remote`` (the scheme is no
    module name, so ``backend_class`` could not find this module by itself)."""

    scheme = SCHEME
    _UNREACHABLE = (redis.RedisError, RedisClusterException)

    def _open(self, url: str) -> int | None:
        self._username, self._startup, ttl_s = _split_cluster_url(url, self.url)
        self._cluster: RedisCluster | None = None  # built by the first probe (it does I/O)
        self._topology_lock = threading.Lock()
        self._stale = False
        return ttl_s

    def _connect(self) -> RedisCluster:
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in self._startup],
            username=self._username,
            password=unquote(self._password) if self._password else None,
            socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s,
            retry=Retry(NoBackoff(), 0), require_full_coverage=True)

    def _refresh(self) -> RedisCluster:
        with self._topology_lock:
            if self._cluster is None:
                self._cluster = self._connect()
            elif self._stale:
                self._cluster.nodes_manager.initialize()
            self._stale = False
            return self._cluster

    def _groups(self, names: list[str]) -> list[Group]:
        cluster = self._refresh() if self._stale else self._cluster
        groups: dict[str, Group] = {}
        for idx, name in enumerate(names):
            node = cluster.get_node_from_key(name)
            group = groups.get(node.name)
            if group is None:
                groups[node.name] = group = (cluster.get_redis_connection(node), [])
            group[1].append(idx)
        return list(groups.values())

    def _reply_error(self, reply: Exception) -> int:
        if isinstance(reply, _TOPOLOGY_ERRORS):
            self._stale = True
            return FAILED
        return super()._reply_error(reply)

    def _probe(self) -> bool:
        """Refresh the slot map, then every master must answer a PING."""
        self._stale = True
        cluster = self._refresh()
        primaries = cluster.get_primaries()
        return bool(primaries) and all(
            cluster.get_redis_connection(node).ping() is True for node in primaries)

    def _close(self) -> None:
        self._shutdown_pool()
        if self._cluster is not None:
            self._cluster.close()

    def _abandon(self) -> None:
        self._runner.close()
        self._close()

    def _where(self, client: redis.Redis) -> str:
        kwargs = client.connection_pool.connection_kwargs
        return f"{self.url} (node {kwargs.get('host')}:{kwargs.get('port')})"


def _split_cluster_url(url: str, shown: str) -> tuple[str | None, list[tuple[str, int]],
                                                      int | None]:
    """(username, startup nodes, ttl_s) of a ``redis+cluster://`` URL."""
    parts = urlsplit(url)
    hosts = parts.netloc.rsplit("@", 1)[-1]
    username = unquote(parts.username) if parts.username else None
    nodes = []
    for hostport in hosts.split(","):
        try:
            node = urlsplit(f"//{hostport}")
            host, port = node.hostname, node.port
        except ValueError as exc:
            raise ConfigError(f"remote_url={shown!r}: startup node {hostport!r} is not "
                              f"HOST:PORT ({exc})") from None
        if not host or port is None:
            raise ConfigError(f"remote_url={shown!r}: startup node {hostport!r} is not "
                              "HOST:PORT")
        nodes.append((host, port))
    ttl_s = parse_params(parts.query, shown)
    if parts.path not in ("", "/"):
        raise ConfigError(f"remote_url={shown!r}: a Redis Cluster has one database, so the "
                          f"URL takes no path (got {parts.path!r}); use "
                          f"{SCHEME}://HOST:PORT[,HOST:PORT...]/")
    return username, nodes, ttl_s
