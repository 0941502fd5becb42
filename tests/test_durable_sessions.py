"""Persistent sessions survive a restart (issue #14): kill -9 the bridge with QoS 1 messages queued
for offline things and in flight to an online one, restart it on the same data directory, and every
message arrives once, in order (DUP only on those that were in flight), none again after its
PUBACK; subscriptions and CONNACK session-present come back; an expired or deleted thing's session
is gone from the database."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import aiomqtt
import orjson
import pytest

from tests import mqttraw
from tests.conftest import Bridge, on_each_store, store_bridge, write_config
from tests.helpers import (
    Account,
    ThingFiles,
    account,
    app_client,
    call,
    certified_device,
    create_thing,
    firmware_product,
    next_message,
    ok,
    rows,
    thing_client,
    unique,
)

HOST = "127.0.0.1"
OFFLINE_THINGS = 10
PER_THING = 100  # 1,000 queued for the offline things
IN_FLIGHT = 100
APP_PASSWORD = "app-password-1"
EXPIRY = 2  # seconds: session_expiry in the expiry test, after its restart


class Raw:
    """A thing's MQTT connection in raw packets: the CONNACK's session-present flag, each PUBLISH's
    DUP flag, and PUBACKs only when the test sends them."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, present: bool) -> None:
        self.reader, self.writer, self.session_present = reader, writer, present

    @classmethod
    async def connect(cls, bridge: Bridge, thing: ThingFiles) -> Raw:
        """Clean session off."""
        tls = bridge.client_tls(thing.cert, thing.key)
        reader, writer = await asyncio.open_connection(HOST, bridge.ports["mqtt_tls"], ssl=tls)
        writer.write(mqttraw.connect(thing.id, clean=False))
        async with asyncio.timeout(10):
            kind, _flags, body = await mqttraw.read_packet(reader)
        assert kind == 2 and body[1] == 0, body  # CONNACK, accepted
        return cls(reader, writer, bool(body[0] & 1))

    async def subscribe(self, topic: str) -> None:
        self.writer.write(mqttraw.subscribe(topic, qos=1))
        async with asyncio.timeout(10):
            kind, _flags, body = await mqttraw.read_packet(self.reader)
        assert kind == 9 and body[2:] == b"\x01", body  # SUBACK, QoS 1 granted

    async def unsubscribe(self, topic: str) -> None:
        raw = topic.encode()
        body = struct.pack("!HH", 2, len(raw)) + raw
        self.writer.write(bytes([0xA2, len(body)]) + body)
        async with asyncio.timeout(10):
            kind, _flags, body = await mqttraw.read_packet(self.reader)
        assert kind == 11, body  # UNSUBACK

    async def receive(self, count: int, *, ack: bool) -> list[tuple[bytes, int, bool]]:
        """The next `count` PUBLISHes as (payload, packet id, dup), acknowledged one by one if `ack`."""
        got = []
        async with asyncio.timeout(30):
            while len(got) < count:
                kind, flags, body = await mqttraw.read_packet(self.reader)
                assert kind == 3, (kind, body)
                _topic, packet_id, payload, dup = mqttraw.parse_publish(flags, body)
                assert packet_id is not None and flags & 0x06 == 0x02  # QoS 1
                got.append((payload, packet_id, dup))
                if ack:
                    self.writer.write(b"\x40\x02" + struct.pack("!H", packet_id))
        return got

    async def close(self) -> None:
        self.writer.write(b"\xe0\x00")  # DISCONNECT
        self.writer.close()
        await self.writer.wait_closed()


async def until(condition, timeout: float = 15) -> None:  # type: ignore[no-untyped-def]
    """Poll a condition on the database (the state the bridge writes behind an acknowledgement)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def publish_all(bridge: Bridge, tok: str, plan: dict[str, list[bytes]]) -> None:
    """Each thing's payloads in order (one at a time: a 200 means committed and queued), the
    things in parallel."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {tok}"}) as http:

        async def one_thing(thing_id: str, payloads: list[bytes]) -> None:
            for payload in payloads:
                async with http.post(f"{bridge.api}/things/{thing_id}/publish", data=payload) as r:
                    assert r.status == 200, await r.text()

        await asyncio.gather(*(one_thing(t, p) for t, p in plan.items()))


def payloads(thing: ThingFiles, count: int, tag: str = "m") -> list[bytes]:
    return [f"{thing.id}:{tag}{i:03d}".encode() for i in range(count)]


@pytest.fixture
def restartable(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    yield from store_bridge(request, tmp_path_factory, accounts={"free_plan_things": OFFLINE_THINGS + 1})


def persistent_app(bridge: Bridge, name: str) -> aiomqtt.Client:
    return app_client(bridge, name, APP_PASSWORD, f"app:{name}:durable", clean_session=False)


async def things(bridge: Bridge, owner: Account, folder: Path, n: int) -> list[ThingFiles]:
    return list(await asyncio.gather(*(create_thing(bridge, owner.token, folder) for _ in range(n))))


@on_each_store("restartable")
async def test_kill_9_with_queued_and_in_flight_messages_delivers_each_once_in_order(
    restartable: Bridge, tmp_path: Path
) -> None:
    bridge = restartable
    alice = account(bridge)
    *offline, online = await things(bridge, alice, tmp_path, OFFLINE_THINGS + 1)
    app = unique("app")
    bridge.cli("app", "add", app, "--owner", alice.name, "--password", APP_PASSWORD)
    async with persistent_app(bridge, app) as listener:  # an application's session, offline too
        await listener.subscribe(f"things/{online.id}/publish", qos=1)

    for thing in offline:  # subscribed, then gone
        raw = await Raw.connect(bridge, thing)
        assert not raw.session_present
        await raw.subscribe(f"things/{thing.id}/publish")
        await raw.close()
    live = await Raw.connect(bridge, online)
    await live.subscribe(f"things/{online.id}/publish")

    plan = {t.id: payloads(t, PER_THING) for t in offline}
    plan[online.id] = payloads(online, IN_FLIGHT)
    await publish_all(bridge, alice.token, plan)
    before = await live.receive(IN_FLIGHT, ack=False)  # received, never acknowledged
    assert [p for p, _, dup in before] == plan[online.id] and not any(dup for _, _, dup in before)

    bridge.kill()  # SIGKILL
    bridge.start()

    live = await Raw.connect(bridge, online)
    assert live.session_present
    again = await live.receive(IN_FLIGHT, ack=True)
    assert [p for p, _, _ in again] == plan[online.id]  # DUP allowed: these were in flight
    for thing in offline:
        raw = await Raw.connect(bridge, thing)
        assert raw.session_present
        got = await raw.receive(PER_THING, ack=True)
        assert [p for p, _, _ in got] == plan[thing.id]
        assert not any(dup for _, _, dup in got)  # never sent before the restart
        await raw.close()
    await live.close()
    async with persistent_app(bridge, app) as listener:  # acknowledges as it receives
        heard = [(await next_message(listener, 10)).payload for _ in range(IN_FLIGHT)]
    assert heard == plan[online.id]

    # Every PUBACK recorded: a second kill -9 brings none of them back. Subscriptions are restored
    # without any SUBSCRIBE: what is published while the things are offline is queued for them.
    await until(lambda: rows(bridge, "SELECT count(*) FROM mqtt_queue") == [(0,)])
    bridge.kill()
    bridge.start()
    markers = {t.id: payloads(t, 1, "after") for t in [*offline, online]}
    await publish_all(bridge, alice.token, markers)
    for thing in [*offline, online]:
        raw = await Raw.connect(bridge, thing)
        assert raw.session_present
        [(payload, _, dup)] = await raw.receive(1, ack=True)
        assert (payload, dup) == (markers[thing.id][0], False)  # the first one is the new one
        await raw.close()

    # A deleted thing's session and its queued messages are gone with it.
    gone = offline[0].id
    await publish_all(bridge, alice.token, {gone: payloads(offline[0], 3, "late")})
    assert rows(bridge, "SELECT count(*) FROM mqtt_queue q WHERE q.client_id = ?", gone) == [(3,)]
    ok(await call("DELETE", f"{bridge.api}/things/{gone}", alice.token))
    for table in ("mqtt_sessions", "mqtt_subscriptions", "mqtt_queue"):
        assert rows(bridge, f"SELECT count(*) FROM {table} WHERE client_id = ?", gone) == [(0,)]


async def test_an_expired_session_is_deleted_at_restart_and_while_running(
    restartable: Bridge, tmp_path: Path
) -> None:
    bridge = restartable
    alice = account(bridge)
    stopped, running = await things(bridge, alice, tmp_path, 2)
    raw = await Raw.connect(bridge, stopped)
    await raw.subscribe(f"things/{stopped.id}/publish")
    await raw.close()
    await publish_all(bridge, alice.token, {stopped.id: payloads(stopped, 2)})
    assert rows(bridge, "SELECT count(*) FROM mqtt_queue WHERE client_id = ?", stopped.id) == [(2,)]

    # Offline longer than session_expiry while the bridge was down: deleted when it starts, with
    # its subscriptions and queued messages; the thing then gets a new session.
    bridge.kill()
    write_config(
        bridge.folder, accounts={"free_plan_things": OFFLINE_THINGS + 1}, mqtt={"session_expiry": EXPIRY}
    )
    [(disconnected,)] = rows(bridge, "SELECT disconnected FROM mqtt_sessions WHERE client_id = ?", stopped.id)
    await until(lambda: time.time() > disconnected + EXPIRY + 1)  # the clock passes the expiry
    bridge.start()
    for table in ("mqtt_sessions", "mqtt_subscriptions", "mqtt_queue"):
        assert rows(bridge, f"SELECT count(*) FROM {table}") == [(0,)]
    raw = await Raw.connect(bridge, stopped)
    assert not raw.session_present
    await raw.close()

    # While running: the session monitor deletes it once it has been offline for that long.
    raw = await Raw.connect(bridge, running)
    await raw.subscribe(f"things/{running.id}/publish")
    await raw.subscribe(f"things/{running.id}/status/accepted")
    await raw.unsubscribe(f"things/{running.id}/status/accepted")  # on disk before its UNSUBACK
    await raw.close()
    subscribed = rows(bridge, "SELECT topic_filter FROM mqtt_subscriptions WHERE client_id = ?", running.id)
    assert subscribed == [(f"things/{running.id}/publish",)]
    await until(lambda: not rows(bridge, "SELECT 1 FROM mqtt_sessions WHERE client_id = ?", running.id))


async def test_a_re_certified_thing_resumes_its_own_session_before_and_after_a_restart(
    restartable: Bridge, tmp_path: Path
) -> None:
    """A new certificate (a new CSR with the CIK) is the same thing's: its persistent session, with
    what was queued for it, resumes on the new certificate (it was closed and dead before), in
    memory and after kill -9; the connection that resumed it may publish."""
    bridge = restartable
    alice = account(bridge)
    product = await firmware_product(bridge, alice)
    sn = unique("DUR-")
    csv = {"Content-Type": "text/csv"}
    enrolled = await call("POST", f"{bridge.http}/fw/v1/manage/products/{product.id}/serials", alice.token,
                          data=f"{sn}\n".encode(), headers=csv)  # fmt: skip
    assert enrolled.status == 200, enrolled.body
    device = (await call("POST", f"{bridge.http}/fw/v1/activate", json={"serialNumber": sn})).json
    thing, cik = device["thingId"], device["apiKey"]
    first = await certified_device(bridge, tmp_path / "first", thing, cik)
    raw = await Raw.connect(bridge, first)
    await raw.subscribe(f"things/{thing}/publish")
    await raw.subscribe(f"things/{thing}/status/accepted")
    await raw.close()

    await publish_all(bridge, alice.token, {thing: [b"before"]})
    second = await certified_device(bridge, tmp_path / "second", thing, cik)
    with pytest.raises(aiomqtt.MqttCodeError):  # the replaced certificate, accepted just before: refused
        async with thing_client(bridge, first):
            pass
    await publish_all(bridge, alice.token, {thing: [b"between"]})
    raw = await Raw.connect(bridge, second)
    assert raw.session_present
    assert [p for p, _, _ in await raw.receive(2, ack=True)] == [b"before", b"between"]
    raw.writer.write(mqttraw.publish(f"things/{thing}/status", b'{"status": "ok"}'))  # not cut off
    [(answer, _, _)] = await raw.receive(1, ack=True)
    assert b"config" in answer
    await raw.close()

    await publish_all(bridge, alice.token, {thing: [b"queued"]})
    third = await certified_device(bridge, tmp_path / "third", thing, cik)
    bridge.kill()
    bridge.start()
    raw = await Raw.connect(bridge, third)
    assert raw.session_present
    assert [p for p, _, _ in await raw.receive(1, ack=True)] == [b"queued"]
    await raw.close()

    # a clean session replacing it discards the stored one: its rows, queued messages included
    await publish_all(bridge, alice.token, {thing: [b"discarded"]})
    assert rows(bridge, "SELECT count(*) FROM mqtt_queue") == [(1,)]
    async with thing_client(bridge, third, clean_session=True):
        pass
    for table in ("mqtt_sessions", "mqtt_subscriptions", "mqtt_queue"):
        await until(lambda table=table: rows(bridge, f"SELECT count(*) FROM {table}") == [(0,)])


@on_each_store("restartable")
async def test_a_message_and_its_queue_rows_commit_together(restartable: Bridge, tmp_path: Path) -> None:
    """A message for a persistent session is stored and queued in one transaction: when its queue
    row cannot be written (a trigger the test adds to the live database refuses it), the message
    is not stored either and not acknowledged, over HTTP (publish) and MQTT (collect, QoS 1)."""
    bridge = restartable
    alice = account(bridge)
    [thing] = await things(bridge, alice, tmp_path, 1)
    app = unique("app")
    bridge.cli("app", "add", app, "--owner", alice.name, "--password", APP_PASSWORD)
    async with persistent_app(bridge, app) as listener:
        await listener.subscribe(f"things/{thing.id}/collect", qos=1)
    raw = await Raw.connect(bridge, thing)
    await raw.subscribe(f"things/{thing.id}/publish")
    await raw.close()

    def stored(payload: bytes) -> int:
        return rows(bridge, "SELECT count(*) FROM messages WHERE payload = ?", payload)[0][0]

    if bridge.store_url == "sqlite:":
        rows(
            bridge,
            "CREATE TRIGGER refuse_queue BEFORE INSERT ON mqtt_queue BEGIN SELECT RAISE(ABORT, 'injected'); END",
        )
    else:
        rows(
            bridge,
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " RAISE EXCEPTION 'injected' USING ERRCODE = 'check_violation'; END $$;"
            " CREATE TRIGGER refuse_queue BEFORE INSERT ON mqtt_queue FOR EACH ROW EXECUTE FUNCTION refuse()",
        )
    refused = await call("POST", f"{bridge.api}/things/{thing.id}/publish", alice.token, data=b"lost-http")
    assert refused.status >= 400, refused.body
    raw = await Raw.connect(bridge, thing)
    raw.writer.write(mqttraw.publish(f"things/{thing.id}/collect", b"lost-mqtt", qos=1, packet_id=7))
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):  # closed, never acknowledged
        async with asyncio.timeout(10):
            while True:
                kind, _flags, body = await mqttraw.read_packet(raw.reader)
                assert kind != 4, body  # a PUBACK would be a lie
    assert stored(b"lost-http") == 0 and stored(b"lost-mqtt") == 0
    assert rows(bridge, "SELECT count(*) FROM mqtt_queue") == [(0,)]

    rows(bridge, "DROP TRIGGER refuse_queue" + ("" if bridge.store_url == "sqlite:" else " ON mqtt_queue"))
    await publish_all(bridge, alice.token, {thing.id: [b"kept"]})
    assert stored(b"kept") == 1
    assert rows(bridge, "SELECT count(*) FROM mqtt_queue WHERE client_id = ?", thing.id) == [(1,)]


async def test_a_restart_restores_retained_documents_without_queueing_them_again(
    restartable: Bridge, tmp_path: Path
) -> None:
    """At start-up the bridge puts every retained document (config, presence, upgrade notices,
    firmware targets) back into the broker; a persistent session that already received them gets
    none of them a second time, while a new subscriber still receives them as retained."""
    bridge = restartable
    alice = account(bridge)
    [thing] = await things(bridge, alice, tmp_path, 1)
    raw = await Raw.connect(bridge, thing)
    await raw.subscribe(f"things/{thing.id}/publish")
    await raw.subscribe(f"things/{thing.id}/config")
    [(config, _, _)] = await raw.receive(1, ack=True)  # the retained config, on subscribe
    await raw.close()
    await until(lambda: rows(bridge, "SELECT count(*) FROM mqtt_queue") == [(0,)])

    for _ in range(2):
        bridge.kill()
        bridge.start()
        await publish_all(bridge, alice.token, {thing.id: [b"marker"]})
        raw = await Raw.connect(bridge, thing)
        assert raw.session_present
        [(first, _, _)] = await raw.receive(1, ack=True)
        assert first == b"marker"  # nothing queued before it: the config was not routed again
        await raw.close()
    async with thing_client(bridge, thing, f"{thing.id}:fresh") as fresh:
        await fresh.subscribe(f"things/{thing.id}/config", qos=1)
        assert (await next_message(fresh, 10)).payload == config  # still retained


async def test_a_thing_online_at_a_kill_is_offline_after_the_restart(
    restartable: Bridge, tmp_path: Path
) -> None:
    """Presence is published from memory once committed, not through the outbox (issue #14): a
    thing online when the bridge is killed is offline after the restart, routed to a persistent
    application session and retained for a new subscriber; a presence document an earlier version
    left in the outbox is not published after it."""
    bridge = restartable
    alice = account(bridge)
    [thing, other] = await things(bridge, alice, tmp_path, 2)
    presence = f"things/{thing.id}/presence"
    app = unique("app")
    bridge.cli("app", "add", app, "--owner", alice.name, "--password", APP_PASSWORD)
    async with persistent_app(bridge, app) as listener:
        await listener.subscribe(presence, qos=1)
        live = await Raw.connect(bridge, thing)
        while True:  # the retained state from before, then the thing's own connect
            message = await next_message(listener, 10)
            if orjson.loads(message.payload)["state"] == "online" and not message.retain:
                break
    stale = orjson.dumps({"state": "online", "ts": time.time() + 60})
    rows(bridge, "INSERT INTO outbox (topic, payload, retain) VALUES (?, ?, 1)", presence, stale)
    bridge.kill()
    live.writer.close()
    bridge.start()

    async with persistent_app(bridge, app) as listener:  # queued for the session while it was away
        # (the "online" again first when its PUBACK was not recorded before the kill: in flight)
        states = [orjson.loads((await next_message(listener, 10)).payload)["state"]]
        if states == ["online"]:
            states.append(orjson.loads((await next_message(listener, 10)).payload)["state"])
        assert states[-1] == "offline", states
    # a marker after it: the outbox is drained (the other thing's config document) by now
    async with thing_client(bridge, other, f"{other.id}:marker") as marker:
        await marker.subscribe(f"things/{other.id}/config", qos=1)
        await next_message(marker, 10)
    async with app_client(bridge, app, APP_PASSWORD, f"app:{app}:fresh") as viewer:
        await viewer.subscribe(presence, qos=1)
        retained = await next_message(viewer, 10)
        assert retained.retain and orjson.loads(retained.payload)["state"] == "offline"
    assert rows(bridge, "SELECT count(*) FROM outbox WHERE topic = ?", presence) == [(0,)]


async def test_a_graceful_stop_records_its_things_offline(restartable: Bridge, tmp_path: Path) -> None:
    """SIGTERM: every thing connected to the stopping bridge is recorded offline before it exits, so
    what reads the database while it is down (`thingbridge status`) does not see them online."""
    bridge = restartable
    alice = account(bridge)
    [thing] = await things(bridge, alice, tmp_path, 1)
    live = await Raw.connect(bridge, thing)
    await until(
        lambda: rows(bridge, "SELECT state FROM presence WHERE thing_id = ?", thing.id) == [("online",)]
    )
    assert bridge.stop() == 0
    live.writer.close()
    assert rows(bridge, "SELECT state FROM presence WHERE thing_id = ?", thing.id) == [("offline",)]
    bridge.start()
