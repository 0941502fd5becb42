"""Credentials of the things-gateway dialect: Basic for /token, the access token everywhere else."""

from __future__ import annotations

import base64
import binascii

import jwt
from aiohttp import web

from bridge import pki
from bridge.core.accounts import User
from bridge.core.errors import Unauthorized
from bridge.core.service import Core
from bridge.core.things import TOKEN_ISSUER_PREFIX, DeviceIdentity

CORE = web.AppKey("core", Core)


def bearer(request: web.Request) -> str:
    """`Authorization: <token>` (the document's custom authorizer) or `Authorization: Bearer <token>`."""
    header = request.headers.get("Authorization", "").strip()
    if not header:
        raise Unauthorized("missing Authorization header")
    scheme, _, rest = header.partition(" ")
    token = rest.strip() if scheme.lower() == "bearer" else header
    if not token or " " in token:
        raise Unauthorized("malformed Authorization header")
    return token


async def require_user(request: web.Request) -> User:
    return await request.app[CORE].accounts.authenticate(bearer(request))


def basic_credentials(request: web.Request) -> tuple[str, str]:
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic" or not encoded:
        raise Unauthorized("Basic credentials required")
    try:
        username, sep, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise Unauthorized("malformed Basic credentials") from exc
    if not sep:
        raise Unauthorized("malformed Basic credentials")
    return username, password


def _peer_certificate(request: web.Request) -> tuple[str | None, bytes | None]:
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    if ssl_object is None:
        return None, None
    return pki.peer_common_name(ssl_object.getpeercert()), ssl_object.getpeercert(binary_form=True)


def presents_thing_credential(request: web.Request) -> bool:
    """A client certificate (HTTPS), or a bearer JWT that names a thing rather than a user."""
    if _peer_certificate(request)[1]:
        return True
    try:
        token = bearer(request)
        header = jwt.get_unverified_header(token)
        iss = jwt.decode(token, options={"verify_signature": False}).get("iss")
    except (Unauthorized, jwt.InvalidTokenError):
        return False
    return "kid" in header or (isinstance(iss, str) and iss.startswith(TOKEN_ISSUER_PREFIX))


async def require_thing(request: web.Request, thing_id: str) -> DeviceIdentity:
    """verifyThing: the thing's client certificate on HTTPS, else a JWT signed with its key."""
    core = request.app[CORE]
    cn, der = _peer_certificate(request)
    if der:
        identity = await core.things.identify_device(cn or "", pki.der_cert_id(der))
        if identity is None:
            raise Unauthorized("client certificate is not the current certificate of a thing")
        if identity.thing_id != thing_id:
            raise Unauthorized("client certificate belongs to another thing")
        return identity
    return await core.things.verify_token(bearer(request), thing_id)
