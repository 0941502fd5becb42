"""Scale-out (issue #15): the same MQTT load as bench_mqtt.py through the embedded broker, through a
RabbitMQ cluster with one and with two bridge workers, and through the engine alone (the ceiling).

    python scripts/bench_scale.py [--things 20] [--count 20000] [--rounds 1]
                                  [--targets embedded external-1 external-2 engine] [--json [FILE]]

Load (bench_mqtt.py's publishers, identical for every target): `--things` things, each its own
TLS connection with its own client certificate, publish `--size`-byte QoS 1 messages on
`things/<id>/collect`, `--inflight` unacknowledged at a time per connection, from `--procs`
processes. In external mode the publisher processes alternate between the two engine nodes.

Targets:
* `embedded`: `thingbridge serve` with its own broker (SQLite store).
* `external-1`: a 2-node RabbitMQ cluster (tests/engine.py, its own folder and ports) and one
  bridge process in `mqtt.mode: external` (SQLite store): the devices' messages go through the
  engine into the bridge's mirrored queue, the bridge commits and acknowledges them.
* `external-2`: the same with a second bridge process on the same store and queue.
* `engine`: the engine alone: the same publishes into the same mirrored queue, which no bridge
  consumes (a process of the bridge's code answers the engine's auth backend only).

Figures: acknowledged msg/s (PUBACKs the devices got / the time they took), persisted msg/s (rows
committed / (last commit - start), bridge targets), CPU per message of the bridge processes and
of the engine's nodes. Every process the bench starts is ended by pid; `--max-seconds` bounds it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import bench_common as bc
import bench_mqtt as bm
import orjson
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.engine: the cluster harness

from tests.engine import RabbitCluster, rabbitmq_missing

TARGETS = ("embedded", "external-1", "external-2", "engine")
COLUMNS = [
    ("target", "target"),
    ("acked", "acked"),
    ("acked_per_s", "acked/s"),
    ("persisted_per_s", "persisted/s"),
    ("bridge_cpu_us_per_msg", "bridge CPU us/msg"),
    ("engine_cpu_us_per_msg", "engine CPU us/msg"),
    ("loadavg", "load"),
]


class TreeCpu:
    """CPU time (user+sys) of some processes and all their descendants (an engine node is a
    wrapper, the Erlang VM and helpers) between start() and stop()."""

    def __init__(self, pids: list[int]) -> None:
        self.roots = [psutil.Process(pid) for pid in pids]
        self.cpu0 = 0.0

    def _now(self) -> float:
        total = 0.0
        for root in self.roots:
            for proc in [root, *root.children(recursive=True)]:
                try:
                    times = proc.cpu_times()
                    total += times.user + times.system
                except psutil.Error:
                    pass
        return total

    def start(self) -> TreeCpu:
        self.cpu0 = self._now()
        return self

    def stop(self) -> float:
        return self._now() - self.cpu0


def run_load(a: argparse.Namespace, fleet: bc.Fleet, ports: list[int], run: int) -> dict[str, Any]:
    """bench_mqtt's publishers, QoS 1, as fast as acknowledgements allow; returns their tallies."""
    per_conn = max(1, a.count // a.things)
    ready_q, result_q = bc.MP.Queue(), bc.MP.Queue()
    start_evt, stop_evt = bc.MP.Event(), bc.MP.Event()
    things = [(i, tid, str(pem)) for i, (tid, pem) in enumerate(fleet.things[: a.things])]
    n_procs = max(1, min(a.procs, a.things))
    procs = []
    try:
        for p in range(n_procs):
            spec = {
                "port": ports[p % len(ports)],
                "ca": str(fleet.ca_file),
                "things": things[p::n_procs],
                "qos": 1,
                "per_conn": per_conn,
                "inflight": a.inflight,
                "size": a.size,
                "run": run,
                "interval": 0.0,
                "timeout": a.timeout,
            }
            procs.append(
                bc.spawn(bm.publisher_main, spec, ready_q, start_evt, stop_evt, result_q, name="pub")
            )
        for _ in range(n_procs):
            kind, _pid, info = bc.get_q(ready_q, 120, "publishers to connect")
            if kind != "pub":
                raise RuntimeError(f"publisher failed: {info}")
        time.sleep(0.5)
        t0 = time.time()
        start_evt.set()
        pubs = [bc.get_q(result_q, a.timeout + 60, "publisher results") for _ in range(n_procs)]
    finally:
        stop_evt.set()
        bc.reap(procs)
    for pub in pubs:
        if pub.get("error"):
            raise RuntimeError(f"publisher failed: {pub['error']}")
    acked = sum(p["acked"] for p in pubs)
    t_end = max(p["t_end"] for p in pubs)
    return {"t0": t0, "total": per_conn * len(things), "acked": acked, "acked_s": t_end - t0}


def wait_persisted(db: Path, run: int, t0: float, total: int, timeout: float) -> tuple[int, float | None]:
    """Poll the store until the run's rows are all committed (or `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        rows, last = bm.persisted(db, run, t0)
        if rows >= total or time.monotonic() > deadline:
            return rows, last
        time.sleep(0.2)


def measure(
    a: argparse.Namespace,
    name: str,
    fleet: bc.Fleet,
    ports: list[int],
    run: int,
    bridges: list[int],
    engine: list[int],
) -> dict[str, Any]:
    bridge_cpu = TreeCpu(bridges).start() if bridges else None
    engine_cpu = TreeCpu(engine).start() if engine else None
    load = run_load(a, fleet, ports, run)
    row: dict[str, Any] = {
        "target": name,
        "acked": load["acked"],
        "acked_per_s": bc.rnd(load["acked"] / load["acked_s"], 1) if load["acked_s"] > 0 else None,
        "loadavg": round(os.getloadavg()[0], 2),
    }
    if bridges:
        rows, last = wait_persisted(fleet.db_path, run, load["t0"], load["acked"], a.timeout)
        row["persisted"] = rows
        row["persisted_per_s"] = bc.rnd(rows / (last - load["t0"]), 1) if rows and last else None
    msgs = max(load["acked"], 1)
    if bridge_cpu is not None:
        row["bridge_cpu_us_per_msg"] = bc.rnd(1e6 * bridge_cpu.stop() / msgs, 1)
    if engine_cpu is not None:
        row["engine_cpu_us_per_msg"] = bc.rnd(1e6 * engine_cpu.stop() / msgs, 1)
    print(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "target"), flush=True)
    return row


def serve_auth(config: str, seconds: float) -> None:
    """The engine's auth backend alone, with the bridge's own code and installation (for `engine`)."""
    from bridge import config as bridge_config
    from bridge.app import open_store
    from bridge.core.service import Core
    from bridge.mqtt.external.auth import Logins, start_external_auth

    async def main() -> None:
        cfg = bridge_config.load(Path(config))
        store = open_store(cfg)
        try:
            listener = await start_external_auth(cfg, Core(cfg, store), Logins())
            assert listener is not None
            await bc.serve_until_stopped(f"auth ready port={listener.port}", seconds)
            await listener.stop()
        finally:
            await asyncio.to_thread(store.close)

    asyncio.run(main())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    srv = sub.add_parser("serve-auth", help=argparse.SUPPRESS)
    srv.add_argument("--config", required=True)
    srv.add_argument("--seconds", type=float, default=3600)
    ap.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    ap.add_argument("--things", type=int, default=20, help="publishing things (TLS connections)")
    ap.add_argument("--count", type=int, default=20000, help="messages per run (all things together)")
    ap.add_argument("--size", type=int, default=100, help="payload bytes")
    ap.add_argument("--inflight", type=int, default=10, help="QoS 1 window per connection")
    ap.add_argument("--procs", type=int, default=2, help="publisher processes")
    ap.add_argument("--rounds", type=int, default=1, help="repeat all targets; the table shows medians")
    ap.add_argument("--timeout", type=float, default=120, help="bound of one run, seconds")
    ap.add_argument("--max-seconds", type=float, default=1800, help="hard bound of the whole bench")
    ap.add_argument("--profile", action="store_true", help="py-spy on the bridge worker of external-1")
    ap.add_argument("--profile-seconds", type=float, default=10)
    bc.add_output_args(ap)
    a = ap.parse_args()
    if a.cmd == "serve-auth":
        serve_auth(a.config, a.seconds)
        return 0
    bc.install_watchdog(a.max_seconds)
    external = [t for t in a.targets if t != "embedded"]
    if external and rabbitmq_missing():
        print(f"{rabbitmq_missing()}: running embedded only")
        a.targets, external = ["embedded"], []
    work = a.keep or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    cluster: RabbitCluster | None = None
    rows: list[dict[str, Any]] = []
    try:
        embedded = bc.provision(work / "embedded", a.things) if "embedded" in a.targets else None
        fleet = None
        if external:
            cluster = RabbitCluster(work / "engine-ca", bc.free_port())
            print("starting a 2-node RabbitMQ cluster ...", flush=True)
            cluster.start()
            folder = work / "external"
            cluster.bridge_certs(folder / "certs")
            fleet = bc.provision(
                folder, a.things, mqtt={"mode": "external", "external": cluster.external_config()}
            )
        run = 0
        for _round in range(a.rounds):
            for name in a.targets:
                run += 1
                rows.append(one_target(a, name, run, embedded, fleet, cluster, work))
    finally:
        bc.end_all()
        if cluster is not None:
            cluster.stop()
        bc.finish(work, a.keep)
    summary = aggregate(rows)
    print()
    print(bc.table(summary, COLUMNS))
    ratios = ratios_of(summary)
    for line in ratios:
        print(line)
    bc.emit_json(
        a,
        {
            "bench": "scale",
            "machine": bc.machine(),
            "source": bc.bridge_source(),
            "runs": rows,
            "summary": summary,
            "ratios": ratios,
            "args": {k: str(v) for k, v in vars(a).items()},
        },
    )
    return 0


def one_target(
    a: argparse.Namespace,
    name: str,
    run: int,
    embedded: bc.Fleet | None,
    fleet: bc.Fleet | None,
    cluster: RabbitCluster | None,
    work: Path,
) -> dict[str, Any]:
    if name == "embedded":
        assert embedded is not None
        server, ports = bc.start_bridge(embedded)
        try:
            bc.wait_outbox_empty(embedded.db_path)
            return measure(a, name, embedded, [ports["mqtt_tls"]], run, [server.pid], [])
        finally:
            server.stop()
    assert fleet is not None and cluster is not None
    nodes = [n.mqtts for n in cluster.nodes]
    engine = [n.proc.pid for n in cluster.nodes if n.proc is not None]
    if name == "engine":
        argv = [sys.executable, str(Path(__file__).resolve()), "serve-auth", "--config", str(fleet.config)]
        auth = bc.Server("auth", argv, "auth ready").start(60)
        try:
            return measure(a, name, fleet, nodes, run, [], engine)
        finally:
            purge(fleet, cluster)  # nobody consumed them: not for the next round's bridges
            auth.stop()
    first, _ports = bc.start_bridge(fleet)
    servers = [first]
    try:
        if name == "external-2":
            doc = orjson.loads(fleet.config.read_bytes())
            doc["mqtt"]["external"]["auth"] = {"enabled": False}  # the first one answers the engine
            second = fleet.folder / "broker-2.yaml"
            second.write_bytes(orjson.dumps(doc))
            servers.append(bc.start_bridge(fleet, config=second)[0])
        bc.wait_outbox_empty(fleet.db_path)
        spy = None
        if a.profile and name == "external-1":
            spy = bc.start_pyspy(first.pid, a.profile_seconds, work / "external-1.pyspy")
        row = measure(a, name, fleet, nodes, run, [s.pid for s in servers], engine)
        if spy is not None:
            bc.finish_pyspy(spy, a.profile_seconds)
            bc.print_profile(bc.analyse_profile(work / "external-1.pyspy"), "external-1 bridge worker")
        return row
    finally:
        for server in reversed(servers):
            server.stop()


def purge(fleet: bc.Fleet, cluster: RabbitCluster) -> None:
    """Empty the bridge's queue through the management API, as the bridge's engine user."""
    ext = orjson.loads(fleet.config.read_bytes())["mqtt"]["external"]
    url = f"{cluster.nodes[0].management_url}/api/queues/%2F/thingbridge.devices/contents"
    request = urllib.request.Request(
        url, method="DELETE", headers=bc.basic_auth(ext["username"], ext["password"])
    )
    with urllib.request.urlopen(request, timeout=30):
        pass


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median over rounds per target."""
    out = []
    for name in TARGETS:
        group = [r for r in rows if r["target"] == name]
        if not group:
            continue
        agg: dict[str, Any] = {"target": name, "rounds": len(group)}
        for key, _h in COLUMNS[1:]:
            values = [r.get(key) for r in group]
            if any(v is not None for v in values):
                agg[key] = bc.rnd(bc.median(values), 1)
        out.append(agg)
    return out


def ratios_of(summary: list[dict[str, Any]]) -> list[str]:
    by = {r["target"]: r for r in summary}

    def rate(name: str) -> float | None:
        row = by.get(name, {})
        return row.get("persisted_per_s") or row.get("acked_per_s")

    lines = []
    for name, ref in (
        ("external-1", "embedded"),
        ("external-2", "external-1"),
        ("external-2", "engine"),
        ("external-1", "engine"),
        ("embedded", "engine"),
    ):
        value = bc.ratio(rate(name), rate(ref))
        if value is not None:
            lines.append(f"{name} / {ref}: {value:.2f}x")
    return lines


if __name__ == "__main__":
    sys.exit(main())
