"""JSON in from the outside, parsed once and checked to be storable: orjson reads up to 1024
levels of nesting but writes at most 254, so a deeper value would be accepted and then fail every
time it is read back."""

from __future__ import annotations

from typing import Any

import orjson

from bridge.core.errors import Invalid

MAX_DEPTH = 254


def loads(raw: bytes, what: str = "body") -> Any:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Invalid(f"{what} is not valid JSON: {exc}") from exc
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH:  # only then can it be too deep
        try:
            orjson.dumps(value)
        except orjson.JSONEncodeError as exc:
            raise Invalid(f"{what} is nested deeper than {MAX_DEPTH} levels") from exc
    return value
