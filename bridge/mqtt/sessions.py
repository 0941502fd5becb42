"""Persistent sessions that survive a restart (issue #14): the seam HardenedBroker calls to keep a
clean-session-off session, its subscriptions and its QoS 1 messages in SQLite
(bridge/store/sessions.py), and to load them at start-up.

A message's rows are written in the transaction that commits the record it reports (a thing's
collect, an owner's publish: Routed, bridge.core.ports.commit_and_route), so a message is stored
and queued together or not at all. Every other write goes through one Journal, in the order the
broker made them, batched into one `store.write` per event-loop turn (so into the writer's group
commits: no commit of its own). What is acknowledged to a client is awaited before its
acknowledgement: a message routed to a session is queued on disk before the publisher's PUBACK or
HTTP answer, a subscription before its SUBACK. A message's "sent" and "acknowledged" states are
not awaited: after a crash a message may be sent again (with DUP if its "sent" was written), but
never one whose PUBACK was written."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from amqtt.session import Session

from bridge.core.identity import DeviceIdentity
from bridge.mqtt.auth import PRINCIPAL, Principal
from bridge.store import Store
from bridge.store import sessions as sql
from bridge.store.db import each_in_savepoint

log = logging.getLogger(__name__)


class Stored(bytes):
    """A payload queued on disk for persistent sessions: per client id, the row that holds it until
    its PUBACK. It travels with the message through amqtt's broadcast, offline queue and resume."""

    rows: dict[str, int]


def stored(payload: bytes, rows: dict[str, int]) -> Stored:
    message = Stored(payload)
    message.rows = rows
    return message


def row_of(payload: Any, client_id: str | None) -> int | None:
    return payload.rows.get(client_id) if isinstance(payload, Stored) and client_id else None


class Routed:
    """A message the bridge publishes (bridge.core.ports.Delivery): a row per persistent session
    it reaches at QoS 1 (`targets`: client id -> qos), written by `queue` in the transaction that
    commits the message's own record; then broadcast, its payload knowing those rows."""

    def __init__(
        self,
        topic: str,
        data: bytes,
        targets: dict[str, int],
        broadcast: Callable[[str, bytes], Awaitable[None]],
    ) -> None:
        self.topic, self.data, self.targets, self._broadcast = topic, data, targets, broadcast
        self.rows: dict[str, int] = {}

    def queue(self, conn: Any) -> None:
        if self.targets:
            deliveries = [(client_id, self.topic, self.data, qos) for client_id, qos in self.targets.items()]
            self.rows = sql.enqueue(conn, deliveries)

    async def send(self) -> None:
        await self._broadcast(self.topic, stored(self.data, self.rows) if self.rows else self.data)


@dataclass
class Restored:
    """A stored session as the broker takes it back: in-flight messages have a packet id."""

    client_id: str
    attributes: dict[str, Any]
    disconnected: float
    subscriptions: list[tuple[str, int]]
    messages: list[tuple[str, Stored, int, int | None]]  # topic, payload, qos, packet id


class Journal:
    """Session writes in submission order, one store.write per event-loop turn. Bounded by what
    feeds it: a routed message waits for its row, and "sent" / "acknowledged" come one per
    message in flight."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._ops: list[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any] | None]] = []
        self._writes: set[asyncio.Task[Any]] = set()

    def submit(self, fn: Callable[..., Any], *args: Any, wait: bool = True) -> asyncio.Future[Any] | None:
        """Queue fn(conn, *args); with `wait`, a future of its result once committed."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future() if wait else None
        self._ops.append((fn, args, fut))
        if len(self._ops) == 1:
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        ops, self._ops = self._ops, []
        if not ops:
            return
        # Tasks start in the order they are made: batches reach the writer's queue in order.
        write = self.store.write(each_in_savepoint, [(fn, args) for fn, args, _ in ops])
        self._writes.add(task := asyncio.ensure_future(write))
        task.add_done_callback(lambda done: self._done(ops, done))

    def _done(self, ops: list[Any], task: asyncio.Task[Any]) -> None:
        self._writes.discard(task)
        if task.cancelled() or task.exception() is not None:
            error = task.exception() if not task.cancelled() else asyncio.CancelledError()
            outcomes = [(False, error)] * len(ops)
        else:
            outcomes = task.result()
        for (fn, _args, fut), (ok, value) in zip(ops, outcomes, strict=True):
            if fut is None:
                if not ok:
                    log.warning("session write %s failed: %r", fn.__name__, value)
            elif fut.done():
                continue
            elif ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    async def drain(self) -> None:
        """Wait until everything submitted so far is committed (at shutdown)."""
        self._flush()
        while self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)


class DurableSessions:
    """What the broker tells about its persistent sessions, written to the store."""

    def __init__(self, store: Store, expiry: float) -> None:
        self.journal = Journal(store)
        self.expiry = expiry

    @staticmethod
    def persistent(session: Session) -> bool:
        return not session.clean_session and session.attributes.get(PRINCIPAL) is not None

    def connected(self, session: Session) -> None:
        principal: Principal = session.attributes[PRINCIPAL]
        device = principal.device
        owner = (None, principal.name) if device is None else (device.thing_id, None)
        self.journal.submit(sql.save, session.client_id, owner, _encode(principal), wait=False)

    def disconnected(self, session: Session) -> None:
        ts = session.last_disconnect_time or int(time.time())
        self.journal.submit(sql.disconnected, session.client_id, ts, wait=False)

    def forget(self, client_id: str) -> None:
        self.journal.submit(sql.delete, client_id, wait=False)

    async def subscribed(self, session: Session, topic_filter: str, qos: int) -> None:
        await self.journal.submit(sql.subscribe, session.client_id, topic_filter, qos)  # type: ignore[misc]

    async def unsubscribed(self, session: Session, topic_filters: list[str]) -> None:
        await self.journal.submit(sql.unsubscribe, session.client_id, topic_filters)  # type: ignore[misc]

    async def queue(self, delivery: Routed) -> None:
        """The message's rows in a write of their own (a message with no record of its own)."""
        await self.journal.submit(delivery.queue)  # type: ignore[misc]

    def sent(self, client_id: str | None, payload: Any, packet_id: int) -> None:
        seq = row_of(payload, client_id)
        if seq is not None:
            self.journal.submit(sql.sent, seq, packet_id, wait=False)

    def done(self, client_id: str | None, payload: Any) -> None:
        """Acknowledged, or dropped from a full queue: its row goes."""
        seq = row_of(payload, client_id)
        if seq is not None:
            self.journal.submit(sql.remove, seq, wait=False)

    async def load(self) -> list[Restored]:
        """The stored sessions, expired ones deleted first."""
        found = await self.journal.submit(sql.load, time.time(), self.expiry)  # type: ignore[misc]
        return [
            Restored(
                s.client_id,
                {PRINCIPAL: _decode(s.principal)},
                s.disconnected,
                s.subscriptions,
                [
                    (topic, stored(payload, {s.client_id: seq}), qos, packet_id)
                    for seq, topic, payload, qos, packet_id in s.messages
                ],
            )
            for s in found
        ]


def _encode(principal: Principal) -> bytes:
    device = principal.device
    return orjson.dumps(
        {
            "kind": principal.kind,
            "name": principal.name,
            "owner": principal.owner_id,
            "fleetWide": principal.fleet_wide,
            "certId": device.cert_id if device is not None else None,
        }
    )


def _decode(raw: bytes) -> Principal:
    doc = orjson.loads(raw)
    device = DeviceIdentity(doc["name"], doc["owner"], doc["certId"]) if doc["certId"] is not None else None
    return Principal(doc["kind"], doc["name"], doc["owner"], doc["fleetWide"], device=device)
