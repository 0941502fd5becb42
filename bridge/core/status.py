"""The device twin: reported status, desired configuration and application package, fleet
defaults per thingType, and the SetStatus decision (reboot / new / sync) that tells a device what
changed. Reached by the portal dialect over HTTP and by `things/{id}/status` over MQTT."""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass
from typing import Any

import orjson

from bridge.core import ids, topics
from bridge.core.errors import Conflict, Invalid, NotFound
from bridge.core.lookup import owned_thing
from bridge.core.messages import STATUS, insert_message
from bridge.core.outbox import Outbox, enqueue, restoring
from bridge.core.ports import DeviceLink, commit_and_route
from bridge.store import IntegrityError, Store

DEFAULT_UPDATE_RATE = 24  # hours between SetStatus calls when nobody set one
UPDATE_RATE_MIN, UPDATE_RATE_MAX = 1, 24 * 365  # hours
API_VERSION = 2
# Desired fields: API name -> (column, type). None as a value clears it (inherit the fleet default).
DESIRED_FIELDS: dict[str, tuple[str, type]] = {
    "UpdateRate": ("update_rate", int),
    "AppParam": ("app_param", dict),
    "data": ("data", dict),
    "packageUrl": ("package_url", str),
    "version": ("package_version", int),
}
JSON_COLUMNS = {"app_param", "data"}
MAX_VERSION = 2**63 - 1  # SQLite's INTEGER
REPORTED_VERSION_KEYS = ("version", "packageVersion", "appVersion")


@dataclass(frozen=True)
class Effective:
    update_rate: int
    app_param: dict
    data: dict
    package_url: str
    version: int

    def config(self) -> dict[str, Any]:
        """The GetConfig body."""
        return {"UpdateRate": self.update_rate, "AppParam": self.app_param}

    def config_hash(self) -> str:
        return hashlib.sha256(orjson.dumps(self.config(), option=orjson.OPT_SORT_KEYS)).hexdigest()

    def document(self) -> dict[str, Any]:
        """What an MQTT device finds retained on things/{id}/config: config and package together."""
        return {**self.config(), "data": self.data, "packageUrl": self.package_url, "version": self.version}


DEFAULT = Effective(DEFAULT_UPDATE_RATE, {}, {}, "", 0)


@dataclass(frozen=True)
class DeviceRef:
    thing_id: str
    owner_id: str
    thing_type: str
    # The certificate a connected device authenticated with (see messages.insert_message).
    cert_id: str | None = None


def _decode(column: str, value: Any) -> Any:
    return orjson.loads(value) if column in JSON_COLUMNS and value is not None else value


def _own(row: sqlite3.Row | None) -> dict[str, Any]:
    """The desired values set on this row (thing or fleet default), by API name."""
    if row is None:
        return {}
    return {
        name: _decode(column, row[column])
        for name, (column, _) in DESIRED_FIELDS.items()
        if row[column] is not None
    }


def effective(conn: sqlite3.Connection, ref: DeviceRef) -> Effective:
    own = _own(conn.execute("SELECT * FROM thing_state WHERE thing_id = ?", (ref.thing_id,)).fetchone())
    fleet = _own(
        conn.execute(
            "SELECT * FROM fleet_defaults WHERE owner_id = ? AND thing_type = ?",
            (ref.owner_id, ref.thing_type),
        ).fetchone()
    )
    merged = {**DEFAULT.document(), **fleet, **own}
    return Effective(
        merged["UpdateRate"], merged["AppParam"], merged["data"], merged["packageUrl"], merged["version"]
    )


def publish_config(conn: sqlite3.Connection, ref: DeviceRef) -> None:
    """Queue the thing's config document, retained on things/{id}/config, in this transaction."""
    document = orjson.dumps(effective(conn, ref).document())
    enqueue(conn, topics.topic(ref.thing_id, topics.CONFIG), document, retain=True)


def _ensure_state(conn: sqlite3.Connection, thing_id: str) -> None:
    conn.execute("INSERT INTO thing_state (thing_id) VALUES (?) ON CONFLICT DO NOTHING", (thing_id,))


def _mark_fetched(conn: sqlite3.Connection, ref: DeviceRef, current: Effective) -> None:
    _ensure_state(conn, ref.thing_id)
    conn.execute(
        "UPDATE thing_state SET fetched_config = ? WHERE thing_id = ?", (current.config_hash(), ref.thing_id)
    )


def parse_changes(body: dict[str, Any], allowed: dict[str, tuple[str, type]]) -> dict[str, Any]:
    """Validate operator changes: known names, right types, null = back to inherited."""
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise Invalid(f"unknown field(s): {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    changes: dict[str, Any] = {}
    for name, value in body.items():
        column, kind = allowed[name]
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise Invalid(f"{name} must be {'an' if kind in (int, dict) else 'a'} {kind_name(kind)} or null")
        if name == "UpdateRate" and value is not None and not UPDATE_RATE_MIN <= value <= UPDATE_RATE_MAX:
            raise Invalid(f"UpdateRate must be between {UPDATE_RATE_MIN} and {UPDATE_RATE_MAX} hours")
        if name == "version" and value is not None and not 0 <= value <= MAX_VERSION:
            raise Invalid(f"version must be between 0 and {MAX_VERSION}")
        changes[column] = (
            orjson.dumps(value).decode() if column in JSON_COLUMNS and value is not None else value
        )
    return changes


def kind_name(kind: type) -> str:
    return {int: "integer", dict: "object", str: "string"}[kind]


class Status:
    def __init__(self, store: Store, outbox: Outbox, link: DeviceLink) -> None:
        self.store = store
        self.outbox = outbox
        self.link = link

    # ---- device side ---------------------------------------------------------------------------
    async def resolve(self, reg_id: str | None) -> DeviceRef:
        """A regId (or a thing id, which is always a valid regId) -> the thing."""
        if not reg_id:
            raise Invalid("regId is required")
        row = await self.store.read(
            lambda c: c.execute(
                "SELECT t.id, t.owner_id, t.type FROM things t LEFT JOIN thing_state s ON s.thing_id = t.id"
                " WHERE (s.reg_id = ? OR t.id = ?) AND t.enabled = 1 ORDER BY s.reg_id = ? DESC LIMIT 1",
                (reg_id, reg_id, reg_id),
            ).fetchone()
        )
        if row is None:
            raise NotFound(f"unknown regId {reg_id!r}")
        return DeviceRef(row["id"], row["owner_id"], row["type"])

    async def get_url(self, ref: DeviceRef, device_info: dict | None) -> Effective:
        """GetURL: the current package and extra data. The device now runs (or will run) this
        package version, unless its DeviceInfo says otherwise."""

        def read(conn: sqlite3.Connection) -> Effective:
            current = effective(conn, ref)
            running = _reported_version(device_info)
            _ensure_state(conn, ref.thing_id)
            conn.execute(
                "UPDATE thing_state SET running_version = ? WHERE thing_id = ?",
                (current.version if running is None else running, ref.thing_id),
            )
            return current

        return await self.store.write(read)

    async def set_status(self, ref: DeviceRef, status: Any, info: Any, transport: str) -> str:
        """SetStatus: record the report (and a `status` message) and answer `reboot` when a newer
        package is desired than the device runs, else `new` when the configuration changed since
        the device last fetched it, else `sync`."""
        if not isinstance(status, str) or not status or len(status) > 256:
            raise Invalid("status is required: a string of 1-256 characters")
        if info is not None and not isinstance(info, dict):
            raise Invalid("info must be an object")
        report = orjson.dumps({"status": status, "info": info or {}})

        def record(conn: sqlite3.Connection) -> str:
            insert_message(conn, ref.thing_id, ref.owner_id, STATUS, report, "json", transport, ref.cert_id)
            _ensure_state(conn, ref.thing_id)
            reported = _reported_version(info)
            conn.execute(
                "UPDATE thing_state SET reported_status = ?, reported_info = ?, reported_ts = ?,"
                " reported_transport = ?, running_version = coalesce(?, running_version) WHERE thing_id = ?",
                (status, orjson.dumps(info or {}).decode(), ids.now(), transport, reported, ref.thing_id),
            )
            state = conn.execute(
                "SELECT running_version, fetched_config FROM thing_state WHERE thing_id = ?", (ref.thing_id,)
            ).fetchone()
            return decide(effective(conn, ref), state["running_version"], state["fetched_config"])

        return await commit_and_route(
            self.store.write, self.link, topics.topic(ref.thing_id, topics.STATUS), report, record
        )

    async def get_config(self, ref: DeviceRef) -> dict[str, Any]:
        """GetConfig: the desired configuration, now marked as fetched by the device."""

        def fetch(conn: sqlite3.Connection) -> dict[str, Any]:
            current = effective(conn, ref)
            _ensure_state(conn, ref.thing_id)
            conn.execute(
                "UPDATE thing_state SET fetched_config = ? WHERE thing_id = ?",
                (current.config_hash(), ref.thing_id),
            )
            return current.config()

        return await self.store.write(fetch)

    async def resend_config(self, ref: DeviceRef) -> None:
        """An MQTT device asked for its config (things/{id}/config/get): publish the document again
        and count it as fetched, as GetConfig does."""

        def fetch(conn: sqlite3.Connection) -> None:
            _mark_fetched(conn, ref, effective(conn, ref))
            publish_config(conn, ref)

        await self.store.write(fetch)
        self.outbox.kick()

    async def republish_all(self) -> None:
        """At start-up the broker holds no retained messages: put every thing's config back."""

        def queue_all(conn: sqlite3.Connection) -> None:
            for row in conn.execute("SELECT id, owner_id, type FROM things").fetchall():
                publish_config(conn, DeviceRef(row["id"], row["owner_id"], row["type"]))

        await self.store.write(restoring(queue_all))
        self.outbox.kick()

    # ---- operator side -------------------------------------------------------------------------
    async def _ref(self, owner_id: str, thing_id: str) -> DeviceRef:
        row = await self.store.read(owned_thing, thing_id, owner_id)
        return DeviceRef(row["id"], row["owner_id"], row["type"])

    async def set_desired(self, owner_id: str, thing_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """Set (or, with null, clear) a thing's own desired values and its regId; the new config
        document is published retained on things/{id}/config in the same commit."""
        reg_id = body.pop("regId", ...)
        if reg_id is not ... and reg_id is not None:
            if not isinstance(reg_id, str):
                raise Invalid("regId must be a string or null")
            ids.check_name(reg_id, "regId")
        changes = parse_changes(body, DESIRED_FIELDS)
        ref = await self._ref(owner_id, thing_id)

        def update(conn: sqlite3.Connection) -> None:
            _ensure_state(conn, thing_id)
            if reg_id is not ...:
                taken = conn.execute(
                    "SELECT 1 FROM things WHERE id = ? AND id != ?", (reg_id, thing_id)
                ).fetchone()
                if taken:
                    raise Conflict(f"regId {reg_id!r} is another thing's id")
                try:
                    conn.execute("UPDATE thing_state SET reg_id = ? WHERE thing_id = ?", (reg_id, thing_id))
                except IntegrityError as exc:
                    raise Conflict(f"regId {reg_id!r} is already in use") from exc
            for column, value in changes.items():
                conn.execute(f"UPDATE thing_state SET {column} = ? WHERE thing_id = ?", (value, thing_id))
            publish_config(conn, ref)

        await self.store.write(update)
        self.outbox.kick()
        return await self.state(owner_id, thing_id)

    async def set_fleet_defaults(
        self, owner_id: str, thing_type: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        """Defaults for the owner's things of one thingType; every such thing without its own value
        gets the new config document at once."""
        ids.check_name(thing_type, "thingType")
        changes = parse_changes(body, DESIRED_FIELDS)

        def update(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO fleet_defaults (owner_id, thing_type) VALUES (?, ?) ON CONFLICT DO NOTHING",
                (owner_id, thing_type),
            )
            for column, value in changes.items():
                conn.execute(
                    f"UPDATE fleet_defaults SET {column} = ? WHERE owner_id = ? AND thing_type = ?",
                    (value, owner_id, thing_type),
                )
            for row in conn.execute(
                "SELECT id FROM things WHERE owner_id = ? AND type = ?", (owner_id, thing_type)
            ).fetchall():
                publish_config(conn, DeviceRef(row["id"], owner_id, thing_type))

        await self.store.write(update)
        self.outbox.kick()
        return await self.fleet_defaults(owner_id, thing_type)

    async def fleet_defaults(self, owner_id: str, thing_type: str) -> dict[str, Any]:
        row = await self.store.read(
            lambda c: c.execute(
                "SELECT * FROM fleet_defaults WHERE owner_id = ? AND thing_type = ?", (owner_id, thing_type)
            ).fetchone()
        )
        return {"thingType": thing_type, "defaults": _own(row)}

    async def state(self, owner_id: str, thing_id: str) -> dict[str, Any]:
        ref = await self._ref(owner_id, thing_id)
        return (await self.store.read(_states, owner_id, ref.thing_id))[0]

    async def fleet(self, owner_id: str, thing_type: str | None = None) -> list[dict[str, Any]]:
        return await self.store.read(_states, owner_id, None, thing_type)


def decide(current: Effective, running_version: int | None, fetched_config: str | None) -> str:
    """reboot: a newer package is desired than the device runs; new: the configuration changed
    since the device last fetched it (never fetched = it has the default); else sync."""
    if current.version > (running_version or 0):
        return "reboot"
    if current.config_hash() != (fetched_config or DEFAULT.config_hash()):
        return "new"
    return "sync"


def _reported_version(info: Any) -> int | None:
    if isinstance(info, dict):
        for key in REPORTED_VERSION_KEYS:
            value = info.get(key)
            if isinstance(value, str) and value.isascii() and value.isdigit():
                value = int(value)
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_VERSION:
                return value
    return None


def _states(
    conn: sqlite3.Connection, owner_id: str, thing_id: str | None, thing_type: str | None = None
) -> list[dict[str, Any]]:
    """The operator's view of things: desired (own / effective), reported, presence, config state."""
    sql = (
        "SELECT t.id, t.owner_id, t.type, t.name, s.*, p.state AS presence, p.ts AS presence_ts"
        " FROM things t LEFT JOIN thing_state s ON s.thing_id = t.id LEFT JOIN presence p ON p.thing_id = t.id"
        " WHERE t.owner_id = ?"
    )
    args: list[Any] = [owner_id]
    if thing_id is not None:
        sql += " AND t.id = ?"
        args.append(thing_id)
    if thing_type is not None:
        sql += " AND t.type = ?"
        args.append(thing_type)
    out = []
    for row in conn.execute(sql + " ORDER BY t.created", args).fetchall():
        ref = DeviceRef(row["id"], row["owner_id"], row["type"])
        current = effective(conn, ref)
        own = _own(row) if row["thing_id"] is not None else {}
        out.append(
            {
                "flthingspk": row["id"],
                "thingName": row["name"],
                "thingType": row["type"],
                "regId": row["reg_id"] or row["id"],
                "desired": own,
                "effective": current.document(),
                "reported": {
                    "status": row["reported_status"],
                    "info": orjson.loads(row["reported_info"]) if row["reported_info"] else None,
                    "ts": row["reported_ts"],
                    "transport": row["reported_transport"],
                    "runningVersion": row["running_version"],
                },
                "configState": decide(current, row["running_version"], row["fetched_config"]),
                "presence": {"state": row["presence"] or "offline", "ts": row["presence_ts"]},
            }
        )
    return out
