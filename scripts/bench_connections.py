"""Connections: K idle things over TLS on one bridge, and what a small live load sees meanwhile.

    python scripts/bench_connections.py [--things 1000] [--procs 2] [--window 32]
                                        [--live-things 10 --live-rate 100 --live-seconds 10] [--json [FILE]]

1. Provision K (+ live) things with the bridge's own core and CA before the server starts (EC P-256
   keys, one certificate each); raise RLIMIT_NOFILE (the server and the load processes inherit it).
2. Start `thingbridge serve`; once idle, note its RSS (baseline).
3. Connect the K things over TLS with their own certificates from `--procs` processes, at most
   `--window` handshakes in flight per process: TCP + TLS (client certificate) + CONNECT/CONNACK,
   the bridge checking each certificate against its registry and recording presence.
   -> handshakes/s (K / time until the last CONNACK) and connect latency p50/p99.
4. Keep them connected and idle (PINGREQ every keepalive/2, keepalive 60 s); once the server is
   quiet, RSS -> RSS per connection = (RSS - baseline) / K.
5. While they are connected: `--live-things` other things publish QoS 1 at `--live-rate` msg/s in
   total for `--live-seconds` to an application subscribed to things/+/collect
   -> publish-to-subscriber latency p50/p99, server CPU.
Target: 10,000 TLS things under 1 GiB server RSS (measured with --things 10000; for smaller K
the figure is extrapolated from the per-connection RSS and marked so). K is capped at 10,000.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import ssl
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import bench_common as bc
import bench_mqtt as bm
import psutil

MAX_THINGS = 10000


# ----------------------------------------------------------------------------------------------------
# idle connections (separate processes)
# ----------------------------------------------------------------------------------------------------
def idle_main(spec: dict[str, Any], ready_q: Any, start_evt: Any, stop_evt: Any, result_q: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    bc.raise_nofile()
    bc.small_tls_buffers()  # the load process's own buffers; the server is not touched
    try:
        asyncio.run(_idle(spec, ready_q, start_evt, stop_evt, result_q))
    except Exception as exc:
        ready_q.put(("error", os.getpid(), repr(exc)))
        result_q.put({"role": "idle", "error": repr(exc)})


async def _idle(spec: dict[str, Any], ready_q: Any, start_evt: Any, stop_evt: Any, result_q: Any) -> None:
    contexts = [(tid, bc.client_tls(Path(pem))) for tid, pem in spec["things"]]  # not timed
    ready_q.put(("idle", os.getpid(), len(contexts)))
    if not await asyncio.to_thread(start_evt.wait, 300):
        raise TimeoutError("no start signal")
    window = asyncio.Semaphore(spec["window"])
    conns: list[bc.Mqtt] = []
    pinged: list[float] = []  # when each connection last sent something
    readers: list[asyncio.Future[None]] = []
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    interval = spec["keepalive"] / 2

    async def drain(conn: bc.Mqtt) -> None:
        with contextlib.suppress(Exception):  # closing at the end may raise in TLS shutdown
            while await conn.reader.read(4096):
                pass

    async def pinger() -> None:
        """Keepalive from the moment each connection is up (the connect phase of 10,000 things can
        outlast 1.5 x keepalive): PINGREQ on each connection every keepalive/2, checked each second."""
        while True:
            await asyncio.sleep(1)
            now = time.monotonic()
            for i, conn in enumerate(conns):
                if now - pinged[i] >= interval:
                    conn.writer.write(bc.PINGREQ)
                    pinged[i] = now

    async def one(thing_id: str, ctx: Any) -> None:
        async with window:
            t = time.perf_counter()
            try:
                conn = await bc.Mqtt.connect(
                    spec["port"],
                    thing_id,
                    tls=ctx,
                    keepalive=spec["keepalive"],
                    timeout=spec["connect_timeout"],
                )
            except Exception as exc:
                errors[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
                return
            latencies.append(time.perf_counter() - t)
            conns.append(conn)
            pinged.append(time.monotonic())
            readers.append(asyncio.ensure_future(drain(conn)))

    ping_task = asyncio.ensure_future(pinger())
    t_start = time.time()
    try:
        await asyncio.wait_for(asyncio.gather(*(one(t, c) for t, c in contexts)), spec["timeout"])
    except TimeoutError:
        errors["connect phase timed out"] += len(contexts) - len(conns)
    t_end = time.time()
    result_q.put(
        {
            "role": "idle",
            "ok": len(conns),
            "alive_after_connect": sum(1 for r in readers if not r.done()),
            "errors": dict(errors),
            "t_start": t_start,
            "t_end": t_end,
            "latencies": latencies,
        }
    )
    await asyncio.to_thread(stop_evt.wait, spec["hold"])
    alive = sum(1 for r in readers if not r.done())
    ping_task.cancel()
    for conn in conns:
        conn.writer.write(bc.DISCONNECT)
        conn.writer.close()
    result_q.put({"role": "idle-end", "alive": alive})
    await asyncio.sleep(0.5)


# ----------------------------------------------------------------------------------------------------
# handshakes: connect, CONNECT/CONNACK, disconnect (separate processes)
# ----------------------------------------------------------------------------------------------------
CHURN_PHASES = ("full", "full again", "resumed")


class _ResumingContext(ssl.SSLContext):
    """A client context that offers `offer` (a session from an earlier connection) in its next
    handshake: asyncio's TLS layer calls wrap_bio without a session argument."""

    offer: ssl.SSLSession | None = None

    def wrap_bio(self, incoming: Any, outgoing: Any, server_side: bool = False, **kw: Any) -> Any:
        kw["session"] = kw.get("session") or self.offer
        return super().wrap_bio(incoming, outgoing, server_side, **kw)


def churn_main(spec: dict[str, Any], ready_q: Any, go: list[Any], result_q: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    bc.small_tls_buffers()
    try:
        asyncio.run(_churn(spec, ready_q, go, result_q))
    except Exception as exc:
        ready_q.put(("error", os.getpid(), repr(exc)))
        result_q.put({"role": "churn", "error": repr(exc)})


async def _churn(spec: dict[str, Any], ready_q: Any, go: list[Any], result_q: Any) -> None:
    contexts = []
    for tid, pem in spec["things"]:  # not timed
        ctx = _ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.load_cert_chain(pem)
        contexts.append((tid, ctx))
    ready_q.put(("churn", os.getpid(), len(contexts)))
    window = asyncio.Semaphore(spec["window"])
    sessions: dict[str, ssl.SSLSession] = {}  # each thing's latest session, its ticket

    async def cycle(thing_id: str, ctx: _ResumingContext, resume: bool, res: dict[str, Any]) -> None:
        ctx.offer = sessions.get(thing_id) if resume else None
        async with window:
            t = time.perf_counter()
            try:
                conn = await bc.Mqtt.connect(
                    spec["port"], thing_id, tls=ctx, keepalive=60, timeout=spec["connect_timeout"]
                )
                tls = conn.writer.get_extra_info("ssl_object")
                conn.writer.write(bc.DISCONNECT)
                with contextlib.suppress(ConnectionError, ssl.SSLError):  # the server ends it
                    await asyncio.wait_for(conn.reader.read(), spec["connect_timeout"])
                conn.writer.transport.abort()  # no TLS shutdown exchange to wait for
            except Exception as exc:
                res["errors"][f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
                return
            res["latencies"].append(time.perf_counter() - t)
            res["resumed"] += tls.session_reused
            if tls.session is not None and tls.session.has_ticket:  # read with the CONNACK
                res["tickets"] += 1
                sessions[thing_id] = tls.session

    for phase, evt in zip(CHURN_PHASES, go, strict=True):
        if not await asyncio.to_thread(evt.wait, 300):
            raise TimeoutError(f"no start signal for {phase}")
        res: dict[str, Any] = {"errors": Counter(), "latencies": [], "resumed": 0, "tickets": 0}
        t_start = time.time()
        await asyncio.gather(*(cycle(t, c, phase == "resumed", res) for t, c in contexts))
        ok = len(res["latencies"])
        result_q.put(
            {"role": "churn", "phase": phase, "ok": ok, "t_start": t_start, "t_end": time.time(), **res}
        )


def connect_churn(
    port: int,
    things: list[tuple[str, Path]],
    pid: int,
    *,
    procs: int = 2,
    window: int = 16,
    connect_timeout: float = 30,
    max_seconds: float = 1800,
) -> dict[str, dict[str, Any]]:
    """Each of `things` connects over TLS with its own certificate, sends CONNECT, reads its CONNACK,
    sends DISCONNECT and closes, from `procs` processes with at most `window` cycles in flight each;
    three passes over all of them: "full" (a full handshake), "full again" (the same things
    reconnecting, again a full handshake: nothing offered), "resumed" (each offers the TLS session
    ticket of its previous connection). Per pass: cycles/s, server CPU per cycle (pid `pid`), how
    many handshakes the server resumed."""
    ready_q, result_q = bc.MP.Queue(), bc.MP.Queue()
    go = [bc.MP.Event() for _ in CHURN_PHASES]
    n_procs = max(1, min(procs, len(things)))
    pairs = [(tid, str(pem)) for tid, pem in things]
    workers = []
    out: dict[str, dict[str, Any]] = {}
    try:
        for p in range(n_procs):
            spec = {"port": port, "things": pairs[p::n_procs], "window": window}
            spec["connect_timeout"] = connect_timeout
            workers.append(bc.spawn(churn_main, spec, ready_q, go, result_q, name="churn"))
        for _ in range(n_procs):
            kind, _pid, info = bc.get_q(ready_q, 300, "handshake load processes")
            if kind != "churn":
                raise RuntimeError(f"handshake load process failed: {info}")
        for phase, evt in zip(CHURN_PHASES, go, strict=True):
            bc.wait_cpu_quiet(pid, timeout=60)
            mon = bc.Monitor(pid).start()
            t0 = time.time()
            evt.set()
            results = []
            for _ in range(n_procs):
                res = bc.get_q(result_q, max_seconds, f"the {phase} handshakes")
                if res.get("error"):
                    raise RuntimeError(f"handshake load process failed: {res['error']}")
                results.append(res)
            cpu = mon.stop()
            ok = sum(r["ok"] for r in results)
            errors: Counter[str] = Counter()
            for r in results:
                errors.update(r["errors"])
            lat = [x for r in results for x in r["latencies"]]
            out[phase] = {
                "cycles": ok,
                "resumed": sum(r["resumed"] for r in results),
                "tickets": sum(r["tickets"] for r in results),
                "errors": dict(errors) or None,
                "cycles_per_s": bc.rnd(ok / (max(r["t_end"] for r in results) - t0), 1),
                "cycle_p99_ms": bc.rnd(1000 * (bc.percentile(lat, 99) or 0)),
                "server_cpu_ms_per_cycle": bc.rnd(1000 * cpu["server_cpu_s"] / ok, 3) if ok else None,
            }
    finally:
        for evt in go:
            evt.set()
        bc.reap(workers, grace=15)
    return out


# ----------------------------------------------------------------------------------------------------
# orchestration
# ----------------------------------------------------------------------------------------------------
async def _admin_stats(port: int) -> dict[str, Any]:
    base = f"http://{bc.HOST}:{port}/dev/v1"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        async with s.get(f"{base}/token", headers=bc.basic_auth("admin", bc.ADMIN_PASSWORD)) as r:
            token = (await r.json())["accessToken"]
        async with s.get(f"{base}/broker/stats", headers={"Authorization": f"Bearer {token}"}) as r:
            return (await r.json())["result"]


class IdleFleet:
    """Idle TLS connections held by load processes: connect_idle() made them; close() ends them."""

    def __init__(self, procs: list[Any], stop_evt: Any, result_q: Any) -> None:
        self.procs, self.stop_evt, self.result_q = procs, stop_evt, result_q
        self.result: dict[str, Any] = {}
        self.profile: dict[str, Any] | None = None

    def close(self) -> int:
        """Disconnect them all; how many were still connected at that moment."""
        self.stop_evt.set()
        alive = 0
        for _ in self.procs:
            res = bc.get_q(self.result_q, 120, "idle processes to finish")
            alive += res.get("alive", 0)
        bc.reap(self.procs, grace=15)
        return alive

    def abandon(self) -> None:
        self.stop_evt.set()
        bc.reap(self.procs, grace=15)


def connect_idle(
    port: int,
    things: list[tuple[str, Path]],
    pid: int,
    *,
    procs: int = 2,
    window: int = 32,
    keepalive: int = 60,
    connect_timeout: float = 60,
    max_seconds: float = 1800,
    profile: Path | None = None,
) -> IdleFleet:
    """Connect `things` over TLS (their own certificates) to the broker on `port` from `procs`
    processes, at most `window` handshakes in flight each, and keep them connected and idle. The
    result: connected, handshakes/s, connect p50/p99 and the server's CPU per handshake (pid `pid`)."""
    ready_q, result_q, start_evt, stop_evt = bc.MP.Queue(), bc.MP.Queue(), bc.MP.Event(), bc.MP.Event()
    n_procs = max(1, min(procs, len(things)))
    idle = IdleFleet([], stop_evt, result_q)
    pairs = [(tid, str(pem)) for tid, pem in things]
    try:
        for p in range(n_procs):
            spec = {
                "port": port,
                "things": pairs[p::n_procs],
                "window": window,
                "keepalive": keepalive,
                "connect_timeout": connect_timeout,
                "timeout": max_seconds,
                "hold": max_seconds,
            }
            idle.procs.append(
                bc.spawn(idle_main, spec, ready_q, start_evt, stop_evt, result_q, name="idle-conns")
            )
        for _ in range(n_procs):
            kind, _pid, info = bc.get_q(ready_q, 300, "idle load processes")
            if kind != "idle":
                raise RuntimeError(f"idle load process failed: {info}")
        spy = bc.start_pyspy(pid, max_seconds, profile) if profile is not None else None
        mon = bc.Monitor(pid).start()
        t0 = time.time()
        start_evt.set()
        connected = []
        for _ in range(n_procs):
            res = bc.get_q(result_q, max_seconds, "the connect phase")
            if res.get("error"):
                raise RuntimeError(f"idle load process failed: {res['error']}")
            connected.append(res)
        cpu = mon.stop()
        if spy is not None and profile is not None:
            bc.interrupt_pyspy(spy)
            idle.profile = bc.analyse_profile(profile) if profile.exists() else {"samples": 0}
    except BaseException:
        idle.abandon()
        raise
    ok = sum(r["ok"] for r in connected)
    t_last = max(r["t_end"] for r in connected)
    lat = [x for r in connected for x in r["latencies"]]
    errors: Counter[str] = Counter()
    for r in connected:
        errors.update(r["errors"])
    idle.result = {
        "connected": ok,
        "alive_after_connect_phase": sum(r.get("alive_after_connect", 0) for r in connected),
        "connect_errors": dict(errors) or None,
        "connect_phase_s": round(t_last - t0, 2),
        "handshakes_per_s": bc.rnd(ok / (t_last - t0), 1),
        "connect_p50_ms": bc.rnd(1000 * (bc.percentile(lat, 50) or 0)),
        "connect_p99_ms": bc.rnd(1000 * (bc.percentile(lat, 99) or 0)),
        "connect_server_cpu_pct": cpu["server_cpu_pct_of_one_core"],
        "connect_server_cpu_ms_per_handshake": bc.rnd(1000 * cpu["server_cpu_s"] / ok, 3) if ok else None,
    }
    return idle


def live_load(a: argparse.Namespace, fleet: bc.Fleet, ports: dict[str, int], pid: int) -> dict[str, Any]:
    live = fleet.things[a.things : a.things + a.live_things]
    per_conn = max(1, int(a.live_rate * a.live_seconds / len(live)))
    total = per_conn * len(live)
    run = int(time.time()) % 100000
    ready_q, result_q = bc.MP.Queue(), bc.MP.Queue()
    start_evt, stop_evt = bc.MP.Event(), bc.MP.Event()
    procs = []
    try:
        sub = {
            "port": ports["mqtt_plain"],
            "qos": 1,
            "run": run,
            "count": total,
            "timeout": a.live_seconds + 60,
            "client_id": f"app:{bc.APP}",
            "username": bc.APP,
            "password": bc.APP_PASSWORD,
        }
        procs.append(bc.spawn(bm.subscriber_main, sub, ready_q, result_q, name="live-sub"))
        kind, _pid, info = bc.get_q(ready_q, 60, "the subscriber")
        if kind != "sub":
            raise RuntimeError(f"subscriber failed: {info}")
        spec = {
            "port": ports["mqtt_tls"],
            "ca": str(fleet.ca_file),
            "things": [(i, tid, str(pem)) for i, (tid, pem) in enumerate(live)],
            "qos": 1,
            "per_conn": per_conn,
            "inflight": 10,
            "size": a.size,
            "run": run,
            "interval": len(live) / a.live_rate,
            "timeout": a.live_seconds + 30,
        }
        procs.append(
            bc.spawn(bm.publisher_main, spec, ready_q, start_evt, stop_evt, result_q, name="live-pub")
        )
        kind, _pid, info = bc.get_q(ready_q, 120, "the live publishers")
        if kind != "pub":
            raise RuntimeError(f"publisher failed: {info}")
        time.sleep(0.5)
        mon = bc.Monitor(pid).start()
        t0 = time.time()
        start_evt.set()
        subres = pubres = None
        stats: dict[str, Any] = {}
        while subres is None or pubres is None:
            res = bc.get_q(result_q, a.live_seconds + 90, "live load results")
            if res.get("error"):
                raise RuntimeError(f"live {res['role']} failed: {res['error']}")
            if res["role"] == "sub":
                subres, stats = res, mon.stop()
            else:
                pubres = res
    finally:
        stop_evt.set()
        bc.reap(procs)
    elapsed = (subres["last_rx"] - t0) if subres["last_rx"] else None
    return {
        "live_things": len(live),
        "offered_per_s": a.live_rate,
        "sent": pubres["sent"],
        "received": subres["received"],
        "delivered_per_s": bc.rnd(subres["received"] / elapsed, 1) if elapsed else None,
        "lat_p50_ms": subres["lat_p50_ms"],
        "lat_p99_ms": subres["lat_p99_ms"],
        "lat_max_ms": subres["lat_max_ms"],
        **stats,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--things", type=int, default=1000, help=f"idle TLS things (at most {MAX_THINGS})")
    ap.add_argument("--procs", type=int, default=2, help="processes holding the idle connections")
    ap.add_argument("--window", type=int, default=32, help="handshakes in flight per process")
    ap.add_argument("--keepalive", type=int, default=60)
    ap.add_argument("--live-things", type=int, default=10)
    ap.add_argument("--live-rate", type=float, default=100, help="live msg/s, all live things together")
    ap.add_argument("--live-seconds", type=float, default=10)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--connect-timeout", type=float, default=60, help="bound of one connection attempt")
    ap.add_argument("--max-seconds", type=float, default=1800, help="hard bound of the whole bench")
    ap.add_argument("--profile", action="store_true", help="py-spy the server during the connect phase")
    ap.add_argument(
        "--gc-stats",
        action="store_true",
        help="diagnostic: a gc callback in the server process reports collector pauses when it exits",
    )
    ap.add_argument(
        "--ssl-buffer-kib",
        type=int,
        help="what-if experiment, not the shipped bridge: start the server with asyncio's per-connection"
        " TLS read buffer (SSLProtocol.max_size, 256 KiB) set to this many KiB",
    )
    bc.add_output_args(ap)
    a = ap.parse_args()
    if not 1 <= a.things <= MAX_THINGS:
        ap.error(f"--things must be between 1 and {MAX_THINGS}")
    bc.install_watchdog(a.max_seconds)
    soft, hard = bc.raise_nofile()
    need = a.things + a.live_things + 500
    if soft < need:
        print(f"RLIMIT_NOFILE is {soft} (hard {hard}); {need} descriptors are needed: raise the hard limit")
        return 2
    work = a.keep or Path(tempfile.mkdtemp(prefix="bench-conn-"))
    doc: dict[str, Any] = {
        "bench": "connections",
        "machine": bc.machine(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
    }
    result: dict[str, Any] = {"things": a.things, "bench_nofile_limit": soft}
    idle: IdleFleet | None = None
    server = None
    try:
        t = time.time()
        fleet = bc.provision(work / "bridge", a.things + a.live_things)
        result["provision_s"] = round(time.time() - t, 1)
        print(
            f"provisioned {a.things + a.live_things} things (EC P-256) in {result['provision_s']} s under {work}"
        )
        prelude = None
        if a.ssl_buffer_kib:
            prelude = (
                f"import asyncio.sslproto\nasyncio.sslproto.SSLProtocol.max_size = {a.ssl_buffer_kib} * 1024"
            )
            result["experiment"] = f"server SSLProtocol.max_size = {a.ssl_buffer_kib} KiB (stock 256 KiB)"
            print(f"EXPERIMENT: {result['experiment']}")
        if a.gc_stats:
            prelude = (prelude or "") + bc.GC_STATS_PRELUDE
        server, ports = bc.start_bridge(fleet, timeout=300, prelude=prelude)
        left = bc.wait_outbox_empty(fleet.db_path, 300)
        bc.wait_cpu_quiet(server.pid, timeout=60)
        proc = psutil.Process(server.pid)
        result["server_nofile_limit"] = list(proc.rlimit(psutil.RLIMIT_NOFILE))
        baseline = proc.memory_info().rss
        result["server_rss_baseline_mib"] = round(baseline / 2**20, 1)
        print(
            f"bridge pid {server.pid} ready (outbox left {left}); RSS {result['server_rss_baseline_mib']} MiB;"
            f" its RLIMIT_NOFILE {result['server_nofile_limit']}"
        )

        # --- connect K idle things
        idle = connect_idle(
            ports["mqtt_tls"],
            fleet.things[: a.things],
            server.pid,
            procs=a.procs,
            window=a.window,
            keepalive=a.keepalive,
            connect_timeout=a.connect_timeout,
            max_seconds=a.max_seconds,
            profile=work / "bridge-connect.pyspy.raw" if a.profile else None,
        )
        if idle.profile is not None:
            doc["profile"] = idle.profile
        result.update(idle.result)
        ok = idle.result["connected"]
        errors = idle.result["connect_errors"] or {}
        print(
            f"connected {ok}/{a.things} in {result['connect_phase_s']} s: {bc.fmt(result['handshakes_per_s'])}"
            f" handshakes/s, connect p99 {result['connect_p99_ms']} ms"
            + (f", errors {errors}" if errors else "")
        )

        # --- idle: RSS per connection
        quiet = bc.wait_cpu_quiet(server.pid, timeout=60)
        rss = proc.memory_info().rss
        stats = asyncio.run(_admin_stats(ports["http"]))
        per_conn = (rss - baseline) / ok if ok else None
        result.update(
            {
                "server_connections_reported": stats.get("connections"),
                "server_rss_connected_mib": round(rss / 2**20, 1),
                "server_rss_per_connection_kib": bc.rnd(per_conn / 1024, 1) if per_conn else None,
                "server_cpu_pct_idle_connected": round(100 * quiet, 1),
            }
        )
        if a.things >= MAX_THINGS:
            result["rss_10k_mib"], result["rss_10k_basis"] = result["server_rss_connected_mib"], "measured"
        elif per_conn:
            result["rss_10k_mib"] = round((baseline + per_conn * MAX_THINGS) / 2**20, 1)
            result["rss_10k_basis"] = f"extrapolated from {ok} connections"
        print(
            f"idle with {ok} connections (server says {stats.get('connections')}): RSS {result['server_rss_connected_mib']}"
            f" MiB, {bc.fmt(result['server_rss_per_connection_kib'])} KiB per connection, server CPU {round(100 * quiet, 1)}%"
        )

        # --- live load while connected
        live = live_load(a, fleet, ports, server.pid)
        result["live"] = live
        print(
            f"live load {live['received']}/{live['sent']} at {a.live_rate:.0f} msg/s offered: p50 {live['lat_p50_ms']} ms,"
            f" p99 {live['lat_p99_ms']} ms, server CPU {live['server_cpu_pct_of_one_core']}%"
        )

        result["still_connected_at_end"] = idle.close()
        idle = None

        print(
            f"\nConnections: {a.things} idle TLS things (client certificates, keepalive {a.keepalive} s) + "
            f"{a.live_things} live things at {a.live_rate:.0f} msg/s QoS 1; machine: {os.cpu_count()} cores, shared"
        )
        rows = [
            {"metric": "TLS+MQTT handshakes/s (connect phase)", "value": result["handshakes_per_s"]},
            {
                "metric": "connect latency p50 / p99 ms",
                "value": f"{result['connect_p50_ms']} / {result['connect_p99_ms']}",
            },
            {"metric": "server CPU ms per handshake", "value": result["connect_server_cpu_ms_per_handshake"]},
            {"metric": "server RSS idle baseline MiB", "value": result["server_rss_baseline_mib"]},
            {"metric": f"server RSS with {ok} connections MiB", "value": result["server_rss_connected_mib"]},
            {"metric": "server RSS per connection KiB", "value": result["server_rss_per_connection_kib"]},
            {
                "metric": f"server RSS at 10,000 things MiB ({result.get('rss_10k_basis')})",
                "value": result.get("rss_10k_mib"),
            },
            {"metric": "server CPU % while idle-connected", "value": result["server_cpu_pct_idle_connected"]},
            {
                "metric": "live publish->subscriber p50 / p99 ms",
                "value": f"{live['lat_p50_ms']} / {live['lat_p99_ms']}",
            },
            {
                "metric": "live delivered/s (offered)",
                "value": f"{bc.fmt(live['delivered_per_s'])} ({a.live_rate:.0f})",
            },
            {
                "metric": "connections reported by the server when idle",
                "value": result["server_connections_reported"],
            },
            {"metric": "connections alive at the end", "value": result.get("still_connected_at_end")},
            {
                "metric": "server RLIMIT_NOFILE (soft, hard)",
                "value": str(tuple(result["server_nofile_limit"])),
            },
        ]
        print(bc.table(rows, [("metric", "metric"), ("value", "value")]))
        doc["result"] = result
        doc["verdicts"] = [
            bc.verdict(
                f"server RSS with 10,000 TLS things ({result.get('rss_10k_basis')})",
                result.get("rss_10k_mib"),
                1024,
                "MiB",
                lower_is_better=True,
            )
        ]
        print("targets:")
        bc.print_verdicts(doc["verdicts"])
        if a.gc_stats:
            t = time.time()
            server.stop(grace=180)  # a clean exit (atexit) prints the numbers; 10,000 sessions take a while
            result["server_stop_s"] = round(time.time() - t, 1)
            result["server_gc"] = bc.gc_stats(server)
            print(f"server stopped (SIGTERM) in {result['server_stop_s']} s")
            print(f"server garbage-collector pauses (generations 0, 1, 2): {result['server_gc']}")
        if "profile" in doc:
            bc.print_profile(doc["profile"], f"the connect phase ({ok} TLS handshakes)")
        bc.emit_json(a, doc)
    finally:
        if idle is not None:
            idle.abandon()
        if server is not None:
            server.stop()
        bc.finish(work, a.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
