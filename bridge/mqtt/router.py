"""Topic -> core call: the device flows the bridge owns, for whichever transport delivered the
message. `Router.dispatch` takes a principal and a topic, nothing of a connection: the embedded
broker calls it through `ingest` (committed before its PUBACK, see BridgeHandler), the external
engine's consumer (bridge/mqtt/external/consumer.py) before its ack. The core re-publishes what
it committed, so an MQTT message and an HTTP one take the same path to subscribers. Anything else
is left to the broker's ACL."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson
from amqtt.plugins.base import BasePlugin
from amqtt.session import Session

from bridge.core import jsonvalue, topics
from bridge.core.errors import DomainError, Forbidden, Invalid, NotFound, Revoked
from bridge.core.identity import DeviceIdentity
from bridge.core.service import Core
from bridge.core.status import DeviceRef
from bridge.mqtt.auth import PRINCIPAL, Counters, Principal
from bridge.mqtt.handler import REVOKED, ClientRevoked
from bridge.store import StoreError

log = logging.getLogger(__name__)
# A device's request the core refuses is answered on its .../rejected topic with one of these codes.
REJECTED = ((Invalid, 400), (Forbidden, 403), (NotFound, 404))


class Router:
    def __init__(self, core: Core, counters: Counters) -> None:
        self.core = core
        self.counters = counters
        # flow (relative to things/{id}/) -> what a thing's message on it does
        self._flows: dict[str, Callable[[Principal, DeviceIdentity, bytes], Awaitable[None]]] = {
            topics.COLLECT: self._collect,
            topics.STATUS: self._status,
            topics.CONFIG_GET: self._config_get,
            topics.UPGRADE_CHECK: self._upgrade_check,
            topics.FIRMWARE_GET: self._firmware_get,
            topics.FIRMWARE_SWITCHED: self._firmware_switched,
            topics.VERSIONS: self._versions,
            topics.UPGRADE_RESULT: self._upgrade_result,
        }

    async def ingest(self, session: Session, topic: str, payload: bytes) -> bool:
        """The embedded broker's seam: the session's principal, and a revocation closes it."""
        principal: Principal | None = session.attributes.get(PRINCIPAL)
        if principal is None:
            return False
        if session.attributes.get(REVOKED):
            raise ClientRevoked(f"{principal.kind} {principal.name} was revoked")
        try:
            return await self.dispatch(principal, topic, payload)
        except Revoked as exc:  # deleted or disabled while this was in flight: nothing stored
            raise ClientRevoked(str(exc)) from exc

    async def dispatch(self, principal: Principal, topic: str, payload: bytes) -> bool:
        """Run the flow `topic` names for `principal`; False when the topic is none of the bridge's
        flows (the message is only routed to subscribers). Raises Revoked when the principal's
        identity no longer holds; any other refusal is answered or counted here."""
        try:
            if principal.kind == "thing":
                return await self._from_thing(principal, topic, payload)
            target = topics.publish_target(topic)
            if target is None:
                return False
            owner = None if principal.fleet_wide else principal.owner_id
            await self.core.messages.publish(target, owner, payload, transport="mqtt")
            return True
        except Revoked:  # the transport's to handle (close the connection, drop the delivery)
            raise
        except NotFound:
            self.counters.denied_publishes += 1
            log.info(
                "publish by %s %s to %.200r denied: not its owner's thing",
                principal.kind,
                principal.name,
                topic,
            )
        except DomainError as exc:  # too large, and so on: MQTT 3.1.1 has no negative PUBACK
            self.counters.dropped_messages += 1
            log.info("message from %s %s on %.200r dropped: %s", principal.kind, principal.name, topic, exc)
        return True

    async def _from_thing(self, thing: Principal, topic: str, payload: bytes) -> bool:
        flow = self._flows.get(topics.flow_of(thing.name, topic) or "")
        if flow is None:
            return False
        assert thing.device is not None
        await flow(thing, thing.device, payload)
        return True

    @property
    def thing_flows(self) -> tuple[str, ...]:
        """The flows (relative to things/{id}/) a thing's message runs here."""
        return tuple(self._flows)

    async def _collect(self, thing: Principal, device: DeviceIdentity, payload: bytes) -> None:
        await self.core.messages.collect(device, payload, transport="mqtt")

    async def _status(self, thing: Principal, device: DeviceIdentity, payload: bytes) -> None:
        try:
            thing_type = await self.core.things.type_of(thing.name)
        except NotFound as exc:
            raise Revoked(f"thing {thing.name} was deleted") from exc
        ref = DeviceRef(thing.name, thing.owner_id, thing_type, device.cert_id)
        try:
            report = _json_object(payload)
            answer = await self.core.status.set_status(ref, report.get("status"), report.get("info"), "mqtt")
        except Invalid as exc:
            await self._reply(
                thing.name, topics.STATUS_REJECTED, {"errorCode": 400, "errorMessage": str(exc)}
            )
        else:
            await self._reply(thing.name, topics.STATUS_ACCEPTED, {"config": answer})

    async def _config_get(self, thing: Principal, device: DeviceIdentity, payload: bytes) -> None:
        await self.core.status.resend_config(
            DeviceRef(thing.name, thing.owner_id, await self.core.things.type_of(thing.name))
        )

    async def _upgrade_check(self, thing: Principal, device: DeviceIdentity, payload: bytes) -> None:
        try:
            offer = await self.core.upgrades.check(device, _json_object(payload))
        except (Invalid, NotFound) as exc:
            await self._reject(thing.name, topics.UPGRADE_CHECK_REJECTED, exc)
        else:
            await self._reply(thing.name, topics.UPGRADE_CHECK_ACCEPTED, offer)

    async def _firmware_get(self, thing: Principal, device: DeviceIdentity, payload: bytes) -> None:
        try:
            offset, chunk = await self.core.firmware.chunk(device, _json_object(payload))
        except (Invalid, Forbidden, NotFound) as exc:
            await self._reject(thing.name, topics.FIRMWARE_GET_REJECTED, exc)
        else:  # the raw bytes, named by their offset: a device resumes from the last it stored
            await self.core.link.publish(topics.firmware_chunk(thing.name, offset), chunk)

    async def _firmware_switched(self, thing: Principal, device: DeviceIdentity, payload: bytes) -> None:
        try:
            switched = await self.core.firmware.switched(device, _json_object(payload))
        except (Invalid, Forbidden, NotFound) as exc:
            await self._reject(thing.name, topics.FIRMWARE_SWITCHED_REJECTED, exc)
        else:
            await self._reply(thing.name, topics.FIRMWARE_SWITCHED_ACCEPTED, switched)

    async def _versions(self, thing: Principal, device: DeviceIdentity, payload: bytes) -> None:
        await self.core.upgrades.report_versions(device, _json_object(payload), transport="mqtt")

    async def _upgrade_result(self, thing: Principal, device: DeviceIdentity, payload: bytes) -> None:
        await self.core.upgrades.report_results(device, _json_object(payload), transport="mqtt")

    async def _reject(self, thing_id: str, flow: str, exc: DomainError) -> None:
        code = next(code for kind, code in REJECTED if isinstance(exc, kind))
        await self._reply(thing_id, flow, {"errorCode": code, "errorMessage": str(exc)})

    async def _reply(self, thing_id: str, flow: str, body: dict[str, Any]) -> None:
        """A reply is a live message: through the link, like every message (see Core)."""
        await self.core.link.publish(topics.topic(thing_id, flow), orjson.dumps(body))


def _json_object(payload: bytes) -> dict[str, Any]:
    value = jsonvalue.loads(payload, "payload")
    if not isinstance(value, dict):
        raise Invalid("payload must be a JSON object")
    return value


class PresencePlugin(BasePlugin):
    """Connect and disconnect events -> the core's presence of things, for stock amqtt (the tests
    of its defects); HardenedBroker calls `presence_changed` itself, without a task per event."""

    @dataclass
    class Config:
        core: Any = None

    async def on_broker_client_connected(self, *, client_id: str, client_session: Session) -> None:
        presence_changed(self.config.core, client_session, True)

    async def on_broker_client_disconnected(self, *, client_id: str, client_session: Session) -> None:
        presence_changed(self.config.core, client_session, False)


def presence_changed(core: Core, session: Session, connected: bool) -> None:
    """A connection of `session` opened or ended: counted at once (the changes apply in the order
    they happened), the thing's new presence, if it changed, written in the background."""
    device = _device_of(session)
    if device is None:
        return
    if core.presence.connected(device) if connected else core.presence.disconnected(device):
        written = core.presence.change(device, "online" if connected else "offline")
        written.add_done_callback(partial(_unrecorded, device.thing_id))


def _unrecorded(thing_id: str, written: asyncio.Future[None]) -> None:
    exc = None if written.cancelled() else written.exception()
    if isinstance(exc, StoreError):  # Presence writes it again; the outage itself is logged once
        log.warning("presence of %s not recorded yet: %s", thing_id, exc)
    elif exc is not None:
        log.warning("presence of %s not recorded yet", thing_id, exc_info=exc)


def _device_of(session: Session) -> DeviceIdentity | None:
    principal: Principal | None = session.attributes.get(PRINCIPAL)
    return principal.device if principal is not None else None
