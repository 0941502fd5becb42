"""Who an MQTT client is and what it may do, for any MQTT engine: the embedded broker's plugins
(bridge/mqtt/auth.py) and the external engine's HTTP auth backend (bridge/mqtt/external/auth.py)
both call these, so a rule exists once. Nothing here knows a transport."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from bridge.core import topics
from bridge.core.errors import TooManyRequests
from bridge.core.identity import DeviceIdentity

APP_PREFIX = "app:"


class Action(enum.StrEnum):
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"
    RECEIVE = "receive"  # a message about to be delivered to a subscriber


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

    def client_id_rule(self) -> str:
        if self.kind == "thing":
            return f"client id must be the thing id {self.name!r} or '{self.name}:<suffix>'"
        return (
            f"client id must be 'app:{self.name}' or 'app:{self.name}:<suffix>' for application {self.name!r}"
        )


class Refused(Exception):
    """A refused login: `reason` is a short stable key for the statistics, the message says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


async def thing_by_certificate(core: Any, thing_id: str, cert_id: str) -> Principal:
    """The thing a verified client certificate names (CN = thing id), while it exists, is enabled
    and `cert_id` is its current certificate."""
    revocations = core.things.revocations
    return _thing(await core.things.identify_device(thing_id, cert_id), revocations)


async def thing_by_subject(core: Any, thing_id: str, serial: str | None) -> Principal:
    """The same for a certificate an MQTT engine verified and reports by its subject alone (CN and
    serialNumber): see Things.device_by_subject."""
    revocations = core.things.revocations
    return _thing(await core.things.device_by_subject(thing_id, serial), revocations)


def _thing(device: DeviceIdentity | None, revocations: int) -> Principal:
    if device is None:
        raise Refused("unknown_certificate", "unknown, disabled or revoked thing certificate")
    return Principal("thing", device.thing_id, device.owner_id, device=device, revocations=revocations)


async def app_by_certificate(core: Any, name: str, cert_id: str) -> Principal:
    app = await core.accounts.app(name)
    if app is None or app.cert_id != cert_id:
        raise Refused("unknown_certificate", "unknown or revoked application certificate")
    return Principal("app", app.name, app.owner_id, app.fleet_wide)


async def app_by_password(
    core: Any, username: str | None, password: str | None, source: str | None
) -> Principal:
    """`source` None: the login is relayed by an MQTT engine, which does not say from where."""
    if not username or password is None:
        raise Refused("no_credentials", "an application needs a username and password")
    try:
        app = await core.accounts.app_login(username, password, source=source)
    except TooManyRequests as exc:
        # MQTT 3.1.1 has no "rate limited" code: CONNACK 5 (not authorized) like any refusal
        raise Refused("rate_limited", str(exc)) from exc
    if app is None:
        raise Refused("bad_password", "bad application username or password")
    return Principal("app", app.name, app.owner_id, app.fleet_wide)


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


async def permitted_filter(core: Any, principal: Principal, topic_filter: str) -> bool:
    """A subscription for an engine that checks subscriptions but not each delivery (RabbitMQ):
    allowed only when everything it can match would pass RECEIVE too, so an application's filter
    must name one of its owner's things or rollouts (no wildcard there) unless it is fleet-wide."""
    if not await permitted(core, principal, Action.SUBSCRIBE, topic_filter):
        return False
    return principal.fleet_wide or await permitted(core, principal, Action.RECEIVE, topic_filter)
