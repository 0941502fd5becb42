"""What a device is offered (checkForUpgrade) and told (things/{id}/upgrade/notify and `upgrade`
messages), and what its reports change; inside the caller's transaction."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Any

import orjson

from bridge.core import ids, topics
from bridge.core.errors import Invalid, NotFound
from bridge.core.listing import Record
from bridge.core.messages import UPGRADE, insert_message
from bridge.core.outbox import enqueue
from bridge.core.upgrades.catalog import resolved_dependencies, software_row
from bridge.core.upgrades.hooks import offers_changed


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
        "dependencies": resolved_dependencies(conn, owner_id, version),
    }


def check(conn: sqlite3.Connection, thing_id: str, owner_id: str, name: str, number: str) -> Record:
    try:
        software = software_row(conn, owner_id, name)
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
            "dependencies": resolved_dependencies(conn, owner_id, running) if running is not None else [],
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


def profile_members(conn: sqlite3.Connection, profile_pks: Iterable[int]) -> list[str]:
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


def clear_satisfied(conn: sqlite3.Connection, thing_id: str, owner_id: str) -> None:
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


def record_running(
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


def things_told_of(conn: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> list[str]:
    return [
        r["thing_id"]
        for r in conn.execute(f"SELECT DISTINCT thing_id FROM upgrade_notices WHERE {where}", args)
    ]
