"""Credentials: how an operation says who may call it (an Auth: its OpenAPI security schemes and the
check that runs before the handler), the header parsing every dialect shares, the user token
(the things-gateway's GET .../token), which operator operations of any dialect accept, and the
device credentials every dialect's device operations accept beside their own: the thing's client
certificate on HTTPS and a provisioned device's CIK."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from bridge import pki
from bridge.core.accounts import User
from bridge.core.errors import Forbidden, Unauthorized
from bridge.core.identity import DeviceIdentity
from bridge.core.service import Core
from bridge.http.common.models import Schema

CORE = web.AppKey("core", Core)
CIK_HEADER = "X-Exosite-CIK"


@dataclass(frozen=True)
class Auth:
    """Who may call an operation. `resolve` checks the request's credential and returns the
    principal the handler receives (Call.principal), or raises Unauthorized / Forbidden;
    `security` lists the alternatives OpenAPI shows, each a set of `schemes` names. No `resolve`:
    no credential is asked for."""

    resolve: Callable[[web.Request], Awaitable[Any]] | None = None
    security: tuple[dict[str, list[str]], ...] = ()
    schemes: dict[str, Schema] = field(default_factory=dict)


NO_AUTH = Auth()


def bearer(request: web.Request) -> str:
    """`Authorization: <token>` (the things-gateway document's custom authorizer) or
    `Authorization: Bearer <token>`."""
    header = request.headers.get("Authorization", "").strip()
    if not header:
        raise Unauthorized("missing Authorization header")
    scheme, _, rest = header.partition(" ")
    token = rest.strip() if scheme.lower() == "bearer" else header
    if not token or " " in token:
        raise Unauthorized("malformed Authorization header")
    return token


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


def peer_certificate(request: web.Request) -> tuple[str | None, bytes | None]:
    """The verified client certificate on HTTPS (common name, DER), or (None, None)."""
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    if ssl_object is None:
        return None, None
    return pki.peer_common_name(ssl_object.getpeercert()), ssl_object.getpeercert(binary_form=True)


async def require_user(request: web.Request) -> User:
    return await request.app[CORE].accounts.authenticate(bearer(request))


async def require_admin(request: web.Request) -> User:
    user = await require_user(request)
    if not user.is_admin:
        raise Forbidden("this operation is for admins")
    return user


_USER_SCHEMES: dict[str, Schema] = {
    "auth": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "The access token from the things-gateway's GET .../token: "
        "`Authorization: Bearer <token>`.",
    },
    "authToken": {
        "type": "apiKey",
        "in": "header",
        "name": "Authorization",
        "description": "The same access token sent raw, `Authorization: <token>` (the things-gateway "
        "document's custom authorizer form).",
    },
}
USER = Auth(require_user, ({"auth": []}, {"authToken": []}), _USER_SCHEMES)
ADMIN = Auth(require_admin, USER.security, _USER_SCHEMES)


def cik(request: web.Request) -> str | None:
    """The X-Exosite-CIK header; empty counts as absent (activation clients send it empty)."""
    return request.headers.get(CIK_HEADER, "").strip() or None


async def device_credential(request: web.Request) -> DeviceIdentity | None:
    """The thing behind the request's client certificate (HTTPS), else behind its CIK; None when it
    carries neither, Unauthorized when the one it carries is not a current credential of a thing."""
    core = request.app[CORE]
    cn, der = peer_certificate(request)
    if der:
        identity = await core.things.identify_device(cn or "", pki.der_cert_id(der))
        if identity is None:
            raise Unauthorized("client certificate is not the current certificate of a thing")
        return identity
    value = cik(request)
    return None if value is None else await core.provisioning.serials.identify_cik(value)


DEVICE_CIK: dict[str, Schema] = {
    "deviceCik": {
        "type": "apiKey",
        "in": "header",
        "name": CIK_HEADER,
        "description": "A provisioned device's CIK, from POST /provision/activate (40 hex characters); "
        "it stops working when the vendor regenerates it, disables or removes the serial number.",
    }
}
