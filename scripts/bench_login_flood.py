"""Login flood: what a legitimate login sees while wrong passwords pour in (issue #9 item 4).

    python scripts/bench_login_flood.py [--rounds 3] [--http 200] [--mqtt 100] [--json [FILE]]

Per round, a fresh `thingbridge serve` (so every round starts with no failures counted and nothing
remembered), 127.0.0.1 only:
1. the application `benchapp` connects once on the plain listener (it was running before the flood);
2. a flood process sends `--http` wrong Basic logins for `admin` to GET /dev/v1/token and `--mqtt`
   wrong passwords for `benchapp` to the plain MQTT listener, all at once, from 127.0.0.1;
3. once the flood's first answer is back (the rest still in flight), this process logs in as `bench`
   (right password, first login of that user), then again, one after the other, until the flood has
   ended; and reconnects `benchapp` likewise.
Reported: legitimate latencies (the first login, median and max of all), what the flood got (401 /
429, CONNACK codes), the flood's duration, server peak RSS (VmHWM: the kernel's exact high-water
mark) and CPU. Targets: legitimate login < 500 ms, server RSS < 200 MiB.
Every request has a timeout; `--max-seconds` bounds the whole bench; only the processes this bench
started are ended, by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import bench_common as bc

TIMEOUT = 120.0  # one request or CONNECT


async def mqtt_code(port: int, client_id: str, username: str, password: str) -> int:
    """The CONNACK return code of a CONNECT on the plain listener (then DISCONNECT when accepted)."""
    reader, writer = await asyncio.open_connection(bc.HOST, port)
    try:
        writer.write(bc.connect_packet(client_id, 60, username, password, True))
        conn = bc.Mqtt(reader, writer)
        packets = await conn.read_packets(1)
        if not packets or packets[0][0] != bc.CONNACK:
            return -1
        code = packets[0][2][1]
        if code == 0:
            writer.write(bc.DISCONNECT)
        return code
    finally:
        writer.close()


# ----------------------------------------------------------------------------------------------------
# the flood (its own process)
# ----------------------------------------------------------------------------------------------------
def flood_main(spec: dict[str, Any], start_evt: Any, flooding_evt: Any, result_q: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result_q.put(asyncio.run(_flood(spec, start_evt, flooding_evt)))
    except Exception as exc:
        result_q.put({"error": repr(exc)})


async def _flood(spec: dict[str, Any], start_evt: Any, flooding_evt: Any) -> dict[str, Any]:
    """Everything at once; `flooding_evt` is set at the first answer: the rest is still in flight."""
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as s:

        async def basic(i: int) -> tuple[int, bool]:
            headers = bc.basic_auth("admin", f"wrong-password-{i}")
            try:
                async with s.get(f"{spec['http']}/dev/v1/token", headers=headers) as r:
                    flooding_evt.set()
                    await r.read()
                    return r.status, "Retry-After" in r.headers
            except (aiohttp.ClientError, TimeoutError):
                return -1, False

        async def mqtt(i: int) -> int:
            try:
                return await asyncio.wait_for(
                    mqtt_code(spec["mqtt"], f"app:{bc.APP}:f{i}", bc.APP, f"wrong-{i}"), TIMEOUT
                )
            except (OSError, TimeoutError):
                return -1

        await asyncio.to_thread(start_evt.wait)
        t0 = time.perf_counter()
        http, codes = await asyncio.gather(
            asyncio.gather(*(basic(i) for i in range(spec["n_http"]))),
            asyncio.gather(*(mqtt(i) for i in range(spec["n_mqtt"]))),
        )
        return {
            "flood_s": round(time.perf_counter() - t0, 2),
            "http_status": dict(Counter(str(status) for status, _ in http)),
            "http_429_with_retry_after": sum(1 for status, ra in http if status == 429 and ra),
            "connack": dict(Counter(str(code) for code in codes)),
        }


# ----------------------------------------------------------------------------------------------------
# one round
# ----------------------------------------------------------------------------------------------------
async def legit_logins(http: str, flooding_evt: Any, done: asyncio.Event) -> list[float]:
    out: list[float] = []
    await asyncio.to_thread(flooding_evt.wait, TIMEOUT)
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        while not done.is_set() or not out:
            t0 = time.perf_counter()
            async with s.get(f"{http}/dev/v1/token", headers=bc.basic_auth(bc.USER, bc.USER_PASSWORD)) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"legitimate login answered {r.status}")
            out.append(time.perf_counter() - t0)
    return out


async def legit_connects(port: int, flooding_evt: Any, done: asyncio.Event) -> list[float]:
    out: list[float] = []
    await asyncio.to_thread(flooding_evt.wait, TIMEOUT)
    while not done.is_set() or not out:
        t0 = time.perf_counter()
        code = await asyncio.wait_for(mqtt_code(port, f"app:{bc.APP}:live", bc.APP, bc.APP_PASSWORD), TIMEOUT)
        if code != 0:
            raise RuntimeError(f"legitimate CONNECT answered CONNACK {code}")
        out.append(time.perf_counter() - t0)
    return out


async def admin_token(http: str) -> str:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as s,
        s.get(f"{http}/dev/v1/token", headers=bc.basic_auth("admin", bc.ADMIN_PASSWORD)) as r,
    ):
        return (await r.json())["accessToken"]


async def broker_stats(http: str, tok: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as s,
        s.get(f"{http}/dev/v1/broker/stats", headers={"Authorization": f"Bearer {tok}"}) as r,
    ):
        return (await r.json())["result"]


def one_round(a: argparse.Namespace, fleet: bc.Fleet) -> dict[str, Any]:
    server, ports = bc.start_bridge(fleet)
    flood = None
    try:
        http = f"http://{bc.HOST}:{ports['http']}"
        bc.wait_cpu_quiet(server.pid, timeout=30)
        rss_before = bc.proc_status_mib(server.pid, "VmHWM")
        tok = asyncio.run(admin_token(http))  # before the flood, whose victim is the admin
        if asyncio.run(mqtt_code(ports["mqtt_plain"], f"app:{bc.APP}", bc.APP, bc.APP_PASSWORD)) != 0:
            raise RuntimeError("benchapp could not connect before the flood")
        start_evt, flooding_evt, result_q = bc.MP.Event(), bc.MP.Event(), bc.MP.Queue()
        spec = {"http": http, "mqtt": ports["mqtt_plain"], "n_http": a.http, "n_mqtt": a.mqtt}
        flood = bc.spawn(flood_main, spec, start_evt, flooding_evt, result_q, name="flood")
        monitor = bc.Monitor(server.pid).start()

        async def measure() -> tuple[dict[str, Any], list[float], list[float]]:
            done = asyncio.Event()
            start_evt.set()

            async def flood_result() -> dict[str, Any]:
                try:
                    return await asyncio.to_thread(bc.get_q, result_q, a.max_seconds, "the flood")
                finally:
                    done.set()

            return await asyncio.gather(
                flood_result(),
                legit_logins(http, flooding_evt, done),
                legit_connects(ports["mqtt_plain"], flooding_evt, done),
            )

        flooded, logins, connects = asyncio.run(measure())
        usage = monitor.stop()
        stats = asyncio.run(broker_stats(http, tok))
        return {
            **flooded,
            "legit_login_first_ms": round(logins[0] * 1000, 1),
            "legit_login_median_ms": round(statistics.median(logins) * 1000, 1),
            "legit_login_max_ms": round(max(logins) * 1000, 1),
            "legit_logins": len(logins),
            "app_connect_median_ms": round(statistics.median(connects) * 1000, 1),
            "app_connect_max_ms": round(max(connects) * 1000, 1),
            "app_connects": len(connects),
            "server_rss_before_mib": round(rss_before, 1),
            "server_rss_peak_mib": round(bc.proc_status_mib(server.pid, "VmHWM"), 1),
            "server_cpu_s": usage["server_cpu_s"],
            "refused_by_reason": stats.get("refusedByReason"),
            "password_checks": stats.get("passwordChecks"),
        }
    finally:
        if flood is not None:
            bc.reap([flood])
        server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--http", type=int, default=200, help="wrong Basic logins (at most 2000)")
    ap.add_argument("--mqtt", type=int, default=100, help="wrong MQTT passwords (at most 1000)")
    ap.add_argument("--max-seconds", type=float, default=900, help="hard bound of the whole bench")
    bc.add_output_args(ap)
    a = ap.parse_args()
    if not (1 <= a.http <= 2000 and 1 <= a.mqtt <= 1000 and 1 <= a.rounds <= 20):
        ap.error("--http 1..2000, --mqtt 1..1000, --rounds 1..20")
    bc.install_watchdog(a.max_seconds)
    work = a.keep or Path(tempfile.mkdtemp(prefix="bench-flood-"))
    doc: dict[str, Any] = {"bench": "login_flood", "machine": bc.machine(), "args": vars(a) | {"keep": None}}
    try:
        fleet = bc.provision(work / "bridge", 0)
        rows = []
        for n in range(a.rounds):
            row = {"round": n + 1, **one_round(a, fleet)}
            print(
                f"round {row['round']}: flood {row['flood_s']} s, HTTP {row['http_status']}, CONNACK"
                f" {row['connack']}; legitimate login first {row['legit_login_first_ms']} ms, median"
                f" {row['legit_login_median_ms']} ms, max {row['legit_login_max_ms']} ms"
                f" ({row['legit_logins']}); app reconnect median {row['app_connect_median_ms']} ms, max"
                f" {row['app_connect_max_ms']} ms; RSS {row['server_rss_before_mib']} -> peak"
                f" {row['server_rss_peak_mib']} MiB; checks {row['password_checks']}",
                flush=True,
            )
            rows.append(row)
        doc["rounds"] = rows
        columns = [
            ("round", "round"),
            ("flood_s", "flood s"),
            ("legit_login_first_ms", "first login ms"),
            ("legit_login_median_ms", "login p50 ms"),
            ("legit_login_max_ms", "login max ms"),
            ("app_connect_median_ms", "app p50 ms"),
            ("app_connect_max_ms", "app max ms"),
            ("server_rss_before_mib", "RSS before MiB"),
            ("server_rss_peak_mib", "RSS peak MiB"),
            ("server_cpu_s", "server CPU s"),
        ]
        print()
        print(bc.table(rows, columns))
        worst_login = max(max(r["legit_login_max_ms"], r["app_connect_max_ms"]) for r in rows)
        verdicts = [
            bc.verdict("worst legitimate login or reconnect", worst_login, 500, "ms", lower_is_better=True),
            bc.verdict(
                "server peak RSS",
                max(r["server_rss_peak_mib"] for r in rows),
                200,
                "MiB",
                lower_is_better=True,
            ),
        ]
        print()
        bc.print_verdicts(verdicts)
        doc["verdicts"] = verdicts
        bc.emit_json(a, doc)
    finally:
        bc.finish(work, a.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
