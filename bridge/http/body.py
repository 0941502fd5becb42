"""Request bodies: parsed strictly, with a sentence that says what was wrong."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from bridge.core import jsonvalue
from bridge.core.errors import Invalid


async def any_json_object(request: web.Request, *, empty_ok: bool = True) -> dict[str, Any]:
    """The body as a JSON object (nulls kept); an empty body is {} when `empty_ok`."""
    raw = await request.read()
    if not raw.strip():
        if empty_ok:
            return {}
        raise Invalid("a JSON body is required")
    data = jsonvalue.loads(raw)
    if not isinstance(data, dict):
        raise Invalid("body must be a JSON object")
    return data


async def json_object(
    request: web.Request, fields: dict[str, type], *, empty_ok: bool = True
) -> dict[str, Any]:
    """A JSON object whose keys are all in `fields`, each of the declared type; null means absent
    (such keys are dropped, so callers can use `.get(key, default)`)."""
    data = await any_json_object(request, empty_ok=empty_ok)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise Invalid(f"unknown field(s): {', '.join(unknown)}; allowed: {', '.join(fields)}")
    for name, kind in fields.items():
        value = data.get(name)
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise Invalid(f"field {name!r} must be a {_type_name(kind)}")
    return {k: v for k, v in data.items() if v is not None}


def _type_name(kind: type) -> str:
    return {str: "string", bool: "boolean", int: "integer", dict: "object", list: "array"}.get(
        kind, kind.__name__
    )
