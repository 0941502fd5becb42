"""The MQTT twin of software upgrades against the real `thingbridge serve` process over TLS. The
catalog (software, profiles, accounts, staged rollouts) is made by the core on the data directory
before the server starts (the HTTP dialect comes later); then things check for upgrades, report
results and versions, and receive `upgrade/notify` (retained while offline, at once when online,
released by a result that moves the rollout), and applications see `rollouts/{id}/state` of their
owner's rollouts only, moved on by results and by the server's wave timer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest

from bridge import config as bridge_config
from bridge.core.rollouts import wave_order
from bridge.core.service import Core
from bridge.core.things import NewThing
from bridge.store import create
from tests.conftest import Bridge, _store_url, on_each_store, write_config
from tests.helpers import ThingFiles, app_client, next_message, thing_client

APP_PASSWORD = "app-password-1"


def version(number: str, day: int, profiles: list[str]) -> dict[str, Any]:
    return {
        "versionNumber": number,
        "releaseDate": f"2024-02-{day:02d}T00:00:00Z",
        "status": "REQUIRED",
        "downloadUrl": f"https://dl.example/{number}",
        "rolloutProfiles": profiles,
    }


@dataclass
class Fleet:
    bridge: Bridge
    things: dict[str, ThingFiles]  # by thing id
    first: str  # alice's wave-1 device
    second: str  # alice's wave-2 device
    rollout: str  # alice's rollout (waves 50/100, long timeout)
    bobs_rollout: str  # bob's rollout (a 1 s wave timeout)


async def _setup(folder: Path) -> tuple[dict[str, ThingFiles], str, str]:
    cfg = bridge_config.load(folder / "broker.yaml")
    store = create(cfg.store.url, cfg.db_path, "OFF")  # the server opens it with its own setting
    store.open()
    try:
        core = Core(cfg, store)
        files: dict[str, ThingFiles] = {}
        rollouts = []
        for name, timeout in (("alice", 3600), ("bob", 1)):
            await core.accounts.create_user(name, "operator-password-1")
            await core.accounts.create_app(f"{name}-app", name, APP_PASSWORD)
            user = await core.accounts.user_by_name(name)
            ids = []
            for i in range(2):
                thing = await core.things.create(user, NewThing(id=f"{name}-{i}", key_type="EC"))
                assert thing.private_key_pem is not None
                (folder / thing.id).mkdir()
                (folder / thing.id / "certificate.pem").write_text(thing.cert_pem)
                (folder / thing.id / "private.key").write_text(thing.private_key_pem)
                files[thing.id] = ThingFiles(thing.id, folder / thing.id, {})
                ids.append(thing.id)
            await core.upgrades.create_profile(user.id, {"id": "A"})
            await core.upgrades.put_account(
                user.id, "A", "acc", {"devices": [{"id": t, "type": "STB"} for t in ids]}
            )
            await core.upgrades.create_software(
                user.id, {"name": "fw", "versions": [version("1.0", 1, ["A"]), version("2.0", 2, ["A"])]}
            )
            body = {"softwareName": "fw", "versionNumber": "2.0", "rolloutProfileId": "A"}
            state = await core.rollouts.create(
                user.id, {**body, "waves": [50, 100], "errorThreshold": 0.5, "waveTimeout": timeout}
            )
            rollouts.append(state["id"])
        return files, rollouts[0], rollouts[1]
    finally:
        await asyncio.to_thread(store.close)


@pytest.fixture(scope="module")
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """On SQLite, or on each store for a test marked on_each_store("fleet")."""
    folder = tmp_path_factory.mktemp("upgrades")
    url = _store_url(request)
    bridge = Bridge(folder, write_config(folder, store={"url": url}), store_url=url)
    things, rollout, bobs = asyncio.run(_setup(folder))
    first, second = wave_order(["alice-0", "alice-1"])
    bridge.start()
    try:
        yield Fleet(bridge, things, first, second, rollout, bobs)
    finally:
        bridge.kill()


async def request(dev: aiomqtt.Client, thing_id: str, body: Any) -> tuple[str, Any]:
    """upgrade/check -> (accepted | rejected, body)."""
    await dev.publish(f"things/{thing_id}/upgrade/check", orjson.dumps(body), qos=1)
    while True:
        msg = await next_message(dev)
        topic = str(msg.topic)
        if topic.startswith(f"things/{thing_id}/upgrade/check/"):
            return topic.rsplit("/", 1)[1], orjson.loads(msg.payload)


@on_each_store("fleet")
async def test_check_results_and_notify_move_the_rollout(fleet: Fleet) -> None:
    bridge, first, second = fleet.bridge, fleet.first, fleet.second
    offer = {
        "name": "fw",
        "status": "REQUIRED",
        "version": "2.0",
        "downloadUrl": "https://dl.example/2.0",
        "dependencies": [],
    }
    async with (
        app_client(bridge, "alice-app", APP_PASSWORD) as app,
        thing_client(bridge, fleet.things[second], f"{second}:sub") as waiting,
    ):
        await app.subscribe(f"rollouts/{fleet.rollout}/state", qos=1)
        state = orjson.loads((await next_message(app)).payload)  # retained since start-up
        assert (state["state"], state["wave"], state["counts"]["offered"]) == ("running", 1, 1)
        await app.subscribe("things/+/upgrade/result", qos=1)
        await app.subscribe("things/+/versions", qos=1)

        # The wave-2 device is online, subscribed, and not offered 2.0 yet.
        await waiting.subscribe(f"things/{second}/upgrade/#", qos=1)
        assert await request(waiting, second, {"name": "fw", "version": "1.0"}) == (
            "accepted",
            {**offer, "status": "OK", "version": "1.0", "downloadUrl": "https://dl.example/1.0"},
        )

        # The wave-1 device was told while offline: the notice is retained for it.
        async with thing_client(bridge, fleet.things[first]) as dev:
            await dev.subscribe(f"things/{first}/upgrade/#", qos=1)
            notice = await next_message(dev)
            assert str(notice.topic) == f"things/{first}/upgrade/notify" and notice.retain
            assert orjson.loads(notice.payload) == {"upgrades": [offer]}
            assert await request(dev, first, {"name": "fw", "version": "1.0"}) == ("accepted", offer)
            rejected = await request(dev, first, {"name": "nope", "version": "1"})
            assert rejected[0] == "rejected" and rejected[1]["errorCode"] == 400
            assert "unknown software" in rejected[1]["errorMessage"]

            # Its SUCCESS reaches the owner's application and releases wave 2, whose device,
            # online, is told at once.
            result = {
                "currentVersionsUpgradeResult": [
                    {"softwareName": "fw", "versionNumber": "2.0", "status": "SUCCESS"}
                ]
            }
            await dev.publish(f"things/{first}/upgrade/result", orjson.dumps(result), qos=1)
            seen: dict[str, Any] = {}
            while "result" not in seen or "state" not in seen:
                msg = await next_message(app)
                key = "result" if str(msg.topic).endswith("upgrade/result") else "state"
                seen[key] = (str(msg.topic), orjson.loads(msg.payload))
            assert seen["result"] == (f"things/{first}/upgrade/result", result)
            assert seen["state"][1]["wave"] == 2 and seen["state"][1]["counts"]["succeeded"] == 1
            told = await next_message(waiting)
            assert str(told.topic) == f"things/{second}/upgrade/notify"
            assert orjson.loads(told.payload) == {"upgrades": [offer]}

            # Reporting 2.0 as current reaches the application and clears the retained notice.
            versions = {"currentVersionNumbers": [{"softwareName": "fw", "currentVersionNumber": "2.0"}]}
            await dev.publish(f"things/{first}/versions", orjson.dumps(versions), qos=1)
            msg = await next_message(app)
            assert (str(msg.topic), orjson.loads(msg.payload)) == (f"things/{first}/versions", versions)

        async with thing_client(bridge, fleet.things[first]) as dev:
            await dev.subscribe(f"things/{first}/upgrade/#", qos=1)
            # No retained notice: the first message is the reply to this check.
            assert await request(dev, first, {"name": "fw", "version": "2.0"}) == (
                "accepted",
                {**offer, "status": "OK"},
            )


async def test_applications_see_only_their_owners_rollouts(fleet: Fleet) -> None:
    """Bob's rollout has a 1 s wave timeout and nobody reports: the server's timer completes it,
    and each state change reaches bob's application; alice's application, subscribed to every
    rollout, receives only alice's."""
    bridge = fleet.bridge
    async with (
        app_client(bridge, "alice-app", APP_PASSWORD, "app:alice-app:all") as alice,
        app_client(bridge, "bob-app", APP_PASSWORD) as bob,
    ):
        await alice.subscribe("rollouts/#", qos=1)
        await bob.subscribe("rollouts/+/state", qos=1)
        states = []
        while not states or states[-1]["state"] != "completed":
            msg = await next_message(bob, timeout=10)
            assert str(msg.topic) == f"rollouts/{fleet.bobs_rollout}/state"
            states.append(orjson.loads(msg.payload))
        assert states[-1]["counts"]["offered"] == 2
        msg = await next_message(alice)
        assert str(msg.topic) == f"rollouts/{fleet.rollout}/state"
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):  # bounded look for a leak, not a synchronisation
                msg = await next_message(alice)
                raise AssertionError(f"alice's application received {msg.topic}")
