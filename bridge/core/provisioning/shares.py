"""Shares of a model with other vendors (`X-Exosite-Vendor`): a vendor it is shared with may make
clients of, enable, disable and remap the model's serial numbers, and sees only those it enabled
(see `common.model_access`). Sharing is the model owner's: a share is not passed on."""

from __future__ import annotations

import sqlite3

from bridge.core.errors import Invalid, NotFound
from bridge.core.provisioning.common import Vendor, model_access
from bridge.store import Store


def _vendor_pk(conn: sqlite3.Connection, name: str) -> int:
    row = conn.execute("SELECT pk FROM vendors WHERE name = ? AND revoked IS NULL", (name,)).fetchone()
    if row is None:
        raise NotFound(f"vendor {name!r:.100} not found")
    return row["pk"]


class Shares:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def list(self, vendor: Vendor, model: str) -> list[str]:
        """The vendors the model is shared with (empty: the document's 204)."""

        def read(conn: sqlite3.Connection) -> list[str]:
            access = model_access(conn, vendor, model)
            return [
                r["name"]
                for r in conn.execute(
                    "SELECT v.name FROM prov_shares s JOIN vendors v ON v.pk = s.vendor_pk"
                    " WHERE s.model_pk = ? ORDER BY v.name",
                    (access.model_pk,),
                )
            ]

        return await self.store.read(read)

    async def add(self, vendor: Vendor, model: str, other: str) -> None:
        """Sharing again is done already (CATALOG 002 #13)."""
        if other == vendor.name:
            raise Invalid("a model cannot be shared with its own vendor")

        def add(conn: sqlite3.Connection) -> None:
            access = model_access(conn, vendor, model)
            conn.execute(
                "INSERT INTO prov_shares (model_pk, vendor_pk) VALUES (?,?) ON CONFLICT DO NOTHING",
                (access.model_pk, _vendor_pk(conn, other)),
            )

        await self.store.write(add)

    async def remove(self, vendor: Vendor, model: str, other: str) -> None:
        """Removing a share that does not exist is done already; the serial numbers the vendor
        enabled stay as they are, out of its reach."""

        def remove(conn: sqlite3.Connection) -> None:
            access = model_access(conn, vendor, model)
            conn.execute(
                "DELETE FROM prov_shares WHERE model_pk = ? AND vendor_pk IN (SELECT pk FROM vendors WHERE name = ?)",
                (access.model_pk, other),
            )

        await self.store.write(remove)

    async def shared_with(self, vendor: Vendor, model: str, other: str) -> bool:
        """GET share/{model}/{vendorname}: True is the document's 204 (the 404 otherwise is ours)."""

        def read(conn: sqlite3.Connection) -> bool:
            access = model_access(conn, vendor, model)
            return (
                conn.execute(
                    "SELECT 1 FROM prov_shares s JOIN vendors v ON v.pk = s.vendor_pk"
                    " WHERE s.model_pk = ? AND v.name = ?",
                    (access.model_pk, other),
                ).fetchone()
                is not None
            )

        return await self.store.read(read)
