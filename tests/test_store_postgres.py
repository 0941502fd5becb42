"""The PostgreSQL store (bridge/store/postgres.py) against a real PostgreSQL server the tests start:
its schema has every table and column of the SQLite one; a database of another version is refused;
the writer's group commit keeps one failing write from undoing the others and resolves a write only
after its commit; a lost connection fails one group, then the store reconnects; rows and
placeholders behave as the core expects of sqlite3; `serve` with an unreachable store.url stops
with one line. The core suites run on it through their `store_url` fixture
(tests/test_upgrades_core.py, tests/test_provisioning_core.py) or `bridge_on_each_store`."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bridge.config import ConfigError
from bridge.store import IntegrityError, OperationalError, Unavailable, create, migrations, postgres
from bridge.store.postgres import PostgresStore, translate
from tests.conftest import write_config
from tests.postgres import PostgresServer


@pytest.fixture
async def store(postgres_server: PostgresServer, tmp_path: Path) -> AsyncIterator[PostgresStore]:
    opened = PostgresStore(postgres_server.new_database(), tmp_path / "thingbridge.sqlite")
    opened.open()
    try:
        yield opened
    finally:
        await asyncio.to_thread(opened.close)


def test_the_schema_has_every_table_and_column_of_sqlite(postgres_server: PostgresServer) -> None:
    lite = sqlite3.connect(":memory:", isolation_level=None)
    migrations.migrate(lite, Path(":memory:"))
    tables = [
        r[0]
        for r in lite.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite%'"
        )
    ]
    expected = {(t, r[1], bool(r[5])) for t in tables for r in lite.execute(f"PRAGMA table_info({t})")}
    # messages is partitioned by ts there: a partitioned table's primary key holds the partition key
    expected = expected - {("messages", "ts", False)} | {("messages", "ts", True)}
    triggers = {r[0] for r in lite.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    with psycopg.connect(postgres_server.new_database()) as conn:
        found = {
            (t, c, bool(k))
            for t, c, k in conn.execute(
                "SELECT c.table_name, c.column_name, k.column_name IS NOT NULL FROM information_schema.columns c"
                " LEFT JOIN information_schema.key_column_usage k ON k.table_name = c.table_name"
                " AND k.column_name = c.column_name AND k.constraint_name = c.table_name || '_pkey'"
                " WHERE c.table_schema = 'public' AND c.table_name <> 'thingbridge_schema'"
                " AND c.table_name NOT IN (SELECT relname FROM pg_class WHERE relispartition)"
            )
        }
        pg_triggers = {
            r[0] for r in conn.execute("SELECT DISTINCT trigger_name FROM information_schema.triggers")
        }
    assert found == expected
    assert pg_triggers == triggers


async def test_a_database_of_an_unknown_version_is_refused(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = postgres_server.new_database()
    for version, refusal, why in (
        (migrations.LATEST + 1, migrations.SchemaTooNew, "newer than this release knows"),
        (postgres.FIRST - 1, ConfigError, "older than any PostgreSQL database of thingbridge"),
    ):
        with psycopg.connect(url) as conn:
            conn.execute("UPDATE thingbridge_schema SET version = %s", (version,))
        store = create(url, tmp_path / "unused")
        with pytest.raises(refusal, match=f"store.url: the database is at schema version {version}, {why}"):
            store.open()
        store.close()


def pg_shape(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """What a PostgreSQL schema is: each table's columns in order (type, null, default, identity),
    its constraints and indexes as PostgreSQL writes them back, the triggers and their functions."""
    queries = {
        "columns": "SELECT table_name, column_name, data_type, is_nullable, column_default, is_identity"
        " FROM information_schema.columns WHERE table_schema = 'public' ORDER BY table_name, ordinal_position",
        "constraints": "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2",
        "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
        " ORDER BY 1, 2",
        "triggers": "SELECT event_object_table, trigger_name, event_manipulation, action_statement"
        " FROM information_schema.triggers ORDER BY 1, 2, 3",
        "functions": "SELECT proname, prosrc FROM pg_proc WHERE pronamespace = 'public'::regnamespace ORDER BY 1",
    }
    with psycopg.connect(url) as conn:
        shape = {name: conn.execute(sql).fetchall() for name, sql in queries.items()}
    # messages' day partitions are named by the day: those of the days about now are made when the
    # database is (the template, at the session's start: perhaps another day)
    return {name: [r for r in found if not DAY_PARTITION.match(str(r[0]))] for name, found in shape.items()}


DAY_PARTITION = re.compile(r"messages_p\d{8}\b")


async def test_a_database_at_version_7_migrates_to_the_latest_with_its_rows(
    postgres_server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = postgres_server.new_database(empty=True)
    with monkeypatch.context() as release_7:  # what the release with schema version 7 made
        release_7.setattr(migrations, "LATEST", 7)
        store = PostgresStore(url, tmp_path / "unused")
        store.open()
        store.close()
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO users (id, username, password_hash, role, created) VALUES ('u1', 'alice', 'h', 'user', 1)"
        )
        conn.execute(
            "INSERT INTO things (id, owner_id, cert_pem, cert_id, created) VALUES ('t1', 'u1', 'pem', 'c1', 1)"
        )
        conn.execute(
            "INSERT INTO mqtt_sessions (client_id, thing_id, cert_id, principal, disconnected)"
            " VALUES ('t1', 't1', 'c1', 'p', 5)"
        )
        conn.execute(
            "INSERT INTO mqtt_queue (client_id, topic, payload, qos) VALUES ('t1', 'things/t1/publish', 'x', 1)"
        )
        # messages of two days (one long ago) and a sequence ahead of its rows (deleted ones)
        conn.execute(
            "INSERT INTO messages (seq, id, thing_id, owner_id, type, ts, encoding, payload, transport)"
            " VALUES (7, 'm1', 't1', 'u1', 'ingress', 86400 * 3 + 5, 'text', 'a', 'http'),"
            " (8, 'm2', 't1', 'u1', 'egress', extract(epoch from now()), 'text', 'b', 'http')"
        )
        conn.execute("SELECT setval(pg_get_serial_sequence('messages', 'seq'), 41)")
        assert conn.execute("SELECT version FROM thingbridge_schema").fetchone()[0] == 7
        assert "cert_id" in {c.name for c in conn.execute("SELECT * FROM mqtt_sessions").description}

    store = PostgresStore(url, tmp_path / "unused")
    store.open()  # the missing steps, each in its own transaction
    await asyncio.to_thread(store.close)
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT version FROM thingbridge_schema").fetchone()[0] == migrations.LATEST
        assert conn.execute("SELECT * FROM mqtt_sessions").fetchall() == [("t1", "t1", None, b"p", 5.0)]
        assert conn.execute("SELECT client_id, topic, payload FROM mqtt_queue").fetchall() == [
            ("t1", "things/t1/publish", b"x")
        ]
        assert conn.execute("SELECT owner_id, things FROM owner_things").fetchall() == [("u1", 1)]
        # version 9: messages by day, the rows in the partitions of their days, seq going on
        assert conn.execute("SELECT tableoid::regclass::text, id FROM messages ORDER BY seq").fetchall() == [
            ("messages_p19700104", "m1"),
            (time.strftime("messages_p%Y%m%d", time.gmtime()), "m2"),
        ]
        new = conn.execute(
            "INSERT INTO messages (id, thing_id, owner_id, type, ts, encoding, payload, transport)"
            " VALUES ('m3', 't1', 'u1', 'ingress', 1, 'text', 'c', 'http') RETURNING seq"
        )
        assert new.fetchone()[0] == 42
    # the same schema as a database made at the latest version, column order included
    assert pg_shape(url) == pg_shape(postgres_server.new_database())


def test_a_rebuild_step_is_the_same_change_on_postgresql(
    postgres_server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A future step that SQLite makes by rebuilding a table (a NOT NULL, a CHECK, a reference with
    an action) runs unchanged on PostgreSQL, in place: the same schema as a database made with it."""
    step = migrations.LATEST + 1
    monkeypatch.setattr(migrations, "LATEST", step)

    def checked_presence(conn: sqlite3.Connection) -> None:
        migrations._rebuild(
            conn,
            "presence",
            "(thing_id TEXT PRIMARY KEY REFERENCES things (id) ON DELETE CASCADE,"
            " state TEXT NOT NULL CHECK (state IN ('online', 'offline')), ts REAL,"
            " transport TEXT REFERENCES users (id) ON DELETE SET NULL)",
            (),
            keep="state IS NOT NULL",
        )

    url = postgres_server.new_database()  # at the release's latest version
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO users (id, username, password_hash, role, created) VALUES ('u', 'u', 'h', 'user', 1)"
        )
        for thing in ("t1", "t2"):
            conn.execute(
                "INSERT INTO things (id, owner_id, cert_pem, cert_id, created) VALUES (%s, 'u', 'p', %s, 1)",
                (thing, thing),
            )
        conn.execute("INSERT INTO presence VALUES ('t1', 'online', 2.5, 'u'), ('t2', NULL, 3, NULL)")
    monkeypatch.setattr(migrations, "MIGRATIONS", [*migrations.MIGRATIONS, (step, checked_presence)])
    try:
        store = PostgresStore(url, tmp_path / "unused")
        store.open()
        store.close()
        made = postgres_server.new_database(empty=True)
        store = PostgresStore(made, tmp_path / "unused")
        store.open()
        store.close()
        assert pg_shape(url) == pg_shape(made)
    finally:
        postgres.schema.cache_clear()  # forget the schema of the pretended step
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT * FROM presence").fetchall() == [("t1", "online", 2.5, "u")]
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE presence SET state = 'away'")


async def test_one_failing_write_leaves_the_others_of_its_group(store: PostgresStore) -> None:
    def insert(conn: sqlite3.Connection, name: str) -> int:
        return conn.execute(
            "INSERT INTO users (id, username, password_hash, role, created) VALUES (?,?,?,?,?) RETURNING created",
            (name, name, "h", "user", 1.5),
        ).fetchone()[0]

    # Queued together: the duplicate fails alone, in its savepoint; every other write is committed.
    results = await asyncio.gather(
        *(store.write(insert, f"u{i}") for i in range(20)), store.write(insert, "u3"), return_exceptions=True
    )
    assert results[:20] == [1.5] * 20
    assert isinstance(results[20], IntegrityError)
    # a write resolved only after its commit: a new connection sees it
    with psycopg.connect(store.url) as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 20


async def test_both_stores_raise_the_stores_exceptions(store_url: str, tmp_path: Path) -> None:
    """The core catches bridge.store's classes, never a driver's: the same ones from each store."""
    store = create(store_url, tmp_path / "thingbridge.sqlite")
    store.open()

    def insert(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO users (id, username, password_hash, role, created) VALUES ('u', 'u', 'h', 'user', 1)"
        )

    try:
        await store.write(insert)
        for statement, kind in (
            (insert, IntegrityError),
            (lambda c: c.execute("SELECT nothing"), OperationalError),
        ):
            with pytest.raises(kind) as raised:
                await store.write(statement)
            assert not isinstance(raised.value, (sqlite3.Error, psycopg.Error))
            assert "\n" not in str(raised.value)
    finally:
        await asyncio.to_thread(store.close)


async def test_rows_and_placeholders_behave_like_sqlite3(store: PostgresStore) -> None:
    def read(conn: sqlite3.Connection) -> list[sqlite3.Row]:
        return conn.execute(
            "SELECT ? AS Answer, '?' AS mark, 'a%' AS pct, ? IS NULL AS nothing", (42, None)
        ).fetchall()

    (row,) = await store.read(read)
    assert (row[0], row["Answer"], row["answer"], row["mark"], row["pct"], row[3]) == (
        42,
        42,
        42,
        "?",
        "a%",
        True,
    )
    assert row.keys() == ["answer", "mark", "pct", "nothing"]
    assert dict(zip(row.keys(), row, strict=True))["mark"] == "?"
    assert translate("SELECT '?', \"a?\" FROM t WHERE x = ? AND y LIKE 'z%'") == (
        "SELECT '?', \"a?\" FROM t WHERE x = %s AND y LIKE 'z%%'"
    )
    assert (
        translate("SELECT ':a', :a, :b_2 WHERE x = :a", True) == "SELECT ':a', %(a)s, %(b_2)s WHERE x = %(a)s"
    )


def test_serve_with_an_unreachable_database_says_so_in_one_line(tmp_path: Path) -> None:
    # a port nothing listens on: the loopback refuses at once
    config = write_config(tmp_path, store={"url": "postgresql://postgres@127.0.0.1:1/thingbridge"})
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "thingbridge: store.url: cannot open the PostgreSQL database"
    )


async def test_a_lost_connection_fails_one_group_and_the_store_reconnects(store: PostgresStore) -> None:
    def insert(conn: sqlite3.Connection, name: str) -> None:
        conn.execute(
            "INSERT INTO users (id, username, password_hash, role, created) VALUES (?,?,?,?,?)",
            (name, name, "h", "user", 1.0),
        )

    def insert_and_lose(conn: sqlite3.Connection, name: str) -> None:
        insert(conn, name)
        conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")  # the writer's own session

    def count(conn: sqlite3.Connection) -> int:
        return conn.execute("SELECT count(*) FROM users").fetchone()[0]

    await store.write(insert, "before")
    assert await store.read(count) == 1
    # What a server restart does to the store's idle sessions: every one of them terminated.
    with psycopg.connect(store.url, autocommit=True) as admin:
        ended = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()[0]
    assert ended >= 2  # the writer's and at least one reader's
    # the idle writer's lost connection costs no write: BEGIN is tried again on a new connection
    await store.write(insert, "idle")
    assert await store.read(count) == 2  # a read retries once on a new connection
    # a connection lost inside a group fails that group: nothing of it committed or acknowledged
    with pytest.raises(Unavailable):
        await store.write(insert_and_lose, "lost")
    await store.write(insert, "after")
    with psycopg.connect(store.url) as conn:
        assert [r[0] for r in conn.execute("SELECT id FROM users ORDER BY id")] == ["after", "before", "idle"]
