"""The G4 contract without servers: namespaces, keys, registry, verification, deadlines.

``DictBackend`` is a real (in-process) store behind the RemoteBackend hooks, so the shared logic
(verification, stats, timeouts, retry) runs exactly as it does for Redis and Mooncake.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import threading
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from kvtier.errors import ConfigError, StorageError, TransferError
from kvtier.storage import block_format, faults
from kvtier.storage.remote import (
    RemoteBackend,
    RetryingBackend,
    backend_class,
    make_backend,
    make_namespace,
    parse_namespace,
    register_backend,
    remote_key,
)
from kvtier.storage.remote.base import DOWN, FAILED, FULL
from need import need_module

FP = 0x1234_5678_9ABC_DEF0
BLOCK = 4096 + 64


class DictBackend(RemoteBackend):
    """``dict://NAME``: blocks in a module-level dict; ``gate`` can stall calls; ``up`` can
    make the store unreachable."""

    scheme = "dict"
    stores: ClassVar[dict[str, dict[str, bytes]]] = {}
    up: ClassVar[dict[str, bool]] = {}
    gate: ClassVar[dict[str, threading.Event]] = {}

    def __init__(self, url, *, namespace, timeout_s):
        super().__init__(url, namespace=namespace, timeout_s=timeout_s)
        self.name = url.partition("://")[2]
        if not self.up.get(self.name, True):
            raise StorageError(f"dict store {self.url} unreachable")
        self.data = self.stores.setdefault(self.name, {})

    def _wait_gate(self):
        gate = self.gate.get(self.name)
        if gate is not None:
            gate.wait()
        return self.up.get(self.name, True)

    def _store(self, names, views):
        if not self._wait_gate():
            return [DOWN] * len(names)
        for name, view in zip(names, views):
            self.data.setdefault(name, bytes(view))
        return [0] * len(names)

    def _fetch(self, names, views):
        if not self._wait_gate():
            return [DOWN] * len(names)
        return [self.data.get(name) for name in names]

    def _exists(self, names):
        if not self._wait_gate():
            return [DOWN] * len(names)
        return [int(name in self.data) for name in names]

    def _remove(self, names):
        for name in names:
            self.data.pop(name, None)

    def _probe(self):
        return self._wait_gate()

    def _close(self):
        pass


register_backend(DictBackend)


def _blocks(num, fingerprint=FP, seed=0):
    rng = np.random.default_rng(seed)
    keys = [int(k) for k in rng.integers(1, 2**63, size=num)]
    rows = rng.integers(0, 256, size=(num, BLOCK), dtype=np.uint8)
    for idx, key in enumerate(keys):
        rows[idx, :64] = np.frombuffer(block_format.pack_header(key, fingerprint, rows[idx, 64:]),
                                       dtype=np.uint8)
    return keys, rows


@pytest.fixture
def store_name(request):
    name = request.node.name
    DictBackend.stores.pop(name, None)
    DictBackend.up[name] = True
    DictBackend.gate.pop(name, None)
    return name


def test_namespace_round_trips_any_model_id():
    for model in ("meta-llama/Llama-3.1-8B", "a b/c%2F", "x"):
        ns = make_namespace(model, FP, 3)
        parsed = parse_namespace(ns)
        assert (parsed.model_id, parsed.fingerprint, parsed.rank) == (model, FP, 3)


@pytest.mark.parametrize("bad", ["", "kvtier/1/m/123/0", "other/1/m/0000000000000001/0",
                                 "kvtier/2/m/0000000000000001/0", "kvtier/1/m/zz/0"])
def test_bad_namespaces_are_config_errors(bad):
    with pytest.raises(ConfigError):
        parse_namespace(bad)


def test_keys_differ_by_model_geometry_rank_and_hash():
    names = {remote_key(make_namespace(m, fp, r), k)
             for m in ("a", "b") for fp in (1, 2) for r in (0, 1) for k in (7, b"\x07")}
    assert len(names) == 16


def test_registry_finds_schemes_and_rejects_unknown():
    assert backend_class("dict://x") is DictBackend
    assert backend_class("redis://127.0.0.1:1/0").scheme == "redis"
    for url in ("s4://bucket", "no-scheme", "://x"):
        with pytest.raises(ConfigError):
            backend_class(url)
    with pytest.raises(ConfigError):
        make_backend("dict://x", namespace="not-a-namespace", timeout_s=1)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0?ttl=5", "redis://127.0.0.1:1/zero",
                                 "redis://127.0.0.1:1/0?ttl_s=-1",
                                 "mooncake://127.0.0.1:1?protocol=tcp",
                                 "mooncake://127.0.0.1:1?metadata=http://x/m&segment_mb=big"])
def test_bad_store_urls_are_config_errors_before_any_connection(url):
    need_module(url.partition(":")[0])  # fails, not skips, with REQUIRE_TEST_SERVERS=1
    with pytest.raises(ConfigError):
        make_backend(url, namespace=make_namespace("m", FP), timeout_s=1)


def test_unknown_scheme_message_hides_credentials():
    with pytest.raises(ConfigError) as info:
        backend_class("s4://user:hunter2@host/bucket")
    assert "hunter2" not in str(info.value)


def test_round_trip_and_verification(store_name):
    be = make_backend(f"dict://{store_name}", namespace=make_namespace("m", FP), timeout_s=1)
    keys, rows = _blocks(4)
    assert be.batch_put(keys, [memoryview(r) for r in rows]) == [True] * 4
    data = be.data
    bad = bytearray(data[remote_key(be.namespace, keys[1])])
    bad[100] ^= 1
    data[remote_key(be.namespace, keys[1])] = bytes(bad)
    data[remote_key(be.namespace, keys[2])] = bytes(bad[:-1])
    out = np.zeros_like(rows)
    assert be.batch_get_into(keys + [99], [memoryview(r) for r in out]
                             + [memoryview(bytearray(BLOCK))]) == [True, False, False, True,
                                                                   False]
    assert np.array_equal(out[[0, 3]], rows[[0, 3]])
    assert be.stats["checksum_failures"] == 2 and be.stats["misses"] == 3
    assert remote_key(be.namespace, keys[1]) not in data  # corrupt values are dropped


def test_caller_contract_errors(store_name):
    be = make_backend(f"dict://{store_name}", namespace=make_namespace("m", FP), timeout_s=1)
    keys, rows = _blocks(2)
    _, foreign = _blocks(1, fingerprint=FP + 1)
    with pytest.raises(TransferError):
        be.batch_put(keys, [memoryview(rows[0])])
    with pytest.raises(TransferError):
        be.batch_put(keys[:1], [memoryview(foreign[0])])
    with pytest.raises(TransferError):
        be.batch_put(keys[:1], [memoryview(rows[0])[:32]])
    with pytest.raises(TransferError):
        be.batch_get_into(keys[:1], [memoryview(bytes(BLOCK))])
    with pytest.raises(TransferError):
        be.batch_get_into(keys[:1], [memoryview(np.zeros((BLOCK, 2), np.uint8)[:, 0])])


def test_stalled_store_times_out_fails_fast_and_recovers(store_name):
    gate = DictBackend.gate[store_name] = threading.Event()
    gate.set()
    be = make_backend(f"dict://{store_name}", namespace=make_namespace("m", FP),
                      timeout_s=0.2)
    keys, rows = _blocks(2)
    assert all(be.batch_put(keys, [memoryview(r) for r in rows]))
    gate.clear()
    out = np.zeros_like(rows)
    assert be.batch_get_into(keys, [memoryview(r) for r in out]) == [False, False]
    assert not be.healthy and not be.drained and be.stats["timeouts"] == 1
    # Still stalled: later calls do not queue behind the stuck one.
    assert be.batch_exists(keys) == [False, False]
    assert be.stats["timeouts"] == 1
    gate.set()
    assert be.wait_drained(5)
    assert be.probe() and be.healthy
    assert be.batch_get_into(keys, [memoryview(r) for r in out]) == [True, True]
    be.close()


def test_retrying_backend_starts_down_backs_off_and_reconnects(store_name):
    DictBackend.up[store_name] = False
    now = [0.0]
    tier = RetryingBackend(f"dict://{store_name}", namespace=make_namespace("m", FP),
                           timeout_s=1, initial_backoff_s=1.0, max_backoff_s=4.0,
                           clock=lambda: now[0])
    keys, rows = _blocks(2)
    assert not tier.healthy
    assert tier.batch_put(keys, [memoryview(r) for r in rows]) == [False, False]
    attempts = []
    for step in range(24):  # 0.5 s steps; first try at 0 s, then after 1, 2, 4, 4 s
        now[0] = 0.5 * (step + 1)
        before = tier.stats["connect_failures"]
        tier.maybe_reconnect()
        if tier.stats["connect_failures"] > before:
            attempts.append(now[0])
    assert attempts == [1.0, 3.0, 7.0, 11.0]
    DictBackend.up[store_name] = True
    now[0] = 100.0
    assert tier.maybe_reconnect()
    assert all(tier.batch_put(keys, [memoryview(r) for r in rows]))
    assert tier.stats["unavailable"] == 2 and tier.stats["puts"] == 2
    tier.close()


def test_retrying_backend_notices_loss_and_probes_same_client(store_name):
    now = [0.0]
    tier = RetryingBackend(f"dict://{store_name}", namespace=make_namespace("m", FP),
                           timeout_s=1, initial_backoff_s=1.0, clock=lambda: now[0])
    keys, rows = _blocks(2)
    assert all(tier.batch_put(keys, [memoryview(r) for r in rows]))
    client = tier.backend
    DictBackend.up[store_name] = False
    out = np.zeros_like(rows)
    assert tier.batch_get_into(keys, [memoryview(r) for r in out]) == [False, False]
    assert not tier.healthy and not tier.maybe_reconnect()  # backoff not yet elapsed
    DictBackend.up[store_name] = True
    now[0] = 1.0
    assert tier.maybe_reconnect() and tier.backend is client
    assert tier.batch_get_into(keys, [memoryview(r) for r in out]) == [True, True]
    assert tier.stats["reconnects"] == 1 and tier.stats["misses"] == 2
    tier.close()


# -- outcomes come from types and codes, never from message text --------------------------------


class _FakePipeline:
    def __init__(self, replies):
        self.replies = replies
        self.sets = []

    def set(self, name, value, nx, ex):
        self.sets.append(name)

    def execute(self, raise_on_error):
        assert raise_on_error is False
        return list(self.replies)


def test_redis_put_outcomes_follow_the_client_exception_class():
    """A full store is the client's OutOfMemoryError (its class for the server's OOM code),
    whatever a reply's text says; any other error reply is a failure."""
    redis = need_module("redis")
    from kvtier.storage.remote.redis import RedisBackend

    replies = [True, None,
               redis.exceptions.OutOfMemoryError("command not allowed when used memory > "
                                                 "'maxmemory'"),
               redis.exceptions.ResponseError("OOM in the text of another error"),
               redis.exceptions.ResponseError("ERR something else")]
    pipe = _FakePipeline(replies)
    backend = object.__new__(RedisBackend)  # no server: only the reply mapping runs
    backend._client = type("Client", (), {"pipeline": lambda self, transaction: pipe})()
    backend._ttl_s = None
    names = [f"k{i}" for i in range(len(replies))]
    assert backend._store(names, [memoryview(b"x")] * len(replies)) == [
        0, 0, FULL, FAILED, FAILED]
    assert pipe.sets == names


def test_partial_fault_reports_the_callers_failed_outcome():
    """The fault hook takes the per-key failure code from its caller (remote/base.py passes
    FAILED); its own default is the same value."""
    assert faults.REMOTE_FAILED == FAILED

    def fetch(names, views):
        return [b"v"] * len(names)

    with faults.armed("remote.get", "partial", seed=1):
        out = faults.remote_call("remote.get", fetch, 0.01, failed=-99)(["a", "b", "c"], [None] * 3)
    assert 0 < out.count(-99) < 3


def test_fault_module_does_not_import_remote_code():
    """faults.py <-> remote/base.py: base imports the fault hook, never the other way round,
    neither at import time nor inside a function."""
    code = ("import sys, kvtier.storage.faults; "
            "print(sorted(m for m in sys.modules if m.startswith('kvtier.storage.remote')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"
    tree = ast.parse(Path(faults.__file__).read_text(encoding="utf-8"))
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names]
    assert not [m for m in imported if m and m.startswith("kvtier.storage.remote")]
