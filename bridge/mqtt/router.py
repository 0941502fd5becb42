"""Topic -> core call: the device flows the bridge owns. A message routed here is committed
before its PUBACK (see BridgeHandler) and re-published by the core, so an MQTT message and an
HTTP one take the same path to subscribers. Anything else is left to the broker's ACL."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from amqtt.plugins.base import BasePlugin
from amqtt.session import Session

from bridge.core.errors import DomainError, NotFound
from bridge.core.service import Core
from bridge.mqtt import topics
from bridge.mqtt.auth import PRINCIPAL, Counters, Principal

log = logging.getLogger(__name__)


class Router:
    def __init__(self, core: Core, counters: Counters) -> None:
        self.core = core
        self.counters = counters

    async def ingest(self, session: Session, topic: str, payload: bytes) -> bool:
        principal: Principal | None = session.attributes.get(PRINCIPAL)
        if principal is None:
            return False
        try:
            if principal.kind == "thing":
                if topic != f"{topics.PREFIX}/{principal.name}/collect":
                    return False
                await self.core.messages.collect(
                    principal.name, principal.owner_id, payload, transport="mqtt"
                )
                return True
            target = topics.publish_target(topic)
            if target is None:
                return False
            owner = None if principal.fleet_wide else principal.owner_id
            await self.core.messages.publish(target, owner, payload, transport="mqtt")
            return True
        except NotFound:
            self.counters.denied_publishes += 1
            log.info(
                "publish by %s %s to %r denied: not its owner's thing", principal.kind, principal.name, topic
            )
        except DomainError as exc:  # too large, and so on: MQTT 3.1.1 has no negative PUBACK
            self.counters.dropped_messages += 1
            log.info("message from %s %s on %r dropped: %s", principal.kind, principal.name, topic, exc)
        return True


class PresencePlugin(BasePlugin):
    """Connect and disconnect events -> the core's presence of things."""

    @dataclass
    class Config:
        core: Any = None

    async def on_broker_client_connected(self, *, client_id: str, client_session: Session) -> None:
        principal = client_session.attributes.get(PRINCIPAL)
        if (
            principal is not None
            and principal.kind == "thing"
            and self.config.core.presence.connected(principal.name)
        ):
            await self.config.core.presence.record(principal.name, "online")

    async def on_broker_client_disconnected(self, *, client_id: str, client_session: Session) -> None:
        principal = client_session.attributes.get(PRINCIPAL)
        if (
            principal is not None
            and principal.kind == "thing"
            and self.config.core.presence.disconnected(principal.name)
        ):
            await self.config.core.presence.record(principal.name, "offline")
