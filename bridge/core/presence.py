"""Online/offline state of things. A thing may hold several connections; it is online while any is
up. Each change is recorded and published retained on `things/{id}/presence`."""

from __future__ import annotations

import orjson

from bridge.core import ids
from bridge.core.ports import DeviceLink, NoLink
from bridge.core.things import DeviceIdentity
from bridge.store import Store


def presence_topic(thing_id: str) -> str:
    return f"things/{thing_id}/presence"


class Presence:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.link: DeviceLink = NoLink()
        # Live connections per incarnation (thing id, certificate id): a deleted thing's
        # connections that end late do not count against a new thing of the same id.
        self._connections: dict[tuple[str, str], int] = {}

    def connected(self, device: DeviceIdentity) -> bool:
        """Count a new connection (synchronously, so events apply in the order they happened);
        True when the thing just came online."""
        key = (device.thing_id, device.cert_id)
        self._connections[key] = self._connections.get(key, 0) + 1
        return self._connections[key] == 1

    def disconnected(self, device: DeviceIdentity) -> bool:
        """True when the thing's last connection just closed."""
        key = (device.thing_id, device.cert_id)
        left = self._connections.get(key, 0) - 1
        if left > 0:
            self._connections[key] = left
            return False
        self._connections.pop(key, None)
        return left == 0

    async def record(self, device: DeviceIdentity, state: str, transport: str = "mqtt") -> None:
        """Store and publish (retained) the new state, only while this incarnation of the thing
        exists: a deleted thing's late offline event must not leave a retained message behind."""
        ts = ids.now()
        written = await self.store.write(
            lambda c: (
                c.execute(
                    "INSERT INTO presence (thing_id, state, ts, transport) SELECT ?,?,?,? WHERE EXISTS"
                    " (SELECT 1 FROM things WHERE id = ? AND cert_id = ?) ON CONFLICT (thing_id) DO UPDATE SET"
                    " state = excluded.state, ts = excluded.ts, transport = excluded.transport",
                    (device.thing_id, state, ts, transport, device.thing_id, device.cert_id),
                ).rowcount
            )
        )
        if written:
            await self.link.publish(presence_topic(device.thing_id), _document(state, ts), retain=True)

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
