"""The things' presence in external mode (issue #15) on the 2-node cluster of tests/engine.py: the
engine's connection events (rabbitmq_event_exchange), applied by one bridge worker at a time from
the presence queue, and its reconciliations with the engine's list of connections. One process
answers the auth backend and applies no events (`presence: false`); two workers on its store do."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aio_pika
import aiomqtt
import orjson
import pytest
from cryptography import x509
from yarl import URL

from bridge.mqtt.external.presence import RECONCILE
from tests.conftest import Bridge, basic
from tests.engine import RabbitCluster, serving
from tests.helpers import (
    Account,
    ThingFiles,
    account,
    becomes,
    call,
    create_thing,
    ok,
    presence,
    token,
    unique,
    until,
)
from tests.test_external_mode import app_engine_client, closed_within

QUEUE = "thingbridge.presence-tests"
PRESENCE_QUEUE = f"{QUEUE}.presence"
# A take-over is a race of two events from two nodes: once in the suite, 20 rounds when it was made
# and whenever the presence consumer changes (THINGBRIDGE_TAKEOVER_ROUNDS=20).
ROUNDS = int(os.environ.get("THINGBRIDGE_TAKEOVER_ROUNDS", "1"))


def external(cluster: RabbitCluster, **extra: object) -> dict:
    return {**cluster.external_config(), "queue": QUEUE, **extra}


@pytest.fixture(scope="module")
def answering(rabbit_cluster: RabbitCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    """The process the engine's auth backend asks; it applies no connection events."""
    bridge = rabbit_cluster.bridge(
        tmp_path_factory.mktemp("answering"), external(rabbit_cluster, presence=False)
    )
    yield from serving(bridge)


@pytest.fixture(scope="module")
def workers(
    rabbit_cluster: RabbitCluster, answering: Bridge, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Bridge]]:
    """Two processes on the answering one's store that consume the presence queue (started side by
    side: the suite's time)."""
    started = [
        rabbit_cluster.worker(answering, tmp_path_factory.mktemp("worker"), external(rabbit_cluster))
        for _ in range(2)
    ]
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda worker: worker.start(timeout=60), started))
        yield started
    finally:
        for worker in started:
            worker.kill()


@pytest.fixture(scope="module")
def owner(answering: Bridge) -> Account:
    return account(answering)  # a thing per test: within the free plan


@pytest.fixture(scope="module")
def app(answering: Bridge, owner: Account) -> str:
    """An application of the owner's, which subscribes to presence documents through the engine."""
    name = unique("presence-app")
    answering.cli("app", "add", name, "--owner", owner.name, "--password", "app-password-1")
    return name


async def counts(workers: list[Bridge], key: str) -> list[int]:
    """Each live worker's broker stats `key` (presenceEvents: events it applied)."""
    live = [w for w in workers if w.proc is not None]
    admin = await token(live[0])
    return [ok(await call("GET", f"{w.api}/broker/stats", admin))[key] for w in live]


async def settled(workers: list[Bridge], key: str, at_least: int) -> None:
    """Until the workers' `key` counts add up to `at_least`."""

    async def enough() -> bool:
        return sum(await counts(workers, key)) >= at_least

    await until(enough, f"{key} >= {at_least}", 10)


async def listed(cluster: RabbitCluster, thing: ThingFiles) -> bool:
    """Whether the engine's list of connections shows one of the thing's."""
    ext = cluster.external_config()
    url = f"{cluster.nodes[0].management_url}/api/connections?columns=user"
    answer = await call("GET", url, headers=basic(ext["username"], ext["password"]))
    assert answer.status == 200, answer.body
    return any(c.get("user") == subject(thing) for c in answer.json)


def subject(thing: ThingFiles) -> str:
    """The thing's engine user: its certificate's subject as the engine writes it."""
    cert = x509.load_pem_x509_certificate(thing.cert.read_bytes())
    return f"SERIALNUMBER={cert.serial_number:x},CN={thing.id}"


async def test_a_thing_connected_before_any_worker_consumed_is_online_once_one_does(
    rabbit_cluster: RabbitCluster,
    answering: Bridge,
    owner: Account,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """The workers start after the thing connected (no event of its connection reaches them): the
    reconciliation of the first to consume, with the engine's list of connections, finds it."""
    thing = await create_thing(answering, owner.token, tmp_path)
    async with rabbit_cluster.nodes[1].thing_client(thing):
        assert await presence(answering, owner, thing.id) == "offline"  # never recorded
        request.getfixturevalue("workers")
        await becomes(answering, owner, thing.id, "online")


async def test_connecting_and_disconnecting_publish_online_and_offline(
    rabbit_cluster: RabbitCluster,
    answering: Bridge,
    workers: list[Bridge],
    owner: Account,
    app: str,
    tmp_path: Path,
) -> None:
    """The HTTP state and the retained presence document an application subscribed to through the
    engine (on the other node than the thing's)."""
    thing = await create_thing(answering, owner.token, tmp_path)
    async with app_engine_client(rabbit_cluster, app, "app-password-1") as subscriber:
        await subscriber.subscribe(f"things/{thing.id}/presence", qos=1)
        async with rabbit_cluster.nodes[1].thing_client(thing):
            await document(subscriber, "online")
            await becomes(answering, owner, thing.id, "online")
        await document(subscriber, "offline")
        await becomes(answering, owner, thing.id, "offline")


async def document(subscriber: aiomqtt.Client, state: str) -> None:
    """Until a presence document with `state` arrives (each node sends its copy)."""
    async with asyncio.timeout(10):
        async for message in subscriber.messages:
            if orjson.loads(message.payload)["state"] == state:
                return


async def test_a_connection_the_engine_closes_is_offline(
    rabbit_cluster: RabbitCluster, answering: Bridge, workers: list[Bridge], owner: Account, tmp_path: Path
) -> None:
    """Closed through the management API (as a revocation does): the thing did not disconnect."""
    thing = await create_thing(answering, owner.token, tmp_path)
    ext = rabbit_cluster.external_config()
    url = f"{rabbit_cluster.nodes[0].management_url}/api/connections/username/{urllib.parse.quote(subject(thing), safe='')}"
    async with rabbit_cluster.nodes[0].thing_client(thing) as client:
        await becomes(answering, owner, thing.id, "online")
        closing = await call("DELETE", url, headers=basic(ext["username"], ext["password"]))
        assert closing.status == 204, closing.body
        await closed_within(client, 5)
    await becomes(answering, owner, thing.id, "offline")


async def test_a_take_over_on_the_other_node_ends_online(
    rabbit_cluster: RabbitCluster, answering: Bridge, workers: list[Bridge], owner: Account, tmp_path: Path
) -> None:
    """The same client id connects on the other node: the engine closes the first connection after
    it created the second; the thing stays online (20 rounds: THINGBRIDGE_TAKEOVER_ROUNDS)."""
    thing = await create_thing(answering, owner.token, tmp_path)
    first_node, second_node = rabbit_cluster.nodes
    for _ in range(ROUNDS):
        before = sum(await counts(workers, "presenceEvents"))
        async with contextlib.AsyncExitStack() as stack:
            first = await stack.enter_async_context(first_node.thing_client(thing))
            await settled(workers, "presenceEvents", before + 1)
            await becomes(answering, owner, thing.id, "online")
            async with second_node.thing_client(thing):
                await closed_within(first, 5)
                stack.pop_all()  # the engine closed it: nothing to disconnect
                await settled(workers, "presenceEvents", before + 3)  # created, created, closed
                assert await presence(answering, owner, thing.id) == "online"
        await becomes(answering, owner, thing.id, "offline")


async def test_a_reconciliation_racing_with_events_leaves_the_right_state(
    rabbit_cluster: RabbitCluster, answering: Bridge, workers: list[Bridge], owner: Account, tmp_path: Path
) -> None:
    """A reconciliation requested right after a connect or a disconnect: the engine's list of
    connections does not show the new connection yet, or still shows the closed one (it lags), and
    neither must change the state the events set."""
    thing = await create_thing(answering, owner.token, tmp_path)
    for _ in range(3):
        events = sum(await counts(workers, "presenceEvents"))
        async with rabbit_cluster.nodes[1].thing_client(thing):
            await settled(workers, "presenceEvents", events + 1)
            assert await presence(answering, owner, thing.id) == "online"
            await reconcile_now(rabbit_cluster, workers)
            assert await presence(answering, owner, thing.id) == "online"
        # the closed event is applied (counted) only if the reconciliation kept the connection
        await settled(workers, "presenceEvents", events + 2)
        assert await presence(answering, owner, thing.id) == "offline"
        await reconcile_now(rabbit_cluster, workers)
        assert await presence(answering, owner, thing.id) == "offline"


async def reconcile_now(cluster: RabbitCluster, workers: list[Bridge]) -> None:
    """Ask for a reconciliation as a starting worker does, and wait until one was made."""
    before = sum(await counts(workers, "presenceReconciliations"))
    ext = cluster.external_config()
    url = URL(cluster.nodes[0].amqp_url).with_user(ext["username"]).with_password(ext["password"])
    async with await aio_pika.connect(url) as engine:
        message = aio_pika.Message(b"", type=RECONCILE, user_id=ext["username"])
        await (await engine.channel()).default_exchange.publish(message, routing_key=PRESENCE_QUEUE)
    await settled(workers, "presenceReconciliations", before + 1)


async def test_each_worker_asks_for_a_reconciliation_every_reconcile_every_seconds(
    rabbit_cluster: RabbitCluster, answering: Bridge, workers: list[Bridge], owner: Account, tmp_path: Path
) -> None:
    """A state the events left wrong (written wrong behind the workers' backs, as an event the full
    queue dropped would leave it) is corrected by a reconciliation, and a worker with
    `reconcile_every: 1` asks for one every second: without it, a start asks for one, each
    request brings a second one list_lag (6 s) later, and nothing more comes."""
    thing = await create_thing(answering, owner.token, tmp_path / "thing")
    async with rabbit_cluster.nodes[0].thing_client(thing):
        await becomes(answering, owner, thing.id, "online")
        await until(lambda: listed(rabbit_cluster, thing), "the connection in the engine's list")
        (tmp_path / "asker").mkdir()
        asker = rabbit_cluster.worker(
            answering, tmp_path / "asker", external(rabbit_cluster, reconcile_every=1)
        )
        asker.start(timeout=60)
        try:
            with contextlib.closing(sqlite3.connect(answering.db_path, isolation_level=None)) as db:
                db.execute("UPDATE presence SET state = 'offline' WHERE thing_id = ?", (thing.id,))
            assert await presence(answering, owner, thing.id) == "offline"
            await becomes(answering, owner, thing.id, "online")
            # then one a second: more than the start's two and the few earlier requests left
            made = sum(await counts([*workers, asker], "presenceReconciliations"))
            await until(lambda: _reconciled(workers, asker, made + 6), "six more reconciliations", 8)
        finally:
            asker.kill()


async def _reconciled(workers: list[Bridge], asker: Bridge, at_least: int) -> bool:
    return sum(await counts([*workers, asker], "presenceReconciliations")) >= at_least


async def test_a_worker_killed_hands_the_events_to_the_other(
    rabbit_cluster: RabbitCluster, answering: Bridge, workers: list[Bridge], owner: Account, tmp_path: Path
) -> None:
    """kill -9 of the worker applying the events while a thing is connected: the other takes the
    queue over, reconciles before its first event (another thing's connect), so it knows the
    thing's connection from the engine's list, and applies its disconnect. (A worker that takes
    over with a closed event whose connection the list no longer shows leaves the thing online
    until its second reconciliation, list_lag seconds later: README.)"""
    thing = await create_thing(answering, owner.token, tmp_path / "thing")
    other = await create_thing(answering, owner.token, tmp_path / "other")
    before = await counts(workers, "presenceEvents")
    async with rabbit_cluster.nodes[0].thing_client(thing):
        await becomes(answering, owner, thing.id, "online")
        await settled(workers, "presenceEvents", sum(before) + 1)
        await until(lambda: listed(rabbit_cluster, thing), "the connection in the engine's list")
        after = await counts(workers, "presenceEvents")
        (active,) = [w for w, b, a in zip(workers, before, after, strict=True) if a > b]
        active.kill()
        async with rabbit_cluster.nodes[1].thing_client(other):
            await becomes(answering, owner, other.id, "online")
    await becomes(answering, owner, other.id, "offline")
    await becomes(answering, owner, thing.id, "offline")
