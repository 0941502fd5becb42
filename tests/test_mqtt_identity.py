"""Per-thing X.509 identity and topic ACL on the real broker, with aiomqtt and mosquitto clients."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
from pathlib import Path

import aiohttp
import aiomqtt
import pytest

from tests.conftest import Bridge, on_each_store
from tests.helpers import app_client, create_thing, new_user, next_message, thing_client, token, unique, until


@pytest.fixture(scope="module")
def owner(bridge: Bridge) -> tuple[str, str]:
    return new_user(bridge)


@pytest.fixture(scope="module")
def app(bridge: Bridge, owner: tuple[str, str]) -> tuple[str, str]:
    name = unique("app")
    bridge.cli("app", "add", name, "--owner", owner[0], "--password", "app-password-1")
    return name, "app-password-1"


async def test_thing_publishes_and_app_receives(bridge: Bridge, owner, app, tmp_path: Path) -> None:
    tok = await token(bridge, *owner)
    thing = await create_thing(bridge, tok, tmp_path)
    async with app_client(bridge, *app) as sub:
        await sub.subscribe("things/+/collect", qos=1)
        async with thing_client(bridge, thing) as dev:
            await dev.publish(f"things/{thing.id}/collect", b'{"t": 1}', qos=1)
            msg = await next_message(sub)
    assert str(msg.topic) == f"things/{thing.id}/collect"
    assert msg.payload == b'{"t": 1}'


async def test_ec_thing_connects(bridge: Bridge, owner, tmp_path: Path) -> None:
    tok = await token(bridge, *owner)
    thing = await create_thing(bridge, tok, tmp_path, keyType="EC")
    assert "BEGIN EC PRIVATE KEY" in thing.record["keyPairPrivate"]
    async with thing_client(bridge, thing) as dev:
        await dev.subscribe(f"things/{thing.id}/publish", qos=1)


async def test_client_without_certificate_is_refused_in_tls(bridge: Bridge) -> None:
    ctx = bridge.client_tls()
    with pytest.raises((aiomqtt.MqttError, ssl.SSLError, OSError)):
        async with aiomqtt.Client(
            "127.0.0.1", bridge.ports["mqtt_tls"], identifier="x", tls_context=ctx, timeout=2
        ):
            pass


async def test_certificate_from_another_ca_is_refused(bridge: Bridge, tmp_path: Path) -> None:
    from bridge import pki

    rogue = pki.CertificateAuthority.load_or_create(tmp_path / "rogue")
    key = pki.generate_key("EC")
    cert = rogue.issue_client("victim", key.public_key(), 1)
    (tmp_path / "c.pem").write_text(pki.cert_pem(cert))
    (tmp_path / "k.pem").write_text(pki.private_pem(key))
    ctx = bridge.client_tls(tmp_path / "c.pem", tmp_path / "k.pem")
    with pytest.raises((aiomqtt.MqttError, ssl.SSLError, OSError)):
        async with aiomqtt.Client(
            "127.0.0.1", bridge.ports["mqtt_tls"], identifier="victim", tls_context=ctx, timeout=2
        ):
            pass


async def test_client_id_must_belong_to_the_certificate(bridge: Bridge, owner, tmp_path: Path) -> None:
    tok = await token(bridge, *owner)
    a = await create_thing(bridge, tok, tmp_path)
    b = await create_thing(bridge, tok, tmp_path)
    with pytest.raises(aiomqtt.MqttCodeError) as err:
        async with thing_client(bridge, a, client_id=b.id):
            pass
    assert err.value.rc in (5, 135)
    # a second connection of the same thing with a suffixed client id is fine
    async with thing_client(bridge, a, client_id=f"{a.id}:second"):
        pass


async def test_thing_cannot_use_another_things_topics(bridge: Bridge, owner, app, tmp_path: Path) -> None:
    tok = await token(bridge, *owner)
    a = await create_thing(bridge, tok, tmp_path)
    b = await create_thing(bridge, tok, tmp_path)
    async with app_client(bridge, *app) as sub:
        await sub.subscribe("things/#", qos=1)
        async with thing_client(bridge, a) as dev:
            result = await dev.subscribe(f"things/{b.id}/publish", qos=1)
            assert [int(getattr(rc, "value", rc)) for rc in result] == [128]
            await dev.publish(f"things/{b.id}/collect", b"forged", qos=1)
            # a thing may not pose as the cloud on its own cloud-to-device topics either
            await dev.publish(f"things/{a.id}/presence", b"forged", qos=1)
            await dev.publish(f"things/{a.id}/collect", b"mine", qos=1)
            # the connection stays up after a denied publish
            await dev.publish(f"things/{a.id}/collect", b"still-up", qos=1)
            got = []
            while not got or got[-1].payload != b"still-up":
                got.append(await next_message(sub))
    assert b"forged" not in [m.payload for m in got]
    collected = [(str(m.topic), m.payload) for m in got if str(m.topic).endswith("/collect")]
    assert collected == [(f"things/{a.id}/collect", b"mine"), (f"things/{a.id}/collect", b"still-up")]


async def test_app_sees_only_its_owners_things(bridge: Bridge, owner, app, tmp_path: Path) -> None:
    other_tok = await token(bridge, *new_user(bridge))
    foreign = await create_thing(bridge, other_tok, tmp_path)
    mine = await create_thing(bridge, await token(bridge, *owner), tmp_path)
    async with app_client(bridge, *app) as sub:
        await sub.subscribe("things/#", qos=1)
        async with thing_client(bridge, foreign) as f, thing_client(bridge, mine) as m:
            await f.publish(f"things/{foreign.id}/collect", b"not-for-you", qos=1)
            await m.publish(f"things/{mine.id}/collect", b"for-you", qos=1)
            got = [await next_message(sub)]
            while got[-1].payload != b"for-you":
                got.append(await next_message(sub))
    assert all(foreign.id not in str(m.topic) for m in got)  # not even its presence


async def test_app_publishes_only_to_its_owners_things(bridge: Bridge, owner, app, tmp_path: Path) -> None:
    other_tok = await token(bridge, *new_user(bridge))
    foreign = await create_thing(bridge, other_tok, tmp_path)
    mine = await create_thing(bridge, await token(bridge, *owner), tmp_path)
    async with thing_client(bridge, foreign) as f, thing_client(bridge, mine) as m:
        await f.subscribe(f"things/{foreign.id}/publish", qos=1)
        await m.subscribe(f"things/{mine.id}/publish", qos=1)
        async with app_client(bridge, *app) as pub:
            await pub.publish(f"things/{foreign.id}/publish", b"hijack", qos=1)
            await pub.publish(f"things/{mine.id}/publish", b"command", qos=1)
        msg = await next_message(m)
        assert msg.payload == b"command"
        with pytest.raises(TimeoutError):
            await next_message(f, timeout=1)


async def test_wrong_app_password_is_refused(bridge: Bridge, app) -> None:
    with pytest.raises(aiomqtt.MqttCodeError) as err:
        async with app_client(bridge, app[0], "wrong-password"):
            pass
    assert err.value.rc in (5, 135)


async def test_plain_listener_refuses_anonymous(bridge: Bridge) -> None:
    with pytest.raises(aiomqtt.MqttCodeError):
        async with aiomqtt.Client("127.0.0.1", bridge.ports["mqtt_plain"], identifier="anon", timeout=5):
            pass


@on_each_store()
async def test_deleting_a_thing_closes_its_session_and_refuses_its_certificate(
    bridge: Bridge, owner, tmp_path: Path
) -> None:
    tok = await token(bridge, *owner)
    thing = await create_thing(bridge, tok, tmp_path)
    async with thing_client(bridge, thing) as dev:
        await dev.subscribe(f"things/{thing.id}/publish", qos=1)
        async with (
            aiohttp.ClientSession(headers={"Authorization": tok}) as s,
            s.delete(f"{bridge.api}/things/{thing.id}") as r,
        ):
            assert r.status == 200
        with pytest.raises(aiomqtt.MqttError):
            async with asyncio.timeout(1):  # "within a second"
                async for _ in dev.messages:
                    pass
    with pytest.raises(aiomqtt.MqttCodeError):
        async with thing_client(bridge, thing):
            pass


async def test_disabling_a_thing_closes_its_session(bridge: Bridge, owner, tmp_path: Path) -> None:
    tok = await token(bridge, *owner)
    thing = await create_thing(bridge, tok, tmp_path)
    url = f"{bridge.api}/things/{thing.id}"
    async with aiohttp.ClientSession(headers={"Authorization": tok}) as s:
        async with thing_client(bridge, thing) as dev:
            await dev.subscribe(f"things/{thing.id}/publish", qos=1)
            async with s.patch(url, json={"enabled": False}) as r:
                assert r.status == 200 and (await r.json())["result"]["enabled"] is False
            with pytest.raises(aiomqtt.MqttError):
                async with asyncio.timeout(1):
                    async for _ in dev.messages:
                        pass
        with pytest.raises(aiomqtt.MqttCodeError):
            async with thing_client(bridge, thing):
                pass
        async with s.patch(url, json={"enabled": True}) as r:
            assert r.status == 200
        async with thing_client(bridge, thing):
            pass


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto-clients not installed")
async def test_mosquitto_clients_with_the_dist_bundle(bridge: Bridge, owner, app, tmp_path: Path) -> None:
    tok = await token(bridge, *owner)
    thing = await create_thing(bridge, tok, tmp_path)
    tls = [
        "--cafile",
        str(thing.ca),
        "--cert",
        str(thing.cert),
        "--key",
        str(thing.key),
        "-h",
        "127.0.0.1",
        "-p",
        str(bridge.ports["mqtt_tls"]),
    ]
    sub = await asyncio.create_subprocess_exec(
        "mosquitto_sub",
        *tls,
        "-i",
        f"{thing.id}:sub",
        "-q",
        "1",
        "-t",
        f"things/{thing.id}/publish",
        "-C",
        "1",
        "-W",
        "10",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    async with app_client(bridge, *app) as apps:
        await apps.subscribe(f"things/{thing.id}/collect", qos=1)
        pub = await asyncio.create_subprocess_exec(
            "mosquitto_pub",
            *tls,
            "-i",
            thing.id,
            "-q",
            "1",
            "-t",
            f"things/{thing.id}/collect",
            "-m",
            "hello",
            stderr=subprocess.PIPE,
        )
        assert await pub.wait() == 0, (await pub.stderr.read()).decode()
        assert (await next_message(apps)).payload == b"hello"
        # keep publishing the command until the subscriber (started concurrently) is in and takes it
        async with asyncio.timeout(10):
            while sub.returncode is None:
                await apps.publish(f"things/{thing.id}/publish", b"cmd", qos=1)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(sub.wait(), 0.5)
    out, err = await sub.communicate()
    assert sub.returncode == 0, err.decode()
    assert out.decode().strip() == "cmd"
    # mosquitto_pub without a certificate is refused
    bad = await asyncio.create_subprocess_exec(
        "mosquitto_pub",
        "--cafile",
        str(thing.ca),
        "-h",
        "127.0.0.1",
        "-p",
        str(bridge.ports["mqtt_tls"]),
        "-i",
        thing.id,
        "-t",
        f"things/{thing.id}/collect",
        "-m",
        "x",
        stderr=subprocess.PIPE,
    )
    assert await asyncio.wait_for(bad.wait(), 15) != 0


async def test_app_certificate_on_the_tls_listener(bridge: Bridge, tmp_path: Path) -> None:
    """`app add --out` writes a client certificate (CN app:<name>); it opens the TLS listener with
    the app's client id and nothing else."""
    owner = new_user(bridge)
    name = unique("tlsapp")
    bridge.cli("app", "add", name, "--owner", owner[0], "--out", str(tmp_path / "app"))
    ctx = bridge.client_tls(tmp_path / "app" / "certificate.pem", tmp_path / "app" / "private.key")
    thing = await create_thing(bridge, await token(bridge, *owner), tmp_path)

    def client(client_id: str) -> aiomqtt.Client:
        return aiomqtt.Client(
            "127.0.0.1", bridge.ports["mqtt_tls"], identifier=client_id, tls_context=ctx, timeout=5
        )

    async with client(f"app:{name}") as app, thing_client(bridge, thing) as dev:
        await app.subscribe(f"things/{thing.id}/collect", qos=1)
        await dev.publish(f"things/{thing.id}/collect", b"over-tls", qos=1)
        assert (await next_message(app)).payload == b"over-tls"
    with pytest.raises(aiomqtt.MqttCodeError):
        async with client(thing.id):  # the app's certificate cannot name a thing's session
            pass


async def test_broker_stats_count_refusals_and_denials(bridge: Bridge, tmp_path: Path) -> None:
    admin = await token(bridge)
    owner = new_user(bridge)

    async def stats() -> dict:
        async with (
            aiohttp.ClientSession(headers={"Authorization": admin}) as s,
            s.get(f"{bridge.api}/broker/stats") as r,
        ):
            assert r.status == 200
            return (await r.json())["result"]

    user_tok = await token(bridge, *owner)
    async with (
        aiohttp.ClientSession(headers={"Authorization": user_tok}) as s,
        s.get(f"{bridge.api}/broker/stats") as r,
    ):
        assert r.status == 403
    before = await stats()
    a = await create_thing(bridge, user_tok, tmp_path)
    b = await create_thing(bridge, user_tok, tmp_path)
    async with thing_client(bridge, a) as dev:
        await dev.publish(f"things/{b.id}/collect", b"denied", qos=1)
        during = await stats()
    with pytest.raises(aiomqtt.MqttCodeError):
        async with thing_client(bridge, a, client_id=b.id):
            pass
    after = await stats()
    assert during["connections"] >= 1
    assert during["deniedPublishes"] == before["deniedPublishes"] + 1
    assert after["refusedConnects"] == before["refusedConnects"] + 1


async def test_a_standing_the_store_cannot_check_cuts_the_connection_cleanly(tmp_path: Path) -> None:
    """A revocation between a CONNECT's identity check and its session's registration makes the
    broker ask the store again; when the store cannot answer, the connection is cut through the
    disconnect path like any revocation: its session is not left connected and the thing ends
    offline (the exception left both connected). In-process, the standing check made to fail: the
    race itself is microseconds wide."""
    from bridge import config
    from bridge.core.service import Core
    from bridge.core.things import NewThing
    from bridge.mqtt.broker import TLS, MqttBroker
    from bridge.store import Store, Unavailable
    from tests.conftest import write_config
    from tests.mqttraw import connect

    cfg = config.load(write_config(tmp_path))
    store = Store(cfg.db_path)
    store.open()
    mqtt = MqttBroker(cfg)
    core = Core(cfg, store, link=mqtt)
    try:
        core.ca.ensure_server_cert([])
        owner = await core.accounts.create_user("owner", "owner-password-1")
        thing = await core.things.create(owner, NewThing(key_type="EC"))
        (tmp_path / "t.pem").write_text(thing.cert_pem)
        (tmp_path / "t.key").write_text(thing.private_key_pem or "")
        await mqtt.start(core)
        await mqtt.listen()
        assert mqtt.broker is not None

        async def unanswerable(session: object) -> str:
            raise Unavailable("the store is away")

        mqtt.broker.standing = unanswerable  # type: ignore[attr-defined]
        tls = ssl.create_default_context(cafile=str(core.ca.ca_path))
        tls.load_cert_chain(tmp_path / "t.pem", tmp_path / "t.key")
        reader, writer = await asyncio.open_connection("127.0.0.1", mqtt.ports[TLS], ssl=tls)
        writer.write(connect(thing.id))
        async with asyncio.timeout(5):  # cut (its CONNACK, written in the same turn, goes too)
            while await reader.read(4096):
                pass
        writer.close()

        async def disconnected() -> bool:
            return mqtt.stats()["connections"] == 0

        async def offline() -> bool:
            rows = await store.read(lambda c: c.execute("SELECT state FROM presence").fetchall())
            return [row["state"] for row in rows] in ([], ["offline"])

        await until(disconnected, "the session no longer connected", 5)
        await until(offline, "the thing offline (or never recorded online)", 5)
    finally:
        await mqtt.stop()
        await asyncio.to_thread(store.close)
