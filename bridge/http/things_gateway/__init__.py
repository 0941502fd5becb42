"""The things-gateway dialect (docs/dialects.md), mounted at /dev/v1 unless http.mounts says
otherwise: the document's operations (routes.py) and our operator extensions (operator.py), every
answer and error in the RestResponse envelope (errors.py)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from bridge.http.common.dialect import Dialect, ResponseDoc
from bridge.http.common.operation import ErrorDoc, Operation
from bridge.http.things_gateway import errors, operator, routes
from bridge.http.things_gateway.models import envelope_model


class ThingsGateway(Dialect):
    def answer(self, op: Operation, result: Any) -> web.StreamResponse:
        return errors.envelope(result, op.message) if op.wrap else super().answer(op, result)

    def answer_model(self, op: Operation) -> Any:
        return envelope_model(200, op.answer)

    def render_error(self, status: int, message: str, exc: Exception | None) -> web.Response:
        return errors.render_error(status, message, exc)

    def error_response(self, error: ErrorDoc) -> ResponseDoc:
        return errors.error_response(error)


DIALECT = ThingsGateway(
    "things_gateway",
    "Things-gateway dialect under {mount}: responses are the RestResponse envelope {{status, code, "
    "messages: [{{key, value}}], result}}; errors use it too, with code = the HTTP status and the reason "
    "in messages[0].value; a method a path does not allow answers 405 with Allow, an unknown path 404.",
    (routes.api, operator.api),
)
