"""The root aiohttp application: dialects mounted under their base paths, one error middleware
that renders every failure in the dialect of the path it hit."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web

from bridge.core.errors import DomainError
from bridge.core.service import Core
from bridge.http import envelope, openapi, operator, portal, things_gateway
from bridge.http.auth import CORE

log = logging.getLogger(__name__)
Renderer = Callable[[int, str, Exception | None], web.Response]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _plain_error(status: int, message: str, exc: Exception | None) -> web.Response:
    return envelope.json_response({"error": message}, status)


def error_middleware(dialects: list[tuple[str, Renderer]], max_body: int) -> object:
    def renderer_for(path: str) -> Renderer:
        for prefix, render in dialects:
            if path == prefix or path.startswith(prefix + "/"):
                return render
        return _plain_error

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        render = renderer_for(request.path)
        try:
            return await handler(request)
        except DomainError as exc:
            return render(envelope.status_of(exc), str(exc), exc)
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
            response = render(exc.status, message, None)
            if "Allow" in exc.headers:
                response.headers["Allow"] = exc.headers["Allow"]
            return response
        except Exception as exc:
            log.exception("unhandled error in %s %s", request.method, request.path)
            return render(500, "internal error", exc)

    return middleware


def make_app(core: Core) -> web.Application:
    max_body = core.cfg.http.max_body
    dialects: list[tuple[str, Renderer]] = [
        ("/dev/v1", envelope.render_error),
        *((path, portal.render_error) for path in portal.PATHS),
    ]
    app = web.Application(middlewares=[error_middleware(dialects, max_body)], client_max_size=max_body)
    app[CORE] = core
    gateway = web.Application()
    gateway[CORE] = core
    gateway.add_routes(things_gateway.routes)
    gateway.add_routes(operator.routes)
    app.add_subapp("/dev/v1", gateway)
    app.add_routes(portal.routes)
    app.add_routes(openapi.routes)  # GET /openapi.json and /docs (errors: the plain renderer)
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
