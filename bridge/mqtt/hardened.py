"""Every override of amqtt internals lives here, and only here. amqtt is pinned to 0.12.1 in
pyproject.toml because these methods are private; tests/test_amqtt_defects.py shows, for each
fix, the stock behaviour next to ours, so an upgrade tells at once which overrides it still needs.

Defects fixed (letters as in the amqtt lab report, shared/amqtt-lab/REPORT.md §4.2):
  A  a resumed session kept the previous connection's TLS object, so the auth plugin validated
     another device's certificate                                  -> _initialize_client_session
  B  a CONNECT deleted the existing session of its client id before it was authenticated
  C  a rejected CONNECT still took over / registered a session     -> both: authenticate first
  D  keepalive was never enforced (handle_read_timeout is `pass`)  -> KeepAliveHandler
  E  on CONNECT, retained messages matching *any* session's filters were pushed, with no ACL
                                                                   -> _publish_retained_messages_for_subscription
  F  PUBLISHes already PUBACKed were dropped when the client disconnected -> _handle_disconnect
  G  an invalid PUBLISH stopped the client loop but left the socket open  -> _handle_message_delivery
TLS: amqtt hard-codes CERT_OPTIONAL; we never let amqtt build a TLS context (our listeners are
`external`, see bridge/mqtt/broker.py), and amqtt has no packet size limit: CappedReader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from amqtt.adapters import StreamReaderAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

log = logging.getLogger(__name__)

# Set on a session by the pre-authentication of *this* connection; consumed by _authenticate so the
# stock flow does not authenticate twice (and cannot be satisfied by an older connection's flag).
PREAUTHENTICATED = "thingbridge.preauthenticated"


class KeepAliveHandler(BrokerProtocolHandler):
    """Drop a peer silent for 1.5 x its keepalive [MQTT-3.1.2-24]: its will fires, it goes offline."""

    def handle_read_timeout(self) -> None:
        # the reader loop calls this synchronously; keep a reference so the task is not collected
        self._closing = asyncio.ensure_future(self.handle_connection_closed())


class CappedReader(StreamReaderAdapter):
    """amqtt reads a packet body with one readexactly(n), n up to 256 MiB. Refuse large n up front."""

    def __init__(self, reader: asyncio.StreamReader, max_read: int) -> None:
        super().__init__(reader)
        self.max_read = max_read

    async def read(self, n: int = -1) -> bytes:
        if n > self.max_read:
            raise ConnectionResetError(f"MQTT packet of {n} bytes exceeds the limit of {self.max_read}")
        return await super().read(n)


class HardenedBroker(Broker):
    connect_timeout: float = 10.0

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
                KeepAliveHandler.init_from_connect(reader, writer, self.plugins_manager), self.connect_timeout
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

    async def _handle_message_delivery(
        self, client_session: Session, handler: Any, wait_deliver: Any
    ) -> bool:
        if await super()._handle_message_delivery(client_session, handler, wait_deliver):
            return True
        # G: a protocol violation ends the connection through the normal path (will, offline event).
        await handler.handle_connection_closed()
        return True

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


async def close_client(broker: Broker, client_id: str) -> bool:
    """End a client's live connection (as an abnormal disconnect, so its will fires and it goes
    offline) and forget its session, queued messages included."""
    session, handler = broker.sessions.get(client_id, (None, None))
    closed = False
    if session is not None and handler is not None and session.transitions.is_connected():
        await handler.handle_connection_closed()
        closed = True
    await broker._delete_session(client_id)
    return closed
