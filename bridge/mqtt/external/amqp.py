"""The bridge's AMQP 0-9-1 side of the engine (aio-pika), shared by the link and the consumer: one
way to reach the engine (its nodes tried in order) and to name an MQTT topic in AMQP."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator

import aio_pika
from yarl import URL

from bridge.config import ExternalConfig

log = logging.getLogger(__name__)
EXCHANGE = "amq.topic"  # where the MQTT plugin publishes and subscribes
HEARTBEAT = 10  # s: a dead node is noticed within two of these, not the default 60
RETRY = (0.2, 5.0)  # reconnect back-off: first and longest pause


def routing_key(topic: str) -> str:
    """The MQTT plugin's name for a topic or filter: levels separated by '.' instead of '/', the
    one-level wildcard '*' instead of '+' ('#' is the same)."""
    return topic.replace("/", ".").replace("+", "*")


def mqtt_topic(key: str) -> str:
    """The MQTT topic or filter of a routing key (the inverse of routing_key, for topics whose
    levels hold no '.')."""
    return key.replace(".", "/").replace("*", "+")


async def connect(ext: ExternalConfig, tls: ssl.SSLContext | None) -> aio_pika.abc.AbstractConnection:
    """A connection to the first engine node of `mqtt.external.amqp` that answers."""
    error: Exception | None = None
    for url in ext.amqp:
        target = URL(url).with_user(ext.username).with_password(ext.password) % {"heartbeat": HEARTBEAT}
        try:
            return await aio_pika.connect(
                target, ssl_context=tls if target.scheme == "amqps" else None, timeout=5
            )
        except (OSError, TimeoutError, aio_pika.exceptions.AMQPError) as exc:
            log.debug("engine node %s: %r", url, exc)  # the URL holds no credentials
            error = exc
    assert error is not None
    raise error


async def sessions(
    ext: ExternalConfig, tls: ssl.SSLContext | None, what: str
) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    """Connections, one after another: the next once the caller is done with the last (it was lost),
    after a growing pause while no node answers. `what` names the user in the log."""
    pause = RETRY[0]
    while True:
        try:
            connection = await connect(ext, tls)
        except Exception as exc:  # every node refused or is down: keep trying
            log.warning("%s: no engine node reachable (%r); retrying in %.1f s", what, exc, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY[1])
            continue
        pause = RETRY[0]
        try:
            yield connection
        finally:
            if not connection.is_closed:
                await connection.close()
