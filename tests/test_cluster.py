"""The service on a real local Redis Cluster: bulk ingest over every hash slot, subscribers, and
a primary lost (killed, or failed over by hand) while pushes go on, after which the service
recovers by itself with every acknowledged push in place.

The foundation's semantic, API, validation and concurrency tests also run against a cluster,
unchanged (their modules' `pytestmark`, tests.utils.SINGLE_AND_CLUSTER)."""

import asyncio
import hashlib
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio.connection
from redis.crc import key_slot

from app.events import Lagged
from app.scripts import load_source
from tests.redis_server import RedisCluster
from tests.service import ServiceProcess
from tests.utils import make_settings, running, subscribe

pytestmark = pytest.mark.anyio

PUSH_SHA = hashlib.sha1(load_source("push").encode()).hexdigest()


@pytest.fixture
def cluster(redis_cluster: RedisCluster) -> RedisCluster:
    """The session's cluster (three primaries), emptied."""
    with redis_cluster.client() as client:
        client.flushall()
        client.script_flush()
    return redis_cluster


def names_in_every_slot() -> list[str]:
    """One stream name per hash slot, 16384 in all."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < 16384:
        name = f"s{i}"
        found.setdefault(key_slot(name.encode()), name)
        i += 1
    return [found[slot] for slot in range(16384)]


async def test_bulk_ingest_over_every_hash_slot(cluster: RedisCluster) -> None:
    names = names_in_every_slot()
    entries: list[object] = [{"stream": name, "values": [1.0, 2.0]} for name in names]
    bad = {0: {"stream": "bad{", "value": 1}, 5000: {"stream": names[3], "value": "x"}}
    for index, entry in sorted(bad.items()):
        entries.insert(index, entry)
    # A node runs its ~5,500 scripts back to back: on a loaded machine, longer than the
    # default Redis timeout (its pushes would get 503s). Routing is tested here, not timeouts.
    settings = make_settings(
        cluster.url, max_batch=40_000, max_body_bytes=4 << 20, redis_timeout=30
    )
    async with running(settings) as (_, http):
        response = await http.post("/v1/values", json={"entries": entries}, timeout=60)
        assert response.status_code == 200
        reply = response.json()
    assert reply["applied"] == len(names)
    assert reply["failed"] == len(bad)
    results = reply["results"]
    assert [r["index"] for r in results] == list(range(len(entries)))
    assert {i for i, r in enumerate(results) if r["status"] != 200} == set(bad)
    assert all(r["state"]["count"] == 2 for r in results if r["status"] == 200)
    with cluster.client() as client:
        # Every primary got its share, and every stream is where the cluster says it belongs.
        sizes = [client.dbsize(target_nodes=node) for node in client.get_primaries()]
        assert sizes == pytest.approx([16384 / 3] * 3, rel=0.05)
        assert sum(sizes) == 16384
        pipe = client.pipeline()
        for name in names:
            pipe.hget(f"test:{{{name}}}", "n")
        assert pipe.execute() == ["2"] * len(names)


async def test_listing_walks_every_primary_page_by_page(cluster: RedisCluster) -> None:
    names = {f"n{i}" for i in range(600)}
    async with running(make_settings(cluster.url)) as (_, http):
        reply = await http.post(
            "/v1/values", json={"entries": [{"stream": n, "value": 1} for n in names]}
        )
        assert reply.json()["applied"] == 600
        seen: list[str] = []
        cursor = None
        while True:
            params = {"limit": 50} | ({"cursor": cursor} if cursor else {})
            page = (await http.get("/v1/streams", params=params)).json()
            seen += page["streams"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert Counter(seen) == Counter(names)
        for garbage in ("OTk5OTk6MC8", "YTow"):  # "99999:0/", "a:0"
            response = await http.get("/v1/streams", params={"cursor": garbage})
            assert response.status_code == 422


def test_a_subscriber_sees_updates_applied_on_every_primary(
    cluster: RedisCluster, tmp_path: Path
) -> None:
    # Streams on each of the three primaries: the service's one Pub/Sub connection, to one
    # node, hears the push script's PUBLISH on every node.
    by_node: dict[int, str] = {}
    i = 0
    while len(by_node) < 3:
        name = f"w{i}"
        by_node.setdefault(cluster.node_of(f"test:{{{name}}}").port, name)
        i += 1
    names = sorted(by_node.values())
    env = {"REDIS_URL": cluster.url, "REDIS_CLUSTER": "true", "EMA_KEY_PREFIX": "test:"}
    service = ServiceProcess(tmp_path, **env, EMA_WORKERS="1")
    try:
        with subscribe(f"{service.url}/v1/events?prefix=w") as events:
            for name in names:
                pushed = httpx.post(f"{service.url}/v1/streams/{name}/values", json={"value": 2})
                assert pushed.status_code == 200
            got = [events.next() for _ in names]
    finally:
        service.kill()
    assert sorted(data["name"] for _, _, data in got) == names
    assert {kind for kind, _, _ in got} == {"update"}


async def test_a_slot_migration_neither_loses_nor_repeats_a_push(cluster: RedisCluster) -> None:
    """While a slot migrates, a new stream in it lives on the target (the source answers ASK);
    once it has moved, the source answers MOVED. Both redirections mean the command did not
    run. redis-py 8.1's asyncio cluster client may send ASKING and the command itself on two
    different pooled connections (so the target answers MOVED back, until the redirection
    budget is spent): such a push gets a 503, and must not have been applied."""
    name = "migrating"
    key = f"test:{{{name}}}"
    slot = key_slot(name.encode())
    source = cluster.node_of(key)
    target = next(node for node in cluster.primaries() if node is not source)
    ids = {}
    for node in (source, target):
        with node.client() as client:
            ids[node.port] = client.execute_command("CLUSTER MYID")
    applied = 0
    async with running(make_settings(cluster.url)) as (_, http):

        async def push_both_ways(must_apply: bool) -> None:
            nonlocal applied
            single = await http.post(f"/v1/streams/{name}/values", json={"value": 1.0})
            bulk = await http.post("/v1/values", json={"entries": [{"stream": name, "value": 1}]})
            statuses = [single.status_code, bulk.json()["results"][0]["status"]]
            assert set(statuses) <= ({200} if must_apply else {200, 503}), (single.text, bulk.text)
            applied += statuses.count(200)

        with target.client() as client:
            client.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source.port])
        with source.client() as client:
            client.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target.port])
        for _ in range(5):
            await push_both_ways(must_apply=False)  # ASK
        for node in cluster.primaries():
            with node.client() as client:
                client.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[target.port])
        await push_both_ways(must_apply=True)  # MOVED
        state = (await http.get(f"/v1/streams/{name}")).json()
    assert state["count"] == applied
    with target.client() as client:
        assert client.hget(key, "n") == str(applied)
        client.delete(key)
    for node in cluster.primaries():  # give the slot back, empty
        with node.client() as client:
            client.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[source.port])
    cluster.wait_healthy()


@pytest.fixture
def partial(tmp_path: Path) -> Iterator[RedisCluster]:
    """Three primaries that keep serving their slots while another is down."""
    cluster = RedisCluster(tmp_path / "partial", extra=("--cluster-require-full-coverage", "no"))
    yield cluster.start()
    cluster.stop()


async def test_a_dead_primary_fails_only_its_own_entries(partial: RedisCluster) -> None:
    names = spread_names(partial, per_primary=3)
    dead = partial.node_of(f"test:{{{names[0]}}}")
    lost = {name for name in names if partial.node_of(f"test:{{{name}}}") is dead}
    alive = sorted(set(names) - lost)
    settings = make_settings(partial.url, redis_cluster=True, redis_timeout=0.5)
    async with running(settings) as (_, http):
        entries = [{"stream": name, "value": 1.0} for name in names]
        assert (await http.post("/v1/values", json={"entries": entries})).json()["applied"] == 9
        dead.kill()
        for count in (2, 3):  # on the pooled connections, then with the topology read again
            reply = (await http.post("/v1/values", json={"entries": entries})).json()
            assert {r["stream"] for r in reply["results"] if r["status"] == 503} == lost
            assert reply["applied"] == len(alive)
            assert {r["state"]["count"] for r in reply["results"] if r["state"]} == {count}
        # The cluster still serves the slots it can: the service stays ready.
        deadline = time.monotonic() + 10
        while (await http.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, "never ready again"
            await asyncio.sleep(0.2)
    with partial.client() as client:
        assert [client.hget(f"test:{{{name}}}", "n") for name in alive] == ["3"] * len(alive)


async def test_a_connection_closed_under_a_request_is_a_503(
    single_redis_server: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CLUSTERDOWN (during a failover) redis-py's cluster client closes every connection, also
    those other requests are using: they fail inside redis-py with an AttributeError (seen in
    the failover test). That is Redis being unavailable, a 503, never a 500."""
    url = single_redis_server.url  # type: ignore[attr-defined]
    async with running(make_settings(url)) as (_, http):
        assert (await http.post("/v1/streams/s/values", json={"value": 1})).status_code == 200
        # A failing send, as redis-py's own code (its file), like the race it stands for.
        source = (
            "async def send(self, command):\n    writer = None\n    writer.writelines(command)\n"
        )
        namespace: dict[str, object] = {}
        exec(compile(source, redis.asyncio.connection.__file__, "exec"), namespace)
        monkeypatch.setattr(
            redis.asyncio.connection.AbstractConnection, "_send_packed_command", namespace["send"]
        )
        for response in (
            await http.post("/v1/streams/s/values", json={"value": 1}),
            await http.get("/v1/streams/s"),
        ):
            assert response.status_code == 503, response.text
            assert "AttributeError" in response.json()["detail"]
        bulk = await http.post("/v1/values", json={"entries": [{"stream": "s", "value": 1}]})
        assert bulk.json()["results"][0]["status"] == 503
        monkeypatch.undo()
        assert (await http.get("/v1/streams/s")).status_code == 200


# --- failover ---------------------------------------------------------------------------------


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[RedisCluster]:
    """Three primaries with a replica each; a node that misses its peers for 1s is failing."""
    cluster = RedisCluster(tmp_path / "cluster", primaries=3, replicas=1).start()
    yield cluster
    cluster.stop()


class Load:
    """Pushes to every stream as fast as it can, one value at a time and in bulk, and records
    what was acknowledged (every count a 200 reported) and what may or may not have been
    applied (503s)."""

    def __init__(self, http: httpx.AsyncClient, names: list[str]) -> None:
        self.http = http
        self.names = names
        self.acked: dict[str, list[int]] = defaultdict(list)
        self.unknown: Counter[str] = Counter()
        self.last_ack: dict[str, float] = {}
        self.stopping = asyncio.Event()

    def ack(self, name: str, count: int) -> None:
        self.acked[name].append(count)
        self.last_ack[name] = time.monotonic()

    async def single(self, name: str) -> None:
        while not self.stopping.is_set():
            response = await self.http.post(f"/v1/streams/{name}/values", json={"value": 1.0})
            if response.status_code == 200:
                self.ack(name, response.json()["count"])
            else:
                assert response.status_code == 503, response.text
                self.unknown[name] += 1
                await asyncio.sleep(0.02)

    async def bulk(self) -> None:
        while not self.stopping.is_set():
            entries = [{"stream": name, "value": 1.0} for name in self.names]
            response = await self.http.post("/v1/values", json={"entries": entries})
            if response.status_code != 200:
                assert response.status_code == 503, response.text
                for name in self.names:
                    self.unknown[name] += 1  # nothing was sent, but count it as unknown
                await asyncio.sleep(0.02)
                continue
            for result in response.json()["results"]:
                if result["status"] == 200:
                    self.ack(result["stream"], result["state"]["count"])
                else:
                    assert result["status"] == 503, result
                    self.unknown[result["stream"]] += 1
            await asyncio.sleep(0)

    async def run_until(self, done: asyncio.Event) -> None:
        tasks = [asyncio.create_task(self.single(name)) for name in self.names]
        tasks.append(asyncio.create_task(self.bulk()))
        await done.wait()
        self.stopping.set()
        await asyncio.gather(*tasks)

    def check(self, cluster: RedisCluster) -> None:
        """Every acknowledged push is in Redis, each exactly once."""
        with cluster.client() as client:
            for name in self.names:
                counts = self.acked[name]
                final = int(client.hget(f"test:{{{name}}}", "n") or 0)
                assert len(set(counts)) == len(counts), f"{name}: two pushes saw one count"
                assert max(counts) <= final, f"{name}: an acknowledged push is missing"
                assert len(counts) <= final <= len(counts) + self.unknown[name], name


def spread_names(cluster: RedisCluster, per_primary: int = 2) -> list[str]:
    by_port: dict[int, list[str]] = defaultdict(list)
    i = 0
    while min((len(v) for v in by_port.values()), default=0) < per_primary or len(by_port) < 3:
        name = f"f{i}"
        by_port[cluster.node_of(f"test:{{{name}}}").port].append(name)
        i += 1
    return sorted(name for names in by_port.values() for name in names[:per_primary])


@pytest.mark.parametrize("how", ["kill", "cluster-failover"])
async def test_a_primary_lost_under_load_and_the_service_recovers_by_itself(
    replicated: RedisCluster, how: str
) -> None:
    names = spread_names(replicated)
    victim = replicated.node_of(f"test:{{{names[0]}}}")
    replica = replicated.replica_of(victim)
    settings = make_settings(replicated.url, redis_cluster=True, redis_timeout=0.5)
    async with running(settings) as (app, http):
        # Scripts are replicated as their effects: the replica has never seen push.lua.
        with replica.client() as client:
            assert client.script_exists(PUSH_SHA) == [False]
        load = Load(http, names)
        done = asyncio.Event()
        running_load = asyncio.create_task(load.run_until(done))
        async with app.state.hub.subscribe(name=names[0]) as subscription:
            await asyncio.wait_for(subscription.ready.wait(), 5)
            await asyncio.sleep(1)
            assert all(load.acked[name] for name in names), (
                {n: len(v) for n, v in load.acked.items()},
                names,
                load.unknown,
            )

            lost_at = time.monotonic()
            if how == "kill":
                victim.kill()
            else:
                with replica.client() as client:
                    client.execute_command("CLUSTER FAILOVER")
            await asyncio.to_thread(wait_promoted, replicated, replica)

            # Recovered by itself: every stream, the victim's included, takes pushes again.
            deadline = time.monotonic() + 30
            while not all(load.last_ack.get(name, 0) > lost_at + 0.5 for name in names):
                assert time.monotonic() < deadline, f"no recovery: {load.last_ack}"
                await asyncio.sleep(0.1)
            recovered_at = time.monotonic()
            # ... and the subscriber hears about it again, if it lost the node it listened on.
            while True:
                update = await asyncio.wait_for(subscription.updates.get(), 10)
                assert update is not None
                if not isinstance(update, Lagged) and time.monotonic() > recovered_at:
                    break
        done.set()
        await running_load
        assert (await http.get("/readyz")).status_code == 200
    load.check(replicated)
    if how == "cluster-failover":
        # A manual failover waits until the replica has everything: nothing was in doubt.
        assert sum(load.unknown.values()) == 0
    # The new primary got the script when the service met its NOSCRIPT.
    with replica.client() as client:
        assert client.script_exists(PUSH_SHA) == [True]


def wait_promoted(cluster: RedisCluster, replica: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while cluster.role(replica) != "master":  # type: ignore[arg-type]
        assert time.monotonic() < deadline, "the replica was not promoted"
        time.sleep(0.05)
