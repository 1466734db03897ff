"""The HTTP API's resources, statuses and bodies."""

import math
import re
import struct

import httpx
import pytest
import redis

from tests.redis_server import RedisServer
from tests.reference import ReferenceEma
from tests.utils import SINGLE_AND_CLUSTER, make_settings, serve

# Every test runs on a single Redis and on a Redis Cluster.
pytestmark = [pytest.mark.anyio, SINGLE_AND_CLUSTER]


async def test_put_creates_then_replaces_and_resets(client: httpx.AsyncClient) -> None:
    created = await client.put("/v1/streams/cpu", json={"decay": 0.9, "initial": 1.0})
    assert created.status_code == 201
    assert (
        created.json()["config"].items()
        >= {
            "decay": 0.9,
            "halflife": None,
            "initial": 1.0,
            "auto_num_updates": False,
            "history": 0,
        }.items()
    )
    await client.post("/v1/streams/cpu/values", json={"value": 100.0})
    replaced = await client.put("/v1/streams/cpu", json={"decay": 0.5})
    assert replaced.status_code == 200
    state = replaced.json()
    assert (state["value"], state["count"], state["config"]["initial"]) == (None, 0, None)


async def test_a_batch_applies_as_its_values_pushed_one_by_one(client: httpx.AsyncClient) -> None:
    # A batch's arguments are built by column (codec.numbers), a single push's one by one.
    values = [5e-324, -0.0, 1e150, -2.5e149, 0.1, 1 / 3, 2**53 + 1.0, 1e16, 1e-7, 123.456]
    steps = [None, 3, None, 10_000, None, None, 7, None, None, 1]
    samples = [
        {"value": v} if n is None else {"value": v, "num_updates": n}
        for v, n in zip(values, steps, strict=True)
    ]
    reference = ReferenceEma(0.99, 0.0)
    for name in ("batch", "single"):
        await client.put(f"/v1/streams/{name}", json={"decay": 0.99, "initial": 0})
    batch = (await client.post("/v1/streams/batch/values", json={"values": samples})).json()
    for sample in samples:
        single = (await client.post("/v1/streams/single/values", json=sample)).json()
        reference.push(sample["value"], sample.get("num_updates"))
    same = ("value", "debiased", "count", "last", "decay_used", "variance", "std", "z")
    assert {k: batch[k] for k in same} == {k: single[k] for k in same}
    assert (batch["value"], batch["last"]) == (reference.shadow, 123.456)


async def test_put_accepts_curl_default_form_content_type(client: httpx.AsyncClient) -> None:
    # `curl -d '{...}'` labels the body application/x-www-form-urlencoded.
    headers = {"content-type": "application/x-www-form-urlencoded"}
    put = await client.put("/v1/streams/c", content=b'{"decay": 0.5}', headers=headers)
    assert put.status_code == 201
    push = await client.post("/v1/streams/c/values", content=b'{"value": 2}', headers=headers)
    assert push.json()["value"] == 2.0


async def test_any_declared_content_type_is_read_as_json(client: httpx.AsyncClient) -> None:
    # The fast path and the framework route alike (the client fixture runs both).
    for content_type in ("text/plain", "application/octet-stream", "multipart/form-data; b=x"):
        headers = {"content-type": content_type}
        push = await client.post("/v1/streams/t/values", content=b'{"value": 2}', headers=headers)
        assert push.status_code == 200, push.text
        assert push.json()["last"] == 2.0
        bad = await client.post("/v1/streams/t/values", content=b"value=2", headers=headers)
        assert bad.status_code == 422
        assert bad.headers["content-type"] == "application/problem+json"
    assert (await client.get("/v1/streams/t")).json()["count"] == 3


async def test_fast_path_and_framework_answer_byte_for_byte_alike(
    redis_server: RedisServer, redis_client: "redis.Redis"
) -> None:
    configs = {
        "d": {"decay": 0.9, "initial": 1.0, "history": 5},
        "w": {
            "halflife": 10,
            "windows": [{"name": "1m", "halflife": 60}, {"name": "x", "decay": 0.5}],
        },
        "r": {"halflife": 60, "kind": "rate"},
    }
    # Timestamped samples, decades old: a rate pushed so is 0 whenever it is read.
    pushes = [
        {"value": 1.5, "timestamp": 1e9},
        {"values": [{"value": 2.0, "timestamp": 1e9 + 1}, {"value": 3.0, "timestamp": 1e9 + 2}]},
    ]
    answers: dict[bool, list[tuple[int, bytes, str | None]]] = {}
    for fast_path in (True, False):
        redis_client.flushall()
        answers[fast_path] = seen = []
        async for client in serve(make_settings(redis_server.url, fast_path=fast_path)):
            for name, config in configs.items():
                await client.put(f"/v1/streams/{name}", json=config)
                for body in pushes:
                    pushed = await client.post(f"/v1/streams/{name}/values", json=body)
                    seen.append((pushed.status_code, _timeless(pushed.content), None))
                read = await client.get(f"/v1/streams/{name}")
                assert read.headers["content-type"] == "application/json"
                # A rate is reported as of the time of the read: compare its shape only.
                content = read.content if name != "r" else repr(read.json().keys()).encode()
                seen.append((read.status_code, _timeless(content), None))
            missing = await client.get("/v1/streams/nope")
            seen.append((missing.status_code, missing.content, missing.headers["content-type"]))
            replayed = [
                await client.post(
                    "/v1/streams/d/values", json={"value": 4.0, "timestamp": 1e9 + 3}, headers=key
                )
                for key in ({"idempotency-key": "k1"},) * 2
            ]
            seen += [
                (r.status_code, _timeless(r.content), r.headers.get("idempotent-replayed"))
                for r in replayed
            ]
    assert len(answers[True]) == 12
    assert answers[True][-1][2] == "true"
    assert answers[True] == answers[False]


def _timeless(body: bytes) -> bytes:
    """A reply with its server time (updated_at) blanked out."""
    return re.sub(rb'"updated_at":[^,]*', b'"updated_at":"..."', body)


async def test_get_and_delete_unknown_stream_are_404_problems(client: httpx.AsyncClient) -> None:
    for response in [await client.get("/v1/streams/nope"), await client.delete("/v1/streams/nope")]:
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["status"] == 404
        assert problem["title"] == "Not Found"
        assert "nope" in problem["detail"]
        assert problem["instance"] == "/v1/streams/nope"


async def test_delete_removes_the_stream(
    client: httpx.AsyncClient, redis_client: "redis.Redis"
) -> None:
    await client.post("/v1/streams/gone/values", json={"value": 1})
    assert redis_client.exists("test:{gone}")
    assert (await client.delete("/v1/streams/gone")).status_code == 204
    assert not redis_client.exists("test:{gone}")
    assert (await client.get("/v1/streams/gone")).status_code == 404


async def test_push_creates_missing_stream_with_server_defaults(
    redis_server: RedisServer, redis_client: "redis.Redis"
) -> None:
    settings = make_settings(redis_server.url, default_decay=0.5, default_initial=10.0)
    async for client in serve(settings):
        state = (await client.post("/v1/streams/new/values", json={"value": 20})).json()
        assert (
            state["config"].items()
            >= {
                "decay": 0.5,
                "initial": 10.0,
                "auto_num_updates": False,
                "history": 0,
            }.items()
        )
        assert state["value"] == 15.0


async def test_push_to_missing_stream_is_404_when_auto_create_is_off(
    redis_server: RedisServer, redis_client: "redis.Redis"
) -> None:
    for fast_path in (True, False):
        settings = make_settings(redis_server.url, auto_create=False, fast_path=fast_path)
        async for client in serve(settings):
            response = await client.post("/v1/streams/new/values", json={"value": 20})
            assert response.status_code == 404
            assert response.headers["content-type"] == "application/problem+json"
    assert redis_client.keys("*") == []


async def test_stream_state_is_stored_under_the_documented_key(
    client: httpx.AsyncClient, redis_client: "redis.Redis"
) -> None:
    await client.put("/v1/streams/a.b:c-d_e", json={"decay": 0.25, "initial": 3})
    await client.post("/v1/streams/a.b:c-d_e/values", json={"value": 7, "num_updates": 1})
    stored = redis_client.hgetall("test:{a.b:c-d_e}")
    assert float(stored["d"]) == 0.25
    assert float(stored["i"]) == 3.0
    assert stored["n"] == "1"
    # s, s1 pack b, p, q, w, z, v, t, l, then u, E and m (u and m differ from their defaults,
    # the decay and v), 64 bytes a field at most, as push.lua documents
    assert sorted(stored) == ["d", "i", "n", "s", "s1"]
    data = (stored["s"] + stored["s1"]).encode("utf-8", "surrogateescape")
    biased, product, spread, weight, z, shadow, t, last, used, epoch, mean = struct.unpack(
        "<11d", data
    )
    assert (last, used, product, mean, epoch) == (7.0, 2 / 11, 2 / 11, 7.0, t)
    assert shadow == 3.0 - (1 - 2 / 11) * (3.0 - 7.0)
    assert biased == 7.0 * (1 - 2 / 11)
    assert (spread, weight, math.isnan(z)) == (0.0, 0.0, True)
    assert redis_client.keys("*") == ["test:{a.b:c-d_e}"]


async def test_listing_pages_through_every_stream_once(
    client: httpx.AsyncClient, redis_client: "redis.Redis"
) -> None:
    names = {f"m.{i:04}" for i in range(1234)} | {"other"}
    with redis_client.pipeline() as pipe:
        for name in names:
            pipe.hset(
                f"test:{{{name}}}", mapping={"d": "0.5", "a": "0", "n": "0", "b": "0", "p": "1"}
            )
        pipe.set("test:{m.0001}:side", "not a stream")
        pipe.set("unrelated:{m.x}", "not ours")
        pipe.execute()
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"prefix": "m.", "limit": 100} | ({"cursor": cursor} if cursor else {})
        page = (await client.get("/v1/streams", params=params)).json()
        assert len(page["streams"]) <= 100
        seen += page["streams"]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(name for name in names if name.startswith("m."))
    assert pages >= 13


async def test_listing_resumed_after_redis_grew_its_table_returns_no_name_twice(
    client: httpx.AsyncClient, redis_server: RedisServer, redis_client: "redis.Redis"
) -> None:
    # SCAN reads whole hash buckets, and while Redis rehashes a table that grew, bigger ones
    # (a bucket of the old table with the new table's buckets it maps to): reading a batch
    # again after the rehash can end somewhere else. Pages are listed while the table is
    # being rehashed, then every listing is finished after it, from each page's cursor.
    # Redis rehashes on a timer (stopped here) and a bucket per key lookup (done here).
    nodes = [node.client() for node in getattr(redis_server, "nodes", [redis_server])]
    for node in nodes:
        node.config_set("activerehashing", "no")
    try:
        for round_ in range(6 if len(nodes) == 1 else 3):  # other names, other buckets
            redis_client.flushall()
            # Each node's table grows from 1024 buckets to 2048 at its 1025th key.
            names = sorted(f"g{round_}.{i:05}" for i in range(1234 * len(nodes)))
            with redis_client.pipeline() as pipe:
                for name in names:  # the last ~20% are added while it is being rehashed
                    pipe.hset(f"test:{{{name}}}", mapping={"d": "0.5", "n": "0", "p": "1"})
                pipe.execute()
            listings: list[tuple[int, list[str], str]] = []  # (limit, names so far, cursor)
            for limit in (100, 45):
                seen: list[str] = []
                cursor = None
                while True:
                    params = {"prefix": f"g{round_}.", "limit": limit}
                    page = (
                        await client.get("/v1/streams", params=params | cursor_of(cursor))
                    ).json()
                    seen += page["streams"]
                    cursor = page["next_cursor"]
                    if cursor is None:
                        break
                    listings.append((limit, list(seen), cursor))
                assert sorted(seen) == names
            tables = sum(table_bytes(node) for node in nodes)
            with redis_client.pipeline() as pipe:
                for name in names * 3:
                    pipe.exists(f"test:{{{name}}}")
                pipe.execute()
            assert sum(table_bytes(node) for node in nodes) < tables  # old tables freed
            for limit, seen, cursor in listings:
                for _ in range(6):  # the pages the rest of a split batch can come in
                    params = {"prefix": f"g{round_}.", "limit": limit, "cursor": cursor}
                    page = (await client.get("/v1/streams", params=params)).json()
                    assert len(page["streams"]) <= limit
                    seen += page["streams"]
                    cursor = page["next_cursor"]
                    if cursor is None:
                        assert sorted(seen) == names
                        break
                assert len(set(seen)) == len(seen)
    finally:
        for node in nodes:
            node.config_set("activerehashing", "yes")
            node.close()


def cursor_of(cursor: str | None) -> dict[str, str]:
    return {"cursor": cursor} if cursor else {}


def table_bytes(node: "redis.Redis") -> int:
    """What the node's hash tables of keys take: both tables while it rehashes one."""
    return int(node.memory_stats()["db.0"]["overhead.hashtable.main"])


async def test_listing_with_states_is_an_overview_in_one_request(
    client: httpx.AsyncClient, redis_client: "redis.Redis"
) -> None:
    await client.put("/v1/streams/ov.mean", json={"decay": 0.5, "initial": 0})
    await client.put("/v1/streams/ov.rate", json={"halflife": 60, "kind": "rate"})
    await client.put("/v1/streams/ov.none", json={"decay": 0.9})
    for name, value in (("ov.mean", 4.0), ("ov.rate", 30.0)):
        await client.post(f"/v1/streams/{name}/values", json={"value": value})
    plain = (await client.get("/v1/streams", params={"prefix": "ov."})).json()
    assert plain["states"] is None
    assert plain["time"] is None
    page = (await client.get("/v1/streams", params={"prefix": "ov.", "states": "true"})).json()
    assert page["next_cursor"] is None
    by_name = {state["name"]: state for state in page["states"]}
    assert [state["name"] for state in page["states"]] == page["streams"]
    assert set(by_name) == {"ov.mean", "ov.rate", "ov.none"}
    # Each state is what GET gives (a rate: as of the page's time, which GET's follows).
    assert by_name["ov.mean"] == (await client.get("/v1/streams/ov.mean")).json()
    assert by_name["ov.mean"]["value"] == 2.0
    assert by_name["ov.none"]["count"] == 0
    rate = by_name["ov.rate"]
    assert rate["config"]["kind"] == "rate"
    assert page["time"] >= rate["updated_at"]
    elapsed = page["time"] - rate["timestamp"]
    assert rate["value"] == pytest.approx(30 * math.log(2) / 60 * 2 ** (-elapsed / 60), rel=1e-12)
    later = (await client.get("/v1/streams/ov.rate")).json()
    assert later["value"] <= rate["value"]
    empty = (await client.get("/v1/streams", params={"prefix": "zz", "states": "true"})).json()
    assert empty["streams"] == empty["states"] == []
    assert isinstance(empty["time"], float)


@pytest.mark.parametrize(
    "params", [{"cursor": "garbage!"}, {"limit": 0}, {"limit": 1001}, {"prefix": "a*"}]
)
async def test_listing_rejects_bad_parameters(
    client: httpx.AsyncClient, params: dict[str, object]
) -> None:
    response = await client.get("/v1/streams", params=params)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"


async def test_health_probes(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"status": "ready"}


async def test_unknown_route_and_method_are_problems(client: httpx.AsyncClient) -> None:
    missing = await client.get("/v2/nothing")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    wrong = await client.patch("/v1/streams/cpu")
    assert wrong.status_code == 405
    assert wrong.json()["status"] == 405


async def test_openapi_documents_every_field_with_an_example(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    assert "/v1/streams/{name}/values" in schema["paths"]
    push = schema["paths"]["/v1/streams/{name}/values"]["post"]
    assert "requestBody" in push
    for model in ("StreamConfig", "Sample", "Push", "StreamState", "StreamPage"):
        for field, spec in schema["components"]["schemas"][model]["properties"].items():
            assert spec.get("description"), (model, field)
            if "$ref" not in spec:
                assert spec.get("examples"), (model, field)
    assert (await client.get("/docs")).status_code == 200
