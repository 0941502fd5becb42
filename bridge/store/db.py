"""One SQLite file in WAL mode: a single writer thread that commits queued writes in groups,
and a small pool of reader threads, so no SQLite call ever runs on the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from bridge.store import migrations
from bridge.store.errors import IntegrityError, OperationalError, StoreError, Unavailable

T = TypeVar("T")
_STOP = object()
MAX_GROUP = 512
LOCK_TIMEOUT = 30.0  # seconds (Store's lock_timeout)


def _owner_only(path: Path) -> None:
    """The database holds password hashes and sealed private keys: mode 0600 like secret.key. SQLite
    creates -wal and -shm with the database's mode; chmod also fixes an older installation's files."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(file, 0o600)


def _connect(path: Path, synchronous: str, lock_timeout: float) -> sqlite3.Connection:
    return _configure(_open(path, lock_timeout), synchronous, lock_timeout)


class Connection(sqlite3.Connection):
    """sqlite3's connection raising the store's exceptions (bridge/store/errors.py) instead of
    sqlite3's, like the PostgreSQL store's; everything else is sqlite3's."""

    def execute(self, sql: str, params: Any = (), /) -> sqlite3.Cursor:
        try:
            return super().execute(sql, params)
        except sqlite3.Error as exc:
            raise store_error(exc) from exc

    def executemany(self, sql: str, params: Any, /) -> sqlite3.Cursor:
        try:
            return super().executemany(sql, params)
        except sqlite3.Error as exc:
            raise store_error(exc) from exc


# The file is locked by another process (the command line, a backup) past the lock timeout, the
# disk is full or failing: nothing was committed and a later try may succeed (HTTP 503, no PUBACK).
_TRANSIENT = frozenset(
    (
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CANTOPEN,
    )
)


def store_error(exc: sqlite3.Error) -> StoreError:
    if isinstance(exc, sqlite3.IntegrityError):
        return IntegrityError(str(exc))
    # sqlite_errorcode is the extended code: its low byte is the primary one
    transient = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF in _TRANSIENT
    return (Unavailable if transient else OperationalError)(str(exc))


def _open(path: Path, lock_timeout: float) -> sqlite3.Connection:
    try:
        return sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=lock_timeout, factory=Connection
        )
    except sqlite3.Error as exc:
        raise store_error(exc) from exc


def _configure(conn: sqlite3.Connection, synchronous: str, lock_timeout: float) -> sqlite3.Connection:
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA busy_timeout={int(lock_timeout * 1000)}")
    return conn


def each_in_savepoint(
    conn: Any, calls: Iterable[tuple[Callable[..., Any], tuple[Any, ...]]]
) -> list[tuple[bool, Any]]:
    """fn(conn, *args) for each call, each in a savepoint of its own: one that raises is undone
    alone, (False, its exception); the others stand, (True, their result). The writer runs a group
    this way, and a write that carries several writes of its own (the MQTT session journal)."""
    outcomes: list[tuple[bool, Any]] = []
    for fn, args in calls:
        conn.execute("SAVEPOINT w")
        try:
            outcomes.append((True, fn(conn, *args)))
            conn.execute("RELEASE w")
        except BaseException as exc:  # the caller gets its own exception; the others go on
            conn.execute("ROLLBACK TO w")
            conn.execute("RELEASE w")
            outcomes.append((False, exc))
    return outcomes


class Store:
    """Async face of the database. `write(fn, ...)` runs fn(conn, ...) inside the writer's current
    group transaction (each call in its own savepoint, so one failing write does not undo the
    others) and resolves only after the group is committed: an acknowledgement sent after
    `await store.write(...)` is durable. bridge/store/postgres.py reuses the writer and the readers
    on PostgreSQL connections (open and _connect_reader are what differ)."""

    # SQLite: take the write lock at once (another process, the CLI, waits instead of failing later)
    BEGIN = "BEGIN IMMEDIATE"
    # The retention (bridge/core/retention.py): the table whose old rows it deletes one by one, and
    # on a store that partitions messages by day its step there, rotate(conn, now, cutoff or None)
    # -> rows dropped, run as a write.
    history_rows = "messages"
    rotate: Callable[[Any, float, float | None], int] | None = None

    def __init__(
        self, path: Path, synchronous: str = "FULL", readers: int = 2, lock_timeout: float = LOCK_TIMEOUT
    ) -> None:
        """`lock_timeout`: seconds a statement waits for a lock another process holds on the file
        before it fails with Unavailable."""
        self.path = path
        self._synchronous = synchronous
        self._lock_timeout = lock_timeout
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="store-read")
        self._local = threading.local()
        self._read_conns: list[Any] = []
        self._lock = threading.Lock()

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _owner_only(self.path)
        conn = _open(self.path, self._lock_timeout)
        try:
            # A database of a newer release is refused before anything (even the journal mode) is
            # written to it; then the schema is brought up to date, in the writer's connection.
            migrations.refuse_newer(conn, self.path)
            migrations.migrate(_configure(conn, self._synchronous, self._lock_timeout), self.path)
        except BaseException:
            conn.close()
            raise
        self._start_writer(conn)

    def _start_writer(self, conn: Any) -> None:
        self._writer = threading.Thread(
            target=self._write_loop, args=(conn,), name="store-write", daemon=True
        )
        self._writer.start()

    def close(self) -> None:
        """Commit everything queued, then close. Blocking: call from a thread or at exit."""
        if self._writer is not None:
            self._queue.put(_STOP)
            self._writer.join()
            self._writer = None
        self._readers.shutdown(wait=True)
        with self._lock:
            for conn in self._read_conns:
                conn.close()
            self._read_conns.clear()

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        # The running loop, remembered per thread: asyncio.get_running_loop() makes a getpid()
        # system call each time on Python 3.11. One loop runs in a thread at a time, so the one
        # remembered is the running one while it runs.
        loop = getattr(self._local, "loop", None)
        if loop is None or not loop.is_running():
            loop = self._local.loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put((fn, args, loop, fut))
        return await fut

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._read, fn, args)

    def _read(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect_reader()
            self._local.conn = conn
            with self._lock:
                self._read_conns.append(conn)
        return fn(conn, *args)

    def _connect_reader(self) -> Any:
        return _connect(self.path, self._synchronous, self._lock_timeout)

    def _write_loop(self, conn: Any) -> None:
        stopping = False
        while not stopping:
            group = [self._queue.get()]
            while len(group) < MAX_GROUP:
                try:
                    group.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if _STOP in group:
                stopping = True
                group = [item for item in group if item is not _STOP]
                while True:  # drain what arrived before the stop
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not _STOP:
                        group.append(item)
            if group:
                conn = self._commit_group(conn, group)
        conn.close()

    def _commit_group(self, conn: Any, group: list[Any]) -> Any:
        """Commit one group; the connection for the next one (see _recover)."""
        try:
            conn = self._begin(conn)
            outcomes = each_in_savepoint(conn, ((fn, args) for fn, args, _loop, _fut in group))
            conn.execute("COMMIT")
        except StoreError as exc:  # the group is not committed: every write of it fails
            with contextlib.suppress(StoreError):
                conn.execute("ROLLBACK")
            outcomes = [(False, exc)] * len(group)
            conn = self._recover(conn)
        # One wake-up per event loop for the whole group, not one per write.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for (_fn, _args, loop, fut), (ok, value) in zip(group, outcomes, strict=True):
            by_loop.setdefault(loop, []).append((fut, ok, value))
        for loop, results in by_loop.items():
            loop.call_soon_threadsafe(_resolve, results)
        return conn

    def _begin(self, conn: Any) -> Any:
        """Open the group's transaction; the connection it is on."""
        conn.execute(self.BEGIN)
        return conn

    def _recover(self, conn: Any) -> Any:
        """After a failed group: the connection to go on with. A SQLite file's stays usable."""
        return conn


def _resolve(results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for fut, ok, value in results:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)
