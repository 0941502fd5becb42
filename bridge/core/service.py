"""The core assembled: one object the adapters and the command line hold."""

from __future__ import annotations

from bridge import pki
from bridge.config import Config, mount_paths
from bridge.core.accounts import Accounts, App
from bridge.core.bundle import Endpoints
from bridge.core.firmware import Firmware
from bridge.core.messages import Messages
from bridge.core.outbox import Outbox
from bridge.core.ports import DeviceLink, NoLink
from bridge.core.presence import Presence
from bridge.core.provisioning import Provisioning
from bridge.core.retention import Retention
from bridge.core.rollouts import Rollouts
from bridge.core.status import Status
from bridge.core.things import Things
from bridge.core.upgrades import Upgrades
from bridge.keyring import Keyring
from bridge.store import Store


class Core:
    def __init__(self, cfg: Config, store: Store, link: DeviceLink | None = None) -> None:
        """`link`: the device transport the flows publish through and revoke sessions on (the
        embedded broker when serving; none for the command line, whose documents reach devices
        through the outbox the serving process drains)."""
        self.cfg = cfg
        self.store = store
        self.link: DeviceLink = link if link is not None else NoLink()
        self.ca = pki.CertificateAuthority.load_or_create(cfg.pki.dir)
        self.keyring = Keyring.load_or_create(cfg.data_dir)
        self.accounts = Accounts(
            store, self.keyring.token_key, cfg.accounts.token_ttl, cfg.accounts.free_plan_things
        )
        self.outbox = Outbox(store, self.link)
        self.things = Things(
            store,
            self.ca,
            self.keyring,
            cert_days=cfg.pki.thing_cert_days,
            default_key_type=cfg.pki.default_key_type,
            free_plan_things=cfg.accounts.free_plan_things,
            outbox=self.outbox,
            link=self.link,
            audiences=self.token_audiences,
        )
        self.messages = Messages(
            store,
            self.link,
            max_payload=cfg.messages.max_payload,
            page_limit=cfg.messages.page_limit,
            retention_days=cfg.messages.retention_days,
        )
        # Deletes history older than messages.retention_days (a task of the serving process).
        self.retention = Retention(store, cfg.messages.retention_days)
        self.presence = Presence(store, self.outbox, self.link)
        self.status = Status(store, self.outbox, self.link)
        # Software upgrades; a device's results move the staged rollouts it is in.
        self.rollouts = Rollouts(store, self.outbox, self.messages)
        self.upgrades = Upgrades(store, self.outbox, self.link, self.messages, self.rollouts.on_results)
        # Vendors enrol serial numbers; an activated one is a thing of the vendor's owner.
        self.provisioning = Provisioning(
            store, self.things, self.outbox, cfg.provisioning, free_plan_things=cfg.accounts.free_plan_things
        )
        # Firmware products: an upgrader software bound to a provisioning model (no third model).
        self.firmware = Firmware(
            store,
            self.outbox,
            self.things,
            self.upgrades,
            self.provisioning,
            mount_paths(cfg.http.mounts.get("firmware", ""))[0],  # "": the dialect is not served
        )
        # Where devices reach us; the running process replaces the configured ports with bound ones.
        self.endpoints = Endpoints(
            cfg.http.public_host,
            cfg.mqtt.tls.port,
            cfg.http.http.port,
            cfg.http.https.port if cfg.http.https.enabled else None,
            mount_paths(cfg.http.mounts["things_gateway"])[0],
        )

    def token_audiences(self) -> list[str]:
        """Audiences a thing token may name (besides `urn:<namespace>:<its id>`): the configured
        ones, else the bridge's public HTTP URLs (with and without the things-gateway mount)."""
        if self.cfg.http.token_audiences:
            return self.cfg.http.token_audiences
        urls = self.endpoints.http_urls()
        bases = [url.removesuffix(self.endpoints.api_path) for url in urls]
        return bases + urls

    async def issue_app_certificate(self, app: App) -> dict[str, bytes]:
        """A client certificate (CN `app:<name>`) so the application can use the TLS listener too.
        Issuing a new one revokes the previous one."""
        key = pki.generate_key("EC")
        cert = self.ca.issue_client(f"app:{app.name}", key.public_key(), self.cfg.pki.thing_cert_days)
        await self.accounts.set_app_certificate(app.name, pki.cert_id(cert))
        return {
            "ca.pem": self.ca.ca_pem.encode(),
            "certificate.pem": pki.cert_pem(cert).encode(),
            "private.key": pki.private_pem(key).encode(),
        }
