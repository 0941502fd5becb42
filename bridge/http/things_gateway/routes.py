"""The things-gateway document's operations (docs/dialects.md): token, users, subscriptions,
things, messages, and our extensions to them (DELETE /token, PATCH /things/{id}, long-poll)."""

from __future__ import annotations

import asyncio
import io
import zipfile

import msgspec
from aiohttp import web

from bridge.core.accounts import User
from bridge.core.bundle import thing_files, zip_bytes
from bridge.core.errors import Forbidden, Invalid, Revoked
from bridge.core.identity import DeviceIdentity
from bridge.core.messages import EGRESS, Query
from bridge.core.messages import Message as StoredMessage
from bridge.http.common.auth import USER, bearer
from bridge.http.common.operation import Call, Media, Operations, RawBody
from bridge.http.things_gateway import models
from bridge.http.things_gateway.auth import BASIC, THING, USER_OR_THING, ThingCaller
from bridge.http.things_gateway.errors import QUOTA
from bridge.http.things_gateway.models import Page, Selection, ThingPath

api = Operations()


def _zip(description: str) -> Media:
    return Media(
        "application/zip",
        description,
        headers={
            "Content-Disposition": {
                "description": 'attachment; filename="..."',
                "required": True,
                "schema": {"type": "string", "pattern": "^attachment; filename="},
            }
        },
    )


def _attachment(data: bytes, filename: str) -> web.Response:
    return web.Response(
        body=data,
        content_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


# ---- auth and users -------------------------------------------------------------------------------
@api.get(
    "/token",
    "Log in: an access token for Basic credentials",
    tag="auth",
    auth=BASIC,
    answer=models.AccessToken,
    wrap=False,
    errors=(401, 429),
    description="The token is a JWT valid for accounts.token_ttl seconds unless revoked.",
)
async def get_token(call: Call[User, None, None, None]) -> models.AccessToken:
    return models.AccessToken(await call.core.accounts.issue_token(call.principal))


@api.delete(
    "/token",
    "Revoke the presented access token (extension)",
    tag="auth",
    auth=USER,
    message="Token revoked",
    errors=(401,),
)
async def revoke_token(call: Call[User, None, None, None]) -> None:
    await call.core.accounts.revoke_token(bearer(call.request))


@api.get(
    "/users/{sub}",
    "The caller's own user record",
    tag="users",
    auth=USER,
    path_model=models.UserPath,
    answer=models.User,
    errors=(401, 403),
    description="Another user's id answers 403 (whether or not it exists).",
)
async def get_user(call: Call[User, models.UserPath, None, None]) -> models.User:
    return models.user(await call.core.accounts.get_user(call.principal, call.path.sub))


# ---- subscriptions --------------------------------------------------------------------------------
@api.get(
    "/subscriptions",
    "All subscriptions of the account",
    tag="subscriptions",
    auth=USER,
    answer=list[models.Subscription],
    errors=(401,),
)
async def list_subscriptions(call: Call[User, None, None, None]) -> list[models.Subscription]:
    return [models.subscription(s) for s in await call.core.accounts.subscriptions(call.principal)]


@api.get(
    "/subscriptions/active",
    "The active subscription and its policy",
    tag="subscriptions",
    auth=USER,
    answer=models.SubscriptionPolicy,
    errors=(401,),
    description="The free plan when none is active; the createThing statement counts things.",
)
async def active_subscription(call: Call[User, None, None, None]) -> models.SubscriptionPolicy:
    return models.subscription_policy(await call.core.accounts.active_policy(call.principal))


@api.get(
    "/subscriptions/{subscription_id}",
    "One subscription of the account",
    tag="subscriptions",
    auth=USER,
    path_model=models.SubscriptionPath,
    answer=models.Subscription,
    errors=(401, 404),
)
async def get_subscription(call: Call[User, models.SubscriptionPath, None, None]) -> models.Subscription:
    sub = await call.core.accounts.subscription(call.principal, call.path.subscription_id)
    return models.subscription(sub)


# ---- things ---------------------------------------------------------------------------------------
@api.get(
    "/things", "All things of the account", tag="things", auth=USER, answer=list[models.Thing], errors=(401,)
)
async def list_things(call: Call[User, None, None, None]) -> list[models.Thing]:
    return [models.thing(t) for t in await call.core.things.list(call.principal)]


@api.post(
    "/things",
    "Create a thing: key pair (or CSR), certificate from the bridge CA",
    tag="things",
    auth=USER,
    body=models.CreateThingRequest,
    body_description="The new thing; empty body: all defaults.",
    answer=models.Thing,
    message="Successful create",
    errors=(400, 401, QUOTA, 409, 413),
    description="409 when the id exists or is another thing's regId.",
)
async def create_thing(call: Call[User, None, None, models.CreateThingRequest]) -> models.Thing:
    return models.thing(await call.core.things.create(call.principal, call.body.core()))


@api.get(
    "/things/{thing_id}",
    "One thing",
    tag="things",
    auth=USER,
    path_model=ThingPath,
    answer=models.Thing,
    errors=(401, 404),
)
async def get_thing(call: Call[User, ThingPath, None, None]) -> models.Thing:
    return models.thing(await call.core.things.get(call.principal, call.path.thing_id))


@api.patch(
    "/things/{thing_id}",
    "Suspend or resume a thing (extension)",
    tag="things",
    auth=USER,
    path_model=ThingPath,
    body=models.UpdateThingRequest,
    body_required=True,
    body_description='{"enabled": false} suspends, true resumes.',
    answer=models.Thing,
    message="Successful update",
    errors=(400, 401, 404, 413),
)
async def update_thing(call: Call[User, ThingPath, None, models.UpdateThingRequest]) -> models.Thing:
    """`{"enabled": false}` suspends a thing (its sessions close at once), true resumes it."""
    things, thing_id = call.core.things, call.path.thing_id
    if call.body.enabled is None:
        return models.thing(await things.get(call.principal, thing_id))
    return models.thing(await things.set_enabled(call.principal, thing_id, call.body.enabled))


@api.delete(
    "/things/{thing_id}",
    "Delete a thing: revoke its certificate, close its sessions, delete its messages",
    tag="things",
    auth=USER,
    path_model=ThingPath,
    message="Successful delete",
    errors=(401, 404),
)
async def delete_thing(call: Call[User, ThingPath, None, None]) -> None:
    await call.core.things.delete(call.principal, call.path.thing_id)


@api.get(
    "/things/{thing_id}/dist",
    "The thing's bundle: certificate, keys, CA, thing.json, README.txt",
    tag="things",
    auth=USER,
    path_model=ThingPath,
    answer=_zip("A zip archive (raw bytes)."),
    errors=(401, 404),
)
async def thing_dist(call: Call[User, ThingPath, None, None]) -> web.Response:
    core = call.core
    thing = await core.things.get(call.principal, call.path.thing_id)
    data = zip_bytes(thing_files(thing, core.ca.ca_pem, core.endpoints), f"thing-{thing.id}")
    return _attachment(data, f"thing-{thing.id}.zip")


# ---- messages ---------------------------------------------------------------------------------------
MESSAGE_BODY = RawBody(
    "The message: JSON with Content-Type application/json (must parse), text with text/* (must be "
    "UTF-8); any other type is stored as JSON when it parses, else text when UTF-8, else base64. "
    "Empty: 400.",
    {
        "application/json": {"description": "any JSON value"},
        "text/plain": {"type": "string"},
        "application/octet-stream": {"type": "string", "format": "binary"},
    },
)


def _message(call: Call[object, ThingPath, None, bytes]) -> tuple[bytes, str | None]:
    """The raw message, and "text" when the Content-Type declares text. The document declares
    application/json for publish and collect yet says the body "can be JSON or free form text"
    (`FOO|BAR|This is a message.`): under any other type a body is JSON when it parses, else text
    (or base64 when it is not UTF-8), never refused for not being JSON."""
    if not call.body:
        raise Invalid("the message body is empty")
    return call.body, "text" if call.request.content_type.startswith("text/") else None


@api.post(
    "/things/{thing_id}/collect",
    "A thing sends a message (ingress)",
    tag="messages",
    auth=THING,
    path_model=ThingPath,
    body=MESSAGE_BODY,
    answer=models.CollectResult,
    errors=(400, 401, 404, 413),
    description="verifyThing: the thing's JWT (or client certificate on HTTPS). 404 when the token names "
    "a thing that does not exist.",
)
async def collect(call: Call[DeviceIdentity, ThingPath, None, bytes]) -> models.CollectResult:
    payload, declared = _message(call)
    message = await call.core.messages.collect(call.principal, payload, transport="http", declared=declared)
    return models.CollectResult("Message Collected", call.path.thing_id, message.id)


@api.post(
    "/things/{thing_id}/publish",
    "The owner sends a message to the thing (egress)",
    tag="messages",
    auth=USER,
    path_model=ThingPath,
    body=MESSAGE_BODY,
    answer=models.PublishResult,
    message="Message Published",
    errors=(400, 401, 404, 413),
    description="Delivered on MQTT things/{id}/publish and to HTTP long-polls of the thing.",
)
async def publish(call: Call[User, ThingPath, None, bytes]) -> models.PublishResult:
    payload, declared = _message(call)
    message = await call.core.messages.publish(
        call.path.thing_id, call.principal.id, payload, transport="http", declared=declared
    )
    return models.PublishResult(message.id, message.thing_id)


@api.get(
    "/things/{thing_id}/messages",
    "Message history; the thing's own long-poll for egress messages",
    tag="messages",
    auth=USER_OR_THING,
    path_model=ThingPath,
    query=models.History,
    answer=list[models.Message],
    errors=(400, 401, 403, 404),
    description="The owner reads every message type; wait needs messagetype=egress (400 otherwise). The "
    "thing itself (its JWT or client certificate) reads only its egress messages (403 for other types) "
    "and may long-poll with after and wait: how an HTTP-only device receives.",
)
async def list_messages(
    call: Call[User | ThingCaller, ThingPath, models.History, None],
) -> list[models.Message]:
    """The owner reads the history; the thing itself reads its egress messages, optionally
    long-polling (`after=<flmessagespk>&wait=<s>`): how HTTP devices receive."""
    core, thing_id, query, wait = call.core, call.path.thing_id, call.query.core(), call.query.wait
    caller = call.principal
    if isinstance(caller, ThingCaller):
        if query.type not in (None, EGRESS):
            raise Forbidden("a thing may read only its egress messages")
        found = await core.messages.wait_egress(thing_id, caller.identity.owner_id, query, wait or 0)
        if await core.things.standing(caller.identity, caller.revocations) != "valid":
            raise Revoked("the thing was deleted or disabled while it waited")
    elif wait is None:
        found = await core.messages.query(thing_id, caller.id, query)
    elif query.type != EGRESS:
        raise Invalid("wait is only for messagetype=egress")
    else:
        await core.messages.query(thing_id, caller.id, Query(limit=1))  # ownership check
        found = await core.messages.wait_egress(thing_id, caller.id, query, wait)
    return [models.message(m) for m in found]


@api.delete(
    "/things/{thing_id}/messages",
    "Delete the selected messages (no selection: all)",
    tag="messages",
    auth=USER,
    path_model=ThingPath,
    query=Selection,
    answer=models.DeletedMessages,
    message="Successful delete",
    errors=(400, 401, 404),
    description="after, limit and wait are rejected (400).",
)
async def delete_messages(call: Call[User, ThingPath, Selection, None]) -> models.DeletedMessages:
    extra = sorted({"after", "limit", "wait"} & set(call.request.query))
    if extra:
        raise Invalid(f"{', '.join(extra)}: not accepted by DELETE (select with startts, endts, messagetype)")
    deleted = await call.core.messages.delete(call.path.thing_id, call.principal.id, call.query.core())
    return models.DeletedMessages(deleted)


@api.get(
    "/things/{thing_id}/archive",
    "The selected messages as a zip holding one JSON file",
    tag="messages",
    auth=USER,
    path_model=ThingPath,
    query=Page,
    answer=_zip("A zip archive (raw bytes) with <thing_id>-messages.json."),
    errors=(400, 401, 404),
)
async def archive_messages(call: Call[User, ThingPath, Page, None]) -> web.Response:
    thing_id = call.path.thing_id
    found = await call.core.messages.query(thing_id, call.principal.id, call.query.core())
    # rendering and deflating thousands of records would hold the event loop: a thread does it
    data = await asyncio.to_thread(_pack, thing_id, found)
    return _attachment(data, f"{thing_id}-messages.zip")


def _pack(thing_id: str, found: list[StoredMessage]) -> bytes:
    """A zip of one JSON file: the records as the history shows them."""
    records = msgspec.json.format(msgspec.json.encode([models.message(m) for m in found]), indent=2)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr(f"{thing_id}-messages.json", records)
    return buf.getvalue()
