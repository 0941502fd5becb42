"""The things-gateway dialect's JSON shapes, with the document's field names, and the functions
that fill them from core records."""

from __future__ import annotations

from functools import cache
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec
from msgspec import UNSET, Meta, UnsetType

from bridge.core import accounts, ids, messages, things
from bridge.core.accounts import CREATE_THING_ACTION
from bridge.core.messages import MAX_WAIT, MESSAGE_TYPES
from bridge.core.status import DEFAULT_UPDATE_RATE
from bridge.http.common.models import (
    AppParam,
    Count,
    Epoch,
    EpochFloat,
    IsoTime,
    JsonObject,
    Model,
    Name,
    OpenModel,
    PackageData,
    PackageUrl,
    PackageVersion,
    UpdateRate,
)

MAX_QUERY_INT = 2**53  # beyond this SQLite's integers (and any real timestamp) are left behind
STATUS_TEXT = {
    200: "OK",
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    429: "TOO_MANY_REQUESTS",
    500: "ERROR",
    503: "SERVICE_UNAVAILABLE",
}
KeyType = Literal["RSA", "EC"]


# ---- the envelope ----------------------------------------------------------------------------------
class KeyValue(Model):
    key: str
    value: str


class RestResponse(Model):
    """The RestResponse envelope; errors use it too, with code = the HTTP status."""

    status: str
    code: int
    messages: Annotated[
        list[KeyValue],
        Meta(min_length=1, description="messages[0] is {key: message, value: <what happened>}"),
    ]
    result: Any


@cache
def envelope_model(status: int, result: Any) -> type[RestResponse]:
    """The envelope as documented for one status and result model (RestResponseThing,
    RestResponseError404, ...): the same fields, with status, code and result pinned."""
    name = "RestResponse" + ("" if status == 200 else f"Error{status}") + _model_name(result)
    return msgspec.defstruct(
        name,
        [("status", Literal[STATUS_TEXT[status]]), ("code", Literal[status]), ("result", result)],
        bases=(RestResponse,),
        forbid_unknown_fields=True,
    )


def _model_name(model: Any) -> str:
    if model is None:
        return ""
    if get_origin(model) is list:
        return _model_name(get_args(model)[0]) + "List"
    return model.__name__


# ---- path and query ----------------------------------------------------------------------------------
class ThingPath(Model):
    thing_id: Annotated[str, Meta(min_length=1, description="the thing id (flthingspk)")]


class UserPath(Model):
    sub: Annotated[str, Meta(min_length=1, description="the user id (fluserspk); only the caller's own")]


class SubscriptionPath(Model):
    subscription_id: Annotated[
        str,
        Meta(
            min_length=1,
            description="flsubscriptionspk (`active` is the route above)",
            extra_json_schema={"not": {"enum": ["active"]}},
        ),
    ]


class ThingTypePath(Model):
    thing_type: Annotated[str, Meta(min_length=1, description="a thingType")]


QueryInt = Annotated[int, Meta(ge=-MAX_QUERY_INT, le=MAX_QUERY_INT)]
StartTs = Annotated[QueryInt, Meta(description="from this UTC epoch second (inclusive)")]
EndTs = Annotated[QueryInt, Meta(description="to this UTC epoch second (inclusive); not before startts")]
MessageType = Annotated[Literal[MESSAGE_TYPES], Meta(description="only messages of this type")]
After = Annotated[
    str,
    Meta(
        description="only messages after this flmessagespk (a cursor; one that messages.retention_days "
        "deleted goes on after the time it names; 400 when no such message)"
    ),
]
Limit = Annotated[
    int, Meta(ge=1, le=MAX_QUERY_INT, description="at most this many records (capped by messages.page_limit)")
]
Wait = Annotated[
    float,
    Meta(
        ge=0,
        le=MAX_WAIT,
        description=f"long-poll: with messagetype={messages.EGRESS} (and usually after), wait up to this many "
        "seconds for the next egress message; [] when none came",
    ),
]


class Selection(OpenModel):
    startts: StartTs | None = None
    endts: EndTs | None = None
    messagetype: MessageType | None = None

    def core(self) -> messages.Query:
        return messages.Query(self.startts, self.endts, self.messagetype).check()


class Page(Selection):
    after: After | None = None
    limit: Limit | None = None

    def core(self) -> messages.Query:
        return messages.Query(self.startts, self.endts, self.messagetype, self.after, self.limit).check()


class History(Page):
    wait: Wait | None = None


class FleetQuery(OpenModel):
    thingType: Annotated[str, Meta(description="only things of this thingType")] | None = None


# ---- accounts ----------------------------------------------------------------------------------------
class AccessToken(Model):
    accessToken: Annotated[
        str,
        Meta(description="a JWT; send it as `Authorization: <token>` or `Authorization: Bearer <token>`"),
    ]


class User(Model):
    fluserspk: str
    fltimestamp: Epoch
    datecreated: IsoTime
    emailverified: bool
    username: str


class Subscription(Model):
    flsubscriptionspk: str
    fltimestamp: Epoch
    datecreated: IsoTime
    common_name: str
    startts: Epoch
    endts: Annotated[int | None, Meta(description="UTC epoch seconds; null: open-ended")]
    flstatus: str
    fluserspk: str
    product_id: str
    plan_id: str
    plan_name: str


class PolicyStatement(Model):
    Action: Annotated[str, Meta(examples=[CREATE_THING_ACTION])]
    Effect: Literal["Allow", "Deny"]
    Resource: Annotated[str, Meta(examples=["<fluserspk>:thing:*"])]
    AllowedCount: Count
    ActualCount: Count


class Policy(Model):
    Statement: list[PolicyStatement]


class SubscriptionPolicy(Model):
    subscription: Subscription
    policy: Policy


def user(u: accounts.User) -> User:
    return User(u.id, int(u.created), ids.iso(u.created), u.email_verified, u.username)


def subscription(s: accounts.Subscription) -> Subscription:
    return Subscription(
        s.id,
        int(s.created),
        ids.iso(s.created),
        s.common_name,
        s.startts,
        s.endts,
        s.status,
        s.user_id,
        s.product_id,
        s.plan_id,
        s.plan_name,
    )


def subscription_policy(p: accounts.SubscriptionPolicy) -> SubscriptionPolicy:
    statements = [PolicyStatement(s.action, s.effect, s.resource, s.allowed, s.actual) for s in p.statements]
    return SubscriptionPolicy(subscription(p.subscription), Policy(statements))


# ---- things ------------------------------------------------------------------------------------------
class Thing(Model):
    flthingspk: str
    fltimestamp: Epoch
    datecreated: IsoTime
    certificateId: Annotated[str, Meta(description="SHA-256 of the certificate (hex)")]
    fluserspk: str
    certificatePem: str
    keyPairPrivate: Annotated[
        str | None, Meta(description="PEM private key; null when the thing was created from a CSR")
    ]
    keyPairPublic: str
    testStatus: str
    thingDist: str
    thingName: str
    thingType: str
    keyType: Annotated[
        Literal["RSA", "EC", "CIK"],
        Meta(
            description="CIK: a provisioned device whose credential is its CIK, without a certificate yet "
            "(certificatePem and keyPairPublic empty, certificateId `cik:<random>`) until it sends a CSR "
            "to POST /provision/certificate"
        ),
    ]
    enabled: Annotated[bool, Meta(description="false: suspended (extension)")]


ThingId = Annotated[
    Name,
    Meta(
        description="the thing id (not `app`); default: a new UUID",
        extra_json_schema={"not": {"enum": sorted(ids.RESERVED_THING_IDS)}},
    ),
]
ThingName = Annotated[str, Meta(min_length=1, max_length=256, description="default: the thing id")]
NewKeyType = Annotated[
    KeyType, Meta(description="key pair the bridge generates (default: pki.default_key_type); not with csr")
]
Csr = Annotated[
    str,
    Meta(
        description="PEM certificate signing request: the bridge keeps no private key (keyPairPrivate is "
        "null); not with keyType"
    ),
]


class CreateThingRequest(Model):
    """Every field is optional (an empty body is `{}`); null means absent; unknown fields are
    rejected (400)."""

    flthingspk: ThingId | None = None
    thingName: ThingName | None = None
    thingType: Annotated[Name, Meta(description="default: generic")] | None = None
    thingDist: Annotated[Name, Meta(description="default: mosquitto")] | None = None
    keyType: NewKeyType | None = None
    csr: Csr | None = None

    def core(self) -> things.NewThing:
        named = {"type": self.thingType, "dist": self.thingDist}  # absent: the core's defaults
        return things.NewThing(
            self.flthingspk,
            self.thingName,
            key_type=self.keyType,
            csr=self.csr,
            **{k: v for k, v in named.items() if v is not None},
        )


Enabled = Annotated[
    bool,
    Meta(
        description="false suspends the thing (its sessions close at once), true resumes it; absent or "
        "null: no change"
    ),
]


class UpdateThingRequest(Model):
    """Extension. A JSON object is required; unknown fields are rejected (400)."""

    enabled: Enabled | None = None


def thing(t: things.Thing) -> Thing:
    return Thing(
        t.id,
        int(t.created),
        ids.iso(t.created),
        t.cert_id,
        t.owner_id,
        t.cert_pem,
        t.private_key_pem,
        t.public_key_pem,
        t.test_status,
        t.dist,
        t.name,
        t.type,
        t.key_type,
        t.enabled,
    )


# ---- messages ----------------------------------------------------------------------------------------
Payload = Annotated[
    Any,
    Meta(
        description="the payload: the JSON value (encoding json), the text (text) or base64 of the bytes (base64)"
    ),
]


class Message(Model):
    flmessagespk: str
    fltimestamp: Epoch
    datecreated: IsoTime
    flthingspk: str
    fluserspk: str
    messagetype: Literal[MESSAGE_TYPES]
    message: Payload
    encoding: Literal["json", "text", "base64"]


class CollectResult(Model):
    message: Literal["Message Collected"]
    flthingspk: str
    flmessagespk: str


class PublishResult(Model):
    flmessagespk: str
    flthingspk: str


class DeletedMessages(Model):
    deleted: Count


def message(m: messages.Message) -> Message:
    return Message(
        m.id,
        int(m.ts),
        ids.iso(m.ts),
        m.thing_id,
        m.owner_id,
        m.type,
        # stored JSON was validated on the way in: embed it as is instead of parsing it again
        msgspec.Raw(m.payload) if m.encoding == "json" else m.value,
        m.encoding,
    )


# ---- the device twin ---------------------------------------------------------------------------------
# Its fields, by API name, as the core names them (bridge/core/status.py DESIRED_FIELDS; a test
# keeps the two in step).
DESIRED: dict[str, Any] = {
    "UpdateRate": UpdateRate,
    "AppParam": AppParam,
    "data": PackageData,
    "packageUrl": PackageUrl,
    "version": PackageVersion,
}

DesiredValues = msgspec.defstruct(
    "DesiredValues",
    [(name, kind | UnsetType, UNSET) for name, kind in DESIRED.items()],
    bases=(Model,),
    namespace={"__doc__": "The values set on this level (thing or fleet default); absent: inherited."},
)
ConfigDocument = msgspec.defstruct(
    "ConfigDocument",
    list(DESIRED.items()),
    bases=(Model,),
    namespace={
        "__doc__": "The effective configuration: the thing's own values over its fleet defaults over "
        f"the built-in defaults (UpdateRate {DEFAULT_UPDATE_RATE}, empty AppParam and data, packageUrl "
        '"", version 0); retained on MQTT things/{id}/config.'
    },
)
_CHANGES_DOC = (
    "At least one field; unknown fields and wrong types are rejected (400); null clears a value, so "
    "it is inherited again (thing: from the fleet default of its thingType; fleet default: from the "
    "built-in default)."
)
FleetChanges = msgspec.defstruct(
    "FleetChanges",
    [(name, kind | None | UnsetType, UNSET) for name, kind in DESIRED.items()],
    bases=(Model,),
    namespace={"__doc__": _CHANGES_DOC},
)
RegId = Annotated[
    Name,
    Meta(
        description="the device's portal registration id (null: the thing id only); 409 when another "
        "thing uses it or it is another thing's id"
    ),
]
ThingChanges = msgspec.defstruct(
    "ThingChanges",
    [("regId", RegId | None | UnsetType, UNSET)],
    bases=(FleetChanges,),
    namespace={"__doc__": _CHANGES_DOC},
)


class Reported(Model):
    """The last SetStatus (HTTP) or things/{id}/status (MQTT) report; nulls before one."""

    status: str | None
    info: JsonObject | None
    ts: EpochFloat | None
    transport: Literal["http", "mqtt"] | None
    runningVersion: int | None


class Presence(Model):
    state: Literal["online", "offline"]
    ts: Annotated[float | None, Meta(description="UTC epoch seconds of the last change")]


class ThingState(Model):
    """The operator's view of one thing's device twin."""

    flthingspk: str
    thingName: str
    thingType: str
    regId: Annotated[str, Meta(description="the portal regId (the thing id unless one was set)")]
    desired: DesiredValues
    effective: ConfigDocument
    reported: Reported
    configState: Annotated[
        Literal["reboot", "new", "sync"], Meta(description="what SetStatus would answer now")
    ]
    presence: Presence


class RunningVersion(Model):
    softwareName: str
    currentVersionNumber: str
    timestamp: IsoTime


class ThingTwin(ThingState, kw_only=True):
    """One thing's device twin, with the software versions it last reported (Upgrader V2
    currentVersionNumbers, HTTP or MQTT)."""

    currentVersionNumbers: list[RunningVersion]


class FleetDefaults(Model):
    thingType: str
    defaults: DesiredValues


Refusals = Annotated[
    dict[str, Count],
    Meta(
        description="refused CONNECTs by reason: bad_password, rate_limited, client_id_mismatch, "
        "unknown_certificate, no_certificate, no_credentials, will_not_permitted"
    ),
]
PasswordChecks = Annotated[
    dict[str, Count],
    Meta(
        description="password checks of GET .../token and the plain MQTT listener: verified, rejected, "
        "cacheHits, rateLimited, busy, trackedKeys, evictedKeys"
    ),
]


class BrokerStats(Model):
    """Counters of the MQTT side: the embedded broker's, or the external engine's link and
    consumer (none without either)."""

    connections: Count | UnsetType = UNSET
    sessions: Count | UnsetType = UNSET
    retainedMessages: Count | UnsetType = UNSET
    refusedConnects: Count | UnsetType = UNSET
    refusedByReason: Refusals | UnsetType = UNSET
    deniedPublishes: Count | UnsetType = UNSET
    deniedSubscribes: Count | UnsetType = UNSET
    droppedMessages: Count | UnsetType = UNSET
    droppedQueuedMessages: Count | UnsetType = UNSET
    queuedMessages: Count | UnsetType = UNSET
    refusedRetainedPublishes: Count | UnsetType = UNSET
    passwordChecks: PasswordChecks | UnsetType = UNSET
    # mqtt.mode external: connections to the engine up (AMQP and each node's MQTT), device
    # messages consumed, redeliveries found committed already, failures sent back to the queue
    engineConnections: Count | UnsetType = UNSET
    consumedMessages: Count | UnsetType = UNSET
    duplicateMessages: Count | UnsetType = UNSET
    retriedMessages: Count | UnsetType = UNSET
    # the things' presence: connection events this worker applied, reconciliations it made,
    # connections it could not keep track of (no room)
    presenceEvents: Count | UnsetType = UNSET
    presenceReconciliations: Count | UnsetType = UNSET
    presenceUntracked: Count | UnsetType = UNSET
    # messages deleted by messages.retention_days since the process started
    prunedMessages: Count | UnsetType = UNSET
