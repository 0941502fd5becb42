"""Credentials of the things-gateway dialect: Basic for GET /token, the user token (common) for
most operations, and verifyThing, a thing's own credential, for collect and its egress messages:
its certificate, its JWT, or the CIK a provisioned device got from activation (X-Exosite-CIK)."""

from __future__ import annotations

from dataclasses import dataclass

import jwt
from aiohttp import web

from bridge import pki
from bridge.core.accounts import User
from bridge.core.errors import Unauthorized
from bridge.core.identity import DeviceIdentity
from bridge.core.things import TOKEN_ISSUER_PREFIX
from bridge.http.common.auth import (
    CORE,
    USER,
    Auth,
    basic_credentials,
    bearer,
    peer_certificate,
    require_user,
)

BASIC_CHALLENGE = 'Basic realm="thingbridge", charset="UTF-8"'
CIK_HEADER = "X-Exosite-CIK"


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
    core = request.app[CORE]
    cik = request.headers.get(CIK_HEADER)
    if cik is not None:
        identity = await core.provisioning.serials.identify_cik(cik.strip())
        if identity.thing_id != thing_id:
            raise Unauthorized("the CIK belongs to another thing")
        return identity
    cn, der = peer_certificate(request)
    if der:
        identity = await core.things.identify_device(cn or "", pki.der_cert_id(der))
        if identity is None:
            raise Unauthorized("client certificate is not the current certificate of a thing")
        if identity.thing_id != thing_id:
            raise Unauthorized("client certificate belongs to another thing")
        return identity
    return await core.things.verify_token(bearer(request), thing_id)


@dataclass(frozen=True)
class ThingCaller:
    identity: DeviceIdentity
    # The registry's revocation counter before the identity was checked: a delete or disable after
    # that moment is noticed (Things.standing) even if the check itself found the thing valid.
    revocations: int


def presents_thing_credential(request: web.Request) -> bool:
    """A client certificate (HTTPS), a CIK, or a bearer JWT that names a thing rather than a user."""
    if peer_certificate(request)[1] or CIK_HEADER in request.headers:
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
        "deviceCik": {
            "type": "apiKey",
            "in": "header",
            "name": CIK_HEADER,
            "description": "A provisioned device's CIK, from POST /provision/activate (40 hex characters); "
            "it must belong to the thing in the path, and stops working when the vendor regenerates it, "
            "disables or removes the serial number.",
        },
    },
)
USER_OR_THING = Auth(user_or_thing, USER.security + THING.security, USER.schemes | THING.schemes)
