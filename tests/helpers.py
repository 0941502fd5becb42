"""The tests' shared helpers, the one place test modules import from (they never import each
other): users, tokens and things over the real HTTP API, small HTTP and MQTT clients, thing JWTs."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
import time
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import jwt
import orjson
import psycopg
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bridge import config as bridge_config
from bridge.core.ports import DeviceLink
from bridge.core.service import Core
from bridge.store import create as create_store
from bridge.store.postgres import translate
from tests.conftest import ADMIN_PASSWORD, Bridge, basic, write_config

_names = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}{next(_names)}"


async def token(bridge: Bridge, username: str = "admin", password: str = ADMIN_PASSWORD) -> str:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{bridge.api}/token", headers=basic(username, password)) as r,
    ):
        assert r.status == 200, await r.text()
        return (await r.json())["accessToken"]


def new_user(bridge: Bridge, password: str = "user-password-1") -> tuple[str, str]:
    name = unique("user")
    bridge.cli("user", "add", name, "--password", password)
    return name, password


@dataclass
class ThingFiles:
    id: str
    folder: Path
    record: dict

    @property
    def cert(self) -> Path:
        return self.folder / "certificate.pem"

    @property
    def key(self) -> Path:
        return self.folder / "private.key"

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"


async def create_thing(bridge: Bridge, tok: str, folder: Path, **body: object) -> ThingFiles:
    """POST /things, then unpack GET /things/{id}/dist into `folder`."""
    headers = {"Authorization": f"Bearer {tok}"}
    async with aiohttp.ClientSession(headers=headers) as s:
        async with s.post(f"{bridge.api}/things", json=body) as r:
            assert r.status == 200, await r.text()
            record = (await r.json())["result"]
        async with s.get(f"{bridge.api}/things/{record['flthingspk']}/dist") as r:
            assert r.status == 200
            data = await r.read()
    with zipfile.ZipFile(BytesIO(data)) as zf:
        for name in zf.namelist():
            target = folder / record["flthingspk"] / Path(name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
    return ThingFiles(record["flthingspk"], folder / record["flthingspk"], record)


ENVELOPE_FIELDS = {"status", "code", "messages", "result"}


# ---- small clients ---------------------------------------------------------------------------------
@dataclass
class Resp:
    status: int
    headers: Any
    body: bytes

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


async def call(method: str, url: str, tok: str | None = None, *, auth: str | None = None, **kw: Any) -> Resp:
    """One request; `tok` goes in `Authorization: Bearer`, `auth` is a raw Authorization value."""
    headers = dict(kw.pop("headers", {}))
    if tok is not None:
        headers["Authorization"] = f"Bearer {tok}"
    if auth is not None:
        headers["Authorization"] = auth
    async with aiohttp.ClientSession() as s, s.request(method, url, headers=headers, **kw) as r:
        return Resp(r.status, r.headers, await r.read())


def ok(resp: Resp) -> Any:
    """The result of a 200 envelope."""
    assert resp.status == 200, resp.body
    assert resp.headers["Content-Type"].startswith("application/json")
    body = resp.json
    assert set(body) == ENVELOPE_FIELDS
    assert body["code"] == 200 and body["status"] == "OK"
    return body["result"]


def error(resp: Resp, status: int) -> str:
    """Check an error envelope with code = HTTP status; return its message."""
    assert resp.status != 500, resp.body
    assert resp.status == status, resp.body
    assert resp.headers["Content-Type"].startswith("application/json")
    body = resp.json
    assert set(body) == ENVELOPE_FIELDS, body
    assert body["code"] == status
    assert isinstance(body["status"], str) and body["status"] not in ("", "OK")
    assert isinstance(body["messages"], list) and body["messages"]
    assert set(body["messages"][0]) == {"key", "value"}
    message = body["messages"][0]["value"]
    assert isinstance(message, str) and len(message) > 5
    return message


def run_sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine from a sync (module-scoped) fixture without touching the test's event loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


@dataclass
class Account:
    name: str
    password: str
    token: str

    @property
    def sub(self) -> str:
        return jwt.decode(self.token, options={"verify_signature": False})["sub"]


def account(bridge: Bridge) -> Account:
    name, password = new_user(bridge)
    return Account(name, password, run_sync(token(bridge, name, password)))


# ---- MQTT clients ----------------------------------------------------------------------------------
def thing_client(bridge: Bridge, thing, client_id: str | None = None, **kw) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        bridge.ports["mqtt_tls"],
        identifier=client_id or thing.id,
        tls_context=bridge.client_tls(thing.cert, thing.key),
        **{"timeout": 5, **kw},
    )


def app_client(
    bridge: Bridge, name: str, password: str, client_id: str | None = None, **kw: Any
) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        bridge.ports["mqtt_plain"],
        identifier=client_id or f"app:{name}",
        username=name,
        password=password,
        **{"timeout": 5, **kw},
    )


async def next_message(client: aiomqtt.Client, timeout: float = 5) -> aiomqtt.Message:
    async with asyncio.timeout(timeout):
        async for message in client.messages:
            return message
    raise AssertionError("no message")


async def until(probe: Callable[[], Awaitable[Any]], what: str, timeout: float = 15) -> Any:
    """Poll `probe` (an HTTP read, say) until it returns something truthy, with a deadline: what a
    bridge commits after an engine or a broker acknowledged it is seen a moment later."""
    deadline = time.monotonic() + timeout
    while not (found := await probe()):
        assert time.monotonic() < deadline, f"not seen within {timeout} s: {what}"
        await asyncio.sleep(0.05)
    return found


async def presence(bridge: Any, owner: Account, thing_id: str) -> str:
    """The thing's presence as its twin shows it (GET .../things/{id}/state)."""
    return ok(await call("GET", f"{bridge.api}/things/{thing_id}/state", owner.token))["presence"]["state"]


async def becomes(bridge: Any, owner: Account, thing_id: str, state: str, timeout: float = 10) -> None:
    """Until the thing's presence is `state`."""

    async def reached() -> bool:
        return await presence(bridge, owner, thing_id) == state

    await until(reached, f"{thing_id} {state}", timeout)


# ---- thing credentials ------------------------------------------------------------------------------
def thing_jwt(
    thing: ThingFiles,
    *,
    signer: ThingFiles | None = None,
    lifetime: float | None = 300,
    issued: float | None = None,
    kid: bool = True,
    iss: bool = True,
    iss_of: ThingFiles | None = None,
) -> str:
    """verifyThing: a JWT naming `thing` (header kid and/or claim iss = urn:thing:<id>), signed with
    the private key of `signer` (default: the thing itself), RS256 for RSA keys and ES256 for EC
    keys. `lifetime` None: no exp claim; `iss_of`: the thing the iss claim names instead."""
    key = serialization.load_pem_private_key((signer or thing).key.read_bytes(), password=None)
    algorithm = "ES256" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS256"
    now = time.time() if issued is None else issued
    claims: dict[str, Any] = {"iat": int(now)}
    if lifetime is not None:
        claims["exp"] = int(now + lifetime)
    if iss:
        claims["iss"] = f"urn:thing:{(iss_of or thing).id}"
    return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": thing.id} if kid else None)


# ---- firmware products ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Product:
    """A firmware product of `owner`: its upgrader software and a provisioning model of its vendor."""

    id: str
    owner: Account
    vendor: str
    vendor_token: str
    model: str
    software: str


async def firmware_product(bridge: Bridge, owner: Account, **body: Any) -> Product:
    """`thingbridge vendor add`, a model (provisioning), a software (upgrader), the product over
    /fw/v1/manage binding them (201)."""
    vendor = unique("fwvendor")
    out = bridge.cli("vendor", "add", vendor, "--owner", owner.name).stdout
    vendor_token = next(
        line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("X-Exosite-Token")
    )
    model, software, product = unique("fwmodel"), unique("fwsoftware"), unique("product")
    form = {"model": model, "rid": "0" * 40}
    resp = await call(
        "POST", f"{bridge.http}/provision/manage/model/", headers={"X-Exosite-Token": vendor_token}, data=form
    )
    assert resp.status == 205, resp.body
    resp = await call("POST", f"{bridge.http}/v2/software", owner.token, json={"name": software})
    assert resp.status == 201, resp.body
    resp = await call(
        "PUT",
        f"{bridge.http}/fw/v1/manage/products/{product}",
        owner.token,
        json={"softwareName": software, "vendor": vendor, "model": model, **body},
    )
    assert resp.status == 201, resp.body
    return Product(product, owner, vendor, vendor_token, model, software)


async def certified_device(bridge: Bridge, folder: Path, thing_id: str, cik: str) -> ThingFiles:
    """A provisioned device's own EC key and the certificate `POST /provision/certificate` issues for
    its CSR with its CIK (a firmware API key is one): the files to connect over MQTT/TLS as its thing."""
    key = ec.generate_private_key(ec.SECP256R1())
    resp = await call(
        "POST",
        f"{bridge.http}/provision/certificate",
        headers={"X-Exosite-CIK": cik, "Content-Type": "application/x-pem-file"},
        data=csr_pem(key),
    )
    assert resp.status == 200, resp.body
    return device_files(folder, thing_id, key, resp.body, bridge.ca_file)


def csr_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A certificate signing request for `key`; its subject is not read (the bridge names the thing)."""
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def device_files(
    folder: Path, thing_id: str, key: ec.EllipticCurvePrivateKey, chain: bytes, ca: Path
) -> ThingFiles:
    """A thing's folder (certificate chain, private key, CA) as `thing_client` reads it."""
    folder.mkdir(parents=True)
    (folder / "certificate.pem").write_bytes(chain)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (folder / "private.key").write_bytes(pem)
    (folder / "ca.pem").write_bytes(ca.read_bytes())
    return ThingFiles(thing_id, folder, {})


def rows(bridge: Bridge, sql: str, *args: object) -> list[tuple[Any, ...]]:
    """A statement on the server's database from outside, either store (`?` placeholders): what
    the bridge committed, or a change a test makes behind its back."""
    if bridge.store_url == "sqlite:":
        with contextlib.closing(sqlite3.connect(bridge.db_path, isolation_level=None)) as lite:
            return lite.execute(sql, args).fetchall()
    with psycopg.connect(bridge.store_url, autocommit=True) as conn:
        cur = conn.execute(translate(sql), args) if args else conn.execute(sql)
        return [tuple(row) for row in cur.fetchall()] if cur.description else []


def postgres_files(url: str) -> bytes:
    """What a PostgreSQL database holds on disk: its folder in the server's data directory, after a
    checkpoint has written every committed row there."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
        folder = conn.execute("SHOW data_directory").fetchone()[0]
        oid = conn.execute("SELECT oid FROM pg_database WHERE datname = current_database()").fetchone()[0]
    return b"".join(p.read_bytes() for p in (Path(folder) / "base" / str(oid)).iterdir() if p.is_file())


@contextlib.asynccontextmanager
async def in_process_core(
    folder: Path, store_url: str, link: DeviceLink | None = None, **settings: object
) -> AsyncIterator[Core]:
    """The core on a real store in `folder` (the SQLite file, or the PostgreSQL database
    `store_url`), without a server: synchronous OFF, the test's own durability is not the point.
    `link`: where it publishes (none by default). `settings`: broker.yaml's sections other than
    the defaults."""
    cfg = bridge_config.load(write_config(folder, store={"url": store_url}, **settings))
    store = create_store(cfg.store.url, cfg.db_path, "OFF")
    store.open()
    try:
        yield Core(cfg, store, link)
    finally:
        await asyncio.to_thread(store.close)
