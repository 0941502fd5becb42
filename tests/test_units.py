"""Pure functions, in-process: the rules the end-to-end tests exercise through the real process,
each checked here case by case (milliseconds, no server)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from amqtt.broker import RetainedApplicationMessage
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import Session

from bridge import config
from bridge.core import topics
from bridge.core.errors import Invalid, Unauthorized
from bridge.core.identity import DeviceIdentity, KnownDevices
from bridge.core.messages import classify
from bridge.core.status import DEFAULT, Effective, decide
from bridge.core.things import check_audience
from bridge.mqtt import codec
from bridge.mqtt.external.auth import Logins, subject_fields
from bridge.mqtt.handler import Limits
from bridge.mqtt.lean import OfflineQueue, Subscriptions


# ---- the SetStatus decision ------------------------------------------------------------------------
def test_decide_reboot_new_sync() -> None:
    newer = Effective(24, {}, {}, "http://pkg", 3)
    assert decide(newer, running_version=2, fetched_config=None) == "reboot"
    assert decide(newer, running_version=None, fetched_config=None) == "reboot"
    same_version = Effective(24, {"a": 1}, {}, "", 0)
    assert decide(same_version, running_version=0, fetched_config=None) == "new"  # never fetched
    assert decide(same_version, running_version=0, fetched_config=same_version.config_hash()) == "sync"
    assert decide(DEFAULT, running_version=None, fetched_config=None) == "sync"
    # reboot wins over new: the package comes first
    assert decide(Effective(1, {"b": 2}, {}, "", 5), running_version=4, fetched_config=None) == "reboot"


# ---- payload classification ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("payload", "declared", "encoding"),
    [
        (b'{"a": 1}', None, "json"),
        (b"42", None, "json"),
        (b"FOO|BAR|This is a message.", None, "text"),  # free form under application/json
        (b'{"half": ', None, "text"),
        (b"\xff\x00\x01", None, "base64"),
        (b"42", "text", "text"),  # declared text stays text
    ],
)
def test_classify(payload: bytes, declared: str | None, encoding: str) -> None:
    assert classify(payload, declared) == encoding


def test_classify_refuses_declared_text_that_is_not_utf8() -> None:
    with pytest.raises(Invalid, match="not valid UTF-8"):
        classify(b"\xff", "text")


# ---- topic rules ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "allowed"),
    [
        ("things/t1/collect", True),
        ("things/t1/status", True),
        ("things/t1/config/get", True),
        ("things/t1/telemetry/x", True),
        ("things/t2/collect", False),  # another thing's topic
        ("things/t1/publish", False),
        ("things/t1/publish/x", False),  # the whole cloud-to-device subtree
        ("things/t1/config", False),
        ("things/t1/config/x", False),
        ("things/t1/presence", False),
        ("things/t1/presence/online", False),
        ("things/t1/upgrade/notify", False),
        ("things/t1/upgrade/notify/x", False),
        ("things/t1/status/accepted", False),
        ("things/t1/status/rejected/x", False),
        ("things/t1/", False),
        ("other/t1/collect", False),
    ],
)
def test_thing_may_publish(name: str, allowed: bool) -> None:
    assert topics.thing_may_publish("t1", name) is allowed


def test_subscribe_rules_and_targets() -> None:
    assert topics.thing_may_subscribe("t1", "things/t1/#")
    assert not topics.thing_may_subscribe("t1", "things/+/publish")
    assert not topics.thing_may_subscribe("t1", "things/t1/")
    assert topics.app_may_subscribe("things/#") and topics.app_may_subscribe("things/+/collect")
    assert not topics.app_may_subscribe("#") and not topics.app_may_subscribe("things/")
    assert topics.publish_target("things/t1/publish") == "t1"
    assert topics.publish_target("things/t1/publish/x") is None
    assert topics.publish_target("things/t1/collect") is None
    assert topics.flow_of("t1", "things/t1/config/get") == topics.CONFIG_GET
    assert topics.flow_of("t1", "things/t10/collect") is None
    assert topics.thing_of("things/t1/collect") == "t1" and topics.thing_of("things/t1") is None


# ---- thing token audiences -------------------------------------------------------------------------------
PUBLIC = ["http://bridge.example:8080", "http://bridge.example:8080/dev/v1"]


@pytest.mark.parametrize(
    "aud",
    [None, "urn:flashlex:t1", "urn:a:b:c:t1", "http://bridge.example:8080/", ["urn:x:t1", PUBLIC[1]]],
)
def test_audiences_accepted(aud: object) -> None:
    check_audience(aud, "t1", PUBLIC)


@pytest.mark.parametrize(
    ("aud", "reason"),
    [
        ("urn:flashlex:t2", "another thing"),
        (["urn:flashlex:t1", "urn:flashlex:t2"], "another thing"),
        ("https://elsewhere.example", "not accepted"),
        ("urn:only", "not accepted"),
        (7, "string"),
        ([], "string"),
        ([None], "string"),
    ],
)
def test_audiences_refused(aud: object, reason: str) -> None:
    with pytest.raises(Unauthorized, match=reason):
        check_audience(aud, "t1", PUBLIC)


# ---- settings and their ranges ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"accounts": {"token_ttl": -5}}, "accounts.token_ttl: must be at least 1"),
        ({"mqtt": {"tls": {"port": 70000}}}, "mqtt.tls.port"),
        ({"mqtt": {"max_queued_messages": 0}}, "mqtt.max_queued_messages"),
        ({"messages": {"page_limit": 0}}, "messages.page_limit"),
        ({"http": {"token_audiences": "x"}}, "http.token_audiences"),
        ({"nonsense": 1}, "nonsense"),
        ({"store": {"url": "mysql://db/x"}}, "store.url: expected sqlite: or postgresql://"),
        ({"store": {"url": "postgresql://db:port/x"}}, "store.url: the PostgreSQL URL's port"),
        ({"mqtt": {"mode": "cluster"}}, "mqtt.mode: expected embedded or external"),
        ({"mqtt": {"external": {"amqp": []}}}, "mqtt.external.amqp: expected a non-empty list"),
        (
            {"mqtt": {"external": {"amqp": ["amqp://u:pw@h:5672/"]}}},
            "mqtt.external.amqp: put the credentials",
        ),
        ({"mqtt": {"external": {"mqtt": ["tcp://h:1883"]}}}, "mqtt.external.mqtt: expected mqtt://host:port"),
        ({"mqtt": {"external": {"management": ["http://h:x"]}}}, "mqtt.external.management: 'http'"),
        ({"mqtt": {"external": {"auth": {"port": -1}}}}, "mqtt.external.auth.port"),
        ({"mqtt": {"external": {"prefetch": 0}}}, "mqtt.external.prefetch"),
    ],
)
def test_settings_out_of_range_name_their_path(raw: dict, message: str) -> None:
    with pytest.raises(config.ConfigError, match=message.replace(".", r"\.")) as refused:
        config._build(config.Config, raw, "")
    assert "pw" not in str(refused.value)  # a password in a URL is never echoed


def test_external_mode_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "broker.yaml"
    file.write_text("mqtt: {mode: External, external: {amqp: [amqps://a:5671/, amqp://b], prefetch: 10}}")
    monkeypatch.setenv(config.ENGINE_PASSWORD_ENV, "from-env")
    cfg = config.load(file)
    assert cfg.mqtt.mode == "external" and cfg.mqtt.external.password == "from-env"
    assert cfg.mqtt.external.amqp == ["amqps://a:5671/", "amqp://b"] and cfg.mqtt.external.prefetch == 10
    file.write_text("mqtt: {external: {password: in-file}}")
    assert config.load(file).mqtt.external.password == "in-file"  # the file wins over the variable
    assert config.load(None).mqtt.mode == "embedded"


# ---- the offline queue's bounds ----------------------------------------------------------------------------
def test_a_full_offline_queue_drops_its_oldest() -> None:
    session = Session()
    session.client_id = "app:x"
    session.retained_messages = OfflineQueue()
    limits = Limits(max_queued_messages=3, max_queued_bytes=10)
    for n in range(5):
        limits.enqueue(session, RetainedApplicationMessage(None, "things/t/publish", bytes([n]) * 2, 1))
    queue: OfflineQueue = session.retained_messages
    assert [queue.get_nowait().data for _ in range(queue.qsize())] == [b"\x02\x02", b"\x03\x03", b"\x04\x04"]
    assert limits.dropped_queued == 2 and queue.bytes == 0
    for n in range(3):  # the byte bound: 3 x 4 bytes > 10
        limits.enqueue(session, RetainedApplicationMessage(None, "things/t/publish", bytes([n]) * 4, 1))
    assert queue.qsize() == 2 and queue.bytes == 8 and limits.dropped_queued == 3


# ---- the architecture ----------------------------------------------------------------------------------
def _imports_of(path: Path, package: str, modules: frozenset[str] = frozenset()) -> set[str]:
    """What a module imports under `package` (at any level, TYPE_CHECKING blocks included);
    `from pkg import sub` counts as importing the module pkg.sub when it is one of `modules`."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{alias.name}" for alias in node.names} & modules
            names = subs if subs and len(subs) == len(node.names) else {node.module, *subs}
        elif isinstance(node, ast.Import):
            names = {alias.name for alias in node.names}
        else:
            continue
        found.update(n for n in names if n == package or n.startswith(package + "."))
    return found


def test_no_import_cycle_and_no_upward_import() -> None:
    """The layering of the README's design notes: core imports no adapter (and no aiohttp or
    amqtt), and no module imports, however indirectly, a module that imports it."""
    root = Path(__file__).resolve().parent.parent
    modules = {
        ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (root / "bridge").rglob("*.py")
    }
    known = frozenset(modules)
    graph = {name: _imports_of(path, "bridge", known) & known - {name} for name, path in modules.items()}
    for name, path in modules.items():
        if name.startswith("bridge.core"):
            assert not _imports_of(path, "aiohttp") | _imports_of(path, "amqtt"), name
            assert not any(
                m.startswith(("bridge.http", "bridge.mqtt", "bridge.app", "bridge.cli")) for m in graph[name]
            ), name

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return [*trail, start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*trail, nxt]))
        return None

    cycles = [c for c in map(cycle_from, sorted(graph)) if c]
    assert cycles == [], cycles[:3]


# ---- external mode: the engine's usernames ------------------------------------------------------------
@pytest.mark.parametrize(
    ("dn", "fields"),
    [
        ("SERIALNUMBER=6ad8,CN=t1", {"SERIALNUMBER": "6ad8", "CN": "t1"}),
        ("CN=t1", {"CN": "t1"}),
        (r"CN=a\,b", {"CN": "a,b"}),  # RFC 4514 escape
        ("2.5.4.5=#13023661,CN=t1", {"SERIALNUMBER": "6a", "CN": "t1"}),
        ("2.5.4.3=#13027431", {"CN": "t1"}),  # an OID with the value's DER in hex
        ("CN=t1,CN=t2", None),  # repeated
        ("no-equals", None),
        ("=x", None),
    ],
)
def test_engine_subjects_parse(dn: str, fields: dict[str, str] | None) -> None:
    assert subject_fields(dn) == fields


def test_engine_logins_are_bounded() -> None:
    logins = Logins(max_things=2, per_thing=2)
    for n in range(3):
        logins.add("a", f"CN=a{n}")
    assert logins.of("a") == ["CN=a1", "CN=a2"]  # the newest subjects of one thing
    logins.add("b", "CN=b")
    logins.add("a", "CN=a2")  # seen again: a is the newest thing
    logins.add("c", "CN=c")
    assert (logins.of("a"), logins.of("b"), logins.of("c")) == (["CN=a1", "CN=a2"], [], ["CN=c"])


def test_known_devices_are_bounded() -> None:
    known = KnownDevices(limit=2)
    a, b, c = (DeviceIdentity(name, "owner", f"cert-{name}") for name in "abc")
    for device in (a, b, c):
        known.put(device)
    assert (known.get("a"), known.get("b"), known.get("c")) == (None, b, c)  # the oldest went
    known.drop("b")
    assert known.get("b") is None


# ---- the MQTT hot path's codec and match cache -------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 100, 16_384, 2_100_000])  # remaining length of 1 to 4 bytes
@pytest.mark.parametrize(("qos", "packet_id", "dup"), [(0, None, False), (1, 7, False), (1, 65535, True)])
def test_codec_publish_is_amqtts(size: int, qos: int, packet_id: int | None, dup: bool) -> None:
    """What the direct delivery writes is byte for byte amqtt's PUBLISH, and reads back as sent."""
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    ours = codec.publish(codec.topic_field("things/t\u00e9/collect"), payload, qos, packet_id, dup)
    stock = PublishPacket.build("things/t\u00e9/collect", payload, packet_id, dup, qos, False)
    assert ours == stock.to_bytes()
    kind, packet = codec.take(bytearray(ours), 4 * 1024 * 1024)
    assert (kind, packet.topic_name, packet.packet_id, packet.data, packet.qos) == (
        codec.PUBLISH,
        "things/t\u00e9/collect",
        packet_id,
        payload,
        qos,
    )
    assert packet.packet().to_bytes() == stock.to_bytes()


def test_subscriptions_know_the_filters_that_match_until_they_change() -> None:
    tried: list[str] = []

    def matches(topic: str, topic_filter: str) -> bool:
        tried.append(topic_filter)
        return topic_filter in (topic, "#")

    table = Subscriptions(matches)
    table["a"] = []
    assert table.matching("a") == ("a",)
    assert table.matching("a") == ("a",) and tried == ["a"]  # remembered, not matched again
    table.setdefault("#", [])  # a filter added: matched again
    assert table.matching("a") == ("a", "#")
    del table["a"]
    assert table.matching("a") == ("#",)
    for n in range(Subscriptions.MAX_TOPICS + 10):
        table.matching(str(n))
    assert len(table._matched) <= Subscriptions.MAX_TOPICS


def test_a_postgresql_read_in_a_thread_that_never_connected_says_unavailable(tmp_path: Path) -> None:
    """A reader thread's first connection, tried while the server is away, is the store's
    Unavailable (503, one log line), not an AttributeError of the retry path (a traceback the outage
    test once caught). A real connection attempt, to a port nothing listens on."""
    import socket

    from bridge.store.errors import Unavailable
    from bridge.store.postgres import PostgresStore

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: connections to it are refused
    store = PostgresStore(f"postgresql://nobody@127.0.0.1:{port}/nothing", tmp_path / "unused")
    with pytest.raises(Unavailable):
        store._read(lambda conn: conn.execute("SELECT 1"), ())
