"""Every override of amqtt internals lives here, and in the two modules beside it that this one
installs: lean.py (amqtt's per-connection objects without their weight) and streams.py (the
reader and writer under the protocol handler). amqtt is pinned to 0.12.1 in
pyproject.toml because these methods are private; tests/test_amqtt_defects.py shows, for each
fix, the stock behaviour next to ours, so an upgrade tells at once which overrides it still needs.

Defects fixed (letters as in docs/amqtt-defects.md, which describes each one and its test):
  A  a resumed session kept the previous connection's TLS object, so the auth plugin validated
     another device's certificate                                  -> _initialize_client_session
  B  a CONNECT deleted the existing session of its client id before it was authenticated
  C  a rejected CONNECT still took over / registered a session     -> both: authenticate first
  D  keepalive was never enforced (handle_read_timeout is `pass`)  -> BridgeHandler._reader_loop
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
                                                                   -> strict packet parsing below
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
from dataclasses import dataclass
from typing import Any, ClassVar

from amqtt.broker import Broker, RetainedApplicationMessage
from amqtt.codecs_amqtt import read_or_raise
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, BrokerError, MQTTError, NoDataError
from amqtt.mqtt import packet_class, packet_dict
from amqtt.mqtt import publish as publish_module
from amqtt.mqtt import subscribe as subscribe_module
from amqtt.mqtt import unsubscribe as unsubscribe_module
from amqtt.mqtt.connack import (
    BAD_USERNAME_PASSWORD,
    IDENTIFIER_REJECTED,
    NOT_AUTHORIZED,
    UNACCEPTABLE_PROTOCOL_VERSION,
    ConnackPacket,
)
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.packet import (
    DISCONNECT,
    PINGREQ,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    RESERVED_0,
    RESERVED_15,
    SUBSCRIBE,
    UNSUBSCRIBE,
    MQTTFixedHeader,
)
from amqtt.mqtt.protocol import handler as protocol_handler
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import IncomingApplicationMessage, OutgoingApplicationMessage, Session
from amqtt.utils import gen_client_id

from bridge.mqtt import codec
from bridge.mqtt.auth import PEERCERT
from bridge.mqtt.lean import BridgeSession, LeanQueue, OfflineQueue, Subscriptions
from bridge.mqtt.sessions import DurableSessions, Restored, Routed
from bridge.mqtt.streams import BridgeWriter, CappedReader, Keepalive, MalformedPacket
from bridge.store import Unavailable

log = logging.getLogger(__name__)

# Set on a session by the pre-authentication of *this* connection; consumed by _authenticate so the
# stock flow does not authenticate twice (and cannot be satisfied by an older connection's flag).
PREAUTHENTICATED = "thingbridge.preauthenticated"
# An asyncio.Event a take-over waits on until the old connection's disconnect has been handled.
DISCONNECTED = "thingbridge.disconnected"
# Set on a session whose identity was revoked (deleted, disabled, re-issued): nothing more it sends
# is taken, its will is not sent; with FORGET its session is dropped once its connection ended.
REVOKED = "thingbridge.revoked"
FORGET = "thingbridge.forget"
NEW_FILTERS = "thingbridge.new_filters"  # subscribed, retained messages not sent yet
MAX_PACKET_ID = 65535


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
StrictFixedHeader = _strict(MQTTFixedHeader)  # a 5-byte remaining length, etc.
protocol_handler.MQTTFixedHeader = StrictFixedHeader  # also for the CONNECT, read by stock code
for _module in (publish_module, subscribe_module, unsubscribe_module):
    _module.decode_string = _strict_string  # type: ignore[attr-defined]


# (session, topic, payload) -> True when the bridge took the message over (stored and routed it).
Ingest = Callable[[Session, str, bytes], Awaitable[bool]]
# (session, True) when a connection of the session opened, (session, False) when it ended.
Presence = Callable[[Session, bool], None]
# session -> "valid", "disabled" or "gone": asked again once a session is registered.
Standing = Callable[[Session], Awaitable[str]]


class ClientRevoked(Exception):
    """Raised by the ingest hook for a client whose identity no longer holds: nothing it sent is
    stored or acknowledged, and its connection is cut."""


class ConsumedMessage(IncomingApplicationMessage):
    """An incoming message the bridge has already stored and routed: acknowledged as usual, never
    routed a second time by the broker."""

    __slots__ = ()


class SentMessage(OutgoingApplicationMessage):
    """An outgoing QoS 1 message already sent once (a direct delivery, or one restored from disk):
    DUP when it is sent again. `sent_by` is the handler whose bound (`_pending`) holds its bytes
    until its PUBACK on that connection."""

    __slots__ = ("sent_by",)

    def __init__(self, packet_id: int, topic: str, data: bytes, sent_by: BridgeHandler | None) -> None:
        super().__init__(packet_id, topic, QOS_1, data, False)
        self.sent_by = sent_by


@dataclass
class Limits:
    """Bounds of what the broker holds per client, and the count of what they dropped."""

    # Bytes of deliveries not yet written and acknowledged (QoS 1: until the PUBACK), so a
    # subscriber that does not read cannot grow memory without bound.
    max_pending: int = 8 * 1024 * 1024
    # What an offline persistent session may have queued; beyond either bound the oldest goes.
    max_queued_messages: int = 1000
    max_queued_bytes: int = 16 * 1024 * 1024
    dropped_queued: int = 0
    refused_retained: int = 0
    durable: DurableSessions | None = None  # a dropped message's row goes too

    def enqueue(self, session: Session, message: RetainedApplicationMessage) -> None:
        """Queue a message for an offline session. Full: drop the oldest (as EMQX does: the
        newest command is the one that matters), count it, and say so in the log."""
        queue: OfflineQueue = session.retained_messages
        queue.put_nowait(message)
        while queue.qsize() > self.max_queued_messages or queue.bytes > self.max_queued_bytes:
            dropped = queue.get_nowait()
            self.dropped_queued += 1
            if self.durable is not None:
                self.durable.done(session.client_id, dropped.data)
            log.warning("offline queue of %s is full: dropped its oldest message", session.client_id)


class BridgeHandler(BrokerProtocolHandler):
    ingest: Ingest | None = None
    standing: Standing | None = None
    limits: Limits = Limits()
    _pending: int = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._retries: set[asyncio.Future[None]] = set()
        self._packet_tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def init_from_connect(  # type: ignore[override]
        cls, reader: Any, writer: Any, plugins_manager: Any, loop: asyncio.AbstractEventLoop | None = None
    ) -> tuple[BridgeHandler, Session]:
        """Stock's (amqtt/mqtt/protocol/broker_handler.py:158-251), the same checks and answers, with
        the CONNECT read whole and decoded by codec: stock read it field by field, an awaited read
        each, and past the packet's end when a field claimed more than was left (issue #14)."""
        if not isinstance(reader, CappedReader):
            return await super().init_from_connect(reader, writer, plugins_manager, loop)  # type: ignore[return-value]
        return await cls.from_connect(await reader.read_connect(), writer, plugins_manager, loop)

    @classmethod
    async def from_connect(
        cls,
        connect: codec.Connect,
        writer: Any,
        plugins_manager: Any,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> tuple[BridgeHandler, Session]:
        if connect.flags & codec.RESERVED:
            raise MQTTError("[MQTT-3.1.2-3] CONNECT reserved flag must be set to 0")
        if connect.proto_name != "MQTT":
            raise MQTTError(f"[MQTT-3.1.2-1] Incorrect protocol name: {connect.proto_name!r:.50}")
        remote_address, remote_port = writer.get_peer_info() or (None, None)
        random_id = not connect.client_id
        if random_id:  # [MQTT-3.1.3-6]: the server may give one, for a clean session only
            connect.client_id = gen_client_id()
        refused = None
        if connect.proto_level != 4:  # only MQTT 3.1.1 [MQTT-3.1.2-2]
            refused = (UNACCEPTABLE_PROTOCOL_VERSION, f"protocol level {connect.proto_level}")
        elif connect.password is not None and connect.username is None:
            refused = (BAD_USERNAME_PASSWORD, "a password without a user name")  # [MQTT-3.1.2-22]
        elif random_id and not connect.flags & codec.CLEAN_SESSION:
            refused = (IDENTIFIER_REJECTED, "[MQTT-3.1.3-8] no client id with clean session 0")
        if refused is not None:
            writer.write(bytes((0x20, 2, 0, refused[0])))
            await writer.close()
            raise MQTTError(f"CONNECT from {remote_address}:{remote_port} refused: {refused[1]}")
        session = BridgeSession()
        session.client_id = connect.client_id
        session.clean_session = bool(connect.flags & codec.CLEAN_SESSION)
        session.will_flag = connect.will_flag
        session.will_retain = bool(connect.flags & codec.WILL_RETAIN)
        session.will_qos = connect.will_qos
        session.will_topic = connect.will_topic
        session.will_message = connect.will_message
        session.username = connect.username
        session.password = connect.password
        session.remote_address = remote_address
        session.remote_port = remote_port
        session.ssl_object = writer.get_ssl_info()
        session.keep_alive = connect.keep_alive
        return cls(plugins_manager, loop=loop), session

    async def mqtt_publish(
        self,
        topic: str,
        data: bytes | bytearray,
        qos: int | None,
        retain: bool,
        ack_timeout: int | None = None,
    ) -> OutgoingApplicationMessage:
        size = len(data)
        if self._over_limit(topic, data, qos, self._pending + size):
            raise ConnectionResetError("the subscriber does not read")
        self._pending += size
        try:
            return await super().mqtt_publish(topic, data, qos, retain, ack_timeout)
        finally:
            self._pending -= size

    def _over_limit(
        self, topic: str, data: bytes | bytearray, qos: int | None, held: int, ids_left: bool = True
    ) -> bool:
        """With `held` bytes of deliveries not taken, is the client past `max_pending` (or has it
        left no packet id free)? Then its connection is cut, and the message queued when its
        session is persistent."""
        if held <= self.limits.max_pending and ids_left:
            return False
        session = self.session
        if isinstance(self.writer, BridgeWriter):
            client = session.client_id if session else "?"
            log.warning("closing %s: %d bytes of deliveries it has not taken", client, held)
            self.writer.abort()
        if session is not None and not session.clean_session and qos in (QOS_1, QOS_2):
            # a persistent session gets it when it comes back, like anything sent while offline
            queued = data if isinstance(data, bytes) else bytes(data)  # a Stored one keeps its rows
            self.limits.enqueue(session, RetainedApplicationMessage(None, topic, queued, qos))
        return True

    def deliver(self, topic: str, encoded_topic: bytes, data: bytes, qos: int) -> None:
        """Send a message the bridge routes (QoS 0 or 1) at once, without amqtt's task, message and
        packet objects per delivery: its bytes go to the writer (which sends what a loop turn wrote
        at its end, nothing once the connection is closed); a QoS 1 one stays in `inflight_out`
        until its PUBACK (on_puback), re-sent when the session resumes (I)."""
        session, writer = self.session, self.writer
        if session is None or not isinstance(writer, BridgeWriter):
            return  # a handler of ours always has one (bridge/mqtt/broker.py), until it stops
        size = len(data)
        if qos == QOS_0:
            if not self._over_limit(topic, data, qos, self._pending + writer.unsent() + size):
                writer.write(codec.publish(encoded_topic, data, QOS_0))
            return
        ids_left = len(session.inflight_out) + len(session.inflight_in) < MAX_PACKET_ID
        if self._over_limit(topic, data, qos, self._pending + size, ids_left):
            return
        packet_id = session.next_packet_id
        session.inflight_out[packet_id] = SentMessage(packet_id, topic, data, self)
        self._pending += size
        durable = self.limits.durable
        if durable is not None:
            durable.sent(session.client_id, data, packet_id)
        writer.write(codec.publish(encoded_topic, data, QOS_1, packet_id))

    def on_puback(self, packet_id: int) -> None:
        """A PUBACK: the end of a direct delivery (deliver), or of a flow awaiting it."""
        waiter = self._puback_waiters.get(packet_id)
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(PubackPacket.build(packet_id))
            return
        session = self.session
        message = session.inflight_out.get(packet_id) if session is not None else None
        if not isinstance(message, SentMessage) or session is None:
            log.debug("PUBACK for packet id %d, which is not in flight", packet_id)
            return
        del session.inflight_out[packet_id]
        if message.sent_by is self:
            self._pending -= len(message.data)
        if self.limits.durable is not None:
            self.limits.durable.done(session.client_id, message.data)

    def revoke(self, *, forget: bool) -> None:
        """Cut the connection at once: the transport is closed here, not when the reader task
        notices a cancellation (which a read completing at the same moment can swallow), and any
        packet already read is refused at the ingest seam."""
        if self.session is not None:
            self.session.attributes[REVOKED] = True
            if forget:
                self.session.attributes[FORGET] = True
        if isinstance(self.writer, BridgeWriter):
            self.writer.abort()

    async def start(self) -> None:
        # The session is registered and connected now: a revocation from here on finds it. One that
        # committed after the CONNECT's identity check but before this point did not: ask again.
        if self.standing is not None and self.session is not None:
            verdict = await self.standing(self.session)
            if verdict != "valid":
                log.info("closing %s: revoked while it connected (%s)", self.session.client_id, verdict)
                self.revoke(forget=verdict == "gone")
        # Stock's start (amqtt/mqtt/protocol/handler.py:123, broker_handler.py:58) without a turn of
        # the loop spent waiting for the reader task to begin, and without its keepalive timer, whose
        # callback (handle_write_timeout) does nothing in a broker (issue #14).
        self._disconnect_waiter = self._loop.create_future()
        self._reader_stopped = asyncio.Event()
        self._reader_task = self._loop.create_task(self._reader_loop())
        await self._retry_deliveries()

    async def handle_disconnect(self, disconnect: DisconnectPacket | None) -> None:
        """Stock's, without a debug line formatted (the packet's repr) whether logged or not."""
        waiter = self._disconnect_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(disconnect)
        self._disconnect_waiter = None

    def _stop_waiters(self) -> None:
        """Stock's, without its four debug lines formatted whether logged or not."""
        for waiters in (
            self._puback_waiters,
            self._pubcomp_waiters,
            self._pubrec_waiters,
            self._pubrel_waiters,
        ):
            for waiter in waiters.values():
                waiter.cancel()

    async def handle_publish(self, publish_packet: PublishPacket | codec.Publish) -> None:
        """A PUBLISH, from codec (QoS 0 or 1) or from amqtt's parser."""
        topic, data, session = publish_packet.topic_name, publish_packet.data, self.session
        if isinstance(publish_packet, codec.Publish):
            packet_id = publish_packet.packet_id
        else:
            header = publish_packet.variable_header
            packet_id = header.packet_id if header is not None else None
        if session is not None and session.attributes.get(REVOKED):
            return
        if publish_packet.retain_flag and session is not None:
            # Only the bridge retains (presence, config): no topic a client publishes on is retained
            # in the contract. Dropped and counted like any denied publish, acknowledged if QoS 1.
            self.limits.refused_retained += 1
            log.info("retained publish by %s on %.200r refused", session.client_id, topic)
            if publish_packet.qos == QOS_1 and packet_id is not None:
                await self._send_raw(codec.puback(packet_id))
            return
        if topic is None or data is None or session is None or self.ingest is None:
            await super().handle_publish(_amqtt_publish(publish_packet))
            return
        try:
            consumed = await self.ingest(session, topic, bytes(data))
        except ClientRevoked as exc:
            log.info("closing %s: %s", session.client_id, exc)
            self.revoke(forget=False)
            return
        except Exception as exc:
            # Not stored, so not acknowledged: the client re-sends after it reconnects. A lost
            # database is one line (it is logged where it is noticed), anything else a traceback.
            why = f": {exc}" if isinstance(exc, Unavailable) else ""
            log.error(
                "could not store a message from %s%s; closing its connection",
                session.client_id,
                why,
                exc_info=None if why else exc,
            )
            await self.handle_connection_closed()
            return
        if not consumed:
            await super().handle_publish(_amqtt_publish(publish_packet))
            return
        if publish_packet.qos == QOS_0:
            return  # stored and routed; nothing to acknowledge
        if publish_packet.qos == QOS_1:
            # Acknowledge directly: the broker's delivery queue (a task per message) has nothing to do.
            await self._send_raw(codec.puback(packet_id))
            return
        message = ConsumedMessage(packet_id, topic, publish_packet.qos, data, publish_packet.retain_flag)
        message.publish_packet = _amqtt_publish(publish_packet)
        await self._handle_message_flow(message)  # QoS 2: the stock PUBREC/PUBREL/PUBCOMP exchange

    async def _send_raw(self, data: bytes) -> None:
        """_send_packet for a packet codec encoded: one write (no lock to take), and no
        packet-sent event (none of our plugins listens to it)."""
        if self.writer is None:
            return
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionResetError, BrokenPipeError):
            await self.handle_connection_closed()

    async def _handle_qos1_message_flow(self, app_message: Any) -> None:
        """An outgoing QoS 1 message stays in `inflight_out` from its first send until its PUBACK,
        and nothing else ever removes it (I, and redelivery of acknowledged messages: stock pops
        the packet id on a 5 s timeout or a cancellation, which removed whichever message held the
        id by then, so acknowledged messages were kept and re-sent, unacknowledged ones lost).
        No timeout: [MQTT-4.4.0-1] re-sends only when the session resumes; a client that does not
        acknowledge is bounded by `limits.max_pending` like one that does not read."""
        session = self.session
        if not isinstance(app_message, OutgoingApplicationMessage) or session is None:
            await super()._handle_qos1_message_flow(app_message)
            return
        packet_id = app_message.packet_id
        session.inflight_out[packet_id] = app_message
        sent = app_message.publish_packet is not None or isinstance(app_message, SentMessage)
        packet = app_message.build_publish_packet(dup=sent)
        durable = self.limits.durable
        if durable is not None:
            durable.sent(session.client_id, app_message.data, packet_id)
        waiter: asyncio.Future[PubackPacket] = asyncio.get_running_loop().create_future()
        self._puback_waiters[packet_id] = waiter
        try:
            await self._send_packet(packet)
            app_message.publish_packet = packet
            app_message.puback_packet = await waiter
        finally:
            if self._puback_waiters.get(packet_id) is waiter:
                del self._puback_waiters[packet_id]
        if session.inflight_out.get(packet_id) is app_message:
            del session.inflight_out[packet_id]
        if durable is not None:
            durable.done(session.client_id, app_message.data)

    async def _retry_deliveries(self) -> None:
        """Stock re-sends every in-flight message here and waits up to 10 s for the acknowledgements
        before the client loop runs; HardenedBroker._publish_session_retained_messages re-sends the
        outgoing ones instead, once, in order. Incoming QoS 2 exchanges resume as in stock."""
        session = self.session
        if session is None:
            return
        for message in list(session.inflight_in.values()):
            self._retries.add(task := asyncio.ensure_future(self._handle_message_flow(message)))
            task.add_done_callback(self._retries.discard)

    async def _reader_loop(self) -> None:
        """Stock's loop (amqtt/mqtt/protocol/handler.py:443), changed where it lost data:
        - acknowledgements, SUBSCRIBE/UNSUBSCRIBE and DISCONNECT are handled inline, in the order
          they arrived. Stock made each a task and cancelled those not yet run when the stream
          ended, so a PUBACK followed by DISCONNECT and EOF (mosquitto_sub -C 1) was lost and the
          acknowledged message re-sent on every reconnect, and a clean DISCONNECT fired the will;
        - the keepalive (D) is a deadline on this task (Keepalive), not a wait_for task that can
          swallow a cancellation, and ends the connection;
        - a packet that does not parse ends the connection (G'); PUBLISH still runs as a task
          each, so a window of QoS 1 messages is committed in one group. A task left when the
          connection ends finishes (or is refused at the ingest seam when the client is revoked)."""
        session = self.session
        assert session is not None
        loop = asyncio.get_running_loop()  # once: each lookup is a getpid() system call on 3.11
        try:
            async with asyncio.timeout(None) as deadline:
                keepalive = Keepalive(deadline, session.keep_alive) if session.keep_alive > 0 else None
                try:
                    await self._read_packets(loop, keepalive)
                finally:
                    if keepalive is not None:
                        keepalive.cancel()
        except TimeoutError:
            log.info("closing %s: no packet within its keepalive", session.client_id)
        except (asyncio.CancelledError, ConnectionError, NoDataError, MQTTError, AMQTTError):
            pass
        await self.handle_connection_closed()
        self._reader_stopped.set()
        await self.stop()

    async def _read_packets(self, loop: asyncio.AbstractEventLoop, keepalive: Keepalive | None) -> None:
        while self.reader is not None:
            hot = None
            if isinstance(self.reader, CappedReader):
                hot = self.reader.take_hot()
                if hot is None and self.reader.empty():
                    if keepalive is not None:
                        keepalive.waiting = loop.time()
                    await self.reader.wait_for_data()
                    if keepalive is not None:
                        keepalive.waiting = None
                    hot = self.reader.take_hot()
            if hot is not None:
                kind, packet = hot
            else:
                if keepalive is not None:
                    keepalive.waiting = loop.time()
                fixed_header = await StrictFixedHeader.from_stream(self.reader)
                if keepalive is not None:
                    keepalive.waiting = None
                if not fixed_header or fixed_header.packet_type in (RESERVED_0, RESERVED_15):
                    return
                packet = await packet_class(fixed_header).from_stream(self.reader, fixed_header=fixed_header)
                kind = fixed_header.packet_type
            if kind == PUBACK:
                self.on_puback(packet if hot is not None else packet.variable_header.packet_id)
                continue
            if kind == DISCONNECT:
                await self.handle_disconnect(packet)
                return
            inline = self._inline_handlers.get(kind)
            if inline is not None:
                await getattr(self, inline)(packet)
            elif kind in (PUBLISH, PINGREQ):  # both may wait on the store or the writer
                task = loop.create_task(
                    self.handle_publish(packet) if kind == PUBLISH else self.handle_pingreq(packet)
                )
                self._packet_tasks.add(task)
                task.add_done_callback(self._packet_done)
            else:  # CONNECT again [MQTT-3.1.0-2], or a packet only a server sends
                return

    _inline_handlers: ClassVar[dict[int, str]] = {
        PUBREC: "handle_pubrec",
        PUBREL: "handle_pubrel",
        PUBCOMP: "handle_pubcomp",
        SUBSCRIBE: "handle_subscribe",
        UNSUBSCRIBE: "handle_unsubscribe",
    }

    def _packet_done(self, task: asyncio.Task[None]) -> None:
        self._packet_tasks.discard(task)
        if not task.cancelled() and isinstance(task.exception(), ConnectionError):
            return  # the acknowledgement could not be written: the connection is gone
        if not task.cancelled() and task.exception() is not None:
            log.warning("packet handling failed: %r", task.exception())


def _amqtt_publish(packet: PublishPacket | codec.Publish) -> PublishPacket:
    return packet.packet() if isinstance(packet, codec.Publish) else packet


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
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        """Stock logic (amqtt/broker.py:480-539) with authentication moved *before* any change to the
        session that owns the client id (B, C), and a resumed session given this connection's TLS
        object and address (A). A CONNECT must arrive within connect_timeout (slow-loris)."""
        try:
            connect = reader.take_connect() if isinstance(reader, CappedReader) else None
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
            if isinstance(reader, CappedReader):
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
