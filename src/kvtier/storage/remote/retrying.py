"""A remote tier that outlives its store: start without it, reconnect with exponential backoff.

``RetryingBackend`` has the same ``batch_*`` methods as a ``RemoteBackend``. While the store is
unreachable (at start-up or after losing it) every call answers ``False`` at once and counts in
``stats["unavailable"]``, so the engine carries on with its local tiers. The caller calls
``maybe_reconnect()`` now and then (e.g. once per transfer cycle); it costs a clock read until the
backoff delay has passed, then one probe of the current client (Redis reconnects its pool by
itself, a Mooncake client survives a master restart), or a fresh client when there is none yet or
the current one is still stuck in a call it gave up on. No thread.

Logged once per outage at WARNING (store lost / unreachable) and once at INFO (back); attempts in
between log at DEBUG. URLs in logs are redacted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from kvtier.config import redact_url
from kvtier.errors import ConfigError, StorageError
from kvtier.storage.remote.base import STAT_NAMES, RemoteBackend, backend_class, parse_namespace
from kvtier.tiers import BlockKey

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

logger = logging.getLogger(__name__)

RETRY_STAT_NAMES = ("unavailable", "reconnects", "connect_failures")


class RetryingBackend:
    def __init__(self, url: str, *, namespace: str, timeout_s: float,
                 initial_backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        # Configuration mistakes surface now; only reachability is retried.
        self._cls = backend_class(url)
        parse_namespace(namespace)
        if not timeout_s > 0:
            raise ConfigError(f"timeout_s={timeout_s} is not allowed: must be > 0")
        if not 0 < initial_backoff_s <= max_backoff_s:
            raise ConfigError("backoff must satisfy 0 < initial_backoff_s <= max_backoff_s")
        self._url = url
        self.url = redact_url(url)
        self.namespace = namespace
        self.timeout_s = timeout_s
        self._initial_backoff_s = initial_backoff_s
        self._max_backoff_s = max_backoff_s
        self._clock = clock
        self._lock = threading.Lock()
        self._backend: RemoteBackend | None = None
        self._retired: list[RemoteBackend] = []  # set aside; closed with the tier
        self._retired_stats = dict.fromkeys(STAT_NAMES, 0)
        self._own_stats = dict.fromkeys(RETRY_STAT_NAMES, 0)
        self._delay_s = initial_backoff_s
        self._next_attempt = clock()
        self._outage_logged = False
        self._closed = False
        self.maybe_reconnect()

    # -- state ----------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        backend = self._backend
        return backend is not None and backend.healthy

    @property
    def backend(self) -> RemoteBackend | None:
        """The live client, if any (for ``register_memory`` and ``drained``)."""
        return self._backend

    @property
    def drained(self) -> bool:
        """True when no timed-out call of any client, old or current, can still write into
        caller buffers (see ``RemoteBackend.drained``)."""
        backends = [*self._retired, *([self._backend] if self._backend else [])]
        return all(backend.drained for backend in backends)

    @property
    def stats(self) -> dict[str, int]:
        """Counters summed over every client this tier has used, plus its own."""
        out = dict(self._retired_stats)
        backend = self._backend
        if backend is not None:
            for name, value in backend.snapshot_stats().items():
                out[name] += value
        out.update(self._own_stats)
        return out

    # -- reconnecting ---------------------------------------------------------------------

    def maybe_reconnect(self) -> bool:
        """Healthy now? If not and the backoff delay has passed, try once to get back."""
        if self.healthy:
            return True
        with self._lock:
            if self._closed or self.healthy:
                return self.healthy
            now = self._clock()
            if now < self._next_attempt:
                return False
            backend = self._backend
            if backend is not None and backend.drained:
                # Both clients heal by themselves (Redis reconnects its pool, a Mooncake client
                # survives a master restart): probe the same client rather than build another.
                if backend.probe():
                    self._back_online("store answers again")
                    return True
                self._schedule_retry(now, StorageError("no answer to a probe"))
                return False
            if backend is not None:
                # A call it gave up on still runs (a stalled store): carry on with a new client.
                self._retire(backend)
            try:
                self._backend = self._cls(self._url, namespace=self.namespace,
                                          timeout_s=self.timeout_s)
            except StorageError as exc:
                self._own_stats["connect_failures"] += 1
                self._schedule_retry(now, exc)
                return False
            self._back_online("connected")
            return True

    def _back_online(self, how: str) -> None:
        self._delay_s = self._initial_backoff_s
        if self._outage_logged:
            self._own_stats["reconnects"] += 1
            logger.info("remote tier %s: %s; G4 in use again", self.url, how)
        self._outage_logged = False

    def _schedule_retry(self, now: float, exc: Exception) -> None:
        self._next_attempt = now + self._delay_s
        if not self._outage_logged:
            logger.warning("remote tier %s unavailable (%s); running on local tiers, retrying "
                           "with backoff up to %.0f s", self.url, exc, self._max_backoff_s)
            self._outage_logged = True
        else:
            logger.debug("remote tier %s still unavailable; next try in %.1f s", self.url,
                         self._delay_s)
        self._delay_s = min(self._delay_s * 2, self._max_backoff_s)

    def _retire(self, backend: RemoteBackend) -> None:
        """Set a client aside. It is closed with the tier, not now: its abandoned call may
        still use it, and a native close can hold the GIL for a while (Mooncake: ~1 s)."""
        for name, value in backend.snapshot_stats().items():
            self._retired_stats[name] += value
        self._retired.append(backend)
        self._backend = None

    # -- data path ------------------------------------------------------------------------

    def batch_put(self, keys: Sequence[BlockKey], blocks: Sequence[memoryview]) -> list[bool]:
        backend = self._live(len(keys))
        if backend is None:
            return [False] * len(keys)
        return self._note_loss(backend, backend.batch_put(keys, blocks))

    def batch_get_into(self, keys: Sequence[BlockKey],
                       buffers: Sequence[memoryview]) -> list[bool]:
        backend = self._live(len(keys))
        if backend is None:
            return [False] * len(keys)
        return self._note_loss(backend, backend.batch_get_into(keys, buffers))

    def batch_exists(self, keys: Sequence[BlockKey]) -> list[bool]:
        backend = self._live(len(keys))
        if backend is None:
            return [False] * len(keys)
        return self._note_loss(backend, backend.batch_exists(keys))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._backend is not None:
                self._retire(self._backend)
            for backend in self._retired:
                backend.close()  # skips native teardown while an abandoned call still runs

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _live(self, num: int) -> RemoteBackend | None:
        backend = self._backend
        if backend is None or not backend.healthy:
            with self._lock:
                self._own_stats["unavailable"] += num
            return None
        return backend

    def _note_loss(self, backend: RemoteBackend, result: list[bool]) -> list[bool]:
        if not backend.healthy:
            with self._lock:
                if not self._outage_logged:
                    logger.warning("remote tier %s lost; running on local tiers, retrying with "
                                   "backoff", self.url)
                    self._outage_logged = True
                if self._clock() >= self._next_attempt:
                    self._next_attempt = self._clock() + self._delay_s
        return result
