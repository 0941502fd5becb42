"""Device traffic from the engine: one durable queue, bound to `amq.topic` for every flow a thing's
message runs (`things.*.collect`, ...) and for applications' messages to things
(`things.*.publish`), consumed by every bridge worker (competing consumers).

Who sent a message: RabbitMQ 3.10's MQTT plugin stamps a device's publish with its QoS and DUP
flag only (headers `x-mqtt-publish-qos`, `x-mqtt-dup`), no user or client id. So the thing is
the one the routing key names, `things.<id>.<flow>`: the auth backend lets a thing publish only
under its own `things/<id>/`, and lets no one but the bridge publish to `amq.topic` over AMQP.
The bridge's own messages carry its user as `user_id` (checked by the engine) and are skipped.

Each message is dispatched by the same Router as the embedded broker's and acknowledged after the
core committed it; a refused one is answered on its flow's /rejected topic (as in embedded mode)
or counted, and acknowledged too. A message that failed (the store was unreachable) goes back to
the queue once; if it fails again it is dropped, counted and logged, so nothing loops forever.
At most `mqtt.external.prefetch` messages are in flight per worker.

Redeliveries: a worker that dies (or loses the engine) between its commit and its ack leaves the
engine to deliver the message again, flagged `redelivered`. Such a message is skipped when the
thing's messages of its kind stored over MQTT in the last DEDUP_WINDOW seconds hold the same
payload (bytes, or the same JSON value)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
import urllib.parse
from collections import OrderedDict

import aiohttp
import orjson
from aio_pika.abc import AbstractIncomingMessage

from bridge.core import messages, topics
from bridge.core.errors import DomainError, Invalid, Revoked
from bridge.core.identity import DeviceIdentity
from bridge.core.messages import Message, Query
from bridge.core.service import Core
from bridge.mqtt.auth import Principal
from bridge.mqtt.external import presence
from bridge.mqtt.external.amqp import EXCHANGE, routing_key, sessions
from bridge.mqtt.external.link import ROUTED_BY_ENGINE, ExternalLink
from bridge.mqtt.router import Router

log = logging.getLogger(__name__)
DEDUP_WINDOW = 300  # s
IDENTITIES = 65_536  # thing identities kept in memory
IDENTITY_TTL = 5.0  # s: another worker's delete or disable is also caught by the commit itself
# The kind of message each flow stores, for recognising a redelivery.
STORED_AS = {
    topics.COLLECT: messages.INGRESS,
    topics.STATUS: messages.STATUS,
    topics.VERSIONS: messages.VERSIONS,
    topics.UPGRADE_RESULT: messages.VERSIONS,
    topics.PUBLISH: messages.EGRESS,
}
# An application's message to a thing: which application the engine does not say; its auth
# backend let it publish there only to a thing of its owner (the same rule as embedded mode).
ENGINE_APPLICATION = Principal("app", "(through the engine)", "", fleet_wide=True)


class DeviceConsumer:
    def __init__(self, core: Core, link: ExternalLink) -> None:
        """Counts into the link's counters, which its stats() shows."""
        self.core = core
        self.ext = link.ext
        self.counters = link.counters
        self.counts = link.consumed
        self.router = Router(core, link.counters)
        self.flows = (*self.router.thing_flows, topics.PUBLISH)
        self.ready = asyncio.Event()  # the queue is declared, bound and consumed
        self._identities: OrderedDict[str, tuple[float, int, DeviceIdentity | None]] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    def start(self, tls: ssl.SSLContext | None) -> None:
        self._task = asyncio.create_task(self._run(tls))

    async def stop(self) -> None:
        """Let the messages in hand finish (committed and acknowledged), then close."""
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def mirror(self) -> None:
        """Mirror the queue, and the presence events' (`<queue>.presence`), on every node (a
        classic mirrored queue: it survives one node of two stopping; a quorum queue would need
        three nodes for a majority). A policy, set through the management API of the first node
        that answers."""
        vhost = urllib.parse.urlsplit(self.ext.amqp[0]).path[1:] or "/"
        policy = {
            "pattern": f"^({re.escape(self.ext.queue)}|{re.escape(presence.queue_name(self.ext))})$",
            "definition": {"ha-mode": "all", "ha-sync-mode": "automatic"},
            "apply-to": "queues",
            "priority": 10,
        }
        vhost_part = urllib.parse.quote(vhost, safe="")
        name = urllib.parse.quote(f"thingbridge-{self.ext.queue}", safe="")  # one per queue
        auth = {"Authorization": aiohttp.encode_basic_auth(self.ext.username, self.ext.password)}
        error = "no management URL"
        async with aiohttp.ClientSession(headers=auth, timeout=aiohttp.ClientTimeout(total=10)) as http:
            for base in self.ext.management:
                url = f"{base.rstrip('/')}/api/policies/{vhost_part}/{name}"
                try:
                    async with http.put(url, json=policy) as answer:
                        if answer.status < 300:
                            return
                        error = f"{base}: HTTP {answer.status} {(await answer.text())[:200]}"
                except (aiohttp.ClientError, TimeoutError) as exc:
                    error = f"{base}: {exc or type(exc).__name__}"
        raise ConnectionError(
            f"cannot set the mirroring policy of queue {self.ext.queue} ({error}); check the URLs, that the"
            " engine runs, and that its user has the administrator or policymaker tag"
        )

    async def _run(self, tls: ssl.SSLContext | None) -> None:
        async for connection in sessions(self.ext, tls, "consumer"):
            try:
                channel = await connection.channel()
                await channel.set_qos(prefetch_count=self.ext.prefetch)
                queue = await channel.declare_queue(self.ext.queue, durable=True)
                for flow in self.flows:
                    await queue.bind(EXCHANGE, routing_key(topics.topic("*", flow)))
                async with queue.iterator() as deliveries:
                    self.ready.set()
                    async for delivery in deliveries:
                        handler = asyncio.create_task(self._handle(delivery))
                        self._handlers.add(handler)
                        handler.add_done_callback(self._handlers.discard)
            except Exception as exc:  # the connection or channel was lost: reconnect
                log.warning("engine consumer: %r; reconnecting", exc)

    async def _handle(self, delivery: AbstractIncomingMessage) -> None:
        try:
            await self._process(delivery)
        except Exception:
            if delivery.redelivered:  # failed twice: never loop on one message
                self.counters.dropped_messages += 1
                log.exception("message on %.200r failed again; dropped", delivery.routing_key)
                with contextlib.suppress(Exception):
                    await delivery.reject(requeue=False)
            else:
                self.counts["retried"] += 1
                log.exception("message on %.200r failed; back to the queue", delivery.routing_key)
                with contextlib.suppress(Exception):
                    await delivery.nack(requeue=True)
            return
        # Committed. A lost channel here makes the engine deliver it again, and the copy is skipped.
        with contextlib.suppress(Exception):
            await delivery.ack()

    async def _process(self, delivery: AbstractIncomingMessage) -> None:
        if delivery.user_id == self.ext.username:
            return  # the bridge's own publication (an HTTP collect for applications, say)
        parsed = self._parse(delivery.routing_key or "")
        if parsed is None:
            self.counters.denied_publishes += 1
            return
        thing_id, flow = parsed
        topic = topics.topic(thing_id, flow)
        body = delivery.body
        if delivery.redelivered and await self._stored(thing_id, flow, body):
            self.counts["duplicates"] += 1
            return
        token = ROUTED_BY_ENGINE.set(topic)  # its subscribers have it from the engine already
        try:
            if flow == topics.PUBLISH:
                await self.router.dispatch(ENGINE_APPLICATION, topic, body)
            elif not await self._as_thing(thing_id, topic, body):
                self.counters.denied_publishes += 1
                return
        finally:
            ROUTED_BY_ENGINE.reset(token)
        self.counts["consumed"] += 1

    def _parse(self, key: str) -> tuple[str, str] | None:
        """(thing id, flow) of a routing key `things.<id>.<flow>`, the flow one of those bound."""
        prefix, _, rest = key.partition(".")
        thing_id, _, flow = rest.partition(".")
        flow = flow.replace(".", "/")
        if prefix != topics.PREFIX or not thing_id or flow not in self.flows:
            return None
        return thing_id, flow

    async def _as_thing(self, thing_id: str, topic: str, body: bytes) -> bool:
        """Dispatch as the thing's current identity; False when it has none (deleted or disabled:
        the engine closes its connections, this message was in flight)."""
        for fresh in (False, True):
            device = await self._identity(thing_id, fresh)
            if device is None:
                return False
            principal = Principal("thing", thing_id, device.owner_id, device=device)
            try:
                await self.router.dispatch(principal, topic, body)
                return True
            except Revoked:  # a stale identity (its certificate re-issued, say): read it again
                continue
        return False

    async def _identity(self, thing_id: str, fresh: bool) -> DeviceIdentity | None:
        revocations = self.core.things.revocations
        cached = self._identities.get(thing_id)
        if not fresh and cached is not None and cached[0] > time.monotonic() and cached[1] == revocations:
            self._identities.move_to_end(thing_id)
            return cached[2]
        device = await self.core.things.enabled_device(thing_id)
        self._identities[thing_id] = (time.monotonic() + IDENTITY_TTL, revocations, device)
        self._identities.move_to_end(thing_id)
        while len(self._identities) > IDENTITIES:
            self._identities.popitem(last=False)
        return device

    async def _stored(self, thing_id: str, flow: str, body: bytes) -> bool:
        """Whether a redelivered message was committed already (see the module's docstring)."""
        kind = STORED_AS.get(flow)
        if kind is None:
            return False  # a request answered again (a check, a chunk): nothing stored twice
        since = Query(start=int(time.time()) - DEDUP_WINDOW, type=kind)
        try:
            stored = await self.core.messages.query(thing_id, None, since)
        except DomainError:  # the thing is gone: the dispatch refuses it anyway
            return False
        return any(m.transport == "mqtt" and _same(m, body) for m in stored)


def _same(stored: Message, body: bytes) -> bool:
    if stored.payload == body:
        return True
    if stored.encoding != "json":
        return False
    try:
        return bool(orjson.loads(stored.payload) == orjson.loads(body))
    except (orjson.JSONDecodeError, Invalid):
        return False
