"""One MQTT connection's protocol handler (BridgeHandler), amqtt's BrokerProtocolHandler with the
fixes of the defects hardened.py lists that live per connection: the CONNECT read whole, packets
parsed strictly (G'), the keepalive enforced (D), a message committed before its PUBACK, the
direct delivery of what the bridge routes and its QoS 1 flow (I), the bounds of what a client may
leave unread or unacknowledged (Limits)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from amqtt.broker import RetainedApplicationMessage
from amqtt.codecs_amqtt import read_or_raise
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt import packet_class, packet_dict
from amqtt.mqtt import publish as publish_module
from amqtt.mqtt import subscribe as subscribe_module
from amqtt.mqtt import unsubscribe as unsubscribe_module
from amqtt.mqtt.connack import (
    BAD_USERNAME_PASSWORD,
    IDENTIFIER_REJECTED,
    UNACCEPTABLE_PROTOCOL_VERSION,
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
from bridge.mqtt.lean import BridgeSession, OfflineQueue
from bridge.mqtt.sessions import DurableSessions
from bridge.mqtt.streams import BridgeWriter, CappedReader, Keepalive, MalformedPacket
from bridge.store import StoreError, Unavailable

log = logging.getLogger(__name__)

# Set on a session whose identity was revoked (deleted, disabled, re-issued): nothing more it sends
# is taken, its will is not sent; with FORGET its session is dropped once its connection ended.
REVOKED = "thingbridge.revoked"
FORGET = "thingbridge.forget"
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
        return codec.text(raw)
    except codec.Malformed as exc:
        raise MalformedPacket(str(exc)) from exc


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
        cls,
        reader: CappedReader,
        writer: Any,
        plugins_manager: Any,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> tuple[BridgeHandler, Session]:
        """Stock's (amqtt/mqtt/protocol/broker_handler.py:158-251), the same checks and answers, with
        the CONNECT read whole and decoded by codec: stock read it field by field, an awaited read
        each, and past the packet's end when a field claimed more than was left (issue #14)."""
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
        elif connect.flags & codec.PASSWORD and connect.username is None:
            refused = (BAD_USERNAME_PASSWORD, "a password without a user name")  # [MQTT-3.1.2-22]
        elif connect.flags & codec.PASSWORD and connect.password is None:
            refused = (BAD_USERNAME_PASSWORD, "a password that is not UTF-8, as none of ours is")
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
            try:
                verdict = await self.standing(self.session)
            except StoreError as exc:
                # A revocation came in between and the store cannot tell whom it hit: cut this one
                # (the device reconnects), through the disconnect path like any revocation, so its
                # session and presence end as they began (an exception here left both connected).
                verdict = f"not checked: {exc}"
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
