"""GetURL, SetStatus and GetConfig, each as GET with a query string and as POST with a JSON body
(the same operation: a device uses the variant it was registered with). The device is identified
by its regId alone; the document has no authentication. Ours beside it: a device that has a
credential (a provisioned device's CIK, a client certificate on HTTPS) may send it, and is then
the device it names: regId may be left out, and one naming another device is 403."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from bridge.core.errors import Forbidden
from bridge.core.identity import DeviceIdentity
from bridge.core.status import API_VERSION, DeviceRef
from bridge.http.common.auth import DEVICE_CIK, Auth, device_credential
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
CREDENTIAL = (
    ErrorDoc(401, "The X-Exosite-CIK (or client certificate) sent is not a current credential of a thing."),
    ErrorDoc(403, "regId names another device than the credential sent."),
)
# No credential is needed ({}); one sent must be valid and names the device.
OPTIONAL_DEVICE = Auth(device_credential, ({}, {"deviceCik": []}), DEVICE_CIK)
WITH_CREDENTIAL = (
    "A provisioned device may send its CIK (X-Exosite-CIK), or a thing its client certificate on HTTPS, "
    "instead of or beside regId: the credential then names the device (a regId naming another one is 403)."
)
H = TypeVar("H", bound=Handler)
R = TypeVar("R", bound=RegIdQuery)


def _get_and_post(name: str, summary: str, query: type, body: type, answer: type) -> Callable[[H], H]:
    def register(handler: H) -> H:
        api.get(
            f"/{name}",
            f"{summary} (query string)",
            tag="portal",
            auth=OPTIONAL_DEVICE,
            query=query,
            answer=answer,
            errors=(FAILED, *CREDENTIAL),
            operation_id=f"portal{name}Get",
            description="For devices registered with a completeUrl. The device is identified by regId alone "
            "(no other authentication); other query parameters are ignored. " + WITH_CREDENTIAL,
        )(handler)
        return api.post(
            f"/{name}",
            f"{summary} (JSON body)",
            tag="portal",
            auth=OPTIONAL_DEVICE,
            body=body,
            body_required=True,
            body_description="A JSON object; fields not named are ignored.",
            answer=answer,
            errors=(FAILED, *CREDENTIAL, TOO_LARGE),
            operation_id=f"portal{name}Post",
            description="For devices registered with a base url. The device is identified by regId alone. "
            + WITH_CREDENTIAL,
        )(handler)

    return register


def _params(call: Call[DeviceIdentity | None, None, R | None, R | None]) -> R:
    """The query string of a GET, the body of a POST."""
    params = call.body if call.body is not None else call.query
    assert params is not None  # one of the two is declared for each variant
    return params


async def _device(call: Call[DeviceIdentity | None, None, R | None, R | None]) -> DeviceRef:
    """The device the regId names, or the credential sent; both: they must be the same device."""
    status, credential, reg_id = call.core.status, call.principal, _params(call).regId
    if credential is None:
        return await status.resolve(reg_id)
    device = await status.resolve(reg_id or credential.thing_id)  # a thing id is a valid regId
    if device.thing_id != credential.thing_id:
        raise Forbidden("regId names another device than the credential sent")
    return device


def _endpoint(
    call: Call[DeviceIdentity | None, None, RegIdQuery | None, RegIdQuery | None], name: str
) -> str:
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
async def get_url(
    call: Call[DeviceIdentity | None, None, RegIdQuery | None, GetURLRequest | None],
) -> GetURLResponse:
    params = _params(call)
    device_info = params.DeviceInfo if isinstance(params, GetURLRequest) else None
    current = await call.core.status.get_url(await _device(call), device_info)
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
    call: Call[DeviceIdentity | None, None, SetStatusQuery | None, SetStatusRequest | None],
) -> SetStatusResponse:
    params = _params(call)
    info = params.info if isinstance(params, SetStatusRequest) else None
    answer = await call.core.status.set_status(await _device(call), params.status, info, "http")
    return SetStatusResponse(answer)


@_get_and_post(
    "GetConfig",
    "The desired configuration (marked as fetched)",
    RegIdQuery,
    GetConfigRequest,
    GetConfigResponse,
)
async def get_config(
    call: Call[DeviceIdentity | None, None, RegIdQuery | None, GetConfigRequest | None],
) -> GetConfigResponse:
    config = await call.core.status.get_config(await _device(call))
    return GetConfigResponse(config["UpdateRate"], config["AppParam"])
