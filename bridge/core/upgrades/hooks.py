"""Where other models follow the upgrader's changes (the firmware target, bridge/core/firmware.py,
registers here on import; the rollout engine gives its ResultsHook to Upgrades). Pure functions
of the database, so one list serves every core."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

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
