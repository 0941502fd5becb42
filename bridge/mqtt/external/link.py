"""The core's DeviceLink in external mode: what the bridge sends to devices goes through the engine.

Live messages (replies, messages for a thing, collected messages for applications) are published
over AMQP to `amq.topic` with the MQTT routing key, stamped with the bridge's engine user as
`user_id` (the engine checks it, so no one else can claim it; the consumer skips the bridge's own
messages by it). Retained documents (config, presence, upgrade notices, firmware targets) are
published over MQTT, retained, to each engine node: RabbitMQ 3.10 keeps retained messages per
node, and a device may subscribe on any of them later. Each of those connections has a bounded
backlog: while its node is unreachable, what does not fit is dropped and counted; the connections
come back by themselves (AMQP: the configured nodes tried in order)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import aio_pika
import aiomqtt

from bridge.config import ExternalConfig
from bridge.core import topics
from bridge.mqtt.auth import Counters
from bridge.mqtt.external.amqp import EXCHANGE, RETRY, routing_key, sessions

log = logging.getLogger(__name__)
BACKLOG = 10_000  # messages waiting for one engine connection while it is down
BATCH = 256  # published together, then confirmed together
# The topic of the device message being consumed: the engine already routed the device's own
# publish to its subscribers, so the core's re-publication of it after the commit is not sent again.
ROUTED_BY_ENGINE: ContextVar[str | None] = ContextVar("routed_by_engine", default=None)
# A deleted thing's retained documents, cleared on every node.
RETAINED_FLOWS = (topics.CONFIG, topics.PRESENCE, topics.UPGRADE_NOTIFY, topics.FIRMWARE_TARGET)

Item = tuple[str, bytes]
CloseThing = Callable[[str], Awaitable[int]]


class Backlog:
    """What waits for one engine connection. While the connection is up a full backlog makes the
    sender wait; while it is down, a message that does not fit is dropped and counted."""

    def __init__(self, size: int = BACKLOG) -> None:
        self.queue: asyncio.Queue[Item] = asyncio.Queue(size)
        self.connected = False
        self.dropped = 0
        self.sent = 0
        self._unconfirmed: list[Item] = []
        self.drained = asyncio.Event()  # set while nothing waits or is unconfirmed
        self.drained.set()

    async def put(self, item: Item) -> None:
        if self.queue.full() and not self.connected:
            self.dropped += 1
            log.warning("engine unreachable and its backlog full: %.200r dropped", item[0])
            return
        self.drained.clear()
        await self.queue.put(item)

    async def take(self) -> list[Item]:
        batch = [await self.queue.get()]
        while len(batch) < BATCH and not self.queue.empty():
            batch.append(self.queue.get_nowait())
        return batch

    async def pump(self, send: Callable[[str, bytes], Awaitable[Any]]) -> None:
        """Send through one connection until it fails (raises). A batch not wholly confirmed is sent
        again through the next connection: at least once, in order."""
        self.connected = True
        try:
            while True:
                if not self._unconfirmed:
                    self._unconfirmed = await self.take()
                await asyncio.gather(*(send(topic, payload) for topic, payload in self._unconfirmed))
                self.sent += len(self._unconfirmed)
                self._unconfirmed = []
                if self.queue.empty():
                    self.drained.set()
        finally:
            self.connected = False


class ExternalLink:
    def __init__(self, ext: ExternalConfig, close_thing: CloseThing | None = None) -> None:
        """`close_thing(thing_id)` closes the thing's live connections on the engine (its
        management API) and returns how many; None: nothing to close them with."""
        self.ext = ext
        self.close_thing = close_thing
        self.amqp = Backlog()
        self.nodes = {url: Backlog() for url in ext.mqtt}
        self.counters = Counters()  # messages from the engine denied or dropped (the consumer's)
        self.consumed = {"consumed": 0, "duplicates": 0, "retried": 0}
        self.presence = {"events": 0, "reconciliations": 0, "untracked": 0}  # the presence consumer's
        self.unroutable = 0  # for things whose id the engine cannot route (it has a '.')
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, tls: ssl.SSLContext | None) -> None:
        """`tls`: trusts the engine's server certificates (for amqps:// and mqtts:// URLs)."""
        self._tasks.append(asyncio.create_task(self._send_amqp(tls)))
        for url, backlog in self.nodes.items():
            self._tasks.append(asyncio.create_task(self._send_mqtt(url, backlog, tls)))

    async def stop(self, grace: float = 2.0) -> None:
        """Send what is queued (up to `grace` seconds while the engine is reachable), then close."""
        backlogs = [self.amqp, *self.nodes.values()]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await asyncio.gather(*(b.drained.wait() for b in backlogs if b.connected))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if topic == ROUTED_BY_ENGINE.get():
            return
        if "." in (topics.thing_of(topic) or ""):
            # The engine makes '.' a level separator: things/a.b/x would reach things/a/#.
            self.unroutable += 1
            return
        if retain:  # routed to the subscribers by each node too: retained documents are states
            for backlog in self.nodes.values():
                await backlog.put((topic, payload))
        else:
            await self.amqp.put((topic, payload))

    async def delivery(self, topic: str, payload: bytes) -> _Sent:
        """The engine queues for offline sessions itself: nothing to queue in the transaction."""
        return _Sent(self, topic, payload)

    async def restore_retained(self, topic: str, payload: bytes) -> None:
        """At start-up: every node gets the document again (one may have been down when it last
        changed); the nodes also route it to the live subscribers, which get the state they hold."""
        await self.publish(topic, payload, retain=True)

    async def disconnect_thing(self, thing_id: str, *, forget: bool) -> int:
        closed = await self.close_thing(thing_id) if self.close_thing is not None else 0
        if forget:
            for flow in RETAINED_FLOWS:
                await self.publish(topics.topic(thing_id, flow), b"", retain=True)
        return closed

    def stats(self) -> dict[str, Any]:
        backlogs = [self.amqp, *self.nodes.values()]
        return {
            # logins the auth backend refused, by reason, and what it denied (auth.py)
            "refusedConnects": self.counters.refused_connects,
            "refusedByReason": dict(sorted(self.counters.reasons.items())),
            "deniedSubscribes": self.counters.denied_subscribes,
            "deniedPublishes": self.counters.denied_publishes,
            # in: refused or failed twice; out: left over a full backlog, or for an id with '.'
            "droppedMessages": self.counters.dropped_messages
            + self.unroutable
            + sum(b.dropped for b in backlogs),
            "queuedMessages": sum(b.queue.qsize() for b in backlogs),
            "engineConnections": sum(1 for b in backlogs if b.connected),
            "consumedMessages": self.consumed["consumed"],
            "duplicateMessages": self.consumed["duplicates"],
            "retriedMessages": self.consumed["retried"],
            # connection events applied, reconciliations with the engine's list of connections, and
            # connections not kept for want of room (presence.MAX_CONNECTIONS)
            "presenceEvents": self.presence["events"],
            "presenceReconciliations": self.presence["reconciliations"],
            "presenceUntracked": self.presence["untracked"],
        }

    async def _send_amqp(self, tls: ssl.SSLContext | None) -> None:
        async for connection in sessions(self.ext, tls, "publisher"):
            try:
                channel = await connection.channel(publisher_confirms=True)
                exchange = await channel.get_exchange(EXCHANGE, ensure=False)

                def send(topic: str, payload: bytes, exchange: Any = exchange) -> Awaitable[Any]:
                    message = aio_pika.Message(
                        payload, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, user_id=self.ext.username
                    )
                    return exchange.publish(message, routing_key(topic))

                await self.amqp.pump(send)
            except Exception as exc:  # the connection or channel was lost: reconnect, send again
                log.warning("engine publisher: %r; reconnecting", exc)

    async def _send_mqtt(self, url: str, backlog: Backlog, tls: ssl.SSLContext | None) -> None:
        parts = urllib.parse.urlsplit(url)
        secure = parts.scheme == "mqtts"
        pause = RETRY[0]
        while True:
            try:
                async with aiomqtt.Client(
                    parts.hostname or "127.0.0.1",
                    parts.port or (8883 if secure else 1883),
                    username=self.ext.username,
                    password=self.ext.password,
                    identifier=f"thingbridge-{uuid.uuid4().hex}",
                    tls_context=tls if secure else None,
                    keepalive=10,
                    timeout=10,
                ) as client:
                    pause = RETRY[0]
                    await backlog.pump(
                        lambda topic, payload: client.publish(topic, payload, qos=1, retain=True)
                    )
            except aiomqtt.MqttError as exc:
                log.warning(
                    "engine node %s (retained documents): %r; reconnecting in %.1f s", url, exc, pause
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY[1])


class _Sent:
    def __init__(self, link: ExternalLink, topic: str, payload: bytes) -> None:
        self.link, self.topic, self.payload = link, topic, payload

    def queue(self, conn: Any) -> None:
        return None

    async def send(self) -> None:
        await self.link.publish(self.topic, self.payload)
