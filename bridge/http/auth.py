"""Credentials of the things-gateway dialect: Basic for /token, the access token everywhere else."""

from __future__ import annotations

import base64
import binascii

from aiohttp import web

from bridge.core.accounts import User
from bridge.core.errors import Unauthorized
from bridge.core.service import Core

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
