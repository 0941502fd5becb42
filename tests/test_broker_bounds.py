"""What the broker holds for a client is bounded, and what it drops is counted (issue #9 items 5, 6
and 9), through the real process: an offline application's queue, retained messages, and the
cloud-to-device subtrees a thing may not publish on."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from tests.conftest import Bridge, _bridge
from tests.helpers import (
    Account,
    ThingFiles,
    account,
    app_client,
    call,
    create_thing,
    next_message,
    ok,
    run_sync,
    thing_client,
    token,
    unique,
)

APP_PASSWORD = "app-password-1"
QUEUE_MESSAGES = 40
PAYLOAD = 3 * 1024


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    """Small bounds, so that a few dozen messages reach them: the offline queue keeps 40 messages,
    and a connection may hold 32 KiB of unacknowledged deliveries (about 10 of these messages)."""
    yield from _bridge(
        tmp_path_factory,
        mqtt={
            "max_queued_messages": QUEUE_MESSAGES,
            "max_queued_bytes": 1024 * 1024,
            "max_unsent": 32 * 1024,
        },
    )


@pytest.fixture(scope="module")
def alice(bridge: Bridge) -> Account:
    return account(bridge)


@pytest.fixture(scope="module")
def alice_app(bridge: Bridge, alice: Account) -> str:
    name = unique("app")
    bridge.cli("app", "add", name, "--owner", alice.name, "--password", APP_PASSWORD)
    return name


@pytest.fixture(scope="module")
def thing(bridge: Bridge, alice: Account, tmp_path_factory: pytest.TempPathFactory) -> ThingFiles:
    return run_sync(create_thing(bridge, alice.token, tmp_path_factory.mktemp("things")))


async def stats(bridge: Bridge) -> dict:
    return ok(await call("GET", f"{bridge.api}/broker/stats", await token(bridge)))


def persistent_app(bridge: Bridge, name: str) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        bridge.ports["mqtt_plain"],
        identifier=f"app:{name}:offline",
        username=name,
        password=APP_PASSWORD,
        clean_session=False,
        timeout=5,
    )


async def drain(client: aiomqtt.Client, quiet: float) -> list[bytes]:
    """Every message until none has come for `quiet` seconds."""
    got: list[bytes] = []
    while True:
        try:
            got.append((await next_message(client, quiet)).payload)
        except (AssertionError, TimeoutError):
            return got


async def test_an_offline_queue_keeps_the_newest_and_delivers_every_one_it_kept(
    bridge: Bridge, alice: Account, alice_app: str, thing: ThingFiles
) -> None:
    """60 QoS 1 messages for an offline persistent session that may keep 40: the 20 oldest are
    dropped and counted; on resume all 40 arrive, in order, once, although together they are far
    more than the connection may hold unacknowledged (the bridge used to send the whole queue at
    once, the connection was cut at mqtt.max_unsent and the excess was lost)."""
    topic = f"things/{thing.id}/publish"
    async with persistent_app(bridge, alice_app) as app:
        await app.subscribe(topic, qos=1)
    before = await stats(bridge)
    for seq in range(60):
        body = f"{seq:03d}".encode() + b"." * PAYLOAD
        ok(await call("POST", f"{bridge.api}/things/{thing.id}/publish", alice.token, data=body))
    after = await stats(bridge)
    assert after["droppedQueuedMessages"] - before["droppedQueuedMessages"] == 20
    assert after["queuedMessages"] >= QUEUE_MESSAGES

    async with persistent_app(bridge, alice_app) as app:
        got = await drain(app, 3)
    assert [int(p[:3]) for p in got] == list(range(20, 60))
    async with persistent_app(bridge, alice_app) as app:
        assert await drain(app, 1.5) == []  # every one was acknowledged: nothing comes back


async def test_a_thing_cannot_retain(
    bridge: Bridge, alice: Account, alice_app: str, thing: ThingFiles
) -> None:
    """No topic a client publishes on is retained in the contract: 120 retained publishes on
    distinct sub-topics keep nothing (the bridge used to keep all of them, without a limit)."""
    async with (
        app_client(bridge, alice_app, APP_PASSWORD, client_id=f"app:{alice_app}:r") as app,
        thing_client(bridge, thing) as dev,
    ):
        # the bridge retains the thing's presence after the connect: counted before, not meanwhile
        await app.subscribe(f"things/{thing.id}/presence", qos=1)
        async with asyncio.timeout(5):
            async for message in app.messages:
                if b'"online"' in message.payload:
                    break
        before = await stats(bridge)
        for n in range(120):
            await dev.publish(f"things/{thing.id}/state/{n}", b"s" * 1024, qos=1, retain=True)
        after = await stats(bridge)
        await app.subscribe(f"things/{thing.id}/state/#", qos=1)
        assert await drain(app, 1) == []
    assert after["refusedRetainedPublishes"] - before["refusedRetainedPublishes"] == 120
    assert after["retainedMessages"] == before["retainedMessages"]


@pytest.mark.parametrize(
    "sub_topic",
    ["presence/x", "publish/x", "config/x", "upgrade/notify/x", "status/accepted/x", "status/rejected"],
)
async def test_a_thing_may_not_publish_under_cloud_to_device_topics(
    bridge: Bridge, alice_app: str, thing: ThingFiles, sub_topic: str
) -> None:
    before = await stats(bridge)
    async with app_client(bridge, alice_app, APP_PASSWORD, client_id=f"app:{alice_app}:acl") as app:
        await app.subscribe(f"things/{thing.id}/#", qos=1)
        async with thing_client(bridge, thing, f"{thing.id}:acl") as dev:
            await dev.publish(f"things/{thing.id}/{sub_topic}", b"forged", qos=1)
            # a message it may send, after the forged one, shows the forged one had its turn
            await dev.publish(f"things/{thing.id}/telemetry", b"fine", qos=1)
        got = await drain(app, 1.5)
    assert b"forged" not in got and b"fine" in got
    assert (await stats(bridge))["deniedPublishes"] > before["deniedPublishes"]


async def test_config_get_is_still_a_device_request(
    bridge: Bridge, thing: ThingFiles, tmp_path: Path
) -> None:
    """config/get lives under the cloud's config topic but is the device asking for its config."""
    async with thing_client(bridge, thing, f"{thing.id}:cfg") as dev:
        await dev.subscribe(f"things/{thing.id}/config", qos=1)
        first = await next_message(dev)  # retained
        await dev.publish(f"things/{thing.id}/config/get", b"", qos=1)
        again = await asyncio.wait_for(next_message(dev), 5)
    assert again.payload == first.payload
