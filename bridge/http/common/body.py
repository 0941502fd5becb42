"""Requests decoded by their models: a JSON body, a query string, path parameters. What is wrong
is said in one sentence (an Invalid, which each dialect answers with its own status and shape)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import msgspec

from bridge.core import jsonvalue
from bridge.core.errors import Invalid

T = TypeVar("T")


def decode_json(raw: bytes, model: type[T], *, required: bool) -> T:
    """The body as `model`; an empty body is a model with every field absent unless `required`.
    The JSON is read by the core's rule (jsonvalue: what can be stored and read back; msgspec alone
    would take integers beyond 64 bits and nesting deeper than orjson writes), then validated."""
    if not raw.strip():
        if required:
            raise Invalid("a JSON body is required")
        return msgspec.convert({}, model)
    try:
        return msgspec.convert(jsonvalue.loads(raw), model)
    except msgspec.ValidationError as exc:
        raise Invalid(_explain(str(exc), model)) from None


def decode_form(raw: bytes, model: type[T]) -> T:
    """An application/x-www-form-urlencoded body as `model`: a name ending in `[]` collects its
    values into a list (the provisioning document's arrays), any other name must come once;
    numbers and booleans from their text, as in a query string."""
    try:
        pairs = parse_qsl(
            raw.decode(), keep_blank_values=True, strict_parsing=bool(raw), max_num_fields=10000
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise Invalid(f"malformed form body: {exc}") from None
    # A bare name that is not a field while `name[]` is an array of the model is one of its values:
    # the provisioning document itself writes `options=nohistorical` beside `options[]=` (CATALOG
    # 002 note 10); `sn` and `sn[]`, both fields, stay apart.
    names = _wire_names(model)
    fields: dict[str, Any] = {}
    for name, value in pairs:
        if name not in names and name + "[]" in names:
            name += "[]"
        if name.endswith("[]"):
            fields.setdefault(name, []).append(value)
        elif name in fields:
            raise Invalid(f"form field {name!r:.60} given more than once (arrays are named {name}[])")
        else:
            fields[name] = value
    try:
        return msgspec.convert(fields, model, strict=False)
    except msgspec.ValidationError as exc:
        raise Invalid(f"form: {_explain(str(exc), model)}") from None


@functools.cache
def _wire_names(model: type) -> frozenset[str]:
    # msgspec.structs.fields resolves the model's annotations at each call (~130 us, most of a
    # small form's decoding: 11% of the server's samples under activation load); models are few.
    return frozenset(f.encode_name for f in msgspec.structs.fields(model))


def decode_query(query: Mapping[str, str], model: type[T]) -> T:
    """Query parameters as `model` (numbers from their text); an empty value counts as absent."""
    try:
        return msgspec.convert({k: v for k, v in query.items() if v != ""}, model, strict=False)
    except msgspec.ValidationError as exc:
        raise Invalid(f"query: {exc}") from None


def decode_path(match_info: Mapping[str, str], model: type[T]) -> T:
    try:
        return msgspec.convert(match_info, model)
    except msgspec.ValidationError as exc:
        raise Invalid(f"path: {exc}") from None


def _explain(message: str, model: type) -> str:
    """msgspec's sentence, plus what is allowed when the object itself has an unknown field."""
    if message.startswith("Object contains unknown field") and " - at " not in message:
        return f"{message}; allowed: {', '.join(getattr(model, '__struct_fields__', ()))}"
    return message
