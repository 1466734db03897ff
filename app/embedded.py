"""The private redis-server child used when REDIS_URL is unset, so that a new user needs nothing
but Python and redis-server. Data lives under one folder with AOF on; the child is restarted if
it dies and stopped (SIGTERM, so it finishes writing the AOF) with the service, or by the kernel
when the process that started it dies, even by `kill -9` (app.lifetime).

One redis-server per data folder, whatever starts the service: `python -m app` starts it once
for all its workers, but `uvicorn --workers N app.main:app` has each worker start the app on
its own. The process holding an exclusive lock on `<data>/redis.lock` owns the server, which
inherits the locked file, so the lock is free only once no redis-server runs on the folder. The
others read its port from `<data>/redis.port` and use it; if the owner dies, the first of them
to take the lock starts the server again on the same port."""

import fcntl
import logging
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

from app.lifetime import child_dies_with_parent

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
    """A supervised redis-server child on a free loopback port, or the one that another
    process already runs on the same data folder."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._lock: IO[bytes] | None = None
        self._guard = threading.Lock()  # between stop() and the thread spawning a server
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._error: EmbeddedRedisError | None = None
        self._supervisor: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def owner(self) -> bool:
        """Does this process run the server (rather than use another process's)?"""
        return self._process is not None

    def start(self, timeout: float = 10.0) -> str:
        """Start the server, or find the one running on the data folder; wait until it answers,
        and return its URL."""
        executable = shutil.which("redis-server")
        if executable is None:
            raise EmbeddedRedisError(INSTALL_HINT)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = (self.data_dir / "redis.lock").open("ab")
        # Every server is started by this one long-lived thread: the kernel signals a child
        # when the thread that forked it ends, not only when the process does.
        self._supervisor = threading.Thread(
            target=self._supervise, args=(executable, timeout), name="embedded-redis", daemon=True
        )
        self._supervisor.start()
        self._ready.wait()
        if self._error is not None:
            self.stop()
            raise self._error
        if self.owner:
            log.info("embedded redis-server on %s, data in %s", self.url, self.data_dir)
        else:
            log.info("using the redis-server on %s that runs on %s", self.url, self.data_dir)
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        with self._guard:
            self._stopping.set()
            process = self._process
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._supervisor is not None:
            self._supervisor.join(timeout)
        if self._lock is not None:
            self._lock.close()  # releases the lock, if this process held it

    def _supervise(self, executable: str, timeout: float) -> None:
        try:
            if self._take_lock():
                self._serve(executable, timeout)
            else:
                self._find_owner(timeout)
        except EmbeddedRedisError as error:
            self._error = error
        finally:
            self._ready.set()
        while self._error is None and not self._stopping.is_set():
            if self._process is None:  # another process's server: take over when it is gone
                if self._take_lock():
                    log.warning("the embedded redis-server's owner is gone; starting it here")
                    self._respawn(executable)
                else:
                    self._stopping.wait(0.5)
                continue
            code = self._process.wait()
            if self._stopping.is_set():
                return
            log.error("embedded redis-server exited with %s; restarting it", code)
            time.sleep(0.5)
            self._respawn(executable)

    def _take_lock(self) -> bool:
        assert self._lock is not None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _serve(self, executable: str, timeout: float) -> None:
        """Start the server (this process holds the lock) and record its port."""
        recorded = self._recorded_port()
        self.port = recorded if recorded is not None and _port_free(recorded) else free_port()
        self._respawn(executable)
        self._wait_ready(timeout)
        port_file = self.data_dir / "redis.port"
        partial = port_file.with_suffix(".tmp")
        partial.write_text(str(self.port))
        partial.replace(port_file)  # atomic: a reader never sees half of it

    def _find_owner(self, timeout: float) -> None:
        """Wait for the process holding the lock to record a port that answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            port = self._recorded_port()
            # Its server, not whatever now listens on a port a stale file names.
            if port is not None and _serves_folder(port, self.data_dir):
                self.port = port
                return
            time.sleep(0.05)
        raise EmbeddedRedisError(
            f"another process holds {self.data_dir / 'redis.lock'} but its redis-server did not "
            f"answer in {timeout}s"
        )

    def _recorded_port(self) -> int | None:
        try:
            return int((self.data_dir / "redis.port").read_text())
        except (OSError, ValueError):
            return None

    def _respawn(self, executable: str) -> None:
        with self._guard:
            if not self._stopping.is_set():
                self._process = self._spawn(executable)

    def _spawn(self, executable: str) -> "subprocess.Popen[bytes]":
        assert self._lock is not None
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
            # The server inherits the locked file: the lock outlives this process until the
            # server has finished writing and exited, so no second server starts on the folder.
            pass_fds=(self._lock.fileno(),),
            preexec_fn=child_dies_with_parent(),
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
            if _answers(self.port):
                return
            time.sleep(0.05)
        raise EmbeddedRedisError(f"redis-server did not answer on port {self.port} in {timeout}s")


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _serves_folder(port: int, data_dir: Path) -> bool:
    """Does a redis-server with its data in `data_dir` answer on `port`?"""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"*3\r\n$6\r\nCONFIG\r\n$3\r\nGET\r\n$3\r\ndir\r\n")
            reply = sock.recv(4096)
    except OSError:
        return False
    # *2 $3 dir $<n> <path>: the path is the reply's last line.
    return reply.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1] == str(data_dir).encode()


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as redis-server binds
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
