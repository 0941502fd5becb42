"""The whole schema, created idempotently with sqlite-utils (tables, indexes that match the queries)."""

from __future__ import annotations

import sqlite3

import sqlite_utils

SCHEMA_VERSION = 1


def create(conn: sqlite3.Connection) -> None:
    db = sqlite_utils.Database(conn)
    db["users"].create(
        {
            "id": str,
            "username": str,
            "password_hash": str,
            "role": str,
            "email_verified": int,
            "created": float,
        },
        pk="id",
        not_null={"username", "password_hash", "role", "created"},
        if_not_exists=True,
    )
    db["users"].create_index(["username"], unique=True, if_not_exists=True)

    db["subscriptions"].create(
        {
            "id": str,
            "user_id": str,
            "common_name": str,
            "plan_id": str,
            "plan_name": str,
            "product_id": str,
            "status": str,
            "thing_quota": int,
            "startts": int,
            "endts": int,
            "created": float,
        },
        pk="id",
        foreign_keys=[("user_id", "users", "id")],
        if_not_exists=True,
    )
    db["subscriptions"].create_index(["user_id", "status"], if_not_exists=True)

    # Access tokens are JWTs; the row makes them revocable. Only the jti is stored, never the token.
    db["tokens"].create(
        {"jti": str, "user_id": str, "issued": float, "expires": float, "revoked": int},
        pk="jti",
        foreign_keys=[("user_id", "users", "id")],
        if_not_exists=True,
    )
    db["tokens"].create_index(["user_id"], if_not_exists=True)

    db["apps"].create(
        {
            "name": str,
            "owner_id": str,
            "password_hash": str,
            "fleet_wide": int,
            # SHA-256 of the application's client certificate, when it has one (TLS listener)
            "cert_id": str,
            "created": float,
        },
        pk="name",
        foreign_keys=[("owner_id", "users", "id")],
        if_not_exists=True,
    )

    db["things"].create(
        {
            "id": str,
            "owner_id": str,
            "name": str,
            "type": str,
            "dist": str,
            "key_type": str,
            "cert_pem": str,
            "cert_id": str,
            "public_key_pem": str,
            # AES-GCM sealed with the data directory's secret; NULL when the thing sent a CSR.
            "private_key_sealed": bytes,
            "enabled": int,
            "test_status": str,
            "created": float,
        },
        pk="id",
        foreign_keys=[("owner_id", "users", "id")],
        not_null={"owner_id", "cert_pem", "cert_id", "created"},
        if_not_exists=True,
    )
    db["things"].create_index(["owner_id"], if_not_exists=True)

    db["revoked_certs"].create(
        {"cert_id": str, "thing_id": str, "revoked_at": float, "reason": str},
        pk="cert_id",
        if_not_exists=True,
    )
    # AUTOINCREMENT: seq never goes back after deletes, so `after=<id>` cursors stay monotonic.
    conn.execute(
        """CREATE TABLE IF NOT EXISTS messages (
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
    )
    # History windows: WHERE thing_id = ? AND ts BETWEEN ? AND ? (ORDER BY seq follows ts).
    conn.execute("CREATE INDEX IF NOT EXISTS messages_thing_ts ON messages (thing_id, ts)")
    # Delivery cursors: WHERE thing_id = ? AND type = ? AND seq > ?
    conn.execute("CREATE INDEX IF NOT EXISTS messages_thing_type_seq ON messages (thing_id, type, seq)")

    db["presence"].create(
        {"thing_id": str, "state": str, "ts": float, "transport": str},
        pk="thing_id",
        if_not_exists=True,
    )
    # Device twin: what the operator wants (NULL: inherit the fleet default), what the device
    # reported, and what it has already fetched.
    db["thing_state"].create(
        {
            "thing_id": str,
            "reg_id": str,
            "update_rate": int,
            "app_param": str,
            "data": str,
            "package_url": str,
            "package_version": int,
            "reported_status": str,
            "reported_info": str,
            "reported_ts": float,
            "reported_transport": str,
            "running_version": int,
            "fetched_config": str,
        },
        pk="thing_id",
        foreign_keys=[("thing_id", "things", "id")],
        if_not_exists=True,
    )
    db["thing_state"].create_index(["reg_id"], unique=True, if_not_exists=True)
    db["fleet_defaults"].create(
        {
            "owner_id": str,
            "thing_type": str,
            "update_rate": int,
            "app_param": str,
            "data": str,
            "package_url": str,
            "package_version": int,
        },
        pk=("owner_id", "thing_type"),
        foreign_keys=[("owner_id", "users", "id")],
        if_not_exists=True,
    )
    # Messages to publish on the broker, written in the same transaction as the change that
    # causes them; the running server drains it (also when another process, the CLI, wrote it).
    conn.execute(
        """CREATE TABLE IF NOT EXISTS outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            topic TEXT NOT NULL,
            payload BLOB NOT NULL,
            retain INTEGER NOT NULL
        )"""
    )
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
