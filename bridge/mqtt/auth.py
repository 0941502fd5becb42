"""Who a connection is (IdentityPlugin) and what it may do (AclPlugin), as amqtt plugins: the
embedded broker's adapter to the rules of bridge/mqtt/principals.py.

Identity comes from the verified client certificate alone on the TLS listener: CN = thing id (or
`app:<name>` for an application certificate), and the certificate must be the one currently
issued, so a deleted or re-created thing's old certificate is refused. On the plain listener only
application principals connect, with username and password."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from amqtt.contexts import Action as AmqttAction
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from bridge import pki
from bridge.mqtt.principals import (
    APP_PREFIX,
    Action,
    Principal,
    Refused,
    app_by_certificate,
    app_by_password,
    permitted,
    thing_by_certificate,
)

log = logging.getLogger(__name__)
PRINCIPAL = "thingbridge.principal"
# The client certificate as the TLS layer decoded it at the handshake, for this CONNECT's identity
# check only (decoding it again costs about 0.1 ms; issue #14).
PEERCERT = "thingbridge.peercert"


@dataclass
class Counters:
    refused_connects: int = 0
    denied_publishes: int = 0
    denied_subscribes: int = 0
    dropped_messages: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # refused CONNECTs by Refused.reason

    def refuse(self, reason: str) -> None:
        self.refused_connects += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


class IdentityPlugin(BaseAuthPlugin):
    @dataclass
    class Config:
        core: Any = None
        counters: Any = None

    async def authenticate(self, *, session: Session) -> bool | None:
        try:
            principal = await self._identify(session)
            if not principal.owns_client_id(session.client_id):
                raise Refused("client_id_mismatch", principal.client_id_rule())
            if session.will_flag and not await permitted(
                self.config.core, principal, Action.PUBLISH, session.will_topic
            ):
                # amqtt broadcasts a will without any ACL check: refuse the CONNECT instead
                raise Refused("will_not_permitted", f"will topic {session.will_topic!r:.200} not permitted")
        except Refused as refused:
            self.config.counters.refuse(refused.reason)
            log.warning(
                "CONNECT refused from %s (client id %.100r, username %.100r): %s",
                session.remote_address,
                session.client_id,
                session.username,
                refused,
            )
            return False
        session.attributes[PRINCIPAL] = principal
        return True

    async def _identify(self, session: Session) -> Principal:
        core = self.config.core
        if session.ssl_object is not None:
            der = session.ssl_object.getpeercert(binary_form=True)
            decoded = session.attributes.pop(PEERCERT, None) or session.ssl_object.getpeercert()
            cn = pki.peer_common_name(decoded)
            if not der or not cn:
                raise Refused("no_certificate", "no verified client certificate")
            presented = pki.der_cert_id(der)
            if cn.startswith(APP_PREFIX):
                return await app_by_certificate(core, cn[len(APP_PREFIX) :], presented)
            return await thing_by_certificate(core, cn, presented)
        return await app_by_password(core, session.username, session.password, session.remote_address or "")


async def standing(core: Any, session: Session) -> str:
    """ "valid", or why a registered session must go: "disabled" (its session is kept for when the
    thing is enabled again) or "gone" (deleted or re-issued: its session goes too)."""
    principal: Principal | None = session.attributes.get(PRINCIPAL)
    if principal is None or principal.device is None:
        return "valid"
    return await core.things.standing(principal.device, principal.revocations)


class AclPlugin(BaseTopicPlugin):
    @dataclass
    class Config:
        core: Any = None
        counters: Any = None

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: AmqttAction | None = None
    ) -> bool | None:
        principal: Principal | None = session.attributes.get(PRINCIPAL) if session else None
        if principal is None or action is None:
            return False
        act = Action(action.value)
        allowed = await permitted(self.config.core, principal, act, topic)
        if not allowed:
            if act == Action.PUBLISH:
                self.config.counters.denied_publishes += 1
                log.info("publish by %s %s to %.200r denied", principal.kind, principal.name, topic)
            elif act == Action.SUBSCRIBE:
                self.config.counters.denied_subscribes += 1
        return allowed
