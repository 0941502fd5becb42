"""History: one-hour windows out of 1,000,000 stored messages, through the real HTTP server.

    python scripts/bench_history.py [--messages 1000000] [--interval 1.0] [--others 200000]
                                    [--calls 30] [--json [FILE]] [--keep DIR]

1. Create the bridge's data directory and schema with the bridge's own core (user `bench`, one
   thing `hist-00000` plus `--other-things` others).
2. Insert `--messages` messages for hist-00000 (one every `--interval` s, ending a minute ago) and
   `--others` messages spread over the other things in the same period, in time order, with
   sqlite3 executemany straight into the bridge's `messages` table (100-byte JSON payloads).
3. Start `thingbridge serve` on that directory, log in as the owner (GET /dev/v1/token), then time,
   one request at a time from this process (the server is its own process):
     GET /dev/v1/things/hist-00000/messages?startts=S&endts=S+3599
     GET /dev/v1/things/hist-00000/archive?startts=S&endts=S+3599
   for `--calls` random one-hour windows each (after `--warmup` calls), median and p99.
   The same SELECT run directly on the file (read-only) shows how much of that is SQLite.
Target: a one-hour window in under 50 ms. `--keep DIR` keeps (and on the next run reuses) the data.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import bench_common as bc
import orjson

MAIN = "hist-00000"
HOUR = 3600


def insert_history(fleet: bc.Fleet, a: argparse.Namespace) -> dict[str, Any]:
    """Bulk-load messages in time order (seq follows ts, as when the bridge writes them)."""
    end = time.time() - 60
    start = end - a.messages * a.interval
    others = [tid for tid, _pem in fleet.things[1:]]
    rng = random.Random(a.seed)
    conn = sqlite3.connect(fleet.db_path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=OFF")
        owner = conn.execute("SELECT id FROM users WHERE username = ?", (bc.USER,)).fetchone()[0]

        def main_ts() -> Iterator[tuple[float, str]]:
            for i in range(a.messages):
                yield start + i * a.interval, MAIN

        other_ts = sorted(rng.uniform(start, end) for _ in range(a.others if others else 0))

        def others_ts() -> Iterator[tuple[float, str]]:
            for i, ts in enumerate(other_ts):
                yield ts, others[i % len(others)]

        def rows() -> Iterator[tuple[Any, ...]]:
            pad = b"x" * 40
            for n, (ts, tid) in enumerate(heapq.merge(main_ts(), others_ts())):
                payload = b'{"temp":%.2f,"hum":%d,"n":%d,"pad":"%s"}' % (20 + (n % 100) / 10, n % 100, n, pad)
                yield (str(uuid.uuid4()), tid, owner, "ingress", ts, "json", payload[:100], "mqtt")

        t = time.time()
        it = rows()
        total = 0
        while True:
            chunk = [row for _, row in zip(range(50000), it, strict=False)]
            if not chunk:
                break
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO messages (id, thing_id, owner_id, type, ts, encoding, payload, transport)"
                " VALUES (?,?,?,?,?,?,?,?)",
                chunk,
            )
            conn.execute("COMMIT")
            total += len(chunk)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        took = time.time() - t
    finally:
        conn.close()
    return {
        "rows": total,
        "insert_s": round(took, 1),
        "insert_rows_per_s": round(total / took),
        "start": start,
        "end": end,
        "db_mib": round(fleet.db_path.stat().st_size / 2**20, 1),
    }


def bridge_sql(q_start: int, q_end: int, limit: int) -> tuple[str, tuple[Any, ...]]:
    """The SELECT bridge/core/messages.py runs for a window (see _where and _select there)."""
    return (
        "SELECT * FROM messages WHERE thing_id = ? AND ts >= ? AND ts < ? ORDER BY seq LIMIT ?",
        (MAIN, q_start, q_end + 1, limit),
    )


def direct_sql(db: Path, windows: list[int]) -> dict[str, Any]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        sql, args = bridge_sql(windows[0], windows[0] + HOUR - 1, 10000)
        plan = [row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, args)]
        times, counts = [], []
        for s in windows:
            sql, args = bridge_sql(s, s + HOUR - 1, 10000)
            t = time.perf_counter()
            counts.append(len(conn.execute(sql, args).fetchall()))
            times.append(time.perf_counter() - t)
    finally:
        conn.close()
    return {
        "query_plan": plan,
        "rows_median": bc.median(counts),
        "median_ms": bc.rnd(1000 * (bc.percentile(times, 50) or 0)),
        "p99_ms": bc.rnd(1000 * (bc.percentile(times, 99) or 0)),
    }


async def time_http(port: int, windows: list[int], warmup: int) -> list[dict[str, Any]]:
    base = f"http://{bc.HOST}:{port}/dev/v1"
    out = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        async with s.get(f"{base}/token", headers=bc.basic_auth(bc.USER, bc.USER_PASSWORD)) as r:
            token = (await r.json())["accessToken"]
        headers = {"Authorization": f"Bearer {token}"}
        for endpoint in ("messages", "archive"):
            times, counts, sizes, errors = [], [], [], 0
            for n, start in enumerate(windows):  # the first `warmup` are not timed
                url = f"{base}/things/{MAIN}/{endpoint}?startts={start}&endts={start + HOUR - 1}"
                t = time.perf_counter()
                async with s.get(url, headers=headers) as r:
                    body = await r.read()
                    status = r.status
                took = time.perf_counter() - t
                if n < warmup:
                    continue
                if status != 200:
                    errors += 1
                    continue
                times.append(took)
                sizes.append(len(body))
                if endpoint == "messages":
                    counts.append(len(orjson.loads(body)["result"]))
            out.append(
                {
                    "endpoint": f"GET .../{endpoint}",
                    "calls": len(times),
                    "errors": errors,
                    "rows_per_window": bc.median(counts) if counts else None,
                    "response_kib": bc.rnd(bc.median(sizes) / 1024, 1) if sizes else None,
                    "median_ms": bc.rnd(1000 * (bc.percentile(times, 50) or 0)),
                    "p99_ms": bc.rnd(1000 * (bc.percentile(times, 99) or 0)),
                    "max_ms": bc.rnd(1000 * max(times)) if times else None,
                }
            )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=1_000_000, help="messages of the measured thing")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between its messages")
    ap.add_argument("--others", type=int, default=200_000, help="messages of the other things")
    ap.add_argument("--other-things", type=int, default=9)
    ap.add_argument("--calls", type=int, default=30, help="timed calls per endpoint")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--max-seconds", type=float, default=1200, help="hard bound of the whole bench")
    bc.add_output_args(ap)
    a = ap.parse_args()
    bc.install_watchdog(a.max_seconds)
    work = a.keep or Path(tempfile.mkdtemp(prefix="bench-history-"))
    marker = work / "history.json"
    params = {k: getattr(a, k) for k in ("messages", "interval", "others", "other_things", "seed")}
    doc: dict[str, Any] = {
        "bench": "history",
        "machine": bc.machine(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
    }
    server = None
    try:
        reuse = marker.exists() and orjson.loads(marker.read_bytes()).get("params") == params
        if reuse:
            loaded = orjson.loads(marker.read_bytes())["loaded"]
            fleet = bc.Fleet(work / "bridge", work / "bridge" / "broker.yaml")
            print(f"reusing {loaded['rows']:,} messages in {fleet.db_path}")
        else:
            shutil.rmtree(work / "bridge", ignore_errors=True)
            fleet = bc.provision(work / "bridge", 1 + a.other_things, prefix="hist")
            loaded = insert_history(fleet, a)
            marker.write_bytes(orjson.dumps({"params": params, "loaded": loaded}))
            print(
                f"inserted {loaded['rows']:,} messages in {loaded['insert_s']} s"
                f" ({loaded['insert_rows_per_s']:,} rows/s); database {loaded['db_mib']} MiB"
            )
        doc["loaded"] = loaded
        rng = random.Random(a.seed)
        lo, hi = int(loaded["start"]) + 1, int(loaded["end"]) - HOUR
        windows = [rng.randint(lo, hi) for _ in range(a.calls + a.warmup)]
        server, ports = bc.start_bridge(fleet, timeout=300)
        bc.wait_outbox_empty(fleet.db_path)
        bc.wait_cpu_quiet(server.pid, timeout=30)
        mon = bc.Monitor(server.pid).start()
        rows = asyncio.run(time_http(ports["http"], windows, a.warmup))
        doc["server"] = mon.stop()
        direct = direct_sql(fleet.db_path, windows[a.warmup :])
        rows.append(
            {
                "endpoint": "(SQLite SELECT only, same windows)",
                "calls": len(windows) - a.warmup,
                "rows_per_window": direct["rows_median"],
                "median_ms": direct["median_ms"],
                "p99_ms": direct["p99_ms"],
            }
        )
        doc["results"], doc["query_plan"] = rows, direct["query_plan"]
        print(
            f"\nHistory: one-hour windows of {MAIN} ({a.messages:,} messages, one per {a.interval:g} s) among"
            f" {loaded['rows']:,} rows; sequential calls; machine: {os.cpu_count()} cores, shared"
        )
        print(
            bc.table(
                rows,
                [
                    ("endpoint", "endpoint"),
                    ("calls", "calls"),
                    ("rows_per_window", "rows/window"),
                    ("response_kib", "KiB"),
                    ("median_ms", "median ms"),
                    ("p99_ms", "p99 ms"),
                    ("max_ms", "max ms"),
                ],
            )
        )
        print("SQLite plan of the window query: " + " | ".join(direct["query_plan"]))
        doc["verdicts"] = []
        for r in rows[:2]:
            for stat in ("median", "p99"):
                doc["verdicts"].append(
                    bc.verdict(
                        f"{r['endpoint']} one-hour window, {stat}",
                        r[f"{stat}_ms"],
                        50,
                        "ms",
                        lower_is_better=True,
                    )
                )
        print("targets:")
        bc.print_verdicts(doc["verdicts"])
        bc.emit_json(a, doc)
    finally:
        if server is not None:
            server.stop()
        bc.finish(work, a.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
