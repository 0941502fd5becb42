"""The things' presence in external mode, from the engine's connection lifecycle: RabbitMQ's
rabbitmq_event_exchange plugin publishes `connection.created` and `connection.closed` of every
connection of every node on `amq.rabbitmq.event`, its properties as headers. In 3.10 a created
event names the connection (`name`, `node`), its user (a thing's certificate subject) and
`connected_at`; a closed event names the connection only. So the worker that applies the events
keeps the live thing connections in memory (Connections), by name, and a thing is online while it
has one: the core's presence records it (Presence.record when its first connection opens,
Presence.offline when its last closes), the same rows and retained documents as embedded mode's.

One queue, `<mqtt.external.queue>.presence`: durable, mirrored (the device queue's policy),
bounded (MAX_EVENTS, the oldest dropped) and single-active-consumer: every worker consumes it, the
engine delivers to one at a time, in order, and hands the queue to another when that one's
connection ends (kill -9 too); what it had not acknowledged is delivered again, and events wait in
the queue while no worker consumes.

A worker that becomes the active consumer knows no connection, and events may have been lost
(before the queue existed, dropped from a full queue, or never sent: a node killed closes its
connections without a word). So the active worker reconciles with the management API's list of
connections (GET /api/connections) before it applies its first delivery, when a worker starts (it
puts a RECONCILE request into the queue, for whichever worker is active, in order with the events)
and when a node leaves (NODE_LINK_GONE); and again `mqtt.external.list_lag` seconds later (SETTLE).
That list comes from the engine's statistics: a closed connection leaves it almost at once
(measured: within 0.15 s; one whose closed event this worker applied is not taken from it), a new
one shows only after a while (measured: up to 3.2 s with the statistics every 5 s, RabbitMQ's
default; 4.5 s with them every second). So a connection this worker saw open within `list_lag` is
kept though not listed (unless its node is down: GET /api/nodes), and a thing that another worker
recorded online within it is not set offline (the second pass decides).

Take-over (a client id reconnecting, on the same node or another): the engine creates the new
connection before it closes the old one, so the thing has two, then one, and stays online; were
the closed event applied first, the created one after it would set the thing online again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue

from bridge.config import ExternalConfig
from bridge.core.service import Core
from bridge.mqtt.external.amqp import RETRY, sessions
from bridge.mqtt.external.auth import thing_subject
from bridge.mqtt.external.link import ExternalLink
from bridge.mqtt.external.management import Management
from bridge.store import StoreError

log = logging.getLogger(__name__)
EVENTS = "amq.rabbitmq.event"
CREATED, CLOSED = "connection.created", "connection.closed"
# The statistics of a link between two nodes deleted: a node went away, and its connections with it
# (no closed event for them when it was killed). Taken as a RECONCILE request.
NODE_LINK_GONE = "node.node.deleted"
RECONCILE, SETTLE = "thingbridge.reconcile", "thingbridge.settle"  # requests through the queue
MAX_EVENTS = 100_000  # events the queue holds; beyond, the oldest are dropped (the engine counts)
MAX_CONNECTIONS = 2_000_000  # live connections a worker keeps track of
PREFETCH = 256


def queue_name(ext: ExternalConfig) -> str:
    return f"{ext.queue}.presence"


@dataclass
class Changes:
    """What a batch of events changed: the things that came online (with their connections) and
    those that went offline, each in its final state; the thing connection events in it."""

    online: dict[str, list[Connection]] = field(default_factory=dict)
    offline: set[str] = field(default_factory=set)
    events: int = 0


@dataclass(frozen=True)
class Connection:
    node: str
    thing_id: str
    serial: str | None  # the serialNumber of its certificate's subject
    user: str  # that subject, its engine user
    opened: float  # connected_at: ms since the epoch, the engine's clock


class Connections:
    """The engine's live thing connections, by "<node> <name>", and each thing's; and those closed
    in the last `closed_for` seconds (the engine's list may show one a moment longer). Bounded:
    past `limit`, a connection is not kept (counted in `counts["untracked"]` each time it is met:
    its thing stays online until a reconciliation finds it gone)."""

    def __init__(self, closed_for: float, counts: dict[str, int], limit: int = MAX_CONNECTIONS) -> None:
        self.live: dict[str, Connection] = {}
        self.of_thing: dict[str, set[str]] = {}
        self.closed: OrderedDict[str, float] = OrderedDict()  # key -> when (monotonic)
        self.closed_for = closed_for
        self.counts = counts
        self.limit = limit

    def add(self, key: str, connection: Connection) -> bool:
        """True when it is its thing's only live connection (it just came online)."""
        if key in self.live:
            return False
        if len(self.live) >= self.limit:
            self.counts["untracked"] += 1
            return connection.thing_id not in self.of_thing
        keys = self.of_thing.setdefault(connection.thing_id, set())
        self.live[key] = connection
        keys.add(key)
        return len(keys) == 1

    def remove(self, key: str) -> str | None:
        """The thing whose last live connection this was, if it was."""
        now = time.monotonic()
        self.closed[key] = now
        self.closed.move_to_end(key)
        while len(self.closed) > self.limit or next(iter(self.closed.values())) < now - self.closed_for:
            self.closed.popitem(last=False)
        connection = self.live.pop(key, None)
        if connection is None:
            return None
        keys = self.of_thing[connection.thing_id]
        keys.discard(key)
        if keys:
            return None
        del self.of_thing[connection.thing_id]
        return connection.thing_id

    def replace(self, live: dict[str, Connection]) -> None:
        self.live, self.of_thing = {}, {}
        for key, connection in live.items():
            self.add(key, connection)


class PresenceConsumer:
    def __init__(self, core: Core, link: ExternalLink, management: Management) -> None:
        """Counts into the link's `presence`, which its stats() shows."""
        self.core = core
        self.ext = ext = link.ext
        self.counts = link.presence
        self.management = management
        self.queue = queue_name(ext)
        self.lag = float(ext.list_lag)  # s a new connection may take to show in the engine's list
        self.connections = Connections(self.lag, self.counts)
        self.ready = asyncio.Event()  # the queue is declared, bound and consumed
        self._active = False  # this worker applies the events (it had a delivery since it consumed)
        self._task: asyncio.Task[None] | None = None
        self._later: set[asyncio.Task[None]] = set()

    async def declare(self, channel: AbstractChannel) -> AbstractQueue:
        """The queue and its bindings (raises aio_pika's ChannelNotFoundEntity without the plugin)."""
        arguments = {"x-single-active-consumer": True, "x-max-length": MAX_EVENTS}
        queue = await channel.declare_queue(self.queue, durable=True, arguments=arguments)
        for key in (CREATED, CLOSED, NODE_LINK_GONE):
            await queue.bind(EVENTS, key)
        return queue

    def start(self, tls: ssl.SSLContext | None) -> None:
        self._task = asyncio.create_task(self._run(tls))

    async def stop(self) -> None:
        for task in [*self._later, *([self._task] if self._task else [])]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, tls: ssl.SSLContext | None) -> None:
        async for connection in sessions(self.ext, tls, "presence"):
            self._active = False
            try:
                await self._consume(connection)
            except Exception as exc:  # the connection or channel was lost: the next one
                log.warning("engine presence events: %r; reconnecting", exc)

    async def _consume(self, connection: AbstractConnection) -> None:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        queue = await self.declare(channel)
        inbox: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
        channel.close_callbacks.add(lambda *_: inbox.put_nowait(None))
        await queue.consume(inbox.put)
        await self._request(channel, RECONCILE)  # to whichever worker is active
        self._ask_every(channel, self.ext.reconcile_every)
        self.ready.set()
        while True:
            # What has arrived, in order, applied together: one write for the states it changes.
            batch = [await inbox.get()]
            while batch[-1] is not None and len(batch) < PREFETCH and not inbox.empty():
                batch.append(inbox.get_nowait())
            deliveries = [d for d in batch if d is not None]
            if deliveries:
                try:
                    await self._handle(channel, deliveries)
                except StoreError as exc:
                    log.warning("engine presence events: %s; consuming again in %.0f s", exc, RETRY[1])
                    await connection.close()  # what this worker held goes to another one at once
                    await asyncio.sleep(RETRY[1])  # the events wait in the queue meanwhile
                    return
                await deliveries[-1].ack(multiple=True)
            if len(deliveries) < len(batch):
                raise ConnectionError("the channel closed")

    async def _request(self, channel: AbstractChannel, kind: str) -> None:
        message = aio_pika.Message(b"", type=kind, user_id=self.ext.username)
        await channel.default_exchange.publish(message, routing_key=self.queue)

    def _ask_every(self, channel: AbstractChannel, seconds: float) -> None:
        """A RECONCILE request every `seconds` (mqtt.external.reconcile_every; 0: none) while this
        channel lasts: events the queue dropped when full, or that the engine never sent, are
        corrected within that time."""
        if not seconds:
            return

        async def ask() -> None:
            with contextlib.suppress(Exception):  # the channel is gone: its successor asks
                while True:
                    await asyncio.sleep(seconds)
                    await self._request(channel, RECONCILE)

        task = asyncio.create_task(ask())
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    def _request_later(self, channel: AbstractChannel) -> None:
        async def settle() -> None:
            await asyncio.sleep(self.lag)
            with contextlib.suppress(Exception):  # the channel is gone: the next worker reconciles
                await self._request(channel, SETTLE)

        task = asyncio.create_task(settle())
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    async def _handle(self, channel: AbstractChannel, deliveries: list[AbstractIncomingMessage]) -> None:
        """Apply deliveries in order: the things' final states are written once at the end, or
        before a reconciliation (which reads them)."""
        changes = Changes()
        for delivery in deliveries:
            request = delivery.type if delivery.user_id == self.ext.username else None
            if delivery.routing_key == NODE_LINK_GONE:
                request = RECONCILE
            taking_over = not self._active
            if request in (RECONCILE, SETTLE) or taking_over:
                self._active = True
                await self._write(changes)
                changes = Changes()
                await self.reconcile()
                if request != SETTLE or taking_over:
                    self._request_later(channel)
            if delivery.routing_key in (CREATED, CLOSED) and request is None:
                self._apply(changes, delivery.routing_key, delivery.headers or {})
        await self._write(changes)

    def _apply(self, changes: Changes, event: str, headers: dict[str, Any]) -> None:
        """A thing connection's event into `changes` (the others are skipped)."""
        key = f"{_text(headers.get('node'))} {_text(headers.get('name'))}"
        if event == CLOSED:
            changes.events += key in self.connections.live
            thing_id = self.connections.remove(key)
            if thing_id is not None:
                changes.online.pop(thing_id, None)
                changes.offline.add(thing_id)
            return
        user = _text(headers.get("user"))
        subject = thing_subject(user)
        if subject is None:  # an application's or the bridge's own connection
            return
        changes.events += 1
        opened = headers.get("connected_at")
        opened = opened if isinstance(opened, int | float) else time.time() * 1000
        connection = Connection(_text(headers.get("node")), *subject, user, opened)
        if self.connections.add(key, connection):
            changes.offline.discard(connection.thing_id)
            changes.online[connection.thing_id] = [connection]

    async def _write(self, changes: Changes) -> None:
        """The things' final states, together (Presence groups the records of one loop turn)."""
        await asyncio.gather(*(self._online(connections) for connections in changes.online.values()))
        if changes.offline:
            await self.core.presence.offline(changes.offline)
        self.counts["events"] += changes.events  # once applied

    async def _online(self, connections: list[Connection]) -> None:
        """Record the thing online, as the incarnation one of its connections' certificates is of
        (none: the thing was deleted, disabled or re-certified, and they are being closed)."""
        for connection in connections:
            device = await self.core.things.device_by_subject(connection.thing_id, connection.serial)
            if device is not None:
                await self.core.presence.record(device, "online")
                return

    async def reconcile(self) -> None:
        """Bring the connections kept and the recorded states in line with the engine's list (see
        the module's docstring)."""
        self.counts["reconciliations"] += 1
        try:
            listed = await self.management.connections()
            running = {str(node.get("name")) for node in await self.management.nodes() if node.get("running")}
        except Exception as exc:
            log.warning("engine presence: no list of connections (%r); the events alone count", exc)
            return
        now = time.time()
        live: dict[str, Connection] = {}
        for entry in listed:
            user, opened, node = entry.get("user"), entry.get("connected_at"), str(entry.get("node"))
            subject = thing_subject(user) if isinstance(user, str) else None
            key = f"{node} {entry.get('name')}"
            if subject is not None and key not in self.connections.closed:
                opened = opened if isinstance(opened, int | float) else 0
                live[key] = Connection(node, *subject, user, opened)
        gone: set[str] = set()  # things of connections kept here that the engine no longer has
        for key, connection in self.connections.live.items():
            if key in live:
                continue
            if connection.node in running and connection.opened > (now - self.lag) * 1000:
                live[key] = connection  # too new to be listed
            else:
                gone.add(connection.thing_id)
        by_thing: dict[str, list[Connection]] = {}
        for connection in live.values():
            by_thing.setdefault(connection.thing_id, []).append(connection)
        states = await self.core.presence.states()
        for thing_id, connections in by_thing.items():
            if states.get(thing_id, ("offline", 0.0))[0] != "online":
                await self._online(connections)
        await self.core.presence.offline(
            [
                thing_id
                for thing_id, (state, since) in states.items()
                if state == "online"
                and thing_id not in by_thing
                and (thing_id in gone or since < now - self.lag)
            ]
        )
        self.connections.replace(live)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")
