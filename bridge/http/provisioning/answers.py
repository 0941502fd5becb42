"""How the provisioning document answers: CSV records (RFC 4180, `text/csv; charset=utf-8`, 204
when there are none), a plain-text value, 205 Reset Content with Content-Length 0 for writes."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import ETag

from bridge.core.provisioning.content import Download
from bridge.http.common.operation import Empty, Media

CSV = "text/csv"
TEXT = "text/plain"
OCTET = "application/octet-stream"
STRING = {"type": "string"}
_EMPTY_SUFFIX = re.compile(r"bytes=\s*-0+\s*", re.IGNORECASE)  # the last 0 bytes


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


class BlobResponse(web.FileResponse):
    """A content's blob by aiohttp's FileResponse (sendfile, Range and 416, If-Match 412,
    If-None-Match 304, Last-Modified, a file gone meanwhile answers 404), with the blob's SHA-256
    as its strong ETag. aiohttp's own ETag is the file's mtime and size: the tag it sends and the
    one If-Match / If-None-Match are compared with are replaced by ours. Its If-Range compares dates
    only, so an entity-tag If-Range is decided here: ours, the ranges are served (206); any other,
    the whole blob (200). aiohttp serves one range and refuses several with 416; RFC 9110 14.2
    lets a server ignore a Range it does not serve, so several ranges get the whole blob (200).
    aiohttp answers the last 0 bytes (`bytes=-0`) with all of them (206): that range is
    unsatisfiable (RFC 9110 14.1.2), 416 as a start past the end is."""

    def __init__(self, download: Download) -> None:
        super().__init__(download.path, headers={hdrs.CONTENT_TYPE: download.content_type})
        self._sha256 = download.etag
        self._size = download.size

    @web.FileResponse.etag.setter  # type: ignore[attr-defined, untyped-decorator]
    def etag(self, value: object) -> None:
        web.StreamResponse.etag.fset(self, self._sha256)  # type: ignore[attr-defined]

    def _etag_match(self, etag_value: str, etags: tuple[ETag, ...], *, weak: bool) -> bool:
        return super()._etag_match(self._sha256, etags, weak=weak)

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if_range, ranges = request.headers.get(hdrs.IF_RANGE, ""), request.headers.get(hdrs.RANGE, "")
        several, empty = "," in ranges, _EMPTY_SUFFIX.fullmatch(ranges) is not None
        if if_range.startswith(('"', "W/")) or several or empty:
            headers = request.headers.copy()
            headers.popall(hdrs.IF_RANGE, None)
            if empty:  # aiohttp's own 416, with Content-Range: bytes */<size>
                headers[hdrs.RANGE] = f"bytes={self._size}-"
            # a weak tag never matches (RFC 9110 13.1.5)
            if several or (if_range and if_range != f'"{self._sha256}"'):
                headers.popall(hdrs.RANGE, None)
            request = request.clone(headers=headers)
        return await super().prepare(request)
