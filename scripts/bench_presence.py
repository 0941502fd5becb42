"""Presence in external mode (issue #15): how fast the one bridge worker that applies the engine's
connection events gets through a backlog of them.

    python scripts/bench_presence.py [--things 200]

A 2-node RabbitMQ cluster (tests/engine.py, its own folder and ports), one bridge process that
answers the engine's auth backend (`presence: false`) and one worker on its store (SQLite) that
applies the events. The worker is started once (it declares the presence queue) and killed; the
bench takes the queue (its single active consumer, holding one event); `--things` things connect
(alternating nodes, over TLS with their certificates) and disconnect, so 2 x things events wait;
the worker is started again, and once it is ready the bench lets the queue go to it. Figures: the
events the worker applied per second until the last, its CPU time per event (from its ready line:
its start-up is not counted), the load average.
Every process the bench starts is ended by pid."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aio_pika
import psutil
from yarl import URL

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.engine: the cluster harness

from bridge.config import ExternalConfig
from bridge.mqtt.external.presence import queue_name
from tests.engine import RabbitCluster, free_port, rabbitmq_missing
from tests.helpers import account, call, create_thing, ok, token, until


async def events(bridge: Any, admin: str) -> int:
    stats = ok(await call("GET", f"{bridge.api}/broker/stats", admin))
    return int(stats["presenceEvents"])


async def bench(work: Path, things: int) -> dict[str, Any]:
    cluster = RabbitCluster(work / "engine-ca", free_port())
    cluster.start()
    started: list[Any] = []
    try:
        (work / "answering").mkdir()
        answering = cluster.bridge(work / "answering", {**cluster.external_config(), "presence": False})
        answering.start(timeout=60)
        started.append(answering)
        owner = account(answering)
        answering.cli("plan", "set", owner.name, "--things", str(things))
        window = asyncio.Semaphore(8)

        async def one(i: int) -> Any:
            async with window:
                return await create_thing(answering, owner.token, work / "things" / str(i))

        fleet = await asyncio.gather(*(one(i) for i in range(things)))
        (work / "worker").mkdir()
        worker = cluster.worker(answering, work / "worker", cluster.external_config())
        started.append(worker)
        worker.start(timeout=60)  # declares the presence queue
        worker.kill()
        ext = cluster.external_config()
        url = URL(cluster.nodes[0].amqp_url).with_user(ext["username"]).with_password(ext["password"])
        async with await aio_pika.connect(url) as holder:
            # the queue's active consumer until the worker is ready: it holds one event, unacknowledged
            channel = await holder.channel()
            await channel.set_qos(prefetch_count=1)
            await (
                await channel.get_queue(
                    queue_name(ExternalConfig(queue=ext.get("queue", "thingbridge.devices")))
                )
            ).consume(lambda _: asyncio.sleep(0))
            async with contextlib.AsyncExitStack() as stack:
                for i, thing in enumerate(fleet):
                    await stack.enter_async_context(cluster.nodes[i % 2].thing_client(thing))
            worker.start(timeout=60)
            admin = await token(worker)
            cpu = psutil.Process(worker.proc.pid)
            cpu_ready = sum(cpu.cpu_times()[:2])
        handed, before = time.monotonic(), await events(worker, admin)  # the queue is the worker's now

        async def all_applied() -> int | None:
            applied = await events(worker, admin)
            return applied if applied >= 2 * things else None

        applied = await until(all_applied, "every event applied", 600)
        elapsed, cpu_used = time.monotonic() - handed, sum(cpu.cpu_times()[:2]) - cpu_ready
        return {
            "things": things,
            "events": applied,
            "before_handed": before,
            "events_per_s": round((applied - before) / elapsed),
            "cpu_us_per_event": round(cpu_used / (applied - before) * 1e6),
            "loadavg": round(os.getloadavg()[0], 1),
        }
    finally:
        for bridge in started:
            bridge.kill()
        cluster.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--things", type=int, default=200)
    args = parser.parse_args()
    why = rabbitmq_missing()
    if why is not None:
        print(why, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-presence-") as work:
        print(asyncio.run(bench(Path(work), args.things)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
