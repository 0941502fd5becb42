"""broker.yaml: one dataclass tree, loaded strictly (an unknown key is an error, not a silent default)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class Listener:
    host: str = "127.0.0.1"
    port: int = 0
    enabled: bool = True


@dataclass
class PkiConfig:
    dir: Path = Path("certs")
    # Extra DNS names / IPs for the server certificate; localhost and 127.0.0.1 are always included.
    server_names: list[str] = field(default_factory=list)
    thing_cert_days: int = 3650
    default_key_type: str = "RSA"


@dataclass
class MqttConfig:
    tls: Listener = field(default_factory=lambda: Listener("0.0.0.0", 8883))
    plain: Listener = field(default_factory=lambda: Listener("127.0.0.1", 1883))
    # A packet larger than this cuts the connection before it is buffered (amqtt has no limit of its own).
    max_packet_size: int = 1024 * 1024
    # A connection whose unsent output exceeds this (bytes) is closed: a client that does not read.
    max_unsent: int = 8 * 1024 * 1024
    # Disconnected persistent sessions are dropped after this many seconds (amqtt keeps them forever).
    session_expiry: int = 7 * 24 * 3600


@dataclass
class HttpConfig:
    http: Listener = field(default_factory=lambda: Listener("0.0.0.0", 8080))
    https: Listener = field(default_factory=lambda: Listener("0.0.0.0", 8443))
    max_body: int = 1024 * 1024
    # Host name devices use to reach this bridge; written into thing bundles (dist zips).
    public_host: str = "localhost"


@dataclass
class AccountsConfig:
    token_ttl: int = 3600
    free_plan_things: int = 10


@dataclass
class MessagesConfig:
    # Largest message payload stored (bytes): HTTP answers 413, MQTT drops and counts it.
    max_payload: int = 256 * 1024
    # Most records one history query returns (the `limit` parameter may ask for fewer).
    page_limit: int = 10000


@dataclass
class StoreConfig:
    # FULL: a commit is on disk before we acknowledge it (QoS 1 PUBACK, HTTP 2xx).
    synchronous: str = "FULL"


@dataclass
class Config:
    data_dir: Path = Path("data")
    pki: PkiConfig = field(default_factory=PkiConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    accounts: AccountsConfig = field(default_factory=AccountsConfig)
    messages: MessagesConfig = field(default_factory=MessagesConfig)
    store: StoreConfig = field(default_factory=StoreConfig)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "thingbridge.sqlite"


def _build(cls: type, raw: Any, where: str) -> Any:
    if not dataclasses.is_dataclass(cls):
        return raw
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(hints)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {', '.join(sorted(unknown))}")
    kwargs = {}
    defaults = cls()
    for name, value in raw.items():
        default = getattr(defaults, name)
        path = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, path)
        elif isinstance(default, Path):
            kwargs[name] = Path(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{path}: expected true or false")
            kwargs[name] = value
        elif isinstance(default, int):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{path}: expected an integer")
            kwargs[name] = value
        elif isinstance(default, list):
            if not isinstance(value, list):
                raise ConfigError(f"{path}: expected a list")
            kwargs[name] = [str(v) for v in value]
        else:
            kwargs[name] = str(value)
    return cls(**kwargs)


def load(path: Path | None, data_dir: Path | None = None) -> Config:
    """Read broker.yaml (a missing default file means built-in defaults); relative paths resolve
    against the config file's folder, so the bridge behaves the same from any working directory."""
    base = Path.cwd()
    raw: Any = {}
    if path is not None:
        if path.exists():
            try:
                raw = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        elif path.name != "broker.yaml" or path.parent != Path("."):
            raise ConfigError(f"{path}: no such config file")
        base = path.resolve().parent
    cfg: Config = _build(Config, raw, "")
    if data_dir is not None:
        cfg.data_dir = data_dir
    cfg.data_dir = (base / cfg.data_dir).resolve()
    cfg.pki.dir = (base / cfg.pki.dir).resolve()
    if cfg.pki.default_key_type not in ("RSA", "EC"):
        raise ConfigError("pki.default_key_type: expected RSA or EC")
    if cfg.store.synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
        raise ConfigError("store.synchronous: expected FULL, NORMAL or EXTRA")
    return cfg
