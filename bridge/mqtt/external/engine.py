"""External mode as the serving process runs it, in place of the embedded broker: the link is made
before the core (its DeviceLink), then `start(core)` opens the auth backend's listener (the engine
asks it about the bridge's own user too), the connections to the engine, and consumes device
traffic and connection events (presence); `stop()` closes them again."""

from __future__ import annotations

import asyncio
import ssl
import urllib.parse

import aio_pika

from bridge.config import Config, ConfigError
from bridge.core.service import Core
from bridge.mqtt.external.amqp import connect
from bridge.mqtt.external.auth import AuthListener, Logins, start_external_auth
from bridge.mqtt.external.consumer import DeviceConsumer
from bridge.mqtt.external.link import ExternalLink
from bridge.mqtt.external.management import Management
from bridge.mqtt.external.presence import PresenceConsumer

START_TIMEOUT = 30.0  # s for the engine to answer at start-up


class ExternalEngine:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.logins = Logins()  # the auth backend records, the management API closes by them
        self.management = Management(cfg.mqtt.external, self.logins)
        self.link = ExternalLink(cfg.mqtt.external, close_thing=self.management.close_thing)
        self.consumer: DeviceConsumer | None = None
        self.presence: PresenceConsumer | None = None
        self.auth: AuthListener | None = None

    def device_port(self) -> int:
        """The MQTT/TLS port devices are told (their bundles): the first engine node's."""
        url = urllib.parse.urlsplit(self.cfg.mqtt.external.mqtt[0])
        return url.port or (8883 if url.scheme == "mqtts" else 1883)

    async def start(self, core: Core) -> None:
        ext = self.cfg.mqtt.external
        if not ext.password:
            raise ConfigError(
                "mqtt.external.password: the bridge's engine password is empty; set it or"
                " $THINGBRIDGE_ENGINE_PASSWORD"
            )
        self.auth = await start_external_auth(self.cfg, core, self.logins, self.link.counters)
        tls = ssl.create_default_context(cafile=str(core.ca.ca_path))  # the engine's certificates
        self.consumer = DeviceConsumer(core, self.link)
        try:
            await self.consumer.mirror()
        except ConnectionError as exc:
            raise ConfigError(f"mqtt.external.management: {exc}") from None
        try:  # once, at start: an engine that is not there is a setting to fix, not a retry loop
            connection = await connect(ext, tls)
        except Exception as exc:
            why = exc or type(exc).__name__
            raise ConfigError(
                f"mqtt.external.amqp: no engine node answered ({', '.join(ext.amqp)}: {why}); check the"
                " URLs, that the engine runs, and mqtt.external.username and password"
            ) from None
        async with connection:
            if ext.presence:
                self.presence = PresenceConsumer(core, self.link, self.management)
                try:
                    await self.presence.declare(await connection.channel())
                except aio_pika.exceptions.ChannelNotFoundEntity:
                    raise ConfigError(
                        "mqtt.external.presence: the engine has no exchange amq.rabbitmq.event; enable"
                        " the rabbitmq_event_exchange plugin on every node, or set presence: false"
                    ) from None
        self.link.start(tls)
        self.consumer.start(tls)
        consuming = [self.consumer.ready.wait()]
        if self.presence is not None:
            self.presence.start(tls)
            consuming.append(self.presence.ready.wait())
        try:
            await asyncio.wait_for(asyncio.gather(*consuming), START_TIMEOUT)
        except TimeoutError:
            raise ConfigError(
                f"mqtt.external.amqp: no engine node answered within {START_TIMEOUT:.0f} s"
                f" ({', '.join(ext.amqp)}); check the URLs and mqtt.external.username"
            ) from None

    def ports(self) -> dict[str, int]:
        """For the ready line: the auth backend's bound port (none when another process answers)."""
        return {"engine_auth": self.auth.port} if self.auth is not None else {}

    async def stop(self) -> None:
        if self.presence is not None:
            await self.presence.stop()
        if self.consumer is not None:
            await self.consumer.stop()
        await self.link.stop()
        await self.management.close()
        if self.auth is not None:
            await self.auth.stop()
