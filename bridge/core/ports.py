"""What the core needs from a device transport. The embedded amqtt broker implements it; the
client of an external MQTT engine does too (mqtt.mode: external)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Delivery(Protocol):
    """A message on its way to a topic's subscribers, in two steps around the commit of the record
    it reports: `queue` runs inside that transaction (a row per offline or unacknowledged
    persistent session, so the record and its queue entries commit or fail together), `send`
    after the commit."""

    def queue(self, conn: Any) -> None: ...

    async def send(self) -> None: ...


class DeviceLink(Protocol):
    async def disconnect_thing(self, thing_id: str, *, forget: bool) -> int:
        """Close every live session of the thing; returns how many were closed. With `forget`
        (the thing was deleted) also drop its persistent sessions and retained messages."""
        ...

    async def delivery(self, topic: str, payload: bytes) -> Delivery:
        """A message for the topic's current subscribers, to be queued in the caller's transaction
        (see `commit_and_route`)."""
        ...

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Route a message to the topic's subscribers (queued for offline persistent sessions);
        `retain` also keeps it as the topic's retained message (an empty payload clears it)."""
        ...

    async def restore_retained(self, topic: str, payload: bytes) -> None:
        """Keep the message as the topic's retained one without routing it: the state put back at
        start-up, which every subscriber already has or has queued."""
        ...

    def stats(self) -> dict[str, int]:
        """Counters for operators: connections, refusals, denied and dropped messages."""
        ...


async def commit_and_route(
    write: Callable[..., Awaitable[T]],
    link: DeviceLink,
    topic: str,
    payload: bytes,
    fn: Callable[..., T],
    *args: Any,
) -> T:
    """`fn(conn, *args)` committed by `write` (a store's or the outbox's) in one transaction with
    the message's queue entries, then the message sent: a record the bridge acknowledges and the
    deliveries it owes are on disk together, or neither is."""
    delivery = await link.delivery(topic, payload)

    def record(conn: Any, *args: Any) -> T:
        result = fn(conn, *args)
        delivery.queue(conn)
        return result

    result = await write(record, *args)
    await delivery.send()
    return result


class NoLink:
    """For command-line use, where no broker runs in this process."""

    class _Nowhere:
        def queue(self, conn: Any) -> None:
            return None

        async def send(self) -> None:
            return None

    async def disconnect_thing(self, thing_id: str, *, forget: bool) -> int:
        return 0

    async def delivery(self, topic: str, payload: bytes) -> Delivery:
        return self._Nowhere()

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        return None

    async def restore_retained(self, topic: str, payload: bytes) -> None:
        return None

    def stats(self) -> dict[str, int]:
        return {}
