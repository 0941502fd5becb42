"""Start the real `thingbridge serve` process on ephemeral loopback ports and talk to it."""

from __future__ import annotations

import base64
import os
import queue
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

ADMIN_PASSWORD = "admin-test-password"
READY = "thingbridge ready "


# The longest units of work, started first so that no long one is left for the end of the run.
FIRST = ("engine", "tests/test_abuse.py", "tests/test_openapi.py")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The units of work of `--dist loadgroup` (pyproject.toml): a module, so that its module-scoped
    server starts once on one worker; and the modules that use the RabbitMQ cluster together, so
    that the suite boots one cluster, not one per worker (runs before xdist reads the groups)."""
    groups: dict[pytest.Item, str] = {}
    for item in items:
        marker = item.get_closest_marker("xdist_group")
        if marker is None:
            group = "engine" if "rabbit_cluster" in item.fixturenames else item.nodeid.split("::")[0]
            item.add_marker(pytest.mark.xdist_group(group))
        else:
            group = str(marker.args[0] if marker.args else marker.kwargs.get("name", "default"))
        groups[item] = group
    order = {group: rank for rank, group in enumerate(FIRST)}
    items.sort(key=lambda item: order.get(groups[item], len(FIRST)))  # stable: modules stay in order


def write_config(folder: Path, **overrides: object) -> Path:
    """A broker.yaml with every listener on 127.0.0.1 and port 0."""
    accounts = {"token_ttl": 3600, "free_plan_things": 10, **overrides.pop("accounts", {})}  # type: ignore[dict-item]
    mqtt = {"max_packet_size": 1024 * 1024, **overrides.pop("mqtt", {})}  # type: ignore[dict-item]
    doc = {
        "data_dir": "data",
        "pki": {"dir": "certs"},
        "mqtt": {"tls": {"host": "127.0.0.1", "port": 0}, "plain": {"host": "127.0.0.1", "port": 0}, **mqtt},
        "http": {
            "http": {"host": "127.0.0.1", "port": 0},
            "https": {"host": "127.0.0.1", "port": 0},
            "public_host": "127.0.0.1",
        },
        "accounts": accounts,
        **overrides,
    }
    path = folder / "broker.yaml"
    path.write_bytes(orjson.dumps(doc))  # JSON is YAML
    return path


@dataclass
class Bridge:
    folder: Path
    config: Path
    proc: subprocess.Popen[str] | None = None
    store_url: str = "sqlite:"
    ports: dict[str, int] = field(default_factory=dict)
    output: list[str] = field(default_factory=list)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    @property
    def api(self) -> str:
        return f"{self.http}/dev/v1"

    @property
    def ca_file(self) -> Path:
        return self.folder / "certs" / "ca.pem"

    @property
    def db_path(self) -> Path:
        return self.folder / "data" / "thingbridge.sqlite"

    def start(self, timeout: float = 30, *, args: Sequence[str] | None = None) -> None:
        """`args` replace `--config <config>`, and the process then runs in `folder`: a serve that
        looks for its configuration itself."""
        env = {**os.environ, "THINGBRIDGE_ADMIN_PASSWORD": ADMIN_PASSWORD, "PYTHONUNBUFFERED": "1"}
        where = ["--config", str(self.config)] if args is None else list(args)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "serve", *where],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=None if args is None else self.folder,
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert self.proc and self.proc.stdout
            for line in self.proc.stdout:
                self.output.append(line)
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        while True:
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                self.kill()
                raise RuntimeError("bridge did not become ready:\n" + "".join(self.output)) from None
            if line is None:
                raise RuntimeError("bridge exited before ready:\n" + "".join(self.output))
            if line.startswith(READY):
                self.ports = orjson.loads(line[len(READY) :])
                return

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM and wait: the graceful path."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "bridge", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"thingbridge {' '.join(args)} failed: {result.stderr}{result.stdout}")
        return result

    def client_tls(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key))
        return ctx


def basic(username: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}


def _bridge(tmp_path_factory: pytest.TempPathFactory, **overrides: object) -> Iterator[Bridge]:
    folder = tmp_path_factory.mktemp("bridge")
    bridge = Bridge(folder, write_config(folder, **overrides))
    bridge.start()
    try:
        yield bridge
    finally:
        bridge.kill()


@pytest.fixture(scope="module")
def bridge(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    """The module's server: on SQLite, or on each store for a test marked `on_each_store()`."""
    yield from store_bridge(request, tmp_path_factory)


@pytest.fixture
def fresh_bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    yield from _bridge(tmp_path_factory)


def postgres_of_its_own() -> Iterator[Any]:
    """A PostgreSQL server started here and stopped when the generator ends; the test is skipped
    with the reason when the server binaries are not installed."""
    from tests.postgres import PostgresServer, postgres_bin

    bindir = postgres_bin()
    if bindir is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql"
        )
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """One PostgreSQL server per test process (xdist worker), started on first use."""
    yield from postgres_of_its_own()


@pytest.fixture(scope="session")
def rabbit_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One 2-node RabbitMQ cluster per test process (xdist worker), started on first use (about
    30 s), for the external-mode tests: tests/engine.py."""
    from tests.engine import RabbitCluster, free_port, rabbitmq_missing

    why = rabbitmq_missing()
    if why is not None:
        pytest.skip(why)
    cluster = RabbitCluster(tmp_path_factory.mktemp("engine-ca"), free_port())
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


STORES = ["sqlite", "postgresql"]


def _store_url(request: pytest.FixtureRequest) -> str:
    if getattr(request, "param", "sqlite") == "sqlite":
        return "sqlite:"
    return request.getfixturevalue("postgres_server").new_database()


def on_each_store(fixture: str = "bridge") -> pytest.MarkDecorator:
    """Run a test once per store: `fixture`, a server made by store_bridge (SQLite unless told),
    takes each store in turn. For the tests of store behaviour in a module that otherwise runs on
    SQLite only (the suite's time is bounded)."""
    return pytest.mark.parametrize(fixture, STORES, indirect=True)


@pytest.fixture(params=STORES)
def store_url(request: pytest.FixtureRequest) -> str:
    """store.url for a test that runs against both stores: the SQLite file, or a fresh PostgreSQL
    database of its own."""
    return _store_url(request)


def store_bridge(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, **overrides: object
) -> Iterator[Bridge]:
    """A server on the store named by `request.param` (a fixture parametrised by STORES, or by
    on_each_store; none: SQLite)."""
    url = _store_url(request)
    for bridge in _bridge(tmp_path_factory, store={"url": url}, **overrides):
        bridge.store_url = url
        yield bridge


@pytest.fixture(scope="module", params=STORES)
def bridge_on_each_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Bridge]:
    """The module's server once per store: a module runs on both by naming this as its `bridge`."""
    yield from store_bridge(request, tmp_path_factory)
