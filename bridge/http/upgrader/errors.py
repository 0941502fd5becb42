"""How the Upgrader V2 dialect fails: `{status, errorCode, errorMessage}` with errorCode = the HTTP
status (CATALOG 001 #7: the document's one example with 509 is not followed), status its reason
phrase; a 401 carries the Bearer challenge of the operator token."""

from __future__ import annotations

from http import HTTPStatus
from typing import Annotated

import msgspec
from aiohttp import web
from msgspec import Meta

from bridge.http.common.dialect import ERROR_TEXT, ResponseDoc, json_response
from bridge.http.common.models import Model
from bridge.http.common.operation import ErrorDoc

CHALLENGE = 'Bearer realm="thingbridge"'


class ErrorBody(Model):
    status: Annotated[str, Meta(description="the HTTP status' reason phrase")]
    errorCode: Annotated[int, Meta(ge=400, le=599, description="the HTTP status")]
    errorMessage: Annotated[str, Meta(description="why the request failed")]


def render_error(status: int, message: str) -> web.Response:
    headers = {"WWW-Authenticate": CHALLENGE} if status == 401 else None
    body = ErrorBody(HTTPStatus(status).phrase, status, message)
    return json_response(msgspec.json.encode(body), status, headers)


UPGRADER_TEXT = {
    401: "No or a wrong credential: operator operations take the access token of GET /dev/v1/token, "
    "device operations the device's token header or client certificate.",
    403: "The device's credential is for another device than the path's.",
    404: "No such profile, account, device, software, version or rollout (another operator's answers 404 too).",
}
CHALLENGE_HEADER = {
    "WWW-Authenticate": {"description": "Bearer realm=...", "required": True, "schema": {"type": "string"}}
}


def error_response(error: ErrorDoc) -> ResponseDoc:
    description = error.description or UPGRADER_TEXT.get(error.status) or ERROR_TEXT[error.status]
    return ResponseDoc(ErrorBody, description, CHALLENGE_HEADER if error.status == 401 else {})
