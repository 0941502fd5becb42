"""Software upgrades (Upgrader V2, CATALOG.md 001): the operator's catalog (software, versions,
rollout profiles, accounts grouping devices under a profile), what each device reports (current
versions, upgrade results) and what it is offered (checkForUpgrade, notify). Transport-free: the
HTTP dialect and the MQTT twin (`things/{id}/upgrade/...`, `things/{id}/versions`) call these.

Tenancy: every object belongs to the operator (user id) who created it; another operator's object
is NotFound, and a device is resolved only against its own owner's catalog. A device in an account
is a thing of that owner, named by its id or its regId alias.

Offer rule: device -> its account's rollout profile -> the versions of the software targeted at
that profile (every version when the device is in no account) that a staged rollout does not hold
back from it -> the latest by releaseDate. A device is behind when it reports no version of the
software, an unknown one, or one released before the offer."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from bridge.core import ids, topics
from bridge.core.errors import Conflict, Invalid, NotFound
from bridge.core.identity import DeviceIdentity
from bridge.core.listing import ListQuery, Record
from bridge.core.messages import UPGRADE, VERSIONS, Messages, insert_message
from bridge.core.outbox import Outbox, enqueue
from bridge.core.ports import DeviceLink, commit_and_route
from bridge.store import IntegrityError, Store

VERSION_STATUSES = ("OK", "REQUIRED", "RECOMMENDED")
PRIORITIES = ("UPGRADE_TYPE_FORCED", "UPGRADE_TYPE_STANDBY", "UPGRADE_TYPE_MANUAL")
PRIORITY_ALIASES = {"High": PRIORITIES[0], "Medium": PRIORITIES[1], "Low": PRIORITIES[2]}
UPGRADE_TYPES = ("FULLSTACK", "SYSTEMAPP")
RESULT_STATUSES = ("SUCCESS", "FAILED", "DOWNLOADED", "INITIATED", "ABORTED")
TERMINAL = ("SUCCESS", "FAILED", "ABORTED")  # a device that sent one of these has reported
MAX_TEXT = 4096
MAX_ITEMS = 1000  # list fields of one request (versions, devices, reports)
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)", re.ASCII)

SOFTWARE_FIELDS = ("id", "name", "description", "deviceTypes", "upgradeType", "versions")
VERSION_FIELDS = (
    "versionNumber",
    "releaseDate",
    "status",
    "priority",
    "releaseNote",
    "eULA",
    "downloadUrl",
    "rolloutProfiles",
    "dependencies",
)
PROFILE_FIELDS = ("id", "name", "description", "softwareVersions")
ACCOUNT_FIELDS = ("id", "rolloutProfileId", "devices")


@dataclass(frozen=True)
class Put:
    """PutResponse (`matchedCount`, `modifiedCount`); `created` when an upsert made the object."""

    matched: int
    modified: int
    created: bool = False


# Hook the rollout engine installs: (conn, thing id) after a device's results were appended, in
# that transaction; returns the things it newly offered a version to.
ResultsHook = Callable[[sqlite3.Connection, str], list[str]]

# Documents of other models that follow a thing's offers (the firmware target, core/firmware.py,
# registers itself on import): called by offers_changed. Pure functions of the database, so one
# list serves every core.
offer_hooks: list[Callable[[sqlite3.Connection, str], None]] = []


# And the same for a software whose versions (or their profiles) changed: (conn, software pk).
versions_hooks: list[Callable[[sqlite3.Connection, int], None]] = []

# And for a software about to be deleted, in that transaction, while its rows still exist.
deleting_hooks: list[Callable[[sqlite3.Connection, int], None]] = []


def versions_changed(conn: sqlite3.Connection, software_pk: int) -> None:
    """In the transaction that added, changed or deleted versions of the software, or their profiles."""
    for hook in versions_hooks:
        hook(conn, software_pk)


def offers_changed(conn: sqlite3.Connection, thing_id: str) -> None:
    """In the transaction that may have changed what the thing is offered: where its notices are
    re-published, when it joins or leaves an account, and when a new staged rollout holds it back."""
    for hook in offer_hooks:
        hook(conn, thing_id)


# ---- input -------------------------------------------------------------------------------------
def _object(body: Any, allowed: Iterable[str], what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise Invalid(f"{what} must be a JSON object")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise Invalid(f"{what}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    return body


def _text(body: Mapping[str, Any], key: str, *, required: bool = False, limit: int = 256) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise Invalid(f"{key} is required (a string)")
        return None
    if not isinstance(value, str) or (required and not value) or len(value) > limit:
        raise Invalid(
            f"{key} must be a {'non-empty ' if required else ''}string of at most {limit} characters"
        )
    return value


def _choice(
    body: Mapping[str, Any], key: str, allowed: Iterable[str], *, required: bool = False
) -> str | None:
    value = _text(body, key, required=required)
    if value is not None and value not in allowed:
        raise Invalid(f"{key} must be one of {', '.join(allowed)}")
    return value


def _list(body: Mapping[str, Any], key: str, *, required: bool = False) -> list[Any]:
    value = body.get(key)
    if value is None:
        if required:
            raise Invalid(f"{key} is required (an array)")
        return []
    if not isinstance(value, list) or len(value) > MAX_ITEMS:
        raise Invalid(f"{key} must be an array of at most {MAX_ITEMS} items")
    return value


def _strings(body: Mapping[str, Any], key: str) -> tuple[str, ...]:
    return tuple(_text({key: v}, key, required=True) or "" for v in _list(body, key))


def _key(value: Any, what: str) -> str:
    """An id or name used to address an object (path parameters)."""
    if not isinstance(value, str) or not 1 <= len(value) <= 256:
        raise Invalid(f"{what} must be a string of 1-256 characters")
    return value


def _same(body: Mapping[str, Any], key: str, path_value: str) -> None:
    """The path names the object; a body that names another one is a mistake (CATALOG 001 #12)."""
    if body.get(key) is not None and body.get(key) != path_value:
        raise Invalid(
            f"{key} in the body ({body.get(key)!r:.100}) differs from the path ({path_value!r:.100})"
        )


def release_time(value: str) -> float:
    """RFC 3339 date-time (the document's "ISO 8061") -> epoch seconds, for ordering."""
    if not _RFC3339.fullmatch(value):
        raise Invalid(
            f"releaseDate must be an RFC 3339 date-time such as 2016-04-06T13:47:59.228Z, not {value!r:.60}"
        )
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError as exc:
        raise Invalid(f"releaseDate {value!r:.60} is not a valid date-time") from exc


def priority(value: str | None) -> str | None:
    """The enum, or its legacy alias High / Medium / Low (stored as the enum)."""
    if value is None:
        return None
    value = PRIORITY_ALIASES.get(value, value)
    if value not in PRIORITIES:
        raise Invalid(f"priority must be one of {', '.join(PRIORITIES)} (or High, Medium, Low)")
    return value


@dataclass(frozen=True)
class VersionSpec:
    version_number: str
    release_date: str
    released: float
    status: str
    priority: str | None
    release_note: str | None
    eula: str | None
    download_url: str
    rollout_profiles: tuple[str, ...]
    dependencies: tuple[dict[str, str], ...]

    @classmethod
    def parse(cls, body: Any, path_version: str | None = None) -> VersionSpec:
        body = _object(body, VERSION_FIELDS, "version")
        if path_version is not None:
            _same(body, "versionNumber", path_version)
            body = {**body, "versionNumber": path_version}
        date = _text(body, "releaseDate", required=True) or ""
        return cls(
            _text(body, "versionNumber", required=True) or "",
            date,
            release_time(date),
            _choice(body, "status", VERSION_STATUSES, required=True) or "",
            priority(_text(body, "priority")),
            _text(body, "releaseNote", limit=MAX_TEXT),
            _text(body, "eULA", limit=MAX_TEXT * 16),
            _text(body, "downloadUrl", required=True, limit=2048) or "",
            _strings(body, "rolloutProfiles"),
            tuple(_reference(d, "dependencies") for d in _list(body, "dependencies")),
        )


def _reference(value: Any, what: str) -> dict[str, str]:
    """A Dependency / SoftwareVersionRef: {softwareName*, name, versionNumber*}."""
    ref = _object(value, ("softwareName", "name", "versionNumber"), f"{what}[]")
    out = {k: _text(ref, k, required=k != "name") for k in ("softwareName", "name", "versionNumber")}
    return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True)
class SoftwareSpec:
    id: str | None
    name: str
    description: str | None
    device_types: tuple[str, ...]
    upgrade_type: str | None
    versions: tuple[VersionSpec, ...] | None  # None: leave the versions as they are

    @classmethod
    def parse(cls, body: Any) -> SoftwareSpec:
        body = _object(body, SOFTWARE_FIELDS, "software")
        versions = None
        if body.get("versions") is not None:
            versions = tuple(VersionSpec.parse(v) for v in _list(body, "versions"))
            numbers = [v.version_number for v in versions]
            if len(set(numbers)) != len(numbers):
                raise Invalid("versions: each versionNumber may appear once")
        return cls(
            _text(body, "id"),
            _text(body, "name", required=True) or "",
            _text(body, "description", limit=MAX_TEXT),
            _strings(body, "deviceTypes"),
            _choice(body, "upgradeType", UPGRADE_TYPES),
            versions,
        )


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


# ---- lookups (inside a transaction) ------------------------------------------------------------
def _software(conn: sqlite3.Connection, owner_id: str, ref: str) -> sqlite3.Row:
    """By name first, then by id (CATALOG 001 #4); another operator's is NotFound."""
    row = conn.execute(
        "SELECT * FROM software WHERE owner_id = ? AND (name = ? OR id = ?) ORDER BY name = ? DESC LIMIT 1",
        (owner_id, ref, ref, ref),
    ).fetchone()
    if row is None:
        raise NotFound(f"software {ref!r:.100} not found")
    return row


def version_row(conn: sqlite3.Connection, software_pk: int, number: str, of: str) -> sqlite3.Row:
    """A version of a software by its number; NotFound naming what it was asked of (`of`: the
    software, or a firmware product of it)."""
    row = conn.execute(
        "SELECT * FROM software_versions WHERE software_pk = ? AND version_number = ?",
        (software_pk, number),
    ).fetchone()
    if row is None:
        raise NotFound(f"version {number!r:.100} of {of} not found")
    return row


def _version(conn: sqlite3.Connection, software: sqlite3.Row, number: str) -> sqlite3.Row:
    return version_row(conn, software["pk"], number, f"software {software['name']!r}")


def _profile(conn: sqlite3.Connection, owner_id: str, profile_id: str) -> sqlite3.Row:
    row = conn.execute(
        "SELECT * FROM rollout_profiles WHERE owner_id = ? AND id = ?", (owner_id, profile_id)
    ).fetchone()
    if row is None:
        raise NotFound(f"rollout profile {profile_id!r:.100} not found")
    return row


def _account(conn: sqlite3.Connection, profile: sqlite3.Row, account_id: str) -> sqlite3.Row:
    row = conn.execute(
        "SELECT * FROM upgrade_accounts WHERE profile_pk = ? AND id = ?", (profile["pk"], account_id)
    ).fetchone()
    if row is None:
        raise NotFound(f"account {account_id!r:.100} not found in rollout profile {profile['id']!r}")
    return row


def owned_device(conn: sqlite3.Connection, owner_id: str, device_id: str) -> str:
    """A device named by its thing id or regId alias, among the owner's things -> the thing id."""
    row = conn.execute(
        "SELECT t.id FROM things t LEFT JOIN thing_state s ON s.thing_id = t.id"
        " WHERE t.owner_id = ? AND (t.id = ? OR s.reg_id = ?) ORDER BY t.id = ? DESC LIMIT 1",
        (owner_id, device_id, device_id, device_id),
    ).fetchone()
    if row is None:
        raise NotFound(f"device {device_id!r:.100} not found")
    return row["id"]


def _profile_pks(conn: sqlite3.Connection, owner_id: str, profile_ids: Iterable[str]) -> list[int]:
    pks = []
    for profile_id in dict.fromkeys(profile_ids):
        row = conn.execute(
            "SELECT pk FROM rollout_profiles WHERE owner_id = ? AND id = ?", (owner_id, profile_id)
        ).fetchone()
        if row is None:
            raise Invalid(f"rolloutProfiles: no rollout profile {profile_id!r:.100}")
        pks.append(row["pk"])
    return pks


# ---- documents (what GET returns) --------------------------------------------------------------
def _version_doc(conn: sqlite3.Connection, row: sqlite3.Row) -> Record:
    profiles = [
        r["id"]
        for r in conn.execute(
            "SELECT p.id FROM version_profiles vp JOIN rollout_profiles p ON p.pk = vp.profile_pk"
            " WHERE vp.version_pk = ? ORDER BY p.id",
            (row["pk"],),
        )
    ]
    doc = {
        "versionNumber": row["version_number"],
        "releaseDate": row["release_date"],
        "status": row["status"],
        "priority": row["priority"],
        "releaseNote": row["release_note"],
        "eULA": row["eula"],
        "downloadUrl": row["download_url"],
        "rolloutProfiles": profiles,
        "dependencies": orjson.loads(row["dependencies"]),
    }
    return {k: v for k, v in doc.items() if v is not None}


def _software_doc(conn: sqlite3.Connection, row: sqlite3.Row) -> Record:
    versions = conn.execute(
        "SELECT * FROM software_versions WHERE software_pk = ? ORDER BY released, pk", (row["pk"],)
    ).fetchall()
    doc = {
        "id": row["id"],
        "name": row["name"],
        "description": row["description"],
        "deviceTypes": orjson.loads(row["device_types"]),
        "upgradeType": row["upgrade_type"],
        "versions": [_version_doc(conn, v) for v in versions],
    }
    return {k: v for k, v in doc.items() if v is not None}


def _profile_doc(conn: sqlite3.Connection, row: sqlite3.Row) -> Record:
    refs = conn.execute(
        "SELECT s.name, v.version_number FROM version_profiles vp JOIN software_versions v ON v.pk = vp.version_pk"
        " JOIN software s ON s.pk = v.software_pk WHERE vp.profile_pk = ? ORDER BY s.name, v.released, v.pk",
        (row["pk"],),
    )
    doc = {
        "id": row["id"],
        "name": row["name"],
        "description": row["description"],
        "softwareVersions": [
            {"softwareName": r["name"], "name": r["name"], "versionNumber": r["version_number"]} for r in refs
        ],
    }
    return {k: v for k, v in doc.items() if v is not None}


def _account_doc(conn: sqlite3.Connection, row: sqlite3.Row, profile_id: str) -> Record:
    devices = conn.execute(
        "SELECT device_id, type FROM account_devices WHERE account_pk = ? ORDER BY device_id", (row["pk"],)
    )
    return {
        "id": row["id"],
        "rolloutProfileId": profile_id,
        "devices": [{"id": d["device_id"], "type": d["type"]} for d in devices],
    }


def _resolved_dependencies(conn: sqlite3.Connection, owner_id: str, version: sqlite3.Row) -> list[Record]:
    """Each dependency with `name` = the software it names (by name, then id) when it exists."""
    out = []
    for dep in orjson.loads(version["dependencies"]):
        row = conn.execute(
            "SELECT name FROM software WHERE owner_id = ? AND (name = ? OR id = ?) ORDER BY name = ? DESC LIMIT 1",
            (owner_id, dep["softwareName"], dep["softwareName"], dep["softwareName"]),
        ).fetchone()
        out.append({**dep, "name": row["name"]} if row is not None else dep)
    return out


# ---- the offer ---------------------------------------------------------------------------------
def profile_of(conn: sqlite3.Connection, thing_id: str) -> int | None:
    row = conn.execute(
        "SELECT a.profile_pk FROM account_devices d JOIN upgrade_accounts a ON a.pk = d.account_pk"
        " JOIN things t ON t.id = d.thing_id WHERE d.thing_id = ? AND a.owner_id = t.owner_id",
        (thing_id,),
    ).fetchone()
    return row["profile_pk"] if row is not None else None


def _released_to(conn: sqlite3.Connection, version_pk: int, profile_pk: int | None, thing_id: str) -> bool:
    """Whether no unfinished staged rollout of the version holds it back from the device: when the
    latest rollout of the version to its profile (to any profile, for a device in no account) is
    not completed, the device must be in one of its released waves."""
    rows = conn.execute(
        "SELECT r.state, r.wave, d.wave AS device_wave FROM rollouts r"
        " LEFT JOIN rollout_devices d ON d.rollout_id = r.id AND d.thing_id = ?"
        " WHERE r.version_pk = ? AND (? IS NULL OR r.profile_pk = ?) AND NOT EXISTS (SELECT 1 FROM rollouts"
        " l WHERE l.version_pk = r.version_pk AND l.profile_pk = r.profile_pk AND l.created > r.created)",
        (thing_id, version_pk, profile_pk, profile_pk),
    ).fetchall()
    return all(
        r["state"] == "completed" or (r["device_wave"] is not None and r["device_wave"] <= r["wave"])
        for r in rows
    )


def offer(conn: sqlite3.Connection, thing_id: str, software: sqlite3.Row) -> sqlite3.Row | None:
    """The latest version of the software the device may be offered, or None."""
    profile_pk = profile_of(conn, thing_id)
    targeted = " AND pk IN (SELECT version_pk FROM version_profiles WHERE profile_pk = ?)"
    rows = conn.execute(
        "SELECT * FROM software_versions WHERE software_pk = ?"
        + (targeted if profile_pk is not None else "")
        + " ORDER BY released DESC, pk DESC",
        (software["pk"],) + ((profile_pk,) if profile_pk is not None else ()),
    )
    return next((v for v in rows if _released_to(conn, v["pk"], profile_pk, thing_id)), None)


def _known(conn: sqlite3.Connection, software: sqlite3.Row, number: str | None) -> sqlite3.Row | None:
    if number is None:
        return None
    return conn.execute(
        "SELECT * FROM software_versions WHERE software_pk = ? AND version_number = ?",
        (software["pk"], number),
    ).fetchone()


def _current(
    conn: sqlite3.Connection, software: sqlite3.Row, number: str | None, target: sqlite3.Row
) -> bool:
    """Whether a device running `number` has `target` or newer (an unknown version has not)."""
    if number == target["version_number"]:
        return True
    known = _known(conn, software, number)
    return known is not None and known["released"] >= target["released"]


def _offer_doc(
    conn: sqlite3.Connection, owner_id: str, software: sqlite3.Row, version: sqlite3.Row
) -> Record:
    """A newer version: its own status (a stored OK, "not urged", still offers it as RECOMMENDED:
    OK would tell the device it is current)."""
    return {
        "name": software["name"],
        "status": version["status"] if version["status"] != "OK" else "RECOMMENDED",
        "version": version["version_number"],
        "downloadUrl": version["download_url"],
        "dependencies": _resolved_dependencies(conn, owner_id, version),
    }


def check(conn: sqlite3.Connection, thing_id: str, owner_id: str, name: str, number: str) -> Record:
    try:
        software = _software(conn, owner_id, name)
    except NotFound as exc:  # no 404 in this operation: unknown software is a bad request
        raise Invalid(f"unknown software {name!r:.100}") from exc
    latest = offer(conn, thing_id, software)
    if latest is None or _current(conn, software, number, latest):
        running = _known(conn, software, number)
        return {
            "name": software["name"],
            "status": "OK",
            "version": number,
            "downloadUrl": running["download_url"] if running is not None else "",
            "dependencies": _resolved_dependencies(conn, owner_id, running) if running is not None else [],
        }
    return _offer_doc(conn, owner_id, software, latest)


# ---- notices: things/{id}/upgrade/notify and `upgrade` messages --------------------------------
def publish_notices(conn: sqlite3.Connection, thing_id: str, owner_id: str) -> None:
    """The retained things/{id}/upgrade/notify document: every pending offer of the thing
    (`{"upgrades": [...]}`, one per software); an empty payload clears it when none is left."""
    rows = conn.execute(
        "SELECT s.*, n.version_pk FROM upgrade_notices n JOIN software s ON s.pk = n.software_pk"
        " WHERE n.thing_id = ? ORDER BY s.name",
        (thing_id,),
    ).fetchall()
    upgrades = [
        _offer_doc(
            conn,
            owner_id,
            row,
            conn.execute("SELECT * FROM software_versions WHERE pk = ?", (row["version_pk"],)).fetchone(),
        )
        for row in rows
    ]
    payload = orjson.dumps({"upgrades": upgrades}) if upgrades else b""
    enqueue(conn, topics.topic(thing_id, topics.UPGRADE_NOTIFY), payload, retain=True)
    offers_changed(conn, thing_id)


def publish_all_notices(conn: sqlite3.Connection) -> None:
    for row in conn.execute(
        "SELECT DISTINCT n.thing_id, t.owner_id FROM upgrade_notices n JOIN things t ON t.id = n.thing_id"
    ).fetchall():
        publish_notices(conn, row["thing_id"], row["owner_id"])


def notify_device(conn: sqlite3.Connection, thing_id: str, owner_id: str, software: sqlite3.Row) -> bool:
    """Tell the device about its offer of this software if it is behind and was not told yet: the
    retained notify document (MQTT) and a stored `upgrade` message (HTTP long-poll)."""
    latest = offer(conn, thing_id, software)
    if latest is None:
        return False
    reported = conn.execute(
        "SELECT version_number FROM device_versions WHERE thing_id = ? AND software_name = ?",
        (thing_id, software["name"]),
    ).fetchone()
    if reported is not None and _current(conn, software, reported["version_number"], latest):
        return False
    told = conn.execute(
        "SELECT version_pk FROM upgrade_notices WHERE thing_id = ? AND software_pk = ?",
        (thing_id, software["pk"]),
    ).fetchone()
    if told is not None and told["version_pk"] == latest["pk"]:
        return False
    conn.execute(
        "INSERT INTO upgrade_notices (thing_id, software_pk, version_pk) VALUES (?,?,?)"
        " ON CONFLICT (thing_id, software_pk) DO UPDATE SET version_pk = excluded.version_pk",
        (thing_id, software["pk"], latest["pk"]),
    )
    notice = orjson.dumps(_offer_doc(conn, owner_id, software, latest))
    insert_message(conn, thing_id, owner_id, UPGRADE, notice, "json", "bridge")
    publish_notices(conn, thing_id, owner_id)
    return True


def _profile_members(conn: sqlite3.Connection, profile_pks: Iterable[int]) -> list[str]:
    found: list[str] = []
    for pk in profile_pks:
        found += [
            r["thing_id"]
            for r in conn.execute(
                "SELECT d.thing_id FROM account_devices d JOIN upgrade_accounts a ON a.pk = d.account_pk"
                " WHERE a.profile_pk = ? ORDER BY d.thing_id",
                (pk,),
            )
        ]
    return list(dict.fromkeys(found))


def _clear_satisfied(conn: sqlite3.Connection, thing_id: str, owner_id: str) -> None:
    """Drop the notices the device's reported versions now satisfy; re-publish if any went."""
    dropped = 0
    for row in conn.execute(
        "SELECT n.software_pk, s.pk, s.name, v.pk AS vpk, v.version_number, v.released, d.version_number AS running"
        " FROM upgrade_notices n JOIN software s ON s.pk = n.software_pk"
        " JOIN software_versions v ON v.pk = n.version_pk"
        " JOIN device_versions d ON d.thing_id = n.thing_id AND d.software_name = s.name WHERE n.thing_id = ?",
        (thing_id,),
    ).fetchall():
        if _current(conn, row, row["running"], row):
            dropped += conn.execute(
                "DELETE FROM upgrade_notices WHERE thing_id = ? AND software_pk = ?",
                (thing_id, row["software_pk"]),
            ).rowcount
    if dropped:
        publish_notices(conn, thing_id, owner_id)


def _record_running(
    conn: sqlite3.Connection, thing_id: str, name: str, number: str, transport: str, client_token: str | None
) -> None:
    conn.execute(
        "INSERT INTO device_versions (thing_id, software_name, version_number, ts, transport, client_token)"
        " VALUES (?,?,?,?,?,?) ON CONFLICT (thing_id, software_name) DO UPDATE SET"
        " version_number = excluded.version_number, ts = excluded.ts, transport = excluded.transport,"
        " client_token = excluded.client_token",
        (thing_id, name, number, ids.now(), transport, client_token),
    )


def forget_rollouts(conn: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> None:
    """Clear the retained state of the rollouts about to be deleted (by a cascade) with the rows
    matching `where`."""
    for row in conn.execute(f"SELECT id FROM rollouts WHERE {where}", args).fetchall():
        enqueue(conn, topics.rollout_state(row["id"]), b"", retain=True)


def _things_told_of(conn: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> list[str]:
    return [
        r["thing_id"]
        for r in conn.execute(f"SELECT DISTINCT thing_id FROM upgrade_notices WHERE {where}", args)
    ]


async def list_owned(
    store: Store,
    query: ListQuery,
    known: Iterable[str],
    sql: str,
    owner_id: str,
    render: Callable[[sqlite3.Connection, sqlite3.Row], Record],
) -> tuple[int, list[Record]]:
    """A list operation: the operator's rows (`sql` selects them by owner), rendered, then paged."""

    def read(conn: sqlite3.Connection) -> list[Record]:
        return [render(conn, row) for row in conn.execute(sql, (owner_id,)).fetchall()]

    return query.apply(await store.read(read), tuple(known))


# ---- the service -------------------------------------------------------------------------------
class Upgrades:
    def __init__(
        self, store: Store, outbox: Outbox, link: DeviceLink, messages: Messages, on_results: ResultsHook
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.link = link
        self.messages = messages
        self.on_results = on_results

    # ---- rollout profiles ----------------------------------------------------------------------
    async def create_profile(self, owner_id: str, body: Any) -> str:
        """POST /v2/rolloutProfile -> the id (given, or generated)."""
        body = _object(body, PROFILE_FIELDS, "rollout profile")
        profile_id = _text(body, "id") or ids.new_id()

        def create(conn: sqlite3.Connection) -> str:
            try:
                conn.execute(
                    "INSERT INTO rollout_profiles (owner_id, id, name, description, created) VALUES (?,?,?,?,?)",
                    (
                        owner_id,
                        profile_id,
                        _text(body, "name"),
                        _text(body, "description", limit=MAX_TEXT),
                        ids.now(),
                    ),
                )
            except IntegrityError as exc:
                raise Conflict(f"rollout profile {profile_id!r:.100} exists") from exc
            self._link_versions(conn, owner_id, _profile(conn, owner_id, profile_id), body)
            return profile_id

        return await self.store.write(create)

    @staticmethod
    def _link_versions(
        conn: sqlite3.Connection, owner_id: str, profile: sqlite3.Row, body: Mapping[str, Any]
    ) -> None:
        """`softwareVersions` given: exactly these versions target the profile (Version.rolloutProfiles
        is the stored truth, CATALOG 001 #10)."""
        if body.get("softwareVersions") is None:
            return
        pks = []
        for ref in _list(body, "softwareVersions"):
            ref = _reference(ref, "softwareVersions")
            try:
                software = _software(conn, owner_id, ref["softwareName"])
                pks.append(_version(conn, software, ref["versionNumber"])["pk"])
            except NotFound as exc:
                raise Invalid(f"softwareVersions: {exc}") from exc
        linked = "SELECT DISTINCT v.software_pk FROM version_profiles vp JOIN software_versions v ON v.pk = vp.version_pk WHERE vp.profile_pk = ?"
        softwares = {r[0] for r in conn.execute(linked, (profile["pk"],))}
        conn.execute("DELETE FROM version_profiles WHERE profile_pk = ?", (profile["pk"],))
        conn.executemany(
            "INSERT INTO version_profiles (version_pk, profile_pk) VALUES (?,?) ON CONFLICT DO NOTHING",
            [(pk, profile["pk"]) for pk in pks],
        )
        for software_pk in sorted(softwares | {r[0] for r in conn.execute(linked, (profile["pk"],))}):
            versions_changed(conn, software_pk)

    async def list_profiles(self, owner_id: str, query: ListQuery) -> tuple[int, list[Record]]:
        sql = "SELECT * FROM rollout_profiles WHERE owner_id = ? ORDER BY created, pk"
        return await list_owned(self.store, query, PROFILE_FIELDS, sql, owner_id, _profile_doc)

    async def get_profile(self, owner_id: str, profile_id: str) -> Record:
        return await self.store.read(lambda c: _profile_doc(c, _profile(c, owner_id, profile_id)))

    async def update_profile(self, owner_id: str, profile_id: str, body: Any) -> Put:
        body = _object(body, PROFILE_FIELDS, "rollout profile")
        _same(body, "id", profile_id)

        def update(conn: sqlite3.Connection) -> Put:
            profile = _profile(conn, owner_id, profile_id)
            before = _profile_doc(conn, profile)
            for key, column, limit in (("name", "name", 256), ("description", "description", MAX_TEXT)):
                if key in body:
                    conn.execute(
                        f"UPDATE rollout_profiles SET {column} = ? WHERE pk = ?",
                        (_text(body, key, limit=limit), profile["pk"]),
                    )
            self._link_versions(conn, owner_id, profile, body)
            # the row as it is now: `profile` still holds the values read before the update
            after = conn.execute("SELECT * FROM rollout_profiles WHERE pk = ?", (profile["pk"],)).fetchone()
            return Put(1, int(_profile_doc(conn, after) != before))

        return await self.store.write(update)

    async def delete_profile(self, owner_id: str, profile_id: str) -> int:
        """Its accounts and rollouts go with it; versions stop targeting it."""

        def delete(conn: sqlite3.Connection) -> int:
            profile = _profile(conn, owner_id, profile_id)
            forget_rollouts(conn, "profile_pk = ?", (profile["pk"],))
            members = _profile_members(conn, [profile["pk"]])
            deleted = conn.execute("DELETE FROM rollout_profiles WHERE pk = ?", (profile["pk"],)).rowcount
            for thing_id in members:  # in no account now
                offers_changed(conn, thing_id)
            return deleted

        return await self.outbox.write(delete)

    # ---- accounts ------------------------------------------------------------------------------
    async def list_accounts(
        self, owner_id: str, profile_id: str, query: ListQuery
    ) -> tuple[int, list[Record]]:
        def read(conn: sqlite3.Connection) -> list[Record]:
            profile = _profile(conn, owner_id, profile_id)
            rows = conn.execute(
                "SELECT * FROM upgrade_accounts WHERE profile_pk = ? ORDER BY id", (profile["pk"],)
            )
            return [_account_doc(conn, r, profile_id) for r in rows.fetchall()]

        return query.apply(await self.store.read(read), ACCOUNT_FIELDS)

    async def get_account(self, owner_id: str, profile_id: str, account_id: str) -> Record:
        def read(conn: sqlite3.Connection) -> Record:
            return _account_doc(
                conn, _account(conn, _profile(conn, owner_id, profile_id), account_id), profile_id
            )

        return await self.store.read(read)

    async def put_account(self, owner_id: str, profile_id: str, account_id: str, body: Any) -> Put:
        """Upsert (CATALOG 001 #13): created, or its devices replaced by the body's. An account of the
        operator's under another profile moves to this one."""
        body = _object(body, ACCOUNT_FIELDS, "account")
        _same(body, "id", _key(account_id, "accountId"))
        _same(body, "rolloutProfileId", profile_id)
        devices = self._devices(_list(body, "devices"))

        def put(conn: sqlite3.Connection) -> Put:
            profile = _profile(conn, owner_id, profile_id)
            row = conn.execute(
                "SELECT * FROM upgrade_accounts WHERE owner_id = ? AND id = ?", (owner_id, account_id)
            ).fetchone()
            created = row is None
            if created:
                conn.execute(
                    "INSERT INTO upgrade_accounts (owner_id, id, profile_pk) VALUES (?,?,?)",
                    (owner_id, account_id, profile["pk"]),
                )
                before: Record | None = None
            else:
                before = _account_doc(conn, row, profile_id) if row["profile_pk"] == profile["pk"] else None
                conn.execute(
                    "UPDATE upgrade_accounts SET profile_pk = ? WHERE pk = ?", (profile["pk"], row["pk"])
                )
            account = _account(conn, profile, account_id)
            if "devices" in body:
                gone = conn.execute(
                    "DELETE FROM account_devices WHERE account_pk = ? RETURNING thing_id", (account["pk"],)
                ).fetchall()
                self._add(conn, owner_id, account, devices)
                for row in gone:
                    if not conn.execute(
                        "SELECT 1 FROM account_devices WHERE thing_id = ?", (row[0],)
                    ).fetchone():
                        offers_changed(conn, row[0])
            return Put(
                int(not created),
                int(not created and _account_doc(conn, account, profile_id) != before),
                created,
            )

        return await self.outbox.write(put)

    async def delete_account(self, owner_id: str, profile_id: str, account_id: str) -> int:
        def delete(conn: sqlite3.Connection) -> int:
            account = _account(conn, _profile(conn, owner_id, profile_id), account_id)
            members = conn.execute(
                "SELECT thing_id FROM account_devices WHERE account_pk = ? ORDER BY thing_id",
                (account["pk"],),
            ).fetchall()
            deleted = conn.execute("DELETE FROM upgrade_accounts WHERE pk = ?", (account["pk"],)).rowcount
            for row in members:
                offers_changed(conn, row[0])
            return deleted

        return await self.outbox.write(delete)

    @staticmethod
    def _devices(items: list[Any]) -> list[tuple[str, str]]:
        out = []
        for item in items:
            device = _object(item, ("id", "type"), "device")
            out.append((_text(device, "id", required=True) or "", _text(device, "type", required=True) or ""))
        return out

    @staticmethod
    def _add(
        conn: sqlite3.Connection, owner_id: str, account: sqlite3.Row, devices: list[tuple[str, str]]
    ) -> int:
        """Put devices in the account (a device is in one account at most: it moves); how many
        changed."""
        changed = 0
        for device_id, kind in devices:
            thing_id = owned_device(conn, owner_id, device_id)
            same = conn.execute(
                "SELECT 1 FROM account_devices WHERE thing_id = ? AND account_pk = ? AND device_id = ? AND type = ?",
                (thing_id, account["pk"], device_id, kind),
            ).fetchone()
            if same is None:
                conn.execute(
                    "INSERT INTO account_devices (thing_id, account_pk, device_id, type) VALUES (?,?,?,?)"
                    " ON CONFLICT (thing_id) DO UPDATE SET account_pk = excluded.account_pk,"
                    " device_id = excluded.device_id, type = excluded.type",
                    (thing_id, account["pk"], device_id, kind),
                )
                offers_changed(conn, thing_id)
                changed += 1
        return changed

    async def add_devices(
        self, owner_id: str, profile_id: str, account_id: str, body: Any
    ) -> tuple[Put, str | None]:
        """PUT .../devices/add {deviceList}: the account is created when missing (then `_id` = its
        id, the second value)."""
        body = _object(body, ("deviceList",), "body")
        devices = self._devices(_list(body, "deviceList", required=True))
        _key(account_id, "accountId")

        def add(conn: sqlite3.Connection) -> tuple[Put, str | None]:
            profile = _profile(conn, owner_id, profile_id)
            created = conn.execute(
                "INSERT INTO upgrade_accounts (owner_id, id, profile_pk) VALUES (?,?,?) ON CONFLICT DO NOTHING",
                (owner_id, account_id, profile["pk"]),
            ).rowcount
            changed = self._add(conn, owner_id, _account(conn, profile, account_id), devices)
            return Put(int(not created), int(not created and changed > 0)), account_id if created else None

        return await self.outbox.write(add)

    async def remove_devices(self, owner_id: str, profile_id: str, account_id: str, body: Any) -> Put:
        """PUT .../devices/remove {deviceIdList}: ids or regIds; absent ones are no change."""
        body = _object(body, ("deviceIdList",), "body")
        device_ids = _strings(body, "deviceIdList") if body.get("deviceIdList") is not None else None
        if device_ids is None:
            raise Invalid("deviceIdList is required (an array of device ids)")
        return await self._remove(owner_id, profile_id, account_id, device_ids)

    async def add_device(
        self, owner_id: str, profile_id: str, account_id: str, device_id: str, body: Any
    ) -> Put:
        """PUT .../devices/{deviceId}/add {id, type}: the path names the device."""
        body = _object(body, ("id", "type"), "device")
        _same(body, "id", device_id)
        ((_, kind),) = self._devices([{**body, "id": device_id}])

        def add(conn: sqlite3.Connection) -> Put:
            account = _account(conn, _profile(conn, owner_id, profile_id), account_id)
            return Put(1, int(self._add(conn, owner_id, account, [(device_id, kind)]) > 0))

        return await self.outbox.write(add)

    async def remove_device(
        self, owner_id: str, profile_id: str, account_id: str, device_id: str, body: Any = None
    ) -> Put:
        """PUT .../devices/{deviceId}/remove: the body ({id, type}) is optional (CATALOG 001 #14)."""
        if body is not None:
            _same(_object(body, ("id", "type"), "device"), "id", device_id)
        return await self._remove(owner_id, profile_id, account_id, (device_id,))

    async def _remove(
        self, owner_id: str, profile_id: str, account_id: str, device_ids: Iterable[str]
    ) -> Put:
        def remove(conn: sqlite3.Connection) -> Put:
            account = _account(conn, _profile(conn, owner_id, profile_id), account_id)
            removed = [
                row[0]
                for d in device_ids
                for row in conn.execute(
                    "DELETE FROM account_devices WHERE account_pk = ? AND (device_id = ? OR thing_id = ?)"
                    " RETURNING thing_id",
                    (account["pk"], d, d),
                ).fetchall()
            ]
            for thing_id in removed:
                offers_changed(conn, thing_id)
            return Put(1, int(bool(removed)))

        return await self.outbox.write(remove)

    # ---- software and versions -----------------------------------------------------------------
    async def list_software(self, owner_id: str, query: ListQuery) -> tuple[int, list[Record]]:
        sql = "SELECT * FROM software WHERE owner_id = ? ORDER BY created, pk"
        return await list_owned(self.store, query, SOFTWARE_FIELDS, sql, owner_id, _software_doc)

    async def create_software(self, owner_id: str, body: Any) -> str:
        """POST /v2/software -> its id (given or generated); name and id are unique per operator."""
        spec = SoftwareSpec.parse(body)
        software_id = spec.id or ids.new_id()

        def create(conn: sqlite3.Connection) -> str:
            taken = conn.execute(
                "SELECT 1 FROM software WHERE owner_id = ? AND (id = ? OR name = ?)",
                (owner_id, software_id, spec.name),
            ).fetchone()
            if taken:
                raise Conflict(f"software with id {software_id!r:.100} or name {spec.name!r:.100} exists")
            conn.execute(
                "INSERT INTO software (owner_id, id, name, description, device_types, upgrade_type, created)"
                " VALUES (?,?,?,?,?,?,?)",
                (
                    owner_id,
                    software_id,
                    spec.name,
                    spec.description,
                    _json(spec.device_types),
                    spec.upgrade_type,
                    ids.now(),
                ),
            )
            software = _software(conn, owner_id, spec.name)
            for version in spec.versions or ():
                _upsert_version(conn, owner_id, software, version)
            return software_id

        return await self.store.write(create)

    async def get_software(self, owner_id: str, name: str) -> Record:
        return await self.store.read(lambda c: _software_doc(c, _software(c, owner_id, name)))

    async def update_software(self, owner_id: str, name: str, body: Any) -> Put:
        """PUT /v2/software/{softwareName}: the whole document; with `versions`, exactly those
        versions remain (the document's only way to add several at once)."""
        spec = SoftwareSpec.parse(body)

        def update(conn: sqlite3.Connection) -> Put:
            software = _software(conn, owner_id, name)
            if spec.id is not None and spec.id != software["id"]:
                raise Invalid(
                    f"id in the body ({spec.id!r:.100}) differs from the software's ({software['id']!r})"
                )
            before = _software_doc(conn, software)
            try:
                conn.execute(
                    "UPDATE software SET name = ?, description = ?, device_types = ?, upgrade_type = ? WHERE pk = ?",
                    (
                        spec.name,
                        spec.description,
                        _json(spec.device_types),
                        spec.upgrade_type,
                        software["pk"],
                    ),
                )
            except IntegrityError as exc:
                raise Conflict(f"another software is named {spec.name!r:.100}") from exc
            if spec.versions is not None:
                keep = [v.version_number for v in spec.versions]
                gone = conn.execute(
                    "SELECT pk FROM software_versions WHERE software_pk = ? AND version_number NOT IN"
                    f" ({','.join('?' * len(keep)) or 'NULL'})",
                    (software["pk"], *keep),
                ).fetchall()
                for row in gone:
                    _delete_version(conn, owner_id, row["pk"])
                for version in spec.versions:
                    _upsert_version(conn, owner_id, software, version)
            after = conn.execute("SELECT * FROM software WHERE pk = ?", (software["pk"],)).fetchone()
            return Put(1, int(_software_doc(conn, after) != before))

        return await self.outbox.write(update)

    async def delete_software(self, owner_id: str, name: str) -> int:
        """Its versions go with it, and so leave every profile; pending notices and rollouts too."""

        def delete(conn: sqlite3.Connection) -> int:
            software = _software(conn, owner_id, name)
            for hook in deleting_hooks:
                hook(conn, software["pk"])
            told = _things_told_of(conn, "software_pk = ?", (software["pk"],))
            forget_rollouts(
                conn,
                "version_pk IN (SELECT pk FROM software_versions WHERE software_pk = ?)",
                (software["pk"],),
            )
            deleted = conn.execute("DELETE FROM software WHERE pk = ?", (software["pk"],)).rowcount
            for thing_id in told:
                publish_notices(conn, thing_id, owner_id)
            return deleted

        return await self.outbox.write(delete)

    async def get_version(self, owner_id: str, name: str, number: str) -> Record:
        return await self.store.read(
            lambda c: _version_doc(c, _version(c, _software(c, owner_id, name), number))
        )

    async def put_version(self, owner_id: str, name: str, number: str, body: Any) -> Put:
        """Upsert (CATALOG 001 #15): NotFound only when the software is missing."""
        spec = VersionSpec.parse(body, _key(number, "versionNumber"))
        return await self.outbox.write(
            lambda c: _upsert_version(c, owner_id, _software(c, owner_id, name), spec)
        )

    async def delete_version(self, owner_id: str, name: str, number: str) -> int:
        def delete(conn: sqlite3.Connection) -> int:
            return _delete_version(
                conn, owner_id, _version(conn, _software(conn, owner_id, name), number)["pk"]
            )

        return await self.outbox.write(delete)

    async def dependencies(self, owner_id: str, name: str, number: str) -> list[Record]:
        def read(conn: sqlite3.Connection) -> list[Record]:
            return _resolved_dependencies(
                conn, owner_id, _version(conn, _software(conn, owner_id, name), number)
            )

        return await self.store.read(read)

    async def notify_version(self, owner_id: str, name: str, number: str) -> list[str]:
        """POST .../versions/{v}/notify: every device of a profile the version targets that is
        behind its offer of this software is told (once per offer). Returns the things told."""

        def notify(conn: sqlite3.Connection) -> list[str]:
            software = _software(conn, owner_id, name)
            version = _version(conn, software, number)
            profiles = [
                r["profile_pk"]
                for r in conn.execute(
                    "SELECT profile_pk FROM version_profiles WHERE version_pk = ?", (version["pk"],)
                )
            ]
            return [t for t in _profile_members(conn, profiles) if notify_device(conn, t, owner_id, software)]

        return self._told(await self.outbox.write(notify))

    async def notify_pending(self, owner_id: str) -> list[str]:
        """POST /v2/devices/software/pendingUpdate/notify: every device in the operator's accounts
        is told of each software it is behind on."""

        def notify(conn: sqlite3.Connection) -> list[str]:
            everything = conn.execute(
                "SELECT * FROM software WHERE owner_id = ? ORDER BY name", (owner_id,)
            ).fetchall()
            members = [
                r["thing_id"]
                for r in conn.execute(
                    "SELECT d.thing_id FROM account_devices d JOIN upgrade_accounts a ON a.pk = d.account_pk"
                    " WHERE a.owner_id = ? ORDER BY d.thing_id",
                    (owner_id,),
                )
            ]
            told = [t for t in members for s in everything if notify_device(conn, t, owner_id, s)]
            return list(dict.fromkeys(told))

        return self._told(await self.outbox.write(notify))

    def _told(self, things: list[str]) -> list[str]:
        self.messages.wake(things)
        return things

    # ---- device side ---------------------------------------------------------------------------
    async def check(self, device: DeviceIdentity, body: Any) -> Record:
        """checkForUpgrade {name, version} -> {name, status, version, downloadUrl, dependencies}."""
        body = _object(body, ("name", "version"), "body")
        name = _text(body, "name", required=True) or ""
        number = _text(body, "version", required=True) or ""
        return await self.store.read(check, device.thing_id, device.owner_id, name, number)

    async def report_versions(
        self, device: DeviceIdentity, body: Any, *, transport: str, client_token: str | None = None
    ) -> None:
        """currentVersionNumbers {currentVersionNumbers: [{softwareName, currentVersionNumber}]}:
        recorded (with a `versions` message, only while the device's identity holds), notices it
        satisfies cleared, then published on things/{id}/versions for the owner's applications."""
        body = _object(body, ("currentVersionNumbers",), "body")
        reports = []
        for item in _list(body, "currentVersionNumbers", required=True):
            item = _object(item, ("softwareName", "currentVersionNumber"), "currentVersionNumbers[]")
            reports.append(
                (
                    _text(item, "softwareName", required=True) or "",
                    _text(item, "currentVersionNumber", required=True) or "",
                )
            )
        payload = orjson.dumps(body)

        def record(conn: sqlite3.Connection) -> None:
            insert_message(
                conn, device.thing_id, device.owner_id, VERSIONS, payload, "json", transport, device.cert_id
            )
            for name, number in reports:
                _record_running(conn, device.thing_id, name, number, transport, client_token)
            _clear_satisfied(conn, device.thing_id, device.owner_id)

        await commit_and_route(
            self.outbox.write, self.link, topics.topic(device.thing_id, topics.VERSIONS), payload, record
        )

    async def report_results(
        self, device: DeviceIdentity, body: Any, *, transport: str, client_token: str | None = None
    ) -> None:
        """upgradeResult {currentVersionsUpgradeResult: [{softwareName, versionNumber, status,
        errorCode, message}]}: appended to the device's history; SUCCESS also records the version as
        running; staged rollouts of the device move on. Then published on things/{id}/upgrade/result."""
        body = _object(body, ("currentVersionsUpgradeResult",), "body")
        results = []
        for item in _list(body, "currentVersionsUpgradeResult", required=True):
            item = _object(
                item, ("softwareName", "versionNumber", "status", "errorCode", "message"), "result"
            )
            results.append(
                (
                    _text(item, "softwareName", required=True) or "",
                    _text(item, "versionNumber", required=True) or "",
                    _choice(item, "status", RESULT_STATUSES, required=True) or "",
                    _text(item, "errorCode"),
                    _text(item, "message", limit=MAX_TEXT),
                )
            )
        payload = orjson.dumps(body)

        def record(conn: sqlite3.Connection) -> list[str]:
            insert_message(
                conn, device.thing_id, device.owner_id, VERSIONS, payload, "json", transport, device.cert_id
            )
            now = ids.now()
            for name, number, status, code, message in results:
                conn.execute(
                    "INSERT INTO upgrade_results (thing_id, software_name, version_number, status, error_code,"
                    " message, client_token, ts, transport) VALUES (?,?,?,?,?,?,?,?,?)",
                    (device.thing_id, name, number, status, code, message, client_token, now, transport),
                )
                if status == "SUCCESS":
                    _record_running(conn, device.thing_id, name, number, transport, client_token)
            _clear_satisfied(conn, device.thing_id, device.owner_id)
            return self.on_results(conn, device.thing_id)

        told = await commit_and_route(
            self.outbox.write,
            self.link,
            topics.topic(device.thing_id, topics.UPGRADE_RESULT),
            payload,
            record,
        )
        self._told(told)

    # ---- operator reads of device state --------------------------------------------------------
    async def results(self, owner_id: str, device_id: str) -> list[Record]:
        """The device's upgrade results, oldest first (GET /v2/devices/{deviceId}/upgradeResults)."""

        def read(conn: sqlite3.Connection) -> list[Record]:
            thing_id = owned_device(conn, owner_id, device_id)
            rows = conn.execute("SELECT * FROM upgrade_results WHERE thing_id = ? ORDER BY seq", (thing_id,))
            return [
                {
                    "softwareName": r["software_name"],
                    "versionNumber": r["version_number"],
                    "status": r["status"],
                    **({"errorCode": r["error_code"]} if r["error_code"] is not None else {}),
                    **({"message": r["message"]} if r["message"] is not None else {}),
                    **({"clientToken": r["client_token"]} if r["client_token"] is not None else {}),
                    "timestamp": ids.iso(r["ts"]),
                    "transport": r["transport"],
                }
                for r in rows.fetchall()
            ]

        return await self.store.read(read)

    async def reported_versions(self, owner_id: str, device_id: str) -> list[Record]:
        """What the device last reported running, per software (for GET /dev/v1/things/{id}/state)."""

        def read(conn: sqlite3.Connection) -> list[Record]:
            thing_id = owned_device(conn, owner_id, device_id)
            rows = conn.execute(
                "SELECT * FROM device_versions WHERE thing_id = ? ORDER BY software_name", (thing_id,)
            )
            return [
                {
                    "softwareName": r["software_name"],
                    "currentVersionNumber": r["version_number"],
                    "timestamp": ids.iso(r["ts"]),
                }
                for r in rows.fetchall()
            ]

        return await self.store.read(read)


def _upsert_version(conn: sqlite3.Connection, owner_id: str, software: sqlite3.Row, spec: VersionSpec) -> Put:
    profiles = _profile_pks(conn, owner_id, spec.rollout_profiles)
    existing = conn.execute(
        "SELECT * FROM software_versions WHERE software_pk = ? AND version_number = ?",
        (software["pk"], spec.version_number),
    ).fetchone()
    before = _version_doc(conn, existing) if existing is not None else None
    values = (
        spec.release_date,
        spec.released,
        spec.status,
        spec.priority,
        spec.release_note,
        spec.eula,
        spec.download_url,
        _json(spec.dependencies),
    )
    if existing is None:
        conn.execute(
            "INSERT INTO software_versions (software_pk, version_number, release_date, released, status, priority,"
            " release_note, eula, download_url, dependencies) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (software["pk"], spec.version_number, *values),
        )
    else:
        conn.execute(
            "UPDATE software_versions SET release_date = ?, released = ?, status = ?, priority = ?, release_note = ?,"
            " eula = ?, download_url = ?, dependencies = ? WHERE pk = ?",
            (*values, existing["pk"]),
        )
    version = _version(conn, software, spec.version_number)
    conn.execute("DELETE FROM version_profiles WHERE version_pk = ?", (version["pk"],))
    conn.executemany(
        "INSERT INTO version_profiles (version_pk, profile_pk) VALUES (?,?)",
        [(version["pk"], p) for p in profiles],
    )
    versions_changed(conn, software["pk"])
    if existing is None:
        return Put(0, 0, created=True)
    return Put(1, int(_version_doc(conn, version) != before))


def _delete_version(conn: sqlite3.Connection, owner_id: str, version_pk: int) -> int:
    told = _things_told_of(conn, "version_pk = ?", (version_pk,))
    forget_rollouts(conn, "version_pk = ?", (version_pk,))
    row = conn.execute(
        "DELETE FROM software_versions WHERE pk = ? RETURNING software_pk", (version_pk,)
    ).fetchone()
    for thing_id in told:
        publish_notices(conn, thing_id, owner_id)
    if row is not None:
        versions_changed(conn, row[0])
    return int(row is not None)
