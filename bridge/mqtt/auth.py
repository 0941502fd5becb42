"""Who a connection is (IdentityPlugin) and what it may do (AclPlugin), as amqtt plugins.

Identity comes from the verified client certificate alone on the TLS listener: CN = thing id (or
`app:<name>` for an application certificate), and the certificate must be the one currently
issued, so a deleted or re-created thing's old certificate is refused. On the plain listener only
application principals connect, with username and password."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from bridge import pki
from bridge.core import topics
from bridge.core.errors import TooManyRequests
from bridge.core.identity import DeviceIdentity

log = logging.getLogger(__name__)
PRINCIPAL = "thingbridge.principal"
APP_PREFIX = "app:"


@dataclass(frozen=True)
class Principal:
    kind: str  # "thing" | "app"
    name: str
    owner_id: str
    fleet_wide: bool = False
    # A thing's identity, and the registry's revocation counter when it was checked.
    device: DeviceIdentity | None = None
    revocations: int = 0

    @property
    def client_id_prefix(self) -> str:
        return self.name if self.kind == "thing" else f"{APP_PREFIX}{self.name}"

    def owns_client_id(self, client_id: str | None) -> bool:
        """A thing may hold several connections ("{id}" or "{id}:{suffix}") but never name another's."""
        prefix = self.client_id_prefix
        return bool(client_id) and (client_id == prefix or client_id.startswith(prefix + ":"))


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


class Refused(Exception):
    """A refused CONNECT: `reason` is a short stable key for the statistics, the message says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class IdentityPlugin(BaseAuthPlugin):
    @dataclass
    class Config:
        core: Any = None
        counters: Any = None

    async def authenticate(self, *, session: Session) -> bool | None:
        try:
            principal = await self._identify(session)
            if not principal.owns_client_id(session.client_id):
                raise Refused("client_id_mismatch", _client_id_rule(principal))
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
            cn = pki.peer_common_name(session.ssl_object.getpeercert())
            if not der or not cn:
                raise Refused("no_certificate", "no verified client certificate")
            presented = pki.der_cert_id(der)
            if cn.startswith(APP_PREFIX):
                app = await core.accounts.app(cn[len(APP_PREFIX) :])
                if app is None or app.cert_id != presented:
                    raise Refused("unknown_certificate", "unknown or revoked application certificate")
                return Principal("app", app.name, app.owner_id, app.fleet_wide)
            revocations = core.things.revocations
            device = await core.things.identify_device(cn, presented)
            if device is None:
                raise Refused("unknown_certificate", "unknown, disabled or revoked thing certificate")
            return Principal(
                "thing", device.thing_id, device.owner_id, device=device, revocations=revocations
            )
        if not session.username or session.password is None:
            raise Refused("no_credentials", "plain listener needs an application username and password")
        try:
            app = await core.accounts.app_login(
                session.username, session.password, source=session.remote_address or ""
            )
        except TooManyRequests as exc:
            # MQTT 3.1.1 has no "rate limited" code: CONNACK 5 (not authorized) like any refusal
            raise Refused("rate_limited", str(exc)) from exc
        if app is None:
            raise Refused("bad_password", "bad application username or password")
        return Principal("app", app.name, app.owner_id, app.fleet_wide)


async def standing(core: Any, session: Session) -> str:
    """ "valid", or why a registered session must go: "disabled" (its session is kept for when the
    thing is enabled again) or "gone" (deleted or re-issued: its session goes too)."""
    principal: Principal | None = session.attributes.get(PRINCIPAL)
    if principal is None or principal.device is None:
        return "valid"
    return await core.things.standing(principal.device, principal.revocations)


def _client_id_rule(principal: Principal) -> str:
    if principal.kind == "thing":
        return f"client id must be the thing id {principal.name!r} or '{principal.name}:<suffix>'"
    name = principal.name
    return f"client id must be 'app:{name}' or 'app:{name}:<suffix>' for application {name!r}"


async def permitted(core: Any, principal: Principal, action: Action, topic: str | None) -> bool:
    """The ACL: a thing uses only its own topics (and may not publish the cloud's); an application
    subscribes under things/ and rollouts/ and reaches only its owner's things and rollouts, unless
    it is fleet-wide."""
    if topic is None:
        return False
    if principal.kind == "thing":
        if action == Action.PUBLISH:
            return topics.thing_may_publish(principal.name, topic)
        if action == Action.SUBSCRIBE:
            return topics.thing_may_subscribe(principal.name, topic)
        return topics.thing_of(topic) == principal.name
    if action == Action.SUBSCRIBE:
        return topics.app_may_subscribe(topic)
    rollout_id = topics.rollout_of(topic) if action == Action.RECEIVE else None
    if rollout_id is not None:
        return principal.fleet_wide or await core.rollouts.owner_of(rollout_id) == principal.owner_id
    thing_id = topics.publish_target(topic) if action == Action.PUBLISH else topics.thing_of(topic)
    if thing_id is None:
        return False
    if principal.fleet_wide:
        return True
    owner = core.things.cached_owner(thing_id) or await core.things.owner_of(thing_id)
    return owner == principal.owner_id


class AclPlugin(BaseTopicPlugin):
    @dataclass
    class Config:
        core: Any = None
        counters: Any = None

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        principal: Principal | None = session.attributes.get(PRINCIPAL) if session else None
        if principal is None or action is None:
            return False
        allowed = await permitted(self.config.core, principal, action, topic)
        if not allowed:
            if action == Action.PUBLISH:
                self.config.counters.denied_publishes += 1
                log.info("publish by %s %s to %.200r denied", principal.kind, principal.name, topic)
            elif action == Action.SUBSCRIBE:
                self.config.counters.denied_subscribes += 1
        return allowed
