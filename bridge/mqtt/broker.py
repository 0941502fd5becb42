"""The embedded broker as the core's DeviceLink: two listeners we own (TLS that requires a client
certificate from our CA, and plain TCP for application principals), handed to amqtt as
`external` connections, so amqtt never builds a TLS context and every packet goes through the
size cap."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from asyncio import sslproto
from functools import partial
from typing import Any

from amqtt.broker import Broker

from bridge.config import Config
from bridge.core import topics
from bridge.core.ports import Delivery
from bridge.core.service import Core
from bridge.mqtt.auth import Counters, standing
from bridge.mqtt.handler import Limits
from bridge.mqtt.hardened import HardenedBroker, close_client
from bridge.mqtt.router import Router, presence_changed
from bridge.mqtt.sessions import DurableSessions, Routed
from bridge.mqtt.streams import BridgeWriter, CappedReader
from bridge.mqtt.transport import listen

log = logging.getLogger(__name__)
TLS, PLAIN = "tls", "default"  # amqtt requires a listener named "default"
TLS_READ_BUFFER = 4 * 1024


def device_tls_context(ca_file: str, cert_file: str, key_file: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca_file)
    ctx.load_cert_chain(cert_file, key_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED  # no certificate from our CA, no handshake
    # TLS 1.3 session tickets let a reconnecting device resume (no certificate chain to verify,
    # no signature; its identity is still checked at CONNECT against the registry). One ticket per
    # handshake, not OpenSSL's two (it copies the session for every ticket after the first), and
    # stateful (OP_NO_TICKET): the ticket names a session kept in OpenSSL's cache (20,480 at most,
    # for 2 hours: its defaults). A stateless ticket carries the session itself, encrypted: OpenSSL
    # 3.0 encodes and decodes the session, client certificate and key included, to make one, and
    # decodes it again to resume, a fifth of a full handshake's CPU (issue #14).
    ctx.num_tickets = 1
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


class MqttBroker:
    """Made before the core, which is given it as its device link; `start(core)` then runs amqtt
    with plugins that ask that core who connects and what it may do."""

    def __init__(self, cfg: Config, broker_cls: type[Broker] = HardenedBroker) -> None:
        """`broker_cls` exists so tests can run stock amqtt under the same listeners and plugins and
        show each defect that HardenedBroker fixes."""
        self.cfg = cfg
        self.broker_cls = broker_cls
        self.counters = Counters()
        self.broker: Broker | None = None
        self.core: Core | None = None
        self._servers: list[asyncio.Server] = []
        self.ports: dict[str, int] = {}

    def _amqtt_config(self, core: Core) -> dict[str, Any]:
        plugin_cfg = {"core": core, "counters": self.counters}
        hardened = issubclass(self.broker_cls, HardenedBroker)
        return {
            "listeners": {
                PLAIN: {"type": "external", "bind": "external"},
                TLS: {"type": "external", "bind": "external"},
            },
            # Only what we need: the default set (loggers, $SYS) costs ~30% throughput. Presence
            # is a plugin for stock amqtt only: HardenedBroker calls it without amqtt's events.
            "plugins": {
                "bridge.mqtt.auth.IdentityPlugin": dict(plugin_cfg),
                "bridge.mqtt.auth.AclPlugin": dict(plugin_cfg),
                **({} if hardened else {"bridge.mqtt.router.PresencePlugin": {"core": core}}),
            },
            "session_expiry_interval": self.cfg.mqtt.session_expiry,
        }

    async def start(self, core: Core) -> None:
        self.core = core
        self.broker = self.broker_cls(self._amqtt_config(core))
        if isinstance(self.broker, HardenedBroker):
            self.broker.ingest = Router(core, self.counters).ingest
            self.broker.standing = lambda session: standing(core, session)
            self.broker.presence = partial(presence_changed, core)
            limits = self.broker.limits
            limits.max_pending = self.cfg.mqtt.max_unsent
            limits.max_queued_messages = self.cfg.mqtt.max_queued_messages
            limits.max_queued_bytes = self.cfg.mqtt.max_queued_bytes
            limits.durable = DurableSessions(core.store, self.cfg.mqtt.session_expiry)
        await core.things.know_enabled()
        await self.broker.start()
        if isinstance(self.broker, HardenedBroker) and self.broker.limits.durable is not None:
            # before the listeners open: a thing that reconnects finds its session
            for stored in await self.broker.limits.durable.load():
                self.broker.restore(stored)

    async def listen(self) -> None:
        """Open the listeners (after start())."""
        assert self.core is not None
        # asyncio gives every TLS connection a 256 KiB read buffer (SSLProtocol.max_size): 2.5 GiB
        # for 10,000 idle things. MQTT packets are small; a larger one is read in several chunks.
        sslproto.SSLProtocol.max_size = TLS_READ_BUFFER
        listeners = [(PLAIN, self.cfg.mqtt.plain, None)]
        if self.cfg.mqtt.tls.enabled:
            ca = self.core.ca
            ctx = device_tls_context(str(ca.ca_path), str(ca.server_cert_path), str(ca.server_key_path))
            listeners.append((TLS, self.cfg.mqtt.tls, ctx))
        for name, listener, ctx in listeners:
            if not listener.enabled:
                continue
            server = await listen(
                listener.host, listener.port, ctx, lambda r, w, name=name: self._serve(r, w, name)
            )
            self._servers.append(server)
            self.ports[name] = server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener: str) -> None:
        assert self.broker is not None
        try:
            await self.broker.external_connected(
                CappedReader(reader, self.cfg.mqtt.max_packet_size),
                BridgeWriter(writer),
                listener,
            )
        except Exception as exc:  # one bad connection must never reach the server loop
            log.info("MQTT connection ended: %r", exc)
        finally:
            writer.close()

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        if isinstance(self.broker, HardenedBroker) and self.broker.presence is not None:
            # Every connection ends with this process: its things are offline now (and subscribers
            # hear it), not only at the next start (amqtt's shutdown ends no connection's loop).
            for session, _ in list(self.broker.sessions.values()):
                if session.transitions.is_connected():
                    self.broker.presence(session, False)
            assert self.core is not None
            await self.core.presence.flush()
        if self.broker is not None:
            await self.broker.shutdown()
        if isinstance(self.broker, HardenedBroker) and self.broker.limits.durable is not None:
            await self.broker.limits.durable.journal.drain()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)

    async def disconnect_thing(self, thing_id: str, *, forget: bool) -> int:
        if self.broker is None:
            return 0
        owned = [
            cid for cid in list(self.broker.sessions) if cid == thing_id or cid.startswith(thing_id + ":")
        ]
        closed = 0
        for client_id in owned:
            closed += await close_client(self.broker, client_id, forget=forget)
        if forget:
            prefix = topics.thing_prefix(thing_id)
            for topic in [t for t in self.broker.retained_messages if t.startswith(prefix)]:
                await self.broker.retain_message(None, topic, b"")
        return closed

    async def delivery(self, topic: str, payload: bytes) -> Delivery:
        assert self.broker is not None
        if isinstance(self.broker, HardenedBroker):
            return await self.broker.delivery(topic, payload)
        return Routed(topic, payload, {}, self.broker.internal_message_broadcast)  # stock: memory only

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        assert self.broker is not None
        if retain:
            await self.broker.retain_message(None, topic, payload)
        if not payload and retain:
            return
        if isinstance(self.broker, HardenedBroker):
            await self.broker.route(topic, payload)  # queued on disk for persistent sessions
        else:
            await self.broker.internal_message_broadcast(topic, payload)

    async def restore_retained(self, topic: str, payload: bytes) -> None:
        assert self.broker is not None
        await self.broker.retain_message(None, topic, payload)

    def stats(self) -> dict[str, Any]:
        sessions = list(self.broker.sessions.values()) if self.broker is not None else []
        limits = self.broker.limits if isinstance(self.broker, HardenedBroker) else Limits()
        return {
            "connections": sum(1 for session, _ in sessions if session.transitions.is_connected()),
            "sessions": len(sessions),
            "retainedMessages": len(self.broker.retained_messages) if self.broker is not None else 0,
            "refusedConnects": self.counters.refused_connects,
            "refusedByReason": dict(sorted(self.counters.reasons.items())),
            "deniedPublishes": self.counters.denied_publishes,
            "deniedSubscribes": self.counters.denied_subscribes,
            "droppedMessages": self.counters.dropped_messages,
            # oldest messages dropped from full offline queues (mqtt.max_queued_*)
            "droppedQueuedMessages": limits.dropped_queued,
            "queuedMessages": sum(session.retained_messages.qsize() for session, _ in sessions),
            "refusedRetainedPublishes": limits.refused_retained,
            # both transports: HTTP GET /token and the plain listener share one checker
            "passwordChecks": self.core.accounts.passwords.stats(),
        }
