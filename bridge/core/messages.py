"""Messages, whichever transport they use: collect (device -> cloud, `ingress`) and publish
(cloud -> device, `egress`) store once and then reach every subscriber; history and delete;
and the long-poll that lets an HTTP-only device receive what is published to it."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from bridge.core import ids, jsonvalue, topics
from bridge.core.errors import Invalid, Revoked, TooLarge
from bridge.core.identity import DeviceIdentity
from bridge.core.lookup import owned_thing, thing_not_found
from bridge.core.ports import DeviceLink, commit_and_route
from bridge.store import Store

INGRESS, EGRESS, STATUS = "ingress", "egress", "status"
# Software upgrades: an offer told to the device (`upgrade`, read by HTTP-only devices with their
# egress long-poll) and what the device reported (`versions`: current versions, upgrade results).
UPGRADE, VERSIONS = "upgrade", "versions"
MESSAGE_TYPES = (INGRESS, EGRESS, STATUS, UPGRADE, VERSIONS)
DEVICE_BOUND = (EGRESS, UPGRADE)
MAX_WAIT = 60
DAY = 86400


@dataclass(frozen=True)
class Message:
    seq: int
    id: str
    thing_id: str
    owner_id: str
    type: str
    ts: float
    encoding: str  # json | text | base64
    payload: bytes
    transport: str

    @property
    def value(self) -> Any:
        """The payload as the API shows it: a JSON value, a string, or base64 text for binary."""
        if self.encoding == "json":
            return orjson.loads(self.payload)
        if self.encoding == "text":
            return self.payload.decode()
        return base64.b64encode(self.payload).decode()


@dataclass(frozen=True)
class Query:
    start: int | None = None
    end: int | None = None
    type: str | None = None
    after: str | None = None
    limit: int | None = None

    def check(self) -> Query:
        if self.start is not None and self.end is not None and self.start > self.end:
            raise Invalid("startts must not be after endts")
        if self.type is not None and self.type not in MESSAGE_TYPES:
            raise Invalid(f"messagetype must be one of {', '.join(MESSAGE_TYPES)}")
        if self.limit is not None and self.limit < 1:
            raise Invalid("limit must be a positive integer")
        return self


def classify(payload: bytes, declared: str | None) -> str:
    """How to store and show a payload. `declared` is "text" when the sender said it is text (an
    HTTP Content-Type), which must then be UTF-8. Otherwise: json when it parses as JSON, else
    text when it is UTF-8, else base64."""
    if declared != "text":
        try:
            jsonvalue.loads(payload)
            return "json"
        except Invalid:
            pass
    try:
        payload.decode()
        return "text"
    except UnicodeDecodeError as exc:
        if declared == "text":
            raise Invalid("body is declared text but is not valid UTF-8") from exc
        return "base64"


def _message(row: sqlite3.Row) -> Message:
    return Message(
        row["seq"],
        row["id"],
        row["thing_id"],
        row["owner_id"],
        row["type"],
        row["ts"],
        row["encoding"],
        bytes(row["payload"]),
        row["transport"],
    )


def insert_message(
    conn: sqlite3.Connection,
    thing_id: str,
    owner_id: str,
    kind: str,
    payload: bytes,
    encoding: str,
    transport: str,
    cert_id: str | None = None,
) -> Message:
    """Append one message; called inside a write transaction (also by flows that store a message
    together with other state). The thing is checked in the same transaction: a message is stored
    only while its thing exists with this owner and, for one a device sent (`cert_id`, the
    certificate its identity rests on), is enabled with that certificate. Whatever was in flight
    when a delete or disable committed is refused, and a re-created id starts empty."""
    ts = ids.now()
    msg_id = ids.message_id(ts)
    device = " AND cert_id = ? AND enabled = 1" if cert_id is not None else ""
    inserted = conn.execute(
        "INSERT INTO messages (id, thing_id, owner_id, type, ts, encoding, payload, transport)"
        f" SELECT ?,?,?,?,?,?,?,? WHERE EXISTS (SELECT 1 FROM things WHERE id = ? AND owner_id = ?{device})"
        " RETURNING seq",
        (msg_id, thing_id, owner_id, kind, ts, encoding, payload, transport, thing_id, owner_id)
        + ((cert_id,) if cert_id is not None else ()),
    ).fetchone()
    if inserted is None:
        if cert_id is not None:
            raise Revoked(f"thing {thing_id!r} was deleted or disabled; nothing was stored")
        raise thing_not_found(thing_id)
    return Message(inserted[0], msg_id, thing_id, owner_id, kind, ts, encoding, payload, transport)


@dataclass(frozen=True)
class Cursor:
    """Where `after=<id>` starts: after the message's seq, or, for a message the retention deleted,
    after the time its id says it was stored (what is left of the thing's history is newer)."""

    seq: int | None = None
    since: float | None = None


def _where(
    thing_id: str, owner_id: str, q: Query, after: Cursor, types: tuple[str, ...] = ()
) -> tuple[str, list[Any]]:
    # The owner too: a thing deleted and re-created by another user while a read or a long-poll
    # was under way keeps the id, not the owner.
    clauses, args = ["thing_id = ?", "owner_id = ?"], [thing_id, owner_id]
    if q.start is not None:
        clauses.append("ts >= ?")
        args.append(q.start)
    if q.end is not None:
        clauses.append("ts < ?")  # inclusive of the whole end second
        args.append(q.end + 1)
    if q.type is not None:
        clauses.append("type = ?")
        args.append(q.type)
    elif types:
        clauses.append(f"type IN ({','.join('?' * len(types))})")
        args.extend(types)
    if after.seq is not None:
        clauses.append("seq > ?")
        args.append(after.seq)
    if after.since is not None:
        clauses.append("ts > ?")
        args.append(after.since)
    return " AND ".join(clauses), args


class Messages:
    def __init__(
        self, store: Store, link: DeviceLink, *, max_payload: int, page_limit: int, retention_days: int = 0
    ) -> None:
        self.store = store
        self.link = link
        self.max_payload = max_payload
        self.page_limit = page_limit
        self.retention_days = retention_days
        self._egress_waiters: dict[str, set[asyncio.Future[None]]] = defaultdict(set)

    def _check_size(self, payload: bytes) -> None:
        if len(payload) > self.max_payload:
            raise TooLarge(f"message of {len(payload)} bytes exceeds the limit of {self.max_payload} bytes")

    async def collect(
        self, device: DeviceIdentity, payload: bytes, *, transport: str, declared: str | None = None
    ) -> Message:
        """A message from an authenticated thing: committed (while its identity still holds), then
        routed to `things/{id}/collect`."""
        self._check_size(payload)
        encoding = classify(payload, declared)
        return await commit_and_route(
            self.store.write,
            self.link,
            topics.topic(device.thing_id, topics.COLLECT),
            payload,
            insert_message,
            device.thing_id,
            device.owner_id,
            INGRESS,
            payload,
            encoding,
            transport,
            device.cert_id,
        )

    async def publish(
        self,
        thing_id: str,
        owner_id: str | None,
        payload: bytes,
        *,
        transport: str,
        declared: str | None = None,
    ) -> Message:
        """A message for a thing from its owner (owner_id None: a fleet-wide principal): committed,
        then routed to `things/{id}/publish` (queued for an offline persistent MQTT session) and
        handed to HTTP long-polls."""
        self._check_size(payload)
        encoding = classify(payload, declared)
        owner = await self._owner(thing_id, owner_id)
        message = await commit_and_route(
            self.store.write,
            self.link,
            topics.topic(thing_id, topics.PUBLISH),
            payload,
            insert_message,
            thing_id,
            owner,
            EGRESS,
            payload,
            encoding,
            transport,
        )
        self.wake([thing_id])
        return message

    def wake(self, thing_ids: Iterable[str]) -> None:
        """Something was committed for these things' devices: answer their long-polls."""
        for thing_id in thing_ids:
            for waiter in self._egress_waiters.get(thing_id, ()):
                if not waiter.done():
                    waiter.set_result(None)

    async def _owner(self, thing_id: str, owner_id: str | None) -> str:
        return (await self.store.read(owned_thing, thing_id, owner_id))["owner_id"]

    async def _cursor(self, thing_id: str, after: str | None) -> Cursor:
        if after is None:
            return Cursor()
        row = await self.store.read(
            lambda c: c.execute(
                "SELECT seq FROM messages WHERE id = ? AND thing_id = ?", (after, thing_id)
            ).fetchone()
        )
        if row is not None:
            return Cursor(seq=row["seq"])
        stored = ids.message_time(after)
        if self.retention_days and stored is not None and stored < ids.now() - self.retention_days * DAY:
            return Cursor(since=stored)
        raise Invalid(f"after: no message {after!r} of this thing (it may have been deleted)")

    async def query(self, thing_id: str, owner_id: str | None, q: Query) -> list[Message]:
        owner = await self._owner(thing_id, owner_id)
        return await self._select(thing_id, owner, q.check())

    async def _select(
        self, thing_id: str, owner_id: str, q: Query, types: tuple[str, ...] = ()
    ) -> list[Message]:
        after = await self._cursor(thing_id, q.after)
        where, args = _where(thing_id, owner_id, q, after, types)
        # Time windows walk the (thing_id, ts) index, whose entries are in ts then rowid order, so
        # "ts, seq" needs no sort; a cursor walks (thing_id, type, seq). Both are arrival order.
        order = "seq" if after.seq is not None else "ts, seq"
        limit = min(q.limit or self.page_limit, self.page_limit)

        def select(conn: sqlite3.Connection) -> list[Message]:
            rows = conn.execute(
                f"SELECT * FROM messages WHERE {where} ORDER BY {order} LIMIT ?", (*args, limit)
            )
            return [_message(r) for r in rows]

        return await self.store.read(select)

    async def wait_egress(self, thing_id: str, owner_id: str, q: Query, wait: float) -> list[Message]:
        """Messages for the device (egress, and upgrade offers) after the cursor; if none yet, wait
        up to `wait` s for the next one."""
        if not 0 <= wait <= MAX_WAIT:
            raise Invalid(f"wait must be between 0 and {MAX_WAIT} seconds")
        q = Query(q.start, q.end, None, q.after, q.limit).check()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._egress_waiters[thing_id]
        waiters.add(waiter)  # registered before the query, so nothing committed in between is missed
        try:
            found = await self._select(thing_id, owner_id, q, DEVICE_BOUND)
            if found or wait == 0:
                return found
            try:
                await asyncio.wait_for(waiter, wait)
            except TimeoutError:
                return []
            return await self._select(thing_id, owner_id, q, DEVICE_BOUND)
        finally:
            waiters.discard(waiter)
            if not waiters:
                self._egress_waiters.pop(thing_id, None)

    async def delete(self, thing_id: str, owner_id: str, q: Query) -> int:
        await self._owner(thing_id, owner_id)
        where, args = _where(thing_id, owner_id, q.check(), Cursor())
        return await self.store.write(
            lambda c: c.execute(f"DELETE FROM messages WHERE {where}", args).rowcount
        )
