"""The store's server lost and back (and a SQLite file locked by another process), against the real `thingbridge serve` on a PostgreSQL server of
this module's own that the test stops at once (pg_ctl stop -m immediate: what a crash or a failover
does to the bridge's sessions) and starts again: meanwhile HTTP answers 503 with a readable message
in each dialect's shape, an MQTT QoS 1 message is not acknowledged (its publisher sends it
again) and the background tasks log one line, not a traceback per try; afterwards both succeed at once, and every message acknowledged before, during or after is
in the history."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import orjson
import pytest

from tests.conftest import Bridge, _bridge, postgres_of_its_own
from tests.helpers import (
    Account,
    ThingFiles,
    account,
    becomes,
    call,
    create_thing,
    error,
    ok,
    thing_client,
    thing_jwt,
)
from tests.postgres import PostgresServer


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """Not the worker's shared server: this one is stopped mid-test."""
    yield from postgres_of_its_own()


@pytest.fixture
def bridge(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    url = postgres.new_database()
    for bridge in _bridge(tmp_path_factory, store={"url": url}):
        bridge.store_url = url
        yield bridge


async def publish(bridge: Bridge, thing: ThingFiles, numbers: range) -> None:
    """QoS 1 messages {"n": n} on a new connection, each acknowledged before the next is sent."""
    async with thing_client(bridge, thing) as client:
        for n in numbers:
            await client.publish(f"things/{thing.id}/collect", orjson.dumps({"n": n}), qos=1)


async def collect(bridge: Bridge, thing: ThingFiles, n: int) -> int:
    resp = await call("POST", f"{bridge.api}/things/{thing.id}/collect", thing_jwt(thing), json={"n": n})
    return resp.status


async def stored(bridge: Bridge, owner: Account, thing: ThingFiles) -> list[int]:
    resp = await call("GET", f"{bridge.api}/things/{thing.id}/messages", owner.token)
    return sorted(r["message"]["n"] for r in ok(resp))


async def logged(bridge: Bridge, text: str, timeout: float = 10) -> None:
    """Wait until the bridge's output holds a line with `text`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not any(text in line for line in bridge.output):
        assert asyncio.get_running_loop().time() < deadline, f"no {text!r} in:\n{''.join(bridge.output)}"
        await asyncio.sleep(0.05)


async def test_a_lost_database_answers_503_then_serves_and_loses_nothing_acknowledged(
    bridge: Bridge, postgres: PostgresServer, tmp_path: Path
) -> None:
    owner = account(bridge)
    thing = await create_thing(bridge, owner.token, tmp_path)
    acknowledged = list(range(10))
    await publish(bridge, thing, range(5))
    assert [await collect(bridge, thing, n) for n in range(5, 10)] == [200] * 5

    async with thing_client(bridge, thing, f"{thing.id}:outage") as client:
        postgres.halt()
        try:
            # HTTP: 503 in the dialect's shape, with a sentence and Retry-After; nothing stored
            for resp in (
                await call(
                    "POST", f"{bridge.api}/things/{thing.id}/collect", thing_jwt(thing), json={"n": 10}
                ),
                await call("GET", f"{bridge.api}/things", owner.token),
            ):
                assert "the database is unavailable" in error(resp, 503)
                assert resp.headers["Retry-After"] == "1"
            resp = await call("GET", f"{bridge.http}/v2/software", owner.token)  # the upgrader's shape
            assert resp.status == 503 and resp.json["errorCode"] == 503, resp.body
            # MQTT: the QoS 1 message is not acknowledged (the bridge closes the connection)
            with pytest.raises(aiomqtt.MqttError):
                await client.publish(f"things/{thing.id}/collect", orjson.dumps({"n": 11}), qos=1)
            await logged(bridge, "rollout timer step paused: the database is unavailable")
        finally:
            postgres.resume()
    assert bridge.proc is not None and bridge.proc.poll() is None  # the bridge stayed up
    # The timer tries every second: one line when the database goes and one when it is back.
    await logged(bridge, "rollout timer step resumed: the database is back")
    assert sum("rollout timer step paused" in line for line in bridge.output) == 1
    assert not any("Traceback" in line for line in bridge.output), "".join(bridge.output)
    # The outage connection ended while the database was away: its thing does not stay online.
    await becomes(bridge, owner, thing.id, "offline")

    # Back at once: the first request of each kind succeeds; the publisher sends its message again.
    assert await collect(bridge, thing, 12) == 200
    await publish(bridge, thing, range(11, 12))
    await publish(bridge, thing, range(13, 15))
    acknowledged += [11, 12, 13, 14]
    found = await stored(bridge, owner, thing)
    assert found == acknowledged  # every acknowledged message, once; the refused 10 not at all
    assert bridge.stop() == 0


@pytest.fixture
def sqlite_bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    yield from _bridge(tmp_path_factory, store={"lock_timeout_ms": 300})


async def test_a_locked_sqlite_file_answers_503_then_serves(sqlite_bridge: Bridge, tmp_path: Path) -> None:
    """Another process (a backup, say) holding the file's write lock past store.lock_timeout_ms:
    writes are refused as unavailable, not as an internal error; the command line, which waits
    for the same lock, says so in one line."""
    bridge = sqlite_bridge
    owner = account(bridge)
    thing = await create_thing(bridge, owner.token, tmp_path)
    holder = sqlite3.connect(bridge.db_path, isolation_level=None)
    async with thing_client(bridge, thing) as client:
        holder.execute("BEGIN IMMEDIATE")
        try:
            resp = await call(
                "POST", f"{bridge.api}/things/{thing.id}/collect", thing_jwt(thing), json={"n": 1}
            )
            assert "the database is unavailable" in error(resp, 503)
            assert resp.headers["Retry-After"] == "1"
            assert len(ok(await call("GET", f"{bridge.api}/things", owner.token))) == 1  # reads go on
            refused = bridge.cli("user", "add", "late", "--password", "late-password-1", check=False)
            assert (refused.returncode, refused.stderr) == (
                1,
                "thingbridge: the database refused the command: database is locked\n",
            )
            with pytest.raises(aiomqtt.MqttError):  # no PUBACK: the bridge closes the connection
                await client.publish(f"things/{thing.id}/collect", orjson.dumps({"n": 2}), qos=1)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
    assert await collect(bridge, thing, 3) == 200
    await publish(bridge, thing, range(4, 5))
    assert await stored(bridge, owner, thing) == [3, 4]
    assert bridge.stop() == 0
