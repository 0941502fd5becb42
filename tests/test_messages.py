"""Messages end to end against the real `thingbridge serve` process: collect (ingress) over MQTT and
HTTP into one history, verifyThing on HTTP collect (thing JWT or client certificate), publish
(egress) to MQTT things, offline persistent sessions and HTTP long-polls, history filters, delete
and archive, presence, and the refusal of bad input without storing anything."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import io
import time
import uuid
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import jwt
import orjson
import pytest

from bridge.core.identity import DeviceIdentity
from bridge.core.ports import NoLink
from bridge.core.things import NewThing
from tests import mqttraw
from tests.conftest import Bridge
from tests.helpers import (
    Account,
    Resp,
    ThingFiles,
    account,
    app_client,
    call,
    create_thing,
    error,
    in_process_core,
    next_message,
    ok,
    run_sync,
    thing_client,
    thing_jwt,
    unique,
)

CONNACK_ACCEPTED = b"\x20\x02\x00\x00"
APP_PASSWORD = "app-password-1"
BIG = b"x" * (300 * 1024)  # over the default 256 KiB message limit, under the 1 MiB packet cap
MESSAGE_FIELDS = {
    "flmessagespk",
    "fltimestamp",
    "datecreated",
    "flthingspk",
    "fluserspk",
    "messagetype",
    "message",
}


# ---- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bridge(bridge_on_each_store: Bridge) -> Bridge:
    return bridge_on_each_store


@pytest.fixture(scope="module")
def alice(bridge: Bridge) -> Account:
    return account(bridge)


@pytest.fixture(scope="module")
def mallory(bridge: Bridge) -> Account:
    """Another user, who must not see or touch alice's things."""
    return account(bridge)


@pytest.fixture(scope="module")
def alice_app(bridge: Bridge, alice: Account) -> str:
    """An application principal of alice's (plain listener), password APP_PASSWORD."""
    name = unique("app")
    bridge.cli("app", "add", name, "--owner", alice.name, "--password", APP_PASSWORD)
    return name


@pytest.fixture(scope="module")
def things_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("things")


@pytest.fixture(scope="module")
def rsa_thing(bridge: Bridge, alice: Account, things_dir: Path) -> ThingFiles:
    """An RSA thing of alice's, shared by the tests that count its history before and after."""
    return run_sync(create_thing(bridge, alice.token, things_dir))


@pytest.fixture(scope="module")
def sibling(bridge: Bridge, alice: Account, things_dir: Path) -> ThingFiles:
    """A second thing of the same owner: its key and its token must not open rsa_thing's door."""
    return run_sync(create_thing(bridge, alice.token, things_dir))


@pytest.fixture
async def new_thing(
    bridge: Bridge, alice: Account, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[ThingFiles]]]:
    """Create things of alice's for one test; deleted afterwards (the free plan allows 10)."""
    made: list[ThingFiles] = []

    async def make(**body: Any) -> ThingFiles:
        made.append(await create_thing(bridge, alice.token, tmp_path, **body))
        return made[-1]

    yield make
    for thing in made:
        ok(await call("DELETE", f"{bridge.api}/things/{thing.id}", alice.token))


@pytest.fixture
async def fresh_thing(new_thing: Callable[..., Awaitable[ThingFiles]]) -> ThingFiles:
    return await new_thing()


def app(bridge: Bridge, name: str) -> aiomqtt.Client:
    """An application connection with a client id of its own (several may be up at once)."""
    return app_client(bridge, name, APP_PASSWORD, client_id=f"app:{name}:{unique('c')}")


# ---- thing credentials ------------------------------------------------------------------------------
def hs256_with_public_key(thing: ThingFiles) -> str:
    """The algorithm-confusion forgery: HS256 keyed with the thing's *public* key, which anyone has."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(orjson.dumps({"alg": "HS256", "typ": "JWT", "kid": thing.id}))
    claims = b64(
        orjson.dumps({"iss": f"urn:thing:{thing.id}", "iat": int(time.time()), "exp": int(time.time()) + 300})
    )
    secret = thing.record["keyPairPublic"].encode()
    signature = hmac.new(secret, f"{header}.{claims}".encode(), hashlib.sha256).digest()
    return f"{header}.{claims}.{b64(signature)}"


# ---- HTTP calls -------------------------------------------------------------------------------------
def url(bridge: Bridge, thing_id: str, action: str) -> str:
    return f"{bridge.api}/things/{thing_id}/{action}"


async def history(bridge: Bridge, tok: str, thing_id: str, **params: Any) -> list[dict]:
    """GET .../messages by the owner; every record carries the documented fields plus `message`."""
    records = ok(await call("GET", url(bridge, thing_id, "messages"), tok, params=params))
    assert isinstance(records, list)
    for record in records:
        assert set(record) >= MESSAGE_FIELDS, record
        assert record["flthingspk"] == thing_id
    return records


async def collect_http(bridge: Bridge, thing: ThingFiles, **kw: Any) -> dict:
    """POST .../collect with the thing's own JWT; returns the documented result."""
    result = ok(await call("POST", url(bridge, thing.id, "collect"), thing_jwt(thing), **kw))
    assert set(result) == {"message", "flthingspk", "flmessagespk"}
    assert result["message"] == "Message Collected" and result["flthingspk"] == thing.id
    return result


async def publish_http(bridge: Bridge, tok: str, thing_id: str, **kw: Any) -> str:
    """POST .../publish by the owner; returns the stored message's flmessagespk."""
    result = ok(await call("POST", url(bridge, thing_id, "publish"), tok, **kw))
    assert result["flthingspk"] == thing_id
    return result["flmessagespk"]


async def thing_reads(bridge: Bridge, thing: ThingFiles, **params: Any) -> Resp:
    """GET .../messages with the thing's own JWT: how an HTTP-only device receives."""
    return await call("GET", url(bridge, thing.id, "messages"), thing_jwt(thing), params=params)


def ids_of(records: list[dict]) -> list[str]:
    return [r["flmessagespk"] for r in records]


async def until_next_second(after_ts: int) -> None:
    """Wait for the wall clock (shared with the bridge, same host) to leave the second `after_ts`,
    so the next stored message gets a later fltimestamp. Not a synchronisation with the bridge."""
    delay = after_ts + 1 - time.time()
    if delay > 0:
        await asyncio.sleep(delay + 0.01)
    assert int(time.time()) > after_ts


# ---- collect (ingress) ------------------------------------------------------------------------------
async def test_collect_over_mqtt_and_http_ends_in_one_history(
    bridge: Bridge, alice: Account, alice_app: str, fresh_thing: ThingFiles
) -> None:
    thing = fresh_thing
    topic = f"things/{thing.id}/collect"
    seen: list[aiomqtt.Message] = []
    http_ids: dict[int, str] = {}
    async with app(bridge, alice_app) as sub:
        await sub.subscribe("things/+/collect", qos=1)
        async with thing_client(bridge, thing) as dev:
            # each step waits until the application has it: stored first, then routed
            await dev.publish(topic, b'{"n": 0, "via": "mqtt-qos0"}', qos=0)
            seen.append(await next_message(sub))
            await dev.publish(topic, b"mqtt text at qos 1", qos=1)
            seen.append(await next_message(sub))
            http_ids[2] = (await collect_http(bridge, thing, json={"n": 2, "via": "http"}))["flmessagespk"]
            seen.append(await next_message(sub))
            http_ids[3] = (
                await collect_http(bridge, thing, data=b"http text", headers={"Content-Type": "text/plain"})
            )["flmessagespk"]
            seen.append(await next_message(sub))
    assert [str(m.topic) for m in seen] == [topic] * 4
    assert [m.payload for m in seen[:2]] == [b'{"n": 0, "via": "mqtt-qos0"}', b"mqtt text at qos 1"]
    assert orjson.loads(seen[2].payload) == {"n": 2, "via": "http"}
    assert seen[3].payload == b"http text"

    records = await history(bridge, alice.token, thing.id)
    assert [(r["message"], r["messagetype"]) for r in records] == [
        ({"n": 0, "via": "mqtt-qos0"}, "ingress"),
        ("mqtt text at qos 1", "ingress"),
        ({"n": 2, "via": "http"}, "ingress"),
        ("http text", "ingress"),
    ]
    assert records[2]["flmessagespk"] == http_ids[2] and records[3]["flmessagespk"] == http_ids[3]
    assert len(set(ids_of(records))) == 4
    assert {r["fluserspk"] for r in records} == {
        jwt.decode(alice.token, options={"verify_signature": False})["sub"]
    }
    stamps = [r["fltimestamp"] for r in records]
    assert stamps == sorted(stamps) and abs(stamps[-1] - time.time()) < 60


@pytest.mark.parametrize("naming", ["kid and iss", "kid only", "iss only"])
async def test_collect_accepts_the_things_own_jwt(
    bridge: Bridge, alice: Account, rsa_thing: ThingFiles, naming: str
) -> None:
    tok = thing_jwt(rsa_thing, kid="kid" in naming, iss="iss" in naming)
    result = ok(await call("POST", url(bridge, rsa_thing.id, "collect"), tok, json={"naming": naming}))
    last = (await history(bridge, alice.token, rsa_thing.id))[-1]
    assert last["flmessagespk"] == result["flmessagespk"] and last["message"] == {"naming": naming}


async def test_collect_from_an_ec_thing_with_es256(bridge: Bridge, alice: Account, new_thing) -> None:
    thing = await new_thing(keyType="EC")
    tok = thing_jwt(thing)
    assert jwt.get_unverified_header(tok)["alg"] == "ES256"
    result = await collect_http(bridge, thing, json={"curve": "P-256"})
    records = await history(bridge, alice.token, thing.id)
    assert [(r["flmessagespk"], r["message"]) for r in records] == [
        (result["flmessagespk"], {"curve": "P-256"})
    ]


async def test_collect_with_the_client_certificate_over_https(
    bridge: Bridge, alice: Account, rsa_thing: ThingFiles, sibling: ThingFiles
) -> None:
    https = f"https://127.0.0.1:{bridge.ports['https']}/dev/v1/things"
    ctx = bridge.client_tls(rsa_thing.cert, rsa_thing.key)
    r = await call("POST", f"{https}/{rsa_thing.id}/collect", json={"via": "mtls"}, ssl=ctx)
    result = ok(r)
    assert result["message"] == "Message Collected"
    last = (await history(bridge, alice.token, rsa_thing.id))[-1]
    assert (last["flmessagespk"], last["message"]) == (result["flmessagespk"], {"via": "mtls"})
    # the certificate names its thing: it does not open another thing's path
    before = len(await history(bridge, alice.token, sibling.id))
    error(await call("POST", f"{https}/{sibling.id}/collect", json={"via": "mtls"}, ssl=ctx), 401)
    assert len(await history(bridge, alice.token, sibling.id)) == before


REFUSED_TOKENS: dict[str, Callable[[ThingFiles, ThingFiles, Account], str | None]] = {
    "expired": lambda t, s, a: thing_jwt(t, issued=time.time() - 7200, lifetime=3600),
    "signed by another thing's key": lambda t, s, a: thing_jwt(t, signer=s),
    "naming another thing than the path": lambda t, s, a: thing_jwt(s),
    "without exp": lambda t, s, a: thing_jwt(t, lifetime=None),
    "lifetime over 24 h": lambda t, s, a: thing_jwt(t, lifetime=25 * 3600),
    "naming no thing": lambda t, s, a: thing_jwt(t, kid=False, iss=False),
    "kid and iss naming different things": lambda t, s, a: thing_jwt(t, iss_of=s),
    "a user access token (HS256)": lambda t, s, a: a.token,
    "HS256 keyed with the public key": lambda t, s, a: hs256_with_public_key(t),
    "garbage": lambda t, s, a: "not.a.jwt",
    "no Authorization header": lambda t, s, a: None,
}


@pytest.mark.parametrize("case", list(REFUSED_TOKENS))
async def test_collect_refuses_tokens_that_do_not_verify_the_thing(
    bridge: Bridge, alice: Account, rsa_thing: ThingFiles, sibling: ThingFiles, case: str
) -> None:
    before = ids_of(await history(bridge, alice.token, rsa_thing.id))
    tok = REFUSED_TOKENS[case](rsa_thing, sibling, alice)
    r = await call("POST", url(bridge, rsa_thing.id, "collect"), tok, json={"refused": case})
    error(r, 401)
    assert ids_of(await history(bridge, alice.token, rsa_thing.id)) == before


async def test_collect_for_an_unknown_thing_is_404(bridge: Bridge, rsa_thing: ThingFiles) -> None:
    ghost = ThingFiles(str(uuid.uuid4()), rsa_thing.folder, rsa_thing.record)  # rsa_thing's key, unknown id
    r = await call("POST", url(bridge, ghost.id, "collect"), thing_jwt(ghost), json={"to": "nobody"})
    error(r, 404)


# ---- publish (egress) -------------------------------------------------------------------------------
async def test_publish_by_the_owner_and_by_an_app_reaches_the_mqtt_thing(
    bridge: Bridge, alice: Account, alice_app: str, fresh_thing: ThingFiles
) -> None:
    thing = fresh_thing
    topic = f"things/{thing.id}/publish"
    async with thing_client(bridge, thing) as dev:
        await dev.subscribe(topic, qos=1)
        json_id = await publish_http(bridge, alice.token, thing.id, json={"cmd": "on", "level": 3})
        got_json = await next_message(dev)
        text_id = await publish_http(
            bridge, alice.token, thing.id, data=b"FOO|BAR|msg", headers={"Content-Type": "text/plain"}
        )
        got_text = await next_message(dev)
        string_id = await publish_http(bridge, alice.token, thing.id, json="FOO|BAR|This is a message.")
        got_string = await next_message(dev)
        async with app(bridge, alice_app) as cloud:
            await cloud.publish(topic, b"from the app", qos=1)
            got_app = await next_message(dev)
    assert all(str(m.topic) == topic and m.qos == 1 for m in (got_json, got_text, got_string, got_app))
    assert orjson.loads(got_json.payload) == {"cmd": "on", "level": 3}
    assert got_text.payload == b"FOO|BAR|msg"
    assert orjson.loads(got_string.payload) == "FOO|BAR|This is a message."
    assert got_app.payload == b"from the app"

    records = await history(bridge, alice.token, thing.id)
    assert [(r["message"], r["messagetype"]) for r in records] == [
        ({"cmd": "on", "level": 3}, "egress"),
        ("FOO|BAR|msg", "egress"),
        ("FOO|BAR|This is a message.", "egress"),
        ("from the app", "egress"),
    ]
    assert ids_of(records)[:3] == [json_id, text_id, string_id]


async def test_offline_persistent_session_gets_what_was_published_meanwhile(
    bridge: Bridge, alice: Account, alice_app: str, fresh_thing: ThingFiles
) -> None:
    thing = fresh_thing
    topic = f"things/{thing.id}/publish"
    async with app(bridge, alice_app) as cloud:
        await cloud.subscribe(f"things/{thing.id}/presence", qos=1)
        async with thing_client(bridge, thing, clean_session=False) as dev:
            await dev.subscribe(topic, qos=1)
            assert orjson.loads((await next_message(cloud)).payload)["state"] == "online"
        # the bridge has seen the thing go: from here on it is offline
        assert orjson.loads((await next_message(cloud)).payload)["state"] == "offline"
        await publish_http(bridge, alice.token, thing.id, json={"while": "offline", "n": 1})
        await cloud.publish(topic, b"offline 2 from the app", qos=1)
        await publish_http(
            bridge, alice.token, thing.id, data=b"offline 3", headers={"Content-Type": "text/plain"}
        )
    async with thing_client(bridge, thing, clean_session=False) as dev:  # no new SUBSCRIBE
        got = [await next_message(dev) for _ in range(3)]
    assert [str(m.topic) for m in got] == [topic] * 3
    assert orjson.loads(got[0].payload) == {"while": "offline", "n": 1}
    assert [m.payload for m in got[1:]] == [b"offline 2 from the app", b"offline 3"]
    assert [r["messagetype"] for r in await history(bridge, alice.token, thing.id)] == ["egress"] * 3


# ---- HTTP-only devices receive --------------------------------------------------------------------
async def test_http_device_reads_its_egress_with_a_cursor_and_long_poll(
    bridge: Bridge, alice: Account, alice_app: str, new_thing
) -> None:
    thing = await new_thing(keyType="EC")
    await collect_http(bridge, thing, json={"ingress": "not for the thing's inbox"})
    first = await publish_http(bridge, alice.token, thing.id, json={"cmd": 1})

    # without messagetype the thing gets its egress only
    records = ok(await thing_reads(bridge, thing))
    assert [(r["flmessagespk"], r["messagetype"], r["message"]) for r in records] == [
        (first, "egress", {"cmd": 1})
    ]
    assert ids_of(ok(await thing_reads(bridge, thing, messagetype="egress"))) == [first]
    # with its client certificate over HTTPS instead of a JWT
    https = f"https://127.0.0.1:{bridge.ports['https']}/dev/v1/things/{thing.id}/messages"
    mtls = ok(
        await call(
            "GET", https, params={"messagetype": "egress"}, ssl=bridge.client_tls(thing.cert, thing.key)
        )
    )
    assert ids_of(mtls) == [first]
    # the cursor: nothing after the last one
    assert ok(await thing_reads(bridge, thing, messagetype="egress", after=first)) == []

    async def long_poll(after: str, publish: Callable[[], Awaitable[Any]], expected: Any) -> str:
        """Start a long-poll, check it is waiting, publish, and see it answer with that message
        before its wait runs out."""
        wait = 30
        started = time.monotonic()
        poll = asyncio.create_task(thing_reads(bridge, thing, messagetype="egress", after=after, wait=wait))
        done, _ = await asyncio.wait({poll}, timeout=0.5)
        assert not done, f"the poll answered with nothing published: {poll.result()}"
        published_at = time.monotonic()
        await publish()
        async with asyncio.timeout(wait + 5):
            resp = await poll
        returned_at = time.monotonic()
        assert published_at <= returned_at < started + wait  # woken by the publish, not by the wait
        got = ok(resp)
        assert [(r["messagetype"], r["message"]) for r in got] == [("egress", expected)]
        return got[0]["flmessagespk"]

    second = await long_poll(
        first, lambda: publish_http(bridge, alice.token, thing.id, json={"cmd": 2}), {"cmd": 2}
    )

    async def app_publish() -> None:
        async with app(bridge, alice_app) as cloud:
            await cloud.publish(f"things/{thing.id}/publish", b"cmd 3 over mqtt", qos=1)

    third = await long_poll(second, app_publish, "cmd 3 over mqtt")
    assert ids_of(ok(await thing_reads(bridge, thing, messagetype="egress", after=first))) == [second, third]

    # the wait ends with nothing: an empty list, after the wait
    started = time.monotonic()
    assert ok(await thing_reads(bridge, thing, messagetype="egress", after=third, wait=1)) == []
    assert time.monotonic() - started >= 0.9


async def test_http_device_may_not_read_ingress_nor_other_things(
    bridge: Bridge, alice: Account, rsa_thing: ThingFiles, sibling: ThingFiles
) -> None:
    await publish_http(bridge, alice.token, rsa_thing.id, json={"for": "rsa_thing"})
    error(await thing_reads(bridge, rsa_thing, messagetype="ingress"), 403)
    # sibling's (valid) token on rsa_thing's inbox
    r = await call(
        "GET", url(bridge, rsa_thing.id, "messages"), thing_jwt(sibling), params={"messagetype": "egress"}
    )
    error(r, 401)
    for wait in ("61", "abc", "-1"):
        error(await thing_reads(bridge, rsa_thing, messagetype="egress", wait=wait), 400)


# ---- history: filters, delete, archive ---------------------------------------------------------------
async def test_history_filters_archive_and_delete(
    bridge: Bridge, alice: Account, fresh_thing: ThingFiles
) -> None:
    thing = fresh_thing
    # messages in three distinct seconds, ingress and egress mixed
    await collect_http(bridge, thing, json={"s": 0, "i": 0})
    await publish_http(bridge, alice.token, thing.id, json={"s": 0, "e": 0})
    await until_next_second((await history(bridge, alice.token, thing.id))[-1]["fltimestamp"])
    await collect_http(bridge, thing, json={"s": 1, "i": 1})
    await publish_http(bridge, alice.token, thing.id, json={"s": 1, "e": 1})
    await until_next_second((await history(bridge, alice.token, thing.id))[-1]["fltimestamp"])
    await collect_http(bridge, thing, json={"s": 2, "i": 2})
    every = await history(bridge, alice.token, thing.id)
    assert len(every) == 5
    seconds = sorted({r["fltimestamp"] for r in every})
    # three seconds at least (a pair of requests may straddle a second on a busy machine: four)
    assert len(seconds) >= 3
    s0, s1, s2 = seconds[0], seconds[1], seconds[-1]

    def where(pred: Callable[[dict], bool]) -> list[str]:
        return [r["flmessagespk"] for r in every if pred(r)]

    async def ids(**params: Any) -> list[str]:
        return ids_of(await history(bridge, alice.token, thing.id, **params))

    # inclusive bounds
    assert await ids(startts=s1, endts=s1) == where(lambda r: r["fltimestamp"] == s1) != []
    assert await ids(startts=s1) == where(lambda r: r["fltimestamp"] >= s1)
    assert await ids(endts=s1) == where(lambda r: r["fltimestamp"] <= s1)
    assert await ids(startts=s0, endts=s2) == ids_of(every)
    assert await ids(startts=s2 + 1) == [] and await ids(endts=s0 - 1) == []
    # messagetype
    assert await ids(messagetype="ingress") == where(lambda r: r["messagetype"] == "ingress")
    assert await ids(messagetype="egress") == where(lambda r: r["messagetype"] == "egress")
    assert len(await ids(messagetype="ingress")) == 3
    assert await ids(messagetype="egress", startts=s1, endts=s2) == where(
        lambda r: r["messagetype"] == "egress" and r["fltimestamp"] >= s1
    )

    # archive = the history query with the same parameters
    for params in ({}, {"startts": s1, "endts": s2, "messagetype": "ingress"}, {"endts": s0}):
        r = await call("GET", url(bridge, thing.id, "archive"), alice.token, params=params)
        assert r.status == 200 and r.headers["Content-Type"].startswith("application/zip")
        assert r.body[:2] == b"PK"
        with zipfile.ZipFile(io.BytesIO(r.body)) as zf:
            (name,) = zf.namelist()
            assert name.endswith(".json")
            archived = orjson.loads(zf.read(name))
        assert archived == await history(bridge, alice.token, thing.id, **params)
        assert archived  # every chosen range holds something

    # delete exactly a range
    deleted = await call(
        "DELETE", url(bridge, thing.id, "messages"), alice.token, params={"startts": s1, "endts": s1}
    )
    ok(deleted)
    assert await ids() == where(lambda r: r["fltimestamp"] != s1)
    # delete by type within what is left
    ok(await call("DELETE", url(bridge, thing.id, "messages"), alice.token, params={"messagetype": "egress"}))
    assert await ids() == where(lambda r: r["fltimestamp"] != s1 and r["messagetype"] == "ingress")
    # no filter: everything
    ok(await call("DELETE", url(bridge, thing.id, "messages"), alice.token))
    assert await ids() == []


async def test_another_users_thing_is_404(
    bridge: Bridge, alice: Account, mallory: Account, rsa_thing: ThingFiles
) -> None:
    await collect_http(bridge, rsa_thing, json={"keep": "me"})
    before = ids_of(await history(bridge, alice.token, rsa_thing.id))
    assert before
    error(await call("GET", url(bridge, rsa_thing.id, "messages"), mallory.token), 404)
    error(await call("GET", url(bridge, rsa_thing.id, "archive"), mallory.token), 404)
    error(await call("DELETE", url(bridge, rsa_thing.id, "messages"), mallory.token), 404)
    error(await call("POST", url(bridge, rsa_thing.id, "publish"), mallory.token, json={"x": 1}), 404)
    assert ids_of(await history(bridge, alice.token, rsa_thing.id)) == before


# ---- presence -------------------------------------------------------------------------------------
async def late_presence(bridge: Bridge, app_name: str, thing_id: str) -> aiomqtt.Message:
    """What a subscriber that arrives now gets on the presence topic: the retained last state."""
    async with app(bridge, app_name) as late:
        await late.subscribe(f"things/{thing_id}/presence", qos=1)
        return await next_message(late)


async def test_presence_online_and_offline(bridge: Bridge, alice_app: str, fresh_thing: ThingFiles) -> None:
    thing = fresh_thing
    async with app(bridge, alice_app) as watcher:
        await watcher.subscribe(f"things/{thing.id}/presence", qos=1)
        with pytest.raises(TimeoutError):  # a thing never seen has no presence yet
            await next_message(watcher, timeout=0.5)

        # a clean MQTT session
        async with thing_client(bridge, thing):
            online = orjson.loads((await next_message(watcher)).payload)
            retained = await late_presence(bridge, alice_app, thing.id)
            assert retained.retain and orjson.loads(retained.payload) == online
        offline = orjson.loads((await next_message(watcher)).payload)
        assert online["state"] == "online" and offline["state"] == "offline"
        assert isinstance(online["ts"], int | float) and offline["ts"] >= online["ts"]
        retained = await late_presence(bridge, alice_app, thing.id)
        assert retained.retain and orjson.loads(retained.payload) == offline

        # an abrupt close: CONNECT over TLS, then the socket goes without a DISCONNECT
        tls = bridge.client_tls(thing.cert, thing.key)
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.ports["mqtt_tls"], ssl=tls)
        writer.write(mqttraw.connect(thing.id))
        assert await asyncio.wait_for(reader.readexactly(4), 5) == CONNACK_ACCEPTED
        assert orjson.loads((await next_message(watcher)).payload)["state"] == "online"
        writer.transport.abort()
        dropped = orjson.loads((await next_message(watcher, timeout=10)).payload)
        assert dropped["state"] == "offline" and dropped["ts"] >= online["ts"]
        retained = await late_presence(bridge, alice_app, thing.id)
        assert retained.retain and orjson.loads(retained.payload)["state"] == "offline"


class Published(NoLink):
    """A device link that keeps what is published through it; it refuses the first `refuse`."""

    def __init__(self, refuse: int = 0) -> None:
        self.sent: list[tuple[str, str, bool]] = []
        self.refuse = refuse
        self.published = asyncio.Event()

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if self.refuse:
            self.refuse -= 1
            raise ConnectionError("the link is down")
        self.sent.append((topic, orjson.loads(payload)["state"], retain))
        self.published.set()


async def test_presence_changes_in_one_group_end_with_the_latest(tmp_path: Path) -> None:
    """Presence changes are written in groups (issue #14), a thing's latest change in a group
    winning: a connect and a disconnect recorded at once end offline, in the stored state and in
    the one retained document published."""
    link = Published()
    async with in_process_core(tmp_path, "sqlite:", link) as core:
        owner = await core.accounts.create_user("alice", "alice-password-1")
        thing = await core.things.create(owner, NewThing(key_type="EC"))
        device = DeviceIdentity(thing.id, owner.id, thing.cert_id)
        await asyncio.gather(core.presence.record(device, "online"), core.presence.record(device, "offline"))
        stored = await core.store.read(lambda c: c.execute("SELECT state FROM presence").fetchall())
    assert [row["state"] for row in stored] == ["offline"]
    assert link.sent == [(f"things/{thing.id}/presence", "offline", True)]


async def test_a_presence_document_the_link_refused_is_published_again(tmp_path: Path) -> None:
    """Presence publishes its documents itself once committed: one the link refused is written and
    published again a moment later, unless a later change of the thing came first."""
    link = Published(refuse=1)
    async with in_process_core(tmp_path, "sqlite:", link) as core:
        owner = await core.accounts.create_user("alice", "alice-password-1")
        thing = await core.things.create(owner, NewThing(key_type="EC"))
        device = DeviceIdentity(thing.id, owner.id, thing.cert_id)
        with pytest.raises(ConnectionError):
            await core.presence.record(device, "online")
        async with asyncio.timeout(10):  # RETRY later
            await link.published.wait()
        assert link.sent == [(f"things/{thing.id}/presence", "online", True)]
        await core.presence.record(device, "offline")
        assert link.sent[-1] == (f"things/{thing.id}/presence", "offline", True)


async def test_a_will_on_a_bridge_flow_is_stored_like_any_message(
    bridge: Bridge, alice: Account, alice_app: str, fresh_thing: ThingFiles
) -> None:
    """A thing's will on its collect topic goes through the core: stored in the history as ingress
    and routed to the owner's applications (amqtt broadcast it around the store); a clean
    DISCONNECT sends no will; a will is never retained."""
    thing = fresh_thing
    topic, presence = f"things/{thing.id}/collect", f"things/{thing.id}/presence"
    tls = bridge.client_tls(thing.cert, thing.key)
    wills: list[aiomqtt.Message] = []
    async with app(bridge, alice_app) as apps:
        await apps.subscribe(topic, qos=1)
        await apps.subscribe(presence, qos=1)

        async def until(state: str) -> None:
            """Messages until the thing's presence is `state` (the offline event follows the will)."""
            while True:
                message = await next_message(apps)
                if str(message.topic) == topic:
                    wills.append(message)
                elif orjson.loads(message.payload)["state"] == state and not message.retain:
                    return

        for last, clean in ((b'{"last": "words"}', False), (b'{"last": "unsaid"}', True)):
            reader, writer = await asyncio.open_connection("127.0.0.1", bridge.ports["mqtt_tls"], ssl=tls)
            writer.write(mqttraw.connect(thing.id, will=(topic, last)))
            assert await asyncio.wait_for(reader.readexactly(4), 5) == CONNACK_ACCEPTED
            await until("online")
            if clean:
                writer.write(b"\xe0\x00")  # DISCONNECT
                await writer.drain()
                writer.close()
            else:
                writer.transport.abort()
            await until("offline")
    assert [(m.payload, m.retain) for m in wills] == [(b'{"last": "words"}', False)]
    records = await history(bridge, alice.token, thing.id, messagetype="ingress")
    assert [(r["message"], r["encoding"]) for r in records] == [({"last": "words"}, "json")]


async def test_a_second_connection_with_the_same_client_id_takes_over(
    bridge: Bridge, alice: Account, fresh_thing: ThingFiles
) -> None:
    """MQTT-3.1.4-2: a CONNECT with the client id of a live connection closes that connection.
    Otherwise the older connection lives on outside the broker's session table, where disabling
    (or deleting) the thing cannot reach it, and what it sends is still stored."""
    thing = fresh_thing
    topic = f"things/{thing.id}/collect"
    thing_url = f"{bridge.api}/things/{thing.id}"
    first = thing_client(bridge, thing)
    await first.__aenter__()
    try:
        async with thing_client(bridge, thing) as second:
            await second.publish(topic, b"from the second connection", qos=1)
            taken_over = False
            try:
                async with asyncio.timeout(2):
                    async for _ in first.messages:
                        pass
            except aiomqtt.MqttError:
                taken_over = True
            except TimeoutError:
                pass
        ok(await call("PATCH", thing_url, alice.token, json={"enabled": False}))
        with contextlib.suppress(aiomqtt.MqttError):  # the older connection should be gone
            await first.publish(topic, b"from the older connection while disabled", qos=1)
    finally:
        with contextlib.suppress(Exception):
            await first.__aexit__(None, None, None)
        ok(await call("PATCH", thing_url, alice.token, json={"enabled": True}))
    stored = [r["message"] for r in await history(bridge, alice.token, thing.id)]
    assert stored == ["from the second connection"], "a disabled thing's message was stored"
    assert taken_over, "the older connection with the same client id stayed up"


# ---- bad input -----------------------------------------------------------------------------------
async def test_http_refuses_bad_input_and_stores_nothing(
    bridge: Bridge, alice: Account, rsa_thing: ThingFiles
) -> None:
    await collect_http(bridge, rsa_thing, json={"anchor": 1})
    before = ids_of(await history(bridge, alice.token, rsa_thing.id))
    collect, publish = url(bridge, rsa_thing.id, "collect"), url(bridge, rsa_thing.id, "publish")
    as_json = {"Content-Type": "application/json"}
    as_text = {"Content-Type": "text/plain"}

    def thing_tok() -> str:
        return thing_jwt(rsa_thing)

    error(await call("POST", collect, thing_tok(), data=BIG, headers=as_text), 413)
    error(await call("POST", publish, alice.token, data=BIG, headers=as_text), 413)
    error(await call("POST", collect, thing_tok(), data=b"", headers=as_text), 400)
    error(await call("POST", publish, alice.token, data=b"", headers=as_json), 400)

    for method, action in (("GET", "messages"), ("GET", "archive"), ("DELETE", "messages")):
        target = url(bridge, rsa_thing.id, action)
        for params in (
            {"messagetype": "bogus"},
            {"startts": "yesterday"},
            {"endts": "1.5"},
            {"startts": 2000, "endts": 1000},
            {"after": str(uuid.uuid4())},
        ):
            if method == "DELETE" and "after" in params:
                continue  # a cursor is for reading
            error(await call(method, target, alice.token, params=params), 400)
    assert ids_of(await history(bridge, alice.token, rsa_thing.id)) == before

    # the bridge still serves the same thing
    fine = await collect_http(bridge, rsa_thing, data=b"fine", headers=as_text)
    assert ids_of(await history(bridge, alice.token, rsa_thing.id)) == [*before, fine["flmessagespk"]]


async def test_mqtt_drops_an_oversized_message_and_keeps_the_connection(
    bridge: Bridge, alice: Account, alice_app: str, fresh_thing: ThingFiles, sibling: ThingFiles
) -> None:
    thing = fresh_thing
    topic = f"things/{thing.id}/collect"
    async with app(bridge, alice_app) as sub:
        await sub.subscribe(topic, qos=1)
        await sub.subscribe(f"things/{sibling.id}/collect", qos=1)
        async with thing_client(bridge, thing) as dev:
            await dev.publish(topic, BIG, qos=0)
            await dev.publish(topic, BIG, qos=1)
            await dev.publish(topic, b"after the big ones", qos=1)  # same connection, still up
            first = await next_message(sub)
            # the broker keeps serving others
            async with thing_client(bridge, sibling) as other:
                await other.publish(f"things/{sibling.id}/collect", b"sibling ok", qos=1)
                second = await next_message(sub)
    assert (str(first.topic), first.payload) == (topic, b"after the big ones")
    assert second.payload == b"sibling ok"
    records = await history(bridge, alice.token, thing.id)
    assert [r["message"] for r in records] == ["after the big ones"]


async def test_mqtt_drops_an_oversized_publish_from_an_app(
    bridge: Bridge, alice: Account, alice_app: str, fresh_thing: ThingFiles
) -> None:
    thing = fresh_thing
    topic = f"things/{thing.id}/publish"
    async with thing_client(bridge, thing) as dev:
        await dev.subscribe(topic, qos=1)
        async with app(bridge, alice_app) as cloud:
            await cloud.publish(topic, BIG, qos=1)
            await cloud.publish(topic, b"small command", qos=1)
        got = await next_message(dev)
    assert got.payload == b"small command"
    assert [r["message"] for r in await history(bridge, alice.token, thing.id)] == ["small command"]


async def test_the_declared_content_type_decides_how_a_payload_is_kept(
    bridge: Bridge, alice: Account, fresh_thing: ThingFiles
) -> None:
    """text/plain stays text even when it parses as JSON; undeclared bytes that are not UTF-8 are
    kept as base64; a text/plain body that is not UTF-8 is refused."""
    text = {"headers": {"Content-Type": "text/plain"}}
    await collect_http(bridge, fresh_thing, data=b"42", **text)
    await collect_http(
        bridge, fresh_thing, data=b"\xff\x00\x01", headers={"Content-Type": "application/octet-stream"}
    )
    error(
        await call(
            "POST", url(bridge, fresh_thing.id, "collect"), thing_jwt(fresh_thing), data=b"\xff", **text
        ),
        400,
    )
    records = await history(bridge, alice.token, fresh_thing.id)
    assert [(r["message"], r["encoding"]) for r in records] == [
        ("42", "text"),
        (base64.b64encode(b"\xff\x00\x01").decode(), "base64"),
    ]


async def test_delete_refuses_cursor_and_limit(
    bridge: Bridge, alice: Account, fresh_thing: ThingFiles
) -> None:
    """DELETE selects by time and type only: a cursor or a limit would silently widen it."""
    await collect_http(bridge, fresh_thing, json={"n": 1})
    for params in ({"limit": "1"}, {"after": "x"}, {"wait": "1"}):
        error(await call("DELETE", url(bridge, fresh_thing.id, "messages"), alice.token, params=params), 400)
    assert len(await history(bridge, alice.token, fresh_thing.id)) == 1


async def test_a_verified_token_stops_working_when_its_thing_is_disabled(
    bridge: Bridge, alice: Account, fresh_thing: ThingFiles
) -> None:
    """The bridge remembers a verified thing token (the signature check runs once); disabling the
    thing (deleting it takes the same path) must forget it at once."""
    token = thing_jwt(fresh_thing)
    collect = url(bridge, fresh_thing.id, "collect")
    thing_url = f"{bridge.api}/things/{fresh_thing.id}"
    ok(await call("POST", collect, token, json={"n": 1}))
    ok(await call("PATCH", thing_url, alice.token, json={"enabled": False}))
    error(await call("POST", collect, token, json={"n": 2}), 401)
    ok(await call("PATCH", thing_url, alice.token, json={"enabled": True}))
    ok(await call("POST", collect, token, json={"n": 3}))
    # the same token on another thing's path is refused even though it is remembered
    error(await call("POST", url(bridge, "some-other-thing", "collect"), token, json={"n": 4}), 401)
