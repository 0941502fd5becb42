"""The partner-portal dialect (docs/dialects.md):
GetURL, SetStatus and GetConfig, each as GET with a query string and as POST with a JSON body.
The device is identified by its regId alone (the document has no auth); every failure is 400."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from bridge.core import jsonvalue
from bridge.core.errors import DomainError, Invalid
from bridge.core.status import API_VERSION
from bridge.http.auth import CORE
from bridge.http.envelope import json_response

routes = web.RouteTableDef()
PATHS = ("/GetURL", "/SetStatus", "/GetConfig")


def render_error(status: int, message: str, exc: Exception | None) -> web.Response:
    """`400 Failed` is the only documented error; the body says why."""
    return json_response({"error": message}, 400 if isinstance(exc, DomainError) else status)


async def _params(request: web.Request) -> dict[str, Any]:
    """Query string for GET, a JSON object for POST. Fields the document does not name are
    ignored: device firmware may send more than we read."""
    if request.method == "GET":
        return dict(request.query)
    body = jsonvalue.loads(await request.read())
    if not isinstance(body, dict):
        raise Invalid("body must be a JSON object")
    return body


def _object(params: dict[str, Any], name: str) -> dict | None:
    value = params.get(name)
    if value is not None and not isinstance(value, dict):
        raise Invalid(f"{name} must be an object")
    return value


def _regid(params: dict[str, Any]) -> str | None:
    value = params.get("regId")
    if value is not None and not isinstance(value, str):
        raise Invalid("regId must be a string")
    return value


def _endpoint(request: web.Request, path: str) -> str:
    """ "<METHOD> <absolute URL>": the device keeps using the variant it was set up with."""
    return f"{request.method} {request.url.origin()}{path}"


@routes.get("/GetURL")
@routes.post("/GetURL")
async def get_url(request: web.Request) -> web.Response:
    status = request.app[CORE].status
    params = await _params(request)
    ref = await status.resolve(_regid(params))
    current = await status.get_url(ref, _object(params, "DeviceInfo"))
    return json_response(
        {
            "packageUrl": current.package_url,
            "version": current.version,
            "data": current.data,
            "setStatusUrl": _endpoint(request, "/SetStatus"),
            "getConfigUrl": _endpoint(request, "/GetConfig"),
            "apiVersion": API_VERSION,
        }
    )


@routes.get("/SetStatus")
@routes.post("/SetStatus")
async def set_status(request: web.Request) -> web.Response:
    status = request.app[CORE].status
    params = await _params(request)
    ref = await status.resolve(_regid(params))
    answer = await status.set_status(ref, params.get("status"), _object(params, "info"), "http")
    return json_response({"config": answer})


@routes.get("/GetConfig")
@routes.post("/GetConfig")
async def get_config(request: web.Request) -> web.Response:
    status = request.app[CORE].status
    params = await _params(request)
    _object(params, "DeviceInfo")
    return json_response(await status.get_config(await status.resolve(_regid(params))))
