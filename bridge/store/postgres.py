"""PostgreSQL behind the same Store API as the SQLite file (store.url: postgresql://...): the same
group-committing writer thread and reader pool (bridge/store/db.py), on psycopg 3 connections wrapped
so that the core's functions run unchanged: `?` placeholders, rows addressable by name and by
index, rowcount, fetchone/fetchall, executemany, total_changes, and the store's exceptions
(bridge/store/errors.py: IntegrityError for a constraint, Unavailable for a lost connection,
OperationalError for the rest), as the SQLite connection raises them.

The schema has one source of truth, bridge/store/migrations.py, whose steps are written once for
both stores: a new PostgreSQL database is made at the latest version from the DDL SQLite holds after
running every step (`schema`), and an older one (version FIRST or later) runs each missing step
itself, every statement through the same translation of types and triggers (`ddl`, `prepare`)."""

from __future__ import annotations

import calendar
import functools
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg.rows import RowMaker

from bridge.config import ConfigError
from bridge.store import db, migrations
from bridge.store.errors import IntegrityError, OperationalError, StoreError, Unavailable

T = TypeVar("T")
# A one-row table holds the schema version (SQLite keeps it in PRAGMA user_version).
_VERSION_TABLE = "thingbridge_schema"
# Serialises schema changes between processes opening the same database (server and CLI).
_SCHEMA_LOCK = 0x7468696E67
# The first schema version a PostgreSQL database had (the PostgreSQL store came with it): the steps
# up to it run on PostgreSQL only through `schema`, the later ones also as steps (`prepare`).
FIRST = 7
# messages is partitioned by day of ts (schema version 9): messages_pYYYYMMDD holds [day, day + 1)
# in UTC, messages_default what no partition takes (a clock far off, a bridge stopped for longer than
# AHEAD days). The retention's pass makes the partitions of the next AHEAD days and drops the old.
DAY = 86400
AHEAD = 3
DEFAULT_PARTITION = "messages_default"
_PARTITION = re.compile(r"messages_p(\d{8})")
# Serialises partition changes between bridge processes on one database (external mode's workers).
_PARTITIONS_LOCK = 0x7468696E68
# A partition is made or dropped under a lock on messages that waits for running statements: it
# gives up after this rather than hold the writer (and every write queued behind it) longer.
PARTITION_LOCK_WAIT = "1s"
# A dropped partition's rows are counted below this many (PostgreSQL's estimate above: a count
# would read the whole day).
EXACT_COUNT = 100_000


class Row:
    """What sqlite3.Row offers the core: row[0], row["name"] (case-insensitive, like SQLite's),
    keys(), len, iteration and equality."""

    __slots__ = ("_shape", "_values")

    def __init__(self, shape: tuple[tuple[str, ...], dict[str, int]], values: Sequence[Any]) -> None:
        self._shape = shape
        self._values = values

    def __getitem__(self, key: int | str | slice) -> Any:
        if isinstance(key, str):
            index = self._shape[1]
            position = index.get(key)
            return self._values[index[key.lower()] if position is None else position]
        return self._values[key]

    def keys(self) -> list[str]:
        return list(self._shape[0])

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Row) and self._shape[0] == other._shape[0] and tuple(self) == tuple(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Row({dict(zip(self._shape[0], self._values, strict=True))!r})"


def _rows(cursor: psycopg.Cursor[Any]) -> RowMaker[Row]:
    """One shape per result, shared by its rows: the column names as PostgreSQL answers them
    (lower case unless quoted) and an index by name and by lower-case name."""
    names = tuple(column.name for column in cursor.description or ())
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        index.setdefault(name, i)
        index.setdefault(name.lower(), i)
    return functools.partial(Row, (names, index))


@functools.lru_cache(maxsize=4096)
def translate(sql: str, named: bool = False) -> str:
    """sqlite3's placeholders as psycopg's, outside quoted strings and identifiers: `?` as `%s`,
    `:name` as `%(name)s` (`named`: the parameters are a mapping), a literal `%` doubled; computed
    once per statement text."""
    parts = re.split(r"""('(?:[^']|'')*'|"(?:[^"]|"")*")""", sql)
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("%", "%%").replace("?", "%s")
        if named:
            parts[i] = _NAMED.sub(r"%(\1)s", parts[i])
    for i in range(1, len(parts), 2):
        parts[i] = parts[i].replace("%", "%%")
    return "".join(parts)


_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


def _params(params: Sequence[Any] | Mapping[str, Any]) -> Sequence[Any] | Mapping[str, Any]:
    """SQLite stores a bool as 0/1 in INTEGER columns; PostgreSQL refuses a boolean there."""
    values = params.values() if isinstance(params, Mapping) else params
    if not any(type(p) is bool for p in values):
        return params
    if isinstance(params, Mapping):
        return {k: int(v) if type(v) is bool else v for k, v in params.items()}
    return [int(p) if type(p) is bool else p for p in params]


def _store_error(exc: psycopg.Error, broken: bool) -> StoreError:
    """The store's class of a psycopg error (`broken`: the connection is lost with it)."""
    if isinstance(exc, psycopg.IntegrityError):
        kind: type[StoreError] = IntegrityError
    else:
        kind = Unavailable if broken else OperationalError
    return kind(" ".join(str(exc).split()))  # one line: it may end a start's one-line message


class Cursor:
    """The result of one statement, fetched: rowcount, fetchone, fetchall, iteration."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[Row], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def fetchone(self) -> Row | None:
        return self._rows.pop(0) if self._rows else None

    def fetchall(self) -> list[Row]:
        rows, self._rows = self._rows, []
        return rows

    def __iter__(self) -> Iterator[Row]:
        return iter(self.fetchall())


class Connection:
    """A psycopg connection with the surface of sqlite3.Connection the core and the store use."""

    def __init__(self, conn: psycopg.Connection[Row]) -> None:
        self.raw = conn
        self.total_changes = 0

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> Cursor:
        try:
            if params:
                cur = self.raw.execute(translate(sql, isinstance(params, Mapping)), _params(params))
            else:
                cur = self.raw.execute(sql)
            rows = cur.fetchall() if cur.description is not None else []
        except psycopg.Error as exc:
            raise _store_error(exc, self.raw.broken) from exc
        if cur.rowcount > 0 and cur.statusmessage and not cur.statusmessage.startswith("SELECT"):
            self.total_changes += cur.rowcount
        return Cursor(rows, cur.rowcount)

    def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> Cursor:
        """All parameter sets in one pipeline; like sqlite3's, a failing one leaves the earlier ones
        applied and counted in total_changes (rare: then they are replayed one by one up to it)."""
        batch = [_params(params) for params in seq]
        if not batch:
            return Cursor([], 0)
        within = self.raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
        if within:
            self.execute("SAVEPOINT executemany")
        try:
            # server-side binding here: the same statement many times, twice as fast as literals
            cur = psycopg.Cursor(self.raw)
            cur.executemany(translate(sql, isinstance(batch[0], Mapping)), batch)
        except psycopg.IntegrityError as exc:
            if not within:
                raise _store_error(exc, broken=False) from exc
            self.execute("ROLLBACK TO executemany")
            self.execute("RELEASE executemany")
            for params in batch:
                self.execute(sql, params)
            raise AssertionError("executemany: the replay did not fail like the pipeline") from None
        except psycopg.Error as exc:
            raise _store_error(exc, self.raw.broken) from exc
        if within:
            self.execute("RELEASE executemany")
        self.total_changes += max(cur.rowcount, 0)
        return Cursor([], cur.rowcount)

    def close(self) -> None:
        self.raw.close()


def connect(url: str, autocommit: bool) -> Connection:
    try:
        # Client-side binding, like sqlite3's: a parameter takes its type from the statement (a
        # NULL compared with IS NULL, a number in a TEXT column), not from the Python value.
        raw = psycopg.connect(
            url, autocommit=autocommit, row_factory=_rows, cursor_factory=psycopg.ClientCursor
        )
    except psycopg.Error as exc:
        raise _store_error(exc, isinstance(exc, psycopg.OperationalError)) from exc
    return Connection(raw)


_TYPES = (
    # SQLite's rowid keys: an identity column (BY DEFAULT: an explicit key is still accepted)
    (
        re.compile(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b"),
        "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    ),
    (re.compile(r"\bpk INTEGER PRIMARY KEY\b"), "pk BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
)
_UPSERT_SELF = re.compile(r"(INSERT INTO (\w+) .*? DO UPDATE SET )(\w+) = \3\b", re.DOTALL)
_TRIGGER = re.compile(r"CREATE TRIGGER (\w+) (.*?) BEGIN(.*)END\s*$", re.DOTALL)


def ddl(sql: str) -> str:
    """One statement of a migration step, written for SQLite, as PostgreSQL's: in CREATE and ALTER
    statements SQLite's storage classes become PostgreSQL types, and a row trigger's body becomes a
    PL/pgSQL function (two statements, `;`-separated); anything else passes unchanged."""
    head = sql.lstrip()[:16].upper()
    if head.startswith("CREATE TRIGGER"):
        match = _TRIGGER.match(sql.strip())
        assert match is not None, "a trigger of the form CREATE TRIGGER name ... BEGIN ... END"
        name, when, body = match.groups()
        # PostgreSQL: an unqualified column in an upsert's SET expression is ambiguous (the row or
        # EXCLUDED's); SQLite's means the row's.
        body = _UPSERT_SELF.sub(r"\g<1>\g<3> = \g<2>.\g<3>", body)
        return (
            f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN{body}RETURN NULL; END $$;"
            f" CREATE TRIGGER {name} {when} FOR EACH ROW EXECUTE FUNCTION {name}()"
        )
    if head.startswith(("CREATE", "ALTER")):
        for pattern, replacement in _TYPES:
            sql = pattern.sub(replacement, sql)
    return sql


@functools.cache
def schema(version: int) -> tuple[str, ...]:
    """The PostgreSQL DDL of schema `version` (FIRST or later): the steps up to it run on an
    in-memory SQLite database, then its tables, indexes and triggers in creation order, each
    through `ddl`."""
    lite = sqlite3.connect(":memory:", isolation_level=None)
    try:
        migrations.migrate(lite, ":memory:", version)  # type: ignore[arg-type]
        found = lite.execute(
            "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"
            " ORDER BY rowid"
        ).fetchall()
    finally:
        lite.close()
    return tuple(ddl(sql) for (sql,) in found)


class Migrating(Connection):
    """The connection a migration step gets on PostgreSQL: the same step that runs on SQLite, each
    statement through `ddl`."""

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> Cursor:
        return super().execute(ddl(sql), params)

    def rebuild(self, table: str, columns: str, keep: str) -> None:
        """migrations._rebuild (SQLite's way to give `table` the definition `columns`: the same
        columns, other constraints) in place: the rows not matching `keep` go, then the table takes
        the constraints and NOT NULLs of an empty table made from `columns` (dropped again); its
        indexes, identity sequences and the other tables' references to it stay."""
        self.execute(f"DELETE FROM {table} WHERE NOT ({keep})")
        shape = f"{table}_rebuilt"
        self.execute(f"CREATE TABLE {shape} {columns}")
        (old, old_null), (new, new_null) = self._definition(table), self._definition(shape)
        self.execute(f"DROP TABLE {shape}")
        for key, name in old.items():
            if key not in new:
                self.execute(f"ALTER TABLE {table} DROP CONSTRAINT {name}")
        for column, not_null in new_null.items():
            if old_null[column] != not_null:
                self.execute(
                    f"ALTER TABLE {table} ALTER COLUMN {column} {'SET' if not_null else 'DROP'} NOT NULL"
                )
        # the primary key before the references that may name it
        for (kind, definition), name in sorted(new.items(), key=lambda item: item[0][0] != "p"):
            if (kind, definition) not in old:
                self.execute(f"ALTER TABLE {table} ADD CONSTRAINT {table}{name[len(shape) :]} {definition}")

    def _definition(self, table: str) -> tuple[dict[tuple[str, str], str], dict[str, bool]]:
        """A table's constraints, (kind, definition) -> name, and its columns' NOT NULL."""
        constraints = {
            (r[1], r[2]): r[0]
            for r in self.execute(
                "SELECT conname, contype::text, pg_get_constraintdef(oid) FROM pg_constraint"
                " WHERE conrelid = to_regclass(?)",
                (table,),
            )
        }
        not_null = {
            r[0]: r[1]
            for r in self.execute(
                "SELECT attname, attnotnull FROM pg_attribute WHERE attrelid = to_regclass(?)"
                " AND attnum > 0 AND NOT attisdropped",
                (table,),
            )
        }
        return constraints, not_null

    def partition_messages(self) -> None:
        """migrations.partitioned_messages: messages made again partitioned by range of ts, a
        partition per day that has rows and for today and the next AHEAD days, and a default one;
        the rows copied, the seq identity going on from where it was (`after=` cursors stay
        monotonic). A unique constraint on a partitioned table must hold the partition key: the
        primary key is (seq, ts) (seq alone stays unique: one identity feeds every partition), and
        the id, a random or time-ordered UUID, keeps an index without a unique constraint."""
        sequence = self.execute("SELECT pg_get_serial_sequence('messages', 'seq')").fetchone()[0]
        for kind, old in (
            ("TABLE", "messages"),
            ("INDEX", "messages_pkey"),
            ("INDEX", "messages_id_key"),
            ("INDEX", "messages_thing_ts"),
            ("INDEX", "messages_thing_type_seq"),
            ("SEQUENCE", sequence),
        ):
            self.execute(f"ALTER {kind} {old} RENAME TO {old.rpartition('.')[2]}_v8")
        for statement in (
            """CREATE TABLE messages (
                seq BIGINT GENERATED BY DEFAULT AS IDENTITY,
                id TEXT NOT NULL,
                thing_id TEXT NOT NULL REFERENCES things (id) ON DELETE CASCADE,
                owner_id TEXT NOT NULL,
                type TEXT NOT NULL,
                ts DOUBLE PRECISION NOT NULL,
                encoding TEXT NOT NULL,
                payload BYTEA NOT NULL,
                transport TEXT NOT NULL,
                PRIMARY KEY (seq, ts)
            ) PARTITION BY RANGE (ts)""",
            "CREATE INDEX messages_thing_ts ON messages (thing_id, ts)",
            "CREATE INDEX messages_thing_type_seq ON messages (thing_id, type, seq)",
            "CREATE INDEX messages_id ON messages (id)",  # a cursor's lookup
            f"CREATE TABLE {DEFAULT_PARTITION} PARTITION OF messages DEFAULT",
        ):
            self.execute(statement)
        today = int(time.time() // DAY)
        days = {r[0] for r in self.execute("SELECT DISTINCT floor(ts / ?)::bigint FROM messages_v8", (DAY,))}
        for day in sorted(days | set(range(today, today + AHEAD + 1))):
            _attach(self, day)
        columns = "seq, id, thing_id, owner_id, type, ts, encoding, payload, transport"
        self.execute(f"INSERT INTO messages ({columns}) SELECT {columns} FROM messages_v8")
        self.execute(
            "SELECT setval(pg_get_serial_sequence('messages', 'seq'), last_value, is_called)"
            f" FROM {sequence.rpartition('.')[2]}_v8"
        )
        self.execute("DROP TABLE messages_v8")


def _partition_name(day: int) -> str:
    return "messages_p" + time.strftime("%Y%m%d", time.gmtime(day * DAY))


def _partitions(conn: Connection) -> dict[int, str]:
    """The day partitions of messages: day number (days since the epoch, UTC) -> table name."""
    found = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = to_regclass('messages')"
    )
    days = {}
    for (name,) in found:
        match = _PARTITION.fullmatch(name)
        if match is not None:
            days[calendar.timegm(time.strptime(match[1], "%Y%m%d")) // DAY] = name
    return days


def _attach(conn: Connection, day: int) -> None:
    """A partition for `day`, made apart and attached (which locks messages less than CREATE TABLE
    ... PARTITION OF would: inserts go on), with the rows the default partition holds for it."""
    name, low, high = _partition_name(day), day * DAY, (day + 1) * DAY
    conn.execute(f"CREATE TABLE {name} (LIKE messages)")
    moved = f"FROM {DEFAULT_PARTITION} WHERE ts >= {low} AND ts < {high}"
    conn.execute(f"INSERT INTO {name} SELECT * {moved}")
    conn.execute(f"DELETE {moved}")
    conn.execute(f"ALTER TABLE messages ATTACH PARTITION {name} FOR VALUES FROM ({low}) TO ({high})")


def _row_count(conn: Connection, table: str) -> int:
    estimate = conn.execute("SELECT reltuples FROM pg_class WHERE oid = to_regclass(?)", (table,)).fetchone()
    if estimate is None or estimate[0] < EXACT_COUNT:  # -1: never analysed
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    return int(estimate[0])


def rotate(conn: Connection, now: float, cutoff: float | None) -> int:
    """The retention's step on a partitioned messages (a write): partitions for the day of `now`
    and the next AHEAD days; with a `cutoff`, every partition whose day ends by it dropped (DROP
    TABLE: no row is deleted, nothing is left to vacuum). The rows dropped; 0 when another process
    is at it."""
    if not conn.execute("SELECT pg_try_advisory_xact_lock(?)", (_PARTITIONS_LOCK,)).fetchone()[0]:
        return 0
    waited = conn.execute("SELECT current_setting('lock_timeout')").fetchone()[0]
    conn.execute("SELECT set_config('lock_timeout', ?, true)", (PARTITION_LOCK_WAIT,))
    existing = _partitions(conn)
    today = int(now // DAY)
    for day in range(today, today + AHEAD + 1):
        if day not in existing:
            _attach(conn, day)
    dropped = 0
    for day, name in sorted(existing.items()):
        if cutoff is not None and (day + 1) * DAY <= cutoff:
            dropped += _row_count(conn, name)
            conn.execute(f"DROP TABLE {name}")
    conn.execute("SELECT set_config('lock_timeout', ?, true)", (waited,))  # for the group's other writes
    return dropped


def _version(conn: Connection) -> int | None:
    """The database's schema version; None: a new database (no version table)."""
    exists = conn.execute("SELECT to_regclass(?) IS NOT NULL", (_VERSION_TABLE,)).fetchone()
    if exists is None or not exists[0]:
        return None
    found = conn.execute(f"SELECT version FROM {_VERSION_TABLE}").fetchone()
    return found[0] if found is not None else 0


def prepare(conn: Connection) -> None:
    """Bring the database to migrations.LATEST, as migrations.migrate does a SQLite file: a new one
    is created at LATEST at once (from `schema`), an older one runs each missing step in a
    transaction of its own; a newer one is refused, unchanged. Each transaction takes the schema
    lock first and reads the version again: another process (the CLI) may have migrated meanwhile."""
    target = None
    while target != migrations.LATEST:
        conn.execute("BEGIN")
        try:
            conn.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))
            found = _version(conn)
            if found is None:
                for statement in schema(migrations.LATEST):
                    conn.execute(statement)
                for version, step in migrations.MIGRATIONS:
                    if step in migrations.POSTGRES_ONLY and version <= migrations.LATEST:
                        step(Migrating(conn.raw))  # type: ignore[arg-type]
                conn.execute(f"CREATE TABLE {_VERSION_TABLE} (version INTEGER NOT NULL)")
                conn.execute(f"INSERT INTO {_VERSION_TABLE} (version) VALUES (?)", (migrations.LATEST,))
                target = migrations.LATEST
            elif found > migrations.LATEST:
                raise migrations.SchemaTooNew(
                    f"store.url: the database is at schema version {found}, newer than this release"
                    f" knows (up to {migrations.LATEST}): a newer thingbridge has used it"
                )
            elif found < FIRST:
                raise ConfigError(
                    f"store.url: the database is at schema version {found}, older than any"
                    f" PostgreSQL database of thingbridge ({FIRST}): create a new database"
                )
            elif found == migrations.LATEST:
                target = found
            else:
                target, step = next((t, s) for t, s in migrations.MIGRATIONS if t > found)
                step(Migrating(conn.raw))  # type: ignore[arg-type]
                conn.execute(f"UPDATE {_VERSION_TABLE} SET version = ?", (target,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


class PostgresStore(db.Store):
    """db.Store's writer and readers on PostgreSQL connections (see the module's docstring)."""

    BEGIN = "BEGIN"
    rotate = staticmethod(rotate)
    history_rows = DEFAULT_PARTITION

    def __init__(self, url: str, path: Path, readers: int = 2) -> None:
        """`path`: where the SQLite file would be; its folder (data_dir) still holds what lives
        beside the database (content blobs)."""
        super().__init__(path, readers=readers)
        self.url = url

    def open(self) -> None:
        conn = connect(self.url, autocommit=True)
        try:
            prepare(conn)
        except BaseException:
            conn.close()
            raise
        self._start_writer(conn)

    def _connect_reader(self) -> Connection:
        return connect(self.url, autocommit=True)

    def _begin(self, conn: Connection) -> Connection:
        """A connection lost while the writer was idle (the server restarted meanwhile) shows only
        when used: then BEGIN fails, nothing of the group has run, and it is opened once more on
        a new connection instead of failing the group."""
        try:
            return super()._begin(conn)
        except Unavailable:
            fresh = self._recover(conn)
            if fresh is conn:
                raise
        try:
            return super()._begin(fresh)
        except BaseException:
            fresh.close()  # the group fails; the next one connects again
            raise

    def _recover(self, conn: Connection) -> Connection:
        """A server restart or a terminated session breaks the connection: the group that met it
        failed, the next one gets a new connection (or, while the server is away, fails too)."""
        if not conn.raw.broken and not conn.raw.closed:
            return conn
        try:
            fresh = connect(self.url, autocommit=True)
        except StoreError:
            return conn
        conn.close()
        return fresh

    def _read(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        """A read on a broken connection is tried once more on a new one (a read changes nothing)."""
        try:
            return super()._read(fn, args)
        except Unavailable:
            # None: no connection to be had (this thread never had one, or lost it before)
            broken: Connection | None = getattr(self._local, "conn", None)
            if broken is None:  # the server is away
                raise
        with self._lock:
            self._read_conns.remove(broken)
        broken.close()
        self._local.conn = None
        return super()._read(fn, args)
