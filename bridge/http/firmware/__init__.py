"""The firmware activation dialect (CATALOG 004, paths and fields of our own design; docs/dialects.md),
mounted at /fw/v1 unless http.mounts says otherwise: four device operations on the API key
(device.py) and the vendor's owner's products, versions, firmware and serial numbers under
/manage (manage.py), failing in `{"error", "message"}` (errors.py)."""

from __future__ import annotations

from aiohttp import web

from bridge.http.common.dialect import Dialect, ResponseDoc
from bridge.http.common.operation import ErrorDoc
from bridge.http.firmware import device, errors, manage


class FirmwareDialect(Dialect):
    def render_error(self, status: int, message: str, exc: Exception | None) -> web.Response:
        return errors.render_error(status, message)

    def error_response(self, error: ErrorDoc) -> ResponseDoc:
        return errors.error_response(error)


DIALECT = FirmwareDialect(
    "firmware",
    "Firmware activation dialect under {mount}: a device activates with its serial number, then sends the "
    "API key (X-ApiKey) to read its target version, download firmware by ranges and confirm a version; "
    "/manage takes the access token of GET /dev/v1/token. Errors are {{error, message}}.",
    (device.api, manage.api),
)
