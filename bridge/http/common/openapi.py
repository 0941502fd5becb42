"""The OpenAPI 3.1 document, generated from the operations of the mounted dialects: their models
become components (msgspec.json.schema_components, JSON Schema 2020-12 as OpenAPI 3.1 uses it),
their declarations the paths. Nothing here is written beside a handler.

Every GET route also answers HEAD (aiohttp adds it): same status and headers, no body. HEAD is
not listed separately."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import msgspec

from bridge.http.common.dialect import RETRY_AFTER, Dialect, Mounted, ResponseDoc
from bridge.http.common.models import Schema
from bridge.http.common.operation import FORM_MEDIA_TYPE, Empty, ErrorDoc, Form, Media, Operation, RawBody

OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{name}"
NULL: Schema = {"type": "null"}


class _Schemas:
    """Models collected while the paths are written; one schema_components call at the end fills
    in every place a model was used (a $ref, or the schema inline)."""

    def __init__(self) -> None:
        self._models: list[Any] = []
        self._slots: list[Schema] = []

    def __call__(self, model: Any) -> Schema:
        slot: Schema = {}
        self._models.append(model)
        self._slots.append(slot)
        return slot

    def components(self) -> dict[str, Schema]:
        schemas, components = msgspec.json.schema_components(self._models, ref_template=REF)
        for slot, schema in zip(self._slots, schemas, strict=True):
            slot.update(schema)
        return dict(sorted(components.items()))


def document(mounted: Sequence[Mounted], *, title: str, version: str, summary: str) -> dict[str, Any]:
    """`summary` opens the description; each dialect adds its sentence, with its mount."""
    schemas = _Schemas()
    paths: dict[str, dict[str, Schema]] = {}
    security_schemes: dict[str, Schema] = {}
    tags: dict[str, None] = {}
    for place in mounted:
        for op in place.dialect.operations:
            paths.setdefault(place.mount + op.path, {})[op.method.lower()] = _operation(place, op, schemas)
            security_schemes.update(op.auth.schemes)
            tags[op.tag] = None
    mounts_of: dict[Dialect, list[str]] = {}
    for place in mounted:
        mounts_of.setdefault(place.dialect, []).append(place.mount or "the root")
    described = " ".join(
        dialect.describe.format(mount=" and ".join(where))
        for dialect, where in mounts_of.items()
        if dialect.describe
    )
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": version, "description": f"{summary} {described}"},
        "servers": [{"url": "/"}],
        "tags": [{"name": name} for name in tags],
        "paths": paths,
        "components": {"schemas": schemas.components(), "securitySchemes": security_schemes},
    }


def _operation(place: Mounted, op: Operation, schemas: _Schemas) -> Schema:
    dialect = place.dialect
    doc: Schema = {"operationId": place.operation_id(op), "tags": [op.tag], "summary": op.summary}
    if op.description:
        doc["description"] = op.description
    doc["security"] = list(op.auth.security)
    parameters = [p for where, model in op.parameters() for p in _parameters(where, model)]
    if parameters:
        doc["parameters"] = parameters
    if isinstance(op.body, RawBody):
        doc["requestBody"] = {
            "description": op.body.description,
            "required": True,
            "content": {media: {"schema": schema} for media, schema in op.body.content.items()},
        }
    elif isinstance(op.body, Form):
        form = {FORM_MEDIA_TYPE: {"schema": schemas(op.body.model)}} if op.body.model is not None else {}
        streams = {media: {"schema": schema} for media, schema in op.body.streams.items()}
        doc["requestBody"] = {"description": op.body.description, "required": True, "content": form | streams}
    elif op.body is not None:
        doc["requestBody"] = {
            "description": op.body_description,
            "required": op.body_required,
            "content": {"application/json": {"schema": schemas(op.body)}},
        }
    if isinstance(op.answer, Media | Empty):
        ok = _answer(op.answer)
    else:
        model = dialect.answer_model(op) if op.wrap else op.answer
        ok = _response(ResponseDoc(model, f"{op.message}." if op.message != "OK" else "Success."), schemas)
    successes = {str(op.status): ok} | {
        str(status): _answer(model)
        if isinstance(model, Media | Empty)
        else _response(ResponseDoc(model, "Success."), schemas)
        for status, model in op.alternatives.items()
    }
    # Any operation may meet an unavailable database (the error middleware answers 503).
    errors = op.errors if any(e.status == 503 for e in op.errors) else (*op.errors, ErrorDoc(503))
    doc["responses"] = successes | {
        str(error.status): _response(_error_response(dialect, error), schemas) for error in errors
    }
    return doc


def _error_response(dialect: Dialect, error: ErrorDoc) -> ResponseDoc:
    response = dialect.error_response(error)
    if error.status in (429, 503):  # in every dialect (set by the middleware)
        response = replace(response, headers={**RETRY_AFTER, **response.headers})
    return response


def _answer(answer: Media | Empty) -> Schema:
    """An answer the handler builds itself: its media type, or no body at all."""
    if isinstance(answer, Empty):
        return {"description": answer.description}
    out: Schema = {
        "description": answer.description,
        "content": {answer.media_type: {"schema": answer.schema}}
        | {media: {"schema": schema} for media, schema in answer.more.items()},
    }
    if answer.headers:
        out["headers"] = answer.headers
    return out


def _response(response: ResponseDoc, schemas: _Schemas) -> Schema:
    out: Schema = {
        "description": response.description,
        "content": {response.media_type: {"schema": schemas(response.model)}},
    }
    if response.headers:
        out["headers"] = response.headers
    return out


def _parameters(where: str, model: type) -> list[Schema]:
    """One parameter per field of a path or query model. A parameter is absent or a value (never
    null), so the null alternative of an optional field is left out."""
    (schema,), components = msgspec.json.schema_components([model], ref_template=REF)
    fields = components[schema["$ref"].rsplit("/", 1)[-1]]
    required = set(fields.get("required", ()))
    out = []
    for name, prop in fields["properties"].items():
        prop = {k: v for k, v in prop.items() if k != "default"}
        alternatives = [s for s in prop.pop("anyOf", ()) if s != NULL]
        if alternatives:
            prop |= alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
        parameter: Schema = {"name": name, "in": where, "required": where == "path" or name in required}
        if "description" in prop:
            parameter["description"] = prop.pop("description")
        out.append(parameter | {"schema": prop})
    return out
