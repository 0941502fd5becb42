"""The device walk of issue #15's "done when", in one run: a bridge with `store.url: postgresql://...`
and `mqtt.mode: external` on a 2-node RabbitMQ cluster (tests/engine.py), every device flow through
the engine and every record in PostgreSQL. A thing registered over HTTP connects to an engine node
with its own certificate; its collect is stored, its status answered with its config, its owner's
message delivered, its upgrade check answered from the owner's catalog and its result recorded;
the other node serves the retained config too; an application of the owner hears the thing;
deleting the thing closes its connection and keeps it out."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import aio_pika
import aio_pika.abc
import aiomqtt
import aiormq.exceptions
import orjson
import pytest

from tests.conftest import Bridge
from tests.engine import RabbitCluster, serving
from tests.helpers import (
    Account,
    account,
    becomes,
    call,
    certified_device,
    create_thing,
    firmware_product,
    next_message,
    ok,
    unique,
    until,
)

APP_PASSWORD = "app-password-1"
RESWEEP = 2  # s: mqtt.external.list_lag of this module's bridge


@pytest.fixture(scope="module")
def walk_bridge(
    rabbit_cluster: RabbitCluster, postgres_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Bridge]:
    # The revocation's second sweep of the engine's connections after RESWEEP s (a test waits for
    # it): shorter than the engine's list may lag, which nothing in this module depends on.
    external = {**rabbit_cluster.external_config(), "list_lag": RESWEEP}
    bridge = rabbit_cluster.bridge(
        tmp_path_factory.mktemp("walk"), external, store_url=postgres_server.new_database()
    )
    yield from serving(bridge)


async def reply(dev: aiomqtt.Client, topic: str) -> Any:
    """The next message on `topic` (others are skipped), as JSON."""
    async with asyncio.timeout(15):
        while True:
            msg = await next_message(dev, 15)
            if str(msg.topic) == topic:
                return orjson.loads(msg.payload)


async def test_the_device_walk_through_the_engine_on_postgresql(
    walk_bridge: Bridge, rabbit_cluster: RabbitCluster, tmp_path: Any
) -> None:
    bridge = walk_bridge
    assert bridge.store_url.startswith("postgresql://")
    first, second = rabbit_cluster.nodes
    owner: Account = account(bridge)
    thing = await create_thing(bridge, owner.token, tmp_path, keyType="EC")
    base = f"things/{thing.id}"
    app = unique("app")
    bridge.cli("app", "add", app, "--owner", owner.name, "--password", APP_PASSWORD)
    software = {
        "name": "fw",
        "versions": [
            {"versionNumber": "2.0", "releaseDate": "2024-02-02T00:00:00Z", "status": "REQUIRED",
             "downloadUrl": "https://dl.example/2.0"},
        ],
    }  # fmt: skip
    made = await call("POST", f"{bridge.http}/v2/software", owner.token, json=software)
    assert made.status == 201, made.body

    async with (
        aiomqtt.Client("127.0.0.1", first.mqtt, identifier=f"app:{app}:walk", username=app,
                       password=APP_PASSWORD, timeout=10) as listener,
        first.thing_client(thing) as dev,
    ):  # fmt: skip
        await listener.subscribe(f"{base}/collect", qos=1)
        for flow in (
            "config",
            "publish",
            "status/accepted",
            "upgrade/check/accepted",
            "upgrade/check/rejected",
        ):
            await dev.subscribe(f"{base}/{flow}", qos=1)
        config = await reply(dev, f"{base}/config")  # retained by the bridge on the engine
        assert config["version"] == 0

        # collect: through the engine, committed by the bridge, heard by the owner's application
        await dev.publish(f"{base}/collect", b'{"t": 21.5}', qos=1)
        heard = await next_message(listener, 15)
        assert (str(heard.topic), heard.payload) == (f"{base}/collect", b'{"t": 21.5}')

        async def collected() -> list[dict]:
            records = ok(await call("GET", f"{bridge.api}/things/{thing.id}/messages", owner.token))
            return [r for r in records if r["message"] == {"t": 21.5}]

        await until(collected, "the collected message in the history")
        # presence from the engine's connection events, in the twin
        await becomes(bridge, owner, thing.id, "online", 15)

        # status -> accepted with the decision; the owner's message -> delivered
        await dev.publish(f"{base}/status", orjson.dumps({"status": "ok", "info": {}}), qos=1)
        assert await reply(dev, f"{base}/status/accepted") == {"config": "sync"}  # nothing new to fetch
        sent = await call(
            "POST", f"{bridge.api}/things/{thing.id}/publish", owner.token, data=b"hello device"
        )
        ok(sent)
        got = await next_message(dev, 15)
        assert (str(got.topic), got.payload) == (f"{base}/publish", b"hello device")

        # upgrades: the check is answered from the owner's catalog, the result recorded
        await dev.publish(f"{base}/upgrade/check", orjson.dumps({"name": "fw", "version": "1.0"}), qos=1)
        offer = await reply(dev, f"{base}/upgrade/check/accepted")
        assert (offer["version"], offer["status"]) == ("2.0", "REQUIRED")
        result = {"currentVersionsUpgradeResult": [{"softwareName": "fw", "versionNumber": "2.0",
                                                    "status": "SUCCESS"}]}  # fmt: skip
        await dev.publish(f"{base}/upgrade/result", orjson.dumps(result), qos=1)

        async def results() -> list[dict]:
            answer = await call("GET", f"{bridge.http}/v2/devices/{thing.id}/upgradeResults", owner.token)
            assert answer.status == 200, answer.body
            return [r for r in answer.json["upgradeResultList"] if r["status"] == "SUCCESS"]

        await until(results, "the upgrade result")

        # the other node serves the same retained config to a second connection of the thing
        async with second.thing_client(thing, f"{thing.id}:other") as other:
            await other.subscribe(f"{base}/config", qos=1)
            assert (await reply(other, f"{base}/config"))["version"] == 0

        # deleted: its connection is closed and it cannot come back
        gone = await call("DELETE", f"{bridge.api}/things/{thing.id}", owner.token)
        ok(gone)
        with pytest.raises(aiomqtt.MqttError):
            async with asyncio.timeout(10):
                async for _ in dev.messages:
                    pass
    with pytest.raises(aiomqtt.MqttError):
        async with first.thing_client(thing, f"{thing.id}:again"):
            pass


async def test_an_application_over_amqp_cannot_forge_or_overhear_things(
    walk_bridge: Bridge, rabbit_cluster: RabbitCluster, tmp_path: Any
) -> None:
    """The consumer trusts a routing key `things.<id>.<flow>` as the thing's own message; the engine
    keeps that true for AMQP too (topic permissions apply to its publishes and bindings): an
    application with its password, over AMQP, may neither publish as a thing (its owner's or
    another's) nor bind a queue to another owner's things, nor declare a queue of its own choosing."""
    bridge = walk_bridge
    owner, stranger = account(bridge), account(bridge)
    mine = await create_thing(bridge, owner.token, tmp_path / "mine", keyType="EC")
    theirs = await create_thing(bridge, stranger.token, tmp_path / "theirs", keyType="EC")
    app = unique("app")
    bridge.cli("app", "add", app, "--owner", owner.name, "--password", APP_PASSWORD)
    url = f"amqp://{app}:{APP_PASSWORD}@127.0.0.1:{rabbit_cluster.nodes[0].amqp}/"

    async def refused(action: Callable[[aio_pika.abc.AbstractChannel], Any]) -> None:
        connection = await aio_pika.connect(url, timeout=10)
        try:
            channel = await connection.channel(publisher_confirms=True)
            with pytest.raises(aiormq.exceptions.ChannelAccessRefused):  # aio-pika's AMQP layer
                await action(channel)
        finally:
            await connection.close()

    async def publish(key: str) -> Callable[[aio_pika.abc.AbstractChannel], Any]:
        async def act(channel: aio_pika.abc.AbstractChannel) -> None:
            exchange = await channel.get_exchange("amq.topic", ensure=False)
            await exchange.publish(aio_pika.Message(b'{"forged": true}'), routing_key=key)

        return act

    for key in (f"things.{mine.id}.collect", f"things.{theirs.id}.collect", f"things.{theirs.id}.publish"):
        await refused(await publish(key))

    async def own_queue_bound_to(key: str) -> Callable[[aio_pika.abc.AbstractChannel], Any]:
        async def act(channel: aio_pika.abc.AbstractChannel) -> None:
            # the one queue name it may declare: its own MQTT subscription queue
            queue = await channel.declare_queue(f"mqtt-subscription-app:{app}:amqpqos1", auto_delete=True)
            await queue.bind("amq.topic", routing_key=key)

        return act

    await refused(await own_queue_bound_to(f"things.{theirs.id}.collect"))
    await refused(await own_queue_bound_to("things.#"))

    async def any_queue(channel: aio_pika.abc.AbstractChannel) -> None:
        await channel.declare_queue("", exclusive=True)

    await refused(any_queue)

    # what it may do works on the same path: a message to its owner's thing, stored as egress
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange("amq.topic", ensure=False)
        await exchange.publish(aio_pika.Message(b"allowed"), routing_key=f"things.{mine.id}.publish")

    async def stored() -> list[dict]:
        return ok(await call("GET", f"{bridge.api}/things/{mine.id}/messages", owner.token))

    [record] = await until(stored, "the application's message to its owner's thing")
    assert record["message"] == "allowed"  # and none of the forged ones


async def test_a_firmware_device_activates_certifies_and_downloads_through_the_engine(
    walk_bridge: Bridge, rabbit_cluster: RabbitCluster, tmp_path: Any
) -> None:
    """The firmware and provisioning dialects on the same deployment: a device activates its serial
    number (HTTP), gets a certificate for its own key with the API key (its CIK), connects to the
    other node, finds its target retained, pulls the image chunk by chunk over MQTT and confirms."""
    bridge = walk_bridge
    owner = account(bridge)
    product = await firmware_product(bridge, owner)
    image = os.urandom(40_000)  # two chunks of at most 32 KiB
    version = f"{bridge.http}/fw/v1/manage/products/{product.id}/versions/1.0"
    body = {"releaseDate": "2025-03-01T00:00:00Z", "status": "REQUIRED", "rolloutProfiles": []}
    assert (await call("PUT", version, owner.token, json=body)).status == 201
    assert (await call("PUT", f"{version}/firmware", owner.token, data=image)).status == 200
    sn = unique("FW-")
    serials = f"{bridge.http}/fw/v1/manage/products/{product.id}/serials"
    csv = {"Content-Type": "text/csv"}
    assert (await call("POST", serials, owner.token, data=f"{sn}\n".encode(), headers=csv)).status == 200
    activated = await call("POST", f"{bridge.http}/fw/v1/activate", json={"serialNumber": sn})
    assert activated.status == 200, activated.body
    thing, api_key = activated.json["thingId"], activated.json["apiKey"]
    files = await certified_device(bridge, tmp_path / "device", thing, api_key)
    certified = time.monotonic()  # the certificate's issue revoked the thing's engine connections
    base = f"things/{thing}/firmware"

    async with rabbit_cluster.nodes[1].thing_client(files) as dev:
        for flow in ("target", "chunk/+", "get/rejected", "switched/accepted", "switched/rejected"):
            await dev.subscribe(f"{base}/{flow}", qos=1)
        target = await reply(dev, f"{base}/target")
        assert (target["targetVersion"], target["size"]) == ("1.0", len(image))
        received = b""
        while len(received) < len(image):
            offset = len(received)
            await dev.publish(f"{base}/get", orjson.dumps({"version": "1.0", "offset": offset}), qos=1)
            async with asyncio.timeout(15):
                async for message in dev.messages:
                    assert str(message.topic) != f"{base}/get/rejected", message.payload
                    if str(message.topic) == f"{base}/chunk/{offset}":
                        received += bytes(message.payload)
                        break
        assert hashlib.sha256(received).hexdigest() == target["sha256"]
        await dev.publish(f"{base}/switched", orjson.dumps({"version": "1.0"}), qos=1)
        assert (await reply(dev, f"{base}/switched/accepted"))["currentVersion"] == "1.0"

        # the revocation's second sweep of the engine's connections (RESWEEP s later) closes only
        # those opened before it: this one, with the new certificate, is still served after it
        await asyncio.sleep(max(0.0, certified + RESWEEP + 1 - time.monotonic()))
        await dev.publish(f"{base}/get", orjson.dumps({"version": "1.0", "offset": 0, "length": 4}), qos=1)
        async with asyncio.timeout(15):
            async for message in dev.messages:
                if str(message.topic) == f"{base}/chunk/0":
                    assert bytes(message.payload) == image[:4]
                    break
