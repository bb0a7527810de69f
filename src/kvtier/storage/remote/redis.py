"""G4 on Redis: ``redis://[:password@]HOST:PORT/DB[?ttl_s=SECONDS]``.

One pipeline per batch. Puts are ``SET key block NX`` (first write wins, so a block another
instance stored is kept and the put reports success); gets are ``GET`` and are copied into the
caller's buffers on the calling thread, after the reply arrived. ``ttl_s`` sets an expiry on new
blocks; otherwise the server's ``maxmemory-policy`` (e.g. ``allkeys-lru``) decides eviction.

Every socket operation has ``socket_timeout = timeout_s`` and redis-py's own retries are off:
the caller's backoff (``RetryingBackend``) decides when to try again.
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

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


@register_backend
class RedisBackend(RemoteBackend):
    scheme = "redis"

    def __init__(self, url: str, *, namespace: str, timeout_s: float) -> None:
        super().__init__(url, namespace=namespace, timeout_s=timeout_s)
        client_url, self._ttl_s = _split_url(url, self.url)
        self._password = urlsplit(url).password
        try:
            pool = redis.ConnectionPool.from_url(
                client_url, socket_timeout=self.timeout_s,
                socket_connect_timeout=self.timeout_s, retry=Retry(NoBackoff(), 0),
                health_check_interval=0)
        except ValueError as exc:
            raise ConfigError(f"remote_url={self.url!r} is not allowed: "
                              f"{self._scrub(str(exc))}") from None
        self._client = redis.Redis(connection_pool=pool)
        try:
            answered = self._runner.run(self.timeout_s, self._client.ping)
        except redis.RedisError as exc:
            self._abandon()
            raise StorageError(f"redis store {self.url} unreachable: "
                               f"{self._scrub(_describe(exc))}") from None
        if answered is not True:
            self._abandon()
            raise StorageError(f"redis store {self.url} unreachable: no answer within "
                               f"{self.timeout_s:.2f} s")

    def _store(self, names: list[str], views: list[memoryview]) -> list[int]:
        pipe = self._client.pipeline(transaction=False)
        ttl = self._ttl_s
        for name, view in zip(names, views):
            pipe.set(name, view, nx=True, ex=ttl)
        try:
            replies = pipe.execute(raise_on_error=False)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            return self._lost(exc, len(names))
        out = []
        for reply in replies:
            if isinstance(reply, Exception):
                # OOM under maxmemory with noeviction is "full", anything else a failure. The
                # client maps the server's OOM error code to its own exception class.
                full = isinstance(reply, redis.exceptions.OutOfMemoryError)
                out.append(FULL if full else FAILED)
            else:
                out.append(0)  # True: written now; None: already held (first write wins)
        return out

    def _fetch(self, names: list[str], views: list[memoryview]) -> list:
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.get(name)
        try:
            replies = pipe.execute(raise_on_error=False)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            return self._lost(exc, len(names))
        return [FAILED if isinstance(reply, Exception) else reply for reply in replies]

    def _exists(self, names: list[str]) -> list[int]:
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.exists(name)
        try:
            replies = pipe.execute(raise_on_error=False)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            return self._lost(exc, len(names))
        return [FAILED if isinstance(reply, Exception) else int(reply) for reply in replies]

    def _lost(self, exc: Exception, num: int) -> list[int]:
        if isinstance(exc, redis.TimeoutError):
            logger.warning("redis store %s did not answer within %.2f s", self.url,
                           self.timeout_s)
            return [TIMEOUT] * num
        logger.warning("redis store %s lost: %s", self.url, self._scrub(_describe(exc)))
        return [DOWN] * num

    def _remove(self, names: list[str]) -> None:
        self._client.delete(*names)

    def _probe(self) -> bool:
        return self._client.ping() is True

    def _close(self) -> None:
        self._client.close()
        self._client.connection_pool.disconnect()

    def _abandon(self) -> None:
        self._runner.close()
        self._client.connection_pool.disconnect()

    def _scrub(self, text: str) -> str:
        """Client messages never carry the password, but be sure before logging them."""
        return text.replace(self._password, "***") if self._password else text


def _split_url(url: str, shown: str) -> tuple[str, int | None]:
    """(URL for redis-py without kvtier's own query params, ttl_s)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parses the port, raising for a bad one
    except ValueError as exc:
        raise ConfigError(f"remote_url={shown!r} is not allowed: {exc}") from None
    ours, theirs = {}, []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in _OUR_PARAMS:
            ours[name] = value
        else:
            theirs.append((name, value))
    if theirs:
        names = ", ".join(sorted({name for name, _ in theirs}))
        raise ConfigError(f"remote_url={shown!r} has unknown parameter(s) {names}: "
                          f"redis URLs accept {', '.join(sorted(_OUR_PARAMS))}")
    ttl_s = None
    if "ttl_s" in ours:
        try:
            ttl_s = int(ours["ttl_s"])
        except ValueError:
            ttl_s = 0
        if ttl_s <= 0:
            raise ConfigError(f"remote_url={shown!r}: ttl_s={ours['ttl_s']!r} is not a "
                              "positive whole number of seconds")
    if parts.path not in ("", "/"):
        db = parts.path.lstrip("/")
        if not db.isdigit():
            raise ConfigError(f"remote_url={shown!r}: database {db!r} is not a number")
    client_url = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(theirs), ""))
    return client_url, ttl_s
