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


def prune_batch(
    conn: sqlite3.Connection, table: str, after: int, cutoff: float, size: int
) -> tuple[int, int | None]:
    """Delete what is due among the `size` messages of `table` after seq `after` (in seq order,
    which is the order of arrival); (rows deleted, the window's last seq), or None for it when the
    window holds nothing older than the cutoff: the pass is over (what arrives later is younger)."""
    window = conn.execute(
        f"SELECT seq, ts FROM {table} WHERE seq > ? ORDER BY seq LIMIT ?", (after, size)
    ).fetchall()
    if not any(row[1] < cutoff for row in window):
        return 0, None
    last = window[-1][0]
    deleted = conn.execute(
        f"DELETE FROM {table} WHERE seq > ? AND seq <= ? AND ts < ?", (after, last, cutoff)
    ).rowcount
    return deleted, last


class Retention(Background):
    """Runs a pass at start and every `interval` seconds (days 0: only to make partitions ahead, on
    a store that has them). `clock` gives the time a pass measures age from (tests move it instead
    of waiting)."""

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
        """One pass: every message older than the retention is deleted; the count. On a store that
        partitions messages by day (PostgreSQL) the partitions of the coming days are made, those
        whose whole day is older are dropped, and rows are deleted only from its default partition:
        there a message goes with its day, between N and N + 1 days old."""
        now = self.clock()
        cutoff = now - self.days * DAY if self.days else None
        deleted = 0
        if self.store.rotate is not None:
            deleted = await self.store.write(self.store.rotate, now, cutoff)
            self.pruned += deleted
        after = 0
        while cutoff is not None:
            count, last = await self.store.write(
                prune_batch, self.store.history_rows, after, cutoff, self.batch
            )
            deleted += count
            self.pruned += count
            if last is None:
                break
            after = last
        return deleted

    async def _run(self) -> None:
        if self.days == 0 and self.store.rotate is None:
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
