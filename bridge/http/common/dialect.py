"""A dialect: the operations of one HTTP API document and how it answers, fails and is described.

The base class is a plain JSON API (answers are the model as is, errors `{"error": "..."}`, the
usual domain error -> status table); a dialect package subclasses it where its document differs
(an envelope, another error shape or table) and is listed in bridge/http/registry.py."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from bridge.core.errors import (
    Conflict,
    DomainError,
    Forbidden,
    Invalid,
    NotFound,
    TooLarge,
    TooManyRequests,
    Unauthorized,
)
from bridge.http.common.models import ErrorBody, Schema
from bridge.http.common.operation import ErrorDoc, Operation, Operations, route_handler

ERROR_TEXT = {
    400: "Bad request: malformed JSON, not an object, unknown field, wrong type, invalid value.",
    401: "Missing, malformed, expired, revoked or wrong credentials.",
    403: "Authenticated but not allowed.",
    404: "No such resource.",
    405: "Method not allowed on this path.",
    409: "Conflict with an existing resource.",
    413: "The request body is larger than http.max_body, or the message larger than messages.max_payload.",
    429: "Too many requests: try again after Retry-After seconds.",
    503: "The database is unavailable (restarting, unreachable, or locked by another process): nothing "
    "was changed; try again after Retry-After seconds.",
}


# Every 429 and 503 says when to try again (the middleware sets it: TooManyRequests.retry_after, or 1
# second while the database is unavailable).
RETRY_AFTER: dict[str, Schema] = {
    "Retry-After": {
        "description": "whole seconds to wait",
        "required": True,
        "schema": {"type": "string", "pattern": "^[1-9][0-9]*$"},
    }
}


def retry_after(seconds: float) -> str:
    """Retry-After takes whole seconds: round up, so a client that obeys it is not refused again."""
    return str(max(1, math.ceil(seconds)))


@dataclass(frozen=True)
class ErrorTable:
    """Domain error -> HTTP status, first match first (a subclass before its base); anything
    else `default`."""

    rows: tuple[tuple[type[DomainError], int], ...] = ()
    default: int = 400

    def status_of(self, exc: DomainError) -> int:
        for cls, status in self.rows:
            if isinstance(exc, cls):
                return status
        return self.default


STANDARD_ERRORS = ErrorTable(
    (
        (Invalid, 400),
        (Unauthorized, 401),
        (Forbidden, 403),
        (NotFound, 404),
        (Conflict, 409),
        (TooLarge, 413),
        (TooManyRequests, 429),
    )
)


@dataclass(frozen=True)
class ResponseDoc:
    """How one status of an operation is documented: the body's model (`str`: plain text), the
    headers, the media type."""

    model: Any
    description: str
    headers: dict[str, Schema] = field(default_factory=dict)
    media_type: str = "application/json"


def json_response(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


class Dialect:
    errors: ErrorTable = STANDARD_ERRORS

    def __init__(self, name: str, describe: str, tables: Iterable[Operations]) -> None:
        """`name` is the dialect's key in broker.yaml's http.mounts; `describe` a sentence for the
        OpenAPI document, where "{mount}" stands for where it is mounted."""
        self.name = name
        self.describe = describe
        self.operations: list[Operation] = [op for table in tables for op in table]

    # ---- answers ----------------------------------------------------------------------------------
    def answer(self, op: Operation, result: Any) -> web.StreamResponse:
        """A handler's result as this dialect's success answer."""
        return json_response(msgspec.json.encode(result))

    def answer_model(self, op: Operation) -> Any:
        """The model a successful answer of `op` is documented with."""
        return op.answer

    # ---- errors -----------------------------------------------------------------------------------
    def render_error(self, status: int, message: str, exc: Exception | None) -> web.Response:
        """This dialect's error body for a failure of `status` (exc: the error, when there is one)."""
        return json_response(msgspec.json.encode(ErrorBody(message)), status)

    def error_response(self, error: ErrorDoc) -> ResponseDoc:
        return ResponseDoc(ErrorBody, error.description or ERROR_TEXT[error.status])


@dataclass(frozen=True)
class Mounted:
    """A dialect where the application serves it: `mount` "" (the root) or "/a/path"."""

    dialect: Dialect
    mount: str
    alias: bool = False  # a further mount of the dialect: operation ids get the mount as a suffix

    def operation_id(self, op: Operation) -> str:
        return op.operation_id + (re.sub(r"\W", "_", self.mount) if self.alias else "")

    def routes(self) -> Iterable[tuple[Operation, str, Any]]:
        """(operation, full path, aiohttp handler) of every operation."""
        for op in self.dialect.operations:
            yield op, self.mount + op.path, route_handler(op, self.dialect.answer)

    def claims(self) -> re.Pattern[str]:
        """The paths whose failures this dialect renders: everything below its mount, or at the
        root only its own operations' paths (a path of nobody's answers in the plain shape)."""
        if self.mount:
            return re.compile(re.escape(self.mount) + "(/.*)?", re.DOTALL)  # a path may hold a newline
        return re.compile("|".join(_template(op.path) for op in self.dialect.operations))


def _template(path: str) -> str:
    """An aiohttp path template as a regular expression ({name} is one path segment)."""
    return "".join(
        "[^/]+" if part.startswith("{") else re.escape(part) for part in re.split(r"({\w+})", path)
    )
