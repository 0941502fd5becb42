"""What the core needs from a device transport. The embedded amqtt broker implements it today;
a client of an external MQTT cluster can implement it tomorrow."""

from __future__ import annotations

from typing import Protocol


class DeviceLink(Protocol):
    async def disconnect_thing(self, thing_id: str) -> int:
        """Close every live session of the thing; returns how many were closed."""
        ...


class NoLink:
    """For command-line use, where no broker runs in this process."""

    async def disconnect_thing(self, thing_id: str) -> int:
        return 0
