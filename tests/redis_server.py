"""A real redis-server for the tests: started on a free loopback port, never 6379."""

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

NO_RETRY = Retry(NoBackoff(), 0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _PortTaken(Exception):
    """Someone bound the port between free_port() and redis-server."""


class RedisServer:
    """One redis-server process that can be stopped, killed and started again on its port (and
    a cluster node's bus port, `cluster_bus`)."""

    def __init__(self, directory: Path, *extra: str, cluster_bus: bool = False) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("the tests need redis-server on PATH (apt-get install redis-server)")
        self.executable = executable
        self.directory = directory
        self.port = free_port()
        # The bus port is normally port + 10000, which may be taken or out of range.
        self.bus_port = free_port() if cluster_bus else None
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None
        self._started = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> "redis.Redis":
        return redis.Redis(port=self.port, decode_responses=True, encoding_errors="surrogateescape")

    def start(self) -> "RedisServer":
        """Start, and wait until it answers. A port taken meanwhile by another process (a
        client's ephemeral port, another suite's server) is swapped for a new free one on the
        first start; a restart keeps its ports (clients and cluster peers know them)."""
        for _ in range(5):
            try:
                self._start()
                self._started = True
                return self
            except _PortTaken:
                if self._started:
                    message = f"port {self.port} was taken while redis-server was down"
                    raise RuntimeError(message) from None
                self.port = free_port()
                self.bus_port = self.bus_port and free_port()
        raise RuntimeError("redis-server found its port taken five times")

    def _start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = self.directory / "redis.log"
        logged = log.stat().st_size if log.exists() else 0
        bus = ["--cluster-port", str(self.bus_port)] if self.bus_port else []
        self.process = subprocess.Popen(
            [
                self.executable,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.directory),
                "--save", "",
                "--appendonly", "no",
                "--logfile", "redis.log",
                *bus,
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                with log.open("rb") as lines:
                    lines.seek(logged)
                    if b"Address already in use" in lines.read():
                        raise _PortTaken
                raise RuntimeError(f"redis-server exited; see {self.directory}/redis.log")
            try:
                with redis.Redis(port=self.port, socket_timeout=1, retry=NO_RETRY) as client:
                    # (another suite's redis-server on this port would answer too)
                    if client.info("server")["process_id"] == self.process.pid:
                        return
            except redis.RedisError:
                pass
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start in 10 s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


class ClusterClient(redis.RedisCluster):
    """A test client on a cluster that sees every primary's keys, as a single-node client does.

    (KEYS goes to one node by default; FLUSHALL, SCRIPT FLUSH and SCAN already go to all.)
    """

    def keys(self, pattern: str = "*", **kwargs: object) -> list[str]:  # type: ignore[override]
        kwargs.setdefault("target_nodes", self.PRIMARIES)
        return super().keys(pattern, **kwargs)  # type: ignore[no-any-return,arg-type]


class RedisCluster:
    """A local Redis Cluster: `primaries` redis-server processes with `replicas` replicas each,
    on free loopback ports, joined with `redis-cli --cluster create`.

    Nodes time out after `node_timeout_ms`, so that a killed primary's replica takes over in a
    few seconds. Each node keeps its files in its own folder under `directory`.
    """

    def __init__(
        self,
        directory: Path,
        primaries: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = 1000,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.directory = directory
        self.node_timeout_ms = node_timeout_ms
        self.extra = extra
        self.replicas = replicas
        self.nodes = [
            RedisServer(directory / f"node-{i}", *self._node_options(), cluster_bus=True)
            for i in range(primaries * (1 + replicas))
        ]

    def _node_options(self) -> list[str]:
        return [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            # A replica may take over however long it was cut off from its primary.
            "--cluster-replica-validity-factor", "0",
            *self.extra,
        ]  # fmt: skip

    @property
    def url(self) -> str:
        """Any one node: the service discovers the others."""
        return self.nodes[0].url

    def client(self) -> ClusterClient:
        return ClusterClient(
            host="127.0.0.1",
            port=self.live_nodes()[0].port,
            decode_responses=True,
            encoding_errors="surrogateescape",
        )

    def live_nodes(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.process is not None]

    def start(self) -> "RedisCluster":
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(
                [
                    "redis-cli", "--cluster", "create",
                    *(f"127.0.0.1:{node.port}" for node in self.nodes),
                    "--cluster-replicas", str(self.replicas),
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=60,
            )  # fmt: skip
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, timeout: float = 30) -> None:
        """Until every live node says the cluster is ok, and each primary has its replicas
        connected and in sync."""
        deadline = time.monotonic() + timeout
        while True:
            problems = self._problems()
            if not problems:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster is not healthy: {problems}")
            time.sleep(0.1)

    def _problems(self) -> list[str]:
        problems = []
        for node in self.live_nodes():
            try:
                with node.client() as client:
                    info = client.cluster("info")
                    replication = client.info("replication")
            except redis.RedisError as error:
                problems.append(f"{node.port}: {error}")
                continue
            if info["cluster_state"] != "ok":
                problems.append(f"{node.port}: cluster_state {info['cluster_state']}")
            if replication["role"] == "master":
                online = sum(
                    1
                    for key, value in replication.items()
                    if key.startswith("slave")
                    and isinstance(value, dict)
                    and value.get("state") == "online"
                )
                # Only the replicas still alive can be in sync.
                if online < min(self.replicas, len(self.live_nodes()) // 2) and self.replicas:
                    problems.append(f"{node.port}: {online} replicas online")
            elif replication.get("master_link_status") != "up":
                problems.append(
                    f"{node.port}: replica link {replication.get('master_link_status')}"
                )
        return problems

    def role(self, node: RedisServer) -> str:
        with node.client() as client:
            return str(client.info("replication")["role"])

    def primaries(self) -> list[RedisServer]:
        return [node for node in self.live_nodes() if self.role(node) == "master"]

    def node_of(self, key: str) -> RedisServer:
        """The live node serving `key` as a primary now."""
        with self.client() as client:
            node = client.get_node_from_key(key)
        return next(n for n in self.nodes if n.port == int(node.port))

    def replica_of(self, primary: RedisServer) -> RedisServer:
        with primary.client() as client:
            replication = client.info("replication")
        port = int(replication["slave0"]["port"])
        return next(n for n in self.nodes if n.port == port)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
