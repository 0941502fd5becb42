"""Provisioning at a production line's scale (issue #12, "Scale"): a CSV import of serial numbers,
device activations, and ranged content downloads, against the real `thingbridge serve`.

    python scripts/bench_provisioning.py [--serials 100000] [--activations 5000] [--concurrency 32]
                                         [--content-mib 50] [--devices 20] [--profile PHASE] [--json [FILE]]

Set-up through the real CLI and HTTP: user `bench` (bench_common), `thingbridge plan set` (room for
the things the activations make), `thingbridge vendor add`, then over HTTP (/provision) a model.
Phases, each on the same server, 127.0.0.1 only:
  import     one POST /manage/model/{model}/ with a text/csv body of `--serials` lines <sn>,<extra>;
             a reader polls the serial-number count in SQLite meanwhile (one transaction: it must
             only ever see 0 or all), the server's RSS is read from /proc/<pid>/status every 10 ms.
             Reference: the same CSV parsed and inserted with executemany into a copy of the table
             by sqlite3 in this process, one transaction, synchronous=FULL (the storage floor).
  activate   `--activations` serial numbers get a client (enable=true&owner=, timed too), then
             POST /provision/activate over one keep-alive aiohttp session, `--concurrency` at once;
             each answers a 40-hex CIK and makes a thing of the vendor's owner (counted after).
             Reference: a bare aiohttp handler parsing the same form and answering a random CIK.
  download   a `--content-mib` MiB content is uploaded, then `--devices` activated devices (own
             keep-alive session each, their CIK) each download all of it in `--range-mib` MiB Range
             requests on GET /provision/download, every range checked byte for byte; server RSS
             peak growth over the phase (sampled VmRSS, and VmHWM when it rose).
             Reference: bare aiohttp FileResponse serving the same blob file to the same load.
Targets: import >= 50,000 serial numbers/s, activations >= 500/s, download RSS growth < 20 MiB.
`--profile import|activate|download` records that bridge phase with py-spy and prints where the
time went. `--max-seconds` bounds the whole bench; only processes it started are ended, by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import os
import re
import secrets
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import bench_common as bc

TIMEOUT = aiohttp.ClientTimeout(total=600)
MIB = 2**20
PHASES = ("import", "activate", "download")
_CIK = re.compile(r"[0-9a-f]{40}")


# ----------------------------------------------------------------------------------------------------
# the bare reference server (this file with `serve-bare`)
# ----------------------------------------------------------------------------------------------------
def serve_bare(a: argparse.Namespace) -> None:
    from aiohttp import web

    async def activate(request: web.Request) -> web.Response:
        form = await request.post()
        if not all(form.get(k) for k in ("vendor", "model", "sn")):
            return web.Response(status=400)
        return web.Response(text=secrets.token_hex(20), content_type="text/plain")

    async def download(request: web.Request) -> web.FileResponse:
        return web.FileResponse(a.file)

    app = web.Application()
    app.router.add_post("/provision/activate", activate)
    app.router.add_get("/provision/download", download)
    asyncio.run(bc.serve_app(app, a.port, a.seconds))


# ----------------------------------------------------------------------------------------------------
# the server's memory: VmRSS sampled from /proc/<pid>/status, VmHWM as the kernel's exact peak
# ----------------------------------------------------------------------------------------------------
class Rss:
    def __init__(self, pid: int, every: float = 0.01) -> None:
        self.pid, self.every = pid, every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Rss:
        self.before = bc.proc_status_mib(self.pid, "VmRSS")
        self.hwm_before = bc.proc_status_mib(self.pid, "VmHWM")
        self.peak = self.before

        def sample() -> None:
            while not self._stop.wait(self.every):
                self.peak = max(self.peak, bc.proc_status_mib(self.pid, "VmRSS"))

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1)
        hwm = bc.proc_status_mib(self.pid, "VmHWM")
        peak = max(self.peak, bc.proc_status_mib(self.pid, "VmRSS"), hwm if hwm > self.hwm_before else 0)
        return {
            "rss_before_mib": round(self.before, 1),
            "rss_peak_mib": round(peak, 1),
            "rss_growth_mib": round(peak - self.before, 1),
        }


# ----------------------------------------------------------------------------------------------------
# set-up through the CLI and HTTP
# ----------------------------------------------------------------------------------------------------
def cli(fleet: bc.Fleet, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "bridge", *args, "--config", str(fleet.config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if out.returncode != 0:
        raise RuntimeError(f"thingbridge {' '.join(args)} failed: {out.stderr}{out.stdout}")
    return out.stdout


def add_vendor(fleet: bc.Fleet, name: str) -> str:
    """`thingbridge vendor add`: the token it prints once."""
    found = re.search(
        r"^X-Exosite-Token: (\S+)$", cli(fleet, "vendor", "add", name, "--owner", bc.USER), re.M
    )
    if found is None:
        raise RuntimeError("vendor add printed no token")
    return found[1]


async def expect(resp: aiohttp.ClientResponse, status: int, what: str) -> bytes:
    body = await resp.read()
    if resp.status != status:
        raise RuntimeError(f"{what}: {resp.status} {body[:300]!r}")
    return body


def csv_body(n: int) -> bytes:
    """What a production line exports: serial number and a batch note per line."""
    out = io.StringIO()
    csv.writer(out).writerows((f"SN-{i:08d}", f"line 3, batch {i // 1000}") for i in range(n))
    return out.getvalue().encode()


def sn(i: int) -> str:
    return f"SN-{i:08d}"


# ----------------------------------------------------------------------------------------------------
# phase 1: the CSV import
# ----------------------------------------------------------------------------------------------------
def count(db: Path, sql: str) -> int:
    """A count read from the bridge's SQLite file (read-only, beside the running server)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql).fetchone()[0]
    finally:
        conn.close()


SERIALS = "SELECT count(*) FROM serial_numbers"
ACTIVATED_THINGS = "SELECT count(*) FROM things WHERE id LIKE 'sn-%'"


async def import_phase(
    a: argparse.Namespace, base: str, headers: dict[str, str], model: str, env: Env
) -> dict[str, Any]:
    body = csv_body(a.serials)
    seen: Counter[int] = Counter()
    stop = threading.Event()

    def poll() -> None:  # a reader: the import is one transaction if it sees 0 or all, never between
        while not stop.wait(0.05):
            seen[count(env.fleet.db_path, SERIALS)] += 1

    poller = threading.Thread(target=poll, daemon=True)
    rss = Rss(env.server.pid).start()
    mon = bc.Monitor(env.server.pid).start()
    poller.start()
    t0 = time.perf_counter()
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
        s.post(
            f"{base}/manage/model/{model}/", data=body, headers={**headers, "Content-Type": "text/csv"}
        ) as r,
    ):
        await expect(r, 205, "CSV import")
    elapsed = time.perf_counter() - t0
    stop.set()
    poller.join(5)
    usage, mem = mon.stop(), rss.stop()
    stored = count(env.fleet.db_path, SERIALS)
    partial = sorted(k for k in seen if k not in (0, a.serials))
    if stored != a.serials:
        raise RuntimeError(f"import stored {stored} serial numbers, not {a.serials}")
    return {
        "target": "bridge",
        "serials": a.serials,
        "body_mib": round(len(body) / MIB, 2),
        "elapsed_s": round(elapsed, 3),
        "per_s": round(a.serials / elapsed),
        "reader_saw": dict(sorted(seen.items())),
        "partial_counts_seen": len(partial) if seen else None,  # None: the reader had no chance
        "server_cpu_s": usage["server_cpu_s"],
        **mem,
    }


def import_reference(a: argparse.Namespace, env: Env, work: Path) -> dict[str, Any]:
    """The same CSV parsed and inserted by sqlite3 here, into a copy of the bridge's table."""
    src = sqlite3.connect(f"file:{env.fleet.db_path}?mode=ro", uri=True)
    try:
        ddl = [
            r[0]
            for r in src.execute(
                "SELECT sql FROM sqlite_master WHERE tbl_name = 'serial_numbers' AND sql IS NOT NULL"
            )
        ]
    finally:
        src.close()
    db = work / "reference.sqlite"
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=OFF")  # the model row lives in the bridge's file
        for statement in ddl:
            conn.execute(statement)
        body = csv_body(a.serials)
        t0 = time.perf_counter()
        rows = csv.reader(io.StringIO(body.decode()))
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO serial_numbers (model_pk, sn, extra) VALUES (1,?,?)", ((r[0], r[1]) for r in rows)
        )
        conn.execute("COMMIT")
        elapsed = time.perf_counter() - t0
    finally:
        conn.close()
    return {
        "target": "sqlite3 executemany",
        "serials": a.serials,
        "elapsed_s": round(elapsed, 3),
        "per_s": round(a.serials / elapsed),
    }


# ----------------------------------------------------------------------------------------------------
# phase 2: enable, then activate over keep-alive
# ----------------------------------------------------------------------------------------------------
async def gather_bounded(n: int, concurrency: int, one: Any) -> dict[str, Any]:
    """`one(i)` for i in range(n), `concurrency` at a time: the rate overall and over the first and
    the last fifth of the answers (each activation adds a thing to the owner's registry: the last
    fifth shows what a larger registry costs), latency p50/p99."""
    latencies: list[float] = [0.0] * n
    done: list[float] = []
    it = iter(range(n))

    async def worker() -> None:
        for i in it:
            t = time.perf_counter()
            await one(i)
            done.append(time.perf_counter())
            latencies[i] = done[-1] - t

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    fifth = max(1, n // 5)
    return {
        "elapsed_s": round(done[-1] - t0, 3),
        "per_s": round(n / (done[-1] - t0)),
        "per_s_first_fifth": round(fifth / (done[fifth - 1] - t0)),
        "per_s_last_fifth": round(fifth / max(done[-1] - done[-fifth - 1], 1e-9)) if n > fifth else None,
        "lat_p50_ms": bc.rnd(1000 * (bc.percentile(latencies, 50) or 0)),
        "lat_p99_ms": bc.rnd(1000 * (bc.percentile(latencies, 99) or 0)),
    }


async def enable_phase(
    a: argparse.Namespace, base: str, headers: dict[str, str], model: str
) -> dict[str, Any]:
    conn = aiohttp.TCPConnector(limit=a.concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=TIMEOUT, headers=headers) as s:

        async def one(i: int) -> None:
            form = {"enable": "true", "owner": "0" * 40}
            async with s.post(f"{base}/manage/model/{model}/{sn(i)}", data=form) as r:
                await expect(r, 200, f"enable {sn(i)}")

        return {"enabled": a.activations, **await gather_bounded(a.activations, a.concurrency, one)}


async def activate_phase(
    a: argparse.Namespace, name: str, env: Env, port: int, vendor: str, model: str
) -> tuple[dict[str, Any], list[str]]:
    base = f"http://{bc.HOST}:{port}/provision"
    ciks: list[str] = [""] * a.activations
    conn = aiohttp.TCPConnector(limit=a.concurrency)  # keep-alive: connections are reused
    mon = bc.Monitor(env.pid_of(name)).start()
    async with aiohttp.ClientSession(connector=conn, timeout=TIMEOUT) as s:

        async def one(i: int) -> None:
            form = {"vendor": vendor, "model": model, "sn": sn(i)}
            async with s.post(f"{base}/activate", data=form, headers={"User-Agent": "bench-device/1"}) as r:
                cik = (await expect(r, 200, f"activate {sn(i)}")).decode()
            if not _CIK.fullmatch(cik):
                raise RuntimeError(f"activate {sn(i)} answered {cik[:60]!r}, not a CIK")
            ciks[i] = cik

        rates = await gather_bounded(a.activations, a.concurrency, one)
    usage = mon.stop()
    row = {
        "target": name,
        "activations": a.activations,
        **rates,
        "server_cpu_us_per_req": round(1e6 * usage["server_cpu_s"] / a.activations),
    }
    return row, ciks


# ----------------------------------------------------------------------------------------------------
# phase 3: ranged downloads by concurrent devices
# ----------------------------------------------------------------------------------------------------
async def download_phase(
    a: argparse.Namespace, name: str, env: Env, port: int, query: dict[str, str], ciks: list[str], blob: bytes
) -> dict[str, Any]:
    size, step = len(blob), a.range_mib * MIB
    url = f"http://{bc.HOST}:{port}/provision/download"
    statuses: Counter[int] = Counter()

    async def device(cik: str) -> None:
        async with aiohttp.ClientSession(timeout=TIMEOUT, headers={"X-Exosite-CIK": cik}) as s:
            for start in range(0, size, step):
                end = min(start + step, size) - 1
                async with s.get(url, params=query, headers={"Range": f"bytes={start}-{end}"}) as r:
                    data = await r.read()
                    statuses[r.status] += 1
                if r.status != 206 or data != blob[start : end + 1]:
                    raise RuntimeError(f"{name}: range {start}-{end} answered {r.status}, {len(data)} bytes")

    pid = env.pid_of(name)
    rss, mon = Rss(pid).start(), bc.Monitor(pid).start()
    t0 = time.perf_counter()
    await asyncio.gather(*(device(cik) for cik in ciks))
    elapsed = time.perf_counter() - t0
    usage, mem = mon.stop(), rss.stop()
    total = size * len(ciks)
    return {
        "target": name,
        "devices": len(ciks),
        "requests": sum(statuses.values()),
        "elapsed_s": round(elapsed, 3),
        "mib_per_s": round(total / MIB / elapsed, 1),
        "server_cpu_s": usage["server_cpu_s"],
        **mem,
    }


# ----------------------------------------------------------------------------------------------------
# orchestration
# ----------------------------------------------------------------------------------------------------
class Env:
    """The servers under test: the bridge, and the bare reference once it is started."""

    def __init__(self, fleet: bc.Fleet, server: bc.Server) -> None:
        self.fleet, self.server = fleet, server
        self.bare: bc.Server | None = None

    def pid_of(self, name: str) -> int:
        server = self.server if name == "bridge" else self.bare
        if server is None:
            raise RuntimeError(f"{name} is not running")
        return server.pid


def start_bare(blob_file: Path) -> tuple[bc.Server, int]:
    port = bc.free_port()
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "serve-bare",
        "--port",
        str(port),
        "--file",
        str(blob_file),
    ]
    return bc.Server("bare-aiohttp", argv, "bare ready").start(60), port


def profiled(a: argparse.Namespace, phase: str, env: Env, work: Path, doc: dict[str, Any]) -> Any:
    """Start py-spy on the bridge when `phase` is the one to profile; a finisher to call after."""
    if a.profile != phase:
        return lambda: None
    out = work / f"bridge-{phase}.pyspy.raw"
    spy = bc.start_pyspy(env.server.pid, a.profile_seconds, out)

    def finish() -> None:
        bc.interrupt_pyspy(spy)
        if out.exists():
            doc["profile"] = bc.analyse_profile(out)

    return finish


async def run(
    a: argparse.Namespace, env: Env, work: Path, ports: dict[str, int], doc: dict[str, Any]
) -> None:
    base = f"http://{bc.HOST}:{ports['http']}/provision"
    vendor = f"bench-vendor-{secrets.token_hex(3)}"
    token = await asyncio.to_thread(add_vendor, env.fleet, vendor)
    headers = {"X-Exosite-Token": token}
    model = "bench-model"
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT, headers=headers) as s,
        s.post(f"{base}/manage/model/", data={"model": model, "rid": "0" * 40}) as r,
    ):
        await expect(r, 205, "create model")

    print(f"import: {a.serials:,} serial numbers in one text/csv request...", flush=True)
    finish = profiled(a, "import", env, work, doc)
    imp = await import_phase(a, base, headers, model, env)
    finish()
    ref = import_reference(a, env, work)
    doc["import"] = [imp, ref]
    print(
        f"  bridge {imp['per_s']:,}/s ({imp['elapsed_s']} s, {imp['body_mib']} MiB body), RSS +{imp['rss_growth_mib']} MiB,"
        f" reader saw counts {imp['reader_saw']}; sqlite3 alone {ref['per_s']:,}/s",
        flush=True,
    )

    print(f"activate: enabling {a.activations:,} serial numbers, then activating them...", flush=True)
    enable = await enable_phase(a, base, headers, model)
    finish = profiled(a, "activate", env, work, doc)
    act, ciks = await activate_phase(a, "bridge", env, ports["http"], vendor, model)
    finish()
    act["things_made"] = count(env.fleet.db_path, ACTIVATED_THINGS)
    blob = secrets.token_bytes(a.content_mib * MIB)
    blob_file = work / "blob.bin"
    blob_file.write_bytes(blob)
    env.bare, bare_port = start_bare(blob_file)
    try:
        bare, _ = await activate_phase(a, "bare", env, bare_port, vendor, model)
        doc["enable"], doc["activate"] = enable, [act, bare]
        print(
            f"  enable {enable['per_s']:,}/s; activate bridge {act['per_s']:,}/s (first fifth {act['per_s_first_fifth']:,}/s, last fifth {act['per_s_last_fifth']:,}/s, p99 {act['lat_p99_ms']} ms,"
            f" {act['things_made']:,} things made), bare aiohttp {bare['per_s']:,}/s",
            flush=True,
        )

        print(
            f"download: {a.content_mib} MiB content, {a.devices} devices, {a.range_mib} MiB ranges...",
            flush=True,
        )
        async with aiohttp.ClientSession(timeout=TIMEOUT, headers=headers) as s:
            form = {"id": "firmware", "description": "bench firmware"}
            async with s.post(f"{base}/manage/content/{model}/", data=form) as r:
                await expect(r, 205, "create content")
            with blob_file.open("rb") as f:
                async with s.post(
                    f"{base}/manage/content/{model}/firmware",
                    data=f,
                    headers={"Content-Type": "application/octet-stream"},
                ) as r:
                    await expect(r, 205, "upload content")
        query = {"vendor": vendor, "model": model, "id": "firmware"}
        devices = ciks[: a.devices]
        finish = profiled(a, "download", env, work, doc)
        down = await download_phase(a, "bridge", env, ports["http"], query, devices, blob)
        finish()
        bare_down = await download_phase(a, "bare", env, bare_port, query, devices, blob)
        doc["download"] = [down, bare_down]
        print(
            f"  bridge {down['mib_per_s']} MiB/s, RSS +{down['rss_growth_mib']} MiB; bare FileResponse"
            f" {bare_down['mib_per_s']} MiB/s, RSS +{bare_down['rss_growth_mib']} MiB",
            flush=True,
        )
    finally:
        env.bare.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    srv = sub.add_parser("serve-bare", help=argparse.SUPPRESS)
    srv.add_argument("--port", type=int, required=True)
    srv.add_argument("--file", type=Path, required=True)
    srv.add_argument("--seconds", type=float, default=3600, help="stop by itself after this long")
    ap.add_argument("--serials", type=int, default=100_000, help="serial numbers in the one CSV request")
    ap.add_argument("--activations", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=32, help="concurrent enables and activations")
    ap.add_argument("--content-mib", type=int, default=50)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--range-mib", type=int, default=1)
    ap.add_argument("--profile", choices=PHASES, help="record this bridge phase with py-spy")
    ap.add_argument("--profile-seconds", type=float, default=60, help="upper bound of the recording")
    ap.add_argument("--max-seconds", type=float, default=900, help="hard bound of the whole bench")
    bc.add_output_args(ap)
    a = ap.parse_args()
    if a.cmd == "serve-bare":
        serve_bare(a)
        return 0
    if not (1 <= a.devices <= a.activations <= a.serials <= 1_000_000 and 1 <= a.content_mib <= 1024):
        ap.error("need 1 <= --devices <= --activations <= --serials <= 1,000,000 and --content-mib 1..1024")
    bc.install_watchdog(a.max_seconds)
    work = a.keep or Path(tempfile.mkdtemp(prefix="bench-provisioning-"))
    doc: dict[str, Any] = {
        "bench": "provisioning",
        "machine": bc.machine(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "cmd"},
    }
    try:
        fleet = bc.provision(work / "bridge", 0)  # the default limits (provisioning.max_import_size)
        cli(fleet, "plan", "set", bc.USER, "--things", str(a.activations + 100))
        server, ports = bc.start_bridge(fleet)
        env = Env(fleet, server)
        try:
            bc.wait_outbox_empty(fleet.db_path)
            bc.wait_cpu_quiet(server.pid, timeout=10)
            asyncio.run(run(a, env, work, ports, doc))
        finally:
            server.stop()
        report(a, doc)
        bc.emit_json(a, doc)
    finally:
        bc.finish(work, a.keep)
    return 0


def report(a: argparse.Namespace, doc: dict[str, Any]) -> None:
    (imp, ref), (act, bare), (down, bare_down) = doc["import"], doc["activate"], doc["download"]
    print(f"\nprovisioning at scale; machine: {os.cpu_count()} cores, shared")
    print(
        bc.table(
            doc["import"],
            [
                ("target", "import"),
                ("serials", "serial numbers"),
                ("elapsed_s", "s"),
                ("per_s", "per s"),
                ("rss_growth_mib", "RSS growth MiB"),
                ("partial_counts_seen", "partial counts seen"),
            ],
        )
    )
    print()
    print(
        bc.table(
            doc["activate"],
            [
                ("target", "activate"),
                ("activations", "requests"),
                ("per_s", "per s"),
                ("per_s_first_fifth", "first 1/5 per s"),
                ("per_s_last_fifth", "last 1/5 per s"),
                ("lat_p50_ms", "p50 ms"),
                ("lat_p99_ms", "p99 ms"),
                ("server_cpu_us_per_req", "CPU us/req"),
            ],
        )
    )
    print()
    print(
        bc.table(
            doc["download"],
            [
                ("target", "download"),
                ("devices", "devices"),
                ("requests", "ranges"),
                ("mib_per_s", "MiB/s"),
                ("rss_before_mib", "RSS before MiB"),
                ("rss_peak_mib", "RSS peak MiB"),
                ("rss_growth_mib", "growth MiB"),
            ],
        )
    )
    doc["verdicts"] = [
        bc.verdict(f"CSV import of {a.serials:,} serial numbers", imp["per_s"], 50_000, "serial numbers/s"),
        bc.verdict(
            "CSV import in one transaction: counts between 0 and all a reader saw meanwhile",
            imp["partial_counts_seen"],
            1,
            "",
            lower_is_better=True,
        ),
        bc.verdict(f"activations, {a.concurrency} concurrent over keep-alive", act["per_s"], 500, "/s"),
        bc.verdict(
            f"activations, the last fifth (the owner has {a.activations * 4 // 5:,}+ things)",
            act["per_s_last_fifth"],
            500,
            "/s",
        ),
        bc.verdict(
            f"server RSS growth, {a.devices} devices x {a.content_mib} MiB in {a.range_mib} MiB ranges",
            down["rss_growth_mib"],
            20,
            "MiB",
            lower_is_better=True,
        ),
    ]
    doc["ratios"] = {
        "import bridge / sqlite3 executemany": bc.ratio(imp["per_s"], ref["per_s"]),
        "activate bridge / bare aiohttp": bc.ratio(act["per_s"], bare["per_s"]),
        "download MiB/s bridge / bare FileResponse": bc.ratio(down["mib_per_s"], bare_down["mib_per_s"]),
    }
    print("\nratios (same run): " + ", ".join(f"{k} {bc.fmt(v)}x" for k, v in doc["ratios"].items()))
    print("\ntargets:")
    bc.print_verdicts(doc["verdicts"])
    if "profile" in doc:
        bc.print_profile(doc["profile"], f"the {a.profile} phase")


if __name__ == "__main__":
    sys.exit(main())
