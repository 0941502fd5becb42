"""Staged rollouts (issue #11, "beyond the document"): a version offered to a rollout profile's
devices wave by wave, stopping itself when too many fail.

At creation the profile's devices are fixed and put in a stable order (by SHA-256 of the thing
id: the same devices lead every rollout, a canary cohort), and each gets its wave from the
cumulative percentages. Only devices of released waves are offered the version (see
upgrades.offers.offer); releasing a wave tells them (notify). The current wave ends when all its devices
have reported (SUCCESS, FAILED or ABORTED for the version) or its timeout passed; then its failure
ratio (FAILED + ABORTED over reported) decides: within the threshold the next wave is released (or
the rollout is completed, and the version is offered to the whole profile), above it the rollout
stops and no further device is offered the version. Failures that already exceed the threshold
of the whole wave stop it at once. Every change is published retained on `rollouts/{id}/state`.

Evaluation runs in the transaction that appends a device's results, and on a timer owned by the
core (`start`/`stop`) for timeouts; `advance(now)` is that timer's step, callable with any clock."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import sqlite3
from typing import Any

import orjson

from bridge.core import ids, topics
from bridge.core.background import Background
from bridge.core.errors import Conflict, Invalid, NotFound
from bridge.core.listing import ListQuery, Record
from bridge.core.messages import Messages
from bridge.core.outbox import Outbox, enqueue, restoring
from bridge.core.upgrades.catalog import list_owned, profile_row, software_row, software_version
from bridge.core.upgrades.fields import TERMINAL, as_object, key_field, text_field
from bridge.core.upgrades.hooks import offers_changed
from bridge.core.upgrades.offers import notify_device, publish_all_notices
from bridge.store import Store

RUNNING, PAUSED, STOPPED, COMPLETED = "running", "paused", "stopped", "completed"
ROLLOUT_FIELDS = (
    "softwareName",
    "versionNumber",
    "rolloutProfileId",
    "waves",
    "errorThreshold",
    "waveTimeout",
)
DOC_FIELDS = ("id", *ROLLOUT_FIELDS, "state", "wave", "reason", "counts", "created", "updated")
MAX_WAVES = 20
MAX_WAVE_TIMEOUT = 366 * 24 * 3600


# ---- pure rules --------------------------------------------------------------------------------
def wave_order(thing_ids: list[str]) -> list[str]:
    return sorted(thing_ids, key=lambda t: (hashlib.sha256(t.encode()).digest(), t))


def wave_sizes(waves: list[float], total: int) -> list[int]:
    """Cumulative device counts of the waves (a percentage that reaches a device includes it)."""
    return [math.ceil(p * total / 100 - 1e-9) for p in waves]


def waves_of(thing_ids: list[str], waves: list[float]) -> dict[str, int]:
    """thing id -> its wave (0-based)."""
    ordered = wave_order(thing_ids)
    sizes = wave_sizes(waves, len(ordered))
    return {t: next(w for w, size in enumerate(sizes) if i < size) for i, t in enumerate(ordered)}


def parse_waves(value: Any) -> list[float]:
    if (
        not isinstance(value, list)
        or not 1 <= len(value) <= MAX_WAVES
        or not all(isinstance(p, int | float) and not isinstance(p, bool) for p in value)
        or any(not 0 < p <= 100 for p in value)
        or any(a >= b for a, b in itertools.pairwise(value))
        or value[-1] != 100
    ):
        raise Invalid(
            f"waves must be 1-{MAX_WAVES} increasing cumulative percentages of the targeted devices,"
            " each above 0, the last 100, e.g. [10, 50, 100]"
        )
    return [float(p) for p in value]


def _number(body: dict[str, Any], key: str, low: float, high: float, low_open: bool) -> float:
    value = body.get(key)
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not (low < value if low_open else low <= value)
        or value > high
    ):
        raise Invalid(f"{key} is required: a number {'above' if low_open else 'from'} {low:g} up to {high:g}")
    return float(value)


# ---- evaluation (inside a transaction) ---------------------------------------------------------
def _outcomes(conn: sqlite3.Connection, rollout: sqlite3.Row) -> list[sqlite3.Row]:
    """Each device of the rollout with its wave and its latest terminal result for the version."""
    return conn.execute(
        "SELECT d.thing_id, d.wave, (SELECT u.status FROM upgrade_results u WHERE u.thing_id = d.thing_id"
        " AND u.software_name = s.name AND u.version_number = v.version_number"
        f" AND u.status IN ({','.join('?' * len(TERMINAL))}) ORDER BY u.seq DESC LIMIT 1) AS outcome"
        " FROM rollout_devices d JOIN rollouts r ON r.id = d.rollout_id"
        " JOIN software_versions v ON v.pk = r.version_pk JOIN software s ON s.pk = v.software_pk"
        " WHERE d.rollout_id = ?",
        (*TERMINAL, rollout["id"]),
    ).fetchall()


def _row(conn: sqlite3.Connection, rollout_id: str) -> sqlite3.Row:
    return conn.execute("SELECT * FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()


def _doc(conn: sqlite3.Connection, rollout: sqlite3.Row) -> Record:
    names = conn.execute(
        "SELECT s.name, v.version_number, p.id AS profile_id FROM software_versions v"
        " JOIN software s ON s.pk = v.software_pk, rollout_profiles p WHERE v.pk = ? AND p.pk = ?",
        (rollout["version_pk"], rollout["profile_pk"]),
    ).fetchone()
    outcomes = _outcomes(conn, rollout)
    offered = [o for o in outcomes if o["wave"] <= rollout["wave"]]
    succeeded = sum(o["outcome"] == "SUCCESS" for o in offered)
    failed = sum(o["outcome"] in ("FAILED", "ABORTED") for o in offered)
    return {
        "id": rollout["id"],
        "softwareName": names["name"],
        "versionNumber": names["version_number"],
        "rolloutProfileId": names["profile_id"],
        "waves": orjson.loads(rollout["waves"]),
        "errorThreshold": rollout["error_threshold"],
        "waveTimeout": rollout["wave_timeout"],
        "state": rollout["state"],
        "wave": rollout["wave"] + 1,  # 1-based: the wave released last
        "reason": rollout["reason"],
        "counts": {
            "targeted": len(outcomes),
            "offered": len(offered),
            "succeeded": succeeded,
            "failed": failed,
            "pending": len(offered) - succeeded - failed,
        },
        "created": ids.iso(rollout["created"]),
        "updated": ids.iso(rollout["updated"]),
    }


def _publish(conn: sqlite3.Connection, rollout_id: str) -> None:
    enqueue(
        conn, topics.rollout_state(rollout_id), orjson.dumps(_doc(conn, _row(conn, rollout_id))), retain=True
    )


def _set(conn: sqlite3.Connection, rollout_id: str, now: float, **columns: Any) -> None:
    assignments = ", ".join(f"{column} = ?" for column in columns)
    conn.execute(
        f"UPDATE rollouts SET {assignments}, updated = ? WHERE id = ?", (*columns.values(), now, rollout_id)
    )


def _release(conn: sqlite3.Connection, rollout: sqlite3.Row, wave: int) -> list[str]:
    """Tell the devices of a newly released wave; the things told."""
    software = conn.execute(
        "SELECT s.* FROM software s JOIN software_versions v ON v.software_pk = s.pk WHERE v.pk = ?",
        (rollout["version_pk"],),
    ).fetchone()
    members = conn.execute(
        "SELECT thing_id FROM rollout_devices WHERE rollout_id = ? AND wave = ? ORDER BY thing_id",
        (rollout["id"], wave),
    ).fetchall()
    return [
        m["thing_id"] for m in members if notify_device(conn, m["thing_id"], rollout["owner_id"], software)
    ]


def evaluate(conn: sqlite3.Connection, rollout_id: str, now: float) -> list[str]:
    """Move a running rollout on as far as its results and clock allow; publishes its state.
    Returns the things newly told of the version."""
    told: list[str] = []
    while True:
        rollout = _row(conn, rollout_id)
        if rollout["state"] != RUNNING:
            break
        wave = rollout["wave"]
        current = [o for o in _outcomes(conn, rollout) if o["wave"] == wave]
        reported = [o for o in current if o["outcome"] is not None]
        failed = sum(o["outcome"] in ("FAILED", "ABORTED") for o in reported)
        threshold = rollout["error_threshold"]
        if current and failed / len(current) > threshold:  # whatever the rest report: above
            _set(
                conn, rollout_id, now, state=STOPPED, reason=_too_many(wave, failed, len(current), threshold)
            )
            break
        if len(reported) < len(current) and now < rollout["wave_started"] + rollout["wave_timeout"]:
            break
        if reported and failed / len(reported) > threshold:
            _set(
                conn, rollout_id, now, state=STOPPED, reason=_too_many(wave, failed, len(reported), threshold)
            )
            break
        if wave + 1 >= len(orjson.loads(rollout["waves"])):
            _set(conn, rollout_id, now, state=COMPLETED)
            break
        _set(conn, rollout_id, now, wave=wave + 1, wave_started=now)
        told += _release(conn, _row(conn, rollout_id), wave + 1)
    _publish(conn, rollout_id)
    return told


def _too_many(wave: int, failed: int, of: int, threshold: float) -> str:
    return f"wave {wave + 1}: {failed} of {of} devices failed, above the error threshold {threshold:g}"


class Rollouts(Background):
    step = "rollout timer step"

    def __init__(self, store: Store, outbox: Outbox, messages: Messages, tick: float = 1.0) -> None:
        self.store = store
        self.outbox = outbox
        self.messages = messages
        self.tick = tick  # seconds between timeout checks
        self._owners: dict[str, str] = {}  # rollout id -> owner, for per-delivery tenancy checks

    async def create(self, owner_id: str, body: Any, now: float | None = None) -> Record:
        """POST /v2/rollouts: the first wave is released (and told) at once."""
        body = as_object(body, ROLLOUT_FIELDS, "rollout")
        name = text_field(body, "softwareName", required=True) or ""
        number = text_field(body, "versionNumber", required=True) or ""
        profile_id = text_field(body, "rolloutProfileId", required=True) or ""
        waves = parse_waves(body.get("waves"))
        threshold = _number(body, "errorThreshold", 0, 1, low_open=False)
        timeout = _number(body, "waveTimeout", 0, MAX_WAVE_TIMEOUT, low_open=True)
        rollout_id = ids.new_id()

        def create(conn: sqlite3.Connection) -> tuple[Record, list[str]]:
            version = software_version(conn, software_row(conn, owner_id, name), number)
            profile = profile_row(conn, owner_id, profile_id)
            if not conn.execute(
                "SELECT 1 FROM version_profiles WHERE version_pk = ? AND profile_pk = ?",
                (version["pk"], profile["pk"]),
            ).fetchone():
                raise Invalid(f"version {number!r:.100} does not target rollout profile {profile_id!r:.100}")
            if conn.execute(
                "SELECT 1 FROM rollouts WHERE version_pk = ? AND profile_pk = ? AND state IN (?, ?)",
                (version["pk"], profile["pk"], RUNNING, PAUSED),
            ).fetchone():
                raise Conflict("a running or paused rollout of this version to this profile exists")
            members = [
                r["thing_id"]
                for r in conn.execute(
                    "SELECT d.thing_id FROM account_devices d JOIN upgrade_accounts a ON a.pk = d.account_pk"
                    " WHERE a.profile_pk = ?",
                    (profile["pk"],),
                )
            ]
            at = ids.now() if now is None else now
            conn.execute(
                "INSERT INTO rollouts (id, owner_id, version_pk, profile_pk, waves, error_threshold, wave_timeout,"
                " state, wave, wave_started, created, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    rollout_id,
                    owner_id,
                    version["pk"],
                    profile["pk"],
                    orjson.dumps(waves).decode(),
                    threshold,
                    timeout,
                    RUNNING,
                    0,
                    at,
                    at,
                    at,
                ),
            )
            placed = waves_of(members, waves)
            conn.executemany(
                "INSERT INTO rollout_devices (rollout_id, thing_id, wave) VALUES (?,?,?)",
                [(rollout_id, t, w) for t, w in placed.items()],
            )
            for thing_id in sorted(t for t, w in placed.items() if w > 0):
                offers_changed(conn, thing_id)  # held back from now on (a version it may have been offered)
            told = _release(conn, _row(conn, rollout_id), 0) + evaluate(conn, rollout_id, at)
            return _doc(conn, _row(conn, rollout_id)), told

        doc, told = await self.outbox.write(create)
        self._owners[rollout_id] = owner_id
        self.messages.wake(told)
        return doc

    async def get(self, owner_id: str, rollout_id: str) -> Record:
        return await self.store.read(lambda c: _doc(c, _owned(c, owner_id, rollout_id)))

    async def list(self, owner_id: str, query: ListQuery) -> tuple[int, list[Record]]:
        sql = "SELECT * FROM rollouts WHERE owner_id = ? ORDER BY created, id"
        return await list_owned(self.store, query, DOC_FIELDS, sql, owner_id, _doc)

    async def pause(self, owner_id: str, rollout_id: str) -> Record:
        return await self._transition(owner_id, rollout_id, (RUNNING,), PAUSED)

    async def resume(self, owner_id: str, rollout_id: str) -> Record:
        """The current wave's timeout starts again."""
        return await self._transition(owner_id, rollout_id, (PAUSED,), RUNNING)

    async def cancel(self, owner_id: str, rollout_id: str) -> Record:
        """Stopped for good: the devices already offered the version keep the offer, no more."""
        return await self._transition(owner_id, rollout_id, (RUNNING, PAUSED), STOPPED)

    async def _transition(
        self, owner_id: str, rollout_id: str, sources: tuple[str, ...], target: str
    ) -> Record:
        def change(conn: sqlite3.Connection) -> tuple[Record, list[str]]:
            rollout = _owned(conn, owner_id, rollout_id)
            if rollout["state"] not in sources:
                raise Conflict(
                    f"rollout is {rollout['state']}; only a {' or '.join(sources)} one can become {target}"
                )
            now = ids.now()
            extra = (
                {"wave_started": now}
                if target == RUNNING
                else {"reason": "cancelled"}
                if target == STOPPED
                else {}
            )
            _set(conn, rollout_id, now, state=target, **extra)
            told = evaluate(conn, rollout_id, now)
            return _doc(conn, _row(conn, rollout_id)), told

        doc, told = await self.outbox.write(change)
        self.messages.wake(told)
        return doc

    # ---- engine --------------------------------------------------------------------------------
    def on_results(self, conn: sqlite3.Connection, thing_id: str) -> list[str]:
        """upgrades.hooks.ResultsHook: the rollouts the device is in move on (and publish new counts)."""
        told: list[str] = []
        for row in conn.execute(
            "SELECT rollout_id FROM rollout_devices WHERE thing_id = ?", (thing_id,)
        ).fetchall():
            told += evaluate(conn, row["rollout_id"], ids.now())
        return told

    async def advance(self, now: float | None = None) -> int:
        """Evaluate every running rollout at `now` (default: the clock): waves whose timeout has
        passed end. Returns how many rollouts changed state or wave."""

        def step(conn: sqlite3.Connection) -> tuple[int, list[str]]:
            at = ids.now() if now is None else now
            due = conn.execute(
                "SELECT id, state, wave FROM rollouts WHERE state = ? AND wave_started + wave_timeout <= ?",
                (RUNNING, at),
            ).fetchall()
            told = [t for r in due for t in evaluate(conn, r["id"], at)]
            changed = sum(
                (r["state"], r["wave"])
                != tuple(conn.execute("SELECT state, wave FROM rollouts WHERE id = ?", (r["id"],)).fetchone())
                for r in due
            )
            return changed, told

        changed, told = await self.outbox.write(step)
        self.messages.wake(told)
        return changed

    async def republish(self) -> None:
        """At start-up the broker holds no retained messages: every rollout's state and every
        pending notify document again."""

        def queue_all(conn: sqlite3.Connection) -> None:
            for row in conn.execute("SELECT id FROM rollouts ORDER BY created").fetchall():
                _publish(conn, row["id"])
            publish_all_notices(conn)

        await self.outbox.write(restoring(queue_all))

    async def owner_of(self, rollout_id: str) -> str | None:
        owner = self._owners.get(rollout_id)
        if owner is None:
            row = await self.store.read(
                lambda c: c.execute("SELECT owner_id FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
            )
            if row is None:
                return None
            owner = self._owners[rollout_id] = row["owner_id"]  # ids are never reused
        return owner

    async def _run(self) -> None:
        """The serving process's timer (started after the outbox): re-publish, then check timeouts."""
        await self.republish()
        while True:
            await asyncio.sleep(self.tick)
            try:
                await self.advance()
            except Exception as exc:  # try again on the next tick; a broken row must not stop it
                self.failed(exc)
            else:
                self.succeeded()


def _owned(conn: sqlite3.Connection, owner_id: str, rollout_id: str) -> sqlite3.Row:
    key_field(rollout_id, "rollout id")
    row = conn.execute(
        "SELECT * FROM rollouts WHERE id = ? AND owner_id = ?", (rollout_id, owner_id)
    ).fetchone()
    if row is None:
        raise NotFound(f"rollout {rollout_id!r:.100} not found")
    return row
