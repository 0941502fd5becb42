"""A RabbitMQ cluster of its own for the external-mode tests and benches: `RabbitCluster(nodes=2)`
starts that many nodes, clustered, on free loopback ports in a temporary folder, each with the
plugins rabbitmq_mqtt, rabbitmq_auth_backend_http, rabbitmq_management and rabbitmq_event_exchange:

* MQTT over TLS with a server certificate issued by the bridge's CA; a client certificate, when
  presented, must chain to that CA and logs in by its subject (`ssl_cert_login`, the full subject
  DN: the bridge checks it is the thing's current certificate); without one, MQTT needs a username
  and password (an application); a plain MQTT listener on loopback for applications too;
* the HTTP auth backend alone (`auth_backends.1 = http`), pointed at the bridge's auth listener:
  the bridge decides for devices, applications and its own service user alike;
* the management API on loopback (the bridge closes a revoked thing's connections with it);
* connection events on amq.rabbitmq.event (the things' presence).

Nothing system-wide is used: its own epmd on a free port, its own Erlang cookie (HOME), its own
config, data and logs in the folder. As root the nodes run as `nobody`. `stop()` ends only the
processes it started, by PID."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt

from bridge.pki import CertificateAuthority

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
PLUGINS = ("rabbitmq_mqtt", "rabbitmq_auth_backend_http", "rabbitmq_management", "rabbitmq_event_exchange")
# The management statistics every second (RabbitMQ: 5 s): a new connection still takes up to 6 s to
# show in the list of connections (measured: about 0.3 s on the first node, 4.5 s on the second).
STATISTICS_INTERVAL = 1
LIST_LAG = 6  # mqtt.external.list_lag


def rabbitmq_missing() -> str | None:
    """Why the engine tests cannot run here (None: they can)."""
    if not SERVER.exists() or shutil.which("epmd") is None:
        return "RabbitMQ is not installed: apt-get install rabbitmq-server"
    return None


_GIVEN: set[int] = set()  # never the same port twice: a cluster's ports are chosen before any binds


def free_port() -> int:
    """A port for a RabbitMQ listener, which binds it only later: below the kernel's ephemeral range
    (32768 and up), where the suite's thousands of client connections take their local ports, one
    of which once took a node's management port first (eaddrinuse at its start)."""
    while True:
        port = random.randrange(20000, 32000)
        if port in _GIVEN:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port


@dataclass
class Node:
    name: str  # the Erlang node name, name@localhost
    folder: Path
    amqp: int
    mqtts: int
    mqtt: int  # plain MQTT, applications only
    management: int
    dist: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def amqp_url(self) -> str:
        return f"amqp://127.0.0.1:{self.amqp}/"

    @property
    def mqtts_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.mqtts}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management}"

    def thing_client(self, thing: Any, client_id: str | None = None, **kw: Any) -> aiomqtt.Client:
        """A thing's MQTT/TLS client on this node, its certificate its identity (`thing`: a
        tests.helpers.ThingFiles); `client_id` defaults to the thing's id."""
        tls = ssl.create_default_context(cafile=str(thing.ca))
        tls.load_cert_chain(str(thing.cert), str(thing.key))
        return aiomqtt.Client(
            "127.0.0.1",
            self.mqtts,
            identifier=client_id or thing.id,
            tls_context=tls,
            **{"timeout": 10, **kw},
        )


class RabbitCluster:
    """`nodes` RabbitMQ nodes clustered on loopback. `ca_dir`: the bridge's pki.dir (the CA is
    created there when missing, as the bridge would); `auth_port`: where the bridge's auth listener
    (mqtt.external.auth) will listen."""

    def __init__(self, ca_dir: Path, auth_port: int, nodes: int = 2) -> None:
        self.ca_dir = ca_dir
        self.auth_port = auth_port
        self.folder = Path(tempfile.mkdtemp(prefix="thingbridge-rabbit-"))
        self.epmd_port = free_port()
        self.epmd: subprocess.Popen[bytes] | None = None
        tag = f"tb{os.getpid()}x{self.epmd_port}"
        self.nodes = [
            Node(
                f"{tag}n{i}@localhost",
                self.folder / f"n{i}",
                free_port(),
                free_port(),
                free_port(),
                free_port(),
                free_port(),
            )
            for i in range(1, nodes + 1)
        ]
        self._as = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []

    # ---- what the bridge's broker.yaml needs ------------------------------------------------------
    def external_config(self, username: str = "thingbridge", password: str = "engine-password-1") -> dict:
        """The `mqtt.external` section of a bridge that uses this cluster."""
        return {
            "amqp": [n.amqp_url for n in self.nodes],
            "mqtt": [n.mqtts_url for n in self.nodes],
            "management": [n.management_url for n in self.nodes],
            "username": username,
            "password": password,
            "auth": {"host": "127.0.0.1", "port": self.auth_port},
            "list_lag": LIST_LAG,
        }

    def conf(self, node: Node) -> str:
        auth = f"http://127.0.0.1:{self.auth_port}/auth"
        first = self.nodes[0]
        # The others join the first node (it forms the cluster), waiting for it if need be. After
        # that, a restarted node rejoins its cluster by itself.
        peers = (
            ""
            if node is first
            else f"""cluster_formation.peer_discovery_backend = classic_config
cluster_formation.classic_config.nodes.1 = {first.name}
cluster_formation.discovery_retry_limit = 600
cluster_formation.discovery_retry_interval = 100
"""
        )
        return f"""\
listeners.tcp.default = 127.0.0.1:{node.amqp}
loopback_users = none
mqtt.listeners.tcp.default = 127.0.0.1:{node.mqtt}
mqtt.listeners.ssl.default = 127.0.0.1:{node.mqtts}
mqtt.allow_anonymous = false
mqtt.vhost = /
mqtt.exchange = amq.topic
mqtt.ssl_cert_login = true
ssl_cert_login_from = distinguished_name
ssl_options.cacertfile = {self.folder / "ca.pem"}
ssl_options.certfile = {self.folder / "server.pem"}
ssl_options.keyfile = {self.folder / "server.key"}
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
auth_backends.1 = http
auth_http.http_method = post
auth_http.user_path = {auth}/user
auth_http.vhost_path = {auth}/vhost
auth_http.resource_path = {auth}/resource
auth_http.topic_path = {auth}/topic
management.tcp.ip = 127.0.0.1
management.tcp.port = {node.management}
collect_statistics_interval = {STATISTICS_INTERVAL * 1000}
{peers}disk_free_limit.absolute = 50MB
log.console = false
log.file.level = info
"""

    def env(self, node: Node) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.folder),  # the Erlang cookie
            "LANG": "C.UTF-8",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_NODENAME": node.name,
            "RABBITMQ_DIST_PORT": str(node.dist),
            # distribution on loopback too (the default is every interface)
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_CONF_ENV_FILE": str(self.folder / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(node.folder / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(node.folder / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.folder / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(node.folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(node.folder / "log"),
            "RABBITMQ_PID_FILE": str(node.folder / "pid"),
        }

    def _command(self, node: Node, *argv: str) -> list[str]:
        """`argv` in the node's environment, as `nobody` when we are root (runuser would reset
        HOME, where the cookie is)."""
        return [*self._as, "env", "-i", *(f"{k}={v}" for k, v in self.env(node).items()), *argv]

    def bridge_certs(self, folder: Path) -> Path:
        """A bridge's pki.dir holding this cluster's CA (a copy: the bridge issues the certificates
        the engine verifies). The bridge makes its own server certificate there."""
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("ca.pem", "ca.key"):
            shutil.copy(self.ca_dir / name, folder / name)
        (folder / "ca.key").chmod(0o600)
        return folder

    def bridge(
        self, folder: Path, external: dict | None = None, store_url: str = "sqlite:", **overrides: Any
    ) -> Any:
        """A bridge (tests.conftest.Bridge, not started) in external mode on this cluster, with its
        CA: `external` its mqtt.external section (default external_config()), `store_url` its
        store, `overrides` more of its broker.yaml."""
        from tests.conftest import Bridge, write_config  # not for the watchdog, which runs this module

        self.bridge_certs(folder / "certs")
        if store_url != "sqlite:":
            overrides["store"] = {"url": store_url}
        mqtt = {"mode": "external", "external": external or self.external_config()}
        return Bridge(folder, write_config(folder, mqtt=mqtt, **overrides), store_url=store_url)

    def worker(self, first: Any, folder: Path, external: dict) -> Any:
        """Another bridge process (not started) on `first`'s store, CA and queue, its mqtt.external
        section `external`: only one process answers the engine's auth backend (the cluster asks
        one port), so this one opens no auth listener."""
        from tests.conftest import Bridge, write_config

        config = write_config(
            folder,
            data_dir=str(first.folder / "data"),
            pki={"dir": str(first.folder / "certs")},
            mqtt={"mode": "external", "external": {**external, "auth": {"enabled": False}}},
        )
        return Bridge(folder, config)

    # ---- life cycle --------------------------------------------------------------------------------
    def start(self, timeout: float = 90) -> None:
        """Boot the cluster; a start that fails ends what it had started (and says why)."""
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        ca = CertificateAuthority.load_or_create(self.ca_dir)
        ca.ensure_server_cert([])
        shutil.copy(ca.ca_path, self.folder / "ca.pem")
        shutil.copy(ca.server_cert_path, self.folder / "server.pem")
        shutil.copy(ca.server_key_path, self.folder / "server.key")
        (self.folder / "rabbitmq-env.conf").write_text("")
        (self.folder / "enabled_plugins").write_text(f"[{','.join(PLUGINS)}].\n")
        cookie = self.folder / ".erlang.cookie"
        cookie.write_text(f"THINGBRIDGE{self.epmd_port}TESTCOOKIE")
        cookie.chmod(0o400)
        for node in self.nodes:
            node.folder.mkdir()
            (node.folder / "rabbitmq.conf").write_text(self.conf(node))
        if self._as:
            for path in [self.folder, *self.folder.rglob("*")]:
                shutil.chown(path, "nobody", "nogroup")
            self.folder.chmod(0o755)
        # Ends the cluster if this process goes away without stop() (a killed worker or bench).
        subprocess.Popen(
            [sys.executable, "-m", "tests.engine", str(os.getpid()), str(self.folder), str(self.epmd_port)],
            cwd=Path(__file__).resolve().parent.parent,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.epmd = subprocess.Popen(
            [*self._as, "epmd", "-address", "127.0.0.1", "-port", str(self.epmd_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        # One after the other: a node booting while the first one still starts failed to join it
        # now and then (schema_integrity_check_failed, or the cluster not formed in 90 s).
        for node in self.nodes:
            self.start_node(node, timeout)
            self.ctl(node, "await_startup", timeout=timeout)
        self.wait_clustered(timeout)

    def start_node(self, node: Node, timeout: float = 90) -> None:
        """Start one node (again, after stop_node or kill_node) and wait until it serves."""
        self._spawn(node)
        self.wait_up(node, timeout)

    def _spawn(self, node: Node) -> None:
        node.proc = subprocess.Popen(
            self._command(node, str(SERVER)),
            stdout=open(node.folder / "stdout", "wb"),  # noqa: SIM115 - the child holds it
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() signals exactly that group
            cwd=self.folder,
        )

    def wait_up(self, node: Node, timeout: float) -> None:
        """Until the node's management API answers (the last plugin to start)."""
        deadline = time.monotonic() + timeout
        while True:
            if node.proc is not None and node.proc.poll() is not None:
                raise RuntimeError(f"RabbitMQ node {node.name} exited:\n{self.log_tail(node)}")
            try:
                with urllib.request.urlopen(f"{node.management_url}/api/overview", timeout=2):
                    return
            except urllib.error.HTTPError:  # 401: up (the bridge may not be there to say who we are)
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"RabbitMQ node {node.name} did not start:\n{self.log_tail(node)}")
            time.sleep(0.1)

    def ctl(self, node: Node, *args: str, timeout: float = 60) -> str:
        done = subprocess.run(
            self._command(node, str(SERVER.parent / "rabbitmqctl"), "-n", node.name, *args),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.folder,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def wait_clustered(self, timeout: float) -> None:
        """Until every node runs in the first node's cluster (a node joining restarts its rabbit
        application: rabbitmqctl refuses meanwhile)."""
        deadline = time.monotonic() + timeout
        want = {n.name for n in self.nodes}
        while True:
            try:
                out = self.ctl(self.nodes[0], "cluster_status", "--formatter", "json")
                running = set(json.loads(out).get("running_nodes", []))
            except RuntimeError as exc:
                running, why = set(), str(exc)
            else:
                why = f"running {sorted(running)}"
            if running >= want:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster did not form: {why}\n{self.log_tail(self.nodes[-1])}")
            time.sleep(0.2)

    def log_tail(self, node: Node, lines: int = 40) -> str:
        logs = [*sorted((node.folder / "log").glob("*.log")), node.folder / "stdout"]
        text = "".join(p.read_text(errors="replace") for p in logs if p.exists())
        return "\n".join(text.splitlines()[-lines:])

    def stop_node(self, node: Node, timeout: float = 30) -> None:
        """End one node: SIGTERM to the process group it was started in (runuser, the Erlang VM and
        its helpers), then SIGKILL to what is left of that group after `timeout`."""
        if node.proc is None:
            return
        _end_group(node.proc, timeout)
        node.proc = None

    def kill_node(self, node: Node) -> None:
        """kill -9 one node (a crash, for the fault tests)."""
        if node.proc is not None:
            _end_group(node.proc, 0)
            node.proc = None

    def stop(self) -> None:
        """End every process of the cluster at once (kill -9: nothing in the folder outlives it)."""
        try:
            for node in self.nodes:
                self.kill_node(node)
            if self.epmd is not None:
                _end_group(self.epmd, 0)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


def serving(bridge: Any) -> Iterator[Any]:
    """A module fixture's body: `bridge` (tests.conftest.Bridge) started, killed at the end."""
    bridge.start(timeout=60)
    try:
        yield bridge
    finally:
        bridge.kill()


def _end_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the process group `proc` leads (we started it with start_new_session) and wait until
    no live process is left in it; SIGKILL after `timeout` (0: at once)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM if timeout > 0 else signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while proc.poll() is None or _group_alive(proc.pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (zombies, which nobody may reap here, do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def watch(parent: int, folder: str, epmd_port: int) -> None:
    """Once `parent` has exited, kill what is left of its cluster (the nodes by the folder in their
    environment, epmd by its port) and remove the folder: a cluster never outlives its test run."""
    while Path(f"/proc/{parent}").exists():
        time.sleep(1)
    epmd = ["epmd", "-address", "127.0.0.1", "-port", str(epmd_port)]
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = (proc / "environ").read_bytes()
            argv = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        if folder.encode() in environ or argv[-len(epmd) :] == epmd:
            with contextlib.suppress(OSError):
                os.kill(int(proc.name), signal.SIGKILL)
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":  # the watchdog RabbitCluster starts: parent pid, folder, epmd port
    watch(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
