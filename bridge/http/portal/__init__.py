"""The partner-portal dialect (docs/dialects.md), at the root unless http.mounts says otherwise.
Every failure the document knows is 400 `{"error": "..."}`; beyond it, an oversized body is 413, a
wrong method 405, and a device credential sent (optional, ours) that is not valid 401 or names
another device than regId 403, with the same body."""

from __future__ import annotations

from bridge.core.errors import Forbidden, Unauthorized
from bridge.http.common.dialect import Dialect, ErrorTable
from bridge.http.portal import routes


class Portal(Dialect):
    # `400 Failed` is the only error the document names; ours: a device credential sent is checked.
    errors = ErrorTable(((Unauthorized, 401), (Forbidden, 403)), default=400)


DIALECT = Portal(
    "portal",
    "Partner-portal dialect at {mount}: GetURL, SetStatus and GetConfig, each as GET with a query string "
    'and as POST with a JSON body; every failure 400 {{"error": "..."}}.',
    (routes.api,),
)
