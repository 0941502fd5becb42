"""`thingbridge` / `python -m bridge`: serve, and the operator commands that work on a data directory."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from bridge import config
from bridge.core import ids
from bridge.core.accounts import generate_password
from bridge.core.bundle import thing_files
from bridge.core.errors import DomainError, Invalid
from bridge.core.service import Core
from bridge.core.status import DESIRED_FIELDS, kind_name
from bridge.core.things import NewThing
from bridge.store import StoreError


def _common(p: argparse.ArgumentParser, default: object = argparse.SUPPRESS) -> None:
    """--config and --data-dir, accepted before the subcommand (the main parser's defaults) and
    after it (SUPPRESS: a subcommand that is not given them keeps what came before)."""
    p.add_argument(
        "--config",
        type=Path,
        default=default,
        help=f"config file (default: ${config.CONFIG_ENV}, else ./broker.yaml); "
        "relative paths in it resolve against its folder",
    )
    p.add_argument(
        "--data-dir", type=Path, default=default, help="data directory (overrides data_dir in the config)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thingbridge", description="MQTT-first IoT broker bridge")
    _common(parser, default=None)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the bridge (broker, HTTP, store) in one process")
    _common(serve)
    serve.add_argument("--host", help="bind address for every listener except plain MQTT")
    serve.add_argument("--mqtt-port", type=int, help="MQTT over TLS port (0 = any free port)")
    serve.add_argument("--mqtt-plain-port", type=int, help="plain MQTT port for applications")
    serve.add_argument("--http-port", type=int)
    serve.add_argument("--https-port", type=int)

    user = sub.add_parser("user", help="users").add_subparsers(dest="action", required=True)
    add = user.add_parser("add", help="create a user")
    _common(add)
    add.add_argument("name")
    add.add_argument("--password", help="default: prompt (or generate when not on a terminal)")
    add.add_argument("--admin", action="store_true")

    app = sub.add_parser("app", help="application principals").add_subparsers(dest="action", required=True)
    add = app.add_parser("add", help="create an application principal (MQTT username + password)")
    _common(add)
    add.add_argument("name")
    add.add_argument("--owner", required=True, help="the user whose things it may see")
    add.add_argument("--fleet-wide", action="store_true", help="sees every user's things (admin owner only)")
    add.add_argument("--password", help="default: generated and printed")
    add.add_argument("--out", type=Path, help="also write a client certificate for the TLS listener here")

    thing = sub.add_parser("thing", help="things").add_subparsers(dest="action", required=True)
    create = thing.add_parser(
        "create", help="create a thing and write its bundle (certificate, keys, config)"
    )
    _common(create)
    create.add_argument("name", help="thingName")
    create.add_argument("--owner", required=True)
    create.add_argument("--out", type=Path, required=True)
    create.add_argument("--id", help="thing id (default: a new UUID)")
    create.add_argument("--type", default="generic", help="thingType")
    create.add_argument("--key-type", choices=["RSA", "EC"])

    conf = sub.add_parser("config", help="desired configuration (device twin)").add_subparsers(
        dest="action", required=True
    )
    cset = conf.add_parser("set", help="set a thing's desired configuration and package")
    cset.add_argument("thing", help="thing id")
    cdef = conf.add_parser("defaults", help="set fleet defaults for a thingType")
    cdef.add_argument("thing_type")
    for p in (cset, cdef):
        _common(p)
        p.add_argument("--owner", required=True)
        for name, (_column, kind) in DESIRED_FIELDS.items():
            p.add_argument(
                _twin_option(name),
                dest=name,
                type=int if kind is int else str,
                metavar={int: "N", dict: "JSON"}.get(kind, "TEXT"),
                help=f"{name} (JSON {kind_name(kind)})",
            )
        p.add_argument(
            "--clear",
            action="append",
            default=[],
            choices=list(DESIRED_FIELDS),
            metavar="FIELD",
            help=f"inherit FIELD again ({', '.join(DESIRED_FIELDS)})",
        )
    cset.add_argument("--reg-id", help="regId alias of the thing")

    status = sub.add_parser("status", help="things with desired state, last status and presence")
    _common(status)
    status.add_argument("--owner", required=True)
    status.add_argument("--type", help="only this thingType")

    plan = sub.add_parser("plan", help="subscription plans").add_subparsers(dest="action", required=True)
    pset = plan.add_parser("set", help="give a user a plan with a thing quota")
    _common(pset)
    pset.add_argument("user")
    pset.add_argument("--things", type=int, required=True)
    pset.add_argument("--name", default="Custom", help="plan name")

    vendor = sub.add_parser("vendor", help="provisioning vendors").add_subparsers(
        dest="action", required=True
    )
    vadd = vendor.add_parser("add", help="create a vendor; prints its token and vendor CIK once")
    _common(vadd)
    vadd.add_argument("name")
    vadd.add_argument("--owner", required=True, help="the user whose things its serial numbers become")
    _common(vendor.add_parser("list", help="every vendor, its owner and whether it is revoked"))
    vrevoke = vendor.add_parser("revoke", help="stop accepting a vendor's token and CIK")
    _common(vrevoke)
    vrevoke.add_argument("name")

    firmware = sub.add_parser("firmware", help="firmware products").add_subparsers(
        dest="action", required=True
    )
    fimport = firmware.add_parser(
        "import-serials", help="enrol a product's serial numbers from CSV (<sn>[,<extra>] lines), all or none"
    )
    _common(fimport)
    fimport.add_argument("product")
    fimport.add_argument("file", type=Path, help="the CSV file, any size; - for standard input")
    return parser


def _check_out(out: Path) -> None:
    """Refuse an --out that would overwrite anything, before anything is created."""
    from bridge.app import unusable

    try:
        if out.is_dir():
            if any(out.iterdir()):
                raise Invalid(f"--out {out}: the folder is not empty; name a new or empty folder")
        elif out.exists() or out.is_symlink():
            raise Invalid(f"--out {out}: exists and is not a folder; name a new or empty folder")
        elif (why := unusable(out)) is not None:
            raise Invalid(f"--out {out}: {why}")
    except OSError as exc:  # a name too long, a folder we may not list
        raise Invalid(f"--out {out}: {exc.strerror}") from None


def _write_out(out: Path, files: dict[str, bytes]) -> None:
    """Write files into the new or empty folder `out` (see _check_out), private keys mode 0600;
    on failure remove what was written and the folders made for it."""
    made = [folder for folder in (out, *out.parents) if not folder.exists()]
    written: list[Path] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            path = out / name
            fd = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if name.endswith(".key") else 0o644
            )
            written.append(path)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
    except OSError as exc:
        for path in written:
            path.unlink(missing_ok=True)
        for folder in made:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise Invalid(f"--out {out}: cannot write {exc.filename or out}: {exc.strerror}") from None


async def _user_add(core: Core, a: argparse.Namespace) -> None:
    password = a.password
    if password is None:
        password = getpass.getpass("password: ") if sys.stdin.isatty() else generate_password()
        if not sys.stdin.isatty():
            print(f"password: {password}")
    user = await core.accounts.create_user(a.name, password, role="admin" if a.admin else "user")
    print(f"created user {user.username} ({user.id})")


async def _app_add(core: Core, a: argparse.Namespace) -> None:
    if a.out:
        _check_out(a.out)
    password = a.password or generate_password()
    app = await core.accounts.create_app(a.name, a.owner, password, a.fleet_wide)
    print(f"created application {app.name}: MQTT username {app.name!r}, client id 'app:{app.name}'")
    if not a.password:
        print(f"password: {password}")
    if a.out:
        _write_out(a.out, await core.issue_app_certificate(app))
        print(f"wrote TLS client certificate to {a.out}")


async def _thing_create(core: Core, a: argparse.Namespace) -> None:
    owner = await core.accounts.user_by_name(a.owner)
    _check_out(a.out)
    thing = await core.things.create(owner, NewThing(id=a.id, name=a.name, type=a.type, key_type=a.key_type))
    try:
        _write_out(a.out, thing_files(thing, core.ca.ca_pem, core.endpoints))
    except Exception:
        await core.things.delete(owner, thing.id)  # no orphan counted against the quota
        raise
    print(f"created thing {thing.id}; bundle written to {a.out}")


async def _plan_set(core: Core, a: argparse.Namespace) -> None:
    sub = await core.accounts.set_plan(a.user, a.things, a.name)
    print(f"{a.user}: plan {sub.plan_name}, {sub.thing_quota} things")


async def _vendor_add(core: Core, a: argparse.Namespace) -> None:
    owner = await core.accounts.user_by_name(a.owner)
    new = await core.provisioning.vendors.add(a.name, owner)
    # Shown this once: only their hashes are stored.
    print(f"created vendor {new.vendor.name} (owner {owner.username})")
    print(f"X-Exosite-Token: {new.token}")
    print(f"X-Exosite-CIK: {new.cik}")


async def _vendor_list(core: Core, a: argparse.Namespace) -> None:
    print(f"{'vendor':32} {'owner':24} {'created':20} revoked")
    for v in await core.provisioning.vendors.list():
        revoked = ids.iso(v.revoked) if v.revoked is not None else "-"
        print(f"{v.name:32} {v.owner:24} {ids.iso(v.created):20} {revoked}")


async def _vendor_revoke(core: Core, a: argparse.Namespace) -> None:
    await core.provisioning.vendors.revoke(a.name)
    print(f"revoked vendor {a.name}: its token and CIK are no longer accepted")


async def _firmware_import(core: Core, a: argparse.Namespace) -> None:
    try:
        source = sys.stdin.buffer if str(a.file) == "-" else a.file.open("rb")
    except OSError as exc:
        raise config.ConfigError(f"{a.file}: {exc.strerror}") from exc

    async def chunks() -> Any:
        with source:
            while chunk := await asyncio.to_thread(source.read, 1 << 16):
                yield chunk

    added = await core.firmware.import_serials(None, a.product, chunks())
    print(f"enrolled {added} serial numbers in product {a.product}")


def _twin_option(name: str) -> str:
    """A device-twin field's option: UpdateRate -> --update-rate, packageUrl -> --package-url."""
    return "--" + re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def _config_changes(a: argparse.Namespace) -> dict[str, Any]:
    changes: dict[str, Any] = {name: None for name in a.clear}
    for name, (_column, kind) in DESIRED_FIELDS.items():
        value = getattr(a, name)
        if value is None:
            continue
        if kind is dict:
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                raise Invalid(f"{_twin_option(name)}: not valid JSON: {exc}") from exc
        changes[name] = value
    if getattr(a, "reg_id", None) is not None:
        changes["regId"] = a.reg_id
    if not changes:
        raise Invalid("nothing to change: give at least one option")
    return changes


async def _config_set(core: Core, a: argparse.Namespace) -> None:
    owner = await core.accounts.user_by_name(a.owner)
    state = await core.status.set_desired(owner.id, a.thing, _config_changes(a))
    print(orjson.dumps(state["effective"]).decode())


async def _config_defaults(core: Core, a: argparse.Namespace) -> None:
    owner = await core.accounts.user_by_name(a.owner)
    result = await core.status.set_fleet_defaults(owner.id, a.thing_type, _config_changes(a))
    print(orjson.dumps(result).decode())


async def _status(core: Core, a: argparse.Namespace) -> None:
    owner = await core.accounts.user_by_name(a.owner)
    rows = await core.status.fleet(owner.id, a.type)
    print(f"{'thing':38} {'type':12} {'presence':8} {'config':7} {'last status':24} reported at")
    for row in rows:
        reported = row["reported"]
        ts = ids.iso(reported["ts"]) if reported["ts"] else "-"
        print(
            f"{row['flthingspk']:38} {row['thingType']:12} {row['presence']['state']:8} "
            f"{row['configState']:7} {(reported['status'] or '-'):24} {ts}"
        )


COMMANDS: dict[tuple[str, str | None], Callable[[Core, argparse.Namespace], Awaitable[None]]] = {
    ("config", "set"): _config_set,
    ("config", "defaults"): _config_defaults,
    ("status", None): _status,
    ("user", "add"): _user_add,
    ("app", "add"): _app_add,
    ("thing", "create"): _thing_create,
    ("plan", "set"): _plan_set,
    ("vendor", "add"): _vendor_add,
    ("vendor", "list"): _vendor_list,
    ("vendor", "revoke"): _vendor_revoke,
    ("firmware", "import-serials"): _firmware_import,
}


def _apply_overrides(cfg: config.Config, a: argparse.Namespace) -> None:
    if a.host:
        for listener in (cfg.mqtt.tls, cfg.http.http, cfg.http.https):
            listener.host = a.host
    for option, value, listener in (
        ("--mqtt-port", a.mqtt_port, cfg.mqtt.tls),
        ("--mqtt-plain-port", a.mqtt_plain_port, cfg.mqtt.plain),
        ("--http-port", a.http_port, cfg.http.http),
        ("--https-port", a.https_port, cfg.http.https),
    ):
        if value is not None:
            listener.port = config.check(config.Listener, "port", value, option)


async def _run_command(cfg: config.Config, a: argparse.Namespace) -> None:
    from bridge.app import open_store

    store = open_store(cfg)
    try:
        await COMMANDS[(a.command, getattr(a, "action", None))](Core(cfg, store), a)
    finally:
        await asyncio.to_thread(store.close)


def _require_installation(cfg: config.Config, path: Path | None) -> None:
    """Commands work on what `serve` created. Creating a second installation instead (a new
    database, secret and CA that the running server never sees) is what a command run from the
    wrong folder used to do."""
    # what the first `serve` creates: the database, the keyring's secret, the CA
    made_by_serve = (cfg.local_db, cfg.data_dir / "secret.key", cfg.pki.dir / "ca.pem")
    missing = next((file for file in made_by_serve if file is not None and not file.exists()), None)
    if missing is None:
        return
    if path is None:
        raise config.ConfigError(
            f"no configuration found (looked for {config.LOOKED_FOR}); "
            "run this where broker.yaml is, or pass --config"
        )
    raise config.ConfigError(
        f"no installation at {missing.parent} (no {missing.name}; configured by {path}): "
        "start `thingbridge serve` first, or pass --config"
    )


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        path = config.locate(a.config)
        cfg = config.load(path, a.data_dir)
        if a.command == "serve":
            from bridge.app import run

            _apply_overrides(cfg, a)
            return run(cfg, path)
        _require_installation(cfg, path)
        asyncio.run(_run_command(cfg, a))
    except config.ConfigError as exc:  # a setting, option or the environment: exit status 2
        print(f"thingbridge: {exc}", file=sys.stderr)
        return 2
    except DomainError as exc:
        print(f"thingbridge: {exc}", file=sys.stderr)
        return 1
    except StoreError as exc:  # locked past store.lock_timeout_ms by the server, or unreachable
        print(f"thingbridge: the database refused the command: {exc}", file=sys.stderr)
        return 1
    return 0
