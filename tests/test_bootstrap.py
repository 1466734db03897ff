"""The shared bootstrap step of scripts/run and scripts/test: without redis-server it says how
to get it before installing anything, and building the packages prints no warning."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def bare_path(tmp_path: Path) -> str:
    """A PATH with what the scripts need to start, and neither redis-server nor apt-get."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in ("bash", "dirname", "id"):
        found = shutil.which(tool)
        assert found is not None
        (folder / tool).symlink_to(found)
    return str(folder)


@pytest.mark.parametrize(
    "command",
    [["scripts/bootstrap", "--redis-server"], ["scripts/run"], ["scripts/test"]],
)
def test_without_redis_server_the_scripts_explain(tmp_path: Path, command: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    result = subprocess.run(
        [str(ROOT / command[0]), *command[1:]],
        env=env | {"PATH": bare_path(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert "error: redis-server is not on PATH" in result.stderr
    assert "sudo apt-get install redis-server" in result.stderr
    assert "REDIS_URL" in result.stderr


def test_bad_arguments_are_refused() -> None:
    result = subprocess.run(
        [str(ROOT / "scripts/bootstrap"), "--frob"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "usage:" in result.stderr


# What each distribution's build reads: its pyproject.toml, README and code.
PROJECTS = {
    "service": (ROOT, ["pyproject.toml", "README.md", "app"]),
    "client": (ROOT / "client", ["pyproject.toml", "README.md", "src"]),
}


@pytest.mark.parametrize("project", PROJECTS)
def test_building_a_package_prints_no_warning(tmp_path: Path, project: str) -> None:
    # From a copy: setuptools writes build/ and *.egg-info into the source tree.
    top, names = PROJECTS[project]
    source = tmp_path / "source"
    source.mkdir()
    for name in names:
        if (top / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(top / name, source / name, ignore=ignore)
        else:
            shutil.copy(top / name, source / name)
    # With build isolation, as a user's pip does: the newest setuptools the index offers.
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    # This machine's pip configuration names a missing extra index, which pip reports:
    # that is the machine's, not the project's.
    lines = [line for line in result.stderr.splitlines() if "is ignored: it is neither" not in line]
    assert lines == []
    assert "warning" not in result.stdout.lower()
    assert len(list(tmp_path.glob("*.whl"))) == 1
