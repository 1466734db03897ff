"""The client distribution installed alone, as another project installs it: a fresh virtual
environment gets `pip install ./client` and pytest (from pip's cache), nothing of the service,
and runs the client's own suite (client/tests) against the real service."""

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_server import RedisServer
from tests.service import ServiceProcess

ROOT = Path(__file__).resolve().parent.parent
SERVER_PACKAGES = {"ema-service", "fastapi", "starlette", "uvicorn", "redis", "prometheus-client"}


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("client-venv")
    folder = where / "venv"
    # From a copy: setuptools writes build/ and *.egg-info into the folder it builds.
    source = where / "client"
    ignore = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache")
    shutil.copytree(ROOT / "client", source, ignore=ignore)
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, timeout=120)
    installed = subprocess.run(
        [str(folder / "bin/python"), "-m", "pip", "install", "--quiet", str(source), "pytest"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    # Silent, but for this machine's pip configuration naming a missing extra index.
    noise = [
        line for line in installed.stderr.splitlines() if "is ignored: it is neither" not in line
    ]
    assert noise == []
    return folder


@pytest.fixture(scope="module")
def service(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    running = ServiceProcess(
        tmp_path_factory.mktemp("client-alone"),
        REDIS_URL=redis_server.url,
        EMA_KEY_PREFIX=f"t{uuid.uuid4().hex[:8]}:",
        EMA_WORKERS="1",
    )
    yield running
    running.kill()


@pytest.mark.timeout(600)
def test_the_client_installs_without_the_service(venv: Path) -> None:
    listed = subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    names = {package["name"].lower() for package in json.loads(listed.stdout)}
    assert "ema-client" in names
    assert names.isdisjoint(SERVER_PACKAGES)
    assert (venv / "bin/ema").exists()


@pytest.mark.timeout(600)
def test_the_client_suite_passes_alone(venv: Path, service: ServiceProcess) -> None:
    result = subprocess.run(
        [str(venv / "bin/python"), "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        # The client's folder: its pyproject holds its pytest settings, and nothing of the
        # service is importable from there.
        cwd=ROOT / "client",
        env={"PATH": "/usr/bin:/bin", "EMA_TEST_URL": service.url},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout
    assert "skipped" not in result.stdout
