"""G4 on Mooncake Store: ``mooncake://HOST:PORT?metadata=URL[&protocol=tcp][&local_host=H]
[&segment_mb=N][&buffer_mb=N][&rdma_devices=D]``.

HOST:PORT is the master's RPC address; ``metadata`` the transfer-engine metadata service (the
master's embedded HTTP server: ``http://HOST:PORT/metadata``, or etcd / ``P2PHANDSHAKE``).
``segment_mb`` is the DRAM this process lends to the store (default 0: a pure client; the
memory then comes from storage processes such as ``mooncake_client`` or other instances);
``buffer_mb`` the client's local transfer buffer (default 16); ``local_host`` the address peers
reach this process on (default: the local address that routes to the master).

Data path: ``batch_put_from`` / ``batch_get_into`` straight from and into the caller's buffers
(zero-copy; no registration needed over TCP; ``register_memory`` registers the G2 arena for
RDMA). Mooncake behaviours handled here (reference/PEERS.md §4):
- put of a held key returns 0 and keeps the first value: reported as stored;
- a missing key is -704 (OBJECT_NOT_FOUND): a miss; -707 (lease expired mid-read) too;
- every read takes a lease (10 s), so removing a corrupt value uses ``force=True``;
- the master may evict at any time: ``batch_exists`` is a hint, a later get may miss;
- ``health_check()`` reports 0 even with the master stopped, so ``probe`` asks ``is_exist``;
- the store holds only memory that clients lend it (``mooncake_client`` storage processes, or
  instances with ``segment_mb`` > 0). With none, every put fails with NO_AVAILABLE_HANDLE
  ("insufficient space" in Mooncake's log): reported FULL (a dropped offload, not an outage)
  and, while no put of this client has succeeded yet, warned about once per store and
  process, naming the fix.

The client's ``setup`` holds the GIL and retries forever when the master does not answer, so
construction first checks that the master's RPC port accepts connections and that the metadata
service answers HTTP within ``timeout_s`` (``StorageError`` otherwise). A master that stops in the
few milliseconds between that check and ``setup`` can still block construction.
"""

from __future__ import annotations

import logging
import socket
import threading
import urllib.error
import urllib.request
from urllib.parse import parse_qsl, urlsplit

import numpy as np
from mooncake.store import MooncakeDistributedStore

from kvtier.config import redact_url
from kvtier.errors import ConfigError, StorageError
from kvtier.storage.remote.base import (
    CORRUPT,
    DOWN,
    FAILED,
    FULL,
    MISSING,
    RemoteBackend,
    _byte_view,
    register_backend,
)

logger = logging.getLogger(__name__)

# mooncake-store ErrorCode values (mooncake-store/include/types.h).
NO_AVAILABLE_HANDLE = -200
INVALID_PARAMS = -600
OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
LEASE_EXPIRED = -707
TRANSFER_FAIL = -800
RPC_FAIL = -900

_PARAMS = ("metadata", "protocol", "local_host", "segment_mb", "buffer_mb", "rdma_devices")
_PROBE_KEY = "kvtier/probe"

# Stores (redacted URLs) this process has warned about having no memory to store into.
_WARNED_NO_CAPACITY: set[str] = set()
_WARNED_LOCK = threading.Lock()


@register_backend
class MooncakeBackend(RemoteBackend):
    scheme = "mooncake"

    def __init__(self, url: str, *, namespace: str, timeout_s: float) -> None:
        super().__init__(url, namespace=namespace, timeout_s=timeout_s)
        opts = _parse_url(url, self.url)
        host, port = opts["host"], opts["port"]
        _check_reachable(host, port, opts["metadata"], self.timeout_s, self.url)
        local_host = opts["local_host"] or _local_address_towards(host, port)
        self._store_client = MooncakeDistributedStore()
        self._registered: list[int] = []
        self._segment_mb = opts["segment_mb"]
        self._master_address = f"{host}:{port}"
        self._metadata = opts["metadata"]
        self._stored_any = False  # a put of this client has succeeded (the store has memory)
        self._warned_no_capacity = False
        rc = self._store_client.setup(local_host, opts["metadata"], opts["segment_mb"] << 20,
                                      opts["buffer_mb"] << 20, opts["protocol"],
                                      opts["rdma_devices"], f"{host}:{port}")
        if rc != 0:
            self._runner.close()
            raise StorageError(f"mooncake store {self.url}: client setup failed (code {rc})")

    def register_memory(self, buffer: memoryview) -> None:
        view = _byte_view(buffer, "registered memory")
        ptr = _address(view)
        rc = self._store_client.register_buffer(ptr, view.nbytes)
        if rc != 0:
            raise StorageError(f"mooncake store {self.url}: register_buffer failed (code {rc})")
        self._registered.append(ptr)

    def _store(self, names: list[str], views: list[memoryview]) -> list[int]:
        codes = self._store_client.batch_put_from(names, [_address(v) for v in views],
                                                  [v.nbytes for v in views])
        outcomes = [_put_outcome(code) for code in codes]
        if not self._stored_any:
            self._note_capacity(codes, outcomes)
        return outcomes

    def _note_capacity(self, codes: list[int], outcomes: list[int]) -> None:
        """Until a put succeeds: a batch refused whole for lack of room means, most likely,
        that nobody lends the store memory. Say so once, with the fix."""
        if 0 in outcomes:
            self._stored_any = True
            if self._warned_no_capacity:
                logger.info("mooncake store %s accepts puts now; G4 in use", self.url)
            return
        if not codes or any(code != NO_AVAILABLE_HANDLE for code in codes):
            return
        with _WARNED_LOCK:
            if self.url in _WARNED_NO_CAPACITY:
                return
            _WARNED_NO_CAPACITY.add(self.url)
        self._warned_no_capacity = True
        lent = (f"this client's segment_mb={self._segment_mb} is too little" if self._segment_mb
                else "this client lends none (segment_mb=0)")
        logger.warning(
            "mooncake store %s has no memory to store blocks into: every put fails with "
            "NO_AVAILABLE_HANDLE and %s. The store holds only memory its clients lend it: run "
            "a storage process (mooncake_client --master_server_address=%s --metadata_server=%s"
            " --global_segment_size=4GB) or add segment_mb=N to remote_url (this engine then "
            "lends N MB). Until then G4 stays empty and its puts count in "
            "kvtier_dropped_offloads{tier=\"G4\"}", self.url, lent, self._master_address,
            redact_url(self._metadata))

    def _fetch(self, names: list[str], views: list[memoryview]) -> list[int]:
        sizes = self._store_client.batch_get_into(names, [_address(v) for v in views],
                                                  [v.nbytes for v in views])
        return [size if size >= 0 else _get_outcome(size) for size in sizes]

    def _exists(self, names: list[str]) -> list[int]:
        codes = self._store_client.batch_is_exist(names)
        return [code if code >= 0 else (DOWN if code == RPC_FAIL else FAILED) for code in codes]

    def _remove(self, names: list[str]) -> None:
        self._store_client.batch_remove(names, True)

    def _probe(self) -> bool:
        return self._store_client.is_exist(_PROBE_KEY) in (0, 1)

    def _close(self) -> None:
        for ptr in self._registered:
            self._store_client.unregister_buffer(ptr)
        self._registered.clear()
        self._store_client.close()


def _address(view: memoryview) -> int:
    return np.frombuffer(view, dtype=np.uint8).ctypes.data


def _put_outcome(code: int) -> int:
    if code == 0 or code == OBJECT_ALREADY_EXISTS:
        return 0
    if code == NO_AVAILABLE_HANDLE:
        return FULL
    if code == RPC_FAIL:
        return DOWN
    return FAILED


def _get_outcome(code: int) -> int:
    if code in (OBJECT_NOT_FOUND, LEASE_EXPIRED):
        return MISSING
    if code == INVALID_PARAMS:
        return CORRUPT  # the stored value is larger than a block of this geometry
    if code == RPC_FAIL:
        return DOWN
    return FAILED


def _parse_url(url: str, shown: str) -> dict:
    parts = urlsplit(url)
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise ConfigError(f"remote_url={shown!r} is not allowed: use mooncake://HOST:PORT?"
                          "metadata=http://HOST:PORT/metadata (HOST:PORT = master RPC address)")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(query) - set(_PARAMS))
    if unknown:
        raise ConfigError(f"remote_url={shown!r} has unknown parameter(s) {', '.join(unknown)}:"
                          f" mooncake URLs accept {', '.join(_PARAMS)}")
    if not query.get("metadata"):
        raise ConfigError(f"remote_url={shown!r} needs metadata=URL (e.g. the master's "
                          "http://HOST:PORT/metadata)")
    opts = {"host": host, "port": port, "metadata": query["metadata"],
            "protocol": query.get("protocol", "tcp"), "local_host": query.get("local_host", ""),
            "rdma_devices": query.get("rdma_devices", "")}
    if opts["protocol"] not in ("tcp", "rdma"):
        raise ConfigError(f"remote_url={shown!r}: protocol={opts['protocol']!r} is not allowed:"
                          " use tcp or rdma")
    for name, default in (("segment_mb", 0), ("buffer_mb", 16)):
        raw = query.get(name, str(default))
        if not raw.isdigit():
            raise ConfigError(f"remote_url={shown!r}: {name}={raw!r} is not a whole number")
        opts[name] = int(raw)
    return opts


def _check_reachable(host: str, port: int, metadata: str, timeout_s: float, shown: str) -> None:
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        raise StorageError(f"mooncake master {shown} unreachable: {type(exc).__name__}: "
                           f"{exc.strerror or exc}") from None
    if not metadata.startswith(("http://", "https://")):
        return
    probe = metadata + ("&" if "?" in metadata else "?") + "key=kvtier%2Fliveness"
    try:
        urllib.request.urlopen(probe, timeout=timeout_s).close()
    except urllib.error.HTTPError:
        pass  # any HTTP answer (404 for an unknown key) proves the service is alive
    except (OSError, ValueError) as exc:
        raise StorageError(f"mooncake metadata service of {shown} does not answer within "
                           f"{timeout_s:.2f} s: {type(exc).__name__}") from None


def _local_address_towards(host: str, port: int) -> str:
    """The local address the kernel would use to reach the master (what peers can reach)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((host, port))
            return sock.getsockname()[0]
        except OSError:
            return "127.0.0.1"
