"""Vendors: principals of the provisioning dialect, each belonging to a registry user (the owner of
the things its serial numbers become). An admin creates them on the command line, which prints
the credentials once; only their SHA-256 hashes are stored."""

from __future__ import annotations

import hmac
import secrets
import sqlite3
from dataclasses import dataclass

from bridge.core import ids
from bridge.core.accounts import User
from bridge.core.errors import Conflict, NotFound, Unauthorized
from bridge.core.provisioning.common import Vendor, secret_hash
from bridge.store import IntegrityError, Store


@dataclass(frozen=True)
class NewVendor:
    """What `vendor add` prints once: the token (X-Exosite-Token) and the vendor CIK (X-Exosite-CIK)."""

    vendor: Vendor
    token: str
    cik: str


@dataclass(frozen=True)
class VendorRecord:
    name: str
    owner: str  # username
    created: float
    revoked: float | None


def new_cik() -> str:
    """A CIK as the document's clients expect it: 40 hex characters (160 random bits)."""
    return secrets.token_hex(20)


class Vendors:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def add(self, name: str, owner: User) -> NewVendor:
        ids.check_name(name, "vendor name")
        token, cik = secrets.token_urlsafe(32), new_cik()

        def insert(conn: sqlite3.Connection) -> int:
            try:
                return conn.execute(
                    "INSERT INTO vendors (name, owner_id, token_hash, cik_hash, created) VALUES (?,?,?,?,?)"
                    " RETURNING pk",
                    (name, owner.id, secret_hash(token), secret_hash(cik), ids.now()),
                ).fetchone()[0]
            except IntegrityError as exc:
                raise Conflict(f"vendor {name!r} already exists") from exc

        pk = await self.store.write(insert)
        return NewVendor(Vendor(pk, name, owner.id), token, cik)

    async def list(self) -> list[VendorRecord]:
        rows = await self.store.read(
            lambda c: c.execute(
                "SELECT v.name, u.username, v.created, v.revoked FROM vendors v"
                " JOIN users u ON u.id = v.owner_id ORDER BY v.name"
            ).fetchall()
        )
        return [VendorRecord(r["name"], r["username"], r["created"], r["revoked"]) for r in rows]

    async def revoke(self, name: str) -> None:
        """Its token and CIK stop working at once (each request reads them); its models, serial
        numbers and the things they became stay, and the name stays taken."""

        def revoke(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "UPDATE vendors SET revoked = coalesce(revoked, ?) WHERE name = ?", (ids.now(), name)
            ).rowcount

        if not await self.store.write(revoke):
            raise NotFound(f"vendor {name!r} not found")

    async def authenticate(self, token: str | None = None, cik: str | None = None) -> Vendor:
        """The vendor behind an X-Exosite-Token or X-Exosite-CIK header (one given; an empty one
        counts as absent). Unauthorized when missing, unknown or revoked."""
        secret, column = (token, "token_hash") if token else (cik, "cik_hash")
        if not secret or len(secret) > 256:
            raise Unauthorized(
                "an X-Exosite-Token or X-Exosite-CIK header with a vendor credential is required"
            )
        digest = secret_hash(secret)
        row = await self.store.read(
            lambda c: c.execute(
                f"SELECT pk, name, owner_id, {column} AS hash FROM vendors WHERE {column} = ? AND revoked IS NULL",
                (digest,),
            ).fetchone()
        )
        # The lookup compares hashes of the secret, which tell an observer of timing nothing
        # about it; the constant-time comparison is kept as the explicit check.
        if row is None or not hmac.compare_digest(row["hash"], digest):
            raise Unauthorized("unknown or revoked vendor credential")
        return Vendor(row["pk"], row["name"], row["owner_id"])
