"""A PostgreSQL server of the tests' (and the benches') own, from Debian's binaries: initdb and
pg_ctl in a temporary folder, on a free loopback port. Apart from tests/helpers.py so that scripts/
can start one too without the test helpers' imports."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from bridge.store.postgres import PostgresStore


def postgres_bin() -> Path | None:
    """Debian's PostgreSQL server binaries: on PATH, else where the postgresql package puts them."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return versions[-1].parent if versions else None


class PostgresServer:
    """A PostgreSQL server of its own in a temporary folder (initdb, pg_ctl) on a free loopback
    port, for the store tests: a template database made at the latest schema by the store itself,
    then one fresh database per test copied from it. PostgreSQL refuses to run as root, so as root
    the server runs as `nobody`. fsync is off for the tests (the bridge's ack-after-commit is the
    store's ordering, which does not depend on the server's disk); a bench asks for it on."""

    TEMPLATE = "thingbridge_template"

    def __init__(self, bindir: Path, *, fsync: bool = False) -> None:
        self.bindir = bindir
        self.folder = Path(tempfile.mkdtemp(prefix="thingbridge-pg-"))
        self.data = self.folder / "data"
        self.port = 0
        self.fsync = fsync
        self._names = itertools.count(1)
        self._as = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
        if self._as:
            self.folder.chmod(0o755)
            shutil.chown(self.folder, "nobody")

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run(
            [*self._as, str(self.bindir / tool), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{tool} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
            )

    def start(self) -> None:
        self._run(
            "initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "-N"
        )
        # Ends the server if this process goes away without stop() (a killed test run or bench).
        subprocess.Popen(
            [sys.executable, "-m", "tests.postgres", str(os.getpid()), str(self.folder)],
            cwd=Path(__file__).resolve().parent.parent,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        with socket.socket() as probe:  # a free port; pg_ctl fails clearly if it is taken meanwhile
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.resume()
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {self.TEMPLATE}")
        store = PostgresStore(self.url(self.TEMPLATE), self.folder / "unused")
        store.open()
        store.close()

    def resume(self) -> None:
        """Start the server (again, after `halt`: on the same port, with its databases)."""
        options = f"-h 127.0.0.1 -p {self.port} -k {self.folder} -c max_connections=200"
        if not self.fsync:
            options += " -F"
        self._run(
            "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.folder / "log"), "-w", "start"
        )

    def halt(self) -> None:
        """What a crash or a failover does to its clients: stopped at once (immediate: sessions cut,
        no shutdown checkpoint; `resume` recovers from the WAL)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    @property
    def pid(self) -> int:
        """The postmaster's (its backends are its children)."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self, *, empty: bool = False) -> str:
        """A fresh database at the latest schema (`empty`: without a schema); its URL."""
        name = f"t{next(self._names)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE {'template0' if empty else self.TEMPLATE}")
        return self.url(name)

    def stop(self) -> None:
        """Stop the server this object started (pg_ctl signals the PID in its data folder's
        postmaster.pid; immediate: no shutdown checkpoint, the folder goes next)."""
        try:
            if (self.data / "postmaster.pid").exists():
                self.halt()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


def watch(parent: int, folder: str) -> None:
    """Once `parent` has exited, stop the server it left in `folder` (SIGQUIT to the postmaster
    named in its postmaster.pid: an immediate shutdown that ends its backends too) and remove the
    folder: a server never outlives its test run."""
    while Path(f"/proc/{parent}").exists():
        time.sleep(1)
    pidfile = Path(folder) / "data" / "postmaster.pid"
    try:
        os.kill(int(pidfile.read_text().split()[0]), signal.SIGQUIT)
        deadline = time.monotonic() + 30
        while pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    except (OSError, ValueError, IndexError):
        pass  # stopped already (stop() ran, or the server never started)
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":  # the watchdog PostgresServer.start starts: parent pid, folder
    watch(int(sys.argv[1]), sys.argv[2])
