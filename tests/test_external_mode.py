"""External mode (issue #15): devices connect to a RabbitMQ cluster that asks the bridge who they
are and what they may do (tests/engine.py starts the cluster)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bridge import config, pki
from bridge.mqtt.external.auth import Logins
from bridge.mqtt.external.management import Management
from bridge.pki import CertificateAuthority
from tests.conftest import Bridge
from tests.engine import RabbitCluster, serving
from tests.helpers import (
    account,
    call,
    certified_device,
    create_thing,
    firmware_product,
    next_message,
    ok,
    run_sync,
    token,
    unique,
    until,
)


def _tls(cluster: RabbitCluster, port: int, ctx: ssl.SSLContext) -> bytes:
    """Handshake with a node's MQTT/TLS listener and read until it closes (TLS 1.3 reports a refused
    client certificate after the handshake, on the first read)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"\x10\x00")  # a truncated CONNECT: the server answers by closing
        return tls.recv(16)


def test_each_node_serves_mqtt_tls_with_a_certificate_of_the_bridge_ca(rabbit_cluster: RabbitCluster) -> None:
    assert len(rabbit_cluster.nodes) == 2
    ctx = ssl.create_default_context(cafile=str(rabbit_cluster.ca_dir / "ca.pem"))
    for node in rabbit_cluster.nodes:
        _tls(rabbit_cluster, node.mqtts, ctx)  # the server certificate verifies for 127.0.0.1


def test_a_client_certificate_of_another_ca_is_refused_by_the_engine(
    rabbit_cluster: RabbitCluster, tmp_path: Path
) -> None:
    """Another bridge's CA (the same code, another key) issues a certificate for a thing id."""
    other = CertificateAuthority.load_or_create(tmp_path / "other-ca")
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "c.pem").write_text(pki.cert_pem(other.issue_client("forged", key.public_key(), 1)))
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "k.pem").write_bytes(pem)
    ctx = ssl.create_default_context(cafile=str(rabbit_cluster.ca_dir / "ca.pem"))
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    with pytest.raises(ssl.SSLError, match=r"BAD_CERTIFICATE|UNKNOWN_CA"):
        _tls(rabbit_cluster, rabbit_cluster.nodes[0].mqtts, ctx)


# ---- the bridge as the engine's auth backend ---------------------------------------------------------
@pytest.fixture(scope="module")
def external(rabbit_cluster: RabbitCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    """A bridge in external mode on the cluster (its auth listener on the port the cluster calls)."""
    bridge = rabbit_cluster.bridge(tmp_path_factory.mktemp("bridge"))
    yield from serving(bridge)


def app_engine_client(cluster: RabbitCluster, name: str, password: str, **kw: Any) -> aiomqtt.Client:
    """An application's plain MQTT connection to the first engine node, by username and password."""
    return aiomqtt.Client(
        "127.0.0.1",
        cluster.nodes[0].mqtt,
        identifier=kw.pop("identifier", f"app:{name}"),
        username=name,
        password=password,
        **{"timeout": 5, **kw},
    )


async def refused(client: aiomqtt.Client) -> None:
    """The engine refuses the CONNECT."""
    with pytest.raises(aiomqtt.MqttError):
        async with client:
            pass


async def closed_by_engine(client: aiomqtt.Client, action: Coroutine[Any, Any, Any]) -> None:
    """`action` (a publish or subscribe the engine must refuse) ends the connection: RabbitMQ 3.10
    answers an unauthorised PUBLISH or SUBSCRIBE by closing it (no SUBACK failure code, no PUBACK)."""
    pending = asyncio.ensure_future(action)
    try:
        await closed_within(client, 5)
    finally:
        pending.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await pending


async def closed_within(client: aiomqtt.Client, seconds: float) -> None:
    """The engine closes `client`'s connection within `seconds` (a TimeoutError otherwise)."""
    with pytest.raises(aiomqtt.MqttError):
        async with asyncio.timeout(seconds):
            async for _ in client.messages:
                pass


@pytest.fixture(scope="module")
def tenants(external: Bridge, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two users: alice with things a and b and an application; bob with thing c."""
    folder = tmp_path_factory.mktemp("tenants")
    alice, bob = account(external), account(external)
    things = {
        name: run_sync(create_thing(external, owner.token, folder / name))
        for name, owner in (("a", alice), ("b", alice), ("c", bob))
    }
    app = unique("dash")
    external.cli("app", "add", app, "--owner", alice.name, "--password", "app-password-1")
    return {"alice": alice, "bob": bob, "app": app, **things}


async def test_a_thing_reaches_its_own_topics_and_no_other_things(
    external: Bridge, rabbit_cluster: RabbitCluster, tenants: dict[str, Any]
) -> None:
    a, b = tenants["a"], tenants["b"]
    async with app_engine_client(rabbit_cluster, tenants["app"], "app-password-1") as app:
        await app.subscribe(f"things/{a.id}/collect", qos=1)
        await app.subscribe(f"things/{b.id}/collect", qos=1)
        async with rabbit_cluster.nodes[1].thing_client(a, timeout=5) as thing:
            await thing.subscribe(f"things/{a.id}/publish", qos=1)
            await thing.publish(f"things/{a.id}/collect", b'{"own": 1}', qos=1)
            message = await next_message(app)
            assert (str(message.topic), message.payload) == (f"things/{a.id}/collect", b'{"own": 1}')
            await closed_by_engine(thing, thing.publish(f"things/{b.id}/collect", b'{"forged": 1}', qos=1))
        async with rabbit_cluster.nodes[0].thing_client(a, timeout=5) as thing:
            await closed_by_engine(thing, thing.subscribe(f"things/{b.id}/publish", qos=1))
        async with rabbit_cluster.nodes[0].thing_client(a, timeout=5) as thing:
            await closed_by_engine(thing, thing.subscribe("things/#", qos=1))
        async with rabbit_cluster.nodes[0].thing_client(
            b, timeout=5
        ) as thing:  # the control: b's own message arrives
            await thing.publish(f"things/{b.id}/collect", b'{"b": 1}', qos=1)
        message = await next_message(app)
        assert (str(message.topic), message.payload) == (
            f"things/{b.id}/collect",
            b'{"b": 1}',
        )  # not a's forgery
    # another thing's client id
    await refused(rabbit_cluster.nodes[0].thing_client(a, b.id, timeout=5))


async def test_an_application_by_password_reaches_only_its_owners_things(
    external: Bridge, rabbit_cluster: RabbitCluster, tenants: dict[str, Any]
) -> None:
    app, c = tenants["app"], tenants["c"]
    await refused(app_engine_client(rabbit_cluster, app, "wrong-password-1"))
    await refused(app_engine_client(rabbit_cluster, app, "app-password-1", identifier="app:other"))
    subject = f"SERIALNUMBER=00,CN={tenants['a'].id}"  # a password login never names a certificate
    await refused(app_engine_client(rabbit_cluster, subject, "app-password-1", identifier=tenants["a"].id))
    async with app_engine_client(rabbit_cluster, app, "app-password-1") as client:
        await closed_by_engine(client, client.subscribe(f"things/{c.id}/collect", qos=1))  # bob's thing
    async with app_engine_client(rabbit_cluster, app, "app-password-1") as client:
        # no per-delivery check in the engine: a filter must name its owner's thing
        await closed_by_engine(client, client.subscribe("things/+/collect", qos=1))
    async with app_engine_client(rabbit_cluster, app, "app-password-1") as client:
        await closed_by_engine(client, client.publish(f"things/{c.id}/publish", b"{}", qos=1))
    async with app_engine_client(rabbit_cluster, app, "app-password-1") as client:
        await client.publish(f"things/{tenants['a'].id}/publish", b'{"to": "a"}', qos=1)


async def test_unknown_and_replaced_certificates_are_refused(
    external: Bridge, rabbit_cluster: RabbitCluster, tmp_path: Path
) -> None:
    owner = account(external)
    thing_id = unique("recreated")
    old = await create_thing(external, owner.token, tmp_path / "old", flthingspk=thing_id)
    async with rabbit_cluster.nodes[0].thing_client(old, timeout=5):
        pass
    ok(await call("DELETE", f"{external.api}/things/{thing_id}", owner.token))
    await refused(rabbit_cluster.nodes[0].thing_client(old, timeout=5))  # deleted
    new = await create_thing(external, owner.token, tmp_path / "new", flthingspk=thing_id)
    # the same CN, the same CA: only the certificate's serial number in its subject tells them apart
    await refused(rabbit_cluster.nodes[0].thing_client(old, timeout=5))
    async with rabbit_cluster.nodes[0].thing_client(new, timeout=5):
        pass


@pytest.mark.parametrize(
    ("path", "form"),
    [
        ("user", {}),
        ("user", {"username": "CN=x,CN=y"}),
        ("user", {"username": "no-equals-sign"}),
        ("user", {"username": "thingbridge", "password": "wrong"}),
        ("user", {"username": "thingbridge", "password": "engine-password-1" + "x" * 5000}),
        ("user", {"username": "2.5.4.3=#zz"}),
        ("vhost", {"username": "unknown-app", "vhost": "/"}),
        (
            "resource",
            {"username": "CN=t", "resource": "queue", "name": "thingbridge.devices", "permission": "read"},
        ),
        (
            "resource",
            {
                "username": "CN=t",
                "resource": "queue",
                "name": "mqtt-subscription-uqos1",
                "permission": "read",
            },
        ),
        ("topic", {"username": "CN=t", "resource": "topic", "name": "amq.topic", "permission": "write"}),
        (
            "topic",
            {
                "username": "CN=t",
                "resource": "topic",
                "name": "other",
                "routing_key": "things.t.collect",
                "permission": "write",
            },
        ),
        (
            "topic",
            {
                "username": "CN=t",
                "resource": "topic",
                "name": "amq.topic",
                "routing_key": "things.t.collect",
                "permission": "configure",
            },
        ),
    ],
)
async def test_the_auth_backend_answers_deny_to_what_it_does_not_know(
    external: Bridge, path: str, form: dict[str, str]
) -> None:
    url = f"http://127.0.0.1:{external.ports['engine_auth']}/auth/{path}"
    resp = await call("POST", url, data=form)
    assert (resp.status, resp.body) == (200, b"deny")
    resp = await call(
        "POST", url, data=b"\xff\xfe=%%%", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert (resp.status, resp.body) == (200, b"deny")


async def test_the_auth_backend_allows_what_the_rules_allow(external: Bridge) -> None:
    """The other half of the table above (so that "deny" there is not all it can say)."""
    url = f"http://127.0.0.1:{external.ports['engine_auth']}/auth"
    resp = await call(
        "POST", f"{url}/user", data={"username": "thingbridge", "password": "engine-password-1"}
    )
    assert resp.body == b"allow administrator management"
    form = {"username": "CN=t", "resource": "topic", "name": "amq.topic", "routing_key": "things.t.collect"}
    assert (await call("POST", f"{url}/topic", data={**form, "permission": "write"})).body == b"allow"
    assert (await call("GET", f"{url}/topic", params={**form, "permission": "write"})).body == b"allow"
    queue = {
        "username": "CN=t",
        "resource": "queue",
        "name": "mqtt-subscription-t:2qos0",
        "permission": "read",
    }
    assert (await call("POST", f"{url}/resource", data=queue)).body == b"allow"


@pytest.mark.parametrize("how", ["disable", "delete"])
async def test_a_revoked_thing_is_closed_on_every_node_within_a_second(
    external: Bridge, rabbit_cluster: RabbitCluster, tmp_path: Path, how: str
) -> None:
    owner = account(external)
    thing = await create_thing(external, owner.token, tmp_path / "t")
    other = await create_thing(external, owner.token, tmp_path / "o")
    url = f"{external.api}/things/{thing.id}"
    async with (
        rabbit_cluster.nodes[0].thing_client(thing, timeout=5) as first,
        rabbit_cluster.nodes[1].thing_client(thing, f"{thing.id}:2", timeout=5) as second,
        rabbit_cluster.nodes[1].thing_client(other, timeout=5) as bystander,
    ):
        for client in (first, second):
            await client.subscribe(f"things/{thing.id}/publish", qos=1)
        started = time.monotonic()
        if how == "disable":
            ok(await call("PATCH", url, owner.token, json={"enabled": False}))
        else:
            ok(await call("DELETE", url, owner.token))
        await asyncio.gather(closed_within(first, 1.0), closed_within(second, 1.0))
        elapsed = time.monotonic() - started
        await bystander.publish(f"things/{other.id}/collect", b"{}", qos=1)  # still connected
    assert elapsed < 1.0
    await refused(rabbit_cluster.nodes[0].thing_client(thing, timeout=5))
    await refused(rabbit_cluster.nodes[1].thing_client(thing, timeout=5))
    if how == "disable":
        ok(await call("PATCH", url, owner.token, json={"enabled": True}))
        async with rabbit_cluster.nodes[0].thing_client(thing, timeout=5):
            pass


async def test_a_subject_with_a_password_is_never_a_certificate_login(
    external: Bridge, tenants: dict[str, Any]
) -> None:
    """A client may send a thing's subject (not secret: it is in the certificate) as its MQTT
    username with any password: that must never pass as the thing's certificate login, not even
    with a password too long to be read."""
    thing = tenants["a"]
    cert = x509.load_pem_x509_certificate(thing.cert.read_bytes())
    subject = f"SERIALNUMBER={cert.serial_number:x},CN={thing.id}"
    url = f"http://127.0.0.1:{external.ports['engine_auth']}/auth/user"
    assert (await call("POST", url, data={"username": subject})).body == b"allow"  # the engine's ask
    for password in ("", "guess", "x" * 5000):
        resp = await call("POST", url, data={"username": subject, "password": password})
        assert (resp.status, resp.body) == (200, b"deny")


async def test_the_engine_refusals_are_counted_in_the_broker_stats(
    external: Bridge, rabbit_cluster: RabbitCluster, tenants: dict[str, Any]
) -> None:
    async def stats() -> dict[str, Any]:
        return ok(await call("GET", f"{external.api}/broker/stats", await token(external)))

    before = await stats()
    await refused(app_engine_client(rabbit_cluster, tenants["app"], "wrong-password-2"))
    async with rabbit_cluster.nodes[0].thing_client(tenants["a"], timeout=5) as thing:
        await closed_by_engine(thing, thing.publish(f"things/{tenants['b'].id}/collect", b"{}", qos=1))
    async with rabbit_cluster.nodes[0].thing_client(tenants["a"], timeout=5) as thing:
        await closed_by_engine(thing, thing.subscribe(f"things/{tenants['b'].id}/publish", qos=1))
    after = await stats()
    assert after["refusedConnects"] > before["refusedConnects"]
    reasons = ("refusedByReason", "bad_password")
    assert after[reasons[0]].get(reasons[1], 0) > before[reasons[0]].get(reasons[1], 0)
    assert after["deniedPublishes"] > before["deniedPublishes"]
    assert after["deniedSubscribes"] > before["deniedSubscribes"]


async def test_a_re_certified_device_loses_its_old_certificate_on_the_engine(
    external: Bridge, rabbit_cluster: RabbitCluster, tmp_path: Path
) -> None:
    """A provisioned device gets a second certificate for its CIK (POST /provision/certificate):
    the connection on the first closes within a second, the first is refused from then on (same CN,
    same CA: only its subject's serial number differs), the second connects."""
    owner = account(external)
    product = await firmware_product(external, owner)
    sn = unique("RE-")
    url = f"{external.http}/fw/v1/manage/products/{product.id}/serials"
    resp = await call("POST", url, owner.token, data=f"{sn}\n".encode(), headers={"Content-Type": "text/csv"})
    assert resp.status == 200, resp.body
    resp = await call("POST", f"{external.http}/fw/v1/activate", json={"serialNumber": sn})
    assert resp.status == 200, resp.body
    thing_id, cik = resp.json["thingId"], resp.json["apiKey"]
    first = await certified_device(external, tmp_path / "first", thing_id, cik)
    async with rabbit_cluster.nodes[1].thing_client(first, timeout=5) as client:
        await client.subscribe(f"things/{thing_id}/publish", qos=1)
        started = time.monotonic()
        second = await certified_device(external, tmp_path / "second", thing_id, cik)
        await closed_within(client, 1.0)
        assert time.monotonic() - started < 1.0
    await refused(rabbit_cluster.nodes[0].thing_client(first, timeout=5))
    async with rabbit_cluster.nodes[0].thing_client(second, timeout=5):
        pass


async def test_a_connection_this_process_did_not_log_in_is_found_in_the_engine_list(
    external: Bridge, rabbit_cluster: RabbitCluster, tenants: dict[str, Any]
) -> None:
    """Management's fallback, for a login another bridge process answered (or one from before a
    restart): a Management that recorded no logins finds the thing's connection in the engine's
    list of connections (once its statistics show it: collect_statistics_interval, 1 s here) by the
    CN of its user, and closes it."""
    ext = config._build(config.ExternalConfig, rabbit_cluster.external_config(), "mqtt.external")
    management = Management(ext, Logins())
    thing = tenants["c"]
    try:
        async with rabbit_cluster.nodes[1].thing_client(thing, timeout=5) as client:
            await client.subscribe(f"things/{thing.id}/publish", qos=1)
            await until(lambda: management.close_thing(thing.id), "the connection in the engine's list")
            await closed_within(client, 2)
        assert management.failures == 0
    finally:
        await management.close()


async def test_with_the_bridge_down_the_engine_lets_no_one_in(
    external: Bridge, rabbit_cluster: RabbitCluster, tenants: dict[str, Any]
) -> None:
    """The engine asks the bridge for every login (auth_backends.1 = http, no cache): with no
    bridge to answer, a device with a valid certificate and an application with its right password
    are refused on every node, not let in on the engine's own judgement; the bridge back, they are
    let in again. (Last in the module: it restarts the module's bridge.)"""
    a = tenants["a"]
    assert external.stop() == 0
    try:
        for node in rabbit_cluster.nodes:
            await refused(node.thing_client(a, timeout=5))
        await refused(app_engine_client(rabbit_cluster, tenants["app"], "app-password-1"))
    finally:
        external.start()
    async with rabbit_cluster.nodes[0].thing_client(a, timeout=5):
        pass
    async with app_engine_client(rabbit_cluster, tenants["app"], "app-password-1"):
        pass


@pytest.mark.parametrize("how", ["disable", "delete"])
async def test_a_thing_revoked_through_another_worker_is_refused_by_this_one(
    external: Bridge, rabbit_cluster: RabbitCluster, tmp_path: Path, how: str
) -> None:
    """Several bridge processes share the store in external mode, so none may answer a device's
    credential from memory: a thing disabled or deleted through one worker's API is refused at
    once by the other's HTTPS listener, where its client certificate had just been accepted."""
    owner = account(external)
    thing = await create_thing(external, owner.token, tmp_path / "thing")
    (tmp_path / "worker").mkdir()
    worker = rabbit_cluster.worker(external, tmp_path / "worker", rabbit_cluster.external_config())
    worker.start(timeout=60)
    try:
        https = f"https://127.0.0.1:{external.ports['https']}/dev/v1/things/{thing.id}"
        ctx = external.client_tls(thing.cert, thing.key)
        assert (await call("POST", f"{https}/collect", json={"n": 1}, ssl=ctx)).status == 200
        url = f"{worker.api}/things/{thing.id}"
        if how == "disable":
            ok(await call("PATCH", url, owner.token, json={"enabled": False}))
        else:
            ok(await call("DELETE", url, owner.token))
        # a read (no write whose statement checks the thing again) and a write
        assert (await call("GET", f"{https}/messages", ssl=ctx)).status == 401
        assert (await call("POST", f"{https}/collect", json={"n": 2}, ssl=ctx)).status == 401
        # and SIGTERM stops a worker cleanly (aiormq's close left a task that hung 1 stop in 3-5)
        assert worker.stop(timeout=15) == 0
    finally:
        worker.kill()


async def test_failed_logins_through_the_engine_do_not_lock_out_other_applications(
    external: Bridge, tenants: dict[str, Any]
) -> None:
    """The engine relays password logins from its own address: 51 failures (a source's 50 free
    ones, and one) under other names must not refuse the real application, as they would if the
    engine's address were taken for the client's."""
    url = f"http://127.0.0.1:{external.ports['engine_auth']}/auth/user"
    for i in range(51):
        resp = await call("POST", url, data={"username": f"guess{i}", "password": "wrong-password"})
        assert resp.body == b"deny"
    resp = await call("POST", url, data={"username": tenants["app"], "password": "app-password-1"})
    assert resp.body == b"allow"
