"""The store's versioned migrations. A database made by the previous release (commit 79a1643,
tests/fixtures/release-79a1643) opens in the real `thingbridge serve`, is migrated and serves what
it held; a thing's delete cascades to every row that hangs on it; a database newer than the code is
refused, unchanged. In-process: version 1 is that release's schema, an upgraded database has the
schema of a new one, and the rebuild keeps rows and the message sequence."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bridge.store import Store, migrations
from tests.conftest import Bridge, write_config
from tests.helpers import token

FIXTURE = Path(__file__).parent / "fixtures" / "release-79a1643"
MANIFEST: dict[str, Any] = orjson.loads((FIXTURE / "manifest.json").read_bytes())
DB = "thingbridge.sqlite"


# ---- helpers ----------------------------------------------------------------------------------------
def installation(folder: Path) -> Bridge:
    """A copy of the fixture installation in `folder` with a loopback config (not started)."""
    for sub in ("data", "certs"):
        shutil.copytree(FIXTURE / sub, folder / sub)
    for private in ("data/secret.key", f"data/{DB}", "certs/ca.key", "certs/server.key"):
        (folder / private).chmod(0o600)  # git keeps no modes
    return Bridge(folder, write_config(folder))


def read_only(path: Path, *, immutable: bool = False) -> sqlite3.Connection:
    """`immutable`: for the fixture itself, which a reader must not even give a -wal or -shm file."""
    conn = sqlite3.connect(f"file:{path}?mode=ro" + ("&immutable=1" if immutable else ""), uri=True)
    conn.row_factory = sqlite3.Row
    return conn


def rows_naming(path: Path, value: str) -> dict[str, int]:
    """table -> how many rows hold `value` in any column."""
    found: dict[str, int] = {}
    with read_only(path) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            columns = [r["name"] for r in conn.execute(f"PRAGMA table_info({table})")]
            where = " OR ".join(f"{c} = ?" for c in columns)
            count = conn.execute(f"SELECT count(*) FROM {table} WHERE {where}", [value] * len(columns))
            if n := count.fetchone()[0]:
                found[table] = n
    return found


def shape(conn: sqlite3.Connection) -> dict[str, Any]:
    """What a schema is, independent of how its CREATE statements were spelled: per table its columns,
    foreign keys (with their actions), indexes (with uniqueness and columns) and AUTOINCREMENT."""
    result: dict[str, Any] = {}
    for name, sql in conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name != 'sqlite_sequence'"
    ).fetchall():
        indexes = set()
        for _, index, unique, origin, _partial in conn.execute(f"PRAGMA index_list({name})").fetchall():
            columns = tuple(c[2] for c in conn.execute(f"PRAGMA index_info({index})"))
            indexes.add((index, unique, origin, columns))
        result[name] = {
            "columns": [tuple(c)[1:] for c in conn.execute(f"PRAGMA table_xinfo({name})")],
            "foreign_keys": sorted(tuple(f)[2:7] for f in conn.execute(f"PRAGMA foreign_key_list({name})")),
            "indexes": sorted(indexes),
            "autoincrement": "AUTOINCREMENT" in sql.upper(),
        }
    triggers = conn.execute("SELECT tbl_name, name FROM sqlite_master WHERE type = 'trigger'")
    result["(triggers)"] = sorted(tuple(row) for row in triggers)
    return result


def thing_jwt(thing_id: str, private_pem: str) -> str:
    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    now = int(time.time())
    return jwt.encode(
        {"iss": f"urn:thing:{thing_id}", "iat": now, "exp": now + 300},
        key,
        algorithm="ES256" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS256",
        headers={"kid": thing_id},
    )


class Api:
    def __init__(self, session: aiohttp.ClientSession, bridge: Bridge, tok: str) -> None:
        self.session, self.base, self.tok = session, bridge.api, tok

    async def __call__(self, method: str, path: str, tok: str | None = None, **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {tok or self.tok}"}
        async with self.session.request(method, self.base + path, headers=headers, **kw) as r:
            assert r.status == 200, f"{method} {path}: {r.status} {await r.text()}"
            return (await r.json())["result"]


@pytest.fixture
def old_release(tmp_path: Path) -> Iterator[Bridge]:
    bridge = installation(tmp_path)
    yield bridge
    bridge.kill()


# ---- a database of the previous release, in the real server ----------------------------------------
async def test_a_database_of_release_79a1643_opens_migrates_and_serves(old_release: Bridge) -> None:
    bridge = old_release
    with read_only(bridge.db_path) as conn:
        assert migrations.version(conn) == 1
        (sequence,) = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
        (highest,) = conn.execute("SELECT max(seq) FROM messages").fetchone()
    assert sequence > highest  # the fixture's newest messages were its deleted thing's

    bridge.start()
    tok = await token(bridge, MANIFEST["user"], MANIFEST["password"])
    async with aiohttp.ClientSession() as session:
        api = Api(session, bridge, tok)
        # The things, with the same ids, certificates and keys, as the old release listed them.
        things = await api("GET", "/things")
        assert things == MANIFEST["things"]
        for thing_id, history in MANIFEST["messages"].items():
            # Every message, in order, with its id, time, type and payload.
            assert await api("GET", f"/things/{thing_id}/messages") == history
            # Desired config, regId, presence: the device twin as it was.
            # Everything the old release answered, unchanged; later releases may add fields
            # (currentVersionNumbers came with the upgrader).
            state = await api("GET", f"/things/{thing_id}/state")
            assert {k: state[k] for k in MANIFEST["state"][thing_id]} == MANIFEST["state"][thing_id]

        # A new message: stored after the old ones, past every seq the old release handed out
        # (also those of its deleted thing), and `after=` the last old message finds only it.
        rsa = next(t for t in things if t["thingName"] == "rsa-sensor")
        rsa_id, last_old = rsa["flthingspk"], MANIFEST["messages"][rsa["flthingspk"]][-1]["flmessagespk"]
        device = thing_jwt(rsa_id, rsa["keyPairPrivate"])
        new = (await api("POST", f"/things/{rsa_id}/collect", device, json={"after": "migration"}))[
            "flmessagespk"
        ]
        after = await api("GET", f"/things/{rsa_id}/messages", params={"after": last_old})
        assert [m["flmessagespk"] for m in after] == [new]
        with read_only(bridge.db_path) as conn:
            assert conn.execute("SELECT seq FROM messages WHERE id = ?", (new,)).fetchone()[0] == sequence + 1

        # The delete cascades: messages, presence and device-twin state go with the thing.
        before = rows_naming(bridge.db_path, rsa_id)
        assert {"things", "messages", "presence", "thing_state"} <= set(before), before
        await api("DELETE", f"/things/{rsa_id}")
    assert bridge.stop() == 0

    assert rows_naming(bridge.db_path, rsa_id) == {"revoked_certs": 1}
    with read_only(bridge.db_path) as conn:
        assert migrations.version(conn) == migrations.LATEST
        revoked = conn.execute("SELECT cert_id FROM revoked_certs WHERE thing_id = ?", (rsa_id,)).fetchone()
        assert revoked[0] == rsa["certificateId"]
        # The old release's revocation record is still there too.
        assert rows_naming(bridge.db_path, MANIFEST["deleted"]) == {"revoked_certs": 1}
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        # each owner's count of things (version 7) was taken from the rows and kept by the delete
        counted = [tuple(r) for r in conn.execute("SELECT owner_id, things FROM owner_things ORDER BY 1")]
        real = "SELECT owner_id, count(*) FROM things GROUP BY owner_id ORDER BY 1"
        assert counted == [tuple(r) for r in conn.execute(real)] and counted[0][1] == len(things) - 1


async def test_delete_on_a_new_database_leaves_only_the_revocation(fresh_bridge: Bridge) -> None:
    bridge = fresh_bridge
    name, password = "cascade-owner", "cascade-password-1"
    bridge.cli("user", "add", name, "--password", password)
    async with aiohttp.ClientSession() as session:
        api = Api(session, bridge, await token(bridge, name, password))
        thing = await api("POST", "/things", json={"keyType": "EC"})
        thing_id = thing["flthingspk"]
        device = thing_jwt(thing_id, thing["keyPairPrivate"])
        await api("POST", f"/things/{thing_id}/collect", device, json={"n": 1})
        await api("POST", f"/things/{thing_id}/publish", json={"cmd": "on"})
        await api("PATCH", f"/things/{thing_id}/desired", json={"UpdateRate": 2, "regId": "cascade-reg"})
        assert {"things", "messages", "thing_state"} <= set(rows_naming(bridge.db_path, thing_id))
        await api("DELETE", f"/things/{thing_id}")
    assert bridge.stop() == 0
    assert rows_naming(bridge.db_path, thing_id) == {"revoked_certs": 1}
    assert rows_naming(bridge.db_path, "cascade-reg") == {}


def test_a_database_newer_than_the_code_is_refused_unchanged(tmp_path: Path) -> None:
    bridge = installation(tmp_path)
    with sqlite3.connect(bridge.db_path) as conn:
        conn.execute(f"PRAGMA user_version = {migrations.LATEST + 1}")
    conn.close()
    before = hashlib.sha256(bridge.db_path.read_bytes()).hexdigest()
    for command in (["serve"], ["status", "--owner", MANIFEST["user"]]):
        result = subprocess.run(
            [sys.executable, "-m", "bridge", *command, "--config", str(bridge.config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, result
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(
            f"thingbridge: data_dir: the database {bridge.db_path} is at schema version"
        )
        assert f"version {migrations.LATEST + 1}, newer than this release" in lines[0]
    assert hashlib.sha256(bridge.db_path.read_bytes()).hexdigest() == before
    assert not bridge.db_path.with_name(DB + "-wal").exists()


# ---- in-process: the migrations themselves -----------------------------------------------------------
def test_version_1_is_the_schema_of_release_79a1643() -> None:
    new = sqlite3.connect(":memory:")
    migrations.baseline(new)
    with read_only(FIXTURE / "data" / DB, immutable=True) as old:
        assert migrations.version(old) == 1
        assert shape(new) == shape(old)


def test_an_upgraded_database_has_the_schema_of_a_new_one(tmp_path: Path) -> None:
    upgraded = installation(tmp_path / "old").db_path
    for path in (upgraded, tmp_path / "new" / DB):
        store = Store(path)
        store.open()
        store.close()
    with read_only(upgraded) as old, read_only(tmp_path / "new" / DB) as new:
        assert migrations.version(old) == migrations.version(new) == migrations.LATEST
        assert shape(old) == shape(new)
        tables = shape(new)
    for table in ("messages", "presence", "thing_state"):
        # (referenced table, column, referenced column, on update, on delete)
        assert tables[table]["foreign_keys"] == [("things", "thing_id", "id", "NO ACTION", "CASCADE")]
    assert tables["revoked_certs"]["foreign_keys"] == []  # it outlives the thing it records
    assert tables["messages"]["autoincrement"]


def test_the_rebuild_keeps_rows_and_the_sequence_and_drops_orphans(tmp_path: Path) -> None:
    path = installation(tmp_path).db_path
    with sqlite3.connect(path) as conn:
        # What the previous release could leave: a message committed while its thing was deleted.
        conn.execute(
            "INSERT INTO messages (id, thing_id, owner_id, type, ts, encoding, payload, transport)"
            " VALUES ('orphan', 'gone', 'nobody', 'ingress', 0, 'json', X'7B7D', 'http')"
        )
        conn.execute("INSERT INTO presence (thing_id, state) VALUES ('gone', 'online')")
    conn.close()
    tables = ("messages", "presence", "thing_state")
    with read_only(path) as conn:
        kept = {t: conn.execute(f"SELECT * FROM {t} WHERE thing_id != 'gone'").fetchall() for t in tables}
        (sequence,) = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
    conn = sqlite3.connect(path, isolation_level=None)
    migrations.migrate(conn, path)
    assert migrations.version(conn) == migrations.LATEST
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1  # switched back on
    for table in tables:
        assert conn.execute(f"SELECT * FROM {table}").fetchall() == [tuple(r) for r in kept[table]]
    assert conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()[0] == sequence
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # the next message continues the sequence, past every seq handed out before
    thing, owner = conn.execute("SELECT id, owner_id FROM things LIMIT 1").fetchone()
    seq = conn.execute(
        "INSERT INTO messages (id, thing_id, owner_id, type, ts, encoding, payload, transport)"
        " VALUES ('next', ?, ?, 'ingress', 0, 'json', X'7B7D', 'http') RETURNING seq",
        (thing, owner),
    ).fetchone()[0]
    assert seq == sequence + 1
    conn.close()


def test_a_database_at_version_7_migrates_to_the_latest_with_its_rows(tmp_path: Path) -> None:
    path = tmp_path / DB
    conn = sqlite3.connect(path, isolation_level=None)
    migrations.migrate(conn, path, 7)
    conn.execute(
        "INSERT INTO users (id, username, password_hash, role, created) VALUES ('u1', 'a', 'h', 'user', 1)"
    )
    conn.execute(
        "INSERT INTO things (id, owner_id, cert_pem, cert_id, created) VALUES ('t1', 'u1', 'pem', 'c1', 1)"
    )
    conn.execute(
        "INSERT INTO mqtt_sessions (client_id, thing_id, cert_id, principal, disconnected)"
        " VALUES ('t1', 't1', 'c1', X'70', 5)"
    )
    conn.execute(
        "INSERT INTO mqtt_queue (client_id, topic, payload, qos) VALUES ('t1', 'things/t1/publish', X'78', 1)"
    )
    migrations.migrate(conn, path)
    assert migrations.version(conn) == migrations.LATEST
    assert conn.execute("SELECT * FROM mqtt_sessions").fetchall() == [("t1", "t1", None, b"p", 5.0)]
    assert conn.execute("SELECT client_id, topic, payload FROM mqtt_queue").fetchall() == [
        ("t1", "things/t1/publish", b"x")
    ]
    assert conn.execute("SELECT owner_id, things FROM owner_things").fetchall() == [("u1", 1)]
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    new = sqlite3.connect(":memory:", isolation_level=None)
    migrations.migrate(new, Path(":memory:"))
    assert shape(conn) == shape(new)
    conn.close()


def test_a_failing_step_is_rolled_back_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    step = migrations.LATEST + 1  # a step of a future release

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half_done (x INTEGER)")
        raise sqlite3.OperationalError(f"step {step} failed")

    monkeypatch.setattr(migrations, "MIGRATIONS", [*migrations.MIGRATIONS, (step, broken)])
    monkeypatch.setattr(migrations, "LATEST", step)
    path = tmp_path / DB
    conn = sqlite3.connect(path, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match=f"step {step} failed"):
        migrations.migrate(conn, path)
    assert migrations.version(conn) == step - 1  # the steps before committed, each in its own transaction
    assert not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'half_done'").fetchone()
    assert not conn.in_transaction
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    conn.close()
