"""The service as a real process on a free port, for tests that need real HTTP: event streams,
several replicas, signals, the Python client and the `ema` command.

The one helper that starts the service. It runs in a process group of its own, and stopping it
ends the whole group: the supervisor, its uvicorn workers and an embedded redis-server. Killing
the supervisor alone would orphan its workers, which keep running (and keep their port) after
the test run."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import httpx

from tests.redis_server import free_port


def service_env(tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMA_", "REDIS_"))}
    return env | {"EMA_PORT": str(port), "EMA_DATA_DIR": str(tmp_path / "data")} | extra


class ServiceProcess:
    """`command` (by default `python -m app`) on `port` (a free one by default), started and
    ready on `ready` when constructed, with its output in `<directory>/service-<port>.log` (or on
    the file descriptor `output`).

    Use it as a context manager, or call `stop()` (SIGTERM, then SIGKILL) or `kill()` in a
    `finally`: both end every process of its group."""

    def __init__(
        self,
        directory: Path,
        *,
        command: Sequence[str] = (sys.executable, "-m", "app"),
        port: int | None = None,
        ready: str = "/readyz",
        output: int | None = None,
        **env: str,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port() if port is None else port
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = directory / f"service-{self.port}.log"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                list(command),
                env=service_env(directory, self.port, **env),
                cwd=directory,  # nothing written in the checkout
                stdin=subprocess.DEVNULL,
                stdout=log if output is None else output,
                stderr=log if output is None else output,
                start_new_session=True,  # its own process group, ended as one
            )
        try:
            self.wait_ready(ready)
        except BaseException:
            self.kill()
            raise

    def wait_ready(self, path: str = "/readyz", timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the service exited: {self.log.read_text()}"
            try:
                if httpx.get(self.url + path, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"the service did not become ready: {self.log.read_text()}")

    def stop(self, timeout: float = 10) -> None:
        """A clean stop (SIGTERM, as a process manager sends), then whatever is left killed."""
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        self.kill()

    def kill(self) -> None:
        """SIGKILL to every process of the group, the supervisor's children included."""
        with contextlib.suppress(ProcessLookupError):  # the group has ended already
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def __enter__(self) -> "ServiceProcess":
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
