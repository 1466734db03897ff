"""The private redis-server child used when REDIS_URL is unset, so that a new user needs nothing
but Python and redis-server. Data lives under one folder with AOF on; the child is restarted if
it dies and stopped (SIGTERM, so it finishes writing the AOF) with the service."""

import logging
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "redis-server was not found on PATH. Install it (Debian/Ubuntu: `sudo apt-get install "
    "redis-server`; Fedora: `sudo dnf install redis`; macOS: `brew install redis`), or set "
    "REDIS_URL to a Redis you already run (for example redis://localhost:6379/0)."
)


class EmbeddedRedisError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """A supervised redis-server child on a free loopback port."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> str:
        """Start the child, wait until it answers, and return its URL."""
        executable = shutil.which("redis-server")
        if executable is None:
            raise EmbeddedRedisError(INSTALL_HINT)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._process = self._spawn(executable)
        self._wait_ready(timeout)
        self._supervisor = threading.Thread(
            target=self._supervise, args=(executable,), name="embedded-redis", daemon=True
        )
        self._supervisor.start()
        log.info("embedded redis-server on %s, data in %s", self.url, self.data_dir)
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        process = self._process
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if self._supervisor is not None:
            self._supervisor.join(timeout)

    def _spawn(self, executable: str) -> "subprocess.Popen[bytes]":
        return subprocess.Popen(
            [
                executable,
                "--bind", "127.0.0.1",
                "--port", str(self.port),
                "--dir", str(self.data_dir),
                "--appendonly", "yes",
                "--appendfsync", "everysec",
                "--logfile", "redis.log",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise EmbeddedRedisError(
                    f"redis-server exited with {self._process.returncode}; "
                    f"see {self.data_dir / 'redis.log'}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise EmbeddedRedisError(f"redis-server did not answer on port {self.port} in {timeout}s")

    def _supervise(self, executable: str) -> None:
        while not self._stopping.is_set():
            assert self._process is not None
            code = self._process.wait()
            if self._stopping.is_set():
                return
            log.error("embedded redis-server exited with %s; restarting it", code)
            time.sleep(0.5)
            self._process = self._spawn(executable)
