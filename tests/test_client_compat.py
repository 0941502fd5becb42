"""What real third-party clients send (issue #8, items 1-3), through the real process: device SDK
tokens with an audience, free-form text published under application/json, and a persistent
mosquitto_sub session that reconnects several times."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from tests.conftest import Bridge, _bridge
from tests.helpers import Account, ThingFiles, account, call, create_thing, error, ok, run_sync

FREE_FORM = b"FOO|BAR|This is a message."


@pytest.fixture(scope="module")
def alice(bridge: Bridge) -> Account:
    return account(bridge)


@pytest.fixture(scope="module")
def thing(bridge: Bridge, alice: Account, tmp_path_factory: pytest.TempPathFactory) -> ThingFiles:
    return run_sync(create_thing(bridge, alice.token, tmp_path_factory.mktemp("things")))


def sdk_token(thing: ThingFiles, **claims: Any) -> str:
    """A token as device SDKs written against the things-gateway document sign it: iss, aud, exp,
    nbf, header kid = thing id (RS256: the bundle's key is RSA)."""
    now = int(time.time())
    body = {"iss": f"urn:thing:{thing.id}", "aud": f"urn:flashlex:{thing.id}", "exp": now + 600, "nbf": now}
    body.update(claims)
    key = serialization.load_pem_private_key(thing.key.read_bytes(), password=None)
    return jwt.encode(
        {k: v for k, v in body.items() if v is not None}, key, algorithm="RS256", headers={"kid": thing.id}
    )


def collect_url(bridge: Bridge, thing: ThingFiles) -> str:
    return f"{bridge.api}/things/{thing.id}/collect"


# ---- 1. device tokens with an audience ----------------------------------------------------------------
async def test_a_device_sdk_token_with_an_audience_is_accepted(bridge: Bridge, thing: ThingFiles) -> None:
    url = collect_url(bridge, thing)
    for aud in (
        f"urn:flashlex:{thing.id}",  # exactly what the SDKs send
        f"urn:example:devices:{thing.id}",  # any namespace naming this thing
        None,  # no audience at all
        bridge.http,  # the bridge's public HTTP URL (the default configured audience)
        f"{bridge.http}/dev/v1/",
        [f"urn:flashlex:{thing.id}", bridge.http],
    ):
        ok(await call("POST", url, sdk_token(thing, aud=aud), json={"aud": str(aud)}))


async def test_a_token_whose_audience_names_another_thing_is_refused(
    bridge: Bridge, thing: ThingFiles
) -> None:
    url = collect_url(bridge, thing)
    for aud, reason in (
        ("urn:flashlex:another-thing", "another thing"),
        ([f"urn:flashlex:{thing.id}", "urn:flashlex:another-thing"], "another thing"),
        ("https://elsewhere.example", "not accepted"),
        (42, "string"),
        ([], "string"),
    ):
        assert reason in error(await call("POST", url, sdk_token(thing, aud=aud), json={}), 401)


async def test_malformed_time_claims_are_401_not_500(bridge: Bridge, thing: ThingFiles) -> None:
    """Issue #9 item 8: PyJWT accepts a numeric string for exp, which then broke a comparison."""
    url = collect_url(bridge, thing)
    now = int(time.time())
    for claims in ({"exp": str(now + 600)}, {"nbf": str(now)}, {"exp": True}, {"exp": [now]}):
        assert "must be a number" in error(await call("POST", url, sdk_token(thing, **claims), json={}), 401)


@pytest.fixture(scope="module")
def audience_bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    yield from _bridge(tmp_path_factory, http={"token_audiences": ["https://iot.example.com"]})


async def test_configured_audiences_replace_the_default(audience_bridge: Bridge, tmp_path: Path) -> None:
    alice = account(audience_bridge)
    thing = await create_thing(audience_bridge, alice.token, tmp_path)
    url = collect_url(audience_bridge, thing)
    ok(await call("POST", url, sdk_token(thing, aud="https://iot.example.com/"), json={}))
    ok(await call("POST", url, sdk_token(thing), json={}))  # urn:<ns>:<own id> always
    error(await call("POST", url, sdk_token(thing, aud=audience_bridge.http), json={}), 401)


# ---- 2. free-form text under application/json -----------------------------------------------------------
async def test_free_form_text_under_application_json_is_kept_as_text(
    bridge: Bridge, alice: Account, thing: ThingFiles
) -> None:
    json_type = {"Content-Type": "application/json"}
    publish = f"{bridge.api}/things/{thing.id}/publish"
    published = ok(await call("POST", publish, alice.token, data=FREE_FORM, headers=json_type))
    collected = ok(
        await call("POST", collect_url(bridge, thing), sdk_token(thing), data=FREE_FORM, headers=json_type)
    )
    records = ok(await call("GET", f"{bridge.api}/things/{thing.id}/messages", alice.token))
    kept = {r["flmessagespk"]: (r["message"], r["encoding"]) for r in records}
    assert kept[published["flmessagespk"]] == (FREE_FORM.decode(), "text")
    assert kept[collected["flmessagespk"]] == (FREE_FORM.decode(), "text")
    # a body that does parse is still JSON
    ok(await call("POST", publish, alice.token, data=b'{"a": 1}', headers=json_type))
    records = ok(await call("GET", f"{bridge.api}/things/{thing.id}/messages", alice.token))
    assert (records[-1]["message"], records[-1]["encoding"]) == ({"a": 1}, "json")


# ---- 3. acknowledged messages are not re-sent on reconnect -----------------------------------------------
@pytest.mark.skipif(shutil.which("mosquitto_sub") is None, reason="mosquitto-clients not installed")
@pytest.mark.parametrize("trial", range(2))
async def test_a_reconnecting_persistent_session_gets_each_message_once(
    bridge: Bridge, alice: Account, tmp_path: Path, trial: int
) -> None:
    """mosquitto_sub -c -q 1 with -C 1: each run takes one message, PUBACKs it, disconnects and
    leaves our later packets unread (its kernel then resets the connection). The bridge used to
    re-send the same acknowledged message on every reconnect (a PUBACK handled as a task that was
    cancelled at the end of the stream, or dropped by asyncio when a write failed first).

    mosquitto_sub itself sometimes exits before its PUBACK reaches us (we then read only the
    reset, which on a loaded machine happened twice in a row): that message comes again with DUP,
    which MQTT allows; on a crowded machine one message came back four times. So a message may come
    back a few times, but the session moves on: all five arrive, in order, within fifteen reconnects
    (the bug repeated one message for ever), and none after a later one was taken."""
    thing = await create_thing(bridge, alice.token, tmp_path)
    tls = ["--cafile", str(thing.ca), "--cert", str(thing.cert), "--key", str(thing.key)]
    sub = [
        "mosquitto_sub", *tls, "-h", "127.0.0.1", "-p", str(bridge.ports["mqtt_tls"]),
        "-c", "-q", "1", "-i", thing.id, "-t", f"things/{thing.id}/publish", "-W", "10",
    ]  # fmt: skip

    async def run(*extra: str) -> list[str]:
        proc = await asyncio.create_subprocess_exec(
            *sub, *extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = await proc.communicate()
        assert proc.returncode in (0, 27), err.decode()  # 27: -W timed out with nothing to take
        return out.decode().split()

    await run("-C", "1", "-W", "1")  # the persistent session and its subscription
    for seq in range(1, 6):
        ok(await call("POST", f"{bridge.api}/things/{thing.id}/publish", alice.token, data=f"m{seq}"))
    received: list[str] = []
    for _round in range(15):
        received += await run("-C", "1")
        if received[-1:] == ["m5"]:
            break
    assert sorted(set(received)) == ["m1", "m2", "m3", "m4", "m5"], received
    assert received == sorted(received), received
    assert await run("-W", "2") == []  # nothing left to re-send
    ok(await call("DELETE", f"{bridge.api}/things/{thing.id}", alice.token))
