"""Shared pieces of the benchmarks in scripts/: start and stop the processes a bench owns (the bridge,
bare brokers, load generators), provision users/apps/things with the bridge's own core, a minimal
asyncio MQTT 3.1.1 client, CPU/RSS sampling of a server pid, statistics, tables and JSON output.

Everything binds or connects to 127.0.0.1 only. Every process a bench starts is registered here by
pid and ended by pid (SIGTERM, then SIGKILL) when the bench ends or its hard timeout fires."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import contextlib
import functools
import linecache
import math
import multiprocessing as mp
import os
import platform
import queue
import re
import resource
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil

HOST = "127.0.0.1"
READY = "thingbridge ready "
ADMIN_PASSWORD = "admin-bench-password"
USER, USER_PASSWORD = "bench", "bench-password-1"
APP, APP_PASSWORD = "benchapp", "benchapp-password-1"
MP = mp.get_context("spawn")

# ----------------------------------------------------------------------------------------------------
# processes we started: registered by pid, ended by pid
# ----------------------------------------------------------------------------------------------------
_started: dict[int, str] = {}
_lock = threading.Lock()


def register(pid: int, name: str) -> None:
    with _lock:
        _started[pid] = name


def unregister(pid: int) -> None:
    with _lock:
        _started.pop(pid, None)


def _alive(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def end_pid(pid: int, grace: float = 10.0) -> None:
    """SIGTERM one process we started, SIGKILL it after `grace` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    unregister(pid)


def end_all(grace: float = 5.0) -> None:
    with _lock:
        pids = list(_started)
    for pid in pids:
        end_pid(pid, grace)


atexit.register(end_all)


def install_watchdog(seconds: float) -> None:
    """Hard bound on the whole bench: after `seconds`, kill what we started and exit 3."""

    def fire() -> None:
        print(f"\nbench: hard timeout of {seconds:.0f} s reached; stopping what it started", flush=True)
        with _lock:
            pids = list(_started)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (inherited by the processes started after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


class Server:
    """A server process we own: started with Popen, ready when a line containing `ready` appears on
    its stdout (the rest of that line is kept), stopped by pid."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        ready: str | None,
        env: dict[str, str] | None = None,
        ports: tuple[int, ...] = (),
    ) -> None:
        """`ready` None: ready when every port in `ports` accepts a TCP connection."""
        self.name, self.argv, self.ready, self.env, self.ports = name, argv, ready, env, ports
        self.proc: subprocess.Popen[str] | None = None
        self.ready_rest = ""
        self.output: list[str] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60) -> Server:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        register(self.proc.pid, self.name)
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:  # keep reading so the pipe never fills
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                if len(self.output) < 2000:
                    self.output.append(line)
                lines.put(line)
            lines.put(None)

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        deadline = time.monotonic() + timeout
        while self.ready is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited before ready:\n" + "".join(self.output))
            if all(_accepts(port) for port in self.ports):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} not ready in {timeout} s:\n" + "".join(self.output))
            time.sleep(0.05)
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise RuntimeError(
                    f"{self.name} not ready in {timeout} s:\n" + "".join(self.output)
                ) from None
            if line is None:
                raise RuntimeError(f"{self.name} exited before ready:\n" + "".join(self.output))
            if self.ready in line:
                self.ready_rest = line.split(self.ready, 1)[1].strip()
                return self

    def stop(self, grace: float = 15) -> None:
        if self.proc is not None:
            end_pid(self.proc.pid, grace)
            with contextlib.suppress(Exception):
                self.proc.wait(1)
            self._pump.join(5)  # the last lines it printed
            self.proc = None


# ----------------------------------------------------------------------------------------------------
# the bridge: config, provisioning with its own core, start
# ----------------------------------------------------------------------------------------------------
def write_config(folder: Path, name: str = "broker.yaml", **overrides: Any) -> Path:
    """A broker.yaml (or `name`) with every listener on 127.0.0.1 and port 0 (as tests/conftest.py
    does)."""
    accounts = {"token_ttl": 3600, "free_plan_things": 10, **overrides.pop("accounts", {})}
    mqtt = {"max_packet_size": 1024 * 1024, **overrides.pop("mqtt", {})}
    doc = {
        "data_dir": "data",
        "pki": {"dir": "certs"},
        "mqtt": {"tls": {"host": HOST, "port": 0}, "plain": {"host": HOST, "port": 0}, **mqtt},
        "http": {
            "http": {"host": HOST, "port": 0},
            "https": {"host": HOST, "port": 0},
            "public_host": HOST,
        },
        "accounts": accounts,
        **overrides,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(orjson.dumps(doc))  # JSON is YAML
    return path


@dataclass
class Fleet:
    """What provision() made: the bridge folder, its CA and server certificate, one user with an
    application principal, and things whose certificate + private key sit in one PEM file each."""

    folder: Path
    config: Path
    things: list[tuple[str, Path]] = field(default_factory=list)
    store_url: str = "sqlite:"

    @property
    def certs(self) -> Path:
        return self.folder / "certs"

    @property
    def ca_file(self) -> Path:
        return self.certs / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.certs / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.certs / "server.key"

    @property
    def db_path(self) -> Path:
        return self.folder / "data" / "thingbridge.sqlite"

    @property
    def store(self) -> Path | str:
        """Where its database is: the SQLite file, or the PostgreSQL URL (for `query`)."""
        return self.db_path if self.store_url == "sqlite:" else self.store_url

    def thing_key(self, pem: Path) -> bytes:
        return pem.with_suffix(".key").read_bytes()


def provision(
    folder: Path,
    n_things: int,
    *,
    prefix: str = "bench",
    key_type: str = "EC",
    config: str = "broker.yaml",
    **overrides: Any,
) -> Fleet:
    """Create the bridge's data directory with the bridge's own core (before its server starts):
    CA and server certificate, user `bench` with a plan for the things, application `benchapp`, and
    `n_things` things `{prefix}-00000`... (EC keys by default: fast to make), in the store the
    configuration `config` names (overrides store={"url": ...}: PostgreSQL; the same folder then
    shares the CA with the SQLite installation)."""
    from bridge import config as bridge_config

    cfg_path = write_config(folder, config, **overrides)
    cfg = bridge_config.load(cfg_path)
    fleet = Fleet(folder, cfg_path, store_url=cfg.store.url)
    pems = folder / "things"
    pems.mkdir(parents=True, exist_ok=True)
    fleet.things = asyncio.run(_provision(cfg, pems, n_things, prefix, key_type))
    return fleet


async def _provision(cfg: Any, pems: Path, n: int, prefix: str, key_type: str) -> list[tuple[str, Path]]:
    from bridge.core.errors import NotFound
    from bridge.core.service import Core
    from bridge.core.things import NewThing
    from bridge.store import create

    store = create(cfg.store.url, cfg.db_path, "OFF")  # provisioning only; the server sets its own
    store.open()
    try:
        core = Core(cfg, store)
        core.ca.ensure_server_cert([])
        try:
            await core.accounts.user_by_name(USER)
        except NotFound:
            await core.accounts.create_user(USER, USER_PASSWORD)
            await core.accounts.create_app(APP, USER, APP_PASSWORD)
        await core.accounts.set_plan(USER, n + 100, "Bench")
        owner = await core.accounts.user_by_name(USER)
        sem = asyncio.Semaphore(64)
        out: list[tuple[str, Path]] = [("", Path())] * n

        async def one(i: int) -> None:
            thing_id = f"{prefix}-{i:05d}"
            async with sem:
                thing = await core.things.create(owner, NewThing(id=thing_id, key_type=key_type))
            pem = pems / f"{thing_id}.pem"
            assert thing.private_key_pem is not None
            await asyncio.to_thread(_write_pair, pem, thing.cert_pem, thing.private_key_pem)
            out[i] = (thing_id, pem)

        await asyncio.gather(*(one(i) for i in range(n)))
        return out
    finally:
        await asyncio.to_thread(store.close)


def _write_pair(pem: Path, cert: str, key: str) -> None:
    pem.write_text(cert + key)  # load_cert_chain(pem) reads both
    pem.with_suffix(".key").write_text(key)


def start_bridge(
    fleet: Fleet, timeout: float = 120, prelude: str | None = None, config: Path | None = None
) -> tuple[Server, dict[str, int]]:
    """`thingbridge serve` as `python -m bridge serve`; `prelude`: Python run first in the server
    process (for what-if experiments only, e.g. a smaller asyncio TLS read buffer); `config`:
    another file for the same installation (default: the fleet's)."""
    config = config or fleet.config
    if prelude is None:
        argv = [sys.executable, "-m", "bridge", "serve", "--config", str(config)]
    else:
        code = f"{prelude}\nimport sys\nfrom bridge.cli import main\nsys.exit(main(sys.argv[1:]))"
        argv = [sys.executable, "-c", code, "serve", "--config", str(config)]
    server = Server(
        "thingbridge",
        argv,
        READY,
        env={"THINGBRIDGE_ADMIN_PASSWORD": ADMIN_PASSWORD},
    )
    server.start(timeout)
    return server, orjson.loads(server.ready_rest)


GC_STATS_PRELUDE = """
import atexit, gc, json, time
_gc = {"collections": [0, 0, 0], "ms_total": [0.0, 0.0, 0.0], "ms_max": [0.0, 0.0, 0.0], "over_100ms": 0}
_t = [0.0]
def _gc_cb(phase, info):
    if phase == "start":
        _t[0] = time.perf_counter()
        return
    ms, g = (time.perf_counter() - _t[0]) * 1000, info["generation"]
    _gc["collections"][g] += 1
    _gc["ms_total"][g] += ms
    _gc["ms_max"][g] = max(_gc["ms_max"][g], ms)
    _gc["over_100ms"] += ms > 100
gc.callbacks.append(_gc_cb)
atexit.register(lambda: print("GCSTATS " + json.dumps(_gc), flush=True))
"""


def gc_stats(server: Server) -> dict[str, Any] | None:
    """What GC_STATS_PRELUDE printed when the server exited (garbage-collector pauses by generation)."""
    for line in server.output:
        if line.startswith("GCSTATS "):
            doc = orjson.loads(line[len("GCSTATS ") :])
            doc["ms_total"] = [round(x, 1) for x in doc["ms_total"]]
            doc["ms_max"] = [round(x, 1) for x in doc["ms_max"]]
            return doc
    return None


def wait_outbox_empty(db: Path | str, timeout: float = 120) -> int:
    """The bridge drains its outbox (retained config documents) after start; wait for that."""
    deadline = time.monotonic() + timeout
    left = -1
    while time.monotonic() < deadline:
        left = query(db, "SELECT count(*) FROM outbox")[0][0]
        if left == 0:
            return 0
        time.sleep(0.25)
    return left


def query(store: Path | str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """A read of the bridge's database from outside: the SQLite file (read-only), or a PostgreSQL
    URL (`?` placeholders either way)."""
    if isinstance(store, Path):
        import sqlite3

        conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()
    import psycopg

    from bridge.store.postgres import translate

    with psycopg.connect(store) as pg:
        return (
            [tuple(row) for row in pg.execute(translate(sql), args)] if args else pg.execute(sql).fetchall()
        )


def start_postgres() -> tuple[Any, str]:
    """A PostgreSQL server of the bench's own (tests/postgres.py: Debian's initdb and pg_ctl, a
    temporary folder, a free loopback port; fsync on, defaults otherwise), registered like every
    process started here, and the URL of a new database on it."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from tests.postgres import PostgresServer, postgres_bin

    bindir = postgres_bin()
    if bindir is None:
        raise RuntimeError(
            "PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql"
        )
    server = PostgresServer(bindir, fsync=True)  # durable like the SQLite file (synchronous=FULL)
    server.start()
    register(server.pid, "postgres")
    atexit.register(server.stop)
    return server, server.new_database(empty=True)


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user+sys) of a process and its living children: a postmaster and its backends."""
    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += sum(p.cpu_times()[:2])
    return total


def wait_cpu_quiet(pid: int, threshold: float = 0.15, timeout: float = 30) -> float:
    """Wait until the server uses less than `threshold` of a core over half a second."""
    proc = psutil.Process(pid)
    deadline = time.monotonic() + timeout
    share = 1.0
    while time.monotonic() < deadline:
        c0 = sum(proc.cpu_times()[:2])
        time.sleep(0.5)
        share = (sum(proc.cpu_times()[:2]) - c0) / 0.5
        if share < threshold:
            break
    return share


def basic_auth(username: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}


def small_tls_buffers(kib: int = 32) -> None:
    """asyncio's SSLProtocol allocates a 256 KiB read buffer per TLS connection (max_size); a load
    process holding thousands of connections does not need that. Process-wide; clients only."""
    import asyncio.sslproto

    asyncio.sslproto.SSLProtocol.max_size = kib * 1024


def client_tls(pem: Path | None = None, ca_file: Path | None = None) -> ssl.SSLContext:
    """Client TLS context: verifies the server against `ca_file` when given (else no verification,
    for the many-connection load), presents the certificate + key in `pem`."""
    if ca_file is not None:
        ctx = ssl.create_default_context(cafile=str(ca_file))
        ctx.check_hostname = False  # the server certificate names 127.0.0.1 and localhost anyway
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if pem is not None:
        ctx.load_cert_chain(str(pem))
    return ctx


# ----------------------------------------------------------------------------------------------------
# a minimal asyncio MQTT 3.1.1 client (one per connection; cheap enough for 10,000 of them)
# ----------------------------------------------------------------------------------------------------
CONNACK, PUBLISH, PUBACK, SUBACK, PINGRESP = 2, 3, 4, 9, 13
PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"


def _varlen(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(raw)) + raw


def connect_packet(
    client_id: str, keepalive: int, username: str | None, password: str | None, clean: bool
) -> bytes:
    flags = 0x02 if clean else 0
    payload = _str(client_id)
    if username is not None:
        flags |= 0x80
        payload += _str(username)
    if password is not None:
        flags |= 0x40
        payload += _str(password)
    body = _str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + payload
    return b"\x10" + _varlen(len(body)) + body


def publish_packet(topic: bytes, payload: bytes, qos: int, packet_id: int) -> bytes:
    body = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", packet_id) if qos else b"") + payload
    return bytes([0x30 | (qos << 1)]) + _varlen(len(body)) + body


def puback_packet(packet_id: int) -> bytes:
    return b"\x40\x02" + struct.pack("!H", packet_id)


def parse_publish(flags: int, body: bytes) -> tuple[bytes, int, bytes]:
    """(topic, packet id or 0, payload) of a PUBLISH body."""
    n = (body[0] << 8) | body[1]
    topic = body[2 : 2 + n]
    if flags & 0x06:
        return topic, (body[2 + n] << 8) | body[3 + n], body[4 + n :]
    return topic, 0, body[2 + n :]


class Mqtt:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._buf = bytearray()
        self._pinger: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls,
        port: int,
        client_id: str,
        *,
        tls: ssl.SSLContext | None = None,
        username: str | None = None,
        password: str | None = None,
        keepalive: int = 60,
        clean: bool = True,
        timeout: float = 30,
    ) -> Mqtt:
        async def go() -> Mqtt:
            reader, writer = await asyncio.open_connection(
                HOST, port, ssl=tls, server_hostname=HOST if tls else None, limit=1 << 20
            )
            conn = cls(reader, writer)
            writer.write(connect_packet(client_id, keepalive, username, password, clean))
            ptype, _flags, body = (await conn.read_packets(1))[0]
            if ptype != CONNACK or body[1] != 0:
                writer.close()
                raise ConnectionError(f"CONNECT of {client_id!r} refused: type {ptype} body {body!r}")
            return conn

        return await asyncio.wait_for(go(), timeout)

    async def read_packets(self, at_least: int = 1) -> list[tuple[int, int, bytes]]:
        """Every complete packet buffered (at least `at_least`): [(type, flags, body)]; [] at EOF."""
        out: list[tuple[int, int, bytes]] = []
        buf = self._buf
        while True:
            pos, end = 0, len(buf)
            while end - pos >= 2:
                first, i, length, mult = buf[pos], pos + 1, 0, 1
                while i < end:
                    byte = buf[i]
                    i += 1
                    length += (byte & 0x7F) * mult
                    mult <<= 7
                    if not byte & 0x80:
                        break
                else:
                    break
                if end - i < length:
                    break
                out.append((first >> 4, first & 0x0F, bytes(buf[i : i + length])))
                pos = i + length
            if pos:
                del buf[:pos]
            if len(out) >= at_least:
                return out
            data = await self.reader.read(1 << 16)
            if not data:
                return out
            buf += data

    async def subscribe(self, topic: str, qos: int) -> int:
        body = struct.pack("!H", 1) + _str(topic) + bytes([qos])
        self.writer.write(b"\x82" + _varlen(len(body)) + body)
        while True:
            for ptype, _flags, body in await self.read_packets(1):
                if ptype == SUBACK:
                    return body[2]
            if self.reader.at_eof():
                raise ConnectionError("closed before SUBACK")

    def start_pinger(self, interval: float) -> None:
        async def ping() -> None:
            with contextlib.suppress(Exception):
                while True:
                    await asyncio.sleep(interval)
                    self.writer.write(PINGREQ)

        self._pinger = asyncio.ensure_future(ping())

    async def close(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
        with contextlib.suppress(Exception):
            self.writer.write(DISCONNECT)
            await asyncio.wait_for(self.writer.drain(), 2)
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


def payload_for(run: int, conn: int, seq: int, size: int) -> bytes:
    """A JSON object of exactly `size` bytes carrying run, connection, sequence and send time."""
    head = b'{"r":%d,"c":%d,"i":%d,"t":%.6f,"p":"' % (run, conn, seq, time.time())
    pad = size - len(head) - 2
    return head + b"x" * max(0, pad) + b'"}'


# ----------------------------------------------------------------------------------------------------
# measuring the server: CPU and RSS of one pid
# ----------------------------------------------------------------------------------------------------
class Monitor:
    """CPU time (user+sys, all threads) of a pid between start() and stop(); RSS sampled every
    0.2 s in between (peak and last)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self._stop = threading.Event()
        self.rss_peak = 0
        self.rss_last = 0
        self.cpu0 = self.cpu1 = 0.0
        self.t0 = self.t1 = 0.0
        self._thread: threading.Thread | None = None

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def start(self) -> Monitor:
        self.t0 = time.time()
        self.cpu0 = sum(self.proc.cpu_times()[:2])
        self.rss_peak = self.rss_last = self.rss()

        def sample() -> None:
            while not self._stop.wait(0.2):
                with contextlib.suppress(psutil.Error):
                    self.rss_last = self.rss()
                    self.rss_peak = max(self.rss_peak, self.rss_last)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        self.cpu1 = sum(self.proc.cpu_times()[:2])
        self.t1 = time.time()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1)
        with contextlib.suppress(psutil.Error):
            self.rss_last = self.rss()
            self.rss_peak = max(self.rss_peak, self.rss_last)
        wall = max(self.t1 - self.t0, 1e-9)
        return {
            "server_cpu_s": round(self.cpu1 - self.cpu0, 3),
            "server_cpu_pct_of_one_core": round(100 * (self.cpu1 - self.cpu0) / wall, 1),
            "server_rss_peak_mib": round(self.rss_peak / 2**20, 1),
            "server_rss_end_mib": round(self.rss_last / 2**20, 1),
        }


def proc_status_mib(pid: int, field: str) -> float:
    """A memory line of /proc/<pid>/status in MiB: VmRSS (now) or VmHWM (the kernel's exact peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


# ----------------------------------------------------------------------------------------------------
# statistics, tables, output
# ----------------------------------------------------------------------------------------------------
def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return percentile(present, 50) if present else None


def rnd(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b:
        return None
    return round(a / b, 3)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value.is_integer():
            return f"{value:,.0f}"
        if value >= 1000:
            return f"{value:,.0f}"
        if value >= 100:
            return f"{value:.0f}"
        if value >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """Plain text table: columns = [(key, header)]."""
    cells = [[header for _key, header in columns]] + [
        [fmt(row.get(key)) for key, _h in columns] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = []
    for n, r in enumerate(cells):
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verdict(
    name: str,
    value: float | None,
    target: float,
    unit: str = "x",
    lower_is_better: bool = False,
    at_most: bool = False,
) -> dict[str, Any]:
    """Met when value >= target; `lower_is_better`: value < target; `at_most`: value <= target."""
    ops = {">=": lambda v: v >= target, "<": lambda v: v < target, "<=": lambda v: v <= target}
    op = "<=" if at_most else "<" if lower_is_better else ">="
    met = None if value is None else ops[op](value)
    return {"target": name, "value": value, "op": op, "threshold": target, "unit": unit, "met": met}


def print_verdicts(verdicts: list[dict[str, Any]]) -> None:
    for v in verdicts:
        state = "n/a (not measured)" if v["met"] is None else ("MET" if v["met"] else "NOT MET")
        print(
            f"  [{state:>7}] {v['target']}: {fmt(v['value'])} {v['unit']}"
            f" (target {v['op']} {fmt(v['threshold'])} {v['unit']})"
        )


def bridge_source() -> dict[str, Any]:
    """Which bridge/ the bench (and the servers it starts, same cwd and environment) imports, and the
    git commit of the folder it lives in, with whether bridge/ differs from that commit."""
    import importlib.util

    spec = importlib.util.find_spec("bridge")
    folder = Path(spec.origin).parent.parent if spec and spec.origin else None
    out: dict[str, Any] = {"path": str(folder) if folder else None}
    if folder is not None and (folder / ".git").exists():
        git = ["git", "-C", str(folder)]
        with contextlib.suppress(Exception):
            out["commit"] = subprocess.run(
                [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
            ).stdout.strip()
            dirty = subprocess.run(
                [*git, "status", "--porcelain", "bridge"], capture_output=True, text=True
            ).stdout
            out["uncommitted_changes_in_bridge"] = bool(dirty.strip())
    return out


def machine() -> dict[str, Any]:
    src = bridge_source()
    print(
        f"bridge code under test: {src['path']}"
        + (
            f" (commit {src['commit']}, uncommitted changes in bridge/: {src['uncommitted_changes_in_bridge']})"
            if "commit" in src
            else ""
        ),
        flush=True,
    )
    return {
        "bridge_source": src,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "note": "2-core machine shared with other sessions running test suites: absolute figures are pessimistic and noisy; ratios were measured in the same run",
    }


def add_output_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="FILE",
        help="also write the results as JSON (to FILE, or to stdout after the table when no FILE)",
    )
    ap.add_argument("--keep", type=Path, help="use this folder for data (kept) instead of a temporary one")


def emit_json(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    doc.setdefault("machine", {})["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if not args.json:
        return
    data = orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)
    if args.json == "-":
        print(data.decode())
    else:
        Path(args.json).write_bytes(data)
        print(f"JSON results written to {args.json}")


def spawn(target: Callable[..., None], *args: Any, name: str = "load") -> Any:
    proc = MP.Process(target=target, args=args, daemon=True, name=name)
    proc.start()
    register(proc.pid, name)
    return proc


def reap(procs: list[Any], grace: float = 10) -> None:
    for proc in procs:
        proc.join(grace)
        if proc.is_alive():
            end_pid(proc.pid, 2)
        unregister(proc.pid)


def get_q(q: Any, timeout: float, what: str) -> Any:
    try:
        return q.get(timeout=max(0.1, timeout))
    except queue.Empty:
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}") from None


# ----------------------------------------------------------------------------------------------------
# py-spy
# ----------------------------------------------------------------------------------------------------
def pyspy_exe() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def start_pyspy(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    exe = pyspy_exe()
    if exe is None:
        raise RuntimeError("py-spy not found: pip install py-spy")
    argv = [exe, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "200", "-f", "raw", "-o", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    register(proc.pid, "py-spy")
    time.sleep(1.0)  # attach before the load starts
    return proc


def interrupt_pyspy(proc: subprocess.Popen[bytes]) -> None:
    """End a recording early: on SIGINT py-spy writes what it has."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGINT)
    finish_pyspy(proc, 0)


def finish_pyspy(proc: subprocess.Popen[bytes], seconds: float) -> None:
    try:
        proc.wait(seconds + 30)
    except subprocess.TimeoutExpired:
        end_pid(proc.pid, 5)
    unregister(proc.pid)


def _category(path: str) -> str:
    """py-spy prints paths relative to sys.path entries: bridge/..., amqtt/..., asyncio/..."""
    p = "/" + path
    if "/bridge/" in p and "site-packages" not in p:
        return "bridge"
    if "/amqtt/" in p:
        return "amqtt"
    if "/asyncio/" in p or p.endswith(("/ssl.py", "/selectors.py")):
        return "asyncio/ssl"
    if "/transitions/" in p:
        return "amqtt deps (transitions)"
    return "other (stdlib, threads, libs)"


def _short(path: str) -> str:
    repo = str(Path(__file__).resolve().parent.parent) + "/"  # this checkout, wherever it is
    for marker in ("site-packages/", "/lib/python3.11/", repo):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


# Leaf source lines of a thread blocked with the GIL released: a queue's get, a poll, a wait, and a
# lock's acquire (a Condition.wait, as in the password checkers' idle pool, ends in one).
_WAIT = re.compile(r"\.get\((block=True)?\)|\.poll\(|\.select\(|\.wait\(|\.acquire\(")


@functools.cache
def _source_line(path: str, line: int) -> str:
    repo = Path(__file__).resolve().parent.parent  # bridge/ (an editable install is not on sys.path)
    for base in [str(repo), *sys.path]:
        candidate = Path(base or ".") / path
        if candidate.is_file():
            return linecache.getline(str(candidate), line)
    return ""


def _is_wait(raw: str) -> bool:
    """A leaf frame blocked in a queue get / epoll / wait with the GIL released: idle, although
    py-spy sometimes samples such threads as active (e.g. while they wake up for the GIL)."""
    rest = raw.rpartition(" (")[2].rstrip(")")
    path, _, line = rest.rpartition(":")
    return line.isdigit() and bool(_WAIT.search(_source_line(path, int(line))))


def _frame(raw: str) -> tuple[str, str, str]:
    """'func (path:line)' -> (func, short path, category)."""
    func, _, rest = raw.rpartition(" (")
    path = rest.rstrip(")").rsplit(":", 1)[0]
    if not func:
        return raw, "", "other (stdlib, threads, libs)"
    return func, _short(path), _category(path)


# entry frames every sample of the main thread has: not hotspots
_ENTRY = {("<module>", "bridge/__main__.py"), ("main", "bridge/cli.py"), ("run", "bridge/app.py")}


def _thread(frames: list[tuple[str, str, str]]) -> str:
    names = {f[0] for f in frames}
    if "BaseEventLoop.run_forever" in names or "Runner.run" in names:  # uvloop's loop is native
        return "event loop thread"
    if "Store._write_loop" in names:
        return "SQLite writer thread"
    if "_worker" in names:
        return "executor threads (SQLite reads, to_thread)"
    return "other threads"


def analyse_profile(raw_file: Path, top: int = 10) -> dict[str, Any]:
    """Self time (leaf frame) by category, the top leaf functions of each category, and the bridge's
    functions by inclusive time (a bridge leaf includes the C calls it makes: SQLite, orjson)."""
    leaf: Counter[tuple[str, str, str]] = Counter()
    inclusive: Counter[tuple[str, str, str]] = Counter()
    threads: Counter[str] = Counter()
    total = waiting = 0
    for line in raw_file.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        raw_frames = [f for f in stack.split(";") if f]
        if not raw_frames:
            continue
        if _is_wait(raw_frames[-1]):
            waiting += count
            continue
        frames = [_frame(f) for f in raw_frames]
        total += count
        leaf[frames[-1]] += count
        threads[_thread(frames)] += count
        for f in set(frames):
            if (f[0], f[1]) not in _ENTRY:
                inclusive[f] += count
    if not total:
        return {"samples": 0}
    share: Counter[str] = Counter()
    for (_func, _path, cat), n in leaf.items():
        share[cat] += n

    def pct(n: int) -> float:
        return round(100 * n / total, 1)

    def rows(counter: Counter[tuple[str, str, str]], cat: str | None) -> list[dict[str, Any]]:
        items = [(k, n) for k, n in counter.most_common() if cat is None or k[2] == cat]
        return [{"function": f"{k[0]} ({k[1]})", "category": k[2], "pct": pct(n)} for k, n in items[:top]]

    return {
        "samples": total,
        "samples_waiting_excluded": waiting,
        "by_thread_pct": {name: pct(n) for name, n in threads.most_common()},
        "self_by_category_pct": {cat: pct(n) for cat, n in share.most_common()},
        "top_self_overall": rows(leaf, None),
        "top_self_bridge": rows(leaf, "bridge"),
        "top_self_amqtt": rows(leaf, "amqtt"),
        "top_self_asyncio_ssl": rows(leaf, "asyncio/ssl"),
        "top_inclusive_bridge": rows(inclusive, "bridge"),
    }


def print_profile(prof: dict[str, Any], what: str) -> None:
    print(
        f"\npy-spy profile of the bridge under {what} ({prof.get('samples', 0)} busy samples at 200 Hz;"
        f" {prof.get('samples_waiting_excluded', 0)} samples of threads blocked in a queue/epoll wait left out)"
    )
    if not prof.get("samples"):
        return
    print("  samples by thread: " + ", ".join(f"{k} {v}%" for k, v in prof["by_thread_pct"].items()))
    print(
        "  self time by category: " + ", ".join(f"{k} {v}%" for k, v in prof["self_by_category_pct"].items())
    )
    for key, title in (
        ("top_self_overall", "top self time, all code"),
        ("top_self_bridge", "top self time in bridge/"),
        ("top_inclusive_bridge", "top inclusive time in bridge/"),
        ("top_self_amqtt", "top self time in amqtt"),
        ("top_self_asyncio_ssl", "top self time in asyncio/ssl"),
    ):
        print(f"  {title}:")
        for r in prof[key]:
            print(
                f"    {r['pct']:5.1f}%  {r['function']}"
                + ("" if key != "top_self_overall" else f"  [{r['category']}]")
            )


async def serve_until_stopped(ready_line: str, seconds: float) -> None:
    """For a bare comparison server: announce readiness, then run until SIGTERM/SIGINT or `seconds`."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(ready_line, flush=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def serve_app(app: Any, port: int, seconds: float) -> None:
    """A bare aiohttp application as a comparison server on 127.0.0.1:`port`, until stopped."""
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, port).start()
    await serve_until_stopped(f"bare ready pid={os.getpid()}", seconds)
    await runner.cleanup()


def finish(work: Path, keep: Path | None) -> None:
    """End every process this bench started and remove its data unless `--keep` was given."""
    end_all()
    if keep is None:
        shutil.rmtree(work, ignore_errors=True)
