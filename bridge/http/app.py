"""The root aiohttp application: every dialect's operations routed under its mount, the OpenAPI
document generated from them, and one error middleware that renders each failure in the shape and
with the status table of the dialect whose mount the path is under."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import msgspec
from aiohttp import web

from bridge import __version__
from bridge.core.errors import DomainError, TooManyRequests
from bridge.core.service import Core
from bridge.http import docs, registry
from bridge.http.common.auth import CORE
from bridge.http.common.dialect import Dialect, Mounted, retry_after
from bridge.http.common.openapi import document
from bridge.store import Unavailable

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PLAIN = Dialect("plain", "", ())  # paths of no dialect: {"error": "..."}
SUMMARY = "An MQTT-first IoT bridge."
UNAVAILABLE = (
    "the database is unavailable (restarting or unreachable); nothing was changed, try again shortly"
)


def error_middleware(mounted: Sequence[Mounted], max_body: int) -> Any:
    claims = [(place.claims(), place.dialect) for place in mounted]

    def dialect_of(path: str) -> Dialect:
        return next((dialect for pattern, dialect in claims if pattern.fullmatch(path)), PLAIN)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        dialect = dialect_of(request.path)
        try:
            return await handler(request)
        except DomainError as exc:
            response = dialect.render_error(dialect.errors.status_of(exc), str(exc), exc)
            if isinstance(exc, TooManyRequests):
                response.headers["Retry-After"] = retry_after(exc.retry_after)
            return response
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if exc.status == 413:
                message = f"request body is larger than the limit of {max_body} bytes"
            elif exc.status == 404:
                message = f"no such resource: {request.method} {request.path}"
            elif exc.status == 405:
                message = f"method {request.method} is not allowed on {request.path}"
            else:
                message = exc.reason
            response = dialect.render_error(exc.status, message, None)
            if "Allow" in exc.headers:
                response.headers["Allow"] = exc.headers["Allow"]
            return response
        except Unavailable as exc:
            # Nothing of the request was committed (the store acknowledges only after a commit):
            # the client may simply try again.
            log.warning("%s %s: the database is unavailable: %s", request.method, request.path, exc)
            response = dialect.render_error(503, UNAVAILABLE, exc)
            response.headers["Retry-After"] = "1"
            return response
        except Exception as exc:
            log.exception("unhandled error in %s %s", request.method, request.path)
            return dialect.render_error(500, "internal error", exc)

    return middleware


def openapi_document(mounts: Mapping[str, str]) -> dict[str, Any]:
    """The OpenAPI document of the application `make_app` builds for these mounts."""
    return document(registry.mount(mounts), title="thingbridge", version=__version__, summary=SUMMARY)


def make_app(core: Core) -> web.Application:
    max_body = core.cfg.http.max_body
    mounted = registry.mount(core.cfg.http.mounts)
    app = web.Application(middlewares=[error_middleware(mounted, max_body)], client_max_size=max_body)
    app[CORE] = core
    for place in mounted:
        for op, path, handler in place.routes():
            if op.method == "GET":
                app.router.add_get(path, handler)  # and HEAD
            else:
                app.router.add_route(op.method, path, handler)
    doc = openapi_document(core.cfg.http.mounts)
    app[docs.OPENAPI_JSON] = msgspec.json.encode(doc)
    app[docs.DOCS_HTML] = docs.render_html(doc)
    return app


def https_context(core: Core) -> ssl.SSLContext:
    """A client certificate is optional here; when one is presented it must chain to our CA and it
    identifies a thing (used by device endpoints)."""
    ca = core.ca
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca.ca_path))
    ctx.load_cert_chain(str(ca.server_cert_path), str(ca.server_key_path))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx
