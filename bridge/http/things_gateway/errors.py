"""How the things-gateway dialect answers: the RestResponse envelope around every result and every
error (code = the HTTP status, the reason in messages[0].value), and how its errors are documented."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from bridge.core.errors import QuotaExceeded
from bridge.http.common.dialect import ERROR_TEXT, ResponseDoc, json_response
from bridge.http.common.operation import ErrorDoc
from bridge.http.things_gateway.models import (
    STATUS_TEXT,
    KeyValue,
    RestResponse,
    SubscriptionPolicy,
    envelope_model,
    subscription_policy,
)

BEARER_CHALLENGE = 'Bearer realm="thingbridge"'
QUOTA = ErrorDoc(403, "Over the subscription's thing quota: the policy is the result.", SubscriptionPolicy)


def envelope(
    result: Any, message: str = "OK", status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    status_text = STATUS_TEXT.get(status, "ERROR" if status >= 400 else "OK")
    body = RestResponse(status_text, status, [KeyValue("message", message)], result)
    return json_response(msgspec.json.encode(body), status, headers)


def render_error(status: int, message: str, exc: Exception | None) -> web.Response:
    """The envelope with code = HTTP status and result null (over quota: the policy)."""
    if isinstance(exc, QuotaExceeded):
        return envelope(subscription_policy(exc.policy), message, status)
    headers = None
    if status == 401:
        headers = {"WWW-Authenticate": getattr(exc, "challenge", BEARER_CHALLENGE)}
    return envelope(None, message, status, headers)


def _header(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "required": True, "schema": schema or {"type": "string"}}


ERROR_HEADERS = {
    401: {"WWW-Authenticate": _header("the challenge: Bearer realm=... (Basic realm=... on GET .../token)")},
}
GATEWAY_TEXT = {
    404: "No such resource (another user's thing answers 404 too).",
    429: "Too many failed logins from this address or for this name (exponential back-off), or too many"
    " password checks in progress.",
}


def error_response(error: ErrorDoc) -> ResponseDoc:
    description = error.description or GATEWAY_TEXT.get(error.status) or ERROR_TEXT[error.status]
    return ResponseDoc(
        envelope_model(error.status, error.result), description, ERROR_HEADERS.get(error.status, {})
    )
