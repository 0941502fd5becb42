"""Credentials of the Upgrader V2 dialect. Operator operations take the user token of the
things-gateway's GET .../token (common USER: the document names none, CATALOG "No anonymous
writes"). Device operations take the device's own credential: the `token` (or `Token`) header, a
JWT the thing signs with its own key (verifyThing's rules, core.things.verify_token), or the
thing's client certificate on HTTPS; `Client-Token` is opaque and recorded with the report."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from bridge import pki
from bridge.core.errors import Forbidden, NotFound, Unauthorized
from bridge.core.identity import DeviceIdentity
from bridge.core.things import token_subject
from bridge.http.common.auth import CORE, Auth, peer_certificate


@dataclass(frozen=True)
class DeviceCaller:
    identity: DeviceIdentity
    client_token: str | None  # the Client-Token header, recorded as sent


async def require_device(request: web.Request) -> DeviceCaller:
    """The calling thing; a path naming another device (by id or regId) is 403."""
    core = request.app[CORE]
    cn, der = peer_certificate(request)
    token = request.headers.get("token", "").strip()  # header names are case-insensitive: Token too
    if der:
        identity = await core.things.identify_device(cn or "", pki.der_cert_id(der))
        if identity is None:
            raise Unauthorized("client certificate is not the current certificate of a thing")
    elif token:
        identity = await core.things.verify_token(token, token_subject(token))
    else:
        raise Unauthorized("the device's token header (or its client certificate on HTTPS) is required")
    device_id = request.match_info.get("deviceId")
    if device_id is not None and device_id != identity.thing_id:
        try:
            named = await core.status.resolve(device_id)
        except NotFound:
            named = None
        if named is None or named.thing_id != identity.thing_id:
            raise Forbidden("the token is for another device than the path's")
    return DeviceCaller(identity, request.headers.get("Client-Token"))


DEVICE = Auth(
    require_device,
    ({"deviceToken": []}, {"deviceCertificate": []}),
    {
        "deviceToken": {
            "type": "apiKey",
            "in": "header",
            "name": "token",
            "description": "The device's own JWT (also as `Token`), signed with the thing's private key "
            "(RS256 for RSA, ES256 for EC keys), header `kid` = thing id and/or claim `iss` = "
            "`urn:thing:<id>`, `exp` required, `nbf` honoured, lifetime at most 24 h. A path naming "
            "another device is 403. `Client-Token` is opaque and recorded with the report.",
        },
        "deviceCertificate": {
            "type": "mutualTLS",
            "description": "On the HTTPS port: the thing's client certificate, issued by the bridge CA.",
        },
    },
)
