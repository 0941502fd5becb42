"""The OpenAPI 3.0 document of every HTTP operation, kept as data next to the handlers it describes
(tests/test_openapi.py fails when a route is missing from it or it names one that does not exist),
served at GET /openapi.json, and a self-contained HTML page generated from it at GET /docs.

Every GET route also answers HEAD (aiohttp adds it): same status and headers, no body. HEAD is
not listed separately."""

from __future__ import annotations

import html
from typing import Any

import orjson
from aiohttp import web

from bridge import __version__
from bridge.core import ids
from bridge.core.accounts import CREATE_THING_ACTION
from bridge.core.messages import EGRESS, MAX_WAIT, MESSAGE_TYPES
from bridge.core.status import API_VERSION, DEFAULT_UPDATE_RATE, REPORTED_VERSION_KEYS
from bridge.http.envelope import STATUS_TEXT
from bridge.http.things_gateway import MAX_QUERY_INT

Schema = dict[str, Any]
OPENAPI_VERSION = "3.0.3"
# Thing ids, thingType, thingDist and regId share one rule (bridge/core/ids.py); JSON Schema
# patterns search, so anchor it.
NAME_PATTERN = f"^{ids._ID.pattern}$"
ERROR_STATUSES = (400, 401, 403, 404, 405, 409, 413, 429)


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _response_ref(name: str) -> Schema:
    return {"$ref": f"#/components/responses/{name}"}


def _nullable(schema: Schema) -> Schema:
    """OpenAPI 3.0 spelling of "this, or null"."""
    if "$ref" in schema:
        return {"nullable": True, "allOf": [schema]}
    out = {**schema, "nullable": True}
    if "enum" in out:
        out["enum"] = [*out["enum"], None]
    return out


def _object(properties: dict[str, Schema], required: list[str] | None = None, **extra: Any) -> Schema:
    """A closed object: the server's records carry exactly these fields."""
    schema: Schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required is None:
        required = list(properties)
    if required:
        schema["required"] = required
    return {**schema, **extra}


STRING: Schema = {"type": "string"}
# Integers are stored in SQLite, whose INTEGER is 64 bits: the document says so (int64).
INTEGER: Schema = {"type": "integer", "format": "int64"}
EPOCH: Schema = {**INTEGER, "description": "UTC epoch seconds"}
ISO_TIME: Schema = {"type": "string", "format": "date-time", "example": "2019-05-25T22:45:24Z"}
ANY_JSON: Schema = {"nullable": True, "description": "any JSON value"}
ALWAYS_NULL: Schema = {"nullable": True, "enum": [None]}


# ---- schemas ---------------------------------------------------------------------------------------
def _desired_values(description: str) -> Schema:
    return _object(
        {
            "UpdateRate": {"type": "integer", "minimum": 1, "maximum": 24 * 365},
            "AppParam": {"type": "object"},
            "data": {"type": "object"},
            "packageUrl": STRING,
            "version": {**INTEGER, "minimum": 0},
        },
        required=[],
        description=description,
    )


def _changes(with_reg_id: bool) -> Schema:
    """PATCH bodies of the device twin: every field optional, null clears it (back to inherited)."""
    properties: dict[str, Schema] = {}
    if with_reg_id:
        properties["regId"] = _nullable(
            {
                "type": "string",
                "pattern": NAME_PATTERN,
                "description": "the device's portal registration id (null: the thing id only); "
                "409 when another thing uses it or it is another thing's id",
            }
        )
    properties |= {
        "UpdateRate": _nullable(
            {
                "type": "integer",
                "minimum": 1,
                "maximum": 24 * 365,
                "description": "hours between SetStatus calls",
            }
        ),
        "AppParam": _nullable({"type": "object", "description": "the device's desired configuration"}),
        "data": _nullable({"type": "object", "description": "extra parameters GetURL returns"}),
        "packageUrl": _nullable({"type": "string", "description": "URL of the application package"}),
        "version": _nullable({**INTEGER, "minimum": 0, "description": "package version"}),
    }
    return _object(
        properties,
        required=[],
        minProperties=1,
        description="At least one field; unknown fields and wrong types are rejected (400); null clears "
        "a value, so it is inherited again (thing: from the fleet default of its thingType; fleet "
        "default: from the built-in default).",
    )


REPORTED_VERSION: Schema = {
    "anyOf": [{**INTEGER, "minimum": 0}, {"type": "string", "pattern": "^[0-9]+$"}],
    "description": "the package version the device runs, as an integer or a string of digits (other "
    "values are ignored); the first of " + ", ".join(REPORTED_VERSION_KEYS) + " that is one counts",
}


def _device_info(description: str) -> Schema:
    """DeviceInfo / info objects: free-form, but a reported version in them is read."""
    properties = {key: REPORTED_VERSION for key in REPORTED_VERSION_KEYS}
    return _nullable({"type": "object", "description": description, "properties": properties})


SUBSCRIPTION = _object(
    {
        "flsubscriptionspk": STRING,
        "fltimestamp": EPOCH,
        "datecreated": ISO_TIME,
        "common_name": STRING,
        "startts": EPOCH,
        "endts": _nullable({**EPOCH, "description": "UTC epoch seconds; null: open-ended"}),
        "flstatus": STRING,
        "fluserspk": STRING,
        "product_id": STRING,
        "plan_id": STRING,
        "plan_name": STRING,
    }
)

SCHEMAS: dict[str, Schema] = {
    "KeyValue": _object({"key": STRING, "value": STRING}),
    "FlashLexLogin": _object(
        {
            "accessToken": {
                "type": "string",
                "description": "a JWT; send it as "
                "`Authorization: <token>` or `Authorization: Bearer <token>`",
            }
        }
    ),
    "User": _object(
        {
            "fluserspk": STRING,
            "fltimestamp": EPOCH,
            "datecreated": ISO_TIME,
            "emailverified": {"type": "boolean"},
            "username": STRING,
        }
    ),
    "Subscription": SUBSCRIPTION,
    "PolicyStatement": _object(
        {
            "Action": {"type": "string", "example": CREATE_THING_ACTION},
            "Effect": {"type": "string", "enum": ["Allow", "Deny"]},
            "Resource": {"type": "string", "example": "<fluserspk>:thing:*"},
            "AllowedCount": {"type": "integer", "minimum": 0},
            "ActualCount": {"type": "integer", "minimum": 0},
        }
    ),
    "Policy": _object({"Statement": {"type": "array", "items": ref("PolicyStatement")}}),
    "SubscriptionPolicy": _object({"subscription": ref("Subscription"), "policy": ref("Policy")}),
    "Thing": _object(
        {
            "flthingspk": STRING,
            "fltimestamp": EPOCH,
            "datecreated": ISO_TIME,
            "certificateId": {"type": "string", "description": "SHA-256 of the certificate (hex)"},
            "fluserspk": STRING,
            "certificatePem": STRING,
            "keyPairPrivate": _nullable(
                {
                    "type": "string",
                    "description": "PEM private key; null when the thing was created from a CSR",
                }
            ),
            "keyPairPublic": STRING,
            "testStatus": STRING,
            "thingDist": STRING,
            "thingName": STRING,
            "thingType": STRING,
            "keyType": {"type": "string", "enum": ["RSA", "EC"]},
            "enabled": {"type": "boolean", "description": "false: suspended (extension)"},
        }
    ),
    "CreateThingRequest": _object(
        {
            "flthingspk": _nullable(
                {
                    "type": "string",
                    "pattern": NAME_PATTERN,
                    "not": {"enum": sorted(ids.RESERVED_THING_IDS)},
                    "description": "the thing id (not `app`); default: a new UUID",
                }
            ),
            "thingName": _nullable(
                {"type": "string", "minLength": 1, "maxLength": 256, "description": "default: the thing id"}
            ),
            "thingType": _nullable({"type": "string", "pattern": NAME_PATTERN, "default": "generic"}),
            "thingDist": _nullable({"type": "string", "pattern": NAME_PATTERN, "default": "mosquitto"}),
            "keyType": _nullable(
                {
                    "type": "string",
                    "enum": ["RSA", "EC"],
                    "description": "key pair the bridge generates (default: pki.default_key_type); not with csr",
                }
            ),
            "csr": _nullable(
                {
                    "type": "string",
                    "description": "PEM certificate signing request: the "
                    "bridge keeps no private key (keyPairPrivate is null); not with keyType",
                }
            ),
        },
        required=[],
        description="Every field is optional (an empty body is `{}`); null means absent; unknown fields "
        "are rejected (400).",
    ),
    "UpdateThingRequest": _object(
        {
            "enabled": _nullable(
                {
                    "type": "boolean",
                    "description": "false suspends the thing (its sessions "
                    "close at once), true resumes it; absent or null: no change",
                }
            )
        },
        required=[],
        description="Extension. A JSON object is required; unknown fields are rejected (400).",
    ),
    "Message": _object(
        {
            "flmessagespk": STRING,
            "fltimestamp": EPOCH,
            "datecreated": ISO_TIME,
            "flthingspk": STRING,
            "fluserspk": STRING,
            "messagetype": {"type": "string", "enum": list(MESSAGE_TYPES)},
            "message": {
                **ANY_JSON,
                "description": "the payload: the JSON value (encoding json), the text "
                "(text) or base64 of the bytes (base64)",
            },
            "encoding": {"type": "string", "enum": ["json", "text", "base64"]},
        }
    ),
    "CollectResult": _object(
        {
            "message": {"type": "string", "enum": ["Message Collected"]},
            "flthingspk": STRING,
            "flmessagespk": STRING,
        }
    ),
    "PublishResult": _object({"flmessagespk": STRING, "flthingspk": STRING}),
    "DeletedMessages": _object({"deleted": {"type": "integer", "minimum": 0}}),
    "DesiredValues": _desired_values(
        "The values set on this level (thing or fleet default); absent: inherited."
    ),
    "ConfigDocument": _object(
        {
            "UpdateRate": {"type": "integer", "minimum": 1},
            "AppParam": {"type": "object"},
            "data": {"type": "object"},
            "packageUrl": STRING,
            "version": {**INTEGER, "minimum": 0},
        },
        description="The effective configuration: the thing's own values over its fleet defaults over "
        f"the built-in defaults (UpdateRate {DEFAULT_UPDATE_RATE}, empty AppParam and data, packageUrl "
        '"", version 0); retained on MQTT things/{id}/config.',
    ),
    "ThingState": _object(
        {
            "flthingspk": STRING,
            "thingName": STRING,
            "thingType": STRING,
            "regId": {"type": "string", "description": "the portal regId (the thing id unless one was set)"},
            "desired": ref("DesiredValues"),
            "effective": ref("ConfigDocument"),
            "reported": _object(
                {
                    "status": _nullable(STRING),
                    "info": _nullable({"type": "object"}),
                    "ts": _nullable({"type": "number", "description": "UTC epoch seconds"}),
                    "transport": _nullable({"type": "string", "enum": ["http", "mqtt"]}),
                    "runningVersion": _nullable(INTEGER),
                },
                description="The last SetStatus (HTTP) or things/{id}/status (MQTT) report; nulls before one.",
            ),
            "configState": {
                "type": "string",
                "enum": ["reboot", "new", "sync"],
                "description": "what SetStatus would answer now",
            },
            "presence": _object(
                {
                    "state": {"type": "string", "enum": ["online", "offline"]},
                    "ts": _nullable(
                        {"type": "number", "description": "UTC epoch seconds of the last change"}
                    ),
                }
            ),
        },
        description="The operator's view of one thing's device twin.",
    ),
    "FleetDefaults": _object({"thingType": STRING, "defaults": ref("DesiredValues")}),
    "ThingChanges": _changes(with_reg_id=True),
    "FleetChanges": _changes(with_reg_id=False),
    "BrokerStats": _object(
        {
            name: {"type": "integer", "minimum": 0}
            for name in (
                "connections",
                "sessions",
                "retainedMessages",
                "refusedConnects",
                "deniedPublishes",
                "deniedSubscribes",
                "droppedMessages",
                "droppedQueuedMessages",
                "queuedMessages",
                "refusedRetainedPublishes",
            )
        }
        | {
            "refusedByReason": {
                "type": "object",
                "additionalProperties": {"type": "integer", "minimum": 0},
                "description": "refused CONNECTs by reason: bad_password, rate_limited, client_id_mismatch,"
                " unknown_certificate, no_certificate, no_credentials, will_not_permitted",
            },
            "passwordChecks": {
                "type": "object",
                "additionalProperties": {"type": "integer", "minimum": 0},
                "description": "password checks of GET /dev/v1/token and the plain MQTT listener: verified,"
                " rejected, cacheHits, rateLimited, busy, trackedKeys, evictedKeys",
            },
        },
        required=[],
        description="Counters of the embedded MQTT broker.",
    ),
    # ---- partner portal ----
    "GetURLRequest": {
        "type": "object",
        "required": ["regId"],
        "properties": {
            "regId": {"type": "string", "description": "the device's registration id (or its thing id)"},
            "DeviceInfo": _device_info("Device info as [name]: [value]."),
        },
        "description": "Fields not named here are accepted and ignored.",
    },
    "SetStatusRequest": {
        "type": "object",
        "required": ["regId", "status"],
        "properties": {
            "regId": STRING,
            "status": {"type": "string", "minLength": 1, "maxLength": 256, "example": "Alive"},
            "info": _device_info("Any other parameters about the status; stored as reported."),
        },
        "description": "Fields not named here are accepted and ignored.",
    },
    "GetConfigRequest": {
        "type": "object",
        "required": ["regId"],
        "properties": {
            "regId": STRING,
            "DeviceInfo": _device_info("Device info as [name]: [value]; not used."),
        },
        "description": "Fields not named here are accepted and ignored.",
    },
    "GetURLResponse": _object(
        {
            "packageUrl": STRING,
            "version": {**INTEGER, "minimum": 0},
            "data": {"type": "object"},
            "setStatusUrl": {
                "type": "string",
                "pattern": "^(GET|POST) https?://",
                "description": '"<METHOD> <absolute URL>": the variant the device used',
            },
            "getConfigUrl": {"type": "string", "pattern": "^(GET|POST) https?://"},
            "apiVersion": {"type": "number", "enum": [API_VERSION]},
        }
    ),
    "SetStatusResponse": _object(
        {
            "config": {
                "type": "string",
                "enum": ["reboot", "new", "sync"],
                "description": "reboot: a newer package is desired than the device runs; new: the "
                "configuration changed since it last called GetConfig; sync: nothing to do",
            }
        }
    ),
    "GetConfigResponse": _object(
        {
            "UpdateRate": {"type": "integer", "minimum": 1, "description": "hours between SetStatus calls"},
            "AppParam": {"type": "object", "description": "the device's desired configuration"},
        }
    ),
    "PortalError": _object({"error": {"type": "string", "description": "why the request failed"}}),
}


def _envelope(result: Schema, status: int = 200, description: str = "") -> Schema:
    """The RestResponse envelope; errors use it too, with code = the HTTP status."""
    extra = {"description": description} if description else {}
    return _object(
        {
            "status": {"type": "string", "enum": [STATUS_TEXT[status]]},
            "code": {"type": "integer", "enum": [status]},
            "messages": {
                "type": "array",
                "minItems": 1,
                "items": ref("KeyValue"),
                "description": "messages[0] is {key: message, value: <what happened>}",
            },
            "result": result,
        },
        **extra,
    )


ENVELOPES: dict[str, Schema] = {
    "RestResponse": _envelope(ALWAYS_NULL, description="Success without a result."),
    "RestResponseUser": _envelope(ref("User")),
    "RestResponseSubscriptions": _envelope({"type": "array", "items": ref("Subscription")}),
    "RestResponseSubscription": _envelope(ref("Subscription")),
    "RestResponseSubscriptionPolicy": _envelope(ref("SubscriptionPolicy")),
    "RestResponseThings": _envelope({"type": "array", "items": ref("Thing")}),
    "RestResponseThing": _envelope(ref("Thing")),
    "RestResponseMessages": _envelope({"type": "array", "items": ref("Message")}),
    "RestResponseMessageCollection": _envelope(ref("CollectResult")),
    "RestResponsePublish": _envelope(ref("PublishResult")),
    "RestResponseDeletedMessages": _envelope(ref("DeletedMessages")),
    "RestResponseThingState": _envelope(ref("ThingState")),
    "RestResponseFleet": _envelope({"type": "array", "items": ref("ThingState")}),
    "RestResponseFleetDefaults": _envelope(ref("FleetDefaults")),
    "RestResponseBrokerStats": _envelope(ref("BrokerStats")),
    "RestResponseQuotaExceeded": _envelope(
        ref("SubscriptionPolicy"), 403, "The subscription's thing quota is used up: the policy is the result."
    ),
    **{f"RestResponseError{status}": _envelope(ALWAYS_NULL, status) for status in ERROR_STATUSES},
}
SCHEMAS.update(ENVELOPES)


# ---- responses ---------------------------------------------------------------------------------------
def _json(schema: Schema, description: str, headers: dict[str, Schema] | None = None) -> Schema:
    response: Schema = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _header(description: str, schema: Schema | None = None) -> Schema:
    return {"description": description, "required": True, "schema": schema or STRING}


ERROR_TEXT = {
    400: "Bad request: malformed JSON, not an object, unknown field, wrong type, invalid value.",
    401: "Missing, malformed, expired, revoked or wrong credentials.",
    403: "Authenticated but not allowed.",
    404: "No such resource (another user's thing answers 404 too).",
    405: "Method not allowed on this path (any path under /dev/v1).",
    409: "Conflict with an existing resource.",
    413: "The request body is larger than http.max_body, or the message larger than messages.max_payload.",
    429: "Too many failed logins from this address or for this name (exponential back-off), or too many"
    " password checks in progress.",
}
RESPONSES: dict[str, Schema] = {
    f"Error{status}": _json(
        ref(f"RestResponseError{status}"),
        ERROR_TEXT[status],
        {
            "WWW-Authenticate": _header(
                "the challenge: Bearer realm=... (Basic realm=... on GET /dev/v1/token)"
            )
        }
        if status == 401
        else {"Allow": _header("the methods this path allows")}
        if status == 405
        else None,
    )
    for status in ERROR_STATUSES
}
RESPONSES["Error429"]["headers"] = {
    "Retry-After": _header("whole seconds to wait", {"type": "string", "pattern": "^[1-9][0-9]*$"})
}
RESPONSES["PortalFailed"] = _json(
    ref("PortalError"),
    "Failed: missing or unknown regId, missing status, wrong types, malformed JSON (every failure the "
    "portal document knows is 400).",
)
RESPONSES["PortalTooLarge"] = _json(ref("PortalError"), "The request body is larger than http.max_body.")


def _errors(*statuses: int) -> dict[str, Schema]:
    return {str(status): _response_ref(f"Error{status}") for status in statuses}


def _ok(envelope: str, description: str = "Successful response.") -> dict[str, Schema]:
    return {"200": _json(ref(envelope), description)}


def _zip(description: str) -> dict[str, Schema]:
    return {
        "200": {
            "description": description,
            "headers": {
                "Content-Disposition": _header(
                    'attachment; filename="..."', {"type": "string", "pattern": "^attachment; filename="}
                )
            },
            "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
        }
    }


# ---- parameters --------------------------------------------------------------------------------------
def _path(name: str, description: str, **schema: Any) -> Schema:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", "minLength": 1, **schema},
    }


def _query(name: str, schema: Schema, description: str, required: bool = False) -> Schema:
    return {"name": name, "in": "query", "required": required, "description": description, "schema": schema}


THING_ID = _path("thing_id", "the thing id (flthingspk)")
# Integer query parameters beyond +-MAX_QUERY_INT answer 400.
QUERY_EPOCH: Schema = {**EPOCH, "minimum": -MAX_QUERY_INT, "maximum": MAX_QUERY_INT}
SELECTION = [
    _query("startts", QUERY_EPOCH, "from this UTC epoch second (inclusive)"),
    _query("endts", QUERY_EPOCH, "to this UTC epoch second (inclusive); not before startts"),
    _query("messagetype", {"type": "string", "enum": list(MESSAGE_TYPES)}, "only messages of this type"),
]
PAGING = [
    _query("after", STRING, "only messages after this flmessagespk (a cursor; 400 when no such message)"),
    _query(
        "limit",
        {**INTEGER, "minimum": 1, "maximum": MAX_QUERY_INT},
        "at most this many records (capped by messages.page_limit)",
    ),
]
WAIT = _query(
    "wait",
    {"type": "number", "minimum": 0, "maximum": MAX_WAIT},
    f"long-poll: with messagetype={EGRESS} (and usually after), wait up to this many seconds for the next "
    "egress message; [] when none came",
)

# ---- security ----------------------------------------------------------------------------------------
USER = [{"auth": []}, {"authToken": []}]
THING = [{"thingJwt": []}]
SECURITY_SCHEMES: dict[str, Schema] = {
    "basicAuth": {
        "type": "http",
        "scheme": "basic",
        "description": "Username and password; only for GET /dev/v1/token.",
    },
    "auth": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "The access token from GET /dev/v1/token: `Authorization: Bearer <token>`.",
    },
    "authToken": {
        "type": "apiKey",
        "in": "header",
        "name": "Authorization",
        "description": "The same access token sent raw, `Authorization: <token>` (the document's custom "
        "authorizer form).",
    },
    "thingJwt": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "verifyThing: a JWT signed with the thing's own private key (RS256 for RSA, ES256 "
        "for EC keys), header `kid` = thing id and/or claim `iss` = `urn:thing:<id>`, `exp` required, "
        "`nbf` honoured, lifetime at most 24 h, naming the thing in the path. On the HTTPS port the "
        "thing's client certificate (issued by the bridge CA) is accepted instead of the token; OpenAPI "
        "3.0 cannot express mutual TLS, so it is only described here.",
    },
}


# ---- operations --------------------------------------------------------------------------------------
def _op(
    op_id: str,
    tag: str,
    summary: str,
    responses: dict[str, Schema],
    *,
    security: list[Schema] | None = None,
    parameters: list[Schema] | None = None,
    body: Schema | None = None,
    description: str | None = None,
) -> Schema:
    op: Schema = {"operationId": op_id, "tags": [tag], "summary": summary}
    if description:
        op["description"] = description
    op["security"] = security if security is not None else []
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = body
    op["responses"] = responses
    return op


def _json_body(schema: Schema, required: bool, description: str) -> Schema:
    return {
        "description": description,
        "required": required,
        "content": {"application/json": {"schema": schema}},
    }


MESSAGE_BODY = {
    "description": "The message: JSON with Content-Type application/json (must parse), text with text/* "
    "(must be UTF-8); any other type is stored as JSON when it parses, else text when UTF-8, else "
    "base64. Empty: 400.",
    "required": True,
    "content": {
        "application/json": {"schema": ANY_JSON},
        "text/plain": {"schema": {"type": "string"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}


def _portal(name: str, summary: str, response: str, get_params: list[Schema], body: str) -> dict[str, Schema]:
    common = {"400": _response_ref("PortalFailed")}
    return {
        "get": _op(
            f"portal{name}Get",
            "portal",
            f"{summary} (query string)",
            {"200": _json(ref(response), "Success."), **common},
            parameters=get_params,
            description="For devices registered with a completeUrl. The device is identified by regId alone "
            "(no other authentication); other query parameters are ignored.",
        ),
        "post": _op(
            f"portal{name}Post",
            "portal",
            f"{summary} (JSON body)",
            {"200": _json(ref(response), "Success."), **common, "413": _response_ref("PortalTooLarge")},
            body=_json_body(ref(body), True, "A JSON object; fields not named are ignored."),
            description="For devices registered with a base url. The device is identified by regId alone.",
        ),
    }


REG_ID = _query("regId", {"type": "string"}, "the device's registration id (or its thing id)", required=True)

PATHS: dict[str, dict[str, Schema]] = {
    "/dev/v1/token": {
        "get": _op(
            "getToken",
            "auth",
            "Log in: an access token for Basic credentials",
            {"200": _json(ref("FlashLexLogin"), "The access token."), **_errors(401, 429)},
            security=[{"basicAuth": []}],
            description="The token is a JWT valid for accounts.token_ttl seconds unless revoked.",
        ),
        "delete": _op(
            "revokeToken",
            "auth",
            "Revoke the presented access token (extension)",
            {**_ok("RestResponse", "Token revoked."), **_errors(401)},
            security=USER,
        ),
    },
    "/dev/v1/users/{sub}": {
        "get": _op(
            "getUser",
            "users",
            "The caller's own user record",
            {**_ok("RestResponseUser"), **_errors(401, 403)},
            security=USER,
            parameters=[_path("sub", "the user id (fluserspk); only the caller's own")],
            description="Another user's id answers 403 (whether or not it exists).",
        )
    },
    "/dev/v1/subscriptions": {
        "get": _op(
            "listSubscriptions",
            "subscriptions",
            "All subscriptions of the account",
            {**_ok("RestResponseSubscriptions"), **_errors(401)},
            security=USER,
        )
    },
    "/dev/v1/subscriptions/active": {
        "get": _op(
            "activeSubscription",
            "subscriptions",
            "The active subscription and its policy",
            {**_ok("RestResponseSubscriptionPolicy"), **_errors(401)},
            security=USER,
            description=f"The free plan when none is active; the {CREATE_THING_ACTION} statement counts things.",
        )
    },
    "/dev/v1/subscriptions/{subscription_id}": {
        "get": _op(
            "getSubscription",
            "subscriptions",
            "One subscription of the account",
            {**_ok("RestResponseSubscription"), **_errors(401, 404)},
            security=USER,
            parameters=[
                _path(
                    "subscription_id",
                    "flsubscriptionspk (`active` is the route above)",
                    **{"not": {"enum": ["active"]}},
                )
            ],
        )
    },
    "/dev/v1/things": {
        "get": _op(
            "listThings",
            "things",
            "All things of the account",
            {**_ok("RestResponseThings"), **_errors(401)},
            security=USER,
        ),
        "post": _op(
            "createThing",
            "things",
            "Create a thing: key pair (or CSR), certificate from the bridge CA",
            {
                **_ok("RestResponseThing", "Successful create."),
                **_errors(400, 401),
                "403": _json(ref("RestResponseQuotaExceeded"), "Over the subscription's thing quota."),
                **_errors(409, 413),
            },
            security=USER,
            body=_json_body(ref("CreateThingRequest"), False, "The new thing; empty body: all defaults."),
            description="409 when the id exists or is another thing's regId.",
        ),
    },
    "/dev/v1/things/{thing_id}": {
        "get": _op(
            "getThing",
            "things",
            "One thing",
            {**_ok("RestResponseThing"), **_errors(401, 404)},
            security=USER,
            parameters=[THING_ID],
        ),
        "patch": _op(
            "updateThing",
            "things",
            "Suspend or resume a thing (extension)",
            {**_ok("RestResponseThing", "The thing (updated)."), **_errors(400, 401, 404, 413)},
            security=USER,
            parameters=[THING_ID],
            body=_json_body(ref("UpdateThingRequest"), True, '{"enabled": false} suspends, true resumes.'),
        ),
        "delete": _op(
            "deleteThing",
            "things",
            "Delete a thing: revoke its certificate, close its sessions, delete its messages",
            {**_ok("RestResponse", "Successful delete."), **_errors(401, 404)},
            security=USER,
            parameters=[THING_ID],
        ),
    },
    "/dev/v1/things/{thing_id}/dist": {
        "get": _op(
            "thingDist",
            "things",
            "The thing's bundle: certificate, keys, CA, thing.json, README.txt",
            {**_zip("A zip archive (raw bytes)."), **_errors(401, 404)},
            security=USER,
            parameters=[THING_ID],
        )
    },
    "/dev/v1/things/{thing_id}/collect": {
        "post": _op(
            "collect",
            "messages",
            "A thing sends a message (ingress)",
            {**_ok("RestResponseMessageCollection", "Message Collected."), **_errors(400, 401, 404, 413)},
            security=THING,
            parameters=[THING_ID],
            body=MESSAGE_BODY,
            description="verifyThing: the thing's JWT (or client certificate on HTTPS). 404 when the token "
            "names a thing that does not exist.",
        )
    },
    "/dev/v1/things/{thing_id}/publish": {
        "post": _op(
            "publish",
            "messages",
            "The owner sends a message to the thing (egress)",
            {**_ok("RestResponsePublish", "Message Published."), **_errors(400, 401, 404, 413)},
            security=USER,
            parameters=[THING_ID],
            body=MESSAGE_BODY,
            description="Delivered on MQTT things/{id}/publish and to HTTP long-polls of the thing.",
        )
    },
    "/dev/v1/things/{thing_id}/messages": {
        "get": _op(
            "listMessages",
            "messages",
            "Message history; the thing's own long-poll for egress messages",
            {**_ok("RestResponseMessages"), **_errors(400, 401, 403, 404)},
            security=[*USER, *THING],
            parameters=[THING_ID, *SELECTION, *PAGING, WAIT],
            description="The owner reads every message type; wait needs messagetype=egress (400 otherwise). "
            "The thing itself (its JWT or client certificate) reads only its egress messages (403 for "
            "other types) and may long-poll with after and wait: how an HTTP-only device receives.",
        ),
        "delete": _op(
            "deleteMessages",
            "messages",
            "Delete the selected messages (no selection: all)",
            {**_ok("RestResponseDeletedMessages", "Successful delete."), **_errors(400, 401, 404)},
            security=USER,
            parameters=[THING_ID, *SELECTION],
            description="after, limit and wait are rejected (400).",
        ),
    },
    "/dev/v1/things/{thing_id}/archive": {
        "get": _op(
            "archiveMessages",
            "messages",
            "The selected messages as a zip holding one JSON file",
            {**_zip("A zip archive (raw bytes) with <thing_id>-messages.json."), **_errors(400, 401, 404)},
            security=USER,
            parameters=[THING_ID, *SELECTION, *PAGING],
        )
    },
    "/dev/v1/things/{thing_id}/state": {
        "get": _op(
            "thingState",
            "device twin",
            "The thing's device twin",
            {**_ok("RestResponseThingState"), **_errors(401, 404)},
            security=USER,
            parameters=[THING_ID],
        )
    },
    "/dev/v1/things/{thing_id}/desired": {
        "patch": _op(
            "setDesired",
            "device twin",
            "Set or clear the thing's own desired values and regId",
            {**_ok("RestResponseThingState", "Desired state updated."), **_errors(400, 401, 404, 409, 413)},
            security=USER,
            parameters=[THING_ID],
            body=_json_body(ref("ThingChanges"), True, "The changes."),
            description="The new config document is published retained on MQTT things/{id}/config.",
        )
    },
    "/dev/v1/fleet": {
        "get": _op(
            "fleet",
            "device twin",
            "The device twin of every thing of the account",
            {**_ok("RestResponseFleet"), **_errors(401)},
            security=USER,
            parameters=[_query("thingType", STRING, "only things of this thingType")],
        )
    },
    "/dev/v1/fleet/defaults/{thing_type}": {
        "get": _op(
            "getFleetDefaults",
            "device twin",
            "Defaults the account's things of one thingType inherit",
            {**_ok("RestResponseFleetDefaults"), **_errors(401)},
            security=USER,
            parameters=[_path("thing_type", "a thingType")],
            description="A thingType nobody set answers empty defaults.",
        ),
        "patch": _op(
            "setFleetDefaults",
            "device twin",
            "Set or clear the defaults of one thingType",
            {**_ok("RestResponseFleetDefaults", "Fleet defaults updated."), **_errors(400, 401, 413)},
            security=USER,
            parameters=[_path("thing_type", "a thingType (else 400)", pattern=NAME_PATTERN)],
            body=_json_body(ref("FleetChanges"), True, "The changes."),
            description="Every thing of that type without its own value gets the new config document at once.",
        ),
    },
    "/dev/v1/broker/stats": {
        "get": _op(
            "brokerStats",
            "operations",
            "Broker statistics (admins only)",
            {**_ok("RestResponseBrokerStats"), **_errors(401, 403)},
            security=USER,
        )
    },
    "/GetURL": _portal(
        "GetURL",
        "The current package, extra data and the device's SetStatus/GetConfig endpoints",
        "GetURLResponse",
        [REG_ID],
        "GetURLRequest",
    ),
    "/SetStatus": _portal(
        "SetStatus",
        "Report the device's status; the answer says whether to reboot, fetch config or nothing",
        "SetStatusResponse",
        [
            REG_ID,
            _query(
                "status", {"type": "string", "minLength": 1, "maxLength": 256}, "e.g. Alive", required=True
            ),
        ],
        "SetStatusRequest",
    ),
    "/GetConfig": _portal(
        "GetConfig",
        "The desired configuration (marked as fetched)",
        "GetConfigResponse",
        [REG_ID],
        "GetConfigRequest",
    ),
    "/openapi.json": {
        "get": _op(
            "openapi",
            "meta",
            "This document",
            {"200": _json({"type": "object"}, "The OpenAPI document.")},
        )
    },
    "/docs": {
        "get": _op(
            "docs",
            "meta",
            "This document as a readable page",
            {"200": {"description": "Self-contained HTML.", "content": {"text/html": {"schema": STRING}}}},
        )
    },
}

DOCUMENT: Schema = {
    "openapi": OPENAPI_VERSION,
    "info": {
        "title": "thingbridge",
        "version": __version__,
        "description": "An MQTT-first IoT bridge. Things-gateway dialect under /dev/v1: responses are the "
        "RestResponse envelope {status, code, messages: [{key, value}], result}; errors use it too, with "
        "code = the HTTP status and the reason in messages[0].value. Partner-portal dialect at /GetURL, "
        '/SetStatus and /GetConfig: JSON bodies, every failure 400 {"error": "..."}. Every GET also '
        "answers HEAD. A method a path does not allow answers 405 with Allow (the envelope under /dev/v1, "
        '{"error"} elsewhere); an unknown path 404.',
    },
    "servers": [{"url": "/"}],
    "tags": [
        {"name": name}
        for name in (
            "auth",
            "users",
            "subscriptions",
            "things",
            "messages",
            "device twin",
            "operations",
            "portal",
            "meta",
        )
    ],
    "paths": PATHS,
    "components": {"schemas": SCHEMAS, "responses": RESPONSES, "securitySchemes": SECURITY_SCHEMES},
}


# ---- the HTML page ------------------------------------------------------------------------------------
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
        text = " | ".join(html.escape(orjson.dumps(v).decode()) for v in schema["enum"])
    elif schema.get("type") == "array":
        text = f"array of {_type_html(schema.get('items', {}))}"
    else:
        text = html.escape(schema.get("type", "any JSON value"))
        if "format" in schema:
            text += f" ({html.escape(schema['format'])})"
    if schema.get("nullable") and "null" not in text:
        text += " | null"
    return text


def _constraints(schema: Schema) -> str:
    parts = []
    for key in ("minimum", "maximum", "minLength", "maxLength", "minProperties", "pattern", "default"):
        if key in schema:
            parts.append(f"{key} {schema[key]}")
    if "not" in schema:
        parts.append(f"not {orjson.dumps(schema['not']).decode()}")
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
            f"<td>{_e(_resolve(doc, sub).get('description', ''))}</td></tr>"
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


DOCUMENT_JSON = orjson.dumps(DOCUMENT)
DOCS_HTML = render_html(DOCUMENT)

routes = web.RouteTableDef()


@routes.get("/openapi.json")
async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=DOCUMENT_JSON, content_type="application/json")


@routes.get("/docs")
async def docs(request: web.Request) -> web.Response:
    return web.Response(text=DOCS_HTML, content_type="text/html")
