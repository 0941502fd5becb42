"""Credentials of the things-gateway dialect: Basic for GET /token, the user token (common) for
most operations, and verifyThing, a thing's own credential, for collect and its egress messages:
its certificate, its JWT, or the CIK a provisioned device got from activation (X-Exosite-CIK)."""

from __future__ import annotations

from dataclasses import dataclass

import jwt
from aiohttp import web

from bridge.core.accounts import User
from bridge.core.errors import Unauthorized
from bridge.core.identity import DeviceIdentity
from bridge.core.things import TOKEN_ISSUER_PREFIX
from bridge.http.common.auth import (
    CORE,
    DEVICE_CIK,
    USER,
    Auth,
    basic_credentials,
    bearer,
    cik,
    device_credential,
    peer_certificate,
    require_user,
)

BASIC_CHALLENGE = 'Basic realm="thingbridge", charset="UTF-8"'


async def login(request: web.Request) -> User:
    """Basic credentials, checked by the core (rate limits included)."""
    try:
        username, password = basic_credentials(request)
        return await request.app[CORE].accounts.login(username, password, source=request.remote or "")
    except Unauthorized as exc:
        exc.challenge = BASIC_CHALLENGE  # type: ignore[attr-defined]
        raise


async def require_thing(request: web.Request) -> DeviceIdentity:
    """verifyThing: the client certificate of the thing in the path (HTTPS), else the CIK of a
    provisioned device, else a JWT signed with its own key."""
    thing_id = request.match_info["thing_id"]
    identity = await device_credential(request)
    if identity is None:
        return await request.app[CORE].things.verify_token(bearer(request), thing_id)
    if identity.thing_id != thing_id:
        raise Unauthorized("the credential belongs to another thing")
    return identity


@dataclass(frozen=True)
class ThingCaller:
    identity: DeviceIdentity
    # The registry's revocation counter before the identity was checked: a delete or disable after
    # that moment is noticed (Things.standing) even if the check itself found the thing valid.
    revocations: int


def presents_thing_credential(request: web.Request) -> bool:
    """A client certificate (HTTPS), a CIK, or a bearer JWT that names a thing rather than a user."""
    if peer_certificate(request)[1] or cik(request) is not None:
        return True
    try:
        token = bearer(request)
        header = jwt.get_unverified_header(token)
        iss = jwt.decode(token, options={"verify_signature": False}).get("iss")
    except (Unauthorized, jwt.InvalidTokenError):
        return False
    return "kid" in header or (isinstance(iss, str) and iss.startswith(TOKEN_ISSUER_PREFIX))


async def user_or_thing(request: web.Request) -> User | ThingCaller:
    if presents_thing_credential(request):
        revocations = request.app[CORE].things.revocations
        return ThingCaller(await require_thing(request), revocations)
    return await require_user(request)


BASIC = Auth(
    login,
    ({"basicAuth": []},),
    {
        "basicAuth": {
            "type": "http",
            "scheme": "basic",
            "description": "Username and password; only for GET .../token.",
        }
    },
)
THING = Auth(
    require_thing,
    ({"thingJwt": []}, {"deviceCik": []}),
    {
        "thingJwt": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "verifyThing: a JWT signed with the thing's own private key (RS256 for RSA, "
            "ES256 for EC keys), header `kid` = thing id and/or claim `iss` = `urn:thing:<id>`, `exp` "
            "required, `nbf` honoured, lifetime at most 24 h, naming the thing in the path. On the HTTPS "
            "port the thing's client certificate (issued by the bridge CA) is accepted instead of the "
            "token.",
        },
        **DEVICE_CIK,
    },
)
USER_OR_THING = Auth(user_or_thing, USER.security + THING.security, USER.schemes | THING.schemes)
