"""Retention: one pass over old messages, on SQLite and on PostgreSQL, through the bridge's store.

    PYTHONPATH=. python scripts/bench_retention.py [--rows 100000] [--things 1000]

For each case a new store (the SQLite file with synchronous FULL; a PostgreSQL 15 of the tests' own
with fsync on), `--rows` messages of 100 bytes spread over `--things` things, then one
bridge/core/retention.py pass with retention 1 day, timed (wall, this process's CPU, and for
the batched deletes each batch's time in the store's writer, median and p99):
  sqlite      rows three days old: deleted in batches of 200 through the writer
  pg-delete   the same on PostgreSQL: rows of a day without its partition, in the default one
  pg-drop     rows of today on PostgreSQL, the pass's clock two days on: today's partition dropped
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bridge.core import ids
from bridge.core import retention as retention_module
from bridge.core.retention import DAY, Retention
from bridge.store import Store, create
from tests.postgres import PostgresServer, postgres_bin


def seed(conn: Any, things: int) -> None:
    conn.execute(
        "INSERT INTO users (id, username, password_hash, role, created) VALUES ('u', 'u', 'x', 'user', 0)"
    )
    conn.executemany(
        "INSERT INTO things (id, owner_id, cert_pem, cert_id, created) VALUES (?, 'u', '', ?, 0)",
        [(f"t{i}", f"c{i}") for i in range(things)],
    )


def messages(conn: Any, start: int, count: int, things: int, ts: float) -> None:
    conn.executemany(
        "INSERT INTO messages (id, thing_id, owner_id, type, ts, encoding, payload, transport)"
        " VALUES (?,?,?,?,?,?,?,?)",
        [
            (ids.message_id(ts), f"t{i % things}", "u", "ingress", ts, "text", b"x" * 100, "mqtt")
            for i in range(start, start + count)
        ],
    )


async def case(name: str, store: Store, rows: int, things: int, age: float, clock: float) -> None:
    store.open()
    try:
        await store.write(seed, things)
        for start in range(0, rows, 10_000):
            await store.write(messages, start, min(10_000, rows - start), things, time.time() - age)
        batches: list[float] = []
        prune_batch = retention_module.prune_batch

        def timed(conn: Any, *args: Any) -> Any:
            began = time.perf_counter()
            try:
                return prune_batch(conn, *args)
            finally:
                batches.append(time.perf_counter() - began)

        retention_module.prune_batch = timed  # type: ignore[assignment]
        try:
            pass_ = Retention(store, 1, clock=lambda: time.time() + clock)
            began, cpu = time.perf_counter(), time.process_time()
            deleted = await pass_.prune()
            wall, cpu = time.perf_counter() - began, time.process_time() - cpu
        finally:
            retention_module.prune_batch = prune_batch  # type: ignore[assignment]
        batches.sort()
        per_batch = (
            f"; {len(batches)} batches, {statistics.median(batches) * 1000:.1f} ms median,"
            f" {batches[int(len(batches) * 0.99)] * 1000:.1f} ms p99 in the writer"
            if len(batches) > 1
            else ""
        )
        print(f"{name:10} {deleted:>9,} rows in {wall:6.2f} s, bridge CPU {cpu:.2f} s{per_batch}", flush=True)
    finally:
        await asyncio.to_thread(store.close)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--things", type=int, default=1000)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-retention-"))
    await case("sqlite", create("sqlite:", folder / "db.sqlite", "FULL"), args.rows, args.things, 3 * DAY, 0)
    bindir = postgres_bin()
    if bindir is None:
        sys.exit("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    server = PostgresServer(bindir, fsync=True)
    server.start()
    try:
        for name, age, clock in (("pg-delete", 10 * DAY, 0), ("pg-drop", 0, 2 * DAY)):
            await case(
                name, create(server.new_database(), folder / "unused"), args.rows, args.things, age, clock
            )
    finally:
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())
