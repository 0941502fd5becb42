"""msgspec base models and field types shared by the dialects.

A model is the one declaration of a JSON shape: it decodes and validates requests, encodes
answers, and becomes a component of the OpenAPI document (msgspec.json.schema_components)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta

from bridge.core import ids
from bridge.core.status import MAX_VERSION, UPDATE_RATE_MAX, UPDATE_RATE_MIN


class Model(msgspec.Struct, forbid_unknown_fields=True):
    """A closed JSON object: an unknown field is refused (400) and the schema says so
    (additionalProperties: false), so an answer with a field the model lacks fails the tests."""


class OpenModel(msgspec.Struct):
    """A JSON object whose unknown fields are ignored (device firmware may send more than its
    document names), and query strings (a client may add parameters of its own)."""


class ErrorBody(Model):
    """The plain error shape: outside every dialect, and the partner portal's."""

    error: Annotated[str, Meta(description="why the request failed")]


def present(model: msgspec.Struct) -> dict[str, Any]:
    """The fields a request named, by wire name: absent (UNSET) ones left out, null kept."""
    return {name: value for name in model.__struct_fields__ if (value := getattr(model, name)) is not UNSET}


# Thing ids, thingType, thingDist and regId share one rule (bridge/core/ids.py); JSON Schema
# patterns search, so it is anchored.
NAME_PATTERN = f"^{ids._ID.pattern}$"
Name = Annotated[str, Meta(pattern=NAME_PATTERN)]
Count = Annotated[int, Meta(ge=0)]
Epoch = Annotated[int, Meta(description="UTC epoch seconds")]
EpochFloat = Annotated[float, Meta(description="UTC epoch seconds")]
IsoTime = Annotated[str, Meta(extra_json_schema={"format": "date-time"}, examples=["2019-05-25T22:45:24Z"])]
JsonObject = dict[str, Any]
Schema = dict[str, Any]  # a JSON Schema or OpenAPI object, as written into the document

# The device twin's fields, as the things-gateway twin and the partner portal both show them.
UpdateRate = Annotated[
    int, Meta(ge=UPDATE_RATE_MIN, le=UPDATE_RATE_MAX, description="hours between SetStatus calls")
]
AppParam = Annotated[JsonObject, Meta(description="the device's desired configuration")]
PackageData = Annotated[JsonObject, Meta(description="extra parameters GetURL returns")]
PackageUrl = Annotated[str, Meta(description="URL of the application package")]
PackageVersion = Annotated[int, Meta(ge=0, le=MAX_VERSION, description="package version")]
