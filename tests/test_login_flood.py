"""A flood of wrong passwords must not starve legitimate logins (issue #9 item 4), and a refused
CONNECT is logged with its real reason and counted by reason (issue #8 item 8). The flood runs
against the real process, from 127.0.0.1 like the legitimate clients."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from argon2 import PasswordHasher

from bridge.core.credentials import FailureLimiter
from bridge.core.errors import TooManyRequests
from tests import mqttraw
from tests.conftest import Bridge, basic
from tests.helpers import new_user, token, unique

FLOOD_HTTP, FLOOD_MQTT = 200, 100  # the figures
APP_PASSWORD = "app-password-1"
CONNACK = 2


@pytest.fixture(scope="module")
def people(bridge: Bridge) -> dict[str, str]:
    """A victim user, a legitimate user, and an application owned by the legitimate user."""
    victim, _ = new_user(bridge)
    user, password = new_user(bridge)
    app = unique("app")
    bridge.cli("app", "add", app, "--owner", user, "--password", APP_PASSWORD)
    return {"victim": victim, "user": user, "password": password, "app": app}


async def mqtt_login(bridge: Bridge, client_id: str, username: str, password: str) -> int:
    """CONNECT on the plain listener; the CONNACK return code."""
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge.ports["mqtt_plain"])
    try:
        writer.write(mqttraw.connect_login(client_id, username, password))
        ptype, _flags, body = await asyncio.wait_for(mqttraw.read_packet(reader), 30)
        assert ptype == CONNACK
        if body[1] == 0:
            writer.write(b"\xe0\x00")  # DISCONNECT
        return body[1]
    finally:
        writer.close()


async def stats(bridge: Bridge, admin_token: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {admin_token}"}
    async with aiohttp.ClientSession() as s, s.get(f"{bridge.api}/broker/stats", headers=headers) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["result"]


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the kernel's exact high-water mark of the process's resident memory."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def sql(bridge: Bridge, query: str, *args: object) -> list[tuple[Any, ...]]:
    """One statement on the server's database, committed (the server may run meanwhile)."""
    db = sqlite3.connect(bridge.db_path, timeout=30)
    try:
        with db:
            return db.execute(query, args).fetchall()
    finally:
        db.close()


async def eventually(check: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not seen within {timeout} s: {what}")
        await asyncio.sleep(0.05)


async def test_password_flood_does_not_starve_logins(bridge: Bridge, people: dict[str, str]) -> None:
    assert bridge.proc is not None
    admin = await token(bridge)
    before = await stats(bridge, admin)
    app = people["app"]
    # the application was connected before the flood: its verified password is remembered
    assert await mqtt_login(bridge, f"app:{app}", app, APP_PASSWORD) == 0
    limiter_engaged = asyncio.Event()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def wrong_basic(i: int) -> tuple[int, str | None, dict[str, Any]]:
            headers = basic(people["victim"], f"wrong-password-{i}")
            async with s.get(f"{bridge.api}/token", headers=headers) as r:
                if r.status == 429:
                    limiter_engaged.set()
                return r.status, r.headers.get("Retry-After"), await r.json()

        async def legit_token() -> float:
            await limiter_engaged.wait()
            t0 = time.perf_counter()
            async with s.get(f"{bridge.api}/token", headers=basic(people["user"], people["password"])) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["accessToken"]
            return time.perf_counter() - t0

        async def legit_connect() -> float:
            await limiter_engaged.wait()
            t0 = time.perf_counter()
            assert await mqtt_login(bridge, f"app:{app}:live", app, APP_PASSWORD) == 0
            return time.perf_counter() - t0

        http, mqtt, token_s, connect_s = await asyncio.gather(
            asyncio.gather(*(wrong_basic(i) for i in range(FLOOD_HTTP))),
            asyncio.gather(
                *(mqtt_login(bridge, f"app:{app}:x{i}", app, f"wrong-{i}") for i in range(FLOOD_MQTT))
            ),
            legit_token(),
            legit_connect(),
        )

    # the legitimate user (never logged in before) and the application got in without starving;
    # the real latency is measured by scripts/bench_login_flood.py
    assert token_s < 5 and connect_s < 5, (token_s, connect_s)
    peak = peak_rss_mib(bridge.proc.pid)  # since the server started, the flood included
    assert peak < 200, f"server RSS peaked at {peak:.0f} MiB"

    # a few wrong passwords were checked; the rest of the flood was refused before argon2 ran
    statuses = Counter(status for status, _, _ in http)
    assert set(statuses) <= {401, 429}, statuses
    assert 5 <= statuses[401] <= 20, statuses
    for status, retry_after, body in http:
        if status == 429:
            assert retry_after is not None and re.fullmatch(r"[1-9][0-9]*", retry_after), retry_after
            assert body["code"] == 429 and "retry in" in body["messages"][0]["value"]
    assert set(mqtt) == {5}  # MQTT 3.1.1 has no "rate limited" code: not authorized

    after = await stats(bridge, admin)

    def delta(group: str, key: str) -> int:
        return after[group].get(key, 0) - before[group].get(key, 0)

    bad, limited = delta("refusedByReason", "bad_password"), delta("refusedByReason", "rate_limited")
    assert 5 <= bad <= 20 and bad + limited == FLOOD_MQTT, after["refusedByReason"]
    assert delta("passwordChecks", "rateLimited") >= statuses[429] + limited
    assert delta("passwordChecks", "cacheHits") >= 1  # the application's reconnect
    assert after["passwordChecks"]["busy"] == 0


async def test_client_id_without_app_prefix_is_refused_with_its_reason(
    bridge: Bridge, people: dict[str, str]
) -> None:
    """An application connecting as `dashboard` instead of `app:dashboard`, right password."""
    admin = await token(bridge)
    before = await stats(bridge, admin)
    app = people["app"]
    assert await mqtt_login(bridge, app, app, APP_PASSWORD) == 5
    reason = f"client id must be 'app:{app}' or 'app:{app}:<suffix>' for application {app!r}"
    refusal = f"(client id {app!r}, username {app!r}): {reason}"
    await eventually(lambda: any(refusal in line for line in bridge.output), refusal)
    assert not any("certificate" in line for line in bridge.output if f"client id {app!r}" in line)
    after = await stats(bridge, admin)
    assert after["refusedByReason"]["client_id_mismatch"] == (
        before["refusedByReason"].get("client_id_mismatch", 0) + 1
    )
    assert after["refusedConnects"] == before["refusedConnects"] + 1


async def test_remembered_password_follows_the_stored_hash(bridge: Bridge) -> None:
    """A password changed outside the server (here: in the database, as the command line would)
    is no longer accepted from memory; a hash with the old argon2 parameters is re-hashed."""
    user, password = new_user(bridge)
    await token(bridge, user, password)  # verified and remembered
    new_password = "changed-password-2"
    old_style = PasswordHasher().hash(new_password)  # argon2-cffi's default: 64 MiB, t=3, p=4
    sql(bridge, "UPDATE users SET password_hash = ? WHERE username = ?", old_style, user)
    async with aiohttp.ClientSession() as s, s.get(f"{bridge.api}/token", headers=basic(user, password)) as r:
        assert r.status == 401
    await token(bridge, user, new_password)
    [(rehashed,)] = sql(bridge, "SELECT password_hash FROM users WHERE username = ?", user)
    assert rehashed != old_style and rehashed.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert PasswordHasher().verify(rehashed, new_password)


def test_backoff_rule() -> None:
    """The limiter's rule on its own clock: 5 free failures per (address, name), then 1 s, 2 s, ...;
    concurrent attempts count as failures until they end; other names and addresses unaffected."""
    now = [1000.0]
    limiter = FailureLimiter(clock=lambda: now[0])
    bob = ("192.0.2.1", "users", "bob")
    for _ in range(5):
        limiter.admit(*bob)
    with pytest.raises(TooManyRequests):  # a burst: the sixth waits for the five in flight
        limiter.admit(*bob)
    for _ in range(5):
        limiter.settle(*bob, False)
    for wait in (1.0, 2.0, 4.0):
        with pytest.raises(TooManyRequests) as refused:
            limiter.admit(*bob)
        assert refused.value.retry_after == wait
        now[0] += wait
        limiter.admit(*bob)  # the right password is refused too while backed off: nothing learned
        limiter.settle(*bob, False)
    limiter.admit("192.0.2.1", "users", "alice")  # another name from the same address
    limiter.settle("192.0.2.1", "users", "alice", True)
    limiter.admit("198.51.100.7", "users", "bob")  # the same name from another address
    limiter.settle("198.51.100.7", "users", "bob", True)
    now[0] += 8.0
    limiter.admit(*bob)
    limiter.settle(*bob, True)  # a success forgets the (address, name) failures
    for _ in range(5):
        limiter.admit(*bob)


def test_a_relayed_login_is_limited_by_its_name_alone() -> None:
    """An MQTT engine relays application logins without the client's address (source None): a
    flood of failures through it backs off only the names it tried, not every application behind
    the engine, as one address would; a name still backs off after its own 200."""
    now = [1000.0]
    limiter = FailureLimiter(clock=lambda: now[0])
    for i in range(300):  # far past a source's 50 free failures
        limiter.admit(None, "apps", f"guess{i}")
        limiter.settle(None, "apps", f"guess{i}", False)
    limiter.admit(None, "apps", "dashboard")  # the real application gets in
    limiter.settle(None, "apps", "dashboard", True)
    for _ in range(200):
        limiter.admit(None, "apps", "target")
        limiter.settle(None, "apps", "target", False)
    with pytest.raises(TooManyRequests) as refused:
        limiter.admit(None, "apps", "target")
    assert refused.value.retry_after == 1.0


def test_limiter_memory_is_bounded() -> None:
    limiter = FailureLimiter(max_keys=100)
    for i in range(1000):
        limiter.admit(f"2001:db8:0:{i}::1", "users", f"user{i}")
        limiter.settle(f"2001:db8:0:{i}::1", "users", f"user{i}", False)
    assert len(limiter) == 100 and limiter.evictions > 0
    # every address of one IPv6 /64 is one source
    for i in range(50):
        limiter.admit(f"2001:db8:1:2::{i + 1:x}", "users", f"name{i}")
        limiter.settle(f"2001:db8:1:2::{i + 1:x}", "users", f"name{i}", False)
    with pytest.raises(TooManyRequests):
        limiter.admit("2001:db8:1:2::ffff", "users", "someone-else")
