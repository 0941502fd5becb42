"""Credentials of the firmware dialect: a device sends the API key its activation returned, in
`X-ApiKey` (or the `ApiKey` query parameter, CATALOG 004); a path naming another thing is 403.
Operator (vendor-side) operations take the user token of GET /dev/v1/token (common USER)."""

from __future__ import annotations

from aiohttp import web

from bridge.core.errors import Forbidden, Unauthorized
from bridge.core.identity import DeviceIdentity
from bridge.http.common.auth import CORE, Auth

HEADER, QUERY = "X-ApiKey", "ApiKey"


async def require_device(request: web.Request) -> DeviceIdentity:
    api_key = request.headers.get(HEADER, "").strip() or request.query.get(QUERY, "").strip()
    if not api_key:
        raise Unauthorized(f"the API key from activation is required ({HEADER} header or {QUERY} parameter)")
    identity = await request.app[CORE].firmware.identify(api_key)
    if request.match_info.get("thingId", identity.thing_id) != identity.thing_id:
        raise Forbidden("the API key is another thing's")
    return identity


_DESCRIPTION = (
    "The API key POST .../activate returned (40 hex characters); the next activation of the serial "
    "number, or the vendor disabling it, voids it at once."
)
DEVICE = Auth(
    require_device,
    ({"apiKey": []}, {"apiKeyQuery": []}),
    {
        "apiKey": {"type": "apiKey", "in": "header", "name": HEADER, "description": _DESCRIPTION},
        "apiKeyQuery": {"type": "apiKey", "in": "query", "name": QUERY, "description": _DESCRIPTION},
    },
)
