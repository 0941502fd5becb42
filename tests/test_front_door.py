"""The front door as a new user meets it (issue #8), through the real `python -m bridge` process: a
start that cannot complete says so in one line with exit status 2 and leaves nothing running or
open; commands find the installation the server uses and never make a second one; nonsensical
settings are refused when the config is loaded; `thing create --out` overwrites nothing and leaves
no orphan thing; the database is private to its owner."""

from __future__ import annotations

import importlib.util
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.conftest import ADMIN_PASSWORD, Bridge, write_config
from tests.helpers import create_thing, new_user, thing_client, token, unique


def thingbridge(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it: no $THINGBRIDGE_CONFIG unless given."""
    base = {k: v for k, v in os.environ.items() if k != "THINGBRIDGE_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        cwd=cwd,
        env={**base, "THINGBRIDGE_ADMIN_PASSWORD": ADMIN_PASSWORD, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line(result: subprocess.CompletedProcess[str], status: int, *expected: str) -> str:
    """The failure is exactly one line on stderr, names what to change, and nothing started."""
    assert result.returncode == status, result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0]
    assert "thingbridge ready" not in result.stdout
    return lines[0]


def closed_cleanly(folder: Path) -> bool:
    """The last connection to close checkpoints and removes the -wal and -shm files: a failed start
    closed its database instead of leaving it open."""
    data = folder / "data"
    return (data / "thingbridge.sqlite").exists() and sorted(p.name for p in data.iterdir()) == [
        "secret.key",
        "thingbridge.sqlite",
    ]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def with_listener(folder: Path, group: str, name: str, **values: object) -> Path:
    """write_config with one listener changed (its overrides would replace the whole section)."""
    config = write_config(folder)
    doc = orjson.loads(config.read_bytes())
    doc[group][name].update(values)
    config.write_bytes(orjson.dumps(doc))
    return config


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# ---- item 4: a start that cannot complete --------------------------------------------------------
def test_https_port_in_use_after_everything_else_started(tmp_path: Path, busy_port: int) -> None:
    # HTTPS is bound last: the store, the broker and three listeners are up when it fails.
    config = with_listener(tmp_path, "http", "https", port=busy_port)
    result = thingbridge("serve", "--config", str(config))
    one_line(
        result,
        2,
        f"cannot listen on 127.0.0.1:{busy_port} (http.https): address already in use",
        "http.https.port or --https-port",
    )
    assert closed_cleanly(tmp_path)


def test_mqtt_port_in_use_named_by_its_option(tmp_path: Path, busy_port: int) -> None:
    config = write_config(tmp_path)
    result = thingbridge("serve", "--config", str(config), "--mqtt-plain-port", str(busy_port))
    one_line(result, 2, f"127.0.0.1:{busy_port} (mqtt.plain): address already in use", "--mqtt-plain-port")
    assert closed_cleanly(tmp_path)


def test_address_not_of_this_machine(tmp_path: Path) -> None:
    address = "192.0.2.1"  # TEST-NET-1: never assigned
    with socket.socket() as probe:
        try:
            probe.bind((address, 0))
            pytest.skip("this machine binds non-local addresses (ip_nonlocal_bind)")
        except OSError:
            pass
    config = with_listener(tmp_path, "http", "http", host=address)
    one_line(thingbridge("serve", "--config", str(config)), 2, f"{address}:0 (http.http)", "http.http.host")
    assert closed_cleanly(tmp_path)


def test_external_mode_without_its_engine(tmp_path: Path) -> None:
    """mqtt.mode external with no engine at the configured URLs: one line naming the setting."""
    with socket.socket() as closed:  # bound, not listening: connections to it are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        external = {
            "amqp": [f"amqp://127.0.0.1:{port}/"],
            "mqtt": [f"mqtts://127.0.0.1:{port}"],
            "management": [f"http://127.0.0.1:{port}"],
            "password": "engine-password-1",
            "auth": {"port": 0},
        }
        config = write_config(tmp_path, mqtt={"mode": "external", "external": external})
        result = thingbridge("serve", "--config", str(config))
    one_line(result, 2, "mqtt.external.management:", f"127.0.0.1:{port}", "check the URLs")
    assert closed_cleanly(tmp_path)


def test_data_dir_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file where the data folder's parent should be")
    config = write_config(tmp_path, data_dir="taken/data")
    one_line(thingbridge("serve", "--config", str(config)), 2, "data_dir:", "is not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broker.yaml", "taken"]  # no CA either


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_data_dir_not_writable(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir(mode=0o500)
    config = write_config(tmp_path)
    one_line(thingbridge("serve", "--config", str(config)), 2, "data_dir:", "not writable")


def test_short_admin_password(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = thingbridge("serve", "--config", str(config), THINGBRIDGE_ADMIN_PASSWORD="short")
    one_line(result, 2, "THINGBRIDGE_ADMIN_PASSWORD", "at least 8 characters")
    assert closed_cleanly(tmp_path)


# ---- item 6: every setting has a range -----------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"accounts": {"token_ttl": -5}}, "accounts.token_ttl: must be at least 1 (got -5)"),
        ({"accounts": {"free_plan_things": -1}}, "accounts.free_plan_things: must be at least 0 (got -1)"),
        ({"messages": {"page_limit": 0}}, "messages.page_limit: must be at least 1 (got 0)"),
        (
            {"messages": {"retention_days": -1}},
            "messages.retention_days: must be between 0 and 36500 (got -1)",
        ),
        ({"http": {"max_body": -1}}, "http.max_body: must be at least 1 (got -1)"),
        (
            {"mqtt": {"tls": {"port": 65536}}},
            "mqtt.tls.port: must be between 0 and 65535 (got 65536)",
        ),
        ({"pki": {"thing_cert_days": 0}}, "pki.thing_cert_days: must be between 1 and 36500 (got 0)"),
        ({"messages": {"max_payload": "big"}}, "messages.max_payload: expected an integer (got 'big')"),
    ],
)
def test_nonsensical_setting_refused_at_load(tmp_path: Path, overrides: dict, message: str) -> None:
    config = write_config(tmp_path, **overrides)
    one_line(thingbridge("serve", "--config", str(config)), 2, f"{config}: {message}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broker.yaml"]  # nothing created


def test_port_option_out_of_range(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = thingbridge("serve", "--config", str(config), "--https-port", "70000")
    one_line(result, 2, "--https-port: must be between 0 and 65535 (got 70000)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broker.yaml"]


# ---- item 5: the configuration is found the way users expect ------------------------------------
def test_command_without_configuration_creates_nothing(tmp_path: Path) -> None:
    result = thingbridge("user", "add", "bob", "--password", "bob-password", cwd=tmp_path)
    one_line(result, 2, "no configuration found", "--config, $THINGBRIDGE_CONFIG, ./broker.yaml")
    assert list(tmp_path.iterdir()) == []  # no data/, no CA


async def test_lookup_order_reaches_the_running_server(bridge: Bridge, tmp_path: Path) -> None:
    # Another folder, with a broker.yaml of its own that no server ever started.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    decoy = write_config(elsewhere)
    real = str(bridge.config)

    result = thingbridge("status", "--owner", "admin", cwd=elsewhere)
    one_line(result, 2, f"no installation at {elsewhere / 'data'}", "start `thingbridge serve` first")

    missing = str(tmp_path / "missing.yaml")
    result = thingbridge("status", "--owner", "admin", cwd=bridge.folder, THINGBRIDGE_CONFIG=missing)
    one_line(result, 2, f"$THINGBRIDGE_CONFIG {missing}: no such file")  # no fall-through to ./

    users = [unique("viaenv"), unique("viaoption"), unique("viacwd")]
    runs = [
        # $THINGBRIDGE_CONFIG before ./broker.yaml
        thingbridge(
            "user", "add", users[0], "--password", "password-1", cwd=elsewhere, THINGBRIDGE_CONFIG=real
        ),
        # --config (here before the subcommand) before $THINGBRIDGE_CONFIG
        thingbridge(
            "--config",
            real,
            "user",
            "add",
            users[1],
            "--password",
            "password-1",
            THINGBRIDGE_CONFIG=str(decoy),
        ),
        # ./broker.yaml
        thingbridge("user", "add", users[2], "--password", "password-1", cwd=bridge.folder),
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in elsewhere.iterdir()) == ["broker.yaml"]
    for user in users:  # the running server sees what the commands wrote
        assert await token(bridge, user, "password-1")


def test_serve_without_configuration_says_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("THINGBRIDGE_CONFIG", raising=False)
    fresh = Bridge(tmp_path, tmp_path / "broker.yaml")  # that file does not exist: built-in defaults
    ports = ["--mqtt-port", "0", "--mqtt-plain-port", "0", "--http-port", "0", "--https-port", "0"]
    fresh.start(args=["--host", "127.0.0.1", *ports])
    try:
        (said,) = [line for line in fresh.output if line.startswith("New installation")]
        assert "built-in defaults" in said
        assert f"database and secret key in {tmp_path / 'data'}, CA in {tmp_path / 'certs'}" in said
        status = thingbridge("status", "--owner", "admin", cwd=tmp_path)  # finds it by the defaults
        assert status.returncode == 0, status.stderr
        assert fresh.stop() == 0
    finally:
        fresh.kill()


# ---- item 7: thing create --out ------------------------------------------------------------------
def test_thing_create_out_checks_the_destination_first(bridge: Bridge, tmp_path: Path) -> None:
    owner, _ = new_user(bridge)

    def things() -> list[str]:
        rows = bridge.cli("status", "--owner", owner).stdout.splitlines()[1:]
        return [row.split()[0] for row in rows]

    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    result = bridge.cli("thing", "create", "x", "--owner", owner, "--out", str(a_file), check=False)
    one_line(result, 1, f"--out {a_file}: exists and is not a folder")
    assert a_file.read_text() == "mine"

    bundle = tmp_path / "first"
    bridge.cli("thing", "create", "first", "--owner", owner, "--out", str(bundle), "--id", "first-" + owner)
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    result = bridge.cli("thing", "create", "second", "--owner", owner, "--out", str(bundle), check=False)
    one_line(result, 1, f"--out {bundle}: the folder is not empty")
    assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before

    empty = tmp_path / "empty"
    empty.mkdir()
    bridge.cli("thing", "create", "third", "--owner", owner, "--out", str(empty), "--id", "third-" + owner)
    assert orjson.loads((empty / "thing.json").read_bytes())["thingId"] == "third-" + owner
    assert mode(empty / "private.key") == 0o600
    # no orphan was created by the refused attempts
    assert sorted(things()) == sorted(["first-" + owner, "third-" + owner])


# ---- item 9: the database is private -------------------------------------------------------------
def test_database_files_are_owner_only(bridge: Bridge) -> None:
    files = [bridge.db_path.with_name(bridge.db_path.name + suffix) for suffix in ("", "-wal", "-shm")]
    assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}  # the server has all open
    bridge.db_path.chmod(0o644)  # as an older version left it
    assert bridge.cli("status", "--owner", "admin").returncode == 0
    assert mode(bridge.db_path) == 0o600


# ---- issue #14: the event loop ---------------------------------------------------------------------
async def test_event_loop_setting_is_honoured(bridge: Bridge, tmp_path: Path) -> None:
    """uvloop by default where it is installed; `uvloop: false` runs asyncio's own loop, and a thing
    still connects over TLS (the listeners' own TLS set-up) and has its QoS 1 message acknowledged."""
    assert bridge.ports["loop"] == ("uvloop" if importlib.util.find_spec("uvloop") else "asyncio")
    plain = Bridge(tmp_path, write_config(tmp_path, uvloop=False))
    plain.start()
    try:
        assert plain.ports["loop"] == "asyncio"
        name, password = new_user(plain)
        thing = await create_thing(plain, await token(plain, name, password), tmp_path)
        async with thing_client(plain, thing) as client:
            await client.publish(f"things/{thing.id}/collect", b'{"t": 1}', qos=1)
        assert plain.stop() == 0
    finally:
        plain.kill()
