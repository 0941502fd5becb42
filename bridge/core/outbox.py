"""Broker publications that must follow a committed change, even one made by another process.

A flow writes `enqueue(conn, ...)` rows in its own transaction; the serving process drains them in
order to the DeviceLink, at once when the change was its own (`kick`) and within `poll` seconds
when the command line wrote them. A row's `retain` is one of ROUTE, RETAIN (routed and kept as
the topic's retained message) or RESTORE (kept, not routed: the state put back at start-up, which
subscribers already had or still have queued; see `restoring`)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from bridge.core import topics
from bridge.core.background import Background
from bridge.core.ports import DeviceLink
from bridge.store import Store

T = TypeVar("T")


ROUTE, RETAIN, RESTORE = 0, 1, 2


def enqueue(conn: sqlite3.Connection, topic: str, payload: bytes, *, retain: bool) -> None:
    conn.execute(
        "INSERT INTO outbox (topic, payload, retain) VALUES (?,?,?)",
        (topic, payload, RETAIN if retain else ROUTE),
    )


def restoring(fill: Callable[[sqlite3.Connection], None]) -> Callable[[sqlite3.Connection], None]:
    """`fill` as a start-up re-publish: the retained documents it queues are restored to the
    broker's retained store without being routed again (a persistent session would otherwise get a
    second copy of every config, notice and target at each restart)."""

    def fill_and_mark(conn: sqlite3.Connection) -> None:
        before = conn.execute("SELECT coalesce(max(seq), 0) FROM outbox").fetchone()[0]
        fill(conn)
        conn.execute("UPDATE outbox SET retain = ? WHERE seq > ? AND retain = ?", (RESTORE, before, RETAIN))

    return fill_and_mark


def forget_thing(conn: sqlite3.Connection, thing_id: str) -> None:
    """Drop what is still queued for a thing being deleted (part of its delete's transaction)."""
    prefix = topics.thing_prefix(thing_id)
    conn.execute("DELETE FROM outbox WHERE substr(topic, 1, ?) = ?", (len(prefix), prefix))


def forget_flow(conn: sqlite3.Connection, flow: str) -> None:
    """Drop what is still queued on every thing's `flow` topic (presence's documents an earlier
    version queued here: presence publishes its own now)."""
    conn.execute("DELETE FROM outbox WHERE topic LIKE ?", (topics.topic("%", flow),))


class Outbox(Background):
    step = "outbox drain"

    def __init__(self, store: Store, link: DeviceLink, poll: float = 1.0) -> None:
        self.store = store
        self.poll = poll
        self.link = link
        # Held while rows are read and published; a thing's delete clears its retained messages
        # under it, so no document read before the delete is published after that clean-up.
        self.lock = asyncio.Lock()
        self._kick = asyncio.Event()

    def kick(self) -> None:
        self._kick.set()

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """A store write that may queue documents here: committed, then drained at once."""
        result = await self.store.write(fn, *args)
        self.kick()
        return result

    async def drain(self) -> int:
        async with self.lock:
            rows = await self.store.read(
                lambda c: c.execute(
                    "SELECT seq, topic, payload, retain FROM outbox ORDER BY seq LIMIT 1000"
                ).fetchall()
            )
            for row in rows:
                if row["retain"] == RESTORE:
                    await self.link.restore_retained(row["topic"], bytes(row["payload"]))
                else:
                    await self.link.publish(
                        row["topic"], bytes(row["payload"]), retain=row["retain"] == RETAIN
                    )
        if rows:
            last = rows[-1]["seq"]
            await self.store.write(lambda c: c.execute("DELETE FROM outbox WHERE seq <= ?", (last,)))
        return len(rows)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self.poll)
            self._kick.clear()
            try:
                while await self.drain() == 1000:
                    pass
            except Exception as exc:  # keep draining later; a broken row must not stop the pump
                self.failed(exc)
            else:
                self.succeeded()
