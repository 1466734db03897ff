"""The service as a real process (`python -m app`) on a free port, for tests that need real
HTTP: event streams, several replicas, signals."""

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.redis_server import free_port


def service_env(tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMA_", "REDIS_"))}
    return env | {"EMA_PORT": str(port), "EMA_DATA_DIR": str(tmp_path / "data")} | extra


def wait_ready(base: str, process: "subprocess.Popen[bytes]", timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the service exited"
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError("the service did not become ready")


class ServiceProcess:
    """`python -m app` with its output in `<tmp_path>/service-<port>.log`."""

    def __init__(self, tmp_path: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / f"service-{self.port}.log"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app"],
                env=service_env(tmp_path, self.port, **env),
                stdout=log,
                stderr=log,
            )
        try:
            wait_ready(self.url, self.process)
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
