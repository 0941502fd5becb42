"""`thingbridge` / `python -m bridge`: serve, and the operator commands that work on a data directory."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
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
from bridge.core.things import NewThing


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        default=Path("broker.yaml"),
        help="config file (default ./broker.yaml); relative paths in it resolve against its folder",
    )
    p.add_argument("--data-dir", type=Path, help="data directory (overrides data_dir in the config)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thingbridge", description="MQTT-first IoT broker bridge")
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
        p.add_argument("--update-rate", type=int, help="UpdateRate: hours between SetStatus calls")
        p.add_argument("--app-param", help="AppParam: a JSON object")
        p.add_argument("--data", help="data (GetURL extras): a JSON object")
        p.add_argument("--package-url", help="packageUrl")
        p.add_argument("--version", type=int, help="package version (integer)")
        p.add_argument(
            "--clear",
            action="append",
            default=[],
            metavar="FIELD",
            help="inherit FIELD again (UpdateRate, AppParam, data, packageUrl, version)",
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
    return parser


def _write_files(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        path = folder / name
        path.write_bytes(data)
        if name.endswith(".key"):
            os.chmod(path, 0o600)


async def _user_add(core: Core, a: argparse.Namespace) -> None:
    password = a.password
    if password is None:
        password = getpass.getpass("password: ") if sys.stdin.isatty() else generate_password()
        if not sys.stdin.isatty():
            print(f"password: {password}")
    user = await core.accounts.create_user(a.name, password, role="admin" if a.admin else "user")
    print(f"created user {user.username} ({user.id})")


async def _app_add(core: Core, a: argparse.Namespace) -> None:
    password = a.password or generate_password()
    app = await core.accounts.create_app(a.name, a.owner, password, a.fleet_wide)
    print(f"created application {app.name}: MQTT username {app.name!r}, client id 'app:{app.name}'")
    if not a.password:
        print(f"password: {password}")
    if a.out:
        _write_files(a.out, await core.issue_app_certificate(app))
        print(f"wrote TLS client certificate to {a.out}")


async def _thing_create(core: Core, a: argparse.Namespace) -> None:
    owner = await core.accounts.user_by_name(a.owner)
    thing = await core.things.create(owner, NewThing(id=a.id, name=a.name, type=a.type, key_type=a.key_type))
    _write_files(a.out, thing_files(thing, core.ca.ca_pem, core.endpoints))
    print(f"created thing {thing.id}; bundle written to {a.out}")


async def _plan_set(core: Core, a: argparse.Namespace) -> None:
    sub = await core.accounts.set_plan(a.user, a.things, a.name)
    print(f"{a.user}: plan {sub.plan_name}, {sub.thing_quota} things")


def _config_changes(a: argparse.Namespace) -> dict[str, Any]:
    changes: dict[str, Any] = {name: None for name in a.clear}
    for name, option, value in (
        ("UpdateRate", "--update-rate", a.update_rate),
        ("AppParam", "--app-param", a.app_param),
        ("data", "--data", a.data),
        ("packageUrl", "--package-url", a.package_url),
        ("version", "--version", a.version),
    ):
        if value is None:
            continue
        if name in ("AppParam", "data"):
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                raise Invalid(f"{option}: not valid JSON: {exc}") from exc
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
}


def _apply_overrides(cfg: config.Config, a: argparse.Namespace) -> None:
    if a.host:
        for listener in (cfg.mqtt.tls, cfg.http.http, cfg.http.https):
            listener.host = a.host
    for value, listener in (
        (a.mqtt_port, cfg.mqtt.tls),
        (a.mqtt_plain_port, cfg.mqtt.plain),
        (a.http_port, cfg.http.http),
        (a.https_port, cfg.http.https),
    ):
        if value is not None:
            listener.port = value


async def _run_command(cfg: config.Config, a: argparse.Namespace) -> None:
    from bridge.app import open_store

    store = open_store(cfg)
    try:
        await COMMANDS[(a.command, getattr(a, "action", None))](Core(cfg, store), a)
    finally:
        await asyncio.to_thread(store.close)


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        cfg = config.load(a.config, a.data_dir)
    except config.ConfigError as exc:
        print(f"thingbridge: {exc}", file=sys.stderr)
        return 2
    if a.command == "serve":
        from bridge.app import run

        _apply_overrides(cfg, a)
        return run(cfg)
    try:
        asyncio.run(_run_command(cfg, a))
    except DomainError as exc:
        print(f"thingbridge: {exc}", file=sys.stderr)
        return 1
    return 0
