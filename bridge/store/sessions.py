"""Persistent MQTT sessions in SQL (tables of migration `mqtt_sessions`): a session, its
subscriptions, and a row per QoS 1 message routed to it until its PUBACK. A message's state is its
row: packet_id NULL = queued, set = sent and awaiting that PUBACK; acknowledged = deleted, so
nothing is kept that a restart could deliver again. A thing's or application's sessions go with it
(ON DELETE CASCADE), in the transaction that deletes it."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field

# (client id, topic, payload, qos) of one message for one session
Delivery = tuple[str, str, bytes, int]


@dataclass
class StoredSession:
    client_id: str
    principal: bytes
    disconnected: float
    subscriptions: list[tuple[str, int]] = field(default_factory=list)
    # (seq, topic, payload, qos, packet_id) in seq order
    messages: list[tuple[int, str, bytes, int, int | None]] = field(default_factory=list)


def save(
    conn: sqlite3.Connection,
    client_id: str,
    owner: tuple[str | None, str | None],
    principal: bytes,
) -> None:
    """The session is connected (disconnected NULL); created with no subscriptions if new.
    `owner`: (thing id, None) of a thing's session, or (None, application name)."""
    thing_id, app_name = owner
    conn.execute(
        "INSERT INTO mqtt_sessions (client_id, thing_id, app_name, principal, disconnected)"
        " VALUES (?,?,?,?,NULL) ON CONFLICT (client_id) DO UPDATE SET"
        " principal = excluded.principal, disconnected = NULL",
        (client_id, thing_id, app_name, principal),
    )


def disconnected(conn: sqlite3.Connection, client_id: str, ts: float) -> None:
    conn.execute("UPDATE mqtt_sessions SET disconnected = ? WHERE client_id = ?", (ts, client_id))


def delete(conn: sqlite3.Connection, client_id: str) -> None:
    conn.execute("DELETE FROM mqtt_sessions WHERE client_id = ?", (client_id,))


def subscribe(conn: sqlite3.Connection, client_id: str, topic_filter: str, qos: int) -> None:
    conn.execute(
        "INSERT INTO mqtt_subscriptions (client_id, topic_filter, qos) SELECT ?,?,? WHERE EXISTS"
        " (SELECT 1 FROM mqtt_sessions WHERE client_id = ?)"
        " ON CONFLICT (client_id, topic_filter) DO UPDATE SET qos = excluded.qos",
        (client_id, topic_filter, qos, client_id),
    )


def unsubscribe(conn: sqlite3.Connection, client_id: str, topic_filters: list[str]) -> None:
    conn.executemany(
        "DELETE FROM mqtt_subscriptions WHERE client_id = ? AND topic_filter = ?",
        [(client_id, f) for f in topic_filters],
    )


def enqueue(conn: sqlite3.Connection, deliveries: list[Delivery]) -> dict[str, int]:
    """A row per delivery, queued; client id -> its row's seq (none for a session deleted since)."""
    seqs: dict[str, int] = {}
    for client_id, topic, payload, qos in deliveries:
        row = conn.execute(
            "INSERT INTO mqtt_queue (client_id, topic, payload, qos) SELECT ?,?,?,? WHERE EXISTS"
            " (SELECT 1 FROM mqtt_sessions WHERE client_id = ?) RETURNING seq",
            (client_id, topic, payload, qos, client_id),
        ).fetchone()
        if row is not None:
            seqs[client_id] = row[0]
    return seqs


def sent(conn: sqlite3.Connection, seq: int, packet_id: int) -> None:
    conn.execute("UPDATE mqtt_queue SET packet_id = ? WHERE seq = ?", (packet_id, seq))


def remove(conn: sqlite3.Connection, seq: int) -> None:
    """Acknowledged, or dropped from a full queue."""
    conn.execute("DELETE FROM mqtt_queue WHERE seq = ?", (seq,))


def load(conn: sqlite3.Connection, now: float, expiry: float) -> list[StoredSession]:
    """At start-up: a session connected when the process ended is disconnected now; one
    disconnected for longer than `expiry` seconds is deleted; the others, in full. A thing's
    session whose credential was re-issued since stays (a deleted thing's went with it): it is the
    same thing's, resumed only by a connection with its current certificate."""
    conn.execute("UPDATE mqtt_sessions SET disconnected = ? WHERE disconnected IS NULL", (now,))
    conn.execute("DELETE FROM mqtt_sessions WHERE disconnected < ?", (now - expiry,))
    sessions = {
        r[0]: StoredSession(r[0], bytes(r[1]), r[2])
        for r in conn.execute("SELECT client_id, principal, disconnected FROM mqtt_sessions")
    }
    for r in conn.execute("SELECT client_id, topic_filter, qos FROM mqtt_subscriptions"):
        sessions[r[0]].subscriptions.append((r[1], r[2]))
    for r in conn.execute(
        "SELECT client_id, seq, topic, payload, qos, packet_id FROM mqtt_queue ORDER BY client_id, seq"
    ):
        sessions[r[0]].messages.append((r[1], r[2], bytes(r[3]), r[4], r[5]))
    return list(sessions.values())
