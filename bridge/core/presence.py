"""Online/offline state of things. A thing may hold several connections; it is online while any is
up. Each change is recorded and published retained on `things/{id}/presence`."""

from __future__ import annotations

import orjson

from bridge.core import ids
from bridge.core.ports import DeviceLink, NoLink
from bridge.store import Store


def presence_topic(thing_id: str) -> str:
    return f"things/{thing_id}/presence"


class Presence:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.link: DeviceLink = NoLink()
        self._connections: dict[str, int] = {}

    def connected(self, thing_id: str) -> bool:
        """Count a new connection (synchronously, so events apply in the order they happened);
        True when the thing just came online."""
        self._connections[thing_id] = self._connections.get(thing_id, 0) + 1
        return self._connections[thing_id] == 1

    def disconnected(self, thing_id: str) -> bool:
        """True when the thing's last connection just closed."""
        left = self._connections.get(thing_id, 0) - 1
        if left > 0:
            self._connections[thing_id] = left
            return False
        self._connections.pop(thing_id, None)
        return left == 0

    async def record(self, thing_id: str, state: str, transport: str = "mqtt") -> None:
        ts = ids.now()
        await self.store.write(
            lambda c: c.execute(
                "INSERT INTO presence (thing_id, state, ts, transport) SELECT ?,?,?,? WHERE EXISTS"
                " (SELECT 1 FROM things WHERE id = ?) ON CONFLICT (thing_id) DO UPDATE SET"
                " state = excluded.state, ts = excluded.ts, transport = excluded.transport",
                (thing_id, state, ts, transport, thing_id),
            )
        )
        await self.link.publish(presence_topic(thing_id), _document(state, ts), retain=True)

    async def restore(self) -> None:
        """At start-up nothing is connected: mark every thing offline and re-retain its last state."""
        rows = await self.store.write(
            lambda c: c.execute("UPDATE presence SET state = 'offline' RETURNING thing_id, ts").fetchall()
        )
        for row in rows:
            await self.link.publish(
                presence_topic(row["thing_id"]), _document("offline", row["ts"]), retain=True
            )


def _document(state: str, ts: float) -> bytes:
    return orjson.dumps({"state": state, "ts": ts})
