"""The client as another project sees it: installed alone (`pip install ./client`, no service
code, no server dependencies) and talking to a real service at $EMA_TEST_URL.

tests/test_client_alone.py in the repository's suite makes the fresh virtual environment,
starts the service and runs this file there; the service's own suite tests the client in depth
(retries, API keys, dropped connections) in tests/test_client.py.
"""

import asyncio
import importlib.metadata
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from ema_client import (
    AsyncClient,
    Client,
    InvalidInput,
    NotFound,
    Retry,
    Sample,
    TransportError,
    Update,
)

URL = os.environ.get("EMA_TEST_URL", "")
pytestmark = pytest.mark.skipif(not URL, reason="EMA_TEST_URL names no running service")
EMA = Path(sys.executable).parent / "ema"


@pytest.fixture
def name() -> str:
    return f"alone.{uuid.uuid4().hex[:12]}"


def tf_step(average: float, value: float, decay: float, num_updates: int | None) -> float:
    """tf.train.ExponentialMovingAverage's update, written out here independently."""
    if num_updates is not None:
        decay = min(decay, (1 + num_updates) / (10 + num_updates))
    return average - (1 - decay) * (average - value)


def test_nothing_of_the_service_is_installed() -> None:
    for module in ("app", "fastapi", "starlette", "uvicorn", "redis", "pydantic"):
        assert importlib.util.find_spec(module) is None, module
    required = importlib.metadata.requires("ema-client") or []
    assert sorted(r.split(">")[0].split("=")[0] for r in required) == ["anyio", "httpx"]
    files = importlib.metadata.files("ema-client") or []
    assert any(f.name == "py.typed" for f in files)  # type checkers read its annotations


def test_every_call(name: str) -> None:
    with Client(URL) as ema:
        created = ema.create(name, decay=0.99, initial=0)
        assert (created.name, created.value, created.count) == (name, 0.0, 0)
        expected = tf_step(0.0, 5, 0.99, 0)
        assert ema.push(name, 5, num_updates=0).value == expected
        state = ema.push_many(name, [Sample(10, num_updates=10000), 10])
        expected = tf_step(tf_step(expected, 10, 0.99, 10000), 10, 0.99, None)
        assert (state.value, state.count) == (expected, 3)
        assert ema.get(name) == state
        assert list(ema.list_streams(name)) == [name]
        ema.delete(name)
        with pytest.raises(NotFound) as missing:
            ema.get(name)
    assert missing.value.status == 404
    assert name in missing.value.detail


def test_the_async_client(name: str) -> None:
    async def calls() -> tuple[float | None, list[str]]:
        async with AsyncClient(URL) as ema:
            await ema.create(name, decay=0.5, initial=0)
            state = await ema.push_many(name, [8, 8])
            names = [n async for n in ema.list_streams(name)]
            await ema.delete(name)
            return state.value, names

    assert asyncio.run(calls()) == (tf_step(tf_step(0.0, 8, 0.5, None), 8, 0.5, None), [name])


def test_errors_say_what_is_wrong(name: str) -> None:
    with Client(URL) as ema, pytest.raises(InvalidInput) as bad:
        ema.push(name, float("nan"))
    assert bad.value.status == 422
    assert bad.value.errors
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with (
        Client(nowhere, retry=Retry(attempts=2, backoff=0.01)) as ema,
        pytest.raises(TransportError, match="cannot connect"),
    ):
        ema.get(name)


def test_subscribe(name: str) -> None:
    with Client(URL) as ema:
        ema.create(name, decay=0.5, initial=0)
        stop = threading.Event()

        def push() -> None:
            with Client(URL) as pusher:
                while not stop.wait(0.05):
                    pusher.push(name, 4)

        pusher = threading.Thread(target=push)
        pusher.start()
        try:
            with ema.subscribe(name, idle_timeout=5, max_reconnects=1) as events:
                first = next(event for event in events if isinstance(event, Update))
        finally:
            stop.set()
            pusher.join(5)
    assert first.name == name
    assert first.count >= 1


def ema(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMA_")}
    return subprocess.run(
        [str(EMA), *args],
        env=env | {"EMA_URL": URL},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_the_ema_command(name: str) -> None:
    pushed = ema("push", name, "2", "--json")
    assert pushed.returncode == 0, pushed.stderr
    assert json.loads(pushed.stdout)["value"] == 2.0
    assert json.loads(ema("get", name, "--json").stdout)["count"] == 1
    assert ema("rm", name).stdout == f"deleted {name}\n"
    serve = ema("serve")
    assert serve.returncode == 1
    assert "not installed here" in serve.stderr
