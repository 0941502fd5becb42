"""The API's own description, served at the root: GET /openapi.json (the generated document) and
GET /docs, a self-contained HTML page rendered from it (no scripts, no CDN)."""

from __future__ import annotations

import html
from typing import Any

import msgspec
from aiohttp import web

from bridge.http.common.dialect import Dialect
from bridge.http.common.models import Schema
from bridge.http.common.operation import Call, Media, Operations

OPENAPI_JSON = web.AppKey("openapi_json", bytes)
DOCS_HTML = web.AppKey("docs_html", str)

api = Operations()


@api.get(
    "/openapi.json",
    "This document",
    tag="meta",
    answer=Media("application/json", "The OpenAPI document.", {"type": "object"}),
)
async def openapi(call: Call[None, None, None, None]) -> web.Response:
    return web.Response(body=call.request.app[OPENAPI_JSON], content_type="application/json")


@api.get(
    "/docs",
    "This document as a readable page",
    tag="meta",
    answer=Media("text/html", "Self-contained HTML.", {"type": "string"}),
)
async def docs(call: Call[None, None, None, None]) -> web.Response:
    return web.Response(text=call.request.app[DOCS_HTML], content_type="text/html")


# Not configurable: where clients look for a description. Errors in the plain {"error"} shape.
META = Dialect("meta", "", (api,))


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _resolve(doc: Schema, node: Schema) -> Schema:
    while "$ref" in node:
        section, name = node["$ref"].split("/")[-2:]
        node = doc["components"][section][name]
    return node


def _type_html(schema: Schema) -> str:
    """A schema's type in a few words, escaped, named schemas linked to their section."""
    if "$ref" in schema:
        name = html.escape(schema["$ref"].rsplit("/", 1)[-1])
        return f'<a href="#schema-{name}">{name}</a>'
    if "allOf" in schema or "anyOf" in schema:
        parts = schema.get("allOf") or schema["anyOf"]
        text = (" & " if "allOf" in schema else " or ").join(_type_html(s) for s in parts)
    elif "enum" in schema:
        text = " | ".join(html.escape(_json(v)) for v in schema["enum"])
    elif schema.get("type") == "array":
        text = f"array of {_type_html(schema.get('items', {}))}"
    else:
        text = html.escape(schema.get("type", "any JSON value"))
        if "format" in schema:
            text += f" ({html.escape(schema['format'])})"
    return text


def _main(schema: Schema) -> Schema:
    """Where an optional field's constraints and description are: its alternative that is not null
    (msgspec writes `X | None` as anyOf [X, null]), merged with what is said of the whole."""
    alternatives = [s for s in schema.get("anyOf", ()) if s.get("type") != "null"]
    return {**alternatives[0], **schema} if len(alternatives) == 1 else schema


def _constraints(schema: Schema) -> str:
    schema = _main(schema)
    parts = []
    for key in ("minimum", "maximum", "minLength", "maxLength", "minProperties", "pattern", "default"):
        if key in schema:
            parts.append(f"{key} {schema[key]}")
    if "not" in schema:
        parts.append(f"not {_json(schema['not'])}")
    return "; ".join(parts)


def _e(text: object) -> str:
    return html.escape(str(text))


def _field_rows(doc: Schema, target: Schema, prefix: str = "") -> str:
    """One row per field; the fields of an inline object follow as `parent.field`."""
    required = set(target.get("required", []))
    rows = []
    for name, sub in target.get("properties", {}).items():
        rows.append(
            f"<tr><td><code>{_e(prefix + name)}</code>{' *' if name in required else ''}</td>"
            f"<td>{_type_html(sub)}</td><td>{_e(_constraints(sub))}</td>"
            f"<td>{_e(_resolve(doc, _main(sub)).get('description', ''))}</td></tr>"
        )
        if "$ref" not in sub and "properties" in sub:
            rows.append(_field_rows(doc, sub, f"{prefix}{name}."))
    return "".join(rows)


def _fields_table(doc: Schema, schema: Schema) -> str:
    target = _resolve(doc, schema)
    if not target.get("properties"):
        return ""
    closed = (
        "unknown fields rejected" if target.get("additionalProperties") is False else "other fields ignored"
    )
    return (
        "<table><tr><th>field</th><th>type</th><th>constraints</th><th>description</th></tr>"
        f"{_field_rows(doc, target)}</table><p class=note>* required; {closed}.</p>"
    )


def _body_html(doc: Schema, schema: Schema) -> str:
    """A response body's type; for the envelope, the type of its result too."""
    result = _resolve(doc, schema).get("properties", {}).get("result")
    return _type_html(schema) + (f" (result: {_type_html(result)})" if result is not None else "")


def _operation_html(doc: Schema, path: str, method: str, op: Schema) -> str:
    anchor = op["operationId"]
    out = [
        f'<section id="{_e(anchor)}"><h3><span class="m {method}">{method.upper()}</span> <code>{_e(path)}</code></h3>',
        f"<p><b>{_e(op['summary'])}</b></p>",
    ]
    if op.get("description"):
        out.append(f"<p>{_e(op['description'])}</p>")
    schemes = [name for alternative in op["security"] for name in alternative]
    out.append(f"<p>Authentication: {_e(' or '.join(schemes) if schemes else 'none')}</p>")
    if op.get("parameters"):
        rows = "".join(
            f"<tr><td><code>{_e(p['name'])}</code></td><td>{_e(p['in'])}</td><td>{_type_html(p['schema'])}</td>"
            f"<td>{'yes' if p.get('required') else 'no'}</td><td>{_e(_constraints(p['schema']))}</td>"
            f"<td>{_e(p.get('description', ''))}</td></tr>"
            for p in op["parameters"]
        )
        out.append(
            "<h4>Parameters</h4><table><tr><th>name</th><th>in</th><th>type</th><th>required</th>"
            f"<th>constraints</th><th>description</th></tr>{rows}</table>"
        )
    if "requestBody" in op:
        body = op["requestBody"]
        out.append(f"<h4>Request body{' (required)' if body.get('required') else ' (optional)'}</h4>")
        out.append(f"<p>{_e(body.get('description', ''))}</p>")
        for media, content in body["content"].items():
            out.append(f"<p><code>{_e(media)}</code>: {_type_html(content['schema'])}</p>")
            out.append(_fields_table(doc, content["schema"]))
    out.append("<h4>Responses</h4><table><tr><th>status</th><th>description</th><th>body</th></tr>")
    for status, response in op["responses"].items():
        response = _resolve(doc, response)
        bodies = ", ".join(
            f"{_e(media)}: {_body_html(doc, content['schema'])}"
            for media, content in response.get("content", {}).items()
        )
        headers = ", ".join(_e(h) for h in response.get("headers", {}))
        if headers:
            bodies += f"; headers: {headers}"
        out.append(f"<tr><td>{_e(status)}</td><td>{_e(response['description'])}</td><td>{bodies}</td></tr>")
    out.append("</table></section>")
    return "".join(out)


STYLE = """
body{font-family:system-ui,sans-serif;max-width:70rem;margin:auto;padding:1rem;line-height:1.4}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.2rem .5rem;text-align:left;vertical-align:top}
section{border-top:1px solid #ddd;padding-top:.5rem}.m{font-family:monospace;padding:0 .3rem;color:#fff;background:#555}
.get{background:#2a7}.post{background:#27c}.patch{background:#c80}.delete{background:#c33}.note{font-size:.85em;color:#555}
"""


def render_html(doc: Schema) -> str:
    """A readable page with every operation, generated from the document (no scripts, no CDN)."""
    info = doc["info"]
    toc, sections = [], []
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            toc.append(
                f'<li><a href="#{_e(op["operationId"])}"><code>{method.upper()} {_e(path)}</code></a> {_e(op["summary"])}</li>'
            )
            sections.append(_operation_html(doc, path, method, op))
    schemes = "".join(
        f"<li><b>{_e(name)}</b> ({_e(s['type'])}{' ' + _e(s['scheme']) if 'scheme' in s else ''}): {_e(s.get('description', ''))}</li>"
        for name, s in doc["components"]["securitySchemes"].items()
    )
    schemas = "".join(
        f'<section id="schema-{_e(name)}"><h3>{_e(name)}</h3><p>{_e(s.get("description", ""))}</p>{_fields_table(doc, s)}</section>'
        for name, s in doc["components"]["schemas"].items()
    )
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(info['title'])} {_e(info['version'])} API</title>"
        f"<style>{STYLE}</style></head><body><h1>{_e(info['title'])} {_e(info['version'])}</h1>"
        f'<p>{_e(info["description"])}</p><p>Machine-readable: <a href="/openapi.json">/openapi.json</a> '
        f"(OpenAPI {_e(doc['openapi'])}).</p><h2>Authentication</h2><ul>{schemes}</ul>"
        f"<h2>Operations</h2><ul>{''.join(toc)}</ul>{''.join(sections)}<h2>Schemas</h2>{schemas}</body></html>"
    )
