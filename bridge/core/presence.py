"""Online/offline state of things. A thing may hold several connections; it is online while any is
up. Each change is recorded and then published retained on `things/{id}/presence`.

Presence publishes its documents itself once they are committed, not through the outbox as other
retained documents go: every connect and disconnect changes it, and the outbox's rows (written with
the change, read back, deleted) took a fifth of a TLS connection's CPU (issue #14). Nothing is lost
by it: at start-up every state is published again from the table (`restore`), and a document the
link refused is published again with the next write (`RETRY`)."""

from __future__ import annotations

import asyncio
import sqlite3
from asyncio import Future
from collections.abc import Callable, Collection

import orjson

from bridge.core import ids, topics
from bridge.core.identity import DeviceIdentity
from bridge.core.outbox import Outbox, forget_flow
from bridge.core.ports import DeviceLink
from bridge.store import Store

Change = tuple[DeviceIdentity, str, float, str]  # the thing's incarnation, its state, since, transport
Document = tuple[str, str, float]  # thing id, state, since
RETRY = 1.0  # seconds before states the store or the link refused are written again
# Changes are written at most once per WINDOW seconds, together: a store write costs the event loop
# about as much as a TLS handshake in the thread hand-overs around it, and a thing's connect and
# disconnect within one window are one row written (issue #14).
WINDOW = 0.05


class Presence:
    def __init__(self, store: Store, outbox: Outbox, link: DeviceLink) -> None:
        self.store = store
        self.outbox = outbox  # only its lock: see _publish
        self.link = link
        # Live connections per incarnation (thing id, certificate id): a deleted thing's
        # connections that end late do not count against a new thing of the same id.
        self._connections: dict[tuple[str, str], int] = {}
        # States recorded and not written yet, by incarnation; the future their recorders await;
        # the write in flight; the timer of the next.
        self._pending: dict[tuple[str, str], Change] = {}
        self._next: Future[None] | None = None
        self._writing: Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

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
        """Store the new state, then publish it retained (_publish); only while this incarnation of
        the thing exists (a deleted thing's late offline event leaves nothing). Returns once
        committed and published."""
        await asyncio.shield(self.change(device, state, transport))

    def change(self, device: DeviceIdentity, state: str, transport: str = "mqtt") -> Future[None]:
        """record() for a caller that does not wait: the future of the write that takes the change.
        The states recorded within WINDOW, or while the previous group is being written, are
        written together (one store write instead of one per connect and disconnect; issue #14):
        an incarnation's latest state in the group wins, so a connect followed at once by a
        disconnect ends offline."""
        key = (device.thing_id, device.cert_id)
        self._pending.pop(key, None)  # its latest change goes last, in the order changes happened
        self._pending[key] = (device, state, ids.now(), transport)
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            self._schedule()
        return self._next

    def _schedule(self) -> None:
        """The next write, WINDOW from now, unless one is being written (it schedules the next when
        it ends) or is scheduled already."""
        if self._writing is None and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(WINDOW, self._write_next)

    def _write_next(self) -> None:
        self._timer = None
        committed = self._next
        if committed is None:  # nothing recorded since (or only changes waiting for _retry)
            return
        group, self._pending, self._next = self._pending, {}, None
        self._writing = asyncio.ensure_future(self._write(list(group.values()), committed))

    async def _write(self, group: list[Change], committed: Future[None]) -> None:
        def write(conn: sqlite3.Connection) -> list[Document]:
            return [
                (device.thing_id, state, ts)
                for device, state, ts, transport in group
                if conn.execute(
                    "INSERT INTO presence (thing_id, state, ts, transport) SELECT ?,?,?,? WHERE EXISTS"
                    " (SELECT 1 FROM things WHERE id = ? AND cert_id = ?) ON CONFLICT (thing_id) DO UPDATE"
                    " SET state = excluded.state, ts = excluded.ts, transport = excluded.transport",
                    (device.thing_id, state, ts, transport, device.thing_id, device.cert_id),
                ).rowcount
            ]

        try:
            await self._publish(write)
        except Exception as exc:  # every recorder of the group hears it
            if not committed.done():
                committed.set_exception(exc)
            # The changes are kept and written again (each unless a later one of its incarnation
            # came meanwhile): a thing that went offline while the database was away must not
            # stay online. One entry per incarnation: bounded by the things.
            for change in group:
                self._pending.setdefault((change[0].thing_id, change[0].cert_id), change)
            asyncio.get_running_loop().call_later(RETRY, self._retry)
        else:
            committed.set_result(None)
        finally:
            self._writing = None
            if self._next is not None:  # what was recorded meanwhile
                self._schedule()

    async def _publish(self, write: Callable[[sqlite3.Connection], list[Document]]) -> None:
        """Commit `write`, then publish the documents of the states it wrote, retained. Under the
        outbox's lock, which a thing's delete holds while it clears the thing's retained documents
        (none committed before the delete is published after it), and which orders the documents
        of successive writes."""
        async with self.outbox.lock:
            await self._send(await self.store.write(write))

    async def _send(self, documents: list[Document]) -> None:
        for thing_id, state, ts in documents:
            await self.link.publish(
                topics.topic(thing_id, topics.PRESENCE), _document(state, ts), retain=True
            )

    async def flush(self) -> None:
        """Write what is recorded now, not WINDOW later (a server that stops); what the store
        refuses stays for the next start's restore()."""
        while self._writing is not None or self._next is not None:
            if self._writing is None:
                if self._timer is not None:
                    self._timer.cancel()
                self._write_next()
            if self._writing is not None:
                await self._writing

    def _retry(self) -> None:
        if self._pending and self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            # nobody may await this group: its failure is not "never retrieved"
            self._next.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._schedule()

    async def offline(self, thing_ids: Collection[str]) -> None:
        """The things are offline now, whichever incarnation's connection ended: for an external
        engine, whose report of a closed connection does not name its certificate."""
        ts = ids.now()

        def write(conn: sqlite3.Connection) -> list[Document]:
            return [
                (thing_id, "offline", ts)
                for thing_id in thing_ids
                if conn.execute(
                    "UPDATE presence SET state = 'offline', ts = ? WHERE thing_id = ? AND state <> 'offline'",
                    (ts, thing_id),
                ).rowcount
            ]

        await self._publish(write)

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

        def went_offline(conn: sqlite3.Connection) -> list[Document]:
            forget_flow(conn, topics.PRESENCE)  # an earlier version's, older than these
            if connections_outlive_us:
                return []
            rows = conn.execute(
                "UPDATE presence SET state = 'offline' WHERE state <> 'offline' RETURNING thing_id, ts"
            ).fetchall()
            return [(row["thing_id"], "offline", row["ts"]) for row in rows]

        where = "" if connections_outlive_us else " WHERE state = 'offline'"
        async with self.outbox.lock:  # before any change recorded from now on (see _publish)
            kept = await self.store.read(
                lambda c: c.execute(f"SELECT thing_id, state, ts FROM presence{where}").fetchall()
            )
            for row in kept:  # kept as they are, not routed: subscribers already have them
                topic = topics.topic(row["thing_id"], topics.PRESENCE)
                await self.link.restore_retained(topic, _document(row["state"], row["ts"]))
            await self._send(await self.store.write(went_offline))


def _document(state: str, ts: float) -> bytes:
    return orjson.dumps({"state": state, "ts": ts})
