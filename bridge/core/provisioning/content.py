"""Content entities of a model (a content type, size, updated time in epoch seconds, description,
`protected`) and their blobs (`blobs`). Upload replaces an entity's blob (CATALOG 002 #9).

Who may have a content: every serial number of the model when it is unprotected; a protected one
only a serial number that shares a group with it, directly or through nested groups (CATALOG 002
#7), expired memberships counting as absent. A device proves its serial number with its CIK and
names its vendor and model, which must be those of its serial number (Forbidden otherwise: the
document's 403 on downloads, 400 on info). Content it may not have and missing content are the
same NotFound, so a device cannot probe for protected ids."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from pathlib import Path

from bridge.core.errors import Conflict, Forbidden, Invalid, NotFound
from bridge.core.provisioning.blobs import Blobs
from bridge.core.provisioning.common import Vendor, key, model_access, text
from bridge.core.provisioning.serials import Serials
from bridge.store import IntegrityError, Store

DEFAULT_TYPE = "application/octet-stream"  # until the first upload names one
_CONTENT_TYPE = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,254}")  # a header value: printable ASCII

# Documents of other models that follow a content entity's blob (the firmware target,
# core/firmware.py, registers itself on import): (conn, model pk, content id), in the transaction
# that uploaded or deleted it.
blob_hooks: list[Callable[[sqlite3.Connection, int, str], None]] = []

# A membership counts while it has not expired (0 = never); `:now` is the injected clock.
LIVE = "(m.expire = 0 OR m.expire > :now)"

# The content a serial number may have. `up`: the groups holding it, and the groups holding those;
# `down`: every group nested in one of them, where a content that is a member shares a group with
# the serial number. UNION (not UNION ALL) ends the walks even if a cycle were ever stored.
_AUTHORISED = f"""
WITH RECURSIVE
up(pk) AS (
    SELECT m.group_pk FROM group_members m WHERE m.sn_pk = :sn AND {LIVE}
    UNION
    SELECT m.group_pk FROM group_members m JOIN up ON m.member_group_pk = up.pk WHERE {LIVE}
),
down(pk) AS (
    SELECT pk FROM up
    UNION
    SELECT m.member_group_pk FROM group_members m JOIN down ON m.group_pk = down.pk
    WHERE m.member_group_pk IS NOT NULL AND {LIVE}
)
SELECT c.* FROM prov_content c
WHERE c.model_pk = :model AND (:id IS NULL OR c.id = :id) AND (
    c.protected = 0 OR c.pk IN (
        SELECT m.content_pk FROM group_members m JOIN down ON m.group_pk = down.pk
        WHERE m.content_pk IS NOT NULL AND {LIVE}
    )
)
ORDER BY c.pk"""


@dataclass(frozen=True)
class ContentInfo:
    """CINFO5 (CINFO4 without `protected`); `updated`: epoch seconds of creation or last upload."""

    id: str
    content_type: str
    size: int
    updated: int
    description: str
    protected: bool


@dataclass(frozen=True)
class Download:
    """What aiohttp's FileResponse needs: the blob's path; `etag` is its SHA-256 (strong: the name
    of the bytes), for If-Range and If-None-Match."""

    path: Path
    content_type: str
    size: int
    etag: str
    updated: int


def _info(row: sqlite3.Row) -> ContentInfo:
    return ContentInfo(
        row["id"],
        row["content_type"],
        row["size"],
        int(row["updated"]),
        row["description"],
        bool(row["protected"]),
    )


def _not_found(content_id: str) -> NotFound:
    return NotFound(f"content {content_id!r:.140} not found")


def _entity(conn: sqlite3.Connection, model_pk: int, content_id: str) -> sqlite3.Row:
    row = conn.execute(
        "SELECT * FROM prov_content WHERE model_pk = ? AND id = ?", (model_pk, content_id)
    ).fetchone()
    if row is None:
        raise _not_found(content_id)
    return row


def _sn_pk(conn: sqlite3.Connection, model_pk: int, sn: str) -> int:
    row = conn.execute(
        "SELECT pk FROM serial_numbers WHERE model_pk = ? AND sn = ?", (model_pk, sn)
    ).fetchone()
    if row is None:
        raise NotFound(f"serial number {sn!r:.140} not found")
    return row["pk"]


class Content:
    """`clock`: epoch seconds, shared with the rest of the model (tests inject theirs)."""

    def __init__(self, store: Store, blobs: Blobs, serials: Serials, clock: Callable[[], float]) -> None:
        self.store = store
        self.blobs = blobs
        self.serials = serials
        self.clock = clock

    def _authorised(
        self, conn: sqlite3.Connection, model_pk: int, sn_pk: int, content_id: str | None = None
    ) -> list[sqlite3.Row]:
        return conn.execute(
            _AUTHORISED, {"sn": sn_pk, "model": model_pk, "id": content_id, "now": self.clock()}
        ).fetchall()

    def _row(
        self, conn: sqlite3.Connection, model_pk: int, content_id: str, sn_pk: int | None
    ) -> sqlite3.Row:
        """The entity; with `sn_pk`, only if that serial number may have it."""
        if sn_pk is None:
            return _entity(conn, model_pk, content_id)
        rows = self._authorised(conn, model_pk, sn_pk, content_id)
        if not rows:
            raise _not_found(content_id)
        return rows[0]

    # ---- the vendor's side ----------------------------------------------------------------------
    async def list(self, vendor: Vendor, model: str) -> list[str]:
        """The model's content ids in creation order (empty: the document's 204)."""

        def read(conn: sqlite3.Connection) -> list[str]:
            access = model_access(conn, vendor, model)
            return [
                r["id"]
                for r in conn.execute(
                    "SELECT id FROM prov_content WHERE model_pk = ? ORDER BY pk", (access.model_pk,)
                )
            ]

        return await self.store.read(read)

    async def authorized(self, vendor: Vendor, model: str, sn: str) -> list[str]:
        """?sn=: the content ids that serial number may have."""

        def read(conn: sqlite3.Connection) -> list[str]:
            access = model_access(conn, vendor, model)
            return [
                r["id"] for r in self._authorised(conn, access.model_pk, _sn_pk(conn, access.model_pk, sn))
            ]

        return await self.store.read(read)

    async def create(
        self, vendor: Vendor, model: str, content_id: str, description: str, protected: bool = False
    ) -> None:
        """An entity without a blob yet (size 0); Conflict when the id exists."""
        values = (key(content_id, "id"), text(description, "description"), int(protected))

        def insert(conn: sqlite3.Connection) -> None:
            access = model_access(conn, vendor, model)
            try:
                conn.execute(
                    "INSERT INTO prov_content (model_pk, id, description, protected, content_type, size, updated)"
                    " VALUES (?,?,?,?,?,0,?)",
                    (access.model_pk, *values, DEFAULT_TYPE, int(self.clock())),
                )
            except IntegrityError as exc:
                raise Conflict(f"content {content_id!r:.140} already exists") from exc

        await self.store.write(insert)

    async def info(
        self, vendor: Vendor, model: str, content_id: str, *, sn: str | None = None
    ) -> ContentInfo:
        """CINFO5; with `sn` (CINFO4), only if that serial number may have the content."""
        return _info(await self.store.read(self._vendor_row, vendor, model, content_id, sn))

    async def download(
        self, vendor: Vendor, model: str, content_id: str, *, sn: str | None = None
    ) -> Download:
        """?download=true, with `sn` only if that serial number may have it."""
        return self._download(await self.store.read(self._vendor_row, vendor, model, content_id, sn))

    def _vendor_row(
        self, conn: sqlite3.Connection, vendor: Vendor, model: str, content_id: str, sn: str | None
    ) -> sqlite3.Row:
        access = model_access(conn, vendor, model)
        sn_pk = None if sn is None else _sn_pk(conn, access.model_pk, sn)
        return self._row(conn, access.model_pk, content_id, sn_pk)

    def _download(self, row: sqlite3.Row) -> Download:
        if row["sha256"] is None:
            raise NotFound(f"content {row['id']!r:.140} has no blob uploaded yet")
        return Download(
            self.blobs.path(row["sha256"]),
            row["content_type"],
            row["size"],
            row["sha256"],
            int(row["updated"]),
        )

    async def upload(
        self, vendor: Vendor, model: str, content_id: str, content_type: str, chunks: AsyncIterable[bytes]
    ) -> None:
        """Replace the entity's blob with the streamed body (TooLarge past
        `provisioning.max_content_size`); the blob it replaced is removed unless another entity
        has the same bytes. NotFound for an unknown entity, checked before the body is read."""
        if not isinstance(content_type, str) or not _CONTENT_TYPE.fullmatch(content_type):
            raise Invalid("the content type must be 1-255 printable ASCII characters")
        await self.store.read(lambda c: _entity(c, model_access(c, vendor, model).model_pk, content_id))
        received = await self.blobs.receive(chunks)

        def write(conn: sqlite3.Connection) -> str | None:
            # the entity may have been deleted while the body streamed in: NotFound then
            row = _entity(conn, model_access(conn, vendor, model).model_pk, content_id)
            conn.execute(
                "UPDATE prov_content SET sha256 = ?, size = ?, content_type = ?, updated = ? WHERE pk = ?",
                (received.sha256, received.size, content_type, int(self.clock()), row["pk"]),
            )
            _blob_changed(conn, row["model_pk"], content_id)
            return row["sha256"]

        await self.blobs.place(received, write)
        self.serials.outbox.kick()

    async def delete(self, vendor: Vendor, model: str, content_id: str) -> None:
        """With its memberships, and its blob unless another entity has the same bytes. Deleting
        a missing content is done already (CATALOG 002 #13)."""

        def delete(conn: sqlite3.Connection) -> str | None:
            access = model_access(conn, vendor, model)
            row = conn.execute(
                "DELETE FROM prov_content WHERE model_pk = ? AND id = ? RETURNING sha256",
                (access.model_pk, content_id),
            ).fetchone()
            if row is None:
                return None
            _blob_changed(conn, access.model_pk, content_id)
            return row["sha256"]

        await self.blobs.release([await self.store.write(delete)])
        self.serials.outbox.kick()

    # ---- the device's side (X-Exosite-CIK) ------------------------------------------------------
    async def _device_model(self, cik: str, vendor: str, model: str) -> tuple[int, int]:
        """(model pk, serial number pk) of the device; Unauthorized for a CIK that is not current,
        Forbidden when the vendor and model are not those of its serial number."""
        client = await self.serials.client(cik)
        row = await self.store.read(
            lambda c: c.execute(
                "SELECT m.pk FROM prov_models m JOIN vendors v ON v.pk = m.vendor_pk"
                " WHERE v.name = ? AND v.revoked IS NULL AND m.name = ?",
                (vendor, model),
            ).fetchone()
        )
        if row is None or row["pk"] != client.model_pk:
            raise Forbidden("the vendor and model pair is not this device's")
        return client.model_pk, client.sn_pk

    async def device_content(self, cik: str, vendor: str, model: str) -> list[str]:
        """GET /provision/download?vendor=&model=: the content ids the device may have."""
        model_pk, sn_pk = await self._device_model(cik, vendor, model)
        rows = await self.store.read(self._authorised, model_pk, sn_pk)
        return [r["id"] for r in rows]

    async def device_info(self, cik: str, vendor: str, model: str, content_id: str) -> ContentInfo:
        """...&id=&info=true (CINFO4)."""
        model_pk, sn_pk = await self._device_model(cik, vendor, model)
        return _info(await self.store.read(self._row, model_pk, content_id, sn_pk))

    async def device_download(self, cik: str, vendor: str, model: str, content_id: str) -> Download:
        """...&id=: the blob, if the device may have it."""
        model_pk, sn_pk = await self._device_model(cik, vendor, model)
        return self._download(await self.store.read(self._row, model_pk, content_id, sn_pk))


def _blob_changed(conn: sqlite3.Connection, model_pk: int, content_id: str) -> None:
    for hook in blob_hooks:
        hook(conn, model_pk, content_id)
