"""Compose and run the one process: store, core, broker, HTTP; stop cleanly on SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys

import orjson
from aiohttp import web

from bridge.config import Config
from bridge.core.accounts import generate_password
from bridge.core.errors import NotFound
from bridge.core.service import Core
from bridge.http.app import https_context, make_app
from bridge.mqtt.broker import PLAIN, TLS, MqttBroker
from bridge.store import Store

log = logging.getLogger("thingbridge")


def open_store(cfg: Config) -> Store:
    store = Store(cfg.db_path, cfg.store.synchronous.upper())
    store.open()
    return store


async def ensure_admin(core: Core) -> None:
    """First start: an `admin` user, password from THINGBRIDGE_ADMIN_PASSWORD or generated and
    shown once (it is stored only as a hash)."""
    try:
        await core.accounts.user_by_name("admin")
        return
    except NotFound:
        pass
    password = os.environ.get("THINGBRIDGE_ADMIN_PASSWORD") or generate_password()
    await core.accounts.create_user("admin", password, role="admin")
    if "THINGBRIDGE_ADMIN_PASSWORD" not in os.environ:
        print(
            f"Created user 'admin' with password: {password}  (shown once; it is stored hashed)", flush=True
        )


async def _start_site(runner: web.AppRunner, host: str, port: int, ctx: object = None) -> int:
    before = set(map(tuple, runner.addresses))
    await web.TCPSite(runner, host, port, ssl_context=ctx).start()
    (new,) = [a for a in map(tuple, runner.addresses) if a not in before]
    return new[1]


async def serve(cfg: Config) -> int:
    store = open_store(cfg)
    core = Core(cfg, store)
    core.ca.ensure_server_cert(cfg.pki.server_names)
    await ensure_admin(core)

    mqtt = MqttBroker(cfg, core)
    await mqtt.start()
    core.attach(mqtt)
    await core.presence.restore()
    await core.status.republish_all()
    core.outbox.start()
    await mqtt.listen()

    # keepalive_timeout also bounds a request head that never completes (slow-loris); aiohttp's
    # default is an hour. A running handler (a long-poll) is not cut by it.
    runner = web.AppRunner(make_app(core), access_log=None, shutdown_timeout=5, keepalive_timeout=10)
    await runner.setup()
    ports = {"mqtt_tls": mqtt.ports.get(TLS), "mqtt_plain": mqtt.ports.get(PLAIN)}
    if cfg.http.http.enabled:
        ports["http"] = await _start_site(runner, cfg.http.http.host, cfg.http.http.port)
    if cfg.http.https.enabled:
        ports["https"] = await _start_site(
            runner, cfg.http.https.host, cfg.http.https.port, https_context(core)
        )
    core.endpoints.mqtt_tls_port = ports["mqtt_tls"] or cfg.mqtt.tls.port
    core.endpoints.http_port = ports.get("http") or cfg.http.http.port
    core.endpoints.https_port = ports.get("https")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Everything built so far lives as long as the process: keep it out of the collector's scans
    # (with thousands of sessions, full collections paused the loop for seconds).
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)  # fewer young collections under load (default 700)
    # One machine-readable line: tests and supervisors learn the bound ports from it.
    print("thingbridge ready " + orjson.dumps({"pid": os.getpid(), **ports}).decode(), flush=True)
    await stop.wait()

    log.info("stopping: closing listeners, flushing writes")
    await runner.cleanup()
    await mqtt.stop()
    await core.outbox.stop()
    await asyncio.to_thread(store.close)
    log.info("stopped")
    return 0


def run(cfg: Config) -> int:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # amqtt logs every connection at INFO and stack traces for refused clients; keep ours readable.
    logging.getLogger("amqtt").setLevel(logging.ERROR)
    logging.getLogger("transitions").setLevel(logging.WARNING)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(serve(cfg))
    return 0
