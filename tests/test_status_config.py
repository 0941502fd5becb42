"""The device twin against the real `thingbridge serve` process: the partner-portal dialect
(GetURL / SetStatus / GetConfig, GET and POST), the same reboot/new/sync logic over MQTT
(things/{id}/status, retained things/{id}/config, config/get), operator desired state and fleet
defaults under /dev/v1, the `config` / `status` commands, status messages, and bad input."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import orjson
import pytest

from tests.conftest import Bridge
from tests.helpers import ThingFiles, app_client, create_thing, new_user, thing_client, token, unique

DEFAULT_DOC = {"UpdateRate": 24, "AppParam": {}, "data": {}, "packageUrl": "", "version": 0}
ERROR_ENVELOPE_KEYS = {"status", "code", "messages", "result"}


# ---- operator side over HTTP -----------------------------------------------------------------------
@dataclass
class Owner:
    name: str
    password: str
    token: str


def _owner_fixture(bridge: Bridge, things: int | None = None) -> Owner:
    name, password = new_user(bridge)
    if things is not None:
        bridge.cli("plan", "set", name, "--things", str(things))
    return Owner(name, password, asyncio.run(token(bridge, name, password)))


@pytest.fixture(scope="module")
def bridge(bridge_on_each_store: Bridge) -> Bridge:
    return bridge_on_each_store


@pytest.fixture(scope="module")
def owner(bridge: Bridge) -> Owner:
    """The operator most tests share (each test works on its own things and thingTypes)."""
    return _owner_fixture(bridge, things=100)


@pytest.fixture(scope="module")
def stranger(bridge: Bridge) -> Owner:
    """Another user, whose things and settings must stay apart."""
    return _owner_fixture(bridge)


async def operator(
    bridge: Bridge, tok: str | None, method: str, path: str, body: Any = None, raw: bytes | None = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {tok}"} if tok else {}
    if raw is not None:
        kwargs: dict[str, Any] = {"data": raw, "headers": {**headers, "Content-Type": "application/json"}}
    elif body is not None:
        kwargs = {"json": body, "headers": headers}
    else:
        kwargs = {"headers": headers}
    async with aiohttp.ClientSession() as s, s.request(method, f"{bridge.api}{path}", **kwargs) as r:
        return r.status, await r.json()


async def desired(bridge: Bridge, owner: Owner, thing_id: str, body: dict) -> dict:
    status, reply = await operator(bridge, owner.token, "PATCH", f"/things/{thing_id}/desired", body)
    assert status == 200, reply
    assert reply["code"] == 200
    return reply["result"]


async def fleet_defaults(bridge: Bridge, owner: Owner, thing_type: str, body: dict) -> dict:
    status, reply = await operator(bridge, owner.token, "PATCH", f"/fleet/defaults/{thing_type}", body)
    assert status == 200, reply
    return reply["result"]


async def state(bridge: Bridge, owner: Owner, thing_id: str) -> dict:
    status, reply = await operator(bridge, owner.token, "GET", f"/things/{thing_id}/state")
    assert status == 200, reply
    return reply["result"]


async def status_messages(bridge: Bridge, owner: Owner, thing_id: str) -> list[Any]:
    status, reply = await operator(
        bridge, owner.token, "GET", f"/things/{thing_id}/messages?messagetype=status"
    )
    assert status == 200, reply
    assert all(m["messagetype"] == "status" and m["flthingspk"] == thing_id for m in reply["result"])
    return [m["message"] for m in reply["result"]]


def assert_error_envelope(status: int, reply: Any, expected: int) -> None:
    assert status == expected, reply
    assert set(reply) == ERROR_ENVELOPE_KEYS, reply
    assert reply["code"] == expected and reply["result"] is None
    assert isinstance(reply["messages"][0]["value"], str) and reply["messages"][0]["value"]


# ---- device side: the portal dialect ---------------------------------------------------------------
async def portal(
    bridge: Bridge, method: str, path: str, params: dict | None = None, raw: bytes | None = None
) -> tuple[int, Any]:
    """One portal call, without any credential; `path` may be an absolute URL."""
    url = path if path.startswith("http") else f"{bridge.http}{path}"
    async with aiohttp.ClientSession() as s:
        if method == "GET":
            request = s.get(url, params=params or {})
        elif raw is not None:
            request = s.post(url, data=raw, headers={"Content-Type": "application/json"})
        else:
            request = s.post(url, json=params)
        async with request as r:
            assert r.content_type == "application/json", await r.text()
            return r.status, await r.json()


class PortalDevice:
    """An HTTP-only device that follows the documented cycle with the URLs GetURL hands it."""

    def __init__(self, bridge: Bridge, variant: str, reg_id: str) -> None:
        self.bridge = bridge
        self.variant = variant
        self.reg_id = reg_id
        self.set_status_url: str | None = None
        self.get_config_url: str | None = None

    def _params(self, **extra: Any) -> dict[str, Any]:
        if self.variant == "GET":
            return {"regId": self.reg_id, **{k: v for k, v in extra.items() if isinstance(v, str)}}
        return {"regId": self.reg_id, **extra}

    async def get_url(self) -> dict:
        extra = {"DeviceInfo": {"model": "flexa-1", "serial": "SN1"}} if self.variant == "POST" else {}
        status, body = await portal(self.bridge, self.variant, "/GetURL", self._params(**extra))
        assert status == 200, body
        self.set_status_url = self._endpoint(body["setStatusUrl"], "/SetStatus")
        self.get_config_url = self._endpoint(body["getConfigUrl"], "/GetConfig")
        return body

    def _endpoint(self, value: str, path: str) -> str:
        method, url = value.split(" ", 1)
        assert method == self.variant, value
        assert url == f"{self.bridge.http}{path}", value
        return url

    async def set_status(self, status: str = "Alive", info: dict | None = None) -> str:
        assert self.set_status_url is not None, "call GetURL first"
        extra: dict[str, Any] = {"status": status}
        if info is not None:
            extra["info"] = info
        code, body = await portal(self.bridge, self.variant, self.set_status_url, self._params(**extra))
        assert code == 200, body
        assert set(body) == {"config"}, body
        return body["config"]

    async def get_config(self) -> dict:
        assert self.get_config_url is not None, "call GetURL first"
        extra = {"DeviceInfo": {"model": "flexa-1"}} if self.variant == "POST" else {}
        code, body = await portal(self.bridge, self.variant, self.get_config_url, self._params(**extra))
        assert code == 200, body
        return body


# ---- device side: MQTT ---------------------------------------------------------------------------------
class Inbox:
    """Every message a client receives, kept so that a test can wait for the one it expects
    (topic and content) without losing the others."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.messages: list[aiomqtt.Message] = []
        self.taken: set[int] = set()
        self.changed = asyncio.Condition()

    async def _pump(self) -> None:
        async for message in self.client.messages:
            async with self.changed:
                self.messages.append(message)
                self.changed.notify_all()

    @classmethod
    @contextlib.asynccontextmanager
    async def of(cls, client: aiomqtt.Client) -> AsyncIterator[Inbox]:
        inbox = cls(client)
        task = asyncio.create_task(inbox._pump())
        try:
            yield inbox
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task

    def _find(self, topic: str, match: Callable[[Any], bool] | None) -> aiomqtt.Message | None:
        for i, message in enumerate(self.messages):
            if i in self.taken or str(message.topic) != topic:
                continue
            if match is None or match(orjson.loads(message.payload)):
                self.taken.add(i)
                return message
        return None

    async def take_message(
        self, topic: str, match: Callable[[Any], bool] | None = None, timeout: float = 5
    ) -> aiomqtt.Message:
        found: list[aiomqtt.Message] = []

        def ready() -> bool:
            message = self._find(topic, match)
            if message is not None:
                found.append(message)
            return bool(found)

        try:
            async with asyncio.timeout(timeout), self.changed:
                await self.changed.wait_for(ready)
        except TimeoutError:
            seen = [(str(m.topic), m.payload) for m in self.messages]
            raise AssertionError(f"no matching message on {topic} within {timeout}s; got {seen}") from None
        return found[0]

    async def take(self, topic: str, match: Callable[[Any], bool] | None = None, timeout: float = 5) -> Any:
        return orjson.loads((await self.take_message(topic, match, timeout)).payload)

    def untaken(self, topic: str) -> list[bytes]:
        return [
            bytes(m.payload)
            for i, m in enumerate(self.messages)
            if i not in self.taken and str(m.topic) == topic
        ]


def doc(**changes: Any) -> dict:
    return {**DEFAULT_DOC, **changes}


async def mqtt_status(dev: aiomqtt.Client, inbox: Inbox, thing_id: str, payload: Any) -> str:
    await dev.publish(f"things/{thing_id}/status", orjson.dumps(payload), qos=1)
    reply = await inbox.take(f"things/{thing_id}/status/accepted")
    assert set(reply) == {"config"}, reply
    return reply["config"]


async def subscribe_device(dev: aiomqtt.Client, thing_id: str) -> None:
    for suffix in ("config", "status/accepted", "status/rejected"):
        await dev.subscribe(f"things/{thing_id}/{suffix}", qos=1)


async def wait_for(predicate: Callable[[], Any], timeout: float = 5, interval: float = 0.05) -> Any:
    """Poll an async condition until it holds, with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value {value!r})")
        await asyncio.sleep(interval)


# ---- the HTTP device cycle ------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["GET", "POST"])
async def test_http_device_walks_the_documented_cycle(
    bridge: Bridge, owner: Owner, tmp_path: Path, variant: str
) -> None:
    thing = await create_thing(bridge, owner.token, tmp_path, thingType="meter")
    dev = PortalDevice(bridge, variant, thing.id)

    boot = await dev.get_url()
    assert boot == {
        "packageUrl": "",
        "version": 0,
        "data": {},
        "setStatusUrl": f"{variant} {bridge.http}/SetStatus",
        "getConfigUrl": f"{variant} {bridge.http}/GetConfig",
        "apiVersion": 2,
    }
    assert type(boot["version"]) is int
    assert await dev.set_status("Alive", {"uptime": 1}) == "sync"

    # the operator changes the configuration: the device is told, until it fetches it
    await desired(bridge, owner, thing.id, {"AppParam": {"mode": "eco", "threshold": 7}, "UpdateRate": 6})
    assert await dev.set_status("Alive", {"uptime": 2}) == "new"
    assert await dev.set_status("Alive", {"uptime": 3}) == "new"
    assert await dev.get_config() == {"UpdateRate": 6, "AppParam": {"mode": "eco", "threshold": 7}}
    assert await dev.set_status("Alive", {"uptime": 4}) == "sync"

    # the operator raises the package version: reboot, GetURL gives the new package, then sync
    package = f"https://cdn.example.test/flexa/{variant.lower()}-3.zip"
    await desired(bridge, owner, thing.id, {"version": 3, "packageUrl": package, "data": {"region": "eu"}})
    assert await dev.set_status("Alive") == "reboot"
    assert await dev.set_status("Alive") == "reboot"
    boot = await dev.get_url()
    assert (boot["packageUrl"], boot["version"], boot["data"], boot["apiVersion"]) == (
        package,
        3,
        {"region": "eu"},
        2,
    )
    assert await dev.set_status("Alive") == "sync"
    # GetConfig stays what it was: the package is not part of the config
    assert await dev.get_config() == {"UpdateRate": 6, "AppParam": {"mode": "eco", "threshold": 7}}

    twin = await state(bridge, owner, thing.id)
    assert twin["configState"] == "sync"
    assert twin["reported"]["status"] == "Alive"
    assert twin["reported"]["transport"] == "http"
    assert twin["reported"]["runningVersion"] == 3
    assert twin["effective"] == doc(
        UpdateRate=6,
        AppParam={"mode": "eco", "threshold": 7},
        data={"region": "eu"},
        packageUrl=package,
        version=3,
    )
    assert len(await status_messages(bridge, owner, thing.id)) == 7


async def test_reported_version_equal_to_desired_is_sync_without_geturl(
    bridge: Bridge, owner: Owner, tmp_path: Path
) -> None:
    thing = await create_thing(bridge, owner.token, tmp_path)
    await desired(bridge, owner, thing.id, {"version": 5, "packageUrl": "https://cdn.example.test/p5.zip"})

    async def set_status(info: dict) -> str:
        code, body = await portal(
            bridge, "POST", "/SetStatus", {"regId": thing.id, "status": "Alive", "info": info}
        )
        assert code == 200, body
        return body["config"]

    assert await set_status({}) == "reboot"
    assert await set_status({"version": 4}) == "reboot"
    assert await set_status({"version": 5}) == "sync"
    twin = await state(bridge, owner, thing.id)
    assert twin["reported"]["runningVersion"] == 5
    assert twin["reported"]["info"] == {"version": 5}
    assert twin["configState"] == "sync"


async def test_regid_alias_thing_id_and_conflicts(
    bridge: Bridge, owner: Owner, stranger: Owner, tmp_path: Path
) -> None:
    a = await create_thing(bridge, owner.token, tmp_path)
    b = await create_thing(bridge, owner.token, tmp_path)
    alias = unique("rd7JmLGdg5Rr-")

    result = await desired(bridge, owner, a.id, {"regId": alias, "AppParam": {"who": "a"}})
    assert result["regId"] == alias
    # the alias and the thing id both reach thing a
    answers = iter(["new", "sync", "sync", "sync"])
    for method, reg_id in (("POST", alias), ("GET", a.id), ("GET", alias), ("POST", a.id)):
        code, body = await portal(bridge, method, "/SetStatus", {"regId": reg_id, "status": "Alive"})
        assert (code, body) == (200, {"config": next(answers)}), (method, reg_id)
        code, body = await portal(bridge, method, "/GetConfig", {"regId": reg_id})
        assert (code, body) == (200, {"UpdateRate": 24, "AppParam": {"who": "a"}})
        code, body = await portal(bridge, method, "/GetURL", {"regId": reg_id})
        assert code == 200 and body["apiVersion"] == 2
    assert len(await status_messages(bridge, owner, a.id)) == 4
    assert await status_messages(bridge, owner, b.id) == []

    # a regId already in use, by a thing's alias or as a thing's id, is a conflict
    for reg_id in (alias, a.id):
        code, reply = await operator(
            bridge, owner.token, "PATCH", f"/things/{b.id}/desired", {"regId": reg_id}
        )
        assert_error_envelope(code, reply, 409)
    other = stranger
    c = await create_thing(bridge, other.token, tmp_path)
    code, reply = await operator(bridge, other.token, "PATCH", f"/things/{c.id}/desired", {"regId": alias})
    assert_error_envelope(code, reply, 409)
    assert (await state(bridge, owner, b.id))["regId"] == b.id
    assert (await state(bridge, other, c.id))["regId"] == c.id

    # null clears the alias: it is unknown again, the thing id still works, and b may take it
    assert (await desired(bridge, owner, a.id, {"regId": None}))["regId"] == a.id
    code, body = await portal(bridge, "POST", "/SetStatus", {"regId": alias, "status": "Alive"})
    assert code == 400 and body["error"]
    code, body = await portal(bridge, "GET", "/SetStatus", {"regId": a.id, "status": "Alive"})
    assert code == 200
    assert (await desired(bridge, owner, b.id, {"regId": alias}))["regId"] == alias
    code, body = await portal(bridge, "POST", "/SetStatus", {"regId": alias, "status": "Alive"})
    assert (code, body) == (200, {"config": "sync"})
    assert await status_messages(bridge, owner, b.id) == [{"status": "Alive", "info": {}}]


async def test_a_thing_id_may_not_take_a_regid_in_use(bridge: Bridge, owner: Owner, tmp_path: Path) -> None:
    """Thing ids are regIds too, so they share one namespace with the aliases: a thing created with
    an id that is already another thing's regId could never be reached by its own id on the portal
    (the regId resolves to the alias holder)."""
    a = await create_thing(bridge, owner.token, tmp_path)
    alias = unique("alias-")
    await desired(bridge, owner, a.id, {"regId": alias, "AppParam": {"who": "a"}})
    code, reply = await operator(bridge, owner.token, "POST", "/things", {"flthingspk": alias})
    assert_error_envelope(code, reply, 409)
    code, body = await portal(bridge, "POST", "/GetConfig", {"regId": alias})
    assert (code, body) == (200, {"UpdateRate": 24, "AppParam": {"who": "a"}})


async def test_disabled_thing_is_unknown_to_the_portal(bridge: Bridge, owner: Owner, tmp_path: Path) -> None:
    thing = await create_thing(bridge, owner.token, tmp_path)
    code, reply = await operator(bridge, owner.token, "PATCH", f"/things/{thing.id}", {"enabled": False})
    assert code == 200, reply
    code, body = await portal(bridge, "GET", "/SetStatus", {"regId": thing.id, "status": "Alive"})
    assert code == 400 and body["error"]
    assert await status_messages(bridge, owner, thing.id) == []
    code, reply = await operator(bridge, owner.token, "PATCH", f"/things/{thing.id}", {"enabled": True})
    assert code == 200, reply
    code, body = await portal(bridge, "GET", "/SetStatus", {"regId": thing.id, "status": "Alive"})
    assert (code, body) == (200, {"config": "sync"})


# ---- MQTT devices ------------------------------------------------------------------------------------
async def test_mqtt_device_config_push_status_and_config_get(
    bridge: Bridge, owner: Owner, tmp_path: Path
) -> None:
    thing = await create_thing(bridge, owner.token, tmp_path, thingType="sensor")
    config = f"things/{thing.id}/config"
    async with thing_client(bridge, thing) as dev, Inbox.of(dev) as inbox:
        await subscribe_device(dev, thing.id)
        assert await inbox.take(config) == DEFAULT_DOC
        assert await mqtt_status(dev, inbox, thing.id, {"status": "Alive", "info": {"rssi": -50}}) == "sync"

        # the operator changes the config: the new document arrives without asking
        await desired(bridge, owner, thing.id, {"AppParam": {"led": "on"}, "UpdateRate": 2})
        changed = doc(AppParam={"led": "on"}, UpdateRate=2)
        assert await inbox.take(config) == changed
        # receiving the push is not fetching it: the status logic still says new
        assert await mqtt_status(dev, inbox, thing.id, {"status": "Alive", "info": {}}) == "new"
        # config/get re-sends the document and counts as fetched
        await dev.publish(f"things/{thing.id}/config/get", b"", qos=1)
        assert await inbox.take(config) == changed
        assert await mqtt_status(dev, inbox, thing.id, {"status": "Alive"}) == "sync"

        # a newer package: reboot until the device reports running it
        package = "https://cdn.example.test/sensor-2.zip"
        await desired(bridge, owner, thing.id, {"version": 2, "packageUrl": package})
        latest = {**changed, "version": 2, "packageUrl": package}
        assert await inbox.take(config) == latest
        assert (
            await mqtt_status(dev, inbox, thing.id, {"status": "Alive", "info": {"version": 1}}) == "reboot"
        )
        assert await mqtt_status(dev, inbox, thing.id, {"status": "Alive", "info": {"version": 2}}) == "sync"
        assert inbox.untaken(f"things/{thing.id}/status/rejected") == []
        assert inbox.untaken(config) == []

    # a later subscriber finds the current document retained
    async with thing_client(bridge, thing, client_id=f"{thing.id}:late") as late, Inbox.of(late) as inbox:
        await late.subscribe(config, qos=1)
        message = await inbox.take_message(config)
        assert message.retain is True
        assert orjson.loads(message.payload) == latest
    twin = await state(bridge, owner, thing.id)
    assert twin["reported"]["transport"] == "mqtt"
    assert twin["reported"]["runningVersion"] == 2
    assert twin["configState"] == "sync"


async def test_mqtt_malformed_status_is_rejected_and_not_stored(
    bridge: Bridge, owner: Owner, tmp_path: Path
) -> None:
    thing = await create_thing(bridge, owner.token, tmp_path)
    rejected = f"things/{thing.id}/status/rejected"
    bad = [
        b"not json",
        b"\xff\xfe",
        b"",
        b"[1, 2]",
        b'"Alive"',
        b'{"info": {}}',
        b'{"status": null}',
        b'{"status": 1}',
        b'{"status": true}',
        b'{"status": {"s": "Alive"}}',
        b'{"status": ""}',
        orjson.dumps({"status": "x" * 257}),
        b'{"status": "Alive", "info": "up"}',
        b'{"status": "Alive", "info": [1]}',
    ]
    async with thing_client(bridge, thing) as dev, Inbox.of(dev) as inbox:
        await subscribe_device(dev, thing.id)
        before = await status_messages(bridge, owner, thing.id)
        for payload in bad:
            await dev.publish(f"things/{thing.id}/status", payload, qos=1)
            reply = await inbox.take(rejected)
            assert set(reply) == {"errorCode", "errorMessage"}, (payload, reply)
            assert reply["errorCode"] == 400, (payload, reply)
            assert isinstance(reply["errorMessage"], str) and reply["errorMessage"], (payload, reply)
        assert inbox.untaken(f"things/{thing.id}/status/accepted") == []
        assert await status_messages(bridge, owner, thing.id) == before == []
        # the connection is still up and a good report is still answered
        assert await mqtt_status(dev, inbox, thing.id, {"status": "Alive"}) == "sync"
    assert await status_messages(bridge, owner, thing.id) == [{"status": "Alive", "info": {}}]
    assert (await state(bridge, owner, thing.id))["reported"]["status"] == "Alive"


async def test_status_reports_reach_apps_and_are_stored_as_messages(
    bridge: Bridge, owner: Owner, stranger: Owner, tmp_path: Path
) -> None:
    app = unique("statusapp")
    await asyncio.to_thread(bridge.cli, "app", "add", app, "--owner", owner.name, "--password", "app-pass-1")
    foreign_owner = stranger
    foreign = await create_thing(bridge, foreign_owner.token, tmp_path)
    http_thing = await create_thing(bridge, owner.token, tmp_path)
    mqtt_thing = await create_thing(bridge, owner.token, tmp_path)

    async with app_client(bridge, app, "app-pass-1") as sub, Inbox.of(sub) as apps:
        await sub.subscribe("things/+/status", qos=1)
        code, _ = await portal(bridge, "GET", "/SetStatus", {"regId": foreign.id, "status": "Alive"})
        assert code == 200
        code, _ = await portal(
            bridge,
            "POST",
            "/SetStatus",
            {"regId": http_thing.id, "status": "Alive", "info": {"battery": 80}},
        )
        assert code == 200
        code, _ = await portal(bridge, "GET", "/SetStatus", {"regId": http_thing.id, "status": "Booting"})
        assert code == 200
        async with thing_client(bridge, mqtt_thing) as dev, Inbox.of(dev) as inbox:
            await subscribe_device(dev, mqtt_thing.id)
            report = {"status": "Alive", "info": {"rssi": -60}}
            assert await mqtt_status(dev, inbox, mqtt_thing.id, report) == "sync"
            # a rejected report is not forwarded to applications
            await dev.publish(f"things/{mqtt_thing.id}/status", b'{"info": {}}', qos=1)
            await inbox.take(f"things/{mqtt_thing.id}/status/rejected")
            assert await mqtt_status(dev, inbox, mqtt_thing.id, {"status": "Sleeping"}) == "sync"

        assert await apps.take(f"things/{http_thing.id}/status") == {
            "status": "Alive",
            "info": {"battery": 80},
        }
        assert await apps.take(f"things/{http_thing.id}/status") == {"status": "Booting", "info": {}}
        assert await apps.take(f"things/{mqtt_thing.id}/status") == report
        assert await apps.take(f"things/{mqtt_thing.id}/status") == {"status": "Sleeping", "info": {}}
        topics = [str(m.topic) for m in apps.messages]
        assert f"things/{foreign.id}/status" not in topics
        assert len(topics) == 4, topics

    assert await status_messages(bridge, owner, http_thing.id) == [
        {"status": "Alive", "info": {"battery": 80}},
        {"status": "Booting", "info": {}},
    ]
    assert await status_messages(bridge, owner, mqtt_thing.id) == [report, {"status": "Sleeping", "info": {}}]
    # status reports are not ingress messages
    code, reply = await operator(
        bridge, owner.token, "GET", f"/things/{http_thing.id}/messages?messagetype=ingress"
    )
    assert code == 200 and reply["result"] == []
    # another user cannot read them
    code, reply = await operator(
        bridge, foreign_owner.token, "GET", f"/things/{http_thing.id}/messages?messagetype=status"
    )
    assert code == 404, reply


# ---- fleet defaults --------------------------------------------------------------------------------------
async def test_fleet_defaults_apply_until_a_thing_has_its_own_value(
    bridge: Bridge, owner: Owner, tmp_path: Path
) -> None:
    kind = unique("fleet-")
    x = await create_thing(bridge, owner.token, tmp_path, thingType=kind)
    y = await create_thing(bridge, owner.token, tmp_path, thingType=kind)
    z = await create_thing(bridge, owner.token, tmp_path, thingType=unique("other-"))
    hx = PortalDevice(bridge, "POST", x.id)
    hz = PortalDevice(bridge, "GET", z.id)
    await hx.get_url()
    await hz.get_url()
    y_config = f"things/{y.id}/config"

    async with thing_client(bridge, y) as dev, Inbox.of(dev) as inbox:
        await subscribe_device(dev, y.id)
        assert await inbox.take(y_config) == DEFAULT_DOC
        assert await hx.set_status() == "sync"

        result = await fleet_defaults(bridge, owner, kind, {"AppParam": {"fleet": 1}, "UpdateRate": 12})
        assert result == {"thingType": kind, "defaults": {"AppParam": {"fleet": 1}, "UpdateRate": 12}}
        code, reply = await operator(bridge, owner.token, "GET", f"/fleet/defaults/{kind}")
        assert code == 200 and reply["result"] == result
        assert await inbox.take(y_config) == doc(AppParam={"fleet": 1}, UpdateRate=12)
        assert await hx.set_status() == "new"
        assert await hx.get_config() == {"UpdateRate": 12, "AppParam": {"fleet": 1}}
        assert await hx.set_status() == "sync"
        # a thing of another type is not concerned
        assert await hz.set_status() == "sync"
        assert await hz.get_config() == {"UpdateRate": 24, "AppParam": {}}

        # x gets its own AppParam: the fleet's AppParam no longer applies to it (UpdateRate still does)
        await desired(bridge, owner, x.id, {"AppParam": {"own": True}})
        assert await hx.set_status() == "new"
        assert await hx.get_config() == {"UpdateRate": 12, "AppParam": {"own": True}}
        await fleet_defaults(bridge, owner, kind, {"AppParam": {"fleet": 2}})
        assert await inbox.take(y_config) == doc(AppParam={"fleet": 2}, UpdateRate=12)
        assert await hx.set_status() == "sync"
        assert await hx.get_config() == {"UpdateRate": 12, "AppParam": {"own": True}}

        # null clears x's own value: back to the fleet's
        twin = await desired(bridge, owner, x.id, {"AppParam": None})
        assert twin["desired"] == {}
        assert twin["effective"]["AppParam"] == {"fleet": 2}
        assert await hx.set_status() == "new"
        assert await hx.get_config() == {"UpdateRate": 12, "AppParam": {"fleet": 2}}
        assert await hx.set_status() == "sync"

        # a package version from the fleet: reboot
        await fleet_defaults(bridge, owner, kind, {"version": 4, "packageUrl": "https://cdn.example.test/f4"})
        assert await inbox.take(y_config) == doc(
            AppParam={"fleet": 2}, UpdateRate=12, version=4, packageUrl="https://cdn.example.test/f4"
        )
        assert await hx.set_status() == "reboot"
        boot = await hx.get_url()
        assert (boot["version"], boot["packageUrl"]) == (4, "https://cdn.example.test/f4")
        assert await hx.set_status() == "sync"

        # null clears the fleet defaults back to the built-in ones
        result = await fleet_defaults(
            bridge, owner, kind, {"AppParam": None, "UpdateRate": None, "version": None, "packageUrl": None}
        )
        assert result == {"thingType": kind, "defaults": {}}
        assert await inbox.take(y_config) == DEFAULT_DOC
        assert await hx.set_status() == "new"
        assert await hx.get_config() == {"UpdateRate": 24, "AppParam": {}}
        assert await hx.set_status() == "sync"
        assert await mqtt_status(dev, inbox, y.id, {"status": "Alive"}) == "sync"

    code, reply = await operator(bridge, owner.token, "GET", f"/fleet?thingType={kind}")
    assert code == 200
    assert sorted(row["flthingspk"] for row in reply["result"]) == sorted([x.id, y.id])
    assert all(row["thingType"] == kind for row in reply["result"])
    code, reply = await operator(bridge, owner.token, "GET", "/fleet")
    assert code == 200
    assert {x.id, y.id, z.id} <= {row["flthingspk"] for row in reply["result"]}


# ---- the command line ----------------------------------------------------------------------------------
def status_row(output: str, thing_id: str) -> list[str]:
    rows = [line.split() for line in output.splitlines() if line.startswith(thing_id)]
    assert len(rows) == 1, output
    return rows[0]


async def test_cli_config_reaches_mqtt_and_portal_devices(
    bridge: Bridge, owner: Owner, tmp_path: Path
) -> None:
    if bridge.store_url != "sqlite:":  # the suite's time: eight CLI runs, the same code on both stores
        pytest.skip("store-neutral (the CLI writing to PostgreSQL: test_firmware_http's CLI import)")
    kind = unique("cli-")
    thing = await create_thing(bridge, owner.token, tmp_path, thingType=kind)
    config = f"things/{thing.id}/config"

    async def cli(*args: str, check: bool = True) -> Any:
        return await asyncio.to_thread(bridge.cli, *args, check=check)

    async with thing_client(bridge, thing) as dev, Inbox.of(dev) as inbox:
        await subscribe_device(dev, thing.id)
        assert await inbox.take(config) == DEFAULT_DOC

        async def online() -> bool:
            return (await state(bridge, owner, thing.id))["presence"]["state"] == "online"

        await wait_for(online)

        done = await cli("config", "set", thing.id, "--owner", owner.name, "--app-param", '{"k":1}')
        assert orjson.loads(done.stdout) == doc(AppParam={"k": 1})
        # written by another process: the serving process publishes it within its outbox poll
        assert await inbox.take(config, timeout=5) == doc(AppParam={"k": 1})
        assert await mqtt_status(dev, inbox, thing.id, {"status": "Alive"}) == "new"

        row = status_row((await cli("status", "--owner", owner.name)).stdout, thing.id)
        assert row[1:5] == [kind, "online", "new", "Alive"], row
        code, body = await portal(bridge, "POST", "/GetConfig", {"regId": thing.id})
        assert (code, body) == (200, {"UpdateRate": 24, "AppParam": {"k": 1}})
        row = status_row((await cli("status", "--owner", owner.name, "--type", kind)).stdout, thing.id)
        assert row[1:5] == [kind, "online", "sync", "Alive"], row

        # fleet defaults from the command line
        done = await cli("config", "defaults", kind, "--owner", owner.name, "--update-rate", "9")
        assert orjson.loads(done.stdout) == {"thingType": kind, "defaults": {"UpdateRate": 9}}
        assert await inbox.take(config, timeout=5) == doc(AppParam={"k": 1}, UpdateRate=9)
        code, reply = await operator(bridge, owner.token, "GET", f"/fleet/defaults/{kind}")
        assert code == 200 and reply["result"]["defaults"] == {"UpdateRate": 9}

        # --clear inherits again
        await cli("config", "set", thing.id, "--owner", owner.name, "--clear", "AppParam")
        assert await inbox.take(config, timeout=5) == doc(UpdateRate=9)
        assert (await state(bridge, owner, thing.id))["desired"] == {}

    # errors are reported, not crashes
    bad = await cli(
        "config", "set", "no-such-thing", "--owner", owner.name, "--update-rate", "3", check=False
    )
    assert bad.returncode == 1 and "not found" in bad.stderr
    bad = await cli("config", "set", thing.id, "--owner", owner.name, "--app-param", "{bad", check=False)
    assert bad.returncode == 1 and "--app-param" in bad.stderr
    bad = await cli("config", "set", thing.id, "--owner", owner.name, "--update-rate", "0", check=False)
    assert bad.returncode == 1 and "UpdateRate" in bad.stderr
    assert (await state(bridge, owner, thing.id))["desired"] == {}
    # after the device disconnected, status shows it offline

    async def offline() -> bool:
        return (await state(bridge, owner, thing.id))["presence"]["state"] == "offline"

    await wait_for(offline)
    row = status_row((await cli("status", "--owner", owner.name)).stdout, thing.id)
    assert row[2] == "offline", row


# ---- bad input on the portal ---------------------------------------------------------------------------
@dataclass
class Target:
    owner: Owner
    thing: ThingFiles


@pytest.fixture(scope="module")
def target(bridge: Bridge, owner: Owner, tmp_path_factory: pytest.TempPathFactory) -> Target:
    async def setup() -> Target:
        thing = await create_thing(bridge, owner.token, tmp_path_factory.mktemp("portal"))
        await desired(bridge, owner, thing.id, {"AppParam": {"a": 1}, "version": 1})
        return Target(owner, thing)

    return asyncio.run(setup())


REG = "<reg>"
GET_CASES = {
    "SetStatus missing regId": ("/SetStatus", {"status": "Alive"}),
    "SetStatus empty regId": ("/SetStatus", {"regId": "", "status": "Alive"}),
    "SetStatus unknown regId": ("/SetStatus", {"regId": "no-such-reg", "status": "Alive"}),
    "SetStatus missing status": ("/SetStatus", {"regId": REG}),
    "SetStatus empty status": ("/SetStatus", {"regId": REG, "status": ""}),
    "SetStatus status too long": ("/SetStatus", {"regId": REG, "status": "x" * 257}),
    "GetURL missing regId": ("/GetURL", {}),
    "GetURL unknown regId": ("/GetURL", {"regId": "no-such-reg"}),
    "GetConfig missing regId": ("/GetConfig", {}),
    "GetConfig unknown regId": ("/GetConfig", {"regId": "no-such-reg"}),
}
POST_CASES: dict[str, tuple[str, Any]] = {
    "SetStatus missing regId": ("/SetStatus", {"status": "Alive"}),
    "SetStatus null regId": ("/SetStatus", {"regId": None, "status": "Alive"}),
    "SetStatus unknown regId": ("/SetStatus", {"regId": "no-such-reg", "status": "Alive"}),
    "SetStatus regId number": ("/SetStatus", {"regId": 123, "status": "Alive"}),
    "SetStatus regId list": ("/SetStatus", {"regId": [REG], "status": "Alive"}),
    "SetStatus missing status": ("/SetStatus", {"regId": REG}),
    "SetStatus null status": ("/SetStatus", {"regId": REG, "status": None}),
    "SetStatus status number": ("/SetStatus", {"regId": REG, "status": 1}),
    "SetStatus status boolean": ("/SetStatus", {"regId": REG, "status": True}),
    "SetStatus status object": ("/SetStatus", {"regId": REG, "status": {"s": "Alive"}}),
    "SetStatus empty status": ("/SetStatus", {"regId": REG, "status": ""}),
    "SetStatus info string": ("/SetStatus", {"regId": REG, "status": "Alive", "info": "up"}),
    "SetStatus info list": ("/SetStatus", {"regId": REG, "status": "Alive", "info": [1]}),
    "SetStatus info number": ("/SetStatus", {"regId": REG, "status": "Alive", "info": 5}),
    "SetStatus malformed JSON": ("/SetStatus", b'{"regId": '),
    "SetStatus not UTF-8": ("/SetStatus", b"\xff\xfe"),
    "SetStatus empty body": ("/SetStatus", b""),
    "SetStatus JSON array": ("/SetStatus", b'[{"regId": "<reg>", "status": "Alive"}]'),
    "SetStatus JSON string": ("/SetStatus", b'"Alive"'),
    "GetURL missing regId": ("/GetURL", {"DeviceInfo": {}}),
    "GetURL unknown regId": ("/GetURL", {"regId": "no-such-reg"}),
    "GetURL regId number": ("/GetURL", {"regId": 7}),
    "GetURL DeviceInfo string": ("/GetURL", {"regId": REG, "DeviceInfo": "model=x"}),
    "GetURL DeviceInfo list": ("/GetURL", {"regId": REG, "DeviceInfo": [["model", "x"]]}),
    "GetURL malformed JSON": ("/GetURL", b"{regId: x}"),
    "GetURL JSON array": ("/GetURL", b"[]"),
    "GetConfig missing regId": ("/GetConfig", {}),
    "GetConfig unknown regId": ("/GetConfig", {"regId": "no-such-reg"}),
    "GetConfig regId number": ("/GetConfig", {"regId": 7.5}),
    "GetConfig DeviceInfo string": ("/GetConfig", {"regId": REG, "DeviceInfo": "x"}),
    "GetConfig malformed JSON": ("/GetConfig", b"nope"),
    "GetConfig JSON number": ("/GetConfig", b"42"),
}
CASES = [pytest.param("GET", *case, id=f"GET {name}") for name, case in GET_CASES.items()] + [
    pytest.param("POST", *case, id=f"POST {name}") for name, case in POST_CASES.items()
]


def _fill(value: Any, reg: str) -> Any:
    if value == REG:
        return reg
    if isinstance(value, bytes):
        return value.replace(REG.encode(), reg.encode())
    if isinstance(value, dict):
        return {k: _fill(v, reg) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, reg) for v in value]
    return value


@pytest.mark.parametrize(("method", "path", "request_body"), CASES)
async def test_portal_bad_input_is_400_and_stores_nothing(
    bridge: Bridge, target: Target, method: str, path: str, request_body: Any
) -> None:
    thing_id = target.thing.id
    before_messages = await status_messages(bridge, target.owner, thing_id)
    before_state = await state(bridge, target.owner, thing_id)
    body = _fill(request_body, thing_id)
    if isinstance(body, bytes):
        code, reply = await portal(bridge, method, path, raw=body)
    else:
        code, reply = await portal(bridge, method, path, body)
    assert code == 400, reply
    assert isinstance(reply, dict) and set(reply) == {"error"}, reply
    assert isinstance(reply["error"], str) and reply["error"], reply
    assert await status_messages(bridge, target.owner, thing_id) == before_messages
    assert await state(bridge, target.owner, thing_id) == before_state


async def test_portal_bad_input_leaves_the_device_working(bridge: Bridge, target: Target) -> None:
    """After all the bad requests the same thing still walks the cycle: nothing half-applied.
    The desired version 1 was never confirmed, so it is reboot, then sync after GetURL."""
    dev = PortalDevice(bridge, "POST", target.thing.id)
    before = await status_messages(bridge, target.owner, target.thing.id)
    code, body = await portal(bridge, "POST", "/SetStatus", {"regId": target.thing.id, "status": "Alive"})
    assert (code, body) == (200, {"config": "reboot"})
    await dev.get_url()
    assert await dev.set_status() == "new"
    assert await dev.get_config() == {"UpdateRate": 24, "AppParam": {"a": 1}}
    assert await dev.set_status() == "sync"
    assert len(await status_messages(bridge, target.owner, target.thing.id)) == len(before) + 3
    # unknown fields are ignored, as device firmware may send more than the document names
    code, body = await portal(
        bridge, "POST", "/SetStatus", {"regId": target.thing.id, "status": "Alive", "extra": [1]}
    )
    assert (code, body) == (200, {"config": "sync"})


# ---- bad input on the operator side ---------------------------------------------------------------------
BAD_CHANGES: list[Any] = [
    {"Bogus": 1},
    {"UpdateRate": 6, "Bogus": 1},
    {"updaterate": 6},
    {"UpdateRate": 0},
    {"UpdateRate": -1},
    {"UpdateRate": 8761},
    {"UpdateRate": "6"},
    {"UpdateRate": 6.5},
    {"UpdateRate": True},
    {"AppParam": [1]},
    {"AppParam": "x"},
    {"AppParam": 1},
    {"data": "x"},
    {"packageUrl": 5},
    {"version": -1},
    {"version": "2"},
    {"version": 1.5},
    {},
    b"",
    b"{not json",
    b"[]",
    b'"x"',
]


async def test_operator_bad_input_is_400_and_changes_nothing(
    bridge: Bridge, owner: Owner, stranger: Owner, tmp_path: Path
) -> None:
    kind = unique("op-bad-")
    thing = await create_thing(bridge, owner.token, tmp_path, thingType=kind)
    await desired(bridge, owner, thing.id, {"UpdateRate": 5})
    before = await state(bridge, owner, thing.id)
    defaults_before = (await operator(bridge, owner.token, "GET", f"/fleet/defaults/{kind}"))[1]["result"]
    for change in [*BAD_CHANGES, {"regId": 5}, {"regId": "has space"}, {"regId": ""}]:
        path = f"/things/{thing.id}/desired"
        kwargs = {"raw": change} if isinstance(change, bytes) else {"body": change}
        code, reply = await operator(bridge, owner.token, "PATCH", path, **kwargs)
        assert_error_envelope(code, reply, 400)
    for change in [*BAD_CHANGES, {"regId": "alias-x"}]:
        kwargs = {"raw": change} if isinstance(change, bytes) else {"body": change}
        code, reply = await operator(bridge, owner.token, "PATCH", f"/fleet/defaults/{kind}", **kwargs)
        assert_error_envelope(code, reply, 400)
    code, reply = await operator(
        bridge, owner.token, "PATCH", "/fleet/defaults/bad%20type", {"UpdateRate": 2}
    )
    assert_error_envelope(code, reply, 400)
    assert await state(bridge, owner, thing.id) == before
    assert (await operator(bridge, owner.token, "GET", f"/fleet/defaults/{kind}"))[1][
        "result"
    ] == defaults_before

    # another user's thing is not found, and stays untouched
    other = stranger
    for method, path, body in (
        ("GET", f"/things/{thing.id}/state", None),
        ("PATCH", f"/things/{thing.id}/desired", {"UpdateRate": 1}),
        ("GET", "/things/no-such-thing/state", None),
        ("PATCH", "/things/no-such-thing/desired", {"UpdateRate": 1}),
    ):
        code, reply = await operator(bridge, other.token, method, path, body)
        assert_error_envelope(code, reply, 404)
    code, reply = await operator(bridge, other.token, "GET", "/fleet")
    assert code == 200 and thing.id not in [row["flthingspk"] for row in reply["result"]]
    # another user's fleet defaults do not reach this user's things
    await fleet_defaults(bridge, other, kind, {"AppParam": {"theirs": True}})
    assert await state(bridge, owner, thing.id) == before
    # without a token: 401
    code, reply = await operator(bridge, None, "PATCH", f"/things/{thing.id}/desired", {"UpdateRate": 1})
    assert_error_envelope(code, reply, 401)
    code, reply = await operator(bridge, None, "GET", f"/things/{thing.id}/state")
    assert_error_envelope(code, reply, 401)
    assert await state(bridge, owner, thing.id) == before
