"""The G4 remote tier's contract: one backend per store, one constructor signature, a registry.

A backend moves stored blocks (64-byte ``block_format`` header + payload) between caller-owned
buffers (normally G2 arena slots) and a shared store, in batches: one store round trip per call
where the store allows. Every block read back is verified against its key and the KV geometry
fingerprint before the call reports it as a hit; a missing, short, corrupt or late block is a
``False`` entry, never data.

Keys. ``make_namespace(model_id, fingerprint, rank)`` names the model, the KV geometry
fingerprint and the rank; ``remote_key(namespace, key)`` appends the block hash. Instances of
the same model and layout share blocks; different models, layouts or ranks never collide. The
backend reads the fingerprint back out of its namespace (``parse_namespace``) for verification,
so every backend keeps the same constructor: ``Backend(url, *, namespace, timeout_s)``.

Faults. A store call runs on one of the backend's daemon threads and the caller waits at most
``timeout_s`` for it. A call that times out is abandoned: it reports ``False`` for every key,
counts in ``stats["timeouts"]`` and marks the backend unhealthy; later calls fail fast until the
abandoned call has returned and ``probe()`` (or ``RetryingBackend.maybe_reconnect()``) finds the
store again. Store-side failures never raise; only a broken caller contract does
(``TransferError``). Unreachable at construction raises ``StorageError`` naming the redacted URL.

Zero-copy caveat. Backends that read straight into the caller's buffers (Mooncake) may still be
writing into the buffers of an abandoned call after it returned ``False``. ``drained`` is False
while such a call is in flight; a caller that recycles buffers after a timeout waits for
``drained`` (or ``wait_drained``) first. Backends that copy on the calling thread (Redis) never
write late.

Thread safety: ``batch_*`` may be called from several threads at once.
"""

from __future__ import annotations

import abc
import importlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote, unquote

from kvtier.config import redact_url
from kvtier.errors import BlockFormatError, ConfigError, StorageError, TransferError
from kvtier.storage import block_format, faults
from kvtier.storage.block_format import HEADER_BYTES
from kvtier.tiers import BlockKey

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

logger = logging.getLogger(__name__)

NAMESPACE_PREFIX = "kvtier"
NAMESPACE_VERSION = "1"
_U64 = 0xFFFF_FFFF_FFFF_FFFF

# Counters every backend keeps. Block counts unless noted.
STAT_NAMES = (
    "puts",               # blocks the store holds after batch_put (written now or already there)
    "put_failures",       # blocks batch_put could not store (full store, error, timeout)
    "gets",               # blocks asked for by batch_get_into
    "hits",               # blocks read and verified
    "misses",             # blocks not served: missing, corrupt, error or timeout
    "checksum_failures",  # blocks whose stored bytes failed verification (also misses)
    "errors",             # store calls that failed on the store side (calls, not blocks)
    "timeouts",           # store calls abandoned after timeout_s (calls, not blocks)
    "bytes_put",          # bytes of blocks stored
    "bytes_got",          # bytes of blocks served
)

# Per-key outcomes that backend hooks report (sizes >= 0 are successes).
MISSING = -1   # the store does not hold the key
CORRUPT = -2   # the stored value cannot be this block (wrong size)
FULL = -3      # the store declined the put (no room); not a health problem
FAILED = -4    # the store failed this key (transfer error, server error)
DOWN = -5      # the store is unreachable; the backend turns unhealthy
TIMEOUT = -6   # the client's own timeout fired (e.g. a socket timeout); unhealthy too


# ---------------------------------------------------------------------------------------------
# Namespaces and keys


@dataclass(frozen=True, slots=True)
class Namespace:
    model_id: str
    fingerprint: int
    rank: int


def make_namespace(model_id: str, fingerprint: int, rank: int = 0) -> str:
    """The key prefix for one model, KV geometry and rank: ``kvtier/1/<model>/<fp hex>/<rank>``.

    The model id is percent-encoded so any id (``org/name``, spaces) maps to one path segment.
    """
    if not model_id:
        raise ConfigError("model_id is required to build a remote namespace")
    if not 0 <= fingerprint <= _U64:
        raise ConfigError(f"geometry fingerprint {fingerprint} is not an unsigned 64-bit int")
    if rank < 0:
        raise ConfigError(f"rank={rank} is not allowed: must be >= 0")
    return (f"{NAMESPACE_PREFIX}/{NAMESPACE_VERSION}/{quote(model_id, safe='')}/"
            f"{fingerprint:016x}/{rank}")


def parse_namespace(namespace: str) -> Namespace:
    """Inverse of ``make_namespace``; ``ConfigError`` for anything it did not produce."""
    parts = namespace.split("/")
    try:
        if len(parts) != 5 or parts[0] != NAMESPACE_PREFIX or parts[1] != NAMESPACE_VERSION:
            raise ValueError
        if len(parts[3]) != 16 or not parts[2]:
            raise ValueError
        return Namespace(unquote(parts[2]), int(parts[3], 16), int(parts[4]))
    except ValueError:
        raise ConfigError(f"namespace={namespace!r} is not allowed: build it with "
                          "make_namespace(model_id, fingerprint, rank)") from None


def remote_key(namespace: str, key: BlockKey) -> str:
    """The store key of block ``key``: the namespace, then the block hash in hex."""
    if isinstance(key, int):
        return f"{namespace}/{key & _U64:016x}"
    return f"{namespace}/{bytes(key).hex()}"


# ---------------------------------------------------------------------------------------------
# Running store calls with a deadline


class _Call:
    __slots__ = ("abandoned", "args", "done", "error", "fn", "result")

    def __init__(self, fn: Callable[..., Any], args: tuple) -> None:
        self.fn = fn
        self.args = args
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.abandoned = False


class _Timeout:
    """Marker: the call did not finish within the deadline."""


class _Unavailable:
    """Marker: an earlier abandoned call still occupies the store client."""


TIMED_OUT = _Timeout()
UNAVAILABLE = _Unavailable()


class DeadlineRunner:
    """Runs blocking store calls on daemon threads; the caller waits at most ``timeout_s``.

    Daemon threads, not a ``ThreadPoolExecutor``: an executor's threads are joined at
    interpreter exit, so one call stuck in a C client would hang the process on shutdown.
    """

    def __init__(self, name: str, num_threads: int = 4) -> None:
        self._name = name
        self._num_threads = num_threads
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._abandoned = 0
        self._idle = threading.Condition(self._lock)
        self._closed = False

    @property
    def num_abandoned(self) -> int:
        """Calls given up on that are still running."""
        return self._abandoned

    def run(self, timeout_s: float, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``'s result, or TIMED_OUT / UNAVAILABLE; re-raises what ``fn`` raised."""
        with self._lock:
            if self._abandoned or self._closed:
                return UNAVAILABLE
            if len(self._threads) < self._num_threads:
                self._start_thread()
        call = _Call(fn, args)
        self._queue.put(call)
        if not call.done.wait(timeout_s):
            with self._lock:
                if not call.done.is_set():
                    call.abandoned = True
                    self._abandoned += 1
                    return TIMED_OUT
        if call.error is not None:
            raise call.error
        return call.result

    def wait_drained(self, timeout_s: float) -> bool:
        """Wait until no abandoned call is running; True when none is."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._abandoned:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for _ in self._threads:
                self._queue.put(None)

    def _start_thread(self) -> None:
        thread = threading.Thread(target=self._work, name=f"{self._name}-{len(self._threads)}",
                                  daemon=True)
        thread.start()
        self._threads.append(thread)

    def _work(self) -> None:
        while True:
            call = self._queue.get()
            if call is None:
                return
            try:
                call.result = call.fn(*call.args)
            except Exception as exc:  # noqa: BLE001 - re-raised in the waiting caller
                call.error = exc
            finally:
                with self._lock:
                    call.done.set()
                    if call.abandoned:
                        self._abandoned -= 1
                        self._idle.notify_all()


# ---------------------------------------------------------------------------------------------
# The backend contract


class RemoteBackend(abc.ABC):
    """One remote store. Subclasses implement the ``_store``/``_fetch``/... hooks only."""

    scheme: ClassVar[str]

    def __init__(self, url: str, *, namespace: str, timeout_s: float) -> None:
        if not timeout_s > 0:
            raise ConfigError(f"timeout_s={timeout_s} is not allowed: must be > 0")
        self.url = redact_url(url)  # safe to log; the raw URL is never stored on self
        self.namespace = namespace
        self.fingerprint = parse_namespace(namespace).fingerprint
        self.timeout_s = float(timeout_s)
        self.stats: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)
        self._stats_lock = threading.Lock()
        self._healthy = True
        self._runner = DeadlineRunner(f"kvtier-{self.scheme}")
        self._closed = False

    # -- public API -----------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False after a timeout or a lost store, until ``probe()`` succeeds again."""
        return self._healthy and not self._closed

    @property
    def drained(self) -> bool:
        """True when no abandoned (timed-out) store call can still touch caller buffers."""
        return self._runner.num_abandoned == 0

    def wait_drained(self, timeout_s: float) -> bool:
        return self._runner.wait_drained(timeout_s)

    def batch_put(self, keys: Sequence[BlockKey], blocks: Sequence[memoryview]) -> list[bool]:
        """Store each block (header + payload) under its key unless the store holds it already.

        True means the store holds the key afterwards (written now or earlier: first write
        wins). Blocks must carry the ``block_format`` header for their key and this backend's
        fingerprint (``TransferError`` otherwise).
        """
        views = self._check_blocks(keys, blocks)
        num = len(views)
        if num == 0:
            return []
        names = [remote_key(self.namespace, key) for key in keys]
        store = self._store
        if faults.active:  # FAULT HOOK: tests only, see storage/faults.py
            store = faults.remote_call("remote.put", store, self.timeout_s, failed=FAILED)
        codes = self._run_batch(store, num, names, views)
        ok = [code >= 0 for code in codes]
        stored_bytes = sum(view.nbytes for view, good in zip(views, ok) if good)
        num_ok = sum(ok)
        self._count(puts=num_ok, put_failures=num - num_ok, bytes_put=stored_bytes)
        return ok

    def batch_get_into(self, keys: Sequence[BlockKey],
                       buffers: Sequence[memoryview]) -> list[bool]:
        """Read each block into its buffer (exactly the block's size) and verify it.

        True only for a block whose header and checksum match its key and this backend's
        fingerprint. On False the buffer's content is undefined (and, after a timeout of a
        zero-copy backend, may still change until ``drained``).
        """
        views = self._check_buffers(keys, buffers)
        num = len(views)
        if num == 0:
            return []
        names = [remote_key(self.namespace, key) for key in keys]
        fetch = self._fetch
        if faults.active:  # FAULT HOOK: tests only, see storage/faults.py
            fetch = faults.remote_call("remote.get", fetch, self.timeout_s, failed=FAILED)
        fetched = self._run_batch(fetch, num, names, views)
        ok = [False] * num
        corrupt: list[str] = []
        got_bytes = 0
        for idx, entry in enumerate(fetched):
            view = views[idx]
            if entry.__class__ is int:
                size = entry  # zero-copy: the bytes are already in the buffer
            elif entry is None:
                size = MISSING
            elif len(entry) != view.nbytes:
                size = CORRUPT
            else:
                view[:] = entry  # copied on this thread, so a timed-out call never writes late
                size = view.nbytes
            if size < 0:
                if size == CORRUPT:
                    corrupt.append(names[idx])
                continue
            if size != view.nbytes:
                corrupt.append(names[idx])
                continue
            try:
                block_format.verify(view[:HEADER_BYTES], view[HEADER_BYTES:], keys[idx],
                                    self.fingerprint)
            except BlockFormatError as exc:
                logger.warning("remote block %s from %s failed verification: %s", names[idx],
                               self.url, exc)
                corrupt.append(names[idx])
                continue
            ok[idx] = True
            got_bytes += size
        num_ok = sum(ok)
        self._count(gets=num, hits=num_ok, misses=num - num_ok,
                    checksum_failures=len(corrupt), bytes_got=got_bytes)
        if corrupt:
            # The store keeps the first write, so a bad value would shadow every later put of
            # the same block: drop it so the next offload heals the key.
            self._discard(corrupt)
        return ok

    def batch_exists(self, keys: Sequence[BlockKey]) -> list[bool]:
        """Whether the store holds each key now (it may still evict it before a get)."""
        num = len(keys)
        if num == 0:
            return []
        names = [remote_key(self.namespace, key) for key in keys]
        codes = self._run_batch(self._exists, num, names)
        return [code > 0 for code in codes]

    def probe(self) -> bool:
        """Ask the store whether it answers; updates and returns ``healthy``."""
        if self._closed:
            return False
        try:
            result = self._runner.run(self.timeout_s, self._probe)
        except Exception as exc:  # noqa: BLE001 - any client failure means "not healthy"
            logger.debug("probe of %s failed: %s", self.url, type(exc).__name__)
            result = False
        self._healthy = result is True
        return self._healthy

    def register_memory(self, buffer: memoryview) -> None:
        """Register a long-lived region (the G2 arena) for zero-copy transfers where the
        store needs it (RDMA). A no-op for stores that need no registration."""

    def close(self) -> None:
        """Release the client. Safe to call twice; skips native teardown while an abandoned
        call is still running (that call may still use the client)."""
        if self._closed:
            return
        self._closed = True
        self._runner.close()
        if self.drained:
            try:
                self._close()
            except Exception as exc:  # noqa: BLE001 - teardown of a possibly dead client
                logger.debug("closing %s: %s", self.url, type(exc).__name__)

    def snapshot_stats(self) -> dict[str, int]:
        with self._stats_lock:
            return dict(self.stats)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, namespace={self.namespace!r})"

    # -- hooks ----------------------------------------------------------------------------

    @abc.abstractmethod
    def _store(self, names: list[str], views: list[memoryview]) -> list[int]:
        """Put each view unless present; per key 0 (stored/present), FULL, FAILED or DOWN."""

    @abc.abstractmethod
    def _fetch(self, names: list[str], views: list[memoryview]) -> list[Any]:
        """Runs on a worker thread. Per key: an int (bytes read straight into the view, or a
        negative outcome), ``None`` (missing) or a bytes-like value that the calling thread
        copies into the view."""

    @abc.abstractmethod
    def _exists(self, names: list[str]) -> list[int]:
        """Per key 1 (held), 0 (not held) or a negative outcome."""

    @abc.abstractmethod
    def _remove(self, names: list[str]) -> None:
        """Best-effort removal of corrupt values."""

    @abc.abstractmethod
    def _probe(self) -> bool:
        """True when the store answers a trivial request."""

    @abc.abstractmethod
    def _close(self) -> None:
        """Tear the client down."""

    # -- plumbing -------------------------------------------------------------------------

    def _run_batch(self, fn: Callable[..., Any], num: int, *args: Any) -> Any:
        """Run one store call for ``num`` keys; a list of ``num`` negative outcomes if it
        failed as a whole. Store-side exceptions become DOWN, never propagate."""
        if not self.healthy:
            self._count(errors=1)
            return [DOWN] * num
        try:
            result = self._runner.run(self.timeout_s, fn, *args)
        except Exception as exc:  # noqa: BLE001 - store-side failures never reach the caller
            logger.warning("remote store %s failed: %s", self.url, _describe(exc))
            self._healthy = False
            self._count(errors=1)
            return [DOWN] * num
        if result is TIMED_OUT:
            logger.warning("remote store %s did not answer within %.2f s", self.url,
                           self.timeout_s)
            self._healthy = False
            self._count(timeouts=1)
            return [DOWN] * num
        if result is UNAVAILABLE:
            self._healthy = False
            self._count(errors=1)
            return [DOWN] * num
        if isinstance(result, list):
            if len(result) != num:
                logger.warning("remote store %s answered %d results for %d keys", self.url,
                               len(result), num)
                self._count(errors=1)
                return [FAILED] * num
            if TIMEOUT in result:
                self._healthy = False
                self._count(timeouts=1)
            elif DOWN in result:
                self._healthy = False
                self._count(errors=1)
            elif FAILED in result:
                self._count(errors=1)
        return result

    def _discard(self, names: list[str]) -> None:
        try:
            self._runner.run(self.timeout_s, self._remove, names)
        except Exception as exc:  # noqa: BLE001 - best effort
            logger.debug("removing corrupt blocks from %s: %s", self.url, _describe(exc))

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            stats = self.stats
            for name, delta in deltas.items():
                stats[name] += delta

    def _check_blocks(self, keys: Sequence[BlockKey],
                      blocks: Sequence[memoryview]) -> list[memoryview]:
        if len(keys) != len(blocks):
            raise TransferError(f"batch_put got {len(keys)} keys and {len(blocks)} blocks")
        views = [_byte_view(block, "block") for block in blocks]
        fingerprint = self.fingerprint
        for key, view in zip(keys, views):
            if view.nbytes < HEADER_BYTES:
                raise TransferError(f"block of {view.nbytes} bytes has no {HEADER_BYTES}-byte "
                                    "header")
            stored_key, geometry, length = block_format.unpack_key(view[:HEADER_BYTES])
            if geometry != fingerprint or stored_key != block_format.key_bytes(key):
                raise TransferError("block header does not name this key and geometry "
                                    f"(fingerprint {geometry:#x}, backend {fingerprint:#x})")
            if length != view.nbytes - HEADER_BYTES:
                raise TransferError(f"block header says {length} payload bytes, view holds "
                                    f"{view.nbytes - HEADER_BYTES}")
        return views

    @staticmethod
    def _check_buffers(keys: Sequence[BlockKey],
                       buffers: Sequence[memoryview]) -> list[memoryview]:
        if len(keys) != len(buffers):
            raise TransferError(f"batch_get_into got {len(keys)} keys and {len(buffers)} "
                                "buffers")
        views = [_byte_view(buffer, "buffer") for buffer in buffers]
        for view in views:
            if view.readonly:
                raise TransferError("batch_get_into needs writable buffers")
            if view.nbytes <= HEADER_BYTES:
                raise TransferError(f"buffer of {view.nbytes} bytes cannot hold a block")
        return views


def _byte_view(buffer: Any, what: str) -> memoryview:
    view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)
    if not view.c_contiguous:
        raise TransferError(f"{what} must be C-contiguous")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _describe(exc: BaseException) -> str:
    """An exception for a log line: type and message. Client messages name host and port at
    most; backends strip credentials from URLs before they reach a client's messages."""
    return f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------------
# Registry


_BACKENDS: dict[str, type[RemoteBackend]] = {}
ENTRY_POINT_GROUP = "kvtier.remote_backends"


def register_backend(cls: type[RemoteBackend]) -> type[RemoteBackend]:
    """Class decorator: make ``cls`` the backend for URLs of scheme ``cls.scheme``."""
    scheme = getattr(cls, "scheme", "")
    if not scheme:
        raise ConfigError(f"{cls.__name__} has no scheme")
    existing = _BACKENDS.get(scheme)
    if existing is not None and existing is not cls:
        raise ConfigError(f"remote scheme {scheme!r} is already served by {existing.__name__}")
    _BACKENDS[scheme] = cls
    return cls


def backend_class(url: str) -> type[RemoteBackend]:
    """The backend for ``url``'s scheme. Looks in the registry, then imports
    ``kvtier.storage.remote.<scheme>``, then the ``kvtier.remote_backends`` entry points."""
    scheme, sep, _rest = url.partition("://")
    if not sep or not scheme:
        raise ConfigError(f"remote_url={redact_url(url)!r} is not allowed: expected "
                          "SCHEME://..., e.g. redis://HOST:PORT/DB")
    cls = _BACKENDS.get(scheme)
    if cls is None and scheme.isidentifier():
        try:
            importlib.import_module(f"{__package__}.{scheme}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{scheme}":
                raise ConfigError(f"remote scheme {scheme!r} needs the Python package "
                                  f"{exc.name!r}: pip install 'kvtier[{scheme}]'") from exc
        cls = _BACKENDS.get(scheme)
    if cls is None:
        for entry in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP):
            if entry.name == scheme:
                register_backend(entry.load())
        cls = _BACKENDS.get(scheme)
    if cls is None:
        known = ", ".join(sorted(set(_BACKENDS) | {"mooncake", "redis", "redis+cluster", "s3"}))
        raise ConfigError(f"remote_url={redact_url(url)!r} is not allowed: unknown scheme "
                          f"{scheme!r} (known: {known})")
    return cls


def make_backend(url: str, *, namespace: str, timeout_s: float) -> RemoteBackend:
    """Open the store named by ``url``. ConfigError for a bad URL or namespace, StorageError
    (with the redacted URL) when the store cannot be reached."""
    cls = backend_class(url)
    parse_namespace(namespace)
    try:
        return cls(url, namespace=namespace, timeout_s=timeout_s)
    except (ConfigError, StorageError):
        raise
    except Exception as exc:  # noqa: BLE001 - a client error the backend did not translate
        raise StorageError(f"remote store {redact_url(url)} could not be opened: "
                           f"{type(exc).__name__}") from None
