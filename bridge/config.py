"""broker.yaml: one dataclass tree, loaded strictly (an unknown key is an error, not a silent default;
a value outside its field's range is an error too, named by its path)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_ENV = "THINGBRIDGE_CONFIG"
ENGINE_PASSWORD_ENV = "THINGBRIDGE_ENGINE_PASSWORD"
LOOKED_FOR = f"--config, ${CONFIG_ENV}, ./broker.yaml"
MOUNT = re.compile(r"(/[A-Za-z0-9._~-]+)*")  # "" or /segments, no trailing slash


class ConfigError(ValueError):
    """A setting, option or environment value the user must change: shown as one line, exit status 2."""


def _int(default: int, lo: int, hi: int | None = None) -> Any:
    """An integer field with its allowed range (`hi` None: no upper bound)."""
    return field(default=default, metadata={"min": lo, "max": hi})


def _choice(default: str, *choices: str) -> Any:
    return field(default=default, metadata={"choices": choices})


@dataclass
class Listener:
    host: str = "127.0.0.1"
    port: int = _int(0, 0, 65535)  # 0: any free port
    enabled: bool = True


@dataclass
class PkiConfig:
    dir: Path = Path("certs")
    # Extra DNS names / IPs for the server certificate; localhost and 127.0.0.1 are always included.
    server_names: list[str] = field(default_factory=list)
    # Certificates must end before X.509's year 9999; a century is plenty.
    thing_cert_days: int = _int(3650, 1, 36500)
    default_key_type: str = _choice("RSA", "RSA", "EC")


@dataclass
class ExternalConfig:
    """mqtt.mode external: devices connect to a RabbitMQ cluster's MQTT plugin, the bridge consumes
    their traffic over AMQP and answers the engine's HTTP auth backend. URLs carry no credentials:
    the bridge's own engine user is `username` / `password` for AMQP, MQTT and management alike."""

    # Each engine node's AMQP listener, tried in order (amqp:// or amqps://host:port[/vhost]).
    amqp: list[str] = field(
        default_factory=lambda: ["amqp://127.0.0.1:5672/"], metadata={"urls": ("amqp", "amqps")}
    )
    # Each node's MQTT listener (retained documents are published to every node).
    mqtt: list[str] = field(
        default_factory=lambda: ["mqtts://127.0.0.1:8883"], metadata={"urls": ("mqtt", "mqtts")}
    )
    # Each node's management API (closing a revoked thing's connections).
    management: list[str] = field(
        default_factory=lambda: ["http://127.0.0.1:15672"], metadata={"urls": ("http", "https")}
    )
    username: str = "thingbridge"
    # Empty: taken from $THINGBRIDGE_ENGINE_PASSWORD. Never logged.
    password: str = ""
    # The HTTP auth backend the engine asks who connects and what each principal may do.
    auth: Listener = field(default_factory=lambda: Listener("127.0.0.1", 8181))
    # The durable queue every bridge worker consumes device traffic from (competing consumers).
    queue: str = "thingbridge.devices"
    # Unacknowledged deliveries one worker holds at most.
    prefetch: int = _int(256, 1, 65535)
    # The things' presence from the engine's connection events (its rabbitmq_event_exchange plugin,
    # which must be enabled); false: presence is not tracked in external mode.
    presence: bool = True
    # Seconds a new connection may take to show in the engine's list of connections (its management
    # statistics): a revocation's sweep and a presence reconciliation look again after this long.
    list_lag: int = _int(10, 1, 3600)
    # Seconds between the reconciliations each worker asks for besides those at starts, take-overs
    # and node losses, so that events the presence queue dropped (full) or the engine never sent are
    # corrected within this long; 0: none (each is one read of the engine's list of connections).
    reconcile_every: int = _int(600, 0, 86400)


@dataclass
class MqttConfig:
    # embedded: the bridge's own broker on mqtt.tls / mqtt.plain; external: mqtt.external's engine.
    mode: str = _choice("embedded", "embedded", "external")
    external: ExternalConfig = field(default_factory=ExternalConfig)
    tls: Listener = field(default_factory=lambda: Listener("0.0.0.0", 8883))
    plain: Listener = field(default_factory=lambda: Listener("127.0.0.1", 1883))
    # A packet larger than this cuts the connection before it is buffered (amqtt has no limit of its own).
    # MQTT 3.1.1 itself cannot frame more than 268,435,455 bytes after a 5-byte fixed header.
    max_packet_size: int = _int(1024 * 1024, 1, 268_435_460)
    # A connection whose unsent output exceeds this (bytes) is closed: a client that does not read.
    max_unsent: int = _int(8 * 1024 * 1024, 1)
    # Disconnected persistent sessions are dropped after this many seconds (amqtt keeps them forever).
    session_expiry: int = _int(7 * 24 * 3600, 0)
    # An offline persistent session holds at most this many QoS 1 messages and bytes; when either
    # is reached its oldest message is dropped and counted (droppedQueuedMessages in the stats).
    max_queued_messages: int = _int(1000, 1)
    max_queued_bytes: int = _int(16 * 1024 * 1024, 1)


@dataclass
class HttpConfig:
    http: Listener = field(default_factory=lambda: Listener("0.0.0.0", 8080))
    https: Listener = field(default_factory=lambda: Listener("0.0.0.0", 8443))
    max_body: int = _int(1024 * 1024, 1)
    # Host name devices use to reach this bridge; written into thing bundles (dist zips).
    public_host: str = "localhost"
    # What a thing token's `aud` may name besides `urn:<namespace>:<its id>`; empty: the public
    # HTTP URLs (http://public_host:port, https://..., each also with /dev/v1).
    token_audiences: list[str] = field(default_factory=list)
    # Where each HTTP dialect is served, by its name in bridge/http/registry.py: "" (the root) or a
    # path that starts with "/" and does not end with one, or a list of such paths (the same
    # operations at each: the upgrader's document names two bases). A file names only the dialects
    # it moves.
    mounts: dict[str, str | list[str]] = field(
        default_factory=lambda: {
            "things_gateway": "/dev/v1",
            "portal": "",
            "upgrader": ["/Upgrade/v2", "/v2"],
            "provisioning": "/provision",
            "firmware": "/fw/v1",
        },
        metadata={"mounts": True},
    )


@dataclass
class AccountsConfig:
    token_ttl: int = _int(3600, 1)
    free_plan_things: int = _int(10, 0)


@dataclass
class MessagesConfig:
    # Largest message payload stored (bytes): HTTP answers 413, MQTT drops and counts it.
    max_payload: int = _int(256 * 1024, 1)
    # Most records one history query returns (the `limit` parameter may ask for fewer).
    page_limit: int = _int(10000, 1)
    # Days of message history kept: older messages are deleted by a background pass
    # (bridge/core/retention.py); 0 keeps everything.
    retention_days: int = _int(0, 0, 36500)


@dataclass
class ProvisioningConfig:
    # Seconds a serial number stays enabled for activation (make client, regenerate CIK, remap).
    enable_expiry: int = _int(24 * 3600, 60, 365 * 24 * 3600)
    # Largest content blob a vendor may upload (bytes).
    max_content_size: int = _int(256 * 1024 * 1024, 1, 16 * 1024**3)
    # Largest text/csv import of serial numbers in one request (bytes; spooled to disk as it is
    # checked, so memory stays bounded): 64 MiB is about 2,000,000 serial numbers.
    max_import_size: int = _int(64 * 1024 * 1024, 1024, 4 * 1024**3)


@dataclass
class StoreConfig:
    # sqlite: the file in data_dir; postgresql://...: a PostgreSQL database (the postgres extra)
    url: str = field(default="sqlite:", metadata={"store_url": True})
    # FULL: a commit is on disk before we acknowledge it (QoS 1 PUBACK, HTTP 2xx).
    synchronous: str = _choice("FULL", "FULL", "NORMAL", "EXTRA")
    # SQLite: how long a write waits for a lock another process holds on the file (the command
    # line, a backup) before it is refused as unavailable (HTTP 503, no PUBACK).
    lock_timeout_ms: int = _int(30_000, 10, 600_000)


@dataclass
class Config:
    data_dir: Path = Path("data")
    # The event loop: uvloop where it is installed (1.2-1.35x the MQTT throughput of asyncio's own
    # loop here), else asyncio's; false: always asyncio's.
    uvloop: bool = True
    pki: PkiConfig = field(default_factory=PkiConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    accounts: AccountsConfig = field(default_factory=AccountsConfig)
    messages: MessagesConfig = field(default_factory=MessagesConfig)
    provisioning: ProvisioningConfig = field(default_factory=ProvisioningConfig)
    store: StoreConfig = field(default_factory=StoreConfig)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "thingbridge.sqlite"

    @property
    def local_db(self) -> Path | None:
        """The database file in data_dir; None when the store is a PostgreSQL server."""
        return self.db_path if self.store.url == "sqlite:" else None


def check(cls: type, name: str, value: Any, path: str) -> Any:
    """`value` for field `name` of `cls`, checked against the field's type and range; the error names
    `path` (`accounts.token_ttl` from a file, `--mqtt-port` from the command line)."""
    spec = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = getattr(cls(), name)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false (got {value!r})")
        return value
    if isinstance(default, int):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected an integer (got {value!r})")
        lo, hi = spec.metadata["min"], spec.metadata["max"]
        if hi is not None and not lo <= value <= hi:
            raise ConfigError(f"{path}: must be between {lo} and {hi} (got {value})")
        if value < lo:
            raise ConfigError(f"{path}: must be at least {lo} (got {value})")
        return value
    if spec.metadata.get("mounts"):
        return _check_mounts(value, default, path)
    if spec.metadata.get("urls"):
        return _check_urls(value, spec.metadata["urls"], path)
    if isinstance(default, list):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path}: expected a list of strings")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{path}: expected a string (got {value!r})")
    if isinstance(default, Path):
        return Path(value)
    if spec.metadata.get("store_url"):
        return _check_store_url(value, path)
    choices = spec.metadata.get("choices")
    if choices is not None:
        canonical = [c for c in choices if c.upper() == value.upper()]
        if not canonical:
            raise ConfigError(f"{path}: expected {', '.join(choices[:-1])} or {choices[-1]} (got {value!r})")
        return canonical[0]
    return value


def _check_urls(value: Any, schemes: tuple[str, ...], path: str) -> list[str]:
    """A non-empty list of scheme://host:port[/path] URLs without credentials (those are
    mqtt.external.username and password: one place, never echoed)."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{path}: expected a non-empty list of {schemes[0]}://host:port URLs")
    for url in value:
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError:
            raise ConfigError(f"{path}: {url.partition(':')[0]!r}:... has no valid port") from None
        if parts.username is not None or parts.password is not None:
            raise ConfigError(
                f"{path}: put the credentials in mqtt.external.username and password, not in a URL"
            )
        if parts.scheme not in schemes or not parts.hostname or port == 0:
            raise ConfigError(
                f"{path}: expected {' or '.join(s + '://host:port' for s in schemes)} (got {url!r})"
            )
    return value


def _check_store_url(value: str, path: str) -> str:
    if value == "sqlite:":
        return value
    scheme = value.partition(":")[0]  # only this is echoed: the rest may hold a password
    try:
        port = urllib.parse.urlsplit(value).port if scheme in ("postgresql", "postgres") else None
    except ValueError:
        raise ConfigError(f"{path}: the PostgreSQL URL's port is not a port number") from None
    if scheme not in ("postgresql", "postgres") or port == 0:
        raise ConfigError(
            f"{path}: expected sqlite: or postgresql://user@host:port/database (got {scheme!r}:...)"
        )
    if importlib.util.find_spec("psycopg") is None:
        raise ConfigError(
            f"{path}: PostgreSQL needs the postgres extra (pip install 'thingbridge[postgres]')"
        )
    return value


def mount_paths(mount: str | list[str]) -> list[str]:
    """Where one dialect is served: its mount, or each of its list of mounts."""
    return [mount] if isinstance(mount, str) else list(mount)


def _check_mounts(value: Any, default: dict[str, str | list[str]], path: str) -> dict[str, str | list[str]]:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a mapping of dialect to path (got {value!r})")
    unknown = sorted(map(str, set(value) - set(default)))
    if unknown:
        raise ConfigError(f"{path}: unknown dialect(s) {', '.join(unknown)}; known: {', '.join(default)}")
    for name, mount in value.items():
        places = mount if isinstance(mount, list) and mount else [mount]
        if not all(isinstance(m, str) and MOUNT.fullmatch(m) for m in places):
            raise ConfigError(
                f'{path}.{name}: expected "" (the root) or a path like /dev/v1, starting with / and not '
                f"ending with one, or a non-empty list of them (got {mount!r})"
            )
    mounts = {**default, **value}
    taken = [m for name in mounts for m in mount_paths(mounts[name]) if m]
    if len(taken) != len(set(taken)):
        raise ConfigError(f"{path}: two dialects share a mount ({', '.join(sorted(taken))})")
    return mounts


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    kwargs = {}
    defaults = cls()
    for name, value in raw.items():
        path = f"{where}.{name}" if where else name
        default = getattr(defaults, name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, path)
        else:
            kwargs[name] = check(cls, name, value, path)
    return cls(**kwargs)


def locate(explicit: Path | None) -> Path | None:
    """The config file: `--config`, else $THINGBRIDGE_CONFIG, else ./broker.yaml; None when there is
    none. A file named by the option or the variable must exist: falling through to another one
    would quietly run a different installation."""
    if explicit is not None:
        named, source = explicit, "--config"
    elif os.environ.get(CONFIG_ENV):
        named, source = Path(os.environ[CONFIG_ENV]), f"${CONFIG_ENV}"
    else:
        default = Path("broker.yaml")
        return default if default.exists() else None
    if not named.exists():
        raise ConfigError(f"{source} {named}: no such file")
    return named


def load(path: Path | None, data_dir: Path | None = None) -> Config:
    """Read a config file (None: built-in defaults, relative to the working directory); relative
    paths resolve against the file's folder, so the bridge behaves the same from any directory."""
    base = Path.cwd()
    raw: Any = None
    if path is not None:
        try:
            raw = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
        base = path.resolve().parent
    try:
        cfg: Config = _build(Config, raw, "")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
    if data_dir is not None:
        cfg.data_dir = data_dir
    cfg.data_dir = (base / cfg.data_dir).resolve()
    cfg.pki.dir = (base / cfg.pki.dir).resolve()
    # Filled here so every reader sees one value; `serve` in external mode refuses an empty one.
    cfg.mqtt.external.password = cfg.mqtt.external.password or os.environ.get(ENGINE_PASSWORD_ENV, "")
    return cfg
