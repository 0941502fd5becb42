"""The Upgrader V2 dialect (docs/dialects.md), mounted at /Upgrade/v2 and /v2 unless http.mounts
says otherwise: the operator's catalog (routes.py), the device operations (device.py) and our
staged-rollout extension (rollouts.py), failing in `{status, errorCode, errorMessage}` (errors.py)."""

from __future__ import annotations

from aiohttp import web

from bridge.http.common.dialect import Dialect, ResponseDoc
from bridge.http.common.operation import ErrorDoc
from bridge.http.upgrader import device, errors, rollouts, routes


class Upgrader(Dialect):
    def render_error(self, status: int, message: str, exc: Exception | None) -> web.Response:
        return errors.render_error(status, message)

    def error_response(self, error: ErrorDoc) -> ResponseDoc:
        return errors.error_response(error)


DIALECT = Upgrader(
    "upgrader",
    "Upgrader V2 dialect under {mount} (the same operations at each): errors are {{status, errorCode, "
    "errorMessage}} with errorCode = the HTTP status; operator operations take the access token of "
    "GET /dev/v1/token, device operations the device's token header or client certificate.",
    (routes.api, device.api, rollouts.api),
)
