"""Settings come from the environment, once, and bad values are refused at start."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.auth import ApiKey, hash_key
from app.settings import Settings


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://example:6380/2")
    monkeypatch.setenv("EMA_DEFAULT_DECAY", "0.9")
    monkeypatch.setenv("EMA_MAX_BATCH", "7")
    monkeypatch.setenv("EMA_AUTO_CREATE", "false")
    settings = Settings()
    assert settings.redis_url == "redis://example:6380/2"
    assert (settings.default_decay, settings.max_batch, settings.auto_create) == (0.9, 7, False)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("EMA_KEY_PREFIX", "ema{x}:"),
        ("EMA_DEFAULT_DECAY", "1.5"),
        ("EMA_DEFAULT_DECAY", "nan"),
        ("EMA_DEFAULT_INITIAL", "inf"),
        ("EMA_MAX_BATCH", "0"),
        ("EMA_REDIS_TIMEOUT", "0"),
    ],
)
def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match=variable.removeprefix("EMA_").lower()):
        Settings()


def test_api_keys_file_joins_the_environment_keys(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    inline = ApiKey(name="a", sha256=hash_key("ka"), scopes=frozenset({"read"}))
    filed = ApiKey(name="b", sha256=hash_key("kb"), scopes=frozenset({"admin"}))
    (tmp_path / "keys.json").write_text(json.dumps([filed.model_dump(mode="json")]))
    monkeypatch.setenv("EMA_API_KEYS", json.dumps([inline.model_dump(mode="json")]))
    monkeypatch.setenv("EMA_API_KEYS_FILE", str(tmp_path / "keys.json"))
    assert Settings().api_keys == (inline, filed)
    monkeypatch.setenv("EMA_API_KEYS_FILE", str(tmp_path / "missing.json"))
    with pytest.raises(ValidationError, match="cannot read"):
        Settings()
