"""The things-gateway RestResponse envelope and its error table (domain error -> HTTP status)."""

from __future__ import annotations

import math
from typing import Any

import orjson
from aiohttp import web

from bridge.core.errors import (
    Conflict,
    DomainError,
    Forbidden,
    Invalid,
    NotFound,
    QuotaExceeded,
    TooLarge,
    TooManyRequests,
    Unauthorized,
)

STATUS_TEXT = {
    200: "OK",
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    429: "TOO_MANY_REQUESTS",
    500: "ERROR",
}
ERROR_STATUS: list[tuple[type[DomainError], int]] = [
    (Invalid, 400),
    (Unauthorized, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (Conflict, 409),
    (TooLarge, 413),
    (TooManyRequests, 429),
]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def envelope(
    result: Any = None, message: str = "OK", status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    body = {
        "status": STATUS_TEXT.get(status, "ERROR" if status >= 400 else "OK"),
        "code": status,
        "messages": [{"key": "message", "value": message}],
        "result": result,
    }
    return json_response(body, status, headers)


def status_of(exc: DomainError) -> int:
    for cls, status in ERROR_STATUS:
        if isinstance(exc, cls):
            return status
    return 400


def render_error(status: int, message: str, exc: Exception | None) -> web.Response:
    """This dialect's error body: the envelope with code = HTTP status (quota: the policy in result)."""
    if isinstance(exc, QuotaExceeded):
        from bridge.http.things_gateway import render_policy

        return envelope(render_policy(exc.policy), message, status)
    challenge = getattr(exc, "challenge", 'Bearer realm="thingbridge"')
    headers = {"WWW-Authenticate": challenge} if status == 401 else None
    if isinstance(exc, TooManyRequests):
        headers = {"Retry-After": str(retry_after_header(exc.retry_after))}
    return envelope(None, message, status, headers)


def retry_after_header(seconds: float) -> int:
    """Retry-After takes whole seconds: round up, so a client that obeys it is not refused again."""
    return max(1, math.ceil(seconds))
