"""Online/offline state of things. A thing may hold several connections; it is online while any is
up. Each change is recorded and published retained on `things/{id}/presence` (through the outbox,
like every retained state document)."""

from __future__ import annotations

import asyncio
import sqlite3
from asyncio import Future
from collections.abc import Collection

import orjson

from bridge.core import ids, topics
from bridge.core.identity import DeviceIdentity
from bridge.core.outbox import Outbox, enqueue, restoring
from bridge.store import Store

Change = tuple[DeviceIdentity, str, float, str]  # the thing's incarnation, its state, since, transport
RETRY = 1.0  # seconds before states the store refused are written again


class Presence:
    def __init__(self, store: Store, outbox: Outbox) -> None:
        self.store = store
        self.outbox = outbox
        # Live connections per incarnation (thing id, certificate id): a deleted thing's
        # connections that end late do not count against a new thing of the same id.
        self._connections: dict[tuple[str, str], int] = {}
        # States recorded and not written yet, by incarnation; the future their recorders await;
        # the write in flight.
        self._pending: dict[tuple[str, str], Change] = {}
        self._next: Future[None] | None = None
        self._writing: Future[None] | None = None

    def connected(self, device: DeviceIdentity) -> bool:
        """Count a new connection (synchronously, so events apply in the order they happened);
        True when the thing just came online."""
        key = (device.thing_id, device.cert_id)
        self._connections[key] = self._connections.get(key, 0) + 1
        return self._connections[key] == 1

    def disconnected(self, device: DeviceIdentity) -> bool:
        """True when the thing's last connection just closed."""
        key = (device.thing_id, device.cert_id)
        left = self._connections.get(key, 0) - 1
        if left > 0:
            self._connections[key] = left
            return False
        self._connections.pop(key, None)
        return left == 0

    async def record(self, device: DeviceIdentity, state: str, transport: str = "mqtt") -> None:
        """Store the new state and queue it, retained, in the same transaction; only while this
        incarnation of the thing exists (a deleted thing's late offline event leaves nothing).
        Returns once committed. The states recorded during one turn of the event loop, or while the
        previous group is being written, are written together (one store write instead of one per
        connect and disconnect; issue #14): an incarnation's latest state in the group wins, so a
        connect followed at once by a disconnect ends offline."""
        key = (device.thing_id, device.cert_id)
        self._pending.pop(key, None)  # its latest change goes last, in the order changes happened
        self._pending[key] = (device, state, ids.now(), transport)
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            if self._writing is None:
                asyncio.get_running_loop().call_soon(self._write_next)
        await asyncio.shield(self._next)

    def _write_next(self) -> None:
        committed = self._next
        if committed is None:  # nothing recorded since (or only changes waiting for _retry)
            return
        group, self._pending, self._next = self._pending, {}, None
        self._writing = asyncio.ensure_future(self._write(list(group.values()), committed))

    async def _write(self, group: list[Change], committed: Future[None]) -> None:
        def write(conn: sqlite3.Connection) -> None:
            for device, state, ts, transport in group:
                written = conn.execute(
                    "INSERT INTO presence (thing_id, state, ts, transport) SELECT ?,?,?,? WHERE EXISTS"
                    " (SELECT 1 FROM things WHERE id = ? AND cert_id = ?) ON CONFLICT (thing_id) DO UPDATE"
                    " SET state = excluded.state, ts = excluded.ts, transport = excluded.transport",
                    (device.thing_id, state, ts, transport, device.thing_id, device.cert_id),
                ).rowcount
                if written:
                    _publish(conn, device.thing_id, state, ts)

        try:
            await self.store.write(write)
        except Exception as exc:  # every recorder of the group hears it
            committed.set_exception(exc)
            # The changes are kept and written again (each unless a later one of its incarnation
            # came meanwhile): a thing that went offline while the database was away must not
            # stay online. One entry per incarnation: bounded by the things.
            for change in group:
                self._pending.setdefault((change[0].thing_id, change[0].cert_id), change)
            asyncio.get_running_loop().call_later(RETRY, self._retry)
        else:
            committed.set_result(None)
            self.outbox.kick()
        finally:
            self._writing = None
            self._write_next()  # what was recorded meanwhile

    def _retry(self) -> None:
        if self._pending and self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            # nobody may await this group: its failure is not "never retrieved"
            self._next.add_done_callback(lambda f: f.cancelled() or f.exception())
            if self._writing is None:
                self._write_next()

    async def offline(self, thing_ids: Collection[str]) -> None:
        """The things are offline now, whichever incarnation's connection ended: for an external
        engine, whose report of a closed connection does not name its certificate."""
        ts = ids.now()

        def write(conn: sqlite3.Connection) -> None:
            for thing_id in thing_ids:
                if conn.execute(
                    "UPDATE presence SET state = 'offline', ts = ? WHERE thing_id = ? AND state <> 'offline'",
                    (ts, thing_id),
                ).rowcount:
                    _publish(conn, thing_id, "offline", ts)

        await self.store.write(write)
        self.outbox.kick()

    async def states(self) -> dict[str, tuple[str, float]]:
        """Every recorded state and since when, by thing id (an external engine's reconciliation)."""
        rows = await self.store.read(
            lambda c: c.execute("SELECT thing_id, state, ts FROM presence").fetchall()
        )
        return {row["thing_id"]: (row["state"], row["ts"]) for row in rows}

    async def restore(self, *, connections_outlive_us: bool = False) -> None:
        """At start-up nothing is connected: a thing that was online when the process ended is
        offline now (published); every other thing's last state is restored as retained.
        `connections_outlive_us` (an external engine): the devices stayed connected to it, so every
        state is restored as it is (the engine's connection events correct it)."""

        def went_offline(conn: sqlite3.Connection) -> None:
            for row in conn.execute(
                "UPDATE presence SET state = 'offline' WHERE state <> 'offline' RETURNING thing_id, ts"
            ).fetchall():
                _publish(conn, row["thing_id"], "offline", row["ts"])

        def restore_states(conn: sqlite3.Connection) -> None:
            where = "" if connections_outlive_us else " WHERE state = 'offline'"
            for row in conn.execute(f"SELECT thing_id, state, ts FROM presence{where}").fetchall():
                _publish(conn, row["thing_id"], row["state"], row["ts"])

        await self.store.write(restoring(restore_states))
        if not connections_outlive_us:
            await self.store.write(went_offline)
        self.outbox.kick()


def _publish(conn: sqlite3.Connection, thing_id: str, state: str, ts: float) -> None:
    document = orjson.dumps({"state": state, "ts": ts})
    enqueue(conn, topics.topic(thing_id, topics.PRESENCE), document, retain=True)
