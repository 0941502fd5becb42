"""How the firmware dialect fails: `{"error", "message"}` with the HTTP status, `error` the
status' name in snake case (`not_found`) for a program, `message` the sentence for a person."""

from __future__ import annotations

from http import HTTPStatus
from typing import Annotated

import msgspec
from aiohttp import web
from msgspec import Meta

from bridge.http.common.dialect import ERROR_TEXT, ResponseDoc, json_response
from bridge.http.common.models import Model
from bridge.http.common.operation import ErrorDoc


class ErrorBody(Model):
    error: Annotated[str, Meta(description="the status' name, snake case: not_found, forbidden, ...")]
    message: Annotated[str, Meta(description="why the request failed")]


def render_error(status: int, message: str) -> web.Response:
    return json_response(msgspec.json.encode(ErrorBody(HTTPStatus(status).name.lower(), message)), status)


FIRMWARE_TEXT = {
    401: "No API key (X-ApiKey or ApiKey), or one that is unknown, revoked or replaced by a later "
    "activation; operator operations: no or a bad access token.",
    403: "The API key is another thing's, or the product or serial number is disabled.",
    404: "No such serial number, product, version or firmware (another owner's answers 404 too).",
    416: "Range Not Satisfiable: it starts past the end (Content-Range: bytes */<size>), empty body.",
}


def error_response(error: ErrorDoc) -> ResponseDoc:
    description = error.description or FIRMWARE_TEXT.get(error.status) or ERROR_TEXT[error.status]
    if error.status == 416:  # aiohttp's FileResponse answers it, without a body
        return ResponseDoc(str, description, media_type="application/octet-stream")
    return ResponseDoc(ErrorBody, description)
