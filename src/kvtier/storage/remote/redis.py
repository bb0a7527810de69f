"""G4 on Redis: ``redis://[:password@]HOST:PORT/DB[?ttl_s=SECONDS]``.

One pipeline per batch (per master on a Redis Cluster, see ``redis_cluster.py``, which shares this
module's code: the masters' pipelines run concurrently, one helper thread each, so a batch costs
one round trip to the slowest master, not one per master). Puts are ``SET key block NX`` (first write wins, so a block another instance
stored is kept and the put reports success); gets are ``GET`` and are copied into the caller's
buffers on the calling thread, after the reply arrived. ``ttl_s`` sets an expiry on new blocks;
otherwise the server's ``maxmemory-policy`` (e.g. ``allkeys-lru``) decides eviction.

Every socket operation has ``socket_timeout = timeout_s`` and redis-py's own retries are off:
the caller's backoff (``RetryingBackend``) decides when to try again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvtier.errors import ConfigError, StorageError
from kvtier.storage.remote.base import (
    DOWN,
    FAILED,
    FULL,
    TIMEOUT,
    RemoteBackend,
    _describe,
    register_backend,
)

logger = logging.getLogger(__name__)

_OUR_PARAMS = frozenset({"ttl_s"})

# One pipeline's share of a batch: the client that serves it and the batch positions it holds.
Group = tuple["redis.Redis", list[int]]


@register_backend
class RedisBackend(RemoteBackend):
    scheme = "redis"
    # What the client raises when the store cannot be reached at start-up.
    _UNREACHABLE: tuple[type[Exception], ...] = (redis.RedisError,)

    def __init__(self, url: str, *, namespace: str, timeout_s: float) -> None:
        super().__init__(url, namespace=namespace, timeout_s=timeout_s)
        try:
            self._password = urlsplit(url).password
        except ValueError as exc:   # e.g. an unclosed IPv6 bracket
            raise ConfigError(f"remote_url={self.url!r} is not allowed: {exc}") from None
        self._pool: ThreadPoolExecutor | None = None  # group helpers, built when a batch splits
        self._pool_size = 0
        self._pool_lock = threading.Lock()
        self._ttl_s = self._open(url)
        try:
            answered = self._runner.run(self.timeout_s, self._probe)
        except self._UNREACHABLE as exc:
            self._abandon()
            raise StorageError(f"redis store {self.url} unreachable: "
                               f"{self._scrub(_describe(exc))}") from None
        if answered is not True:
            self._abandon()
            raise StorageError(f"redis store {self.url} unreachable: no answer within "
                               f"{self.timeout_s:.2f} s")

    # -- what a sibling (Redis Cluster) replaces ------------------------------------------

    def _open(self, url: str) -> int | None:
        """Parse ``url``, build the client (no I/O yet); returns ``ttl_s``."""
        client_url, ttl_s = _split_url(url, self.url)
        try:
            pool = redis.ConnectionPool.from_url(
                client_url, socket_timeout=self.timeout_s,
                socket_connect_timeout=self.timeout_s, retry=Retry(NoBackoff(), 0),
                health_check_interval=0)
        except ValueError as exc:
            raise ConfigError(f"remote_url={self.url!r} is not allowed: "
                              f"{self._scrub(str(exc))}") from None
        self._client = redis.Redis(connection_pool=pool)
        return ttl_s

    def _groups(self, names: list[str]) -> list[Group]:
        """Split a batch into one pipeline per server: here, one."""
        return [(self._client, list(range(len(names))))]

    def _reply_error(self, reply: Exception) -> int:
        """The outcome of a key whose reply is an error. OOM under maxmemory with noeviction
        is "full", anything else a failure (the client maps the server's OOM error code to its
        own exception class)."""
        return FULL if isinstance(reply, redis.exceptions.OutOfMemoryError) else FAILED

    def _probe(self) -> bool:
        return self._client.ping() is True

    def _close(self) -> None:
        self._shutdown_pool()
        self._client.close()
        self._client.connection_pool.disconnect()

    def _abandon(self) -> None:
        self._runner.close()
        self._client.connection_pool.disconnect()

    # -- hooks (shared) -------------------------------------------------------------------

    def _store(self, names: list[str], views: list[memoryview]) -> list[int]:
        ttl = self._ttl_s
        replies = self._pipelined(
            names, lambda pipe, idx: pipe.set(names[idx], views[idx], nx=True, ex=ttl))
        # True: written now; None: already held (first write wins)
        return [self._outcome(reply, 0) for reply in replies]

    def _fetch(self, names: list[str], views: list[memoryview]) -> list:
        replies = self._pipelined(names, lambda pipe, idx: pipe.get(names[idx]))
        return [self._reply_error(reply) if isinstance(reply, Exception) else reply
                for reply in replies]

    def _exists(self, names: list[str]) -> list[int]:
        replies = self._pipelined(names, lambda pipe, idx: pipe.exists(names[idx]))
        return [self._outcome(reply, None) for reply in replies]

    def _remove(self, names: list[str]) -> None:
        self._pipelined(names, lambda pipe, idx: pipe.delete(names[idx]))

    # -- plumbing -------------------------------------------------------------------------

    def _pipelined(self, names: list[str],
                   queue: Callable[[Any, int], object]) -> list[Any]:
        """One non-transactional pipeline per group. Per key: the reply (an exception for a
        failed key), or DOWN/TIMEOUT (an int) for every key of a group whose server was
        lost; the other groups keep their own replies."""
        out: list[Any] = [FAILED] * len(names)

        def run(group: Group) -> None:
            client, positions = group
            pipe = client.pipeline(transaction=False)
            for idx in positions:
                queue(pipe, idx)
            try:
                replies = pipe.execute(raise_on_error=False)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                replies = [self._lost(exc, client)] * len(positions)
            for idx, reply in zip(positions, replies):
                out[idx] = reply

        groups = self._groups(names)
        if len(groups) == 1:
            run(groups[0])
        else:
            # Each group's sockets have their own timeout, so every helper returns in bounded
            # time; an exception other than a lost server propagates as before.
            for done in [self._group_pool(len(groups)).submit(run, g) for g in groups]:
                done.result()
        return out

    def _group_pool(self, size: int) -> ThreadPoolExecutor:
        """Helpers for the groups of one batch (grown to the number of masters)."""
        with self._pool_lock:
            if self._pool is None or self._pool_size < size:
                if self._pool is not None:
                    self._pool.shutdown(wait=False)
                self._pool = ThreadPoolExecutor(size, thread_name_prefix=f"kvtier-{self.scheme}")
                self._pool_size = size
            return self._pool

    def _shutdown_pool(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
                self._pool = None

    def _outcome(self, reply: Any, success: int | None) -> int:
        """A reply as a result code: ``success`` (None: the reply itself, an int) for a
        reply, the lost code for a lost server, FULL/FAILED for an error reply."""
        if isinstance(reply, Exception):
            return self._reply_error(reply)
        if reply.__class__ is int and reply < 0:
            return reply  # DOWN / TIMEOUT from _pipelined
        return int(reply) if success is None else success

    def _lost(self, exc: Exception, client: redis.Redis) -> int:
        where = self._where(client)
        if isinstance(exc, redis.TimeoutError):
            logger.warning("redis store %s did not answer within %.2f s", where,
                           self.timeout_s)
            return TIMEOUT
        logger.warning("redis store %s lost: %s", where, self._scrub(_describe(exc)))
        return DOWN

    def _where(self, client: redis.Redis) -> str:
        """The store (or node) a client talks to, for a log line."""
        return self.url

    def _scrub(self, text: str) -> str:
        """Client messages never carry the password, but be sure before logging them."""
        return text.replace(self._password, "***") if self._password else text


def parse_params(query: str, shown: str) -> int | None:
    """kvtier's own query parameters of a Redis URL (the only ones allowed): ``ttl_s``."""
    ours, unknown = {}, set()
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in _OUR_PARAMS:
            ours[name] = value
        else:
            unknown.add(name)
    if unknown:
        raise ConfigError(f"remote_url={shown!r} has unknown parameter(s) "
                          f"{', '.join(sorted(unknown))}: redis URLs accept "
                          f"{', '.join(sorted(_OUR_PARAMS))}")
    ttl_s = None
    if "ttl_s" in ours:
        try:
            ttl_s = int(ours["ttl_s"])
        except ValueError:
            ttl_s = 0
        if ttl_s <= 0:
            raise ConfigError(f"remote_url={shown!r}: ttl_s={ours['ttl_s']!r} is not a "
                              "positive whole number of seconds")
    return ttl_s


def _split_url(url: str, shown: str) -> tuple[str, int | None]:
    """(URL for redis-py without kvtier's own query params, ttl_s)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parses the port, raising for a bad one
    except ValueError as exc:
        raise ConfigError(f"remote_url={shown!r} is not allowed: {exc}") from None
    ttl_s = parse_params(parts.query, shown)
    if parts.path not in ("", "/"):
        db = parts.path.lstrip("/")
        if not db.isdigit():
            raise ConfigError(f"remote_url={shown!r}: database {db!r} is not a number")
    client_url = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    return client_url, ttl_s
