"""Every override of amqtt internals lives here (the broker: sessions, connections' lifecycle,
routing), and in the modules beside it that this one installs: handler.py (one connection's
protocol handler, BridgeHandler, and the strict packet parsing), lean.py (amqtt's per-connection
objects without their weight) and streams.py (the reader and writer under the protocol handler).
amqtt is pinned to 0.12.1 in pyproject.toml because these methods are private; tests/test_amqtt_defects.py shows, for each
fix, the stock behaviour next to ours, so an upgrade tells at once which overrides it still needs.

Defects fixed (letters as in docs/amqtt-defects.md, which describes each one and its test):
  A  a resumed session kept the previous connection's TLS object, so the auth plugin validated
     another device's certificate                                  -> _initialize_client_session
  B  a CONNECT deleted the existing session of its client id before it was authenticated
  C  a rejected CONNECT still took over / registered a session     -> both: authenticate first
  D  keepalive was never enforced (handle_read_timeout is `pass`)  -> BridgeHandler._reader_loop
     (BridgeHandler: handler.py)
  E  on CONNECT, retained messages matching *any* session's filters were pushed, with no ACL;
     and a resumed session got the retained messages of its own filters again at every CONNECT,
     though [MQTT-3.3.1-6] sends them for a new subscription only
                                               -> _publish_retained_messages_for_subscription, _serve_session
  F  PUBLISHes already PUBACKed were dropped when the client disconnected -> _handle_disconnect
  G  an invalid PUBLISH stopped the client loop but left the socket open  -> _handle_message_delivery
  I  an outgoing QoS 1 message not PUBACKed before the connection dropped was forgotten; it is
     now kept in the session and re-sent (DUP) when the session resumes  -> BridgeHandler,
     _publish_session_retained_messages (which also stops marking queued messages RETAIN)
  Durability: amqtt PUBACKs an incoming QoS 1 message as soon as it is queued, before anything
     could store it. BridgeHandler.handle_publish first hands the message to the bridge's `ingest`
     hook (which commits it to SQLite for the flows the bridge owns), and only then runs the stock
     acknowledgement flow.
  G' a PUBLISH whose topic holds a wildcard fails to parse; stock logs "Message discarded" and
     reads on from the middle of that packet (its payload is parsed as the next packet)
                                                   -> strict packet parsing (handler.py)
  Sessions only in memory: a restart forgot every persistent session. They are kept in SQLite
     through the seam in bridge/mqtt/sessions.py -> route, restore, add_subscription,
     _handle_unsubscription, _delete_session, _cleanup_session, the QoS 1 flow, Limits.enqueue
  H  (not changed) a message is delivered at the subscription's QoS, so a QoS 0 publish reaches a
     QoS 1 subscriber as QoS 1: an upgrade, never a loss.
TLS: amqtt hard-codes CERT_OPTIONAL; we never let amqtt build a TLS context (our listeners are
`external`, see bridge/mqtt/broker.py), and amqtt has no packet size limit: CappedReader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from amqtt.broker import Broker, RetainedApplicationMessage
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, BrokerError, MQTTError, NoDataError
from amqtt.mqtt.connack import (
    NOT_AUTHORIZED,
    ConnackPacket,
)
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import OutgoingApplicationMessage, Session

from bridge.mqtt import codec
from bridge.mqtt.auth import PEERCERT
from bridge.mqtt.handler import (
    FORGET,
    REVOKED,
    BridgeHandler,
    ClientRevoked,
    ConsumedMessage,
    Ingest,
    Limits,
    SentMessage,
    Standing,
)
from bridge.mqtt.lean import LeanQueue, OfflineQueue, Subscriptions
from bridge.mqtt.sessions import Restored, Routed
from bridge.mqtt.streams import BridgeWriter, CappedReader

log = logging.getLogger(__name__)

# Set on a session by the pre-authentication of *this* connection; consumed by _authenticate so the
# stock flow does not authenticate twice (and cannot be satisfied by an older connection's flag).
PREAUTHENTICATED = "thingbridge.preauthenticated"
# An asyncio.Event a take-over waits on until the old connection's disconnect has been handled.
DISCONNECTED = "thingbridge.disconnected"
NEW_FILTERS = "thingbridge.new_filters"  # subscribed, retained messages not sent yet

# (session, True) when a connection of the session opened, (session, False) when it ended.
Presence = Callable[[Session, bool], None]


class HardenedBroker(Broker):
    connect_timeout: float = 10.0

    ingest: Ingest | None = None
    standing: Standing | None = None
    presence: Presence | None = None  # instead of amqtt's connect and disconnect events
    resume_window: int = 10  # QoS 1 messages in flight while a resumed session catches up

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = Limits()
        self._stopping = False
        self._subscriptions = Subscriptions(self._matches)
        self._sends: set[asyncio.Future[Any]] = set()  # QoS 2 deliveries, resumed sessions' catch-up
        self._delivering = asyncio.Lock()

    async def _authenticate(self, session: Session, listener: Any) -> bool:
        if session.attributes.pop(PREAUTHENTICATED, False):
            return True
        return await super()._authenticate(session, listener)

    async def _authenticate_now(self, session: Session) -> bool:
        """Stock's rule (at least one auth plugin answers, and all that answer say True), with the
        plugins called in turn: stock starts a task per plugin and gathers them, per CONNECT."""
        plugins = self.plugins_manager._auth_plugins
        answers = [await plugin.authenticate(session=session) for plugin in plugins]
        results = [answer for answer in answers if answer is not None]
        return bool(results) and all(results)

    async def _initialize_client_session(  # type: ignore[override]
        self, reader: CappedReader, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        """Stock logic (amqtt/broker.py:480-539) with authentication moved *before* any change to the
        session that owns the client id (B, C), and a resumed session given this connection's TLS
        object and address (A). A CONNECT must arrive within connect_timeout (slow-loris)."""
        try:
            connect = reader.take_connect()
            if connect is not None:  # here already, as it mostly is: no timer
                handler, incoming = await BridgeHandler.from_connect(connect, writer, self.plugins_manager)
            else:
                async with asyncio.timeout(self.connect_timeout):  # no task of its own, as wait_for has
                    handler, incoming = await BridgeHandler.init_from_connect(
                        reader, writer, self.plugins_manager
                    )
        except (TimeoutError, ConnectionError, NoDataError, AMQTTError, MQTTError) as exc:
            with contextlib.suppress(Exception):
                await writer.close()
            raise AMQTTError(f"no valid CONNECT from {remote_address}:{remote_port}: {exc!r}") from exc

        peercert = writer.peercert() if isinstance(writer, BridgeWriter) else None
        if peercert is not None:  # TLS: the identity check takes it
            incoming.attributes[PEERCERT] = peercert
        if not await self._authenticate_now(incoming):
            with contextlib.suppress(Exception):
                await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
                await writer.close()
            raise AMQTTError(f"CONNECT refused for client id {incoming.client_id!r} from {remote_address}")
        incoming.attributes[PREAUTHENTICATED] = True
        handler.ingest = self.ingest
        handler.standing = self.standing
        handler.limits = self.limits
        current = self._sessions.get(incoming.client_id)
        if current is not None and current[0].transitions.is_connected():
            # Take-over [MQTT-3.1.4-2]: close the live connection first. Stock does this only for
            # a resumed session; a clean one was dropped from the table, its connection left running.
            # The old client loop ends that connection on its own task (will, offline event). Let it
            # finish, or it would mark a session we are about to resume as disconnected.
            ended = current[0].attributes[DISCONNECTED] = asyncio.Event()
            await current[1].handle_connection_closed()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), 5)

        session = incoming
        if session.clean_session:
            await self._delete_session(session.client_id)
            session.parent = 0
        elif session.client_id in self._sessions:
            existing, _ = self._sessions[session.client_id]
            for attr in (
                "will_flag",
                "will_message",
                "will_topic",
                "will_qos",
                "will_retain",
                "keep_alive",
                "username",
                "password",
                "ssl_object",
                "remote_address",
                "remote_port",
            ):
                setattr(existing, attr, getattr(incoming, attr))
            # A revocation marked the earlier connection; this one was authenticated just now with
            # a current credential of the same thing (re-enabled, re-certified; start() checks
            # its standing again), so it resumes a live session, not a revoked one.
            for mark in (REVOKED, FORGET):
                existing.attributes.pop(mark, None)
            existing.attributes.update(incoming.attributes)
            session = existing
            session.parent = 1
        else:
            session.parent = 0

        durable = self.limits.durable
        if durable is not None and durable.persistent(session):
            durable.connected(session)
        if session.keep_alive > 0:
            session.keep_alive = int(session.keep_alive * 1.5 + 0.5)
            reader.body_timeout = session.keep_alive
        return handler, session

    async def _client_connected(self, listener_name: str, reader: Any, writer: Any) -> None:
        """Stock's connection (amqtt/broker.py:446-604) without what each connection paid there for
        nothing (issue #14): debug and info lines formatted whether logged or not; the CONNACK built
        from packet objects (written here as its four bytes); the plugins' connect event, a task
        per plugin (the presence hook is called instead); a walk over every filter in the broker
        for retained messages to send, of which a CONNECT gets none (E). Authentication, take-over
        and session resumption are _initialize_client_session's."""
        server = self._servers.get(listener_name)
        if server is None:
            raise BrokerError(f"Invalid listener name '{listener_name}'")
        await server.acquire_connection()
        try:
            peer = writer.get_peer_info()
            if peer is None:
                await writer.close()
                return
            try:
                handler, session = await self._initialize_client_session(reader, writer, *peer)
            except (AMQTTError, MQTTError, NoDataError) as exc:
                log.warning("Failed to initialize client session: %s", exc)
                return
            try:
                await self._serve_session(reader, writer, session, handler)
            except (AMQTTError, MQTTError, NoDataError) as exc:
                log.warning("Error while handling client session: %s", exc)
        finally:
            server.release_connection()

    async def _serve_session(self, reader: Any, writer: Any, session: Session, handler: Any) -> None:
        try:
            session.transitions.connect()
        except ValueError:  # still connected after the take-over's wait: end that connection now
            _, old = self._sessions[session.client_id]
            await old.handle_connection_closed()
            await old.stop()
        handler.attach(session, reader, writer)
        self._sessions[session.client_id] = (session, handler)
        writer.write(codec.connack(bool(session.parent)))
        if self.presence is not None:
            self.presence(session, True)
        await handler.start()
        await self._publish_session_retained_messages(session)
        # E: a filter subscribed whose retained messages were not sent before the connection ended
        for topic_filter in list(session.attributes.get(NEW_FILTERS, ())):
            await self._publish_retained_messages_for_subscription((topic_filter, QOS_0), session)
        await self._client_message_loop(session, handler)

    async def _client_message_loop(self, client_session: Session, handler: BrokerProtocolHandler) -> None:
        """Stock waits with asyncio.wait on four tasks per connection (its disconnect, the next
        subscription, unsubscription and message to route), made again after each event: 3.8 KiB
        per idle connection and a share of every connect and disconnect (issue #14). Here the
        connection's own task waits on one future, rung by whichever comes first; each is handled
        as stock handles it, in turn, and what was queued before the disconnect first."""
        disconnected = handler._disconnect_waiter
        queues = (
            handler._pending_subscriptions,
            handler._pending_unsubscriptions,
            client_session.delivered_message_queue,
        )
        if disconnected is None or not all(isinstance(queue, LeanQueue) for queue in queues):
            await super()._client_message_loop(client_session, handler)
            return
        subscriptions, unsubscriptions, deliveries = queues
        loop = asyncio.get_running_loop()
        while True:
            if not subscriptions.empty():
                await self._handle_subscription(
                    client_session, handler, _resolved(subscriptions.get_nowait())
                )
            elif not unsubscriptions.empty():
                await self._handle_unsubscription(
                    client_session, handler, _resolved(unsubscriptions.get_nowait())
                )
            elif not deliveries.empty():  # (ours ends a connection itself, G: always True)
                await self._handle_message_delivery(
                    client_session, handler, _resolved(deliveries.get_nowait())
                )
            elif disconnected.done():
                await self._handle_disconnect(client_session, handler, disconnected)
                return
            else:
                bell: asyncio.Future[None] = loop.create_future()

                def ring(_: Any, bell: asyncio.Future[None] = bell) -> None:
                    if not bell.done():
                        bell.set_result(None)

                for queue in queues:
                    queue.ring(bell)
                disconnected.add_done_callback(ring)
                try:
                    await bell
                except asyncio.CancelledError:
                    return  # as stock: the loop ends, nothing more is handled
                finally:
                    for queue in queues:
                        queue.unring(bell)
                    disconnected.remove_done_callback(ring)

    async def _handle_disconnect(self, client_session: Session, handler: Any, disconnect_waiter: Any) -> None:
        # F: route what was read and PUBACKed before the client left.
        queue = client_session.delivered_message_queue
        while not queue.empty():
            await self._handle_message_delivery(client_session, handler, _resolved(queue.get_nowait()))
        if client_session.attributes.get(REVOKED):
            client_session.will_flag = False  # a revoked identity leaves nothing behind
        elif client_session.will_flag and not isinstance(disconnect_waiter.result(), DisconnectPacket):
            await self._send_will(client_session)
            if client_session.will_flag:  # not a flow of the bridge's: stock's broadcast
                topic, message = client_session.will_topic, client_session.will_message
                await self._broadcast_message(client_session, topic, message, client_session.will_qos)
        # The rest of stock's (amqtt/broker.py:657-701) without its debug lines formatted (the
        # packet's repr) whether logged or not; presence instead of the plugins' disconnect event.
        await self._stop_handler(handler)
        client_session.transitions.disconnect()
        if self.presence is not None:
            self.presence(client_session, False)
        current = self._sessions.get(client_session.client_id, (None, None))[0]
        if client_session.clean_session and current is client_session:
            # A clean session ends with its connection: gone now, not at the session monitor's
            # next tick, which stopped its handler a second time (issue #14).
            await self._delete_session(client_session.client_id)
        ended = client_session.attributes.pop(DISCONNECTED, None)
        if ended is not None:
            ended.set()
        if client_session.attributes.get(FORGET):
            await self._delete_session(client_session.client_id)
        elif self.limits.durable is not None and self.limits.durable.persistent(client_session):
            self.limits.durable.disconnected(client_session)  # session_expiry counts from here

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """A persistent session's subscription is on disk before its SUBACK."""
        granted = await super().add_subscription(subscription, session)
        if granted != 0x80:  # E: its retained messages are sent for this SUBSCRIBE, once
            session.attributes.setdefault(NEW_FILTERS, set()).add(subscription[0])
        durable = self.limits.durable
        if granted != 0x80 and durable is not None and durable.persistent(session):
            await durable.subscribed(session, subscription[0], granted)
        return granted

    async def _handle_unsubscription(
        self, client_session: Session, handler: Any, unsubscribe_waiter: Any
    ) -> None:
        durable = self.limits.durable
        if durable is not None and durable.persistent(client_session):
            await durable.unsubscribed(client_session, list(unsubscribe_waiter.result().topics))
        await super()._handle_unsubscription(client_session, handler, unsubscribe_waiter)

    async def _delete_session(self, client_id: str) -> None:
        """A clean session replacing a persistent one, a revoked identity: gone from disk too."""
        session = self._sessions.get(client_id, (None, None))[0]
        await super()._delete_session(client_id)
        if session is not None and self.limits.durable is not None and not session.clean_session:
            self.limits.durable.forget(client_id)

    async def _cleanup_session(self, client_id: str) -> None:
        """Expiry (the session monitor) deletes a stored session; shutdown only leaves memory."""
        session = self._sessions.get(client_id, (None, None))[0]
        await super()._cleanup_session(client_id)
        durable = self.limits.durable
        if session is not None and durable is not None and not session.clean_session and not self._stopping:
            durable.forget(client_id)

    async def shutdown(self) -> None:
        self._stopping = True
        for task in list(self._sends):  # as stock cancels its broadcast tasks
            task.cancel()
        await super().shutdown()

    async def delivery(self, topic: str, data: bytes) -> Routed:
        """A message the bridge publishes, for the persistent sessions it reaches at QoS 1 (each
        gets a row, written in the caller's transaction) and then everyone subscribed."""
        durable = self.limits.durable
        targets: dict[str, int] = {}
        if durable is not None:
            targets = {
                session.client_id: qos
                for topic_filter in self._subscriptions.matching(topic)
                for session, qos in self._subscriptions[topic_filter]
                if qos == QOS_1 and durable.persistent(session)
            }
            for client_id in list(targets):
                session = self._sessions.get(client_id, (None, None))[0]
                if session is None or not await self._topic_filtering(session, topic, Action.RECEIVE):
                    del targets[client_id]
        return Routed(topic, data, targets, self._deliver)

    async def _deliver(self, topic: str, data: bytes) -> None:
        """Stock's broadcast (a queue, a task per message and one per delivery, amqtt's message
        and packet objects for each) for a message the bridge routes: the same rules (receive
        ACL for every subscriber, queued for an offline persistent session, the subscription's
        QoS), each connected subscriber's PUBLISH written at once (BridgeHandler.deliver), in the
        order the messages are sent (one at a time, as stock's broadcast loop: a receive ACL that
        waits on the store holds the next message back, so none overtakes another). QoS 2
        subscriptions keep stock's flow."""
        encoded = codec.topic_field(topic)
        subscriptions = self._subscriptions
        async with self._delivering:
            for topic_filter in subscriptions.matching(topic):
                for session, qos in tuple(subscriptions.get(topic_filter, ())):
                    try:
                        await self._deliver_to(session, qos, topic, encoded, data)
                    except Exception:  # one subscriber's failure is neither the publisher's nor the others'
                        log.exception("a message on %.200r was not delivered to %s", topic, session.client_id)

    async def _deliver_to(self, session: Session, qos: int, topic: str, encoded: bytes, data: bytes) -> None:
        if not await self._topic_filtering(session, topic, Action.RECEIVE):
            return
        if session.transitions.state != "connected":
            if not session.clean_session and qos in (QOS_1, QOS_2) and not session.is_anonymous:
                self.limits.enqueue(session, RetainedApplicationMessage(None, topic, data, qos))
            return
        handler = self._get_handler(session)
        if isinstance(handler, BridgeHandler) and qos in (QOS_0, QOS_1):
            handler.deliver(topic, encoded, data, qos)
        elif handler is not None:  # QoS 2: stock's exchange, a task of its own
            self._sends.add(
                task := asyncio.ensure_future(handler.mqtt_publish(topic, data, qos, retain=False))
            )
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Future[Any]) -> None:
        self._sends.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("a delivery failed: %r", task.exception())

    async def route(self, topic: str, data: bytes) -> None:
        """A message the bridge publishes with no record of its own (the outbox's documents, live
        replies): its rows in a write of their own, awaited, before it is sent."""
        delivery = await self.delivery(topic, data)
        if delivery.targets and self.limits.durable is not None:
            await self.limits.durable.queue(delivery)
        await delivery.send()

    def restore(self, stored: Restored) -> None:
        """A session loaded at start-up: offline, subscribed, its in-flight messages re-sent with
        DUP and then its queued ones when it reconnects (_resume), CONNACK session-present set."""
        handler, session = self.create_offline_session(stored.client_id)
        session.clean_session = False
        session.attributes.update(stored.attributes)
        session.retained_messages = OfflineQueue()
        session.last_disconnect_time = int(stored.disconnected)
        self._sessions[stored.client_id] = (session, handler)
        for topic_filter, qos in stored.subscriptions:
            self._subscriptions.setdefault(topic_filter, []).append((session, qos))
        for topic, payload, qos, packet_id in stored.messages:
            if packet_id is None:
                self.limits.enqueue(session, RetainedApplicationMessage(None, topic, payload, qos))
                continue
            session.inflight_out[packet_id] = SentMessage(packet_id, topic, payload, None)
            session._packet_id = packet_id

    async def _send_will(self, session: Session) -> None:
        """A will is the client's last message: it goes the way its PUBLISH would have. On a flow
        the bridge owns (a thing's collect or status) the core stores and routes it, like any
        message of the thing (stock broadcast it around the store); on another topic the stock
        broadcast sends it, receive ACL applied. Never retained: only the bridge retains."""
        if session.will_retain:
            session.will_retain = False
            self.limits.refused_retained += 1
        if self.ingest is None or session.will_topic is None or session.will_message is None:
            return
        try:
            consumed = await self.ingest(session, session.will_topic, bytes(session.will_message))
        except ClientRevoked:
            consumed = True  # revoked meanwhile: nothing is sent
        except Exception:
            log.exception("the will of %s could not be stored; it is not sent", session.client_id)
            consumed = True
        if consumed:
            session.will_flag = False  # taken over: stock must not broadcast it a second time

    async def _handle_message_delivery(
        self, client_session: Session, handler: Any, wait_deliver: Any
    ) -> bool:
        if isinstance(wait_deliver.result(), ConsumedMessage):
            return True  # already stored and routed by the bridge
        if await super()._handle_message_delivery(client_session, handler, wait_deliver):
            return True
        # G: a protocol violation ends the connection through the normal path (will, offline event).
        await handler.handle_connection_closed()
        return True

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        """Stock runs every topic plugin as a task and gathers them (plugins/manager.py
        _map_plugin_method), once per subscriber per message: the hottest path of routing. Call
        them in turn instead; the same rule, every plugin must say True."""
        for plugin in self.plugins_manager._topic_plugins:
            if not await plugin.topic_filtering(session=session, topic=topic, action=action):
                return False
        return True

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """On (re)connect: re-send in-flight QoS 1 messages with DUP (I), then what was queued while
        the session was offline, with RETAIN off (stock sets it, broker.py:1125). In the background
        (the acknowledgements arrive on the client loop this call would otherwise delay), in order,
        `resume_window` at a time: stock sent the whole queue at once, so a long queue passed
        max_pending, the connection was cut and the excess was lost."""
        handler = self._get_handler(session)
        if isinstance(handler, BridgeHandler) and (
            session.inflight_out or not session.retained_messages.empty()
        ):
            # Not amqtt's broadcast tasks: only its broadcast loop trims those, and routed messages
            # no longer pass through it (_deliver), so finished ones would pile up there.
            self._sends.add(task := asyncio.ensure_future(self._resume(session, handler)))
            task.add_done_callback(self._sent)

    async def _resume(self, session: Session, handler: BridgeHandler) -> None:
        sending: set[asyncio.Future[Any]] = set()
        budget = self.limits.max_pending // 2  # unacknowledged bytes, well under the cut-off

        async def room_for(size: int) -> bool:
            while sending and (len(sending) >= self.resume_window or handler._pending + size > budget):
                await asyncio.wait(sending, return_when=asyncio.FIRST_COMPLETED)
            return self._get_handler(session) is handler and not session.attributes.get(REVOKED)

        def send(flow: Awaitable[Any]) -> None:
            task = asyncio.ensure_future(flow)
            sending.add(task)
            task.add_done_callback(lambda done: (sending.discard(done), done.cancelled() or done.exception()))

        for message in list(session.inflight_out.values()):
            if isinstance(message, OutgoingApplicationMessage) and message.qos == QOS_1:
                if not await room_for(len(message.data or b"")):
                    return  # still in flight: re-sent when the session resumes again
                send(handler._handle_message_flow(message))
        queue: OfflineQueue = session.retained_messages
        while not queue.empty():
            if not await room_for(queue.head_size()) or queue.empty():
                return  # what is left stays queued
            queued = queue.get_nowait()
            # In the session's in-flight set before its first send: a drop from here on leaves it
            # in flight, re-sent on the next resume.
            send(handler.mqtt_publish(queued.topic, queued.data, queued.qos, retain=False))

    async def _retain_broadcast_message(
        self, broadcast: dict[str, Any], qos: int, target_session: Session
    ) -> None:
        # An offline persistent session's queue, bounded (stock: an unbounded asyncio.Queue).
        self.limits.enqueue(
            target_session,
            RetainedApplicationMessage(broadcast["session"], broadcast["topic"], broadcast["data"], qos),
        )

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # E: only for a filter this session has just subscribed (stock also calls this for every
        # filter at each CONNECT), and only what it may receive.
        topic_filter, qos = subscription
        new_filters: set[str] = session.attributes.get(NEW_FILTERS, set())
        if topic_filter not in new_filters:
            return
        new_filters.discard(topic_filter)
        handler = self._get_handler(session)
        if handler is None:
            return
        sends = [
            handler.mqtt_publish(retained.topic, retained.data, min(qos, retained.qos or qos), retain=True)
            for topic, retained in list(self._retained_messages.items())
            if self._matches(topic, topic_filter)
            and await self._topic_filtering(session, topic=topic, action=Action.RECEIVE)
        ]
        await asyncio.gather(*sends, return_exceptions=True)


def _resolved(value: Any) -> asyncio.Future[Any]:
    """What stock's handlers take: the waiter that got `value`."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


async def close_client(broker: Broker, client_id: str, *, forget: bool) -> bool:
    """End a client's live connection at once, as a revoked one (no will, nothing more taken);
    with `forget`, drop its session too, queued messages included."""
    session, handler = broker.sessions.get(client_id, (None, None))
    closed = False
    if session is not None and handler is not None:
        if isinstance(handler, BridgeHandler):
            handler.revoke(forget=forget)
        if session.transitions.is_connected():
            await handler.handle_connection_closed()
            closed = True
    if forget:
        await broker._delete_session(client_id)
    return closed
