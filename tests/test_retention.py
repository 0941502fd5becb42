"""Message retention (messages.retention_days) on each store: a pass deletes the history older than
the retention but each thing's newest message of each type (cursors naming it stay valid), counts
what it deleted, and runs beside device writes without losing an acknowledged one. Age comes from
rows written with old timestamps through the store, and from the pruner's clock: nothing waits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from bridge.core import ids
from bridge.core.errors import Invalid
from bridge.core.identity import DeviceIdentity
from bridge.core.messages import EGRESS, INGRESS, STATUS, Message, Query, insert_message
from bridge.core.retention import DAY, Retention
from bridge.core.service import Core
from bridge.core.things import NewThing
from tests.conftest import Bridge, on_each_store, store_bridge
from tests.helpers import (
    account,
    call,
    create_thing,
    error,
    in_process_core,
    next_message,
    ok,
    rows,
    thing_client,
    token,
    until,
)

RETENTION = 2  # days


@pytest.fixture
async def core(tmp_path: Path, store_url: str) -> AsyncIterator[Core]:
    async with in_process_core(tmp_path, store_url) as core:
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
    """`count` messages of `kind` stored now, then dated `age_days` back; their ids."""

    def write(conn):  # type: ignore[no-untyped-def]
        made = [
            insert_message(conn, device.thing_id, device.owner_id, kind, b"{}", "json", "http")
            for _ in range(count)
        ]
        conn.executemany(
            "UPDATE messages SET ts = ? WHERE seq = ?", [(m.ts - age_days * DAY, m.seq) for m in made]
        )
        return [m.id for m in made]

    return await core.store.write(write)


async def history(core: Core, device: DeviceIdentity, **query: object) -> list[Message]:
    return await core.messages.query(device.thing_id, device.owner_id, Query(**query))  # type: ignore[arg-type]


async def test_a_pass_deletes_the_old_history_but_each_newest_of_a_type(core: Core) -> None:
    busy, idle = await devices(core, "busy", "idle")
    old_ingress = await stored(core, busy, INGRESS, 5, age_days=RETENTION + 1)
    old_egress = await stored(core, busy, EGRESS, 3, age_days=RETENTION + 1)
    old_status = await stored(core, busy, STATUS, 1, age_days=RETENTION + 1)
    idle_ingress = await stored(core, idle, INGRESS, 2, age_days=RETENTION + 30)
    recent = await stored(core, busy, INGRESS, 3, age_days=RETENTION - 1)
    before = max(m.seq for m in await history(core, busy))

    retention = Retention(core.store, RETENTION, batch=4)  # windows of 4: the pass takes several
    # all 5 old ingress (newer ones exist), 2 of 3 egress, 1 of idle's 2; the status is its newest
    assert await retention.prune() == 8
    assert retention.stats() == {"prunedMessages": 8}
    kept = old_egress[-1:] + old_status + recent
    assert [m.id for m in await history(core, busy)] == kept
    assert [m.id for m in await history(core, busy, start=0, end=int(time.time()))] == kept
    assert [m.id for m in await history(core, idle)] == idle_ingress[-1:]
    # a cursor naming a kept message goes on; one naming a pruned message is refused as deleted
    assert await core.messages.wait_egress(busy.thing_id, busy.owner_id, Query(after=old_egress[-1]), 0) == []
    for pruned in (old_ingress[0], old_egress[0]):
        with pytest.raises(Invalid, match="no message"):
            await history(core, busy, after=pruned)
    # seq keeps growing past what was deleted: `after=` cursors stay monotonic
    (fresh,) = await stored(core, busy, INGRESS, 1)
    assert (await history(core, busy, after=recent[-1]))[0].id == fresh
    assert [m.seq for m in await history(core, busy, after=fresh)] == []
    assert (await history(core, busy, type=INGRESS))[-1].seq > before

    assert await retention.prune() == 0  # nothing more is due
    # the clock moved past the retention of the recent ones: all but the newest ingress go
    later = Retention(core.store, RETENTION, clock=lambda: time.time() + RETENTION * DAY)
    assert await later.prune() == 3
    assert [m.id for m in await history(core, busy)] == old_egress[-1:] + old_status + [fresh]


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


@on_each_store("retaining")
async def test_the_serving_pass_prunes_history_but_not_a_sessions_queue(
    retaining: Bridge, tmp_path: Path
) -> None:
    """Messages queued for an offline persistent session are delivered after their history rows
    were pruned (the queue holds its own copy); the history endpoints show what is left; devices
    publishing at QoS 1 while the start-up pass runs lose nothing; /broker/stats counts it."""
    bridge = retaining
    alice = account(bridge)
    offline, device = await asyncio.gather(*(create_thing(bridge, alice.token, tmp_path) for _ in range(2)))
    async with thing_client(bridge, offline, clean_session=False) as session:
        await session.subscribe(f"things/{offline.id}/publish", qos=1)
    queued = [f"command {i}".encode() for i in range(3)]
    for payload in queued:
        ok(await call("POST", f"{bridge.api}/things/{offline.id}/publish", alice.token, data=payload))
    async with thing_client(bridge, device) as client:
        for i in range(3):
            await client.publish(f"things/{device.id}/collect", f"old {i}".encode(), qos=1)
    history = f"/things/{offline.id}/messages"
    commands = [m["flmessagespk"] for m in ok(await call("GET", bridge.api + history, alice.token))]
    assert len(commands) == len(queued)
    bridge.stop()
    rows(bridge, "UPDATE messages SET ts = ts - ?", 2 * DAY)  # all of it two days old
    due = rows(bridge, "SELECT count(*) - count(DISTINCT thing_id || type) FROM messages")[0][0]

    bridge.start()
    async with thing_client(bridge, device) as client:  # beside the start-up pass
        for i in range(20):
            await client.publish(f"things/{device.id}/collect", f"new {i}".encode(), qos=1)
    admin = await token(bridge)
    stats = await until(
        lambda: stats_if(bridge, admin, lambda s: s["prunedMessages"] == due), "the start-up pass"
    )
    assert stats["prunedMessages"] == due > 0
    async with thing_client(bridge, offline, clean_session=False) as session:
        heard = [(await next_message(session)).payload for _ in queued]
    assert heard == queued

    history = bridge.api + history  # the ports of this start
    assert [m["flmessagespk"] for m in ok(await call("GET", history, alice.token))] == commands[-1:]
    error(await call("GET", f"{history}?after={commands[0]}", alice.token), 400)
    waited = f"{history}?after={commands[-1]}&messagetype=egress&wait=0"
    assert ok(await call("GET", waited, alice.token)) == []
    kept = ok(await call("GET", f"{bridge.api}/things/{device.id}/messages", alice.token))
    assert [m["message"] for m in kept] == ["old 2"] + [f"new {i}" for i in range(20)]


async def stats_if(bridge: Bridge, admin: str, want: Callable[[dict], bool]) -> dict | None:
    stats = ok(await call("GET", f"{bridge.api}/broker/stats", admin))
    return stats if want(stats) else None
