"""Password checks that a flood of wrong passwords cannot turn into a denial of service.

* argon2 runs on its own pool of PASSWORD_WORKERS threads, never on the default executor the rest
  of the process shares. At most MAX_QUEUED checks run or wait; one more is refused at once
  (TooManyRequests) instead of queueing: memory stays at workers x argon2 memory.
* A verified password is remembered for VERIFIED_TTL as an HMAC of (realm, name, password) under a
  per-process random key, together with the stored hash it matched. Re-checking it costs
  microseconds and bypasses the limiter, and it stops matching as soon as the stored hash changes
  (password changed or principal deleted, by this process or by the command line in another one).
* FailureLimiter refuses, before argon2 runs, a source and name that failed too often.

New hashes use OWASP's argon2id parameters (19 MiB, t=2, p=1) rather than argon2-cffi's default
(64 MiB, t=3, p=4): a check costs ~45 ms instead of ~250 ms and a third of the memory. A stored hash
with other parameters is re-hashed after a successful check (Verdict.new_hash).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import ipaddress
import itertools
import math
import queue
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from bridge.core.errors import TooManyRequests

PASSWORD_WORKERS = 2
MAX_QUEUED = 64  # running + waiting checks (~1.5 s of work); beyond this refused, not queued
VERIFIED_TTL = 3600.0
MAX_VERIFIED = 10_000

T = TypeVar("T")
_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)


@functools.cache
def _dummy_hash() -> str:
    """Verifying against this keeps an unknown name as slow as a wrong password."""
    return _hasher.hash("thingbridge-dummy-password")


def _check(stored_hash: str | None, password: str) -> tuple[bool, str | None]:
    """(matched, the password re-hashed with current parameters when the stored hash is outdated)."""
    try:
        _hasher.verify(stored_hash or _dummy_hash(), password)
    except (VerificationError, InvalidHashError):
        return False, None
    if stored_hash is None:
        return False, None
    return True, _hasher.hash(password) if _hasher.check_needs_rehash(stored_hash) else None


@dataclass(frozen=True)
class Verdict:
    matched: bool
    new_hash: str | None = None  # the password under current parameters: store it in place of the old


# ---- failure limiter ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    free_failures: int  # failures before back-off starts
    max_delay: float  # back-off cap, seconds


# The rule: (source, name) backs off after 5 failures, a source after 50 over all names, a name after
# 200 from all sources; then 1 s, doubling on each further failure, up to the cap. A name's cap is
# short so that an attacker cannot cheaply lock a user out everywhere (and a user whose password was
# verified within VERIFIED_TTL is not limited at all). A success resets only its (source, name).
PAIR = Scope(5, 900.0)
SOURCE = Scope(50, 900.0)
NAME = Scope(200, 60.0)
FORGET_AFTER = 3600.0  # failures older than this (none since) are forgotten
MAX_KEYS = 20_000  # tracked keys; the least recently used is evicted beyond this


@dataclass(slots=True)
class _Entry:
    scope: Scope
    failures: int = 0
    pending: int = 0  # checks in flight count as failures until they end, so a burst cannot slip past
    blocked_until: float = 0.0
    last_failure: float = 0.0

    def refusal(self, now: float) -> float | None:
        """Seconds to wait, or None when one more attempt may run."""
        if now < self.blocked_until:
            return self.blocked_until - now
        if self.pending >= max(self.scope.free_failures - self.failures, 1):
            return 1.0  # the checks in flight end within about a second
        return None


def source_key(source: str) -> str:
    """An IPv6 client usually owns a whole /64: limit the network, not each of its addresses."""
    try:
        address = ipaddress.ip_address(source)
    except ValueError:
        return source
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return source


class FailureLimiter:
    """Counts failed checks per (source, realm, name), per source and per (realm, name), with
    exponential back-off. Event-loop only (not thread-safe), memory bounded by MAX_KEYS. `what`
    names the attempts in the refusal ("logins", "activations")."""

    def __init__(
        self, max_keys: int = MAX_KEYS, clock: Callable[[], float] = time.monotonic, *, what: str = "logins"
    ) -> None:
        self.what = what
        self._entries: OrderedDict[tuple[str, ...], _Entry] = OrderedDict()
        self._max_keys = max_keys
        self._clock = clock
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def keys(source: str | None, realm: str, name: str) -> list[tuple[tuple[str, ...], Scope]]:
        """`source` None: a login an MQTT engine relays without the client's address. Its own
        address would lump every client behind it into one source that anyone could block, so
        such a login is limited by its name alone."""
        named = (("name", realm, name), NAME)
        if source is None:
            return [named]
        src = source_key(source)
        return [(("pair", src, realm, name), PAIR), (("source", src), SOURCE), named]

    def _entry(self, key: tuple[str, ...], scope: Scope, now: float) -> _Entry:
        entry = self._entries.get(key)
        if entry is None or (entry.pending == 0 and now - entry.last_failure > FORGET_AFTER):
            entry = self._entries[key] = _Entry(scope)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_keys:
            self._entries.popitem(last=False)
            self.evictions += 1
        return entry

    def admit(self, source: str | None, realm: str, name: str) -> tuple[int, int]:
        """Reserve one attempt, or raise TooManyRequests with how long to wait. Returns its priority:
        the failed and in-flight attempts of its (source, name) and of its source (fewer first)."""
        now = self._clock()
        entries = [self._entry(key, scope, now) for key, scope in self.keys(source, realm, name)]
        waits = [w for w in (e.refusal(now) for e in entries) if w is not None]
        if waits:
            wait = max(waits)
            raise TooManyRequests(f"too many failed {self.what}; retry in {math.ceil(wait)} s", wait)
        pair, src = entries[0], entries[min(1, len(entries) - 1)]  # a relayed one: its name twice
        priority = (pair.failures + pair.pending, src.failures + src.pending)
        for entry in entries:
            entry.pending += 1
        return priority

    def settle(self, source: str | None, realm: str, name: str, ok: bool | None) -> None:
        """End an admitted attempt: succeeded, failed, or None when it never ran."""
        now = self._clock()
        for key, scope in self.keys(source, realm, name):
            entry = self._entry(key, scope, now)
            entry.pending = max(entry.pending - 1, 0)
            if ok is None:
                continue
            if ok:
                if key[0] == "pair":
                    del self._entries[key]
                continue
            entry.failures += 1
            entry.last_failure = now
            over = entry.failures - scope.free_failures
            if over >= 0:
                entry.blocked_until = now + min(2.0 ** min(over, 30), scope.max_delay)


# ---- the checker --------------------------------------------------------------------------------


class _PriorityPool:
    """Worker threads that take the queued call with the lowest priority first (FIFO among equals):
    a login from a (source, name) without failures overtakes a flood's queued checks."""

    def __init__(self, workers: int) -> None:
        self._queue: queue.PriorityQueue[
            tuple[tuple[int, int], int, Future[Any], Callable[..., Any], tuple[Any, ...]]
        ] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._workers = workers
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def submit(self, priority: tuple[int, int], fn: Callable[..., T], *args: Any) -> Future[T]:
        with self._lock:
            while len(self._threads) < self._workers:  # started on first use, not in the CLI's imports
                thread = threading.Thread(target=self._work, name="argon2", daemon=True)
                thread.start()
                self._threads.append(thread)
        future: Future[T] = Future()
        self._queue.put((priority, next(self._seq), future, fn, args))
        return future

    def _work(self) -> None:
        while True:
            _priority, _seq, future, fn, args = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue  # its caller went away before it started
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)


class Passwords:
    """Hashing and verification of user and application passwords (see the module docstring)."""

    def __init__(self) -> None:
        self._pool = _PriorityPool(PASSWORD_WORKERS)
        self._lock = threading.Lock()  # _queued is released from the worker threads
        self._queued = 0
        self._cache_key = secrets.token_bytes(32)
        self._verified: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self.limiter = FailureLimiter()
        self.counts = {"verified": 0, "rejected": 0, "cacheHits": 0, "rateLimited": 0, "busy": 0}

    def _submit(self, priority: tuple[int, int], fn: Callable[..., T], *args: Any) -> Future[T]:
        with self._lock:
            if self._queued >= MAX_QUEUED:
                self.counts["busy"] += 1
                raise TooManyRequests("too many logins in progress; retry in 1 s", 1.0)
            self._queued += 1
        future = self._pool.submit(priority, fn, *args)
        future.add_done_callback(self._release)
        return future

    def _release(self, _future: Future[Any]) -> None:
        with self._lock:
            self._queued -= 1

    async def hash(self, password: str) -> str:
        return await asyncio.wrap_future(self._pool.submit((0, 0), _hasher.hash, password))

    def _digest(self, realm: str, name: str, password: str) -> bytes:
        mac = hmac.new(self._cache_key, digestmod=hashlib.sha256)
        for part in (realm, name, password):
            raw = part.encode("utf-8", "surrogatepass")
            mac.update(len(raw).to_bytes(4, "big") + raw)  # length-prefixed: no two triples collide
        return mac.digest()

    def _remembered(self, digest: bytes, stored_hash: str | None) -> bool:
        hit = self._verified.get(digest)
        if hit is None:
            return False
        if hit[0] != stored_hash or time.monotonic() > hit[1]:
            del self._verified[digest]
            return False
        return True

    def _remember(self, digest: bytes, stored_hash: str) -> None:
        self._verified[digest] = (stored_hash, time.monotonic() + VERIFIED_TTL)
        self._verified.move_to_end(digest)
        while len(self._verified) > MAX_VERIFIED:
            self._verified.popitem(last=False)

    async def verify(
        self, realm: str, name: str, password: str, stored_hash: str | None, source: str | None
    ) -> Verdict:
        """Does `password` match `stored_hash` (None: no such principal)? `realm` separates name
        spaces ("users", "apps"); `source` is the client's address (None: unknown, relayed by an
        MQTT engine; FailureLimiter.keys). Raises TooManyRequests when the
        limiter or the pool refuses the check."""
        digest = self._digest(realm, name, password)
        if self._remembered(digest, stored_hash):
            self.counts["cacheHits"] += 1
            return Verdict(True)
        try:
            priority = self.limiter.admit(source, realm, name)
        except TooManyRequests:
            self.counts["rateLimited"] += 1
            raise
        try:
            future = self._submit(priority, _check, stored_hash, password)
        except TooManyRequests:
            self.limiter.settle(source, realm, name, None)
            raise
        ok = False
        try:
            ok, new_hash = await asyncio.wrap_future(future)
        finally:
            # an abandoned check (the client went away) counts as failed: leaving early must not
            # dodge the limiter
            self.limiter.settle(source, realm, name, ok)
        self.counts["verified" if ok else "rejected"] += 1
        if not ok or stored_hash is None:
            return Verdict(False)
        self._remember(digest, new_hash or stored_hash)
        return Verdict(True, new_hash)

    def stats(self) -> dict[str, int]:
        return {**self.counts, "trackedKeys": len(self.limiter), "evictedKeys": self.limiter.evictions}
