"""Our extensions to the things-gateway dialect for operators (same envelope, same access token):
a thing's device twin (state, desired configuration), fleet defaults per thingType, the fleet's
state, and the broker's counters for admins."""

from __future__ import annotations

from typing import Any

import msgspec

from bridge.core.accounts import User
from bridge.core.errors import Invalid
from bridge.http.common.auth import ADMIN, USER
from bridge.http.common.models import present
from bridge.http.common.operation import Call, Operations
from bridge.http.things_gateway import models
from bridge.http.things_gateway.models import ThingPath, ThingTypePath

api = Operations()


def _changes(body: msgspec.Struct) -> dict[str, Any]:
    """The fields a PATCH names (null: back to inherited); the core checks them again."""
    changes = present(body)
    if not changes:
        raise Invalid("nothing to change: give at least one field")
    return changes


@api.get(
    "/things/{thing_id}/state",
    "The thing's device twin",
    tag="device twin",
    auth=USER,
    path_model=ThingPath,
    answer=models.ThingTwin,
    errors=(401, 404),
)
async def thing_state(call: Call[User, ThingPath, None, None]) -> models.ThingTwin:
    core, owner, thing_id = call.core, call.principal.id, call.path.thing_id
    state = await core.status.state(owner, thing_id)
    versions = await core.upgrades.reported_versions(owner, thing_id)
    return msgspec.convert({**state, "currentVersionNumbers": versions}, models.ThingTwin)


@api.patch(
    "/things/{thing_id}/desired",
    "Set or clear the thing's own desired values and regId",
    tag="device twin",
    auth=USER,
    path_model=ThingPath,
    body=models.ThingChanges,
    body_required=True,
    body_description="The changes.",
    answer=models.ThingState,
    message="Desired state updated",
    errors=(400, 401, 404, 409, 413),
    description="The new config document is published retained on MQTT things/{id}/config.",
)
async def set_desired(call: Call[User, ThingPath, None, Any]) -> models.ThingState:
    state = await call.core.status.set_desired(call.principal.id, call.path.thing_id, _changes(call.body))
    return msgspec.convert(state, models.ThingState)


@api.get(
    "/fleet",
    "The device twin of every thing of the account",
    tag="device twin",
    auth=USER,
    query=models.FleetQuery,
    answer=list[models.ThingState],
    errors=(401,),
)
async def fleet(call: Call[User, None, models.FleetQuery, None]) -> list[models.ThingState]:
    states = await call.core.status.fleet(call.principal.id, call.query.thingType)
    return msgspec.convert(states, list[models.ThingState])


@api.get(
    "/fleet/defaults/{thing_type}",
    "Defaults the account's things of one thingType inherit",
    tag="device twin",
    auth=USER,
    path_model=ThingTypePath,
    answer=models.FleetDefaults,
    errors=(401,),
    description="A thingType nobody set answers empty defaults.",
)
async def get_fleet_defaults(call: Call[User, ThingTypePath, None, None]) -> models.FleetDefaults:
    defaults = await call.core.status.fleet_defaults(call.principal.id, call.path.thing_type)
    return msgspec.convert(defaults, models.FleetDefaults)


@api.patch(
    "/fleet/defaults/{thing_type}",
    "Set or clear the defaults of one thingType",
    tag="device twin",
    auth=USER,
    path_model=ThingTypePath,
    body=models.FleetChanges,
    body_required=True,
    body_description="The changes.",
    answer=models.FleetDefaults,
    message="Fleet defaults updated",
    errors=(400, 401, 413),
    description="Every thing of that type without its own value gets the new config document at once; "
    "a thingType that is not a valid name is 400.",
)
async def set_fleet_defaults(call: Call[User, ThingTypePath, None, Any]) -> models.FleetDefaults:
    defaults = await call.core.status.set_fleet_defaults(
        call.principal.id, call.path.thing_type, _changes(call.body)
    )
    return msgspec.convert(defaults, models.FleetDefaults)


@api.get(
    "/broker/stats",
    "Broker statistics (admins only)",
    tag="operations",
    auth=ADMIN,
    answer=models.BrokerStats,
    errors=(401, 403),
)
async def broker_stats(call: Call[User, None, None, None]) -> models.BrokerStats:
    return msgspec.convert({**call.core.link.stats(), **call.core.retention.stats()}, models.BrokerStats)
