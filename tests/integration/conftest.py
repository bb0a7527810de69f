"""Server fixtures for integration tests: real stores on loopback, stopped by PID afterwards.

A missing server binary skips the test, or fails it when ``REQUIRE_TEST_SERVERS=1`` (CI).
"""

from __future__ import annotations

import pytest
from servers import MooncakeServer, RedisServer

from need import need_servers


@pytest.fixture
def make_redis(tmp_path_factory):
    """Factory: ``make_redis(**kwargs)`` starts a RedisServer; all are stopped at teardown."""
    need_servers("redis")
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
    need_servers("mooncake")
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
    need_servers("redis")
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def mooncake_server(tmp_path_factory):
    """One Mooncake Store shared by a module's tests (tests use distinct namespaces)."""
    need_servers("mooncake")
    with MooncakeServer(tmp_path_factory.mktemp("mooncake")) as server:
        yield server
