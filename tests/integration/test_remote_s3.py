"""G4 on a real S3 gateway (SeaweedFS ``weed server -s3`` on loopback): data path and faults.

One server serves the module's data-path tests (distinct namespaces per test); the restart test
runs a second one of its own (every port is a free one, see ``SeaweedS3Server``). Credentials
reach kvtier only through the AWS chain (environment or a shared credentials file).
"""

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
from servers import SeaweedS3Server

from kvtier.errors import ConfigError, StorageError, TransferError
from kvtier.storage.remote import RetryingBackend, make_backend, make_namespace, remote_key
from need import need

pytestmark = pytest.mark.timeout(120)

BLOCK = 64 * 1024 + 64
TIMEOUT_S = 2.0
ACCESS_KEY = "kvtier-test-access"
SECRET_KEY = "kvtier-test-secret-0xS3CR3T"
_AWS_CHAIN_VARS = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN",
                   "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
                   "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                   "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_DEFAULT_REGION", "AWS_REGION")


def _namespace(test_name: str, fingerprint: int = FINGERPRINT, rank: int = 0) -> str:
    return make_namespace(f"test/{test_name}", fingerprint, rank)


def _server(workdir) -> SeaweedS3Server:
    return SeaweedS3Server(workdir, access_key=ACCESS_KEY, secret_key=SECRET_KEY)


def _object_key(prefix: str, namespace: str, key) -> str:
    return f"{prefix}/{remote_key(namespace, key)}" if prefix else remote_key(namespace, key)


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """One SeaweedFS S3 gateway shared by the module's tests."""
    need("; ".join(SeaweedS3Server.missing()))
    with _server(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture
def make_s3(tmp_path_factory):
    """Factory for servers of a test's own (faults); all are stopped by PID at teardown."""
    need("; ".join(SeaweedS3Server.missing()))
    servers = []

    def start() -> SeaweedS3Server:
        server = _server(tmp_path_factory.mktemp("seaweed"))
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """The AWS chain sees the test identity in the environment and nothing of the machine."""
    for name in _AWS_CHAIN_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


@pytest.fixture
def backend(s3_server, aws_env, request):
    be = make_backend(s3_server.url("shared"), namespace=_namespace(request.node.name),
                      timeout_s=TIMEOUT_S)
    yield be
    be.close()


# -- URLs and credentials (no server needed) ---------------------------------------------------

@pytest.mark.parametrize(("url", "names"), [
    ("s3://Bad_Bucket/p?endpoint=http://127.0.0.1:1", "bucket"),
    ("s3://ab/p?endpoint=http://127.0.0.1:1", "bucket"),
    ("s3://bucket/p?endpoint=ftp://127.0.0.1:1", "endpoint"),
    ("s3://bucket/p?endpoint=http://127.0.0.1:99999", "endpoint"),
    ("s3://bucket/p?endpoint=http://127.0.0.1:1/path", "endpoint"),
    ("s3://bucket/p?endpoint=http://127.0.0.1:1&colour=blue", "colour"),
    ("s3://bucket/p?endpoint=http://127.0.0.1:1&threads=0", "threads"),
    ("s3://bucket/p?endpoint=http://127.0.0.1:1&region=Not+A+Region", "region"),
    ("s3://bucket/a/../b?endpoint=http://127.0.0.1:1", "prefix"),
])
def test_malformed_url_names_the_wrong_part(url, names, aws_env):
    need("; ".join(SeaweedS3Server.missing()))
    with pytest.raises(ConfigError, match=names):
        make_backend(url, namespace=_namespace("url"), timeout_s=TIMEOUT_S)


@pytest.mark.parametrize("url", [
    "s3://AKID:s3cret-in-url@bucket/p?endpoint=http://127.0.0.1:1",
    "s3://bucket/p?endpoint=http://AKID:s3cret-in-url@127.0.0.1:1",
    "s3://bucket/p?endpoint=http://127.0.0.1:1&secret_key=s3cret-in-url",
])
def test_credentials_in_the_url_are_refused_and_not_shown(url, aws_env):
    need("; ".join(SeaweedS3Server.missing()))
    with pytest.raises(ConfigError, match="credential") as info:
        make_backend(url, namespace=_namespace("url"), timeout_s=TIMEOUT_S)
    assert "s3cret-in-url" not in str(info.value)


def test_no_credentials_anywhere_is_a_config_error(aws_env):
    need("; ".join(SeaweedS3Server.missing()))
    aws_env.delenv("AWS_ACCESS_KEY_ID")
    aws_env.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ConfigError, match="no AWS credentials"):
        make_backend("s3://bucket/p?endpoint=http://127.0.0.1:1", namespace=_namespace("url"),
                     timeout_s=TIMEOUT_S)


# -- data path ---------------------------------------------------------------------------------

def test_round_trip_is_byte_exact(backend):
    check_round_trip(backend, BLOCK)


def test_bytes_keys_and_single_block_batches(backend):
    keys, rows = make_blocks(3, BLOCK, bytes_keys=True, seed=3)
    for idx in range(3):
        assert backend.batch_put(keys[idx:idx + 1], views(rows[idx:idx + 1])) == [True]
    out = empty_like(rows)
    assert backend.batch_get_into(keys[:1], views(out[:1])) == [True]
    assert all(backend.batch_get_into(keys, views(out)))
    assert np.array_equal(out, rows)


def test_missing_key_is_a_miss(backend):
    keys, rows = make_blocks(3, BLOCK, seed=9)
    assert all(backend.batch_put(keys[:2], views(rows[:2])))
    out = empty_like(rows)
    assert backend.batch_get_into(keys, views(out)) == [True, True, False]
    assert backend.batch_exists(keys) == [True, True, False]
    assert backend.stats["misses"] == 1 and backend.stats["checksum_failures"] == 0
    assert backend.healthy


def test_object_changed_behind_our_back_is_a_miss_and_heals(backend, s3_server):
    keys, rows = make_blocks(5, BLOCK, seed=1)
    assert all(backend.batch_put(keys, views(rows)))
    raw = s3_server.raw_client()

    def overwrite(idx: int, body: bytes) -> None:
        raw.put_object(Bucket=s3_server.bucket,
                       Key=_object_key("shared", backend.namespace, keys[idx]), Body=body)

    flipped = bytearray(rows[0].tobytes())
    flipped[-1] ^= 0xFF                        # one payload byte changed: checksum mismatch
    overwrite(0, bytes(flipped))
    overwrite(1, rows[1].tobytes()[:-10])      # truncated
    overwrite(2, rows[3].tobytes())            # a valid block, but another key's
    overwrite(3, rows[3].tobytes() * 2)        # too long: not even read
    out = empty_like(rows)
    assert backend.batch_get_into(keys, views(out)) == [False, False, False, False, True]
    assert backend.stats["checksum_failures"] == 4
    assert np.array_equal(out[4], rows[4])
    # The bad objects were deleted, so the next offload of the same blocks heals the keys.
    assert backend.batch_exists(keys[:4]) == [False] * 4
    assert all(backend.batch_put(keys, views(rows)))
    out = empty_like(rows)
    assert backend.batch_get_into(keys, views(out)) == [True] * 5
    assert np.array_equal(out, rows)
    raw.close()


def test_put_of_held_key_succeeds_and_keeps_first_value(backend, s3_server):
    keys, rows = make_blocks(2, BLOCK, seed=4)
    assert backend.batch_put(keys, views(rows)) == [True, True]
    _, other = make_blocks(2, BLOCK, seed=44)
    # Same keys, other payloads with valid headers (first write wins, as on every store).
    for idx in range(2):
        other[idx, :64] = rows[idx, :64]
    assert backend.batch_put(keys, views(other)) == [True, True]
    raw = s3_server.raw_client()
    stored = raw.get_object(Bucket=s3_server.bucket,
                            Key=_object_key("shared", backend.namespace, keys[0]))["Body"].read()
    assert stored == rows[0].tobytes()
    raw.close()


def test_other_namespaces_never_match(s3_server, aws_env, request):
    name = request.node.name
    keys, rows = make_blocks(4, BLOCK, seed=2)
    url = s3_server.url("shared")
    with make_backend(url, namespace=_namespace(name), timeout_s=TIMEOUT_S) as writer:
        assert all(writer.batch_put(keys, views(rows)))
    others = [_namespace(name, fingerprint=OTHER_FINGERPRINT), _namespace(name, rank=1),
              make_namespace(f"test/{name}-other-model", FINGERPRINT, 0)]
    for namespace in others:
        with make_backend(url, namespace=namespace, timeout_s=TIMEOUT_S) as reader:
            out = empty_like(rows)
            assert reader.batch_get_into(keys, views(out)) == [False] * 4
            assert reader.batch_exists(keys) == [False] * 4
            assert not out.any()


def test_key_prefix_isolates_two_deployments(s3_server, aws_env, request):
    namespace = _namespace(request.node.name)
    keys, rows = make_blocks(4, BLOCK, seed=5)
    team_a = make_backend(s3_server.url("team-a/kv"), namespace=namespace, timeout_s=TIMEOUT_S)
    team_b = make_backend(s3_server.url("team-b/kv"), namespace=namespace, timeout_s=TIMEOUT_S)
    try:
        assert all(team_a.batch_put(keys, views(rows)))
        out = empty_like(rows)
        assert team_b.batch_get_into(keys, views(out)) == [False] * 4
        assert team_b.batch_exists(keys) == [False] * 4
        assert all(team_a.batch_get_into(keys, views(out)))
        assert np.array_equal(out, rows)
    finally:
        team_a.close()
        team_b.close()
    raw = s3_server.raw_client()
    listed = raw.list_objects_v2(Bucket=s3_server.bucket, Prefix="team-a/kv/")
    names = {item["Key"] for item in listed.get("Contents", [])}
    assert names == {_object_key("team-a/kv", namespace, key) for key in keys}
    assert raw.list_objects_v2(Bucket=s3_server.bucket, Prefix="team-b/").get("KeyCount") == 0
    raw.close()


def test_credentials_from_a_shared_credentials_file(s3_server, aws_env, tmp_path, request):
    aws_env.delenv("AWS_ACCESS_KEY_ID")
    aws_env.delenv("AWS_SECRET_ACCESS_KEY")
    path = tmp_path / "credentials"
    path.write_text(f"[kvtier]\naws_access_key_id = {ACCESS_KEY}\n"
                    f"aws_secret_access_key = {SECRET_KEY}\n")
    aws_env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(path))
    aws_env.setenv("AWS_PROFILE", "kvtier")
    keys, rows = make_blocks(2, BLOCK, seed=6)
    with make_backend(s3_server.url("shared"), namespace=_namespace(request.node.name),
                      timeout_s=TIMEOUT_S) as be:
        assert all(be.batch_put(keys, views(rows)))
        out = empty_like(rows)
        assert all(be.batch_get_into(keys, views(out)))
        assert np.array_equal(out, rows)


def test_caller_contract_errors_raise(backend):
    keys, rows = make_blocks(2, BLOCK, seed=7)
    with pytest.raises(TransferError):
        backend.batch_put(keys, views(rows[:1]))
    with pytest.raises(TransferError):  # header names another key
        backend.batch_put([keys[1], keys[0]], views(rows))
    _, foreign = make_blocks(1, BLOCK, fingerprint=OTHER_FINGERPRINT)
    with pytest.raises(TransferError):  # header names another geometry
        backend.batch_put(keys[:1], views(foreign))
    with pytest.raises(TransferError):
        backend.batch_get_into(keys[:1], [memoryview(rows[0].tobytes())])  # read-only


# -- faults ------------------------------------------------------------------------------------

def test_wrong_secret_is_reported_down_not_a_crash(s3_server, aws_env, request, caplog):
    namespace = _namespace(request.node.name)
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-0xBAD")
    url = s3_server.url("shared")
    with pytest.raises(StorageError, match="credentials rejected") as info:
        make_backend(url, namespace=namespace, timeout_s=TIMEOUT_S)
    assert "wrong-secret-0xBAD" not in str(info.value)
    keys, rows = make_blocks(2, BLOCK, seed=8)
    with caplog.at_level(logging.DEBUG, logger="kvtier"):
        tier = RetryingBackend(url, namespace=namespace, timeout_s=TIMEOUT_S,
                               initial_backoff_s=0.05, max_backoff_s=0.2)
        assert not tier.healthy
        assert tier.batch_put(keys, views(rows)) == [False, False]
        out = empty_like(rows)
        assert tier.batch_get_into(keys, views(out)) == [False, False]
        assert tier.stats["connect_failures"] >= 1 and tier.stats["unavailable"] == 4
        aws_env.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)  # the operator fixes the secret
        assert wait_for(tier.maybe_reconnect)
        assert all(tier.batch_put(keys, views(rows)))
        assert all(tier.batch_get_into(keys, views(out)))
        assert np.array_equal(out, rows)
        tier.close()
    assert "wrong-secret-0xBAD" not in caplog.text and SECRET_KEY not in caplog.text
    assert "credentials rejected" in caplog.text


def test_slow_store_times_out_then_recovers(s3_server, aws_env, request):
    tier = RetryingBackend(s3_server.url("shared"), namespace=_namespace(request.node.name),
                           timeout_s=TIMEOUT_S, initial_backoff_s=0.05, max_backoff_s=0.5)
    keys, rows = make_blocks(4, BLOCK, seed=10)
    assert all(tier.batch_put(keys, views(rows)))
    s3_server.pause()  # SIGSTOP: connections are accepted, nothing answers
    try:
        out = empty_like(rows)
        assert tier.batch_get_into(keys, views(out)) == [False] * 4
        assert tier.stats["timeouts"] >= 1
        assert not tier.healthy
        assert tier.batch_exists(keys) == [False] * 4  # fails fast while down
    finally:
        s3_server.resume()
    assert wait_for(tier.maybe_reconnect, timeout_s=30)
    assert wait_for(lambda: all(tier.batch_get_into(keys, views(out))), timeout_s=30,
                    step_s=0.2)
    assert np.array_equal(out, rows)
    tier.close()


def test_store_down_then_restarted_misses_then_serves_exact_bytes(make_s3, aws_env, request):
    server = make_s3()
    url = server.url("restart")
    namespace = _namespace(request.node.name)
    tier = RetryingBackend(url, namespace=namespace, timeout_s=TIMEOUT_S,
                           initial_backoff_s=0.05, max_backoff_s=0.5)
    keys, rows = make_blocks(8, BLOCK, seed=11)
    assert all(tier.batch_put(keys, views(rows)))

    server.kill()  # SIGKILL: no goodbye; the data stays on disk
    out = empty_like(rows)
    assert tier.batch_get_into(keys, views(out)) == [False] * 8
    assert not tier.healthy and not tier.maybe_reconnect()
    assert tier.batch_put(keys, views(rows)) == [False] * 8
    with pytest.raises(StorageError) as info:
        make_backend(url, namespace=namespace, timeout_s=TIMEOUT_S)
    assert f"127.0.0.1:{server.port}" in str(info.value)

    # Back on the same directory and ports: the gateway answers at once, but objects read as
    # server errors for a while. Every read until then is a miss, never other bytes.
    server.start(wait_for_data=False)
    served = []

    def read_back() -> bool:
        tier.maybe_reconnect()
        got = empty_like(rows)
        ok = tier.batch_get_into(keys, views(got))
        for idx, good in enumerate(ok):
            if good:
                assert np.array_equal(got[idx], rows[idx]), "wrong bytes served"
        served.append(sum(ok))
        return all(ok)

    assert wait_for(read_back, timeout_s=60, step_s=0.25), served
    # Writes work again too.
    new_keys, new_rows = make_blocks(4, BLOCK, seed=12)
    assert wait_for(lambda: all(tier.batch_put(new_keys, views(new_rows))), timeout_s=30,
                    step_s=0.25)
    got = empty_like(new_rows)
    assert all(tier.batch_get_into(new_keys, views(got)))
    assert np.array_equal(got, new_rows)
    tier.close()
