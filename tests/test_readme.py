"""The README never lies: its commands, curl examples and settings table are checked here."""

import re
import shlex
from pathlib import Path

import httpx
import pytest

from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def env_names() -> set[str]:
    names = set()
    prefix = Settings.model_config.get("env_prefix", "")
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        choices = getattr(alias, "choices", None)
        names.add(str(choices[0]) if choices else f"{prefix}{name}".upper())
    return names


def test_every_setting_is_documented_and_every_documented_setting_exists() -> None:
    table = set(re.findall(r"^\| `((?:EMA|REDIS)_[A-Z_]+)` \|", README, re.MULTILINE))
    assert table == env_names()


def test_ci_runs_the_readme_test_command() -> None:
    assert "| run the whole test suite | `./scripts/test` |" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^exec \./scripts/test\b", ci, re.MULTILINE)


def curl_examples() -> list[tuple[str, str, bytes | None, dict[str, str], str | None]]:
    examples = []
    for line in README.splitlines():
        if not line.startswith("curl "):
            continue
        command, _, comment = line.partition("#")
        words = shlex.split(command)
        if "-N" in words:  # an event stream never ends; tests/test_events.py covers them
            continue
        method = words[words.index("-X") + 1] if "-X" in words else "GET"
        body = words[words.index("-d") + 1].encode() if "-d" in words else None
        headers = dict(
            (part.strip() for part in words[i + 1].split(":", 1))
            for i, word in enumerate(words)
            if word == "-H"
        )
        url = next(word for word in words if word.startswith("localhost:8000"))
        path = url.removeprefix("localhost:8000")
        examples.append((method, path, body, headers, comment.strip() or None))
    return examples


@pytest.mark.anyio
async def test_readme_curl_examples_work_as_shown(client: httpx.AsyncClient) -> None:
    examples = curl_examples()
    assert len(examples) >= 8
    form = {"content-type": "application/x-www-form-urlencoded"}  # what curl -d sends
    for method, path, body, headers, comment in examples:
        response = await client.request(method, path, content=body, headers=form | headers)
        assert response.is_success, (method, path, response.text)
        if comment is not None:
            expected = float(comment.removeprefix("value "))
            assert response.json()["value"] == expected
