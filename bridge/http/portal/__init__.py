"""The partner-portal dialect (docs/dialects.md), at the root unless http.mounts says otherwise.
Every failure the document knows is 400 `{"error": "..."}`; beyond it, an oversized body is 413 and
a wrong method 405, with the same body."""

from __future__ import annotations

from bridge.http.common.dialect import Dialect, ErrorTable
from bridge.http.portal import routes


class Portal(Dialect):
    errors = ErrorTable(default=400)  # `400 Failed` is the only error the document names


DIALECT = Portal(
    "portal",
    "Partner-portal dialect at {mount}: GetURL, SetStatus and GetConfig, each as GET with a query string "
    'and as POST with a JSON body; every failure 400 {{"error": "..."}}.',
    (routes.api,),
)
