"""The Exosite Provisioning v1.1 dialect (docs/dialects.md), mounted at /provision unless
http.mounts says otherwise: vendors manage models, serial numbers and shares under /manage/...
and content with their token or vendor CIK, devices activate, get their CIK and download the
content they may have with it (routes.py). Answers are CSV,
plain text or empty (answers.py); errors are a status with a plain-text sentence, as the
document's "Other Responses" show them."""

from __future__ import annotations

from aiohttp import web

from bridge.http.common.dialect import ERROR_TEXT, Dialect, ResponseDoc
from bridge.http.common.operation import ErrorDoc
from bridge.http.provisioning import routes
from bridge.http.provisioning.answers import TEXT

PROVISIONING_TEXT = {
    401: "No, an unknown or a revoked vendor credential (X-Exosite-Token or X-Exosite-CIK).",
    403: "X-Exosite-Vendor on an operation a shared model does not allow.",
    404: "No such model, serial number or vendor for this vendor (another vendor's answers 404 too).",
}


class Provisioning(Dialect):
    def render_error(self, status: int, message: str, exc: Exception | None) -> web.Response:
        return web.Response(status=status, text=message, content_type=TEXT, charset="utf-8")

    def error_response(self, error: ErrorDoc) -> ResponseDoc:
        description = error.description or PROVISIONING_TEXT.get(error.status) or ERROR_TEXT[error.status]
        return ResponseDoc(str, description, media_type=TEXT)


DIALECT = Provisioning(
    "provisioning",
    "Provisioning v1.1 dialect under {mount}: form-encoded and text/csv requests, CSV, plain-text or empty "
    "answers (205 for writes, 204 for empty lists), errors as plain text; vendors authenticate with "
    "X-Exosite-Token or X-Exosite-CIK, devices activate without a credential and download with their CIK "
    "(Range, If-Range).",
    (routes.api,),
)
