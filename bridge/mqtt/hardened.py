"""Every override of amqtt internals lives here, and only here. amqtt is pinned to 0.12.1 in
pyproject.toml because these methods are private; tests/test_amqtt_defects.py shows, for each
fix, the stock behaviour next to ours, so an upgrade tells at once which overrides it still needs.

Defects fixed (letters as in docs/amqtt-defects.md, which describes each one and its test):
  A  a resumed session kept the previous connection's TLS object, so the auth plugin validated
     another device's certificate                                  -> _initialize_client_session
  B  a CONNECT deleted the existing session of its client id before it was authenticated
  C  a rejected CONNECT still took over / registered a session     -> both: authenticate first
  D  keepalive was never enforced (handle_read_timeout is `pass`)  -> BridgeHandler.handle_read_timeout
  E  on CONNECT, retained messages matching *any* session's filters were pushed, with no ACL
                                                                   -> _publish_retained_messages_for_subscription
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
                                                                   -> strict packet parsing below
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

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.codecs_amqtt import read_or_raise
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt import packet_dict
from amqtt.mqtt import publish as publish_module
from amqtt.mqtt import subscribe as subscribe_module
from amqtt.mqtt import unsubscribe as unsubscribe_module
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.constants import QOS_0, QOS_1
from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.protocol import handler as protocol_handler
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import IncomingApplicationMessage, OutgoingApplicationMessage, Session

log = logging.getLogger(__name__)

# Set on a session by the pre-authentication of *this* connection; consumed by _authenticate so the
# stock flow does not authenticate twice (and cannot be satisfied by an older connection's flag).
PREAUTHENTICATED = "thingbridge.preauthenticated"
# An asyncio.Event a take-over waits on until the old connection's disconnect has been handled.
DISCONNECTED = "thingbridge.disconnected"


class MalformedPacket(ConnectionError):
    """Raised for a packet that did not parse; the reader loop then ends the connection."""


def _strict(cls: type[Any]) -> type[Any]:
    async def from_stream(strict_cls: type[Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await super(strict, strict_cls).from_stream(*args, **kwargs)
        except MQTTError as exc:
            raise MalformedPacket(f"malformed {cls.__name__}: {exc}") from exc

    strict = type(f"Strict{cls.__name__}", (cls,), {"from_stream": classmethod(from_stream)})
    return strict


async def _strict_string(reader: Any) -> str:
    """[MQTT-1.5.3-1/2]: an MQTT string is UTF-8 without U+0000. Stock decode_string turns invalid
    bytes into the text "b'...'" and lets NUL through (codecs_amqtt.py:70)."""
    length = int.from_bytes(await read_or_raise(reader, 2), "big")
    raw = await read_or_raise(reader, length) if length else b""
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise MalformedPacket("a string field is not valid UTF-8") from exc
    if "\x00" in text:
        raise MalformedPacket("a string field contains U+0000")
    return text


# Parsing made strict: a packet that does not parse ends the connection (stock logs "Message
# discarded" and reads on from the middle of it). amqtt looks these names up in its own modules as
# it parses; the broker is the only amqtt user in this process, so patching them here is contained.
packet_dict.update({packet_type: _strict(cls) for packet_type, cls in packet_dict.items()})
protocol_handler.MQTTFixedHeader = _strict(MQTTFixedHeader)  # a 5-byte remaining length, etc.
for _module in (publish_module, subscribe_module, unsubscribe_module):
    _module.decode_string = _strict_string  # type: ignore[attr-defined]

# (session, topic, payload) -> True when the bridge took the message over (stored and routed it).
Ingest = Callable[[Session, str, bytes], Awaitable[bool]]


class ConsumedMessage(IncomingApplicationMessage):
    """An incoming message the bridge has already stored and routed: acknowledged as usual, never
    routed a second time by the broker."""

    __slots__ = ()


class BridgeHandler(BrokerProtocolHandler):
    ingest: Ingest | None = None
    # Bytes of deliveries not yet written and acknowledged; amqtt starts a task per delivery, each
    # holding its payload, so a subscriber that does not read would grow memory without bound.
    max_pending: int = 8 * 1024 * 1024
    _pending: int = 0

    async def mqtt_publish(
        self,
        topic: str,
        data: bytes | bytearray,
        qos: int | None,
        retain: bool,
        ack_timeout: int | None = None,
    ) -> OutgoingApplicationMessage:
        size = len(data)
        if self._pending + size > self.max_pending:
            if isinstance(self.writer, BridgeWriter):
                client = self.session.client_id if self.session else "?"
                log.warning("closing %s: %d bytes of deliveries it has not taken", client, self._pending)
                self.writer.abort()
            raise ConnectionResetError("the subscriber does not read")
        self._pending += size
        try:
            return await super().mqtt_publish(topic, data, qos, retain, ack_timeout)
        finally:
            self._pending -= size

    async def handle_publish(self, publish_packet: PublishPacket) -> None:
        topic, data, session = publish_packet.topic_name, publish_packet.data, self.session
        if topic is None or data is None or session is None or self.ingest is None:
            await super().handle_publish(publish_packet)
            return
        try:
            consumed = await self.ingest(session, topic, bytes(data))
        except Exception:
            # Not stored, so not acknowledged: the client re-sends after it reconnects.
            log.exception("could not store a message from %s; closing its connection", session.client_id)
            await self.handle_connection_closed()
            return
        if not consumed:
            await super().handle_publish(publish_packet)
            return
        packet_id = publish_packet.variable_header.packet_id if publish_packet.variable_header else None
        if publish_packet.qos == QOS_0:
            return  # stored and routed; nothing to acknowledge
        if publish_packet.qos == QOS_1:
            # Acknowledge directly: the broker's delivery queue (a task per message) has nothing to do.
            await self._send_packet(PubackPacket.build(packet_id))
            return
        message = ConsumedMessage(packet_id, topic, publish_packet.qos, data, publish_packet.retain_flag)
        message.publish_packet = publish_packet
        await self._handle_message_flow(message)  # QoS 2: the stock PUBREC/PUBREL/PUBCOMP exchange

    async def _handle_qos1_message_flow(self, app_message: Any) -> None:
        session = self.session
        try:
            await super()._handle_qos1_message_flow(app_message)
        except BaseException:
            # I: stock pops the message from inflight_out on timeout or disconnect; keep it.
            if (
                session is not None
                and isinstance(app_message, OutgoingApplicationMessage)
                and app_message.puback_packet is None
                and app_message.packet_id is not None
            ):
                session.inflight_out[app_message.packet_id] = app_message
            raise

    def handle_read_timeout(self) -> None:
        # the reader loop calls this synchronously; keep a reference so the task is not collected
        self._closing = asyncio.ensure_future(self.handle_connection_closed())


class CappedReader(StreamReaderAdapter):
    """amqtt reads a packet body with one readexactly(n), n up to 256 MiB, and with no time limit
    (its keepalive covers only the fixed header). Refuse a large n up front, and a body that does
    not arrive within `body_timeout` (1.5 x keepalive once the session is known, else 60 s)."""

    def __init__(self, reader: asyncio.StreamReader, max_read: int, body_timeout: float = 60) -> None:
        super().__init__(reader)
        self.max_read = max_read
        self.body_timeout = body_timeout

    async def read(self, n: int = -1) -> bytes:
        if n > self.max_read:
            # Not ConnectionResetError: amqtt turns that into NoDataError and reads on.
            raise MalformedPacket(f"MQTT packet of {n} bytes exceeds the limit of {self.max_read}")
        # n <= 1: the fixed header, read byte by byte, is bounded by the reader loop's keepalive.
        # Data already buffered needs no timer (the common case: a TLS record holds whole packets).
        if n <= 1 or len(self._reader._buffer) >= n:
            return await super().read(n)
        try:
            async with asyncio.timeout(self.body_timeout):
                return await super().read(n)
        except TimeoutError:
            raise MalformedPacket(f"no complete packet within {self.body_timeout:.0f} s") from None


class BridgeWriter(StreamWriterAdapter):
    """A writer that can be cut: stock close() waits in drain(), forever for a peer that does not
    read, and so do the writes queued behind it."""

    def abort(self) -> None:
        self._writer.transport.abort()

    async def drain(self) -> None:
        if self._writer.transport.is_closing():
            raise ConnectionResetError("connection closed")
        await super().drain()

    async def close(self) -> None:
        try:
            async with asyncio.timeout(5):
                await super().close()
        except (TimeoutError, ConnectionError):
            self._writer.transport.abort()


class HardenedBroker(Broker):
    connect_timeout: float = 10.0

    ingest: Ingest | None = None
    max_pending: int = BridgeHandler.max_pending

    async def _authenticate(self, session: Session, listener: Any) -> bool:
        if session.attributes.pop(PREAUTHENTICATED, False):
            return True
        return await super()._authenticate(session, listener)

    async def _initialize_client_session(  # type: ignore[override]
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        """Stock logic (amqtt/broker.py:480-539) with authentication moved *before* any change to the
        session that owns the client id (B, C), and a resumed session given this connection's TLS
        object and address (A). A CONNECT must arrive within connect_timeout (slow-loris)."""
        try:
            handler, incoming = await asyncio.wait_for(
                BridgeHandler.init_from_connect(reader, writer, self.plugins_manager), self.connect_timeout
            )
        except (TimeoutError, ConnectionError, NoDataError, AMQTTError, MQTTError) as exc:
            with contextlib.suppress(Exception):
                await writer.close()
            raise AMQTTError(f"no valid CONNECT from {remote_address}:{remote_port}: {exc!r}") from exc

        if not await super()._authenticate(incoming, None):
            with contextlib.suppress(Exception):
                await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
                await writer.close()
            raise AMQTTError(f"CONNECT refused for client id {incoming.client_id!r} from {remote_address}")
        incoming.attributes[PREAUTHENTICATED] = True
        handler.ingest = self.ingest
        handler.max_pending = self.max_pending
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
            existing.attributes.update(incoming.attributes)
            session = existing
            session.parent = 1
        else:
            session.parent = 0

        if session.keep_alive > 0:
            session.keep_alive = int(session.keep_alive * 1.5 + 0.5)
            if isinstance(reader, CappedReader):
                reader.body_timeout = session.keep_alive
        return handler, session

    async def _handle_disconnect(self, client_session: Session, handler: Any, disconnect_waiter: Any) -> None:
        # F: route what was read and PUBACKed before the client left.
        queue = client_session.delivered_message_queue
        loop = asyncio.get_running_loop()
        while not queue.empty():
            fut = loop.create_future()
            fut.set_result(queue.get_nowait())
            await self._handle_message_delivery(client_session, handler, fut)
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)
        ended = client_session.attributes.pop(DISCONNECTED, None)
        if ended is not None:
            ended.set()

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
        the session was offline, with RETAIN off (stock sets it, broker.py:1125). Not awaited: the
        acknowledgements arrive on the client loop this call would otherwise delay."""
        handler = self._get_handler(session)
        if handler is None:
            return
        sends = [
            handler._handle_message_flow(message)
            for message in list(session.inflight_out.values())
            if isinstance(message, OutgoingApplicationMessage) and message.qos == QOS_1
        ]
        while not session.retained_messages.empty():
            queued = session.retained_messages.get_nowait()
            sends.append(handler.mqtt_publish(queued.topic, queued.data, queued.qos, retain=False))
        self._tasks_queue.extend(asyncio.ensure_future(send) for send in sends)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # E: only this session's own filters, and only what it may receive.
        topic_filter, qos = subscription
        if not any(s.client_id == session.client_id for s, _ in self._subscriptions.get(topic_filter, [])):
            return
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


async def close_client(broker: Broker, client_id: str, *, forget: bool) -> bool:
    """End a client's live connection (as an abnormal disconnect, so its will fires and it goes
    offline); with `forget`, drop its session too, queued messages included."""
    session, handler = broker.sessions.get(client_id, (None, None))
    closed = False
    if session is not None and handler is not None and session.transitions.is_connected():
        await handler.handle_connection_closed()
        closed = True
    if forget:
        await broker._delete_session(client_id)
    return closed
