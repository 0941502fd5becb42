"""Operator side of the device twin, in the things-gateway style (envelope, access token), under
/dev/v1: a thing's state and desired configuration, fleet defaults per thingType, fleet status."""

from __future__ import annotations

from aiohttp import web

from bridge.core.errors import Forbidden, Invalid
from bridge.http.auth import CORE, require_user
from bridge.http.body import any_json_object
from bridge.http.envelope import envelope

routes = web.RouteTableDef()


async def _changes(request: web.Request) -> dict:
    """A JSON object of changes; the core validates names and types (null: back to inherited)."""
    body = await any_json_object(request, empty_ok=False)
    if not body:
        raise Invalid("nothing to change: give at least one field")
    return body


@routes.get("/things/{thing_id}/state")
async def thing_state(request: web.Request) -> web.Response:
    user = await require_user(request)
    return envelope(await request.app[CORE].status.state(user.id, request.match_info["thing_id"]))


@routes.patch("/things/{thing_id}/desired")
async def set_desired(request: web.Request) -> web.Response:
    user = await require_user(request)
    changes = await _changes(request)
    state = await request.app[CORE].status.set_desired(user.id, request.match_info["thing_id"], changes)
    return envelope(state, "Desired state updated")


@routes.get("/fleet")
async def fleet(request: web.Request) -> web.Response:
    user = await require_user(request)
    return envelope(await request.app[CORE].status.fleet(user.id, request.query.get("thingType") or None))


@routes.get("/fleet/defaults/{thing_type}")
async def get_defaults(request: web.Request) -> web.Response:
    user = await require_user(request)
    return envelope(await request.app[CORE].status.fleet_defaults(user.id, request.match_info["thing_type"]))


@routes.patch("/fleet/defaults/{thing_type}")
async def set_defaults(request: web.Request) -> web.Response:
    user = await require_user(request)
    changes = await _changes(request)
    result = await request.app[CORE].status.set_fleet_defaults(
        user.id, request.match_info["thing_type"], changes
    )
    return envelope(result, "Fleet defaults updated")


@routes.get("/broker/stats")
async def broker_stats(request: web.Request) -> web.Response:
    """Admin only: live connections and what the broker refused, denied or dropped."""
    user = await require_user(request)
    if not user.is_admin:
        raise Forbidden("broker statistics are for admins")
    return envelope(request.app[CORE].link.stats())
