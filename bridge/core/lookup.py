"""The one lookup of a thing on behalf of its owner: another user's thing and a missing one look
the same (NotFound), so an id never tells who holds it."""

from __future__ import annotations

import sqlite3

from bridge.core.errors import NotFound


def thing_not_found(thing_id: str) -> NotFound:
    return NotFound(f"thing {thing_id!r} not found")


def owned_thing(conn: sqlite3.Connection, thing_id: str, owner_id: str | None) -> sqlite3.Row:
    """The thing's row; `owner_id` None: whoever owns it (a fleet-wide principal)."""
    row = conn.execute("SELECT * FROM things WHERE id = ?", (thing_id,)).fetchone()
    if row is None or (owner_id is not None and row["owner_id"] != owner_id):
        raise thing_not_found(thing_id)
    return row
