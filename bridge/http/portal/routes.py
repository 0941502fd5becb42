"""GetURL, SetStatus and GetConfig, each as GET with a query string and as POST with a JSON body
(the same operation: a device uses the variant it was registered with). The device is identified
by its regId alone; the document has no authentication."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from bridge.core.status import API_VERSION
from bridge.http.common.operation import Call, ErrorDoc, Handler, Operations
from bridge.http.portal.models import (
    GetConfigRequest,
    GetConfigResponse,
    GetURLRequest,
    GetURLResponse,
    RegIdQuery,
    SetStatusQuery,
    SetStatusRequest,
    SetStatusResponse,
)

api = Operations()
FAILED = ErrorDoc(
    400,
    "Failed: missing or unknown regId, missing status, wrong types, malformed JSON (every failure the "
    "portal document knows is 400).",
)
TOO_LARGE = ErrorDoc(413, "The request body is larger than http.max_body.")
H = TypeVar("H", bound=Handler)
R = TypeVar("R", bound=RegIdQuery)


def _get_and_post(name: str, summary: str, query: type, body: type, answer: type) -> Callable[[H], H]:
    def register(handler: H) -> H:
        api.get(
            f"/{name}",
            f"{summary} (query string)",
            tag="portal",
            query=query,
            answer=answer,
            errors=(FAILED,),
            operation_id=f"portal{name}Get",
            description="For devices registered with a completeUrl. The device is identified by regId alone "
            "(no other authentication); other query parameters are ignored.",
        )(handler)
        return api.post(
            f"/{name}",
            f"{summary} (JSON body)",
            tag="portal",
            body=body,
            body_required=True,
            body_description="A JSON object; fields not named are ignored.",
            answer=answer,
            errors=(FAILED, TOO_LARGE),
            operation_id=f"portal{name}Post",
            description="For devices registered with a base url. The device is identified by regId alone.",
        )(handler)

    return register


def _params(call: Call[None, None, R | None, R | None]) -> R:
    """The query string of a GET, the body of a POST."""
    params = call.body if call.body is not None else call.query
    assert params is not None  # one of the two is declared for each variant
    return params


def _endpoint(call: Call[None, None, RegIdQuery | None, RegIdQuery | None], name: str) -> str:
    """ "<METHOD> <absolute URL>" of another portal call, beside this one (wherever it is mounted)."""
    request = call.request
    return f"{request.method} {request.url.origin()}{request.path.rsplit('/', 1)[0]}/{name}"


@_get_and_post(
    "GetURL",
    "The current package, extra data and the device's SetStatus/GetConfig endpoints",
    RegIdQuery,
    GetURLRequest,
    GetURLResponse,
)
async def get_url(call: Call[None, None, RegIdQuery | None, GetURLRequest | None]) -> GetURLResponse:
    status = call.core.status
    params = _params(call)
    device_info = params.DeviceInfo if isinstance(params, GetURLRequest) else None
    current = await status.get_url(await status.resolve(params.regId), device_info)
    return GetURLResponse(
        current.package_url,
        current.version,
        current.data,
        _endpoint(call, "SetStatus"),
        _endpoint(call, "GetConfig"),
        API_VERSION,
    )


@_get_and_post(
    "SetStatus",
    "Report the device's status; the answer says whether to reboot, fetch config or nothing",
    SetStatusQuery,
    SetStatusRequest,
    SetStatusResponse,
)
async def set_status(
    call: Call[None, None, SetStatusQuery | None, SetStatusRequest | None],
) -> SetStatusResponse:
    status = call.core.status
    params = _params(call)
    info = params.info if isinstance(params, SetStatusRequest) else None
    answer = await status.set_status(await status.resolve(params.regId), params.status, info, "http")
    return SetStatusResponse(answer)


@_get_and_post(
    "GetConfig",
    "The desired configuration (marked as fetched)",
    RegIdQuery,
    GetConfigRequest,
    GetConfigResponse,
)
async def get_config(call: Call[None, None, RegIdQuery | None, GetConfigRequest | None]) -> GetConfigResponse:
    status = call.core.status
    config = await status.get_config(await status.resolve(_params(call).regId))
    return GetConfigResponse(config["UpdateRate"], config["AppParam"])
