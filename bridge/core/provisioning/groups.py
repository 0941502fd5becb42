"""Groups of a model with typed members (CATALOG 002 #8): `sn` (a serial number), `content` and
`group` (nesting), each with an expiry in epoch seconds (0 = never) and a description. An expired
member counts as absent everywhere: listings, counts, the `show=groups` views and authorisation
(`content.LIVE`). Adding a group that already contains, directly or nested, the group it is added
to would make a cycle, and is refused."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass

from bridge.core.errors import Conflict, Invalid, NotFound
from bridge.core.provisioning.common import Page, Vendor, csv_batches, key, model_access, text
from bridge.core.provisioning.content import LIVE
from bridge.store import IntegrityError, Store

# type -> (its column in group_members, its table, its id column)
TYPES = {
    "sn": ("sn_pk", "serial_numbers", "sn"),
    "content": ("content_pk", "prov_content", "id"),
    "group": ("member_group_pk", "prov_groups", "id"),
}
MAX_EXPIRE = 10**12  # epoch seconds: far beyond any real expiry, within SQLite's integers

# Is group :inner (or a group nested in it) group :outer? Then adding :inner to :outer is a cycle.
# (The CAST gives the first term the key's type, which PostgreSQL's recursive union requires.)
_CONTAINS = f"""
WITH RECURSIVE down(pk) AS (
    SELECT CAST(:inner AS BIGINT)
    UNION
    SELECT m.member_group_pk FROM group_members m JOIN down ON m.group_pk = down.pk
    WHERE m.member_group_pk IS NOT NULL AND {LIVE}
)
SELECT 1 FROM down WHERE pk = :outer"""

_MEMBERS = f"""
SELECT * FROM (
    SELECT m.pk,
        CASE WHEN m.sn_pk IS NOT NULL THEN 'sn' WHEN m.content_pk IS NOT NULL THEN 'content' ELSE 'group' END
            AS type,
        coalesce(s.sn, c.id, g.id) AS member, m.expire, m.description
    FROM group_members m
    LEFT JOIN serial_numbers s ON s.pk = m.sn_pk
    LEFT JOIN prov_content c ON c.pk = m.content_pk
    LEFT JOIN prov_groups g ON g.pk = m.member_group_pk
    WHERE m.group_pk = :group AND {LIVE}
) AS members WHERE (:type IS NULL OR type = :type) AND (:member IS NULL OR member = :member)
ORDER BY pk"""


@dataclass(frozen=True)
class Member:
    """MEMBERS: `expire` epoch seconds, 0 = never."""

    type: str
    id: str
    expire: int
    description: str


@dataclass(frozen=True)
class GroupInfo:
    """GINFO: `count` of the members that have not expired."""

    description: str
    count: int


def member_type(value: str) -> str:
    if value not in TYPES:
        raise Invalid(f"a member type is one of {', '.join(TYPES)}, not {value!r:.40}")
    return value


def expire(value: str | int) -> int:
    """A member's expiry: epoch seconds, 0 = never (a form or CSV field, or a number)."""
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit() and len(value) <= 13):
            raise Invalid("expire must be epoch seconds (0 = never)")
        value = int(value)
    if not 0 <= value <= MAX_EXPIRE:
        raise Invalid("expire must be epoch seconds (0 = never)")
    return value


def _group_pk(conn: sqlite3.Connection, model_pk: int, group: str) -> int:
    row = conn.execute(
        "SELECT pk FROM prov_groups WHERE model_pk = ? AND id = ?", (model_pk, group)
    ).fetchone()
    if row is None:
        raise NotFound(f"group {group!r:.140} not found")
    return row["pk"]


def _member_pk(conn: sqlite3.Connection, model_pk: int, type_: str, member: str) -> int | None:
    _column, table, id_column = TYPES[type_]
    row = conn.execute(
        f"SELECT pk FROM {table} WHERE model_pk = ? AND {id_column} = ?", (model_pk, member)
    ).fetchone()
    return None if row is None else row["pk"]


class Groups:
    """`clock`: epoch seconds, shared with the rest of the model (tests inject theirs)."""

    def __init__(self, store: Store, clock: Callable[[], float]) -> None:
        self.store = store
        self.clock = clock

    async def list(self, vendor: Vendor, model: str, page: Page) -> list[tuple[str, str]]:
        """GLIST: (id, description) in creation order."""

        def read(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            access = model_access(conn, vendor, model)
            rows = conn.execute(
                f"SELECT id, description FROM prov_groups WHERE model_pk = ? ORDER BY pk{page.sql}",
                (access.model_pk,),
            )
            return [(r["id"], r["description"]) for r in rows]

        return await self.store.read(read)

    async def create(self, vendor: Vendor, model: str, group: str, description: str) -> None:
        values = (key(group, "id"), text(description, "description"))

        def insert(conn: sqlite3.Connection) -> None:
            access = model_access(conn, vendor, model)
            try:
                conn.execute(
                    "INSERT INTO prov_groups (model_pk, id, description) VALUES (?,?,?)",
                    (access.model_pk, *values),
                )
            except IntegrityError as exc:
                raise Conflict(f"group {group!r:.140} already exists") from exc

        await self.store.write(insert)

    async def delete(self, vendor: Vendor, model: str, group: str) -> None:
        """With its memberships (as a group and as a member). Missing: done already."""

        def delete(conn: sqlite3.Connection) -> None:
            access = model_access(conn, vendor, model)
            conn.execute("DELETE FROM prov_groups WHERE model_pk = ? AND id = ?", (access.model_pk, group))

        await self.store.write(delete)

    async def info(self, vendor: Vendor, model: str, group: str) -> GroupInfo:
        def read(conn: sqlite3.Connection) -> GroupInfo:
            pk = _group_pk(conn, model_access(conn, vendor, model).model_pk, group)
            row = conn.execute(
                "SELECT g.description, (SELECT count(*) FROM group_members m"
                f" WHERE m.group_pk = g.pk AND {LIVE}) AS count FROM prov_groups g WHERE g.pk = :pk",
                {"pk": pk, "now": self.clock()},
            ).fetchone()
            return GroupInfo(row["description"], row["count"])

        return await self.store.read(read)

    async def members(
        self,
        vendor: Vendor,
        model: str,
        group: str,
        page: Page,
        *,
        type: str | None = None,
        id: str | None = None,
    ) -> list[Member]:
        """MEMBERS in the order they were added, optionally of one type and/or one member id."""
        if type is not None:
            member_type(type)

        def read(conn: sqlite3.Connection) -> list[Member]:
            pk = _group_pk(conn, model_access(conn, vendor, model).model_pk, group)
            rows = conn.execute(
                _MEMBERS + page.sql, {"group": pk, "type": type, "member": id, "now": self.clock()}
            ).fetchall()
            return [Member(r["type"], r["member"], r["expire"], r["description"]) for r in rows]

        return await self.store.read(read)

    async def groups_of(self, vendor: Vendor, model: str, type: str, id: str, page: Page) -> list[str]:
        """`show=groups` of a serial number, a content or a group: the groups it is a direct
        member of. NotFound for an unknown member."""
        column = TYPES[member_type(type)][0]

        def read(conn: sqlite3.Connection) -> list[str]:
            pk = _member_pk(conn, model_access(conn, vendor, model).model_pk, type, id)
            if pk is None:
                raise NotFound(f"{type} {id!r:.140} not found")
            rows = conn.execute(
                "SELECT g.id FROM group_members m JOIN prov_groups g ON g.pk = m.group_pk"
                f" WHERE m.{column} = :pk AND {LIVE} ORDER BY g.pk{page.sql}",
                {"pk": pk, "now": self.clock()},
            )
            return [r["id"] for r in rows]

        return await self.store.read(read)

    # ---- adding and removing members ------------------------------------------------------------
    async def add(
        self,
        vendor: Vendor,
        model: str,
        group: str,
        type: str,
        ids: Iterable[str],
        expire: int,
        description: str,
    ) -> None:
        """Add or update members of one type (`id` or `id[]`), all with the same expiry and description."""
        await self._add(vendor, model, group, [(type, i, expire, description) for i in ids])

    async def add_csv(self, vendor: Vendor, model: str, group: str, chunks: AsyncIterable[bytes]) -> None:
        """A `text/csv` body of `<type>,<memberid>,<expire>,<description>` lines (the description may
        be left out), in one transaction."""
        records = [
            (r[0], r[1], expire(r[2]), r[3] if len(r) > 3 else "")
            async for batch in csv_batches(chunks, (3, 4))
            for r in batch
        ]
        await self._add(vendor, model, group, records)

    async def _add(
        self, vendor: Vendor, model: str, group: str, records: list[tuple[str, str, int, str]]
    ) -> None:
        """All or none: NotFound for a member that does not exist in the model, Conflict for a cycle."""
        checked = [
            (member_type(t), key(i, "member id"), expire(e), text(d, "description")) for t, i, e, d in records
        ]

        def add(conn: sqlite3.Connection) -> None:
            model_pk = model_access(conn, vendor, model).model_pk
            group_pk = _group_pk(conn, model_pk, group)
            now = self.clock()
            for type_, member, expires, description in checked:
                pk = _member_pk(conn, model_pk, type_, member)
                if pk is None:
                    raise NotFound(f"{type_} {member!r:.140} not found")
                if (
                    type_ == "group"
                    and conn.execute(_CONTAINS, {"inner": pk, "outer": group_pk, "now": now}).fetchone()
                ):
                    raise Conflict(f"adding group {member!r:.100} to {group!r:.100} would make a cycle")
                column = TYPES[type_][0]
                conn.execute(
                    f"INSERT INTO group_members (group_pk, {column}, expire, description) VALUES (?,?,?,?)"
                    f" ON CONFLICT (group_pk, {column}) DO UPDATE SET"
                    " expire = excluded.expire, description = excluded.description",
                    (group_pk, pk, expires, description),
                )

        await self.store.write(add)

    async def remove(self, vendor: Vendor, model: str, group: str, type: str, ids: Iterable[str]) -> None:
        """Remove members of one type (`delete=true` with `id` or `id[]`)."""
        await self._remove(vendor, model, group, [(type, i) for i in ids])

    async def remove_csv(self, vendor: Vendor, model: str, group: str, chunks: AsyncIterable[bytes]) -> None:
        """A `text/csv` body of `<type>,<id>` lines (DELETE .../group/{model}/{id}/)."""
        await self._remove(
            vendor, model, group, [(r[0], r[1]) async for b in csv_batches(chunks, (2, 2)) for r in b]
        )

    async def _remove(self, vendor: Vendor, model: str, group: str, pairs: list[tuple[str, str]]) -> None:
        """Members that are not in the group (or do not exist) are gone already."""
        checked = [(member_type(t), i) for t, i in pairs]

        def remove(conn: sqlite3.Connection) -> None:
            model_pk = model_access(conn, vendor, model).model_pk
            group_pk = _group_pk(conn, model_pk, group)
            for type_, member in checked:
                pk = _member_pk(conn, model_pk, type_, member)
                if pk is not None:
                    column = TYPES[type_][0]
                    conn.execute(
                        f"DELETE FROM group_members WHERE group_pk = ? AND {column} = ?", (group_pk, pk)
                    )

        await self.store.write(remove)
