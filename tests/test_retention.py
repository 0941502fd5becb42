"""Message retention (messages.retention_days) on each store: a pass deletes the history older than
the retention but each thing's newest message of each type (cursors naming it stay valid), counts
what it deleted, and runs beside device writes without losing an acknowledged one. Age comes from
rows written with old timestamps through the store, and from the pruner's clock: nothing waits."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from bridge.core import ids
from bridge.core.errors import Invalid
from bridge.core.identity import DeviceIdentity
from bridge.core.messages import DAY, EGRESS, INGRESS, STATUS, Message, Query, insert_message
from bridge.core.retention import Retention
from bridge.core.service import Core
from bridge.core.things import NewThing
from bridge.store import OperationalError, sessions
from bridge.store.postgres import AHEAD, DEFAULT_PARTITION
from tests.conftest import Bridge, store_bridge
from tests.helpers import (
    account,
    call,
    create_thing,
    in_process_core,
    next_message,
    ok,
    rows,
    thing_client,
    token,
    until,
)
from tests.postgres import PostgresServer

RETENTION = 2  # days


@pytest.fixture
async def core(tmp_path: Path, store_url: str) -> AsyncIterator[Core]:
    async with in_process_core(tmp_path, store_url, messages={"retention_days": RETENTION}) as core:
        yield core


async def devices(core: Core, *names: str) -> list[DeviceIdentity]:
    await core.accounts.create_user("alice", "alice-password-1")
    user = await core.accounts.user_by_name("alice")
    found = []
    for name in names:
        thing = await core.things.create(user, NewThing(id=name, key_type="EC"))
        found.append(DeviceIdentity(thing.id, thing.owner_id, thing.cert_id))
    return found


async def stored(core: Core, device: DeviceIdentity, kind: str, count: int, age_days: float = 0) -> list[str]:
    """`count` messages of `kind` stored now, then dated `age_days` back (their ids too, which
    carry the time); their ids."""

    def write(conn):  # type: ignore[no-untyped-def]
        made = [
            insert_message(conn, device.thing_id, device.owner_id, kind, b"{}", "json", "http")
            for _ in range(count)
        ]
        dated = [(ts, ids.message_id(ts), m.seq) for m in made for ts in [m.ts - age_days * DAY]]
        conn.executemany("UPDATE messages SET ts = ?, id = ? WHERE seq = ?", dated)
        return [msg_id for _, msg_id, _ in dated]

    return await core.store.write(write)


async def history(core: Core, device: DeviceIdentity, **query: object) -> list[Message]:
    return await core.messages.query(device.thing_id, device.owner_id, Query(**query))  # type: ignore[arg-type]


async def test_a_pass_deletes_the_old_history_and_cursors_naming_it_go_on(core: Core) -> None:
    busy, idle = await devices(core, "busy", "idle")
    old_ingress = await stored(core, busy, INGRESS, 5, age_days=RETENTION + 1)
    old_egress = await stored(core, busy, EGRESS, 3, age_days=RETENTION + 1)
    await stored(core, idle, INGRESS, 2, age_days=RETENTION + 30)
    legacy = await legacy_message(core, busy, age_days=RETENTION + 1)
    recent = await stored(core, busy, INGRESS, 3, age_days=RETENTION - 1)
    recent_egress = await stored(core, busy, EGRESS, 1, age_days=RETENTION - 1)
    before = max(m.seq for m in await history(core, busy))

    retention = core.retention
    retention.batch = 4  # windows of 4: the pass takes several
    assert await retention.prune() == 11
    assert retention.stats() == {"prunedMessages": 11}
    kept = recent + recent_egress
    assert [m.id for m in await history(core, busy)] == kept
    assert [m.id for m in await history(core, busy, start=0, end=int(time.time()))] == kept
    assert await history(core, idle) == []
    # a cursor naming a pruned message goes on with what is left after it (the device's long-poll too)
    for pruned in (old_ingress[0], old_egress[-1]):
        assert [m.id for m in await history(core, busy, after=pruned)] == kept
    waited = await core.messages.wait_egress(busy.thing_id, busy.owner_id, Query(after=old_egress[0]), 0)
    assert [m.id for m in waited] == recent_egress
    # an id of an earlier release (version 4, no time in it), or one younger than the retention
    # that is not there: refused as before
    for unknown in (legacy, ids.message_id(time.time())):
        with pytest.raises(Invalid, match="no message"):
            await history(core, busy, after=unknown)
    # seq keeps growing past what was deleted: `after=` cursors stay monotonic
    (fresh,) = await stored(core, busy, INGRESS, 1)
    assert [m.id for m in await history(core, busy, after=recent[-1])] == [*recent_egress, fresh]
    assert (await history(core, busy, after=fresh)) == []
    assert (await history(core, busy, type=INGRESS))[-1].seq > before

    assert await retention.prune() == 0  # nothing more is due
    # the clock moved a day past the retention of what is left: it goes (on PostgreSQL with the
    # partition of its day)
    later = Retention(core.store, RETENTION, clock=lambda: time.time() + (RETENTION + 1) * DAY)
    assert await later.prune() == len(kept) + 1
    assert await history(core, busy) == []


async def test_a_sessions_queued_message_outlives_its_history_row(core: Core) -> None:
    """A publish for a thing with an offline persistent session leaves a history row and a queue
    row (its own copy): pruning the first leaves the second whole, as a restart loads it."""
    (device,) = await devices(core, "asleep")
    topic = f"things/{device.thing_id}/publish"
    await core.store.write(sessions.save, device.thing_id, (device.thing_id, None), b"principal")
    await core.store.write(sessions.enqueue, [(device.thing_id, topic, b"command", 1)])
    await stored(core, device, EGRESS, 1, age_days=RETENTION + 1)
    assert await core.retention.prune() == 1
    (session,) = await core.store.write(sessions.load, time.time(), DAY)
    assert [(m[1], m[2]) for m in session.messages] == [(topic, b"command")]


async def legacy_message(core: Core, device: DeviceIdentity, age_days: float) -> str:
    """A message as releases before retention stored it: a version 4 UUID for its id."""
    msg_id = str(uuid.uuid4())
    await core.store.write(
        lambda c: c.execute(
            "INSERT INTO messages (id, thing_id, owner_id, type, ts, encoding, payload, transport)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (
                msg_id,
                device.thing_id,
                device.owner_id,
                STATUS,
                ids.now() - age_days * DAY,
                "json",
                b"{}",
                "http",
            ),
        )
    )
    return msg_id


async def test_no_acknowledged_message_is_lost_while_a_pass_runs(core: Core) -> None:
    """Devices store messages (the QoS 1 path: the acknowledgement follows the commit) from before
    old rows are written among theirs until after the pass ends, so the pass's windows hold both
    and its batches share the writer with the devices' writes; every acknowledged message is
    there after, every old one is gone."""
    things = await devices(core, "d0", "d1", "d2")
    chunks, chunk = 30, 51

    def backfill(conn):  # type: ignore[no-untyped-def]
        when = ids.now() - (RETENTION + 1) * DAY
        conn.executemany(
            "INSERT INTO messages (id, thing_id, owner_id, type, ts, encoding, payload, transport)"
            " VALUES (?,?,?,?,?,?,?,?)",
            [
                (ids.new_id(), d.thing_id, d.owner_id, INGRESS, when, "text", b"old", "mqtt")
                for _ in range(chunk // len(things))
                for d in things
            ],
        )

    acked: list[str] = []
    started, pruning, done = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def device(d: DeviceIdentity) -> int:
        during = 0
        while not done.is_set():
            message = await core.messages.collect(d, f"{d.thing_id}-{len(acked)}".encode(), transport="mqtt")
            acked.append(message.id)
            started.set()
            during += pruning.is_set()
            await asyncio.sleep(0)
        return during

    publishing = [asyncio.create_task(device(d)) for d in things]
    await started.wait()  # the devices are under way before the old rows come
    for _ in range(chunks):
        await core.store.write(backfill)
    pruning.set()
    deleted = await Retention(core.store, RETENTION, batch=50).prune()
    done.set()
    during = await asyncio.gather(*publishing)

    assert deleted == chunks * chunk and sum(during) > 0
    present = {m.id for d in things for m in await history(core, d, limit=len(acked) + deleted)}
    assert present == set(acked)


# ---- the serving process ---------------------------------------------------------------------------
@pytest.fixture
def retaining(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    yield from store_bridge(request, tmp_path_factory, messages={"retention_days": 1})


async def test_the_serving_pass_prunes_history_but_not_a_sessions_queue(
    retaining: Bridge, tmp_path: Path
) -> None:
    """Messages queued for an offline persistent session are delivered after their history rows
    were pruned (the queue holds its own copy); the history endpoints show what is left; devices
    publishing at QoS 1 while the start-up pass runs lose nothing; /broker/stats counts it. On
    SQLite only (two starts of the server; the suite's time is bounded): the pass itself is the
    same code as above on each store, and it touches no table but messages."""
    bridge = retaining
    alice = account(bridge)
    offline, device = await asyncio.gather(
        *(create_thing(bridge, alice.token, tmp_path, keyType="EC") for _ in range(2))
    )
    async with thing_client(bridge, offline, clean_session=False) as session:
        await session.subscribe(f"things/{offline.id}/publish", qos=1)
    queued = [f"command {i}".encode() for i in range(3)]
    for payload in queued:
        ok(await call("POST", f"{bridge.api}/things/{offline.id}/publish", alice.token, data=payload))
    async with thing_client(bridge, device) as client:
        for i in range(3):
            await client.publish(f"things/{device.id}/collect", f"old {i}".encode(), qos=1)
    bridge.stop()
    due = age(bridge, 2)
    commands = [
        r[0] for r in rows(bridge, "SELECT id FROM messages WHERE thing_id = ? ORDER BY seq", offline.id)
    ]
    assert len(commands) == len(queued)

    bridge.start()
    async with thing_client(bridge, device) as client:  # beside the start-up pass
        for i in range(10):
            await client.publish(f"things/{device.id}/collect", f"new {i}".encode(), qos=1)
    history = f"{bridge.api}/things/{offline.id}/messages"
    new = ok(await call("POST", f"{bridge.api}/things/{offline.id}/publish", alice.token, data=b"command 3"))
    admin = await token(bridge)
    stats = await until(
        lambda: stats_if(bridge, admin, lambda s: s["prunedMessages"] == due), "the start-up pass"
    )
    assert stats["prunedMessages"] == due > 0
    async with thing_client(bridge, offline, clean_session=False) as session:
        heard = [(await next_message(session)).payload for _ in range(len(queued) + 1)]
    assert heard == [*queued, b"command 3"]

    assert [m["flmessagespk"] for m in ok(await call("GET", history, alice.token))] == [new["flmessagespk"]]
    for cursor in (commands[0], commands[-1]):  # pruned: what is left after it
        waited = ok(await call("GET", f"{history}?after={cursor}&messagetype=egress&wait=0", alice.token))
        assert [m["message"] for m in waited] == ["command 3"]
    kept = ok(await call("GET", f"{bridge.api}/things/{device.id}/messages", alice.token))
    assert [m["message"] for m in kept] == [f"new {i}" for i in range(10)]


def age(bridge: Bridge, days: float) -> int:
    """Date every message of the stopped server `days` back, ids included; how many there are."""
    found = rows(bridge, "SELECT seq, ts FROM messages")
    for seq, ts in found:
        rows(
            bridge,
            "UPDATE messages SET ts = ?, id = ? WHERE seq = ?",
            ts - days * DAY,
            ids.message_id(ts - days * DAY),
            seq,
        )
    return len(found)


async def stats_if(bridge: Bridge, admin: str, want: Callable[[dict], bool]) -> dict | None:
    stats = ok(await call("GET", f"{bridge.api}/broker/stats", admin))
    return stats if want(stats) else None


async def test_postgresql_drops_whole_days_and_makes_the_coming_ones(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """messages is partitioned by day there: a pass makes today's and the next AHEAD days'
    partitions (moving into a new one what the default partition held for its day), and drops
    those whose whole day is older than the retention."""
    url = postgres_server.new_database()
    async with in_process_core(tmp_path, url, messages={"retention_days": RETENTION}) as core:
        (device,) = await devices(core, "daily")
        now = time.time()
        clock = [now]
        retention = Retention(core.store, RETENTION, clock=lambda: clock[0])
        assert await retention.prune() == 0
        today = int(now // DAY)
        assert partitions(url) >= {day_table(d) for d in range(today, today + AHEAD + 1)}
        current = await stored(core, device, INGRESS, 3)
        far = AHEAD + 2  # days ahead: past the partitions made, so in the default partition
        later = await stored(core, device, INGRESS, 2, age_days=-far)
        assert where(url) == {DEFAULT_PARTITION: 2, day_table(today): 3}

        clock[0] = now + far * DAY  # today's and the next two days are past the retention
        with psycopg.connect(url) as reader:  # a long read: its locks on messages last until it ends
            reader.execute("SELECT count(*) FROM messages")
            device_write = asyncio.create_task(core.messages.collect(device, b"beside", transport="http"))
            with pytest.raises(OperationalError, match="lock timeout"):
                await retention.prune()  # gave up after PARTITION_LOCK_WAIT, nothing changed
            current.append((await device_write).id)  # the writer went on
        assert await retention.prune() == len(current)
        assert retention.stats() == {"prunedMessages": len(current)}
        assert where(url) == {day_table(today + far): 2}
        found = partitions(url)
        assert {day_table(d) for d in range(today, today + far - RETENTION)}.isdisjoint(found)
        assert found >= {day_table(d) for d in range(today + far, today + far + AHEAD + 1)}
        assert [m.id for m in await history(core, device)] == later
        # one identity feeds every partition: seq goes on past what was dropped
        (fresh,) = await stored(core, device, STATUS, 1)
        assert [m.id for m in await history(core, device, after=later[-1])] == [fresh]


def day_table(day: int) -> str:
    return "messages_p" + time.strftime("%Y%m%d", time.gmtime(day * DAY))


def partitions(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        found = conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'messages'::regclass"
        )
        return {name for (name,) in found}


def where(url: str) -> dict[str, int]:
    """How many messages each partition holds."""
    with psycopg.connect(url) as conn:
        found = conn.execute("SELECT tableoid::regclass::text, count(*) FROM messages GROUP BY 1")
        return dict(found.fetchall())
