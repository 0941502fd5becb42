"""List queries of the Upgrader document (`limit`, `page`, `offset`, `filter`, `fields`, `sort`) as
CATALOG.md 001 decides them, as pure functions over API records: an adapter passes the raw query
strings, the core the records.

* no `limit`: every record; `offset` skips that many, else `page` (1-based) skips (page-1)*limit;
* `filter`: a JSON object, field -> value, exact match, all of them;
* `fields`: a JSON array of field names (projection; `id` is always returned);
* `sort`: comma-separated field names, `-` for descending;
* `totalRecords` counts before pagination; anything malformed is Invalid (a 400)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from bridge.core import jsonvalue
from bridge.core.errors import Invalid

Record = dict[str, Any]


@dataclass(frozen=True)
class ListQuery:
    limit: int | None = None
    page: int | None = None
    offset: int | None = None
    filter: Mapping[str, Any] | None = None
    fields: tuple[str, ...] | None = None
    sort: tuple[tuple[str, bool], ...] = ()  # (field, descending)

    @classmethod
    def parse(
        cls,
        *,
        limit: str | int | None = None,
        page: str | int | None = None,
        offset: str | int | None = None,
        filter: str | None = None,
        fields: str | None = None,
        sort: str | None = None,
    ) -> ListQuery:
        """From the query string as received (strings) or already-typed values."""
        return cls(
            _count(limit, "limit", 1),
            _count(page, "page", 1),
            _count(offset, "offset", 0),
            _filter(filter),
            _fields(fields),
            _sort(sort),
        )

    def apply(self, records: list[Record], known: Collection[str]) -> tuple[int, list[Record]]:
        """(totalRecords, the page). `known`: the field names a record may have; naming another
        one in filter, fields or sort is Invalid, not an empty answer."""
        named = [*(self.filter or {}), *(self.fields or ()), *(name for name, _ in self.sort)]
        unknown = sorted(set(named) - set(known))
        if unknown:
            raise Invalid(f"unknown field(s) {', '.join(unknown)}; fields are {', '.join(sorted(known))}")
        found = [r for r in records if all(r.get(k) == v for k, v in (self.filter or {}).items())]
        for name, descending in reversed(self.sort):  # stable sorts, last key first
            found.sort(key=lambda r, name=name: _order(r.get(name)), reverse=descending)
        skip = self.offset if self.offset is not None else ((self.page or 1) - 1) * (self.limit or 0)
        page = found[skip:] if self.limit is None else found[skip : skip + self.limit]
        if self.fields is not None:
            keep = {"id", *self.fields}
            page = [{k: v for k, v in r.items() if k in keep} for r in page]
        return len(found), page


def _count(value: str | int | None, what: str, least: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit()) or len(value) > 9:
            raise Invalid(f"{what} must be an integer of at least {least}")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise Invalid(f"{what} must be an integer of at least {least}")
    return value


def _filter(raw: str | None) -> Mapping[str, Any] | None:
    if raw is None:
        return None
    value = jsonvalue.loads(raw.encode(), "filter")
    if not isinstance(value, dict):
        raise Invalid('filter must be a JSON object of field -> value, e.g. {"name":"Gravity_ION"}')
    return value


def _fields(raw: str | None) -> tuple[str, ...] | None:
    if raw is None:
        return None
    value = jsonvalue.loads(raw.encode(), "fields")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Invalid('fields must be a JSON array of field names, e.g. ["id","name"]')
    return tuple(value)


def _sort(raw: str | None) -> tuple[tuple[str, bool], ...]:
    if raw is None:
        return ()
    keys = [part.strip() for part in raw.split(",")]
    if not all(k.removeprefix("-") for k in keys):
        raise Invalid("sort must be comma-separated field names, '-' before one for descending")
    return tuple((k.removeprefix("-"), k.startswith("-")) for k in keys)


def _order(value: Any) -> tuple[int, Any]:
    """Missing values last; numbers, strings and others (by their JSON) each among themselves."""
    if value is None:
        return (3, "")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, value)
    if isinstance(value, str):
        return (1, value)
    return (2, orjson.dumps(value, option=orjson.OPT_SORT_KEYS))
