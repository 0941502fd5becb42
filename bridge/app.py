"""Compose and run the one process: store, core, broker, HTTP; stop cleanly on SIGINT/SIGTERM.
A start that cannot complete (a port in use, an unwritable folder) closes what it had opened and
ends with one line naming the setting to change."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from bridge.config import LOOKED_FOR, Config, ConfigError, Listener
from bridge.core.accounts import generate_password
from bridge.core.errors import Invalid, NotFound
from bridge.core.service import Core
from bridge.http.app import https_context, make_app
from bridge.mqtt.broker import PLAIN, TLS, MqttBroker
from bridge.mqtt.external.engine import ExternalEngine
from bridge.store import Store, StoreError
from bridge.store import create as create_store

LEFTOVER_WAIT = 2.0  # seconds the tasks still running at exit get to end (_end_leftovers)
log = logging.getLogger("thingbridge")
ADMIN_PASSWORD_ENV = "THINGBRIDGE_ADMIN_PASSWORD"


class StartupError(ConfigError):
    """The process cannot start as configured; the message names what to change."""


def unusable(folder: Path) -> str | None:
    """Why the bridge could not create or write files in `folder` (None: it can), creating nothing."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable by this user"
    return None


def check_folders(cfg: Config) -> None:
    """Refuse before anything is created when the database or the CA could not be written."""
    for setting, option, folder in (
        ("data_dir", " (or --data-dir)", cfg.data_dir),
        ("pki.dir", "", cfg.pki.dir),
    ):
        why = unusable(folder)
        if why is not None:
            raise StartupError(
                f"{setting}: cannot use {folder}: {why}; fix it or choose another {setting}{option}"
            )


def open_store(cfg: Config) -> Store:
    store = create_store(cfg.store.url, cfg.db_path, cfg.store.synchronous, cfg.store.lock_timeout_ms / 1000)
    try:
        store.open()
    except (OSError, StoreError) as exc:
        store.close()
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        if cfg.store.url != "sqlite:":
            raise StartupError(f"store.url: cannot open the PostgreSQL database: {reason}") from None
        raise StartupError(f"data_dir: cannot open the database {cfg.db_path}: {reason}") from None
    return store


async def ensure_admin(core: Core) -> None:
    """First start: an `admin` user, password from THINGBRIDGE_ADMIN_PASSWORD or generated and
    shown once (it is stored only as a hash)."""
    try:
        await core.accounts.user_by_name("admin")
        return
    except NotFound:
        pass
    given = os.environ.get(ADMIN_PASSWORD_ENV)
    password = generate_password() if given is None else given
    try:
        await core.accounts.create_user("admin", password, role="admin")
    except Invalid as exc:  # the only thing that can be wrong with a fixed user name is the password
        raise StartupError(
            f"{ADMIN_PASSWORD_ENV}: {exc}; set a longer one, or unset it to have one generated"
        ) from None
    if given is None:
        print(
            f"Created user 'admin' with password: {password}  (shown once; it is stored hashed)", flush=True
        )


def _bind_error(exc: OSError, setting: str, listener: Listener, option: str) -> StartupError:
    where = f"cannot listen on {listener.host}:{listener.port} ({setting})"
    if isinstance(exc, socket.gaierror):
        return StartupError(f"{where}: unknown host; set {setting}.host to a name or address of this machine")
    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    if exc.errno == errno.EADDRINUSE:
        advice = f"choose another port with {setting}.port or {option}"
    elif exc.errno == errno.EADDRNOTAVAIL:
        advice = f"{listener.host} is not an address of this machine; set {setting}.host"
    elif exc.errno == errno.EACCES:
        advice = f"ports below 1024 need privileges; choose another port with {setting}.port or {option}"
    else:
        advice = f"check {setting}.host and {setting}.port"
    return StartupError(f"{where}: {reason}; {advice}")


async def _listen_mqtt(cfg: Config, mqtt: MqttBroker) -> None:
    try:
        await mqtt.listen()
    except ssl.SSLError:  # a bad server certificate, not an address problem
        raise
    except OSError as exc:
        # listen() binds the plain listener, then TLS: the failed one is the first not bound.
        unbound = [
            (setting, listener, option)
            for name, setting, listener, option in (
                (PLAIN, "mqtt.plain", cfg.mqtt.plain, "--mqtt-plain-port"),
                (TLS, "mqtt.tls", cfg.mqtt.tls, "--mqtt-port"),
            )
            if listener.enabled and name not in mqtt.ports
        ]
        if not unbound:
            raise
        raise _bind_error(exc, *unbound[0]) from None


async def _start_site(
    runner: web.AppRunner, listener: Listener, setting: str, option: str, ctx: ssl.SSLContext | None = None
) -> int:
    before = set(map(tuple, runner.addresses))
    try:
        await web.TCPSite(runner, listener.host, listener.port, ssl_context=ctx).start()
    except OSError as exc:
        raise _bind_error(exc, setting, listener, option) from None
    (new,) = [a for a in map(tuple, runner.addresses) if a not in before]
    return new[1]


async def serve(cfg: Config, first_start: str | None = None) -> int:
    """Run until SIGINT/SIGTERM. `first_start`: a line announcing a new installation, printed once
    it has been created."""
    # Whatever has started is stopped again, in reverse order, on the way out: after SIGTERM, and
    # when a later step fails (a port in use), so a failed start leaves nothing running or open.
    async with contextlib.AsyncExitStack() as started:
        store = open_store(cfg)
        started.push_async_callback(asyncio.to_thread, store.close)
        # The device side: the embedded broker, or the external engine's link (mqtt.mode).
        engine = ExternalEngine(cfg) if cfg.mqtt.mode == "external" else None
        mqtt = MqttBroker(cfg) if engine is None else None
        core = Core(cfg, store, link=engine.link if engine is not None else mqtt)
        core.ca.ensure_server_cert(cfg.pki.server_names)
        await ensure_admin(core)
        if first_start:
            print(first_start, flush=True)

        started.push_async_callback(core.outbox.stop)  # runs after the broker's or engine's stop
        if mqtt is not None:
            await mqtt.start(core)
            started.push_async_callback(mqtt.stop)
        else:
            assert engine is not None
            started.push_async_callback(engine.stop)
            await engine.start(core)
        await core.presence.restore(connections_outlive_us=engine is not None)
        await core.status.republish_all()
        await core.firmware.republish()
        core.outbox.start()
        core.rollouts.start()  # re-publishes rollout states and upgrade notices, then checks timeouts
        started.push_async_callback(core.rollouts.stop)
        core.retention.start()
        started.push_async_callback(core.retention.stop)
        if mqtt is not None:
            await _listen_mqtt(cfg, mqtt)

        # keepalive_timeout also bounds a request head that never completes (slow-loris); aiohttp's
        # default is an hour. A running handler (a long-poll) is not cut by it.
        runner = web.AppRunner(make_app(core), access_log=None, shutdown_timeout=5, keepalive_timeout=10)
        await runner.setup()
        started.push_async_callback(runner.cleanup)
        ports: dict[str, int | None] = {}
        if mqtt is not None:
            ports = {"mqtt_tls": mqtt.ports.get(TLS), "mqtt_plain": mqtt.ports.get(PLAIN)}
        else:
            assert engine is not None
            ports = {**engine.ports()}
        if cfg.http.http.enabled:
            ports["http"] = await _start_site(runner, cfg.http.http, "http.http", "--http-port")
        if cfg.http.https.enabled:
            ports["https"] = await _start_site(
                runner, cfg.http.https, "http.https", "--https-port", https_context(core)
            )
        core.endpoints.mqtt_tls_port = (
            engine.device_port() if engine is not None else ports["mqtt_tls"] or cfg.mqtt.tls.port
        )
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
        # One machine-readable line: tests and supervisors learn the bound ports (and the loop) from it.
        ready = {"pid": os.getpid(), "loop": loop_name(loop), "mode": cfg.mqtt.mode, **ports}
        print("thingbridge ready " + orjson.dumps(ready).decode(), flush=True)
        await stop.wait()
        log.info("stopping: closing listeners, flushing writes")
    log.info("stopped")
    return 0


def run(cfg: Config, config_file: Path | None = None) -> int:
    """Serve until SIGINT/SIGTERM (exit status 0); a StartupError propagates to the caller.
    `config_file`: the file `cfg` came from (None: built-in defaults)."""
    check_folders(cfg)
    first_start = None
    if not (cfg.local_db or cfg.data_dir / "secret.key").exists():
        source = config_file.resolve() if config_file else f"built-in defaults; no config file ({LOOKED_FOR})"
        first_start = (
            f"New installation ({source}): database and secret key in {cfg.data_dir}, CA in {cfg.pki.dir}"
        )
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # amqtt logs every connection at INFO and stack traces for refused clients; keep ours readable.
    logging.getLogger("amqtt").setLevel(logging.ERROR)
    logging.getLogger("transitions").setLevel(logging.WARNING)
    # aiormq logs every failed connect at ERROR; the engine's link and consumer say it once, with the URL.
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    loop = (loop_factory(cfg) or asyncio.new_event_loop)()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(serve(cfg, first_start))
    except KeyboardInterrupt:  # Ctrl-C before serve() took SIGINT over
        return 0
    finally:
        try:
            _end_leftovers(loop)
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _end_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what still runs once serve() returned (everything of ours is stopped and the store
    closed by then), then close the loop's async generators, waiting for each at most
    LEFTOVER_WAIT seconds: asyncio.run would wait for ever, and a library's close path now and then
    leaves a task that a cancellation does not end (aiormq's, closing an AMQP connection: a stopped
    external-mode worker hung in 1 of 3-5 stops)."""
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in tasks:
        task.cancel()
    _wait_at_most(loop, tasks)
    _wait_at_most(loop, [loop.create_task(loop.shutdown_asyncgens())])


def _wait_at_most(loop: asyncio.AbstractEventLoop, tasks: list[asyncio.Task[Any]]) -> None:
    if not tasks:
        return
    done, pending = loop.run_until_complete(asyncio.wait(tasks, timeout=LEFTOVER_WAIT))
    for task in done:
        if not task.cancelled():
            task.exception()  # retrieved: a library's late failure is not ours to report
    if pending:
        log.warning("%d task(s) of a library did not end when cancelled; exiting without them", len(pending))


def loop_factory(cfg: Config) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when the configuration asks for it and it is installed (it is a dependency
    wherever it builds), else None: asyncio's own."""
    if not cfg.uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        log.info("uvloop is not installed: running on asyncio's own event loop")
        return None
    return uvloop.new_event_loop


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
