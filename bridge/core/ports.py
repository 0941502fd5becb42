"""What the core needs from a device transport. The embedded amqtt broker implements it today;
a client of an external MQTT cluster can implement it tomorrow."""

from __future__ import annotations

from typing import Protocol


class DeviceLink(Protocol):
    async def disconnect_thing(self, thing_id: str, *, forget: bool) -> int:
        """Close every live session of the thing; returns how many were closed. With `forget`
        (the thing was deleted) also drop its persistent sessions and retained messages."""
        ...

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Route a message to the topic's subscribers (queued for offline persistent sessions);
        `retain` also keeps it as the topic's retained message (an empty payload clears it)."""
        ...

    def stats(self) -> dict[str, int]:
        """Counters for operators: connections, refusals, denied and dropped messages."""
        ...


class NoLink:
    """For command-line use, where no broker runs in this process."""

    async def disconnect_thing(self, thing_id: str, *, forget: bool) -> int:
        return 0

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        return None

    def stats(self) -> dict[str, int]:
        return {}
