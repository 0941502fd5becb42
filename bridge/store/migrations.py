"""The schema as an ordered list of migrations. `PRAGMA user_version` is the version a database is
at; `migrate` runs, in order, each step above it, each in its own transaction. A new database runs
them all; a database newer than this code is refused, unchanged.

Rules for a new step: append it (never edit a released one), as a function of the connection. It
runs on both stores: on a SQLite file as written, on PostgreSQL (bridge/store/postgres.py, from
version 7 on) with each statement's SQLite types and row triggers translated (postgres.ddl), so
write SQL both accept (standard SQL; ALTER TABLE ... ADD / DROP COLUMN). A change SQLite's ALTER
TABLE cannot make (a constraint, NOT NULL) is a `_rebuild` of the table to its new definition: a
rebuild on SQLite, ALTER TABLE in place on PostgreSQL. On SQLite a step sees foreign key enforcement
off (the rebuild needs it) and is checked against every foreign key before its transaction commits;
PostgreSQL checks each statement."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from bridge.config import ConfigError
from bridge.store.errors import IntegrityError


class SchemaTooNew(ConfigError):
    """The database was migrated by a newer release: this one would not know its tables."""


def baseline(conn: sqlite3.Connection) -> None:
    """Version 1: the schema of the release at commit 79a1643 (written there with sqlite-utils,
    create-if-not-exists, `PRAGMA user_version = 1`), column for column and index for index, so a
    database made by it is at version 1 already."""
    for statement in (
        """CREATE TABLE users (
            id TEXT PRIMARY KEY,
            username TEXT NOT NULL,
            password_hash TEXT NOT NULL,
            role TEXT NOT NULL,
            email_verified INTEGER,
            created REAL NOT NULL
        )""",
        "CREATE UNIQUE INDEX idx_users_username ON users (username)",
        """CREATE TABLE subscriptions (
            id TEXT PRIMARY KEY,
            user_id TEXT REFERENCES users (id),
            common_name TEXT,
            plan_id TEXT,
            plan_name TEXT,
            product_id TEXT,
            status TEXT,
            thing_quota INTEGER,
            startts INTEGER,
            endts INTEGER,
            created REAL
        )""",
        "CREATE INDEX idx_subscriptions_user_id_status ON subscriptions (user_id, status)",
        # Access tokens are JWTs; the row makes them revocable. Only the jti is stored, never the token.
        """CREATE TABLE tokens (
            jti TEXT PRIMARY KEY,
            user_id TEXT REFERENCES users (id),
            issued REAL,
            expires REAL,
            revoked INTEGER
        )""",
        "CREATE INDEX idx_tokens_user_id ON tokens (user_id)",
        # cert_id: SHA-256 of the application's client certificate, when it has one (TLS listener)
        """CREATE TABLE apps (
            name TEXT PRIMARY KEY,
            owner_id TEXT REFERENCES users (id),
            password_hash TEXT,
            fleet_wide INTEGER,
            cert_id TEXT,
            created REAL
        )""",
        # private_key_sealed: AES-GCM sealed with the data directory's secret; NULL when the thing
        # sent a CSR.
        """CREATE TABLE things (
            id TEXT PRIMARY KEY,
            owner_id TEXT NOT NULL REFERENCES users (id),
            name TEXT,
            type TEXT,
            dist TEXT,
            key_type TEXT,
            cert_pem TEXT NOT NULL,
            cert_id TEXT NOT NULL,
            public_key_pem TEXT,
            private_key_sealed BLOB,
            enabled INTEGER,
            test_status TEXT,
            created REAL NOT NULL
        )""",
        "CREATE INDEX idx_things_owner_id ON things (owner_id)",
        """CREATE TABLE revoked_certs (
            cert_id TEXT PRIMARY KEY,
            thing_id TEXT,
            revoked_at REAL,
            reason TEXT
        )""",
        f"CREATE TABLE messages {_MESSAGES_V1}",
        *_MESSAGES_INDEXES,
        f"CREATE TABLE presence {_PRESENCE_V1}",
        f"CREATE TABLE thing_state {_THING_STATE_V1}",
        *_THING_STATE_INDEXES,
        """CREATE TABLE fleet_defaults (
            owner_id TEXT REFERENCES users (id),
            thing_type TEXT,
            update_rate INTEGER,
            app_param TEXT,
            data TEXT,
            package_url TEXT,
            package_version INTEGER,
            PRIMARY KEY (owner_id, thing_type)
        )""",
        # Messages to publish on the broker, written in the same transaction as the change that
        # causes them; the running server drains it (also when another process, the CLI, wrote it).
        """CREATE TABLE outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            topic TEXT NOT NULL,
            payload BLOB NOT NULL,
            retain INTEGER NOT NULL
        )""",
    ):
        conn.execute(statement)


# Version 1's tables keyed by a thing, which version 2 rebuilds with one clause more. Released: never
# edit them (test_version_1_is_the_schema_of_release_79a1643 holds them to that release's schema).
# AUTOINCREMENT (SQLite; an identity column elsewhere): seq never goes back after deletes, so
# `after=<id>` cursors stay monotonic.
_MESSAGES_V1 = """(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    thing_id TEXT NOT NULL,
    owner_id TEXT NOT NULL,
    type TEXT NOT NULL,
    ts REAL NOT NULL,
    encoding TEXT NOT NULL,
    payload BLOB NOT NULL,
    transport TEXT NOT NULL
)"""
_MESSAGES_INDEXES = (
    # History windows: WHERE thing_id = ? AND ts BETWEEN ? AND ? (ORDER BY seq follows ts); also
    # how the cascade finds a deleted thing's messages.
    "CREATE INDEX messages_thing_ts ON messages (thing_id, ts)",
    # Delivery cursors: WHERE thing_id = ? AND type = ? AND seq > ?
    "CREATE INDEX messages_thing_type_seq ON messages (thing_id, type, seq)",
)
_PRESENCE_V1 = """(
    thing_id TEXT PRIMARY KEY,
    state TEXT,
    ts REAL,
    transport TEXT
)"""
# Device twin: what the operator wants (NULL: inherit the fleet default), what the device reported,
# and what it has already fetched.
_THING_STATE_V1 = """(
    thing_id TEXT PRIMARY KEY REFERENCES things (id),
    reg_id TEXT,
    update_rate INTEGER,
    app_param TEXT,
    data TEXT,
    package_url TEXT,
    package_version INTEGER,
    reported_status TEXT,
    reported_info TEXT,
    reported_ts REAL,
    reported_transport TEXT,
    running_version INTEGER,
    fetched_config TEXT
)"""
_THING_STATE_INDEXES = ("CREATE UNIQUE INDEX idx_thing_state_reg_id ON thing_state (reg_id)",)


def cascade(conn: sqlite3.Connection) -> None:
    """Version 2: what hangs on a thing goes with it. messages, presence and thing_state (every
    table keyed by a thing) reference things (id) ON DELETE CASCADE, so deleting the things row is
    the whole delete. revoked_certs keeps no reference: it records the deleted thing's
    certificate. Rows of a thing that no longer exists are not carried over: the previous release
    could commit a message in flight while its thing was being deleted, and nothing could read it."""
    for table, columns, column, indexes in (
        ("messages", _MESSAGES_V1, "thing_id TEXT NOT NULL", _MESSAGES_INDEXES),
        ("presence", _PRESENCE_V1, "thing_id TEXT PRIMARY KEY", ()),
        # a reference without an action: the delete had to remove this row first
        (
            "thing_state",
            _THING_STATE_V1,
            "thing_id TEXT PRIMARY KEY REFERENCES things (id)",
            _THING_STATE_INDEXES,
        ),
    ):
        cascading = (
            column.removesuffix(" REFERENCES things (id)") + " REFERENCES things (id) ON DELETE CASCADE"
        )
        _rebuild(
            conn,
            table,
            columns.replace(f"{column},", f"{cascading},"),
            indexes,
            keep="thing_id IN (SELECT id FROM things)",
        )


def _rebuild(
    conn: sqlite3.Connection, table: str, columns: str, indexes: tuple[str, ...], keep: str = "1 = 1"
) -> None:
    """SQLite-only: its ALTER TABLE cannot add a constraint, so the table is rebuilt as sqlite.org
    describes (lang_altertable.html, "making other kinds of table schema changes"): create the new
    shape (`columns`, the same columns in the same order) under another name, copy the rows that
    match `keep`, drop the old table (and with it its indexes), rename, and create the indexes again
    under their old names. Foreign key enforcement is off meanwhile (see migrate). An AUTOINCREMENT
    table keeps its sequence (sqlite_sequence), not only its highest remaining key: a cursor must
    never see a key handed out before. On PostgreSQL, whose ALTER TABLE makes such changes in
    place, the connection does the same change its way (postgres.Migrating.rebuild)."""
    if not isinstance(conn, sqlite3.Connection):
        conn.rebuild(table, columns, keep)
        return
    names = ", ".join(row[1] for row in conn.execute(f"PRAGMA table_info({table})"))
    sequence = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
    conn.execute(f"CREATE TABLE {table}_rebuilt {columns}")
    conn.execute(f"INSERT INTO {table}_rebuilt ({names}) SELECT {names} FROM {table} WHERE {keep}")
    conn.execute(f"DROP TABLE {table}")
    conn.execute(f"ALTER TABLE {table}_rebuilt RENAME TO {table}")
    for index in indexes:
        conn.execute(index)
    if sequence is not None:
        conn.execute("DELETE FROM sqlite_sequence WHERE name = ?", (table,))
        conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, sequence[0]))


def upgrades(conn: sqlite3.Connection) -> None:
    """Version 3: software upgrades (issue #11). An operator's catalog (software, its versions,
    rollout profiles, accounts grouping devices under a profile) keyed by an integer `pk` (an
    identity column elsewhere; SQLite's INTEGER PRIMARY KEY) with the API ids unique per owner; what
    devices report; the notices they were sent; staged rollouts. Everything keyed by a thing, a
    software, a version or a profile goes with it (ON DELETE CASCADE): deleting a thing takes it out
    of its account, deleting software takes its versions out of every profile."""
    for statement in (
        # JSON columns (device_types, dependencies, waves) hold arrays the core validated.
        """CREATE TABLE software (
            pk INTEGER PRIMARY KEY,
            owner_id TEXT NOT NULL REFERENCES users (id),
            id TEXT NOT NULL,
            name TEXT NOT NULL,
            description TEXT,
            device_types TEXT NOT NULL,
            upgrade_type TEXT,
            created REAL NOT NULL,
            UNIQUE (owner_id, id),
            UNIQUE (owner_id, name)
        )""",
        # released: releaseDate in epoch seconds, what "latest" is ordered by
        """CREATE TABLE software_versions (
            pk INTEGER PRIMARY KEY,
            software_pk INTEGER NOT NULL REFERENCES software (pk) ON DELETE CASCADE,
            version_number TEXT NOT NULL,
            release_date TEXT NOT NULL,
            released REAL NOT NULL,
            status TEXT NOT NULL,
            priority TEXT,
            release_note TEXT,
            eula TEXT,
            download_url TEXT NOT NULL,
            dependencies TEXT NOT NULL,
            UNIQUE (software_pk, version_number)
        )""",
        "CREATE INDEX software_versions_latest ON software_versions (software_pk, released)",
        """CREATE TABLE rollout_profiles (
            pk INTEGER PRIMARY KEY,
            owner_id TEXT NOT NULL REFERENCES users (id),
            id TEXT NOT NULL,
            name TEXT,
            description TEXT,
            created REAL NOT NULL,
            UNIQUE (owner_id, id)
        )""",
        # Version.rolloutProfiles, the one stored link (RolloutProfile.softwareVersions is derived)
        """CREATE TABLE version_profiles (
            version_pk INTEGER NOT NULL REFERENCES software_versions (pk) ON DELETE CASCADE,
            profile_pk INTEGER NOT NULL REFERENCES rollout_profiles (pk) ON DELETE CASCADE,
            PRIMARY KEY (version_pk, profile_pk)
        )""",
        "CREATE INDEX version_profiles_profile ON version_profiles (profile_pk)",
        """CREATE TABLE upgrade_accounts (
            pk INTEGER PRIMARY KEY,
            owner_id TEXT NOT NULL REFERENCES users (id),
            id TEXT NOT NULL,
            profile_pk INTEGER NOT NULL REFERENCES rollout_profiles (pk) ON DELETE CASCADE,
            UNIQUE (owner_id, id)
        )""",
        "CREATE INDEX upgrade_accounts_profile ON upgrade_accounts (profile_pk)",
        # A thing is in one account at most; device_id: how the operator named it (id or regId).
        """CREATE TABLE account_devices (
            thing_id TEXT PRIMARY KEY REFERENCES things (id) ON DELETE CASCADE,
            account_pk INTEGER NOT NULL REFERENCES upgrade_accounts (pk) ON DELETE CASCADE,
            device_id TEXT NOT NULL,
            type TEXT NOT NULL
        )""",
        "CREATE INDEX account_devices_account ON account_devices (account_pk)",
        # What the device last reported running, per software name (registered or not).
        """CREATE TABLE device_versions (
            thing_id TEXT NOT NULL REFERENCES things (id) ON DELETE CASCADE,
            software_name TEXT NOT NULL,
            version_number TEXT NOT NULL,
            ts REAL NOT NULL,
            transport TEXT NOT NULL,
            client_token TEXT,
            PRIMARY KEY (thing_id, software_name)
        )""",
        # Append-only; AUTOINCREMENT (SQLite; identity elsewhere) keeps the order of arrival.
        """CREATE TABLE upgrade_results (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            thing_id TEXT NOT NULL REFERENCES things (id) ON DELETE CASCADE,
            software_name TEXT NOT NULL,
            version_number TEXT NOT NULL,
            status TEXT NOT NULL,
            error_code TEXT,
            message TEXT,
            client_token TEXT,
            ts REAL NOT NULL,
            transport TEXT NOT NULL
        )""",
        # History reads (thing, seq) and a rollout's outcome of a device (thing, software, version).
        "CREATE INDEX upgrade_results_thing ON upgrade_results (thing_id, software_name, version_number, seq)",
        # The offer each device was last told of, per software (things/{id}/upgrade/notify).
        """CREATE TABLE upgrade_notices (
            thing_id TEXT NOT NULL REFERENCES things (id) ON DELETE CASCADE,
            software_pk INTEGER NOT NULL REFERENCES software (pk) ON DELETE CASCADE,
            version_pk INTEGER NOT NULL REFERENCES software_versions (pk) ON DELETE CASCADE,
            PRIMARY KEY (thing_id, software_pk)
        )""",
        # wave: 0-based index of the wave released last; wave_started: when it was released.
        """CREATE TABLE rollouts (
            id TEXT PRIMARY KEY,
            owner_id TEXT NOT NULL REFERENCES users (id),
            version_pk INTEGER NOT NULL REFERENCES software_versions (pk) ON DELETE CASCADE,
            profile_pk INTEGER NOT NULL REFERENCES rollout_profiles (pk) ON DELETE CASCADE,
            waves TEXT NOT NULL,
            error_threshold REAL NOT NULL,
            wave_timeout REAL NOT NULL,
            state TEXT NOT NULL,
            wave INTEGER NOT NULL,
            wave_started REAL NOT NULL,
            reason TEXT,
            created REAL NOT NULL,
            updated REAL NOT NULL
        )""",
        "CREATE INDEX rollouts_version ON rollouts (version_pk, profile_pk)",
        "CREATE INDEX rollouts_owner ON rollouts (owner_id, created)",
        """CREATE TABLE rollout_devices (
            rollout_id TEXT NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
            thing_id TEXT NOT NULL REFERENCES things (id) ON DELETE CASCADE,
            wave INTEGER NOT NULL,
            PRIMARY KEY (rollout_id, thing_id)
        )""",
        "CREATE INDEX rollout_devices_thing ON rollout_devices (thing_id)",
    ):
        conn.execute(statement)


def provisioning(conn: sqlite3.Connection) -> None:
    """Version 4: provisioning by serial number (issue #12). Vendors (each of a registry user, its
    credentials stored only as SHA-256 hashes), their models, serial numbers, the client a serial
    number is made into (its thing once activated, its CIK's hash), the activation log, content
    entities (blob metadata: the blob is a file named by its SHA-256), groups with typed members and
    shares of a model to other vendors. Everything of a model goes with it (ON DELETE CASCADE); a
    client goes with its thing, so a thing deleted by its owner leaves its serial number unused."""
    for statement in (
        # revoked: when an admin revoked the vendor's credentials (NULL: active)
        """CREATE TABLE vendors (
            pk INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            owner_id TEXT NOT NULL REFERENCES users (id),
            token_hash TEXT NOT NULL UNIQUE,
            cik_hash TEXT NOT NULL UNIQUE,
            created REAL NOT NULL,
            revoked REAL
        )""",
        # options: a JSON array of the document's flags, stored and echoed
        """CREATE TABLE prov_models (
            pk INTEGER PRIMARY KEY,
            vendor_pk INTEGER NOT NULL REFERENCES vendors (pk) ON DELETE CASCADE,
            name TEXT NOT NULL,
            rid TEXT NOT NULL,
            options TEXT NOT NULL,
            created REAL NOT NULL,
            UNIQUE (vendor_pk, name)
        )""",
        """CREATE TABLE serial_numbers (
            pk INTEGER PRIMARY KEY,
            model_pk INTEGER NOT NULL REFERENCES prov_models (pk) ON DELETE CASCADE,
            sn TEXT NOT NULL,
            extra TEXT NOT NULL,
            UNIQUE (model_pk, sn)
        )""",
        # The client made of a serial number (make client): status enabled (until enable_expires),
        # activated or disabled; enabled_by: the vendor that enabled it (a shared vendor sees only
        # its own); thing_id: set at the first activation; cik_hash: only while activated.
        """CREATE TABLE sn_clients (
            sn_pk INTEGER PRIMARY KEY REFERENCES serial_numbers (pk) ON DELETE CASCADE,
            rid TEXT NOT NULL UNIQUE,
            status TEXT NOT NULL,
            enable_expires REAL NOT NULL,
            enabled_by INTEGER NOT NULL REFERENCES vendors (pk) ON DELETE CASCADE,
            thing_id TEXT UNIQUE REFERENCES things (id) ON DELETE CASCADE,
            cik_hash TEXT UNIQUE
        )""",
        "CREATE INDEX sn_clients_enabled_by ON sn_clients (enabled_by)",
        # Append-only, the last entries of each serial number kept; AUTOINCREMENT keeps the order.
        """CREATE TABLE sn_log (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            sn_pk INTEGER NOT NULL REFERENCES serial_numbers (pk) ON DELETE CASCADE,
            ts REAL NOT NULL,
            remote TEXT NOT NULL,
            agent TEXT NOT NULL,
            entry TEXT NOT NULL
        )""",
        "CREATE INDEX sn_log_sn ON sn_log (sn_pk, seq)",
        # sha256: the blob's file name (NULL until the first upload); several entities may share one
        """CREATE TABLE prov_content (
            pk INTEGER PRIMARY KEY,
            model_pk INTEGER NOT NULL REFERENCES prov_models (pk) ON DELETE CASCADE,
            id TEXT NOT NULL,
            description TEXT NOT NULL,
            protected INTEGER NOT NULL,
            content_type TEXT NOT NULL,
            size INTEGER NOT NULL,
            sha256 TEXT,
            updated REAL NOT NULL,
            UNIQUE (model_pk, id)
        )""",
        "CREATE INDEX prov_content_sha256 ON prov_content (sha256)",
        """CREATE TABLE prov_groups (
            pk INTEGER PRIMARY KEY,
            model_pk INTEGER NOT NULL REFERENCES prov_models (pk) ON DELETE CASCADE,
            id TEXT NOT NULL,
            description TEXT NOT NULL,
            UNIQUE (model_pk, id)
        )""",
        # A member is exactly one of a serial number, a content entity or a group, so that deleting
        # any of them removes its memberships; expire: epoch seconds, 0 = never.
        """CREATE TABLE group_members (
            pk INTEGER PRIMARY KEY,
            group_pk INTEGER NOT NULL REFERENCES prov_groups (pk) ON DELETE CASCADE,
            sn_pk INTEGER REFERENCES serial_numbers (pk) ON DELETE CASCADE,
            content_pk INTEGER REFERENCES prov_content (pk) ON DELETE CASCADE,
            member_group_pk INTEGER REFERENCES prov_groups (pk) ON DELETE CASCADE,
            expire INTEGER NOT NULL,
            description TEXT NOT NULL,
            CHECK ((CASE WHEN sn_pk IS NULL THEN 0 ELSE 1 END)
                 + (CASE WHEN content_pk IS NULL THEN 0 ELSE 1 END)
                 + (CASE WHEN member_group_pk IS NULL THEN 0 ELSE 1 END) = 1),
            UNIQUE (group_pk, sn_pk),
            UNIQUE (group_pk, content_pk),
            UNIQUE (group_pk, member_group_pk)
        )""",
        # The groups a member is in (authorisation walks upwards from a serial number and a content).
        "CREATE INDEX group_members_sn ON group_members (sn_pk)",
        "CREATE INDEX group_members_content ON group_members (content_pk)",
        "CREATE INDEX group_members_group ON group_members (member_group_pk)",
        """CREATE TABLE prov_shares (
            model_pk INTEGER NOT NULL REFERENCES prov_models (pk) ON DELETE CASCADE,
            vendor_pk INTEGER NOT NULL REFERENCES vendors (pk) ON DELETE CASCADE,
            PRIMARY KEY (model_pk, vendor_pk)
        )""",
        "CREATE INDEX prov_shares_vendor ON prov_shares (vendor_pk)",
    ):
        conn.execute(statement)


def firmware(conn: sqlite3.Connection) -> None:
    """Firmware activation (issue #13): a product binds one upgrader software to one provisioning
    model of the same owner (its versions are the software's, its serial numbers the model's), and
    a version's firmware is a content entity of that model. Nothing else is stored: the API key is
    the serial number's CIK hash, the device's version its upgrader report. The binding goes with
    the software or the model, an image with its version or its content entity."""
    for statement in (
        """CREATE TABLE fw_products (
            pk INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            owner_id TEXT NOT NULL REFERENCES users (id),
            software_pk INTEGER NOT NULL UNIQUE REFERENCES software (pk) ON DELETE CASCADE,
            model_pk INTEGER NOT NULL UNIQUE REFERENCES prov_models (pk) ON DELETE CASCADE,
            enabled INTEGER NOT NULL,
            created REAL NOT NULL
        )""",
        "CREATE INDEX fw_products_owner ON fw_products (owner_id, id)",
        """CREATE TABLE fw_images (
            version_pk INTEGER PRIMARY KEY REFERENCES software_versions (pk) ON DELETE CASCADE,
            content_pk INTEGER NOT NULL REFERENCES prov_content (pk) ON DELETE CASCADE
        )""",
        "CREATE INDEX fw_images_content ON fw_images (content_pk)",
    ):
        conn.execute(statement)


def mqtt_sessions(conn: sqlite3.Connection) -> None:
    """Version 6: persistent MQTT sessions (issue #14), so that a restart keeps a session's
    subscriptions and the QoS 1 messages it has not acknowledged (bridge/store/sessions.py). A
    thing's or application's sessions go with it (ON DELETE CASCADE), their messages with them."""
    for statement in (
        # thing_id / app_name: whose session it is (one of them); cert_id: a thing's credential
        # it was made under (one re-issued since leaves it behind); principal: its identity for the
        # receive ACL while it is offline; disconnected: epoch seconds, NULL while connected.
        """CREATE TABLE mqtt_sessions (
            client_id TEXT PRIMARY KEY,
            thing_id TEXT REFERENCES things (id) ON DELETE CASCADE,
            app_name TEXT REFERENCES apps (name) ON DELETE CASCADE,
            cert_id TEXT,
            principal BLOB NOT NULL,
            disconnected REAL
        )""",
        "CREATE INDEX mqtt_sessions_thing ON mqtt_sessions (thing_id)",
        "CREATE INDEX mqtt_sessions_app ON mqtt_sessions (app_name)",
        """CREATE TABLE mqtt_subscriptions (
            client_id TEXT NOT NULL REFERENCES mqtt_sessions (client_id) ON DELETE CASCADE,
            topic_filter TEXT NOT NULL,
            qos INTEGER NOT NULL,
            PRIMARY KEY (client_id, topic_filter)
        )""",
        # packet_id NULL: queued; set: sent, awaiting its PUBACK (acknowledged: the row is gone)
        """CREATE TABLE mqtt_queue (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            client_id TEXT NOT NULL REFERENCES mqtt_sessions (client_id) ON DELETE CASCADE,
            topic TEXT NOT NULL,
            payload BLOB NOT NULL,
            qos INTEGER NOT NULL,
            packet_id INTEGER
        )""",
        "CREATE INDEX mqtt_queue_client ON mqtt_queue (client_id, seq)",
    ):
        conn.execute(statement)


def owner_counts(conn: sqlite3.Connection) -> None:
    """Version 7: each owner's count of things, kept by triggers on every insert and delete of a
    thing (ON DELETE CASCADE included), so that the plan check of a thing's creation or a serial
    number's activation reads one row instead of counting the owner's registry (6.8 ms at
    100,000 things, on the one writer thread: bench_provisioning). Things never change owner."""
    for statement in (
        """CREATE TABLE owner_things (
            owner_id TEXT PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
            things INTEGER NOT NULL
        )""",
        "INSERT INTO owner_things (owner_id, things) SELECT owner_id, count(*) FROM things GROUP BY owner_id",
        """CREATE TRIGGER owner_things_insert AFTER INSERT ON things BEGIN
            INSERT INTO owner_things (owner_id, things) VALUES (NEW.owner_id, 1)
            ON CONFLICT (owner_id) DO UPDATE SET things = things + 1;
        END""",
        """CREATE TRIGGER owner_things_delete AFTER DELETE ON things BEGIN
            UPDATE owner_things SET things = things - 1 WHERE owner_id = OLD.owner_id;
        END""",
    ):
        conn.execute(statement)


def session_owner(conn: sqlite3.Connection) -> None:
    """Version 8: mqtt_sessions.cert_id goes. Nothing read it: a thing's session is resumed by a
    connection with the thing's current certificate, whichever certificate it was made under."""
    conn.execute("ALTER TABLE mqtt_sessions DROP COLUMN cert_id")


def partitioned_messages(conn: sqlite3.Connection) -> None:
    """Version 9: on PostgreSQL, `messages` partitioned by day of `ts`, so that the retention drops
    whole days (postgres.Migrating.partition_messages); a SQLite file keeps its table (the step is
    its version number only)."""
    if not isinstance(conn, sqlite3.Connection):
        conn.partition_messages()


Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: list[tuple[int, Migration]] = [
    (1, baseline),
    (2, cascade),
    (3, upgrades),
    (4, provisioning),
    (5, firmware),
    (6, mqtt_sessions),
    (7, owner_counts),
    (8, session_owner),
    (9, partitioned_messages),
]
# Steps that change nothing in SQLite: a new PostgreSQL database, made from SQLite's schema, runs them.
POSTGRES_ONLY = (partitioned_messages,)
LATEST = MIGRATIONS[-1][0]


def version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def refuse_newer(conn: sqlite3.Connection, path: Path) -> int:
    """The database's version; SchemaTooNew (nothing written) if this code does not know it."""
    found = version(conn)
    if found > LATEST:
        raise SchemaTooNew(
            f"data_dir: the database {path} is at schema version {found}, newer than this release"
            f" knows (up to {LATEST}): a newer thingbridge has used it; run that release, or this"
            " one on a backup made before the upgrade"
        )
    return found


def migrate(conn: sqlite3.Connection, path: Path, upto: int | None = None) -> None:
    """Bring the database to LATEST (or to `upto`: postgres.schema): each missing step in its own
    transaction (BEGIN IMMEDIATE: another process opening the same file, the command line, waits
    and then finds it done). `conn` is in autocommit mode (isolation_level None), in no transaction."""
    found = refuse_newer(conn, path)
    upto = LATEST if upto is None else upto
    if found >= upto:
        return
    # SQLite: foreign_keys is a no-op inside a transaction, so it is switched around the steps; each
    # step is checked with foreign_key_check before it commits instead.
    conn.execute("PRAGMA foreign_keys=OFF")
    try:
        for target, step in [(t, s) for t, s in MIGRATIONS if found < t <= upto]:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if refuse_newer(conn, path) < target:
                    step(conn)
                    broken = conn.execute("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        tables = sorted({row[0] for row in broken})
                        raise IntegrityError(
                            f"schema migration {target} ({step.__name__}) leaves {len(broken)} rows"
                            f" without their referenced row, in {', '.join(tables)}"
                        )
                    conn.execute(f"PRAGMA user_version = {target}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
    finally:
        conn.execute("PRAGMA foreign_keys=ON")
