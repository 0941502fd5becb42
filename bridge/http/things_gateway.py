"""The things-gateway dialect (shared/specs/things-gateway.txt, catalog section 003), under /dev/v1."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from bridge.core import ids
from bridge.core.accounts import Subscription, SubscriptionPolicy, User
from bridge.core.bundle import thing_files, zip_bytes
from bridge.core.things import NewThing, Thing
from bridge.http.auth import CORE, basic_credentials, bearer, require_user
from bridge.http.body import json_object
from bridge.http.envelope import envelope, json_response

routes = web.RouteTableDef()


# ---- rendering: core records -> the document's field names ---------------------------------------
def render_user(user: User) -> dict[str, Any]:
    return {
        "fluserspk": user.id,
        "fltimestamp": int(user.created),
        "datecreated": ids.iso(user.created),
        "emailverified": user.email_verified,
        "username": user.username,
    }


def render_subscription(sub: Subscription) -> dict[str, Any]:
    return {
        "flsubscriptionspk": sub.id,
        "fltimestamp": int(sub.created),
        "datecreated": ids.iso(sub.created),
        "common_name": sub.common_name,
        "startts": sub.startts,
        "endts": sub.endts,
        "flstatus": sub.status,
        "fluserspk": sub.user_id,
        "product_id": sub.product_id,
        "plan_id": sub.plan_id,
        "plan_name": sub.plan_name,
    }


def render_policy(policy: SubscriptionPolicy) -> dict[str, Any]:
    return {
        "subscription": render_subscription(policy.subscription),
        "policy": {
            "Statement": [
                {
                    "Action": s.action,
                    "Effect": s.effect,
                    "Resource": s.resource,
                    "AllowedCount": s.allowed,
                    "ActualCount": s.actual,
                }
                for s in policy.statements
            ]
        },
    }


def render_thing(thing: Thing) -> dict[str, Any]:
    return {
        "flthingspk": thing.id,
        "fltimestamp": int(thing.created),
        "datecreated": ids.iso(thing.created),
        "certificateId": thing.cert_id,
        "fluserspk": thing.owner_id,
        "certificatePem": thing.cert_pem,
        "keyPairPrivate": thing.private_key_pem,
        "keyPairPublic": thing.public_key_pem,
        "testStatus": thing.test_status,
        "thingDist": thing.dist,
        "thingName": thing.name,
        "thingType": thing.type,
        "keyType": thing.key_type,
        "enabled": thing.enabled,
    }


# ---- auth and users -------------------------------------------------------------------------------
@routes.get("/token")
async def get_token(request: web.Request) -> web.Response:
    core = request.app[CORE]
    username, password = basic_credentials(request)
    user = await core.accounts.login(username, password)
    return json_response({"accessToken": await core.accounts.issue_token(user)})


@routes.delete("/token")
async def revoke_token(request: web.Request) -> web.Response:
    await require_user(request)
    await request.app[CORE].accounts.revoke_token(bearer(request))
    return envelope(None, "Token revoked")


@routes.get("/users/{sub}")
async def get_user(request: web.Request) -> web.Response:
    user = await require_user(request)
    found = await request.app[CORE].accounts.get_user(user, request.match_info["sub"])
    return envelope(render_user(found))


# ---- subscriptions --------------------------------------------------------------------------------
@routes.get("/subscriptions")
async def list_subscriptions(request: web.Request) -> web.Response:
    user = await require_user(request)
    subs = await request.app[CORE].accounts.subscriptions(user)
    return envelope([render_subscription(s) for s in subs])


@routes.get("/subscriptions/active")
async def active_subscription(request: web.Request) -> web.Response:
    user = await require_user(request)
    return envelope(render_policy(await request.app[CORE].accounts.active_policy(user)))


@routes.get("/subscriptions/{subscription_id}")
async def get_subscription(request: web.Request) -> web.Response:
    user = await require_user(request)
    sub = await request.app[CORE].accounts.subscription(user, request.match_info["subscription_id"])
    return envelope(render_subscription(sub))


# ---- things ---------------------------------------------------------------------------------------
CREATE_FIELDS = {
    "flthingspk": str,
    "thingName": str,
    "thingType": str,
    "thingDist": str,
    "keyType": str,
    "csr": str,
}


@routes.get("/things")
async def list_things(request: web.Request) -> web.Response:
    user = await require_user(request)
    return envelope([render_thing(t) for t in await request.app[CORE].things.list(user)])


@routes.post("/things")
async def create_thing(request: web.Request) -> web.Response:
    user = await require_user(request)
    body = await json_object(request, CREATE_FIELDS)
    req = NewThing(
        id=body.get("flthingspk"),
        name=body.get("thingName"),
        type=body.get("thingType") or "generic",
        dist=body.get("thingDist") or "mosquitto",
        key_type=body.get("keyType"),
        csr=body.get("csr"),
    )
    thing = await request.app[CORE].things.create(user, req)
    return envelope(render_thing(thing), "Successful create")


@routes.get("/things/{thing_id}")
async def get_thing(request: web.Request) -> web.Response:
    user = await require_user(request)
    return envelope(render_thing(await request.app[CORE].things.get(user, request.match_info["thing_id"])))


@routes.patch("/things/{thing_id}")
async def update_thing(request: web.Request) -> web.Response:
    """Extension: `{"enabled": false}` suspends a thing (its sessions close at once), true resumes it."""
    user = await require_user(request)
    body = await json_object(request, {"enabled": bool}, empty_ok=False)
    if "enabled" not in body:
        return envelope(
            render_thing(await request.app[CORE].things.get(user, request.match_info["thing_id"]))
        )
    thing = await request.app[CORE].things.set_enabled(user, request.match_info["thing_id"], body["enabled"])
    return envelope(render_thing(thing), "Successful update")


@routes.delete("/things/{thing_id}")
async def delete_thing(request: web.Request) -> web.Response:
    user = await require_user(request)
    await request.app[CORE].things.delete(user, request.match_info["thing_id"])
    return envelope(None, "Successful delete")


@routes.get("/things/{thing_id}/dist")
async def thing_dist(request: web.Request) -> web.Response:
    user = await require_user(request)
    core = request.app[CORE]
    thing = await core.things.get(user, request.match_info["thing_id"])
    data = zip_bytes(thing_files(thing, core.ca.ca_pem, core.endpoints), f"thing-{thing.id}")
    return web.Response(
        body=data,
        content_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="thing-{thing.id}.zip"'},
    )


def make_app() -> web.Application:
    app = web.Application()
    app.add_routes(routes)
    return app
