"""Closing a thing's live connections on the engine, through RabbitMQ's management HTTP API: the
external DeviceLink's `disconnect_thing` (after a revocation, delete or disable).

The engine knows a thing's connections by their user, the subject of the certificate they logged in
with (CN = thing id; an older certificate's subject before a re-certification). So:
* each subject this process's auth backend allowed for the thing (Logins) is closed with
  DELETE /api/connections/username/<subject>: the engine's own record, exact at once, every node;
* then the list of all connections (GET /api/connections) is searched for other subjects with that
  CN (logins through another bridge process, or before this one started) and each is DELETEd. That
  list comes from the management statistics and shows a new connection only after a while (up
  to 6 s in the tests, whose statistics interval is 1 s; 5 s by default), so it is searched again
  `mqtt.external.list_lag` seconds later. Both searches close only connections the engine opened before the
  revocation (`connected_at`, the engine's clock: keep the clocks in sync): a device that got a new
  certificate, or was enabled again, and reconnected meanwhile passed the auth backend after the
  revocation and stays connected."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
import urllib.parse
from typing import Any

import aiohttp

from bridge.config import ExternalConfig
from bridge.mqtt.external.auth import Logins, subject_fields

log = logging.getLogger(__name__)
TIMEOUT = aiohttp.ClientTimeout(total=5)
REASON = "thingbridge: the thing was revoked, deleted or disabled"


class Management:
    def __init__(self, ext: ExternalConfig, logins: Logins) -> None:
        self.logins = logins
        self.resweep = float(ext.list_lag)  # s: until a new connection shows in the list
        self.urls = [u.rstrip("/") for u in ext.management]
        credentials = base64.b64encode(f"{ext.username}:{ext.password}".encode()).decode()
        self.headers = {"Authorization": f"Basic {credentials}"}  # never logged
        self._session: aiohttp.ClientSession | None = None
        self._resweeps: set[asyncio.Task[int]] = set()
        self.closed = 0  # connections closed, for the stats
        self.failures = 0  # sweeps that no management node answered

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self.headers, timeout=TIMEOUT)
        return self._session

    async def close_thing(self, thing_id: str) -> int:
        """Close every engine connection of the thing; how many were open."""
        revoked = time.time() * 1000  # ms, as the engine's connected_at
        closed = 0
        for username in self.logins.of(thing_id):
            closed += await self._close_user(username)
        closed += await self._sweep(thing_id, revoked)
        task = asyncio.create_task(self._resweep(thing_id, revoked))
        self._resweeps.add(task)
        task.add_done_callback(self._resweeps.discard)
        return closed

    async def _resweep(self, thing_id: str, revoked: float) -> int:
        await asyncio.sleep(self.resweep)
        return await self._sweep(thing_id, revoked)

    async def _sweep(self, thing_id: str, revoked: float) -> int:
        for url in self.urls:  # the first node that answers: each sees the whole cluster's connections
            try:
                names = await self._connections_of(url, thing_id, revoked)
                results = await asyncio.gather(*(self._close(url, name) for name in names))
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("engine management %s: %r", url, exc)
                continue
            closed = sum(results)
            self.closed += closed
            return closed
        self.failures += 1
        log.error("no engine management node answered: thing %s's connections stay open", thing_id)
        return 0

    async def connections(self) -> list[dict[str, Any]]:
        """Every connection of the cluster (name, node, user, connected_at); it lags (see the
        module's docstring)."""
        return await self._ask("/api/connections", {"columns": "name,node,user,connected_at"})

    async def nodes(self) -> list[dict[str, Any]]:
        """The cluster's nodes (name, running)."""
        return await self._ask("/api/nodes", {"columns": "name,running"})

    async def _ask(self, path: str, params: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """A list from the first node that answers; raises when none does."""
        error: Exception = ConnectionError("no management URL")
        for url in self.urls:
            try:
                return await self._list(url, path, params)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("engine management %s: %r", url, exc)
                error = exc
        raise error

    async def _list(self, url: str, path: str, params: dict[str, str] | None = None) -> list[dict[str, Any]]:
        async with self._http().get(f"{url}{path}", params=params) as resp:
            resp.raise_for_status()
            found = await resp.json()
        return [c for c in found if isinstance(c, dict)] if isinstance(found, list) else []

    async def _close_user(self, username: str) -> int:
        """DELETE /api/connections/username/<subject>: the engine's own record of its connections,
        exact at once (the list of connections lags, see the module's docstring)."""
        quoted = urllib.parse.quote(username, safe="")
        for url in self.urls:
            try:
                count = len(await self._list(url, f"/api/connections/username/{quoted}"))
                async with self._http().delete(
                    f"{url}/api/connections/username/{quoted}", headers={"X-Reason": REASON}
                ) as resp:
                    resp.raise_for_status()
                self.closed += count
                return count
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("engine management %s: %r", url, exc)
        self.failures += 1
        return 0

    async def _connections_of(self, url: str, thing_id: str, revoked: float) -> list[str]:
        """The thing's connections opened before `revoked` (ms since the epoch)."""
        connections = await self._list(url, "/api/connections", {"columns": "name,user,connected_at"})
        return [
            c["name"]
            for c in connections
            if isinstance(c.get("user"), str)
            and (subject_fields(c["user"]) or {}).get("CN") == thing_id
            and not (isinstance(c.get("connected_at"), int | float) and c["connected_at"] > revoked)
        ]

    async def _close(self, url: str, name: str) -> int:
        quoted = urllib.parse.quote(name, safe="")
        async with self._http().delete(
            f"{url}/api/connections/{quoted}", headers={"X-Reason": REASON}
        ) as resp:
            if resp.status == 404:  # gone meanwhile
                return 0
            resp.raise_for_status()
            return 1

    async def close(self) -> None:
        for task in list(self._resweeps):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None
