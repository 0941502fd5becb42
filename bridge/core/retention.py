"""Message retention (messages.retention_days): a background pass deletes the history older than
the retention, in small batches through the store's one writer, so device writes (and their
acknowledgements after commit) go on between two batches.

Nothing depends on a message row: no table references messages, a persistent MQTT session's queue
holds its own copy of each message (mqtt_queue), pending upgrades live in upgrade_notices, the
device twin in thing_state; and a cursor (`after=<id>`) naming a deleted message still works, its
id saying when it was stored (messages.Messages._cursor)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable

from bridge.core.background import Background
from bridge.core.messages import DAY
from bridge.store import Store

log = logging.getLogger("thingbridge.retention")

BATCH = 200  # rows a batch examines: one short write among the devices' (~5 ms on SQLite)
INTERVAL = 3600  # seconds between passes


def prune_batch(conn: sqlite3.Connection, after: int, cutoff: float, size: int) -> tuple[int, int | None]:
    """Delete what is due among the `size` messages after seq `after` (in seq order, which is the
    order of arrival); (rows deleted, the window's last seq), or None for it when the window holds
    nothing older than the cutoff: the pass is over (what arrives later is younger)."""
    window = conn.execute(
        "SELECT seq, ts FROM messages WHERE seq > ? ORDER BY seq LIMIT ?", (after, size)
    ).fetchall()
    if not any(row[1] < cutoff for row in window):
        return 0, None
    last = window[-1][0]
    deleted = conn.execute(
        "DELETE FROM messages WHERE seq > ? AND seq <= ? AND ts < ?", (after, last, cutoff)
    ).rowcount
    return deleted, last


class Retention(Background):
    """Runs a pass at start and every `interval` seconds (days 0: never). `clock` gives the time a
    pass measures age from (tests move it instead of waiting)."""

    step = "retention pass"

    def __init__(
        self,
        store: Store,
        days: int,
        *,
        clock: Callable[[], float] = time.time,
        batch: int = BATCH,
        interval: float = INTERVAL,
    ) -> None:
        self.store = store
        self.days = days
        self.clock = clock
        self.batch = batch
        self.interval = interval
        self.pruned = 0  # messages deleted since start (prunedMessages in /broker/stats)

    def stats(self) -> dict[str, int]:
        return {"prunedMessages": self.pruned}

    async def prune(self) -> int:
        """One pass: every message older than the retention is deleted; the count."""
        cutoff = self.clock() - self.days * DAY
        deleted, after = 0, 0
        while True:
            count, last = await self.store.write(prune_batch, after, cutoff, self.batch)
            deleted += count
            self.pruned += count
            if last is None:
                return deleted
            after = last

    async def _run(self) -> None:
        if self.days == 0:
            return
        while True:
            started = time.monotonic()
            try:
                deleted = await self.prune()
            except Exception as exc:  # the database away, say: the next pass goes on from the start
                self.failed(exc)
            else:
                self.succeeded()
                if deleted:
                    log.info(
                        "retention: deleted %d messages older than %d days in %.1f s (%d since start)",
                        deleted,
                        self.days,
                        time.monotonic() - started,
                        self.pruned,
                    )
            await asyncio.sleep(self.interval)
