"""Settings come from the environment, once, and bad values are refused at start."""

import pytest
from pydantic import ValidationError

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
