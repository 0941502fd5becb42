"""How the provisioning document answers: CSV records (RFC 4180, `text/csv; charset=utf-8`, 204
when there are none), a plain-text value, 205 Reset Content with Content-Length 0 for writes."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence

from aiohttp import web

from bridge.http.common.operation import Empty, Media

CSV = "text/csv"
TEXT = "text/plain"
STRING = {"type": "string"}


def csv_media(columns: str) -> Media:
    return Media(CSV, f"CSV records (RFC 4180), one a line: {columns}.", STRING)


NO_RECORDS = Empty("No Content: there are none.")
RESET = Empty("Reset Content: done (Content-Length: 0).")


def csv_answer(rows: Iterable[Sequence[object]]) -> web.Response:
    out = io.StringIO()
    csv.writer(out).writerows(rows)  # CRLF line ends and quoting as RFC 4180 has them
    if not out.tell():
        return web.Response(status=204)
    return web.Response(text=out.getvalue(), content_type=CSV, charset="utf-8")


def text_answer(value: str, content_type: str = TEXT) -> web.Response:
    return web.Response(text=value, content_type=content_type, charset="utf-8")


def reset() -> web.Response:
    return web.Response(status=205)
