"""Credentials of the Upgrader V2 dialect. Operator operations take the user token of the
things-gateway's GET .../token (common USER: the document names none, CATALOG "No anonymous
writes"). Device operations take the device's own credential: the `token` (or `Token`) header, a
JWT the thing signs with its own key (verifyThing's rules, core.things.verify_token), the
thing's client certificate on HTTPS, or a provisioned device's CIK (X-Exosite-CIK); `Client-Token` is opaque and recorded with the report."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from bridge.core.errors import Forbidden, NotFound, Unauthorized
from bridge.core.identity import DeviceIdentity
from bridge.core.things import token_subject
from bridge.http.common.auth import CORE, DEVICE_CIK, Auth, device_credential


@dataclass(frozen=True)
class DeviceCaller:
    identity: DeviceIdentity
    client_token: str | None  # the Client-Token header, recorded as sent


async def require_device(request: web.Request) -> DeviceCaller:
    """The calling thing; a path naming another device (by id or regId) is 403."""
    core = request.app[CORE]
    token = request.headers.get("token", "").strip()  # header names are case-insensitive: Token too
    identity = await device_credential(request)
    if identity is None:
        if not token:
            raise Unauthorized(
                "the device's token header, its X-Exosite-CIK or its client certificate on HTTPS is required"
            )
        identity = await core.things.verify_token(token, token_subject(token))
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
    ({"deviceToken": []}, {"deviceCertificate": []}, {"deviceCik": []}),
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
        **DEVICE_CIK,
    },
)
