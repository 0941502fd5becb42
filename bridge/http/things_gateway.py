"""The things-gateway dialect (docs/dialects.md), under /dev/v1."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from bridge.core import ids
from bridge.core.accounts import Subscription, SubscriptionPolicy, User
from bridge.core.bundle import thing_files, zip_bytes
from bridge.core.errors import Forbidden, Invalid, Revoked, Unauthorized
from bridge.core.messages import EGRESS, Message, Query
from bridge.core.things import NewThing, Thing
from bridge.http.auth import (
    CORE,
    basic_credentials,
    bearer,
    presents_thing_credential,
    require_thing,
    require_user,
)
from bridge.http.body import json_object
from bridge.http.envelope import envelope, json_response

routes = web.RouteTableDef()
MAX_QUERY_INT = 2**53  # beyond this SQLite's integers (and any real timestamp) are left behind
BASIC_CHALLENGE = 'Basic realm="thingbridge", charset="UTF-8"'


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


def render_message(message: Message) -> dict[str, Any]:
    return {
        "flmessagespk": message.id,
        "fltimestamp": int(message.ts),
        "datecreated": ids.iso(message.ts),
        "flthingspk": message.thing_id,
        "fluserspk": message.owner_id,
        "messagetype": message.type,
        # stored JSON was validated on the way in: embed it as is instead of parsing it again
        "message": orjson.Fragment(message.payload) if message.encoding == "json" else message.value,
        "encoding": message.encoding,
    }


# ---- auth and users -------------------------------------------------------------------------------
@routes.get("/token")
async def get_token(request: web.Request) -> web.Response:
    core = request.app[CORE]
    try:
        username, password = basic_credentials(request)
        user = await core.accounts.login(username, password, source=request.remote or "")
    except Unauthorized as exc:
        exc.challenge = BASIC_CHALLENGE
        raise
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
        type=body.get("thingType", "generic"),
        dist=body.get("thingDist", "mosquitto"),
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


# ---- messages ---------------------------------------------------------------------------------------
def _int_param(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise Invalid(f"{name} must be an integer (epoch seconds for startts/endts)") from None
    if abs(value) > MAX_QUERY_INT:
        raise Invalid(f"{name} is out of range")
    return value


def _query(request: web.Request) -> Query:
    return Query(
        start=_int_param(request, "startts"),
        end=_int_param(request, "endts"),
        type=request.query.get("messagetype") or None,
        after=request.query.get("after") or None,
        limit=_int_param(request, "limit"),
    ).check()


def _wait(request: web.Request) -> float | None:
    raw = request.query.get("wait")
    if raw is None or raw == "":
        return None
    try:
        return float(raw)
    except ValueError:
        raise Invalid("wait must be a number of seconds") from None


async def _body(request: web.Request) -> tuple[bytes, str | None]:
    """The raw message, and "text" when the Content-Type declares text. The document declares
    application/json for publish and collect yet says the body "can be JSON or free form text"
    (`FOO|BAR|This is a message.`): under any other type a body is JSON when it parses, else text
    (or base64 when it is not UTF-8), never refused for not being JSON."""
    payload = await request.read()
    if not payload:
        raise Invalid("the message body is empty")
    return payload, "text" if request.content_type.startswith("text/") else None


@routes.post("/things/{thing_id}/collect")
async def collect(request: web.Request) -> web.Response:
    thing_id = request.match_info["thing_id"]
    device = await require_thing(request, thing_id)
    payload, declared = await _body(request)
    message = await request.app[CORE].messages.collect(device, payload, transport="http", declared=declared)
    return envelope({"message": "Message Collected", "flthingspk": thing_id, "flmessagespk": message.id})


@routes.post("/things/{thing_id}/publish")
async def publish(request: web.Request) -> web.Response:
    user = await require_user(request)
    payload, declared = await _body(request)
    message = await request.app[CORE].messages.publish(
        request.match_info["thing_id"], user.id, payload, transport="http", declared=declared
    )
    return envelope({"flmessagespk": message.id, "flthingspk": message.thing_id}, "Message Published")


@routes.get("/things/{thing_id}/messages")
async def list_messages(request: web.Request) -> web.Response:
    """The owner reads the history; the thing itself (certificate or its JWT) reads its egress
    messages, optionally long-polling (`after=<flmessagespk>&wait=<s>`): how HTTP devices receive."""
    core = request.app[CORE]
    thing_id = request.match_info["thing_id"]
    query, wait = _query(request), _wait(request)
    if presents_thing_credential(request):
        revocations = core.things.revocations
        device = await require_thing(request, thing_id)
        if query.type not in (None, EGRESS):
            raise Forbidden("a thing may read only its egress messages")
        messages = await core.messages.wait_egress(thing_id, device.owner_id, query, wait or 0)
        if await core.things.standing(device, revocations) != "valid":
            raise Revoked("the thing was deleted or disabled while it waited")
    else:
        user = await require_user(request)
        if wait is None:
            messages = await core.messages.query(thing_id, user.id, query)
        elif query.type != EGRESS:
            raise Invalid("wait is only for messagetype=egress")
        else:
            await core.messages.query(thing_id, user.id, Query(limit=1))  # ownership check
            messages = await core.messages.wait_egress(thing_id, user.id, query, wait)
    return envelope([render_message(m) for m in messages])


@routes.delete("/things/{thing_id}/messages")
async def delete_messages(request: web.Request) -> web.Response:
    user = await require_user(request)
    extra = sorted({"after", "limit", "wait"} & set(request.query))
    if extra:
        raise Invalid(f"{', '.join(extra)}: not accepted by DELETE (select with startts, endts, messagetype)")
    deleted = await request.app[CORE].messages.delete(
        request.match_info["thing_id"], user.id, _query(request)
    )
    return envelope({"deleted": deleted}, "Successful delete")


@routes.get("/things/{thing_id}/archive")
async def archive(request: web.Request) -> web.Response:
    user = await require_user(request)
    thing_id = request.match_info["thing_id"]
    data = await request.app[CORE].messages.archive(thing_id, user.id, _query(request), render_message)
    return web.Response(
        body=data,
        content_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{thing_id}-messages.zip"'},
    )
