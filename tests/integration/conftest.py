"""Server fixtures for integration tests: real stores on loopback, stopped by PID afterwards.

A missing server binary skips the test, or fails it when ``REQUIRE_TEST_SERVERS=1`` (CI).
"""

from __future__ import annotations

import os

import pytest
from servers import MooncakeServer, RedisServer, missing_binaries


def _need(kind: str) -> None:
    missing = missing_binaries(kind)
    if not missing:
        return
    message = f"{kind} server not installed: {', '.join(missing)}"
    if os.environ.get("REQUIRE_TEST_SERVERS") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def make_redis(tmp_path_factory):
    """Factory: ``make_redis(**kwargs)`` starts a RedisServer; all are stopped at teardown."""
    _need("redis")
    servers = []

    def start(**kwargs) -> RedisServer:
        server = RedisServer(tmp_path_factory.mktemp("redis"), **kwargs)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def make_mooncake(tmp_path_factory):
    """Factory: ``make_mooncake(**kwargs)`` starts a MooncakeServer (master + storage)."""
    _need("mooncake")
    servers = []

    def start(**kwargs) -> MooncakeServer:
        server = MooncakeServer(tmp_path_factory.mktemp("mooncake"), **kwargs)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """One Redis shared by a module's tests (tests use distinct namespaces)."""
    _need("redis")
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def mooncake_server(tmp_path_factory):
    """One Mooncake Store shared by a module's tests (tests use distinct namespaces)."""
    _need("mooncake")
    with MooncakeServer(tmp_path_factory.mktemp("mooncake")) as server:
        yield server
