"""Issue #9 items 1-3: revoking a thing (DELETE, or PATCH {"enabled": false}) while it publishes at
full speed, while HTTP collects are in flight, and while its CONNECTs race the revocation; then
re-creating its id for another user. Against the real `thingbridge serve` process, over real TLS
with the thing's own certificate, on loopback. The racy scenarios run ROUNDS times each; every
round is bounded, and a round's findings are gathered so one failure reports all rounds."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests import mqttraw
from tests.conftest import Bridge
from tests.helpers import Account, Resp, ThingFiles, account, create_thing, ok, run_sync, token, unique

# 20 in a local run (THINGBRIDGE_RACE_ROUNDS=20); 5 keeps the file near a minute in the suite.
ROUNDS = int(os.environ.get("THINGBRIDGE_RACE_ROUNDS", "5"))
WINDOW = 10  # unacknowledged QoS 1 PUBLISHes the busy thing keeps in flight
FULL_SPEED = 300  # PUBACKs seen before the revocation: the publisher is at full speed by then
CLOSE_WITHIN = 0.1  # s from the revocation's HTTP response to the closed connection (the goal)
OBSERVE = 1.0  # s a connection that outlived CLOSE_WITHIN is watched (PUBACKs counted) before we hang up
RACERS = 24  # CONNECTs racing one revocation, started 1 ms apart
RACE_SETTLE = 1.5  # s after the revocation's response by which no racer may be connected
ROUND_BUDGET = 30  # s, the most one round may take whatever the server does
HOST = "127.0.0.1"
CONNACK, PUBLISH, PUBACK, SUBACK = 2, 3, 4, 9
DISCONNECT = b"\xe0\x00"
MQTT_GONE = (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError)


# ---- accounts -----------------------------------------------------------------------------------------
def roomy_account(bridge: Bridge) -> Account:
    """A user whose plan holds the many things these rounds create (the free plan allows 10)."""
    acct = account(bridge)
    bridge.cli("plan", "set", acct.name, "--things", "1000")
    return acct


@pytest.fixture(scope="module")
def alice(bridge: Bridge) -> Account:
    return roomy_account(bridge)


@pytest.fixture(scope="module")
def bob(bridge: Bridge) -> Account:
    """The other tenant, who re-creates alice's deleted ids."""
    return roomy_account(bridge)


@pytest.fixture(scope="module")
def bob_app(bridge: Bridge, bob: Account) -> tuple[str, str]:
    name = unique("bobapp")
    bridge.cli("app", "add", name, "--owner", bob.name, "--password", "bob-app-password-1")
    return name, "bob-app-password-1"


@pytest.fixture(scope="module")
def admin(bridge: Bridge) -> str:
    return run_sync(token(bridge))


# ---- HTTP ---------------------------------------------------------------------------------------------
class Api:
    """/dev/v1 over one keep-alive session (the collectors and the revocation share it)."""

    def __init__(self, bridge: Bridge, session: aiohttp.ClientSession) -> None:
        self.bridge = bridge
        self.session = session

    async def call(self, method: str, path: str, tok: str, **kw: Any) -> Resp:
        headers = {**kw.pop("headers", {}), "Authorization": f"Bearer {tok}"}
        async with self.session.request(method, self.bridge.api + path, headers=headers, **kw) as r:
            return Resp(r.status, r.headers, await r.read())

    async def revoke(self, how: str, owner: Account, thing_id: str) -> Resp:
        if how == "delete":
            return await self.call("DELETE", f"/things/{thing_id}", owner.token)
        return await self.call("PATCH", f"/things/{thing_id}", owner.token, json={"enabled": False})

    async def stats(self, admin: str) -> dict[str, Any]:
        return ok(await self.call("GET", "/broker/stats", admin))

    async def settle_stats(self, admin: str, key: str, expected: int, deadline: float) -> int:
        """Poll /broker/stats until `key` equals `expected` or the loop-time deadline passes; the
        last value seen."""
        loop = asyncio.get_running_loop()
        while True:
            value = (await self.stats(admin))[key]
            if value == expected or loop.time() >= deadline:
                return value
            await asyncio.sleep(0.02)

    async def stored(self, owner: Account, thing_id: str) -> list[dict[str, Any]]:
        """The thing's whole history, as its owner reads it."""
        records: list[dict[str, Any]] = []
        params = {"limit": "10000"}
        while True:
            page = ok(await self.call("GET", f"/things/{thing_id}/messages", owner.token, params=params))
            records += page
            if len(page) < 10000:
                return records
            params = {"limit": "10000", "after": page[-1]["flmessagespk"]}

    async def publish(self, owner: Account, thing_id: str, body: dict[str, Any]) -> bytes:
        """POST .../publish; the exact bytes sent, which is what subscribers receive."""
        payload = orjson.dumps(body)
        json_type = {"Content-Type": "application/json"}
        ok(
            await self.call(
                "POST", f"/things/{thing_id}/publish", owner.token, data=payload, headers=json_type
            )
        )
        return payload


@pytest.fixture
async def api(bridge: Bridge) -> Any:
    async with aiohttp.ClientSession() as session:
        yield Api(bridge, session)


def thing_token(thing: ThingFiles, lifetime: int = 600) -> str:
    """verifyThing: a JWT naming the thing (kid and iss), signed with its own private key."""
    key = serialization.load_pem_private_key(thing.key.read_bytes(), password=None)
    algorithm = "ES256" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS256"
    now = int(time.time())
    claims = {"iss": f"urn:thing:{thing.id}", "iat": now, "exp": now + lifetime}
    return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": thing.id})  # type: ignore[arg-type]


async def new_thing(bridge: Bridge, owner: Account, folder: Path, thing_id: str | None = None) -> ThingFiles:
    body: dict[str, Any] = {"keyType": "EC"}  # EC: quick to issue and to handshake, many per round
    if thing_id is not None:
        body["flthingspk"] = thing_id
    return await create_thing(bridge, owner.token, folder, **body)


def fresh_id() -> str:
    return f"reused-{uuid.uuid4().hex[:12]}"


# ---- raw MQTT -----------------------------------------------------------------------------------------
@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool


class Raw:
    """One raw MQTT connection: a thing's over TLS with its certificate, or an application's on the
    plain listener."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def thing(
        cls, bridge: Bridge, tls: ssl.SSLContext, client_id: str, *, clean: bool = True
    ) -> tuple[Raw, int, bool]:
        """(connection, CONNACK return code, session present)."""
        reader, writer = await asyncio.open_connection(HOST, bridge.ports["mqtt_tls"], ssl=tls)
        raw = cls(reader, writer)
        writer.write(mqttraw.connect(client_id, clean=clean))
        rc, present = await raw.connack()
        return raw, rc, present

    @classmethod
    async def app(cls, bridge: Bridge, name: str, password: str) -> Raw:
        reader, writer = await asyncio.open_connection(HOST, bridge.ports["mqtt_plain"])
        raw = cls(reader, writer)
        writer.write(mqttraw.connect_login(f"app:{name}:{unique('c')}", name, password))
        assert await raw.connack() == (0, False)
        return raw

    async def connack(self) -> tuple[int, bool]:
        async with asyncio.timeout(10):
            kind, _flags, body = await mqttraw.read_packet(self.reader)
        assert kind == CONNACK, kind
        return body[1], bool(body[0] & 1)

    async def subscribe(self, topic: str) -> list[Received]:
        """SUBSCRIBE at QoS 1 and wait for the SUBACK; PUBLISHes that came first are returned."""
        self.writer.write(mqttraw.subscribe(topic, qos=1, packet_id=1))
        before: list[Received] = []
        async with asyncio.timeout(10):
            while True:
                kind, flags, body = await mqttraw.read_packet(self.reader)
                if kind == SUBACK:
                    assert body[2] == 1, f"subscription to {topic} refused: {body!r}"
                    return before
                if kind == PUBLISH:
                    before.append(self.take(flags, body))

    async def until(self, last: bytes, timeout: float = 10) -> list[Received]:
        """Every PUBLISH up to and including the one whose payload is `last` (a marker the test sent
        after everything it wants to see: what was queued or retained arrives before it)."""
        got: list[Received] = []
        async with asyncio.timeout(timeout):
            while not got or got[-1].payload != last:
                kind, flags, body = await mqttraw.read_packet(self.reader)
                if kind == PUBLISH:
                    got.append(self.take(flags, body))
        return got

    async def publish_acked(self, topic: str, payload: bytes, timeout: float = 10) -> None:
        self.writer.write(mqttraw.publish(topic, payload, qos=1, packet_id=7))
        async with asyncio.timeout(timeout):
            while (await mqttraw.read_packet(self.reader))[0] != PUBACK:
                pass

    def take(self, flags: int, body: bytes) -> Received:
        topic, packet_id, payload, _dup = mqttraw.parse_publish(flags, body)
        if packet_id is not None:
            self.writer.write(b"\x40\x02" + struct.pack("!H", packet_id))  # PUBACK
        return Received(topic, payload, bool(flags & 1))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class BusyPublisher:
    """A thing publishing QoS 1 to `things/<id>/collect` as fast as PUBACKs come, WINDOW
    unacknowledged at any time; payload {"n": <sequence>}. Records the loop time of each PUBACK and
    when the server closed the connection."""

    def __init__(self, raw: Raw, thing_id: str) -> None:
        self.raw = raw
        self.topic = f"things/{thing_id}/collect"
        self.sent = 0
        self.inflight: dict[int, int] = {}  # packet id -> sequence
        self.acked: list[tuple[float, int]] = []  # (loop time, sequence)
        self.full_speed = asyncio.Event()
        self.closed = asyncio.Event()
        self.closed_at: float | None = None  # set only when the server ended the connection
        self.stray_pubacks = 0
        self._hung_up = False

    @classmethod
    async def start(cls, bridge: Bridge, thing: ThingFiles) -> tuple[BusyPublisher, asyncio.Task[None]]:
        tls = bridge.client_tls(thing.cert, thing.key)
        raw, rc, _ = await Raw.thing(bridge, tls, f"{thing.id}:busy")
        assert rc == 0, f"CONNACK {rc}"
        pub = cls(raw, thing.id)
        return pub, asyncio.create_task(pub._run())

    def _send(self) -> None:
        seq, self.sent = self.sent, self.sent + 1
        packet_id = seq % 65535 + 1
        self.inflight[packet_id] = seq
        self.raw.writer.write(
            mqttraw.publish(self.topic, orjson.dumps({"n": seq}), qos=1, packet_id=packet_id)
        )

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for _ in range(WINDOW):
                self._send()
            while True:
                kind, _flags, body = await mqttraw.read_packet(self.raw.reader)
                if kind != PUBACK:
                    continue
                seq = self.inflight.pop(struct.unpack("!H", body[:2])[0], None)
                if seq is None:
                    self.stray_pubacks += 1
                    continue
                self.acked.append((loop.time(), seq))
                if len(self.acked) >= FULL_SPEED:
                    self.full_speed.set()
                if not self._hung_up:
                    self._send()
        except MQTT_GONE:
            if not self._hung_up:
                self.closed_at = loop.time()
        finally:
            self.closed.set()

    def hang_up(self) -> None:
        self._hung_up = True
        transport = self.raw.writer.transport
        transport.abort()  # not a graceful close: a server that keeps the session must not see a DISCONNECT


async def stop(task: asyncio.Task[Any]) -> None:
    """Let a client task end (its socket is closed by now); bounded."""
    with contextlib.suppress(TimeoutError, *MQTT_GONE):
        async with asyncio.timeout(5):
            await task
    task.cancel()


# ---- item 1: revocation of a busy thing --------------------------------------------------------------
@pytest.mark.parametrize("how", ["delete", "disable"])
async def test_busy_thing_is_cut_off_at_its_revocation(
    bridge: Bridge, api: Api, alice: Account, admin: str, tmp_path: Path, how: str
) -> None:
    """Issue #9 item 1. A thing at full QoS 1 speed is deleted or disabled. Its connection must be
    closed within CLOSE_WITHIN of the HTTP response; a message it sent is committed before the
    response or never (so at most WINDOW PUBACKs, of messages committed before the response, may
    still arrive after it); /broker/stats no longer counts it; a disabled thing re-enabled connects."""
    problems: list[str] = []
    closing_ms: list[str] = []
    late_pubacks: list[int] = []
    loop = asyncio.get_running_loop()
    for n in range(ROUNDS):
        async with asyncio.timeout(ROUND_BUDGET):
            thing = await new_thing(bridge, alice, tmp_path / f"r{n}")
            connections = (await api.stats(admin))["connections"]
            pub, runner = await BusyPublisher.start(bridge, thing)
            try:
                async with asyncio.timeout(15):
                    await pub.full_speed.wait()
                ok(await api.revoke(how, alice, thing.id))
                revoked_at = loop.time()
                # Everything committed before the response is visible now; anything more, later,
                # was committed after it.
                count_at_response = len(await api.stored(alice, thing.id)) if how == "disable" else 0
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(revoked_at + CLOSE_WITHIN):
                        await pub.closed.wait()
                if not pub.closed.is_set():  # the defect: watch what it does for a bounded while
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(OBSERVE):
                            await pub.closed.wait()
            finally:
                pub.hang_up()
                await stop(runner)
            late = [seq for at, seq in pub.acked if at > revoked_at]
            late_pubacks.append(len(late))
            round_problems: list[str] = []
            if pub.closed_at is None:
                round_problems.append(
                    f"connection still open {(CLOSE_WITHIN + OBSERVE) * 1000:.0f} ms after the response"
                    f" ({len(late)} PUBACKs after the response)"
                )
                closing_ms.append("open")
            else:
                closed_in = pub.closed_at - revoked_at
                closing_ms.append(f"{closed_in * 1000:.1f}")
                if closed_in > CLOSE_WITHIN:
                    round_problems.append(
                        f"connection closed {closed_in * 1000:.0f} ms after the response"
                        f" (goal {CLOSE_WITHIN * 1000:.0f} ms)"
                    )
            # At the response at most WINDOW messages were committed and not yet acknowledged to us.
            if len(late) > WINDOW:
                round_problems.append(f"{len(late)} PUBACKs after the response (at most {WINDOW} allowed)")
            if pub.stray_pubacks:
                round_problems.append(f"{pub.stray_pubacks} PUBACKs for packet ids not in flight")
            left = await api.settle_stats(admin, "connections", connections, loop.time() + 1)
            if left != connections:
                round_problems.append(f"/broker/stats connections {left}, expected {connections}")

            if how == "disable":
                records = await api.stored(alice, thing.id)
                kept = {r["message"]["n"] for r in records}
                lost = [seq for _, seq in pub.acked if seq not in kept]
                if lost:
                    round_problems.append(f"{len(lost)} PUBACKed messages not stored (first: {lost[:5]})")
                if len(records) != count_at_response:
                    round_problems.append(
                        f"{len(records) - count_at_response} messages stored after the response"
                        f" ({count_at_response} at the response, {len(records)} now)"
                    )
                ok(await api.call("PATCH", f"/things/{thing.id}", alice.token, json={"enabled": True}))
                tls = bridge.client_tls(thing.cert, thing.key)
                again, rc, _ = await Raw.thing(bridge, tls, f"{thing.id}:again")
                try:
                    if rc != 0:
                        round_problems.append(f"re-enabled thing refused: CONNACK {rc}")
                    else:
                        await again.publish_acked(f"things/{thing.id}/collect", b'{"again": 1}')
                finally:
                    again.close()
                ok(await api.call("DELETE", f"/things/{thing.id}", alice.token))
            else:
                gone = await api.call("GET", f"/things/{thing.id}/messages", alice.token)
                if gone.status != 404:
                    round_problems.append(f"history of the deleted thing answered {gone.status}")
                # What the dead session still got committed would show in the re-created id's history.
                again_thing = await new_thing(bridge, alice, tmp_path / f"r{n}-again", thing.id)
                leftovers = await api.stored(alice, again_thing.id)
                if leftovers:
                    round_problems.append(
                        f"re-created id holds {len(leftovers)} messages of the deleted thing"
                    )
                ok(await api.call("DELETE", f"/things/{thing.id}", alice.token))
            problems += [f"round {n}: {p}" for p in round_problems]
    summary = (
        f"{how}: closed after the response (ms, negative: before it) per round: {', '.join(closing_ms)};"
        f" PUBACKs after the response: {late_pubacks}"
    )
    print(summary)
    assert not problems, summary + "\n" + "\n".join(problems)


# ---- item 2: nothing of a deleted thing outlives it ---------------------------------------------------
async def collector(
    api: Api, thing: ThingFiles, k: int, stop_event: asyncio.Event, oks: list[int], warm: asyncio.Event
) -> list[int]:
    """HTTP collects with the thing's JWT, one after another, until told to stop: the request in
    flight when the DELETE commits is the interesting one. Returns every status."""
    tok, statuses, i = thing_token(thing), [], 0
    while not stop_event.is_set():
        resp = await api.call("POST", f"/things/{thing.id}/collect", tok, json={"http": k, "i": i})
        statuses.append(resp.status)
        i += 1
        if resp.status == 200:
            oks.append(k)
            if len(oks) >= 20:
                warm.set()
    return statuses


async def test_deleted_thing_leaves_nothing_for_whoever_recreates_its_id(
    bridge: Bridge,
    api: Api,
    alice: Account,
    bob: Account,
    bob_app: tuple[str, str],
    admin: str,
    tmp_path: Path,
) -> None:
    """Issue #9 item 2. Alice's thing has a persistent session with commands queued for it, an MQTT
    publisher at full speed and HTTP collects in flight when she deletes it; Bob re-creates the id
    at once. Bob's thing must start empty: no message in its history, no retained presence of the
    old thing, no queued command of Alice's, no session to resume; Alice's old token is refused and
    nothing the old connections send reaches Bob's subscribers."""
    problems: list[str] = []
    loop = asyncio.get_running_loop()
    for n in range(ROUNDS):
        async with asyncio.timeout(ROUND_BUDGET):
            thing_id = fresh_id()
            old = await new_thing(bridge, alice, tmp_path / f"r{n}a", thing_id)
            old_tls = bridge.client_tls(old.cert, old.key)
            round_problems: list[str] = []

            # A persistent session that went offline; Alice's commands queue in it.
            connections = (await api.stats(admin))["connections"]
            queue, rc, _ = await Raw.thing(bridge, old_tls, f"{thing_id}:queue", clean=False)
            assert rc == 0
            await queue.subscribe(f"things/{thing_id}/publish")
            queue.writer.write(DISCONNECT)
            queue.close()
            # offline before the commands, so they are queued rather than sent to this connection
            assert await api.settle_stats(admin, "connections", connections, loop.time() + 5) == connections
            for k in range(3):
                await api.publish(alice, thing_id, {"alice-command": k})

            pub, runner = await BusyPublisher.start(bridge, old)
            stop_collecting, warm, oks = asyncio.Event(), asyncio.Event(), []
            collectors = [
                asyncio.create_task(collector(api, old, k, stop_collecting, oks, warm)) for k in range(4)
            ]
            try:
                async with asyncio.timeout(15):
                    await pub.full_speed.wait()
                    await warm.wait()
                ok(await api.revoke("delete", alice, thing_id))
                stop_collecting.set()  # the requests in flight finish; no new ones
                created_at = time.time()
                new = await new_thing(bridge, bob, tmp_path / f"r{n}b", thing_id)

                # Bob's application: retained and live messages of the id, up to Bob's own command.
                app = await Raw.app(bridge, *bob_app)
                try:
                    seen = await app.subscribe(f"things/{thing_id}/#")
                    marker = await api.publish(bob, thing_id, {"bob-marker": n})
                    seen += await app.until(marker)
                finally:
                    app.close()
                leaked = [msg.payload for msg in seen if msg.topic.endswith("/collect")]
                if leaked:
                    round_problems.append(
                        f"Bob's app got {len(leaked)} messages of Alice's thing, e.g. {leaked[:3]}"
                    )
                for msg in seen:
                    if msg.topic.endswith("/presence"):
                        doc = orjson.loads(msg.payload) if msg.payload else {}
                        if doc and (doc.get("ts", 0) < created_at or doc.get("state") == "online"):
                            round_problems.append(
                                f"Bob's app got the old thing's presence {doc} (retain={msg.retain});"
                                f" Bob's thing was created at {created_at:.3f} and never connected"
                            )

                # Bob's device resumes the same client id: nothing of Alice's session may be there.
                new_tls = bridge.client_tls(new.cert, new.key)
                dev, rc, present = await Raw.thing(bridge, new_tls, f"{thing_id}:queue", clean=False)
                try:
                    assert rc == 0, f"Bob's re-created thing refused: CONNACK {rc}"
                    if present:
                        round_problems.append("Bob's device resumed the deleted thing's session")
                    queued = await dev.subscribe(f"things/{thing_id}/publish")
                    marker = await api.publish(bob, thing_id, {"bob-command": n})
                    queued += await dev.until(marker)
                finally:
                    dev.close()
                foreign = [m.payload for m in queued if m.payload != marker]
                if foreign:
                    round_problems.append(f"Bob's device received Alice's queued commands: {foreign}")
            finally:
                stop_collecting.set()
                pub.hang_up()
                await stop(runner)
                async with asyncio.timeout(10):
                    results = await asyncio.gather(*collectors, return_exceptions=True)
            statuses = [s for r in results if isinstance(r, list) for s in r]
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                round_problems.append(f"HTTP collects failed: {errors[:3]}")
            if 500 in statuses:
                round_problems.append("an HTTP collect racing the delete got 500")
            if pub.closed_at is None:
                round_problems.append("Alice's publisher was still connected after Bob's checks")

            # Everything of Alice's is in by now (her connections are closed, her collects answered).
            records = await api.stored(bob, thing_id)
            bobs = {"bob-marker", "bob-command"}
            mine = [r for r in records if r["messagetype"] == "egress" and set(r["message"]) & bobs]
            if len(records) != len(mine) or len(mine) != 2:
                others = [(r["messagetype"], r["message"]) for r in records if r not in mine]
                round_problems.append(
                    f"Bob's history holds {len(records) - len(mine)} messages that are not his,"
                    f" e.g. {others[:3]}"
                )
            # A token verified (and remembered) for Alice's thing must not pass for Bob's.
            replay = await api.call("POST", f"/things/{thing_id}/collect", thing_token(old), json={"x": 1})
            if replay.status == 200:
                round_problems.append("Alice's old thing token still collects into Bob's thing")
            ok(await api.call("DELETE", f"/things/{thing_id}", bob.token))
            problems += [f"round {n}: {p}" for p in round_problems]
    assert not problems, "\n".join(problems)


# ---- item 3: CONNECTs racing the revocation -----------------------------------------------------------
class Racer:
    """One of RACERS connections of the same thing (client id `<id>:<n>`), CONNECTing while the
    thing is revoked. Reads until the server closes it; acknowledges and records what it gets."""

    def __init__(self, n: int, thing_id: str) -> None:
        self.n = n
        self.thing_id = thing_id
        self.state = "not started"  # -> connecting -> refused | accepted
        self.raw: Raw | None = None
        self.received: list[bytes] = []
        self.closed = False  # by the server

    async def run(
        self, bridge: Bridge, tls: ssl.SSLContext, connects_sent: list[int], middle: asyncio.Event
    ) -> None:
        await asyncio.sleep(self.n / 1000)  # staggered over 0-24 ms: the load shape, not a synchronisation
        self.state = "connecting"
        try:
            reader, writer = await asyncio.open_connection(HOST, bridge.ports["mqtt_tls"], ssl=tls)
            self.raw = Raw(reader, writer)
            # even: clean sessions; odd: persistent ones, which a delete must not leave behind
            writer.write(mqttraw.connect(f"{self.thing_id}:{self.n}", clean=self.n % 2 == 0))
            connects_sent.append(self.n)
            if len(connects_sent) == RACERS // 2:
                middle.set()
            kind, _flags, body = await mqttraw.read_packet(reader)
            if kind != CONNACK or body[1] != 0:
                self.state = "refused"
                return
            self.state = "accepted"
            writer.write(mqttraw.subscribe(f"things/{self.thing_id}/publish", qos=1, packet_id=1))
            while True:
                kind, flags, body = await mqttraw.read_packet(reader)
                if kind == PUBLISH:
                    self.received.append(self.raw.take(flags, body).payload)
        except MQTT_GONE:
            self.closed = True
        finally:
            if self.state == "connecting":
                self.state = "refused"  # closed before any CONNACK: refused too

    def speak(self) -> None:
        """Publish into the thing's collect topic, if this connection is (still) accepted."""
        if self.raw is not None and self.state == "accepted" and not self.closed:
            payload = orjson.dumps({"old-racer": self.n})
            self.raw.writer.write(
                mqttraw.publish(f"things/{self.thing_id}/collect", payload, qos=1, packet_id=2)
            )

    @property
    def alive(self) -> bool:
        return self.state == "accepted" and not self.closed


@pytest.mark.parametrize("how", ["delete", "disable"])
async def test_connects_racing_a_revocation_leave_no_session(
    bridge: Bridge, api: Api, alice: Account, bob: Account, admin: str, tmp_path: Path, how: str
) -> None:
    """Issue #9 item 3. RACERS connections of one thing CONNECT 1 ms apart; the revocation is sent
    once half of the CONNECTs are on the wire. RACE_SETTLE after its response every racer's socket
    must be closed by the server and /broker/stats must count none of them (after a delete: and
    keep no session). After a delete, in odd rounds Bob re-creates the id at once and sends it a
    command: no old connection may receive it, and what old connections publish then must not land
    in Bob's history. After a disable, nothing they publish is stored, and the thing re-enabled
    connects afresh."""
    problems: list[str] = []
    accepted_counts: list[int] = []
    loop = asyncio.get_running_loop()
    # Sessions nobody holds: what every round must return to once its closed clean sessions expired
    # (amqtt drops those on a 1 s tick), so a persistent session left by a delete shows.
    quiet = await api.stats(admin)
    sessions_at_rest = await api.settle_stats(admin, "sessions", quiet["connections"], loop.time() + 2.5)
    for n in range(ROUNDS):
        async with asyncio.timeout(ROUND_BUDGET):
            thing = await new_thing(bridge, alice, tmp_path / f"r{n}a", fresh_id())
            tls = bridge.client_tls(thing.cert, thing.key)
            before = await api.stats(admin)
            if how == "delete":  # a failed round's sessions may still be expiring: start from what stays
                before["sessions"] = await api.settle_stats(
                    admin, "sessions", sessions_at_rest, loop.time() + 2.5
                )
            racers = [Racer(i, thing.id) for i in range(RACERS)]
            connects_sent: list[int] = []
            middle = asyncio.Event()
            tasks = [asyncio.create_task(r.run(bridge, tls, connects_sent, middle)) for r in racers]
            recreate = how == "delete" and n % 2 == 1
            round_problems: list[str] = []
            try:
                async with asyncio.timeout(10):
                    await middle.wait()
                ok(await api.revoke(how, alice, thing.id))
                revoked_at = loop.time()
                if recreate:
                    await new_thing(bridge, bob, tmp_path / f"r{n}b", thing.id)
                    await api.publish(bob, thing.id, {"bob-command": n})
                for racer in racers:  # whoever is still connected writes into the id now
                    racer.speak()
                # every racer's task ends when the server closes (or refuses) it
                await asyncio.wait(tasks, timeout=max(0.0, revoked_at + RACE_SETTLE - loop.time()))
                alive = [r.n for r in racers if r.alive]
                # A CONNECT still unanswered (a slow handshake) is no session yet, but it must not
                # become one: give it a bounded while longer, then it must be refused or closed.
                pending = [
                    t for r, t in zip(racers, tasks, strict=True) if r.state in ("not started", "connecting")
                ]
                if pending:
                    await asyncio.wait(pending, timeout=5)
                late = [r.n for r in racers if r.alive and r.n not in alive]
                unanswered = [r.n for r in racers if r.state in ("not started", "connecting")]
            finally:
                for racer in racers:
                    if racer.raw is not None:
                        racer.raw.writer.transport.abort()
                for task in tasks:
                    await stop(task)
            accepted_counts.append(sum(1 for r in racers if r.state == "accepted"))
            if alive:
                round_problems.append(
                    f"{len(alive)} sessions of the revoked thing still connected"
                    f" {RACE_SETTLE * 1000:.0f} ms after the response: client ids {alive}"
                )
            if late:
                round_problems.append(f"CONNECTs answered late and left connected: client ids {late}")
            if unanswered:
                round_problems.append(
                    f"CONNECTs unanswered {RACE_SETTLE + 5} s after the response: {unanswered}"
                )
            # Our sockets are closed now; the server must not count any of them for long.
            left = await api.settle_stats(admin, "connections", before["connections"], loop.time() + 1)
            if left != before["connections"]:
                round_problems.append(f"/broker/stats connections {left}, expected {before['connections']}")
            if how == "delete":
                sessions = await api.settle_stats(admin, "sessions", before["sessions"], loop.time() + 2.5)
                if sessions > before["sessions"]:
                    round_problems.append(
                        f"/broker/stats sessions {sessions} 2.5 s after, {before['sessions']} before the"
                        " round: a session of the deleted thing remains"
                    )
            if recreate:
                heard = [(r.n, p) for r in racers for p in r.received]
                if heard:
                    round_problems.append(f"old connections received Bob's command: {heard}")
                foreign = [
                    r["message"] for r in await api.stored(bob, thing.id) if r["messagetype"] != "egress"
                ]
                if foreign:
                    round_problems.append(f"old connections wrote into Bob's thing: {foreign}")
                ok(await api.call("DELETE", f"/things/{thing.id}", bob.token))
            elif how == "disable":
                written = await api.stored(alice, thing.id)
                if written:
                    round_problems.append(
                        f"{len(written)} messages stored from connections of the disabled thing:"
                        f" {[r['message'] for r in written][:5]}"
                    )
                ok(await api.call("PATCH", f"/things/{thing.id}", alice.token, json={"enabled": True}))
                again, rc, _ = await Raw.thing(bridge, tls, f"{thing.id}:again")
                try:
                    if rc != 0:
                        round_problems.append(f"re-enabled thing refused: CONNACK {rc}")
                    else:
                        await again.publish_acked(f"things/{thing.id}/collect", b'{"again": 1}')
                finally:
                    again.close()
                ok(await api.call("DELETE", f"/things/{thing.id}", alice.token))
            problems += [f"round {n}: {p}" for p in round_problems]
    summary = f"{how}: CONNECTs accepted before being cut, per round: {accepted_counts}"
    print(summary)
    assert not problems, summary + "\n" + "\n".join(problems)


# ==== a long-poll across a delete ===========================================================================
async def test_a_long_poll_across_a_delete_gets_nothing_of_the_new_owner(
    bridge: Bridge, alice: Account, bob: Account, api: Api, tmp_path: Path
) -> None:
    """An HTTP device of alice's waits for commands (long-poll with its own JWT); alice deletes it,
    bob re-creates the id and sends a command: the old device's poll must not return bob's command."""
    thing_id = fresh_id()
    thing = await new_thing(bridge, alice, tmp_path / "a", thing_id)
    poll = asyncio.create_task(
        api.call(
            "GET",
            f"/things/{thing_id}/messages",
            thing_token(thing),
            params={"messagetype": "egress", "wait": "10"},
        )
    )
    ok(await api.call("DELETE", f"/things/{thing_id}", alice.token))
    await new_thing(bridge, bob, tmp_path / "b", thing_id)
    secret = await api.publish(bob, thing_id, {"for": "bob's device only"})
    answer = await asyncio.wait_for(poll, 15)
    assert secret not in answer.body
    # The poll may be read before the delete (then it ends empty or refused as revoked), between the
    # delete and the re-creation (an unknown thing: 404) or after it (another thing's key: 401).
    assert answer.status in (401, 404) or (answer.status == 200 and orjson.loads(answer.body)["result"] == [])
    ok(await api.call("DELETE", f"/things/{thing_id}", bob.token))


# ==== presence across take-overs and reconnects ==============================================================
PRESENCE_THINGS = 4
PRESENCE_STEPS = 8  # connects and closes per thing and round


async def test_presence_follows_take_overs_and_reconnects_under_load(
    bridge: Bridge, alice: Account, api: Api, admin: str, tmp_path: Path
) -> None:
    """Things connect under their own client id (each connect takes the previous one over), under
    other client ids of theirs, and hang up, with DISCONNECT or without, all at once while another
    thing publishes at full speed; presence is written in groups (issue #14). Once the broker has
    seen every connection end, each thing's presence, in its twin and as the retained document a
    new subscriber gets, is online exactly when one of its connections is still open."""
    things = [await new_thing(bridge, alice, tmp_path / f"t{k}") for k in range(PRESENCE_THINGS)]
    marker = await new_thing(bridge, alice, tmp_path / "marker")
    busy = await new_thing(bridge, alice, tmp_path / "busy")
    app_name = unique("presenceapp")
    bridge.cli("app", "add", app_name, "--owner", alice.name, "--password", "presence-app-password-1")
    pub, runner = await BusyPublisher.start(bridge, busy)
    loop = asyncio.get_running_loop()
    problems: list[str] = []
    try:
        await asyncio.wait_for(pub.full_speed.wait(), 15)
        baseline = (await api.stats(admin))["connections"]
        for n in range(ROUNDS):
            async with asyncio.timeout(ROUND_BUDGET):

                async def churn(k: int, thing: ThingFiles, n: int = n) -> list[Raw]:
                    """The thing's steps; its connections left open."""
                    tls = bridge.client_tls(thing.cert, thing.key)
                    open_: dict[str, Raw] = {}  # client id -> its latest connection
                    for step in range(PRESENCE_STEPS):
                        client_id = thing.id if (n + k + step) % 3 else f"{thing.id}:{step % 2}"
                        if step % 3 == 2 and open_:  # a hang-up, every other one without DISCONNECT
                            gone = open_.pop(sorted(open_)[(n + step) % len(open_)])
                            if step % 2:
                                gone.writer.write(DISCONNECT)
                            gone.close()
                            continue
                        raw, rc, _ = await Raw.thing(bridge, tls, client_id)
                        assert rc == 0, f"CONNACK {rc}"
                        taken_over = open_.pop(client_id, None)
                        if taken_over is not None:  # the broker closed it: ours goes too
                            taken_over.close()
                        open_[client_id] = raw
                    keep = (n + k) % 2  # half the things end with a connection open
                    for client_id in sorted(open_)[keep:]:
                        open_.pop(client_id).close()
                    return list(open_.values())

                kept = await asyncio.gather(*(churn(k, t) for k, t in enumerate(things)))
                expected = {
                    t.id: "online" if left else "offline" for t, left in zip(things, kept, strict=True)
                }
                want = baseline + sum(map(len, kept))
                seen = await api.settle_stats(admin, "connections", want, loop.time() + 10)
                assert seen == want, f"round {n}: {seen} connections, expected {want}"
                # Every change is recorded by now; one recorded after them, once visible, says they
                # are written and published too (groups are written and published in order).
                since = time.time()
                raw, rc, _ = await Raw.thing(bridge, bridge.client_tls(marker.cert, marker.key), marker.id)
                assert rc == 0
                raw.writer.write(DISCONNECT)
                raw.close()
                await offline_since(api, alice, marker.id, since)
                twins = {
                    t.id: ok(await api.call("GET", f"/things/{t.id}/state", alice.token))["presence"]["state"]
                    for t in things
                }
                viewer = await Raw.app(bridge, app_name, "presence-app-password-1")
                try:
                    retained: dict[str, str] = {}
                    for t in things:  # its retained document follows the SUBACK
                        docs = await viewer.subscribe(f"things/{t.id}/presence")
                        async with asyncio.timeout(10):
                            while not docs:
                                kind, flags, body = await mqttraw.read_packet(viewer.reader)
                                if kind == PUBLISH:
                                    docs.append(viewer.take(flags, body))
                        assert docs[0].retain, docs
                        retained[t.id] = orjson.loads(docs[0].payload)["state"]
                finally:
                    viewer.close()
                if twins != expected or retained != expected:
                    problems.append(f"round {n}: expected {expected}, twins {twins}, retained {retained}")
                for raw in (raw for left in kept for raw in left):
                    raw.close()
                assert await api.settle_stats(admin, "connections", baseline, loop.time() + 10) == baseline
    finally:
        pub.hang_up()
        await stop(runner)
    assert not problems, "\n".join(problems)


async def offline_since(api: Api, owner: Account, thing_id: str, since: float, timeout: float = 10) -> None:
    """Until the thing's twin shows it offline by a change at `since` or later."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        presence = ok(await api.call("GET", f"/things/{thing_id}/state", owner.token))["presence"]
        if presence["state"] == "offline" and (presence["ts"] or 0) >= since:
            return
        assert loop.time() < deadline, f"{thing_id} not offline since {since} within {timeout} s: {presence}"
        await asyncio.sleep(0.02)
