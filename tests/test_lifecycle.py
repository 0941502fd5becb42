"""The process and the operator: graceful stop and restart keep all state, and the command line
creates users, plans and things that the running bridge serves."""

from __future__ import annotations

import signal
import sqlite3
import stat
import uuid
from pathlib import Path

import aiohttp
import aiomqtt
import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import Bridge, basic
from tests.helpers import create_thing, new_user, token

CliThing = tuple[str, str, str, Path]  # owner, password, thing id, bundle folder


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def get(bridge: Bridge, path: str, tok: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession(headers={"Authorization": tok}) as s, s.get(f"{bridge.api}{path}") as r:
        return r.status, await r.json()


async def mqtt_roundtrip(bridge: Bridge, thing_id: str, cert: Path, key: Path) -> None:
    """Connect with the thing's certificate, subscribe to its own topic and publish there via the
    broker's loopback: proves the TLS handshake, the identity check and the ACL all accept it."""
    async with aiomqtt.Client(
        "127.0.0.1",
        bridge.ports["mqtt_tls"],
        identifier=thing_id,
        tls_context=bridge.client_tls(cert, key),
        timeout=5,
    ) as client:
        granted = await client.subscribe(f"things/{thing_id}/publish", qos=1)
        assert [int(getattr(rc, "value", rc)) for rc in granted] == [1]
        await client.publish(f"things/{thing_id}/collect", b'{"t": 1}', qos=1)


# ---- restart -----------------------------------------------------------------------------------------
async def test_restart_keeps_state(fresh_bridge: Bridge, tmp_path: Path) -> None:
    b = fresh_bridge
    name, password = new_user(b)
    tok = await token(b, name, password)
    thing = await create_thing(b, tok, tmp_path, keyType="EC", thingName="survivor")
    certs, data = b.folder / "certs", b.folder / "data"
    ca_pem, ca_key = (certs / "ca.pem").read_bytes(), (certs / "ca.key").read_bytes()

    assert b.stop() == 0  # SIGTERM is a clean stop
    assert any("stopped" in line for line in b.output)
    b.start()

    # the old token is still valid, and so is logging in again
    status, body = await get(b, "/things", tok)
    assert status == 200, body
    async with aiohttp.ClientSession() as s, s.get(f"{b.api}/token", headers=basic(name, password)) as r:
        assert r.status == 200
        new_tok = (await r.json())["accessToken"]
    status, body = await get(b, f"/things/{thing.id}", new_tok)
    assert status == 200, body
    after = body["result"]
    for field in (
        "flthingspk",
        "certificateId",
        "certificatePem",
        "keyPairPrivate",
        "keyPairPublic",
        "thingName",
        "fluserspk",
        "fltimestamp",
    ):
        assert after[field] == thing.record[field], field
    status, body = await get(b, "/things", tok)
    assert [t["flthingspk"] for t in body["result"]] == [thing.id]

    # the CA was loaded, not regenerated, and its secrets stay private
    assert (certs / "ca.pem").read_bytes() == ca_pem
    assert (certs / "ca.key").read_bytes() == ca_key
    assert mode(certs / "ca.key") == 0o600
    assert mode(data / "secret.key") == 0o600
    assert mode(certs / "server.key") == 0o600
    # so the certificate issued before the restart still gets the thing in
    await mqtt_roundtrip(b, thing.id, thing.cert, thing.key)


# ---- command line ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_thing(bridge: Bridge, tmp_path_factory: pytest.TempPathFactory) -> CliThing:
    """(owner, password, thing id, bundle folder) made with `thingbridge thing create`."""
    owner, password = new_user(bridge)
    out = tmp_path_factory.mktemp("bundle") / "out"
    thing_id = f"cli-{uuid.uuid4().hex[:12]}"
    result = bridge.cli(
        "thing", "create", "kitchen-sensor", "--owner", owner, "--out", str(out), "--id", thing_id
    )
    assert thing_id in result.stdout
    return owner, password, thing_id, out


async def test_cli_thing_create_writes_bundle(bridge: Bridge, cli_thing: CliThing) -> None:
    owner, password, thing_id, out = cli_thing
    files = {p.name for p in out.iterdir()}
    assert {"ca.pem", "certificate.pem", "private.key", "public.key", "thing.json", "README.txt"} <= files
    assert (out / "ca.pem").read_bytes() == bridge.ca_file.read_bytes()
    assert mode(out / "private.key") == 0o600
    cert = x509.load_pem_x509_certificate((out / "certificate.pem").read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(bridge.ca_file.read_bytes()))
    key = serialization.load_pem_private_key((out / "private.key").read_bytes(), password=None)
    assert key.public_key() == cert.public_key()
    config = orjson.loads((out / "thing.json").read_bytes())
    assert config["thingId"] == thing_id and config["mqtt"]["host"] == "127.0.0.1"
    assert "mosquitto_pub" in (out / "README.txt").read_text()

    # the running bridge serves what the command line wrote to its database
    status, body = await get(bridge, "/things", await token(bridge, owner, password))
    assert status == 200
    listed = {t["flthingspk"]: t for t in body["result"]}
    assert set(listed) == {thing_id}
    assert listed[thing_id]["thingName"] == "kitchen-sensor"
    assert listed[thing_id]["certificatePem"] == (out / "certificate.pem").read_text()


async def test_cli_thing_connects_over_mqtt_tls(bridge: Bridge, cli_thing: CliThing) -> None:
    _, _, thing_id, out = cli_thing
    await mqtt_roundtrip(bridge, thing_id, out / "certificate.pem", out / "private.key")


def test_cli_errors(bridge: Bridge, tmp_path: Path) -> None:
    name, _ = new_user(bridge)
    dup = bridge.cli("user", "add", name, "--password", "another-password", check=False)
    assert dup.returncode != 0
    assert "already exists" in dup.stderr and "Traceback" not in dup.stderr

    missing = f"ghost-{uuid.uuid4().hex[:8]}"
    plan = bridge.cli("plan", "set", missing, "--things", "3", check=False)
    assert plan.returncode != 0
    assert missing in plan.stderr and "not found" in plan.stderr and "Traceback" not in plan.stderr

    thing = bridge.cli("thing", "create", "x", "--owner", missing, "--out", str(tmp_path / "o"), check=False)
    assert thing.returncode != 0 and "not found" in thing.stderr
    assert not (tmp_path / "o").exists()


def test_sigint_stops_cleanly_and_keeps_the_database(fresh_bridge: Bridge) -> None:
    """Ctrl-C is the same graceful path as SIGTERM: exit 0, the database closed and consistent."""
    assert fresh_bridge.proc is not None
    fresh_bridge.proc.send_signal(signal.SIGINT)
    assert fresh_bridge.proc.wait(15) == 0
    fresh_bridge.proc = None
    with sqlite3.connect(fresh_bridge.db_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT count(*) FROM users WHERE username = 'admin'").fetchone()[0] == 1
