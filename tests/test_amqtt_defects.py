"""Stock amqtt 0.12.1 next to our HardenedBroker: one scenario per lettered amqtt defect (A-I but H,
described in docs/amqtt-defects.md), each run twice by the `target` fixture:

  hardened  the real `thingbridge serve` process; the test asserts the correct behaviour.
  stock     MqttBroker(cfg, broker_cls=amqtt.broker.Broker) in this process, with our listeners,
            plugins and PKI; the test asserts that the defect is still there.

If a stock assertion starts failing after an amqtt upgrade, amqtt fixed that defect upstream and the
override named in the test's docstring (bridge/mqtt/hardened.py, handler.py) can be reviewed.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import aiomqtt
import pytest
from amqtt.broker import Broker
from amqtt.mqtt import packet_dict

from bridge import config
from bridge.core.service import Core
from bridge.core.things import NewThing
from bridge.mqtt.broker import PLAIN, TLS, MqttBroker
from bridge.store import Store
from tests import mqttraw
from tests.conftest import Bridge, write_config
from tests.helpers import create_thing, new_user, token, unique

HOST = "127.0.0.1"
APP_PASSWORD = "app-password-1"
CONNACK_ACCEPTED = b"\x20\x02\x00\x00"


@dataclass
class Device:
    id: str
    cert: Path
    key: Path


@dataclass
class Target:
    """A broker under test, as the scenarios see it."""

    stock: bool
    tls_port: int
    plain_port: int
    ca: Path
    app: str  # an application principal of the things' owner, password APP_PASSWORD
    new_thing: Callable[[], Awaitable[Device]]
    amqtt: Broker | None = None  # the in-process stock broker, for what no client can observe

    def tls(self, dev: Device | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if dev is not None:
            ctx.load_cert_chain(dev.cert, dev.key)
        return ctx

    def thing(self, dev: Device, client_id: str | None = None, **kw: Any) -> aiomqtt.Client:
        return aiomqtt.Client(
            HOST, self.tls_port, identifier=client_id or dev.id, tls_context=self.tls(dev), timeout=5, **kw
        )

    def app_client(self) -> aiomqtt.Client:
        return aiomqtt.Client(
            HOST,
            self.plain_port,
            identifier=f"app:{self.app}:{unique('c')}",
            username=self.app,
            password=APP_PASSWORD,
            timeout=5,
        )

    async def raw(
        self, dev: Device, keepalive: int = 60, will: tuple[str, bytes] | None = None, clean: bool = True
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TLS connection with the thing's certificate, CONNECTed and accepted."""
        reader, writer = await asyncio.open_connection(HOST, self.tls_port, ssl=self.tls(dev))
        writer.write(mqttraw.connect(dev.id, keepalive, will, clean))
        connack = await asyncio.wait_for(reader.readexactly(4), 5)
        assert connack[:2] == CONNACK_ACCEPTED[:2] and connack[3] == 0, connack
        return reader, writer


@pytest.fixture(scope="module")
def accounts(bridge: Bridge) -> tuple[str, str, str]:
    """On the real bridge: an owner (name, password) and its application principal."""
    owner, password = new_user(bridge)
    bridge.cli("plan", "set", owner, "--things", "100")  # the free plan's 10 are not enough here
    app = unique("app")
    bridge.cli("app", "add", app, "--owner", owner, "--password", APP_PASSWORD)
    return owner, password, app


@contextlib.asynccontextmanager
async def stock_broker(folder: Path) -> AsyncIterator[Target]:
    """Stock amqtt behind our listeners and plugins, assembled as bridge.app.serve does."""
    cfg = config.load(write_config(folder))
    stock_parsing = {t: cls.__mro__[1] for t, cls in packet_dict.items() if cls.__name__.startswith("Strict")}
    restore = mock.patch.dict(packet_dict, stock_parsing)
    restore.start()
    store = Store(cfg.db_path)
    store.open()
    mqtt = MqttBroker(cfg, broker_cls=Broker)
    core = Core(cfg, store, link=mqtt)
    try:
        core.ca.ensure_server_cert([])
        owner = await core.accounts.create_user("owner", "owner-password-1")
        await core.accounts.create_app("app", "owner", APP_PASSWORD)
        await mqtt.start(core)
        core.outbox.start()  # retained documents (presence, config) reach the broker through it
        await mqtt.listen()

        async def new_thing() -> Device:
            thing = await core.things.create(owner, NewThing(key_type="EC"))
            dev = Device(thing.id, folder / f"{thing.id}.pem", folder / f"{thing.id}.key")
            dev.cert.write_text(thing.cert_pem)
            dev.key.write_text(thing.private_key_pem or "")
            return dev

        yield Target(True, mqtt.ports[TLS], mqtt.ports[PLAIN], core.ca.ca_path, "app", new_thing, mqtt.broker)
    finally:
        if mqtt.broker is not None:
            await mqtt.stop()
        await core.outbox.stop()
        await asyncio.to_thread(store.close)
        restore.stop()


@pytest.fixture(params=["hardened", "stock"])
async def target(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Target]:
    if request.param == "stock":
        async with stock_broker(tmp_path) as stock:
            yield stock
        return
    bridge: Bridge = request.getfixturevalue("bridge")
    owner, password, app = request.getfixturevalue("accounts")
    tok = await token(bridge, owner, password)

    async def new_thing() -> Device:
        thing = await create_thing(bridge, tok, tmp_path, keyType="EC")
        return Device(thing.id, thing.cert, thing.key)

    yield Target(False, bridge.ports["mqtt_tls"], bridge.ports["mqtt_plain"], bridge.ca_file, app, new_thing)


# ---- small helpers ------------------------------------------------------------------------------------
Match = str | Callable[[aiomqtt.Message], bool] | None


async def wait_message(
    client: aiomqtt.Client, match: Match = None, timeout: float = 5
) -> aiomqtt.Message | None:
    """The first message on topic `match` (or satisfying it) within `timeout` s; None if none came."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            async for msg in client.messages:
                if match is None or (str(msg.topic) == match if isinstance(match, str) else match(msg)):
                    return msg
    return None


async def first_payload(client: aiomqtt.Client, topic: str) -> bytes | None:
    """Connect (MqttCodeError if refused) and return the first payload on `topic`."""
    async with client:
        msg = await wait_message(client, topic)
    return msg.payload if msg else None


async def refused(client: aiomqtt.Client) -> bool:
    """True when the CONNECT is answered 'not authorized', False when it is accepted."""
    try:
        async with client:
            return False
    except aiomqtt.MqttCodeError as exc:
        assert exc.rc in (5, 135), exc
        return True


async def read_until_closed(reader: asyncio.StreamReader, limit: float) -> tuple[bytes, float | None]:
    """What the broker sends, and the seconds until it closes the connection (EOF or reset); None if
    the connection is still open after `limit` s."""
    loop = asyncio.get_running_loop()
    start, data = loop.time(), b""
    try:
        async with asyncio.timeout(limit):
            while chunk := await reader.read(1024):
                data += chunk
    except TimeoutError:
        return data, None
    except (ConnectionError, ssl.SSLError):
        pass
    return data, loop.time() - start


# ---- A-G ----------------------------------------------------------------------------------------------
async def test_a_resumed_session_is_checked_against_the_new_certificate(target: Target) -> None:
    """A: thing B's valid certificate, client id A, clean_session=False, while A's persistent session
    is offline with a queued command.
    hardened: refused; A itself later receives the command.
    stock: accepted as A, and B receives A's command: the resumed session keeps the previous
    connection's ssl_object, so our identity plugin checks A's certificate, not B's. If this starts
    failing, amqtt fixed it upstream: review the ssl_object refresh in
    HardenedBroker._initialize_client_session."""
    a, b = await target.new_thing(), await target.new_thing()
    command = f"things/{a.id}/publish"
    async with target.thing(a, clean_session=False) as dev:
        await dev.subscribe(command, qos=1)
    async with target.app_client() as app:
        await app.publish(command, b"unlock", qos=1)
    intruder = target.thing(b, client_id=a.id, clean_session=False)
    if target.stock:
        assert await first_payload(intruder, command) == b"unlock"
    else:
        with pytest.raises(aiomqtt.MqttCodeError):
            await first_payload(intruder, command)
        assert await first_payload(target.thing(a, clean_session=False), command) == b"unlock"


async def test_b_refused_connect_keeps_the_live_session(target: Target) -> None:
    """B: while A is online and subscribed to its commands, a CONNECT with A's client id and
    clean_session=True (B's certificate) is refused.
    hardened: A still receives the next command.
    stock: the refused CONNECT deleted A's session (and subscriptions) before authentication: A's
    connection stays up, but the command never arrives. If this starts failing, amqtt fixed it
    upstream: review the authenticate-first order in HardenedBroker._initialize_client_session."""
    a, b = await target.new_thing(), await target.new_thing()
    command = f"things/{a.id}/publish"
    async with target.thing(a) as dev:
        await dev.subscribe(command, qos=1)
        assert await refused(target.thing(b, client_id=a.id))
        async with target.app_client() as app:
            await app.publish(command, b"cmd", qos=1)
        got = await wait_message(dev, command, timeout=2 if target.stock else 5)
        await dev.publish(f"things/{a.id}/status", b"still connected", qos=1)  # PUBACKed: the link is up
    if target.stock:
        assert got is None
    else:
        assert got is not None and got.payload == b"cmd"


async def test_c_refused_connect_does_not_lock_out_the_device(target: Target) -> None:
    """C: a CONNECT with A's client id and B's certificate is refused; then the real A connects with
    clean_session=False.
    hardened: A is accepted.
    stock: A is refused: the refused CONNECT left a 'connected' zombie session holding B's TLS object,
    and A's CONNECT resumes it and is checked against B's certificate. If this starts failing, amqtt
    fixed it upstream: review the authenticate-first order in HardenedBroker._initialize_client_session."""
    a, b = await target.new_thing(), await target.new_thing()
    assert await refused(target.thing(b, client_id=a.id))
    assert await refused(target.thing(a, clean_session=False)) is target.stock


async def test_d_keepalive_is_enforced(target: Target) -> None:
    """D: a thing connects with keepalive=2 s and then goes silent (no PINGREQ).
    hardened: the broker closes the connection after 1.5 x keepalive = 3 s [MQTT-3.1.2-24].
    stock: still open after 6 s (handle_read_timeout is `pass`). If this starts failing, amqtt fixed
    it upstream: review BridgeHandler.handle_read_timeout."""
    reader, writer = await target.raw(await target.new_thing(), keepalive=2)
    try:
        _, closed = await read_until_closed(reader, 6)
    finally:
        writer.close()
    if target.stock:
        assert closed is None
    else:
        assert closed is not None and 2.0 <= closed <= 4.5


async def test_e_retained_message_goes_only_to_its_subscribers(target: Target) -> None:
    """E: A, subscribed to things/A/presence, gets its retained presence there (the bridge retains
    it); then B connects and subscribes to nothing.
    hardened: B receives nothing.
    stock: B receives A's retained presence, because on every CONNECT amqtt pushes the retained
    messages matching any session's filters (here A's own), without an ACL check. If this starts
    failing, amqtt fixed it upstream: review HardenedBroker._publish_retained_messages_for_subscription."""
    a, b = await target.new_thing(), await target.new_thing()
    presence = f"things/{a.id}/presence"
    async with target.thing(a) as dev:
        await dev.subscribe(presence, qos=1)
        assert await wait_message(dev, presence) is not None  # retained by the bridge
        async with target.thing(b) as other:
            leaked = await wait_message(
                other, lambda m: not str(m.topic).startswith(f"things/{b.id}/"), 5 if target.stock else 1.5
            )
    if target.stock:
        assert leaked is not None and str(leaked.topic) == presence
    else:
        assert leaked is None


async def test_e_a_resumed_session_gets_no_retained_message_again(target: Target) -> None:
    """E, on resume: a thing with a persistent session subscribes to its config (retained by the
    bridge) and its publish topic, takes the config, disconnects and reconnects; then its owner's
    application publishes a marker to it.
    hardened: the marker is the first message ([MQTT-3.3.1-6]: retained messages go with a new
    subscription only).
    stock: the retained config comes again first, at QoS 0, as at every CONNECT. If this starts
    failing, amqtt fixed it upstream: review HardenedBroker._publish_retained_messages_for_subscription."""
    a = await target.new_thing()
    config, publish = f"things/{a.id}/config", f"things/{a.id}/publish"

    async def next_publish(reader: asyncio.StreamReader) -> tuple[str, bytes]:
        while True:
            kind, flags, body = await asyncio.wait_for(mqttraw.read_packet(reader), 5)
            if kind == 3:
                topic, _packet_id, payload, _dup = mqttraw.parse_publish(flags, body)
                return topic, payload

    reader, writer = await target.raw(a, clean=False)
    writer.write(mqttraw.subscribe(config, qos=0) + mqttraw.subscribe(publish, qos=0, packet_id=2))
    assert (await next_publish(reader))[0] == config  # retained, for the new subscription
    writer.write(b"\xe0\x00")  # DISCONNECT
    writer.close()

    reader, writer = await target.raw(a, clean=False)
    try:
        async with target.app_client() as app:
            await app.publish(publish, b"marker", qos=1)
        first = await next_publish(reader)
    finally:
        writer.close()
    assert first[0] == (config if target.stock else publish)


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto-clients not installed")
@pytest.mark.parametrize(
    ("target", "suffix"),
    [("hardened", "collect"), ("hardened", "telemetry"), ("stock", "collect")],
    indirect=["target"],
)
async def test_f_acknowledged_messages_survive_the_disconnect(target: Target, suffix: str) -> None:
    """F: a thing (mosquitto_pub, its own process) publishes 2000 QoS 1 messages and disconnects as
    soon as the last PUBACK arrives; an app subscribed to things/+/<suffix> counts them. On the bridge
    `collect` is stored before its PUBACK, other topics are routed by the broker (stock: both the same).
    hardened: the app receives all 2000.
    stock: amqtt PUBACKs a message when it is queued and drops the queue when the client leaves, so
    acknowledged messages are lost. If this starts failing, amqtt fixed it upstream: review
    HardenedBroker._handle_disconnect."""
    count = 2000
    a = await target.new_thing()
    topic = f"things/{a.id}/{suffix}"
    async with target.app_client() as app:
        await app.subscribe(f"things/+/{suffix}", qos=1)
        pub = await asyncio.create_subprocess_exec(
            "mosquitto_pub", "--cafile", str(target.ca), "--cert", str(a.cert), "--key", str(a.key),
            "-h", HOST, "-p", str(target.tls_port), "-i", a.id, "-q", "1", "-M", "100", "-t", topic, "-l",
            stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            lines = b"".join(b"%06d\n" % i for i in range(count))
            _, err = await asyncio.wait_for(pub.communicate(lines), 30)
        finally:
            if pub.returncode is None:
                pub.kill()
                await pub.wait()
        assert pub.returncode == 0, err.decode()  # every message was PUBACKed
        got: set[bytes] = set()
        while len(got) < count and (msg := await wait_message(app, topic, 2 if target.stock else 5)):
            got.add(msg.payload)
    if target.stock:
        assert len(got) < count
    else:
        assert len(got) == count


async def test_g_publish_to_a_dollar_topic_ends_the_session(target: Target) -> None:
    """G: a thing with a will publishes to a topic name with a leading '$' [MQTT-4.7.2-1].
    hardened: the connection is closed through the normal disconnect path, so the will is published.
    stock: amqtt stops the client's message loop but never runs its disconnect: no will, and the
    session stays 'connected' (a zombie that keeps the thing online). Our listener closes the socket
    when amqtt returns, so unlike amqtt's own listeners the socket does not stay open. If this starts
    failing, amqtt fixed it upstream: review HardenedBroker._handle_message_delivery."""
    a = await target.new_thing()
    will = f"things/{a.id}/collect"  # a bridge flow: the will is stored and routed like a PUBLISH
    async with target.app_client() as app:
        await app.subscribe(will, qos=1)
        reader, writer = await target.raw(a, will=(will, b"gone"))
        try:
            writer.write(mqttraw.publish("$x/y", b"x"))
            _, closed = await read_until_closed(reader, 5)
        finally:
            writer.close()
        got = await wait_message(app, will, timeout=2 if target.stock else 5)
    if target.stock:
        assert target.amqtt is not None
        assert got is None and target.amqtt.sessions[a.id][0].transitions.state == "connected"
    else:
        assert closed is not None and got is not None and got.payload == b"gone"


async def test_g_publish_to_a_wildcard_topic_ends_the_session(target: Target) -> None:
    """G (wildcard variant): a thing publishes to things/A/+ [MQTT-3.3.2-2]; the payload is a PINGREQ.
    correct: the connection is closed, and nothing of the payload is executed.
    stock: the parser rejects the topic before reading the payload, the reader loop just goes on, so
    the connection stays open and the payload is read as the next packet (the broker answers the
    smuggled PINGREQ). The fix is strict parsing in bridge/mqtt/handler.py, which patches amqtt's packet
    table for the whole process; the stock broker here runs with the table restored."""
    a = await target.new_thing()
    reader, writer = await target.raw(a)
    try:
        writer.write(mqttraw.publish(f"things/{a.id}/+", mqttraw.PINGREQ))
        replies, closed = await read_until_closed(reader, 2)
    finally:
        writer.close()
    if target.stock:
        assert (replies, closed) == (mqttraw.PINGRESP, None)
    else:
        assert replies == b"" and closed is not None


@pytest.mark.parametrize("target", ["hardened"], indirect=True)
async def test_will_topic_is_subject_to_the_publish_acl(target: Target) -> None:
    """Will (unlettered, docs/amqtt-defects.md): thing A connects with a will on things/B/collect,
    which A may not publish to, then drops the connection. amqtt broadcasts a will without the topic ACL
    (broker.py _handle_disconnect); our IdentityPlugin refuses such a CONNECT, so this runs against
    the bridge only (the plugin protects a stock broker as well)."""
    a, b = await target.new_thing(), await target.new_thing()
    forged = f"things/{b.id}/collect"
    async with target.app_client() as app:
        await app.subscribe(forged, qos=1)
        reader, writer = await asyncio.open_connection(HOST, target.tls_port, ssl=target.tls(a))
        writer.write(mqttraw.connect(a.id, will=(forged, b"forged by A")))
        connack = await asyncio.wait_for(reader.read(4), 5)
        writer.transport.abort()  # an abnormal end: a will would be due
        got = await wait_message(app, forged, timeout=2)
    assert connack == b"\x20\x02\x00\x05"  # CONNACK: not authorised
    assert got is None


async def test_i_unacknowledged_qos1_is_redelivered_on_resume(target: Target) -> None:
    """I: a thing with a persistent session gets a QoS 1 message, does not PUBACK it, and its
    connection drops. [MQTT-4.4.0-1]: on resume the server must re-send it (DUP set).
    stock: amqtt forgets an in-flight message when its PUBACK wait ends, so nothing comes back.
    If this starts failing, amqtt fixed it upstream."""
    a = await target.new_thing()
    topic = f"things/{a.id}/publish"
    reader, writer = await target.raw(a, clean=False)
    writer.write(mqttraw.subscribe(topic, qos=1))
    assert (await asyncio.wait_for(mqttraw.read_packet(reader), 5))[0] == 9  # SUBACK
    async with target.app_client() as app:
        await app.publish(topic, b"must-arrive", qos=1)
    kind, flags, body = await asyncio.wait_for(mqttraw.read_packet(reader), 5)
    assert kind == 3 and mqttraw.parse_publish(flags, body)[2] == b"must-arrive"
    writer.transport.abort()  # no PUBACK: the message is in flight when the connection drops

    reader, writer = await target.raw(a, clean=False)
    try:
        packet = await asyncio.wait_for(mqttraw.read_packet(reader), 3)
    except TimeoutError:
        packet = None
    finally:
        writer.close()
    if target.stock:
        assert packet is None
    else:
        assert packet is not None and packet[0] == 3
        _topic, _packet_id, payload, dup = mqttraw.parse_publish(packet[1], packet[2])
        assert (payload, dup) == (b"must-arrive", True)


# ---- TLS ----------------------------------------------------------------------------------------------
async def reply_without_certificate(ca: Path, port: int, data: bytes) -> bytes:
    """Send `data` over TLS with no client certificate: the first bytes of the reply, b'' if cut off."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(HOST, port, ssl=ssl.create_default_context(cafile=str(ca))), 5
        )
    except (ssl.SSLError, ConnectionError):
        return b""
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(4), 5)
    except (ssl.SSLError, ConnectionError):
        return b""
    finally:
        writer.close()


async def test_tls_stock_cannot_require_a_client_certificate(bridge: Bridge) -> None:
    """amqtt's own TLS listeners use Broker._create_ssl_context, which hard-codes CERT_OPTIONAL: a
    client without a certificate completes the handshake. Our TLS listener (device_tls_context)
    refuses it before any MQTT. If the first assertion starts failing, amqtt can now require
    certificates, and its own listeners could replace ours."""
    certs = bridge.folder / "certs"
    listener = {"certfile": certs / "server.pem", "keyfile": certs / "server.key", "cafile": bridge.ca_file}
    ctx = Broker._create_ssl_context(listener)  # type: ignore[arg-type]
    assert ctx.verify_mode == ssl.CERT_OPTIONAL

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(4))
        await writer.drain()
        writer.close()

    async with await asyncio.start_server(echo, HOST, 0, ssl=ctx) as server:
        port = server.sockets[0].getsockname()[1]
        assert await reply_without_certificate(bridge.ca_file, port, b"ping") == b"ping"
    ours = await reply_without_certificate(bridge.ca_file, bridge.ports["mqtt_tls"], mqttraw.connect("x"))
    assert ours == b""  # no CONNACK: the handshake was refused
