"""The operator's catalog in SQL: lookups by owner (NotFound for another's), the documents GET
returns, version writes, and the list operation every catalog listing shares."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable

import orjson

from bridge.core.errors import Invalid, NotFound
from bridge.core.listing import ListQuery, Record
from bridge.store import Store


# ---- lookups (inside a transaction) ------------------------------------------------------------
def software_row(conn: sqlite3.Connection, owner_id: str, ref: str) -> sqlite3.Row:
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


def software_version(conn: sqlite3.Connection, software: sqlite3.Row, number: str) -> sqlite3.Row:
    return version_row(conn, software["pk"], number, f"software {software['name']!r}")


def profile_row(conn: sqlite3.Connection, owner_id: str, profile_id: str) -> sqlite3.Row:
    row = conn.execute(
        "SELECT * FROM rollout_profiles WHERE owner_id = ? AND id = ?", (owner_id, profile_id)
    ).fetchone()
    if row is None:
        raise NotFound(f"rollout profile {profile_id!r:.100} not found")
    return row


def account_row(conn: sqlite3.Connection, profile: sqlite3.Row, account_id: str) -> sqlite3.Row:
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


def profile_pks(conn: sqlite3.Connection, owner_id: str, profile_ids: Iterable[str]) -> list[int]:
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
def version_doc(conn: sqlite3.Connection, row: sqlite3.Row) -> Record:
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


def software_doc(conn: sqlite3.Connection, row: sqlite3.Row) -> Record:
    versions = conn.execute(
        "SELECT * FROM software_versions WHERE software_pk = ? ORDER BY released, pk", (row["pk"],)
    ).fetchall()
    doc = {
        "id": row["id"],
        "name": row["name"],
        "description": row["description"],
        "deviceTypes": orjson.loads(row["device_types"]),
        "upgradeType": row["upgrade_type"],
        "versions": [version_doc(conn, v) for v in versions],
    }
    return {k: v for k, v in doc.items() if v is not None}


def profile_doc(conn: sqlite3.Connection, row: sqlite3.Row) -> Record:
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


def account_doc(conn: sqlite3.Connection, row: sqlite3.Row, profile_id: str) -> Record:
    devices = conn.execute(
        "SELECT device_id, type FROM account_devices WHERE account_pk = ? ORDER BY device_id", (row["pk"],)
    )
    return {
        "id": row["id"],
        "rolloutProfileId": profile_id,
        "devices": [{"id": d["device_id"], "type": d["type"]} for d in devices],
    }


def resolved_dependencies(conn: sqlite3.Connection, owner_id: str, version: sqlite3.Row) -> list[Record]:
    """Each dependency with `name` = the software it names (by name, then id) when it exists."""
    out = []
    for dep in orjson.loads(version["dependencies"]):
        row = conn.execute(
            "SELECT name FROM software WHERE owner_id = ? AND (name = ? OR id = ?) ORDER BY name = ? DESC LIMIT 1",
            (owner_id, dep["softwareName"], dep["softwareName"], dep["softwareName"]),
        ).fetchone()
        out.append({**dep, "name": row["name"]} if row is not None else dep)
    return out


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
