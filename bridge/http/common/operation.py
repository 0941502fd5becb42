"""One declaration per HTTP operation. The decorator records method, path, summary, credential,
models and documented statuses; the same record registers the aiohttp route (bridge/http/app.py)
and becomes the operation's OpenAPI entry (bridge/http/common/openapi.py):

    api = Operations()

    @api.get("/things/{thing_id}", "One thing", tag="things", auth=USER, path=ThingPath,
             answer=models.Thing, errors=(401, 404))
    async def get_thing(call: Call[User, ThingPath, None, None]) -> models.Thing:
        return models.thing(await call.core.things.get(call.principal, call.path.thing_id))

Before the handler runs: the credential is checked (Auth.resolve), then the path parameters, the
query string and the body are decoded by their models (bad input: Invalid, 400 in most dialects).
The handler returns an instance of `answer`, which the dialect encodes (in its envelope), or a
finished web.Response for a `Media` answer (a file)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from aiohttp import web

from bridge.config import Config
from bridge.core.errors import Invalid
from bridge.core.service import Core
from bridge.http.common.auth import CORE, NO_AUTH, Auth
from bridge.http.common.body import decode_form, decode_json, decode_path, decode_query
from bridge.http.common.models import Schema

A = TypeVar("A")  # the principal Auth.resolve returns
P = TypeVar("P")  # path parameters
Q = TypeVar("Q")  # query string
B = TypeVar("B")  # body
Handler = Callable[["Call[Any, Any, Any, Any]"], Awaitable[Any]]
H = TypeVar("H", bound=Handler)
FORM_MEDIA_TYPE = "application/x-www-form-urlencoded"


@dataclass(slots=True)
class Call(Generic[A, P, Q, B]):
    """What a handler receives: the request, decoded."""

    request: web.Request
    principal: A
    path: P
    query: Q
    body: B

    @property
    def core(self) -> Core:
        return self.request.app[CORE]


@dataclass(frozen=True)
class RawBody:
    """A body the handler takes as bytes, whatever it holds (things-gateway collect and publish:
    JSON, free text or binary); `content` documents each media type. `streamed`: the handler gets
    a `Stream` of the bytes as they arrive instead, not bounded by http.max_body (a file upload,
    whose consumer enforces its own limit)."""

    description: str
    content: dict[str, Schema]
    streamed: bool = False


@dataclass(frozen=True)
class Form:
    """A body of HTML-form fields (application/x-www-form-urlencoded; the provisioning document's
    requests) decoded into `model` (None: no form is taken): a field whose wire name ends in `[]`
    is an array (`sn[]=a&sn[]=b`), any other one value. `streams`: further media types (text/csv)
    the handler reads as it arrives, of any size up to `stream_limit` (http.max_body unless the
    consumer spools it to disk and has a setting of its own); for those `call.body` is a `Stream`.
    The media type of the request picks which."""

    model: type | None
    description: str
    streams: dict[str, Schema] = field(default_factory=dict)
    stream_limit: Callable[[Config], int] = lambda cfg: cfg.http.max_body


@dataclass(frozen=True)
class Stream:
    """A body of one of a Form's `streams` media types: its type, and its bytes as they arrive."""

    media_type: str
    chunks: AsyncIterator[bytes]


@dataclass(frozen=True)
class Empty:
    """An answer without a body (204 No Content, 205 Reset Content), documented as such."""

    description: str


@dataclass(frozen=True)
class Media:
    """An answer the handler builds itself (a file, a page), documented by media type; `more`:
    further media types the same status may carry (one path answering an info or a download)."""

    media_type: str
    description: str
    schema: Schema = field(default_factory=lambda: {"type": "string", "format": "binary"})
    headers: dict[str, Schema] = field(default_factory=dict)
    more: dict[str, Schema] = field(default_factory=dict)


@dataclass(frozen=True)
class Answered:
    """A handler's result with a success status other than the operation's usual one (an upsert
    that created: 201 instead of 200); the status must be declared in `alternatives`."""

    status: int
    result: Any


@dataclass(frozen=True)
class ErrorDoc:
    """A documented error status; `result` and `description` override what the dialect says for
    that status in general (a things-gateway 403 over quota carries the subscription policy)."""

    status: int
    description: str | None = None
    result: Any = None


@dataclass(frozen=True)
class Operation:
    method: str
    path: str  # below the dialect's mount
    summary: str
    tag: str
    handler: Handler
    operation_id: str
    auth: Auth
    path_model: type | None
    query: type | None
    body: type | RawBody | Form | None
    body_required: bool
    body_description: str
    answer: Any  # a model (or list of one, or None: no result), a Media or Empty
    wrap: bool  # the answer goes inside the dialect's envelope (if it has one)
    message: str  # what the dialect's envelope says on success (things-gateway: messages[0])
    errors: tuple[ErrorDoc, ...]
    description: str | None
    status: int  # of a success (200, 201 created, 202 accepted)
    alternatives: dict[
        int, Any
    ]  # other success statuses a handler may answer (Answered): model, Media or Empty

    def parameters(self) -> list[tuple[str, type]]:
        """(where, model) of the path and query models, in OpenAPI's terms."""
        return [(where, m) for where, m in (("path", self.path_model), ("query", self.query)) if m]


class Operations:
    """The operations of one module of a dialect, in declaration order."""

    def __init__(self) -> None:
        self._all: list[Operation] = []

    def __iter__(self) -> Iterator[Operation]:
        return iter(self._all)

    def get(self, path: str, summary: str, **kw: Any) -> Callable[[H], H]:
        return self.operation("GET", path, summary, **kw)

    def post(self, path: str, summary: str, **kw: Any) -> Callable[[H], H]:
        return self.operation("POST", path, summary, **kw)

    def patch(self, path: str, summary: str, **kw: Any) -> Callable[[H], H]:
        return self.operation("PATCH", path, summary, **kw)

    def delete(self, path: str, summary: str, **kw: Any) -> Callable[[H], H]:
        return self.operation("DELETE", path, summary, **kw)

    def put(self, path: str, summary: str, **kw: Any) -> Callable[[H], H]:
        return self.operation("PUT", path, summary, **kw)

    def operation(
        self,
        method: str,
        path: str,
        summary: str,
        *,
        tag: str,
        auth: Auth = NO_AUTH,
        path_model: type | None = None,
        query: type | None = None,
        body: type | RawBody | Form | None = None,
        body_required: bool = False,
        body_description: str = "",
        answer: Any = None,
        wrap: bool = True,
        message: str = "OK",
        errors: tuple[int | ErrorDoc, ...] = (),
        description: str | None = None,
        operation_id: str | None = None,
        status: int = 200,
        alternatives: dict[int, Any] | None = None,
    ) -> Callable[[H], H]:
        named = set(re.findall(r"{(\w+)}", path))
        declared = set(path_model.__struct_fields__) if path_model is not None else set()
        if named != declared:  # a declaration error: fail at import, not at the first request
            raise TypeError(f"{method} {path}: path parameters {sorted(named)}, model has {sorted(declared)}")

        def register(handler: H) -> H:
            self._all.append(
                Operation(
                    method,
                    path,
                    summary,
                    tag,
                    handler,
                    operation_id or _camel(handler.__name__),
                    auth,
                    path_model,
                    query,
                    body,
                    body_required,
                    body_description,
                    answer,
                    wrap,
                    message,
                    tuple(e if isinstance(e, ErrorDoc) else ErrorDoc(e) for e in errors),
                    description,
                    status,
                    alternatives or {},
                )
            )
            return handler

        return register


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(word.title() for word in rest)


Answer = Callable[[Operation, Any], web.StreamResponse]


def route_handler(op: Operation, answer: Answer) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The aiohttp handler of `op`: credential, then path, query and body, then the handler; its
    result encoded by `answer` (the dialect's) unless it is a response already."""
    resolve, path_model, query_model, body = op.auth.resolve, op.path_model, op.query, op.body

    async def handle(request: web.Request) -> web.StreamResponse:
        principal = await resolve(request) if resolve is not None else None
        path = decode_path(request.match_info, path_model) if path_model is not None else None
        query = decode_query(request.query, query_model) if query_model is not None else None
        if body is None:
            decoded = None
        elif isinstance(body, RawBody):
            decoded = (
                Stream(request.content_type, request.content.iter_any())
                if body.streamed
                else await request.read()
            )
        elif isinstance(body, Form):
            decoded = await _form_or_stream(request, body)
        else:
            decoded = decode_json(await request.read(), body, required=op.body_required)
        result = await op.handler(Call(request, principal, path, query, decoded))
        if isinstance(result, web.StreamResponse):
            return result
        status = op.status
        if isinstance(result, Answered):
            status, result = result.status, result.result
        response = answer(op, result)
        response.set_status(status)
        return response

    return handle


async def _form_or_stream(request: web.Request, form: Form) -> Any:
    media_type = request.content_type
    if media_type in form.streams:
        return Stream(media_type, _bounded(request, form.stream_limit(request.app[CORE].cfg)))
    if form.model is not None and (media_type == FORM_MEDIA_TYPE or not request.body_exists):
        return decode_form(await request.read(), form.model)
    accepted = ([FORM_MEDIA_TYPE] if form.model is not None else []) + list(form.streams)
    raise Invalid(f"Content-Type must be {' or '.join(accepted)}, not {media_type}")


async def _bounded(request: web.Request, limit: int) -> AsyncIterator[bytes]:
    """The body as it arrives; aiohttp's client_max_size bounds only bodies read whole, so a
    streamed one is counted here against its limit (413 beyond it)."""
    seen = 0
    async for chunk in request.content.iter_any():
        seen += len(chunk)
        if seen > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=seen)
        yield chunk
