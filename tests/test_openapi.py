"""The OpenAPI document (generated from the operations' declarations, bridge/http/common/openapi.py)
against the application: every routed operation is documented and nothing else is, wherever the
dialects are mounted; the document is valid OpenAPI; /docs shows every operation; a bounded,
deterministic schemathesis run against the real `thingbridge serve` process checks every operation
for server errors and for responses the document does not describe; and the fields the live API
answers and accepts are the fields the document names."""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import jwt
import orjson
import pytest
import requests
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from bridge import __version__
from bridge.config import Config, ConfigError, HttpConfig, PkiConfig, load
from bridge.core.service import Core
from bridge.core.status import DESIRED_FIELDS
from bridge.http import registry
from bridge.http.app import make_app, openapi_document
from bridge.http.common.models import NAME_PATTERN
from bridge.http.things_gateway import models as gateway_models
from bridge.store import Store
from tests.conftest import ADMIN_PASSWORD, Bridge, basic
from tests.helpers import unique

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
DOCUMENT = openapi_document(HttpConfig().mounts)  # what a bridge with the default mounts serves
Operation = tuple[str, str]  # (METHOD, path) with aiohttp's {param} syntax, which is OpenAPI's too


# ---- (a) the router and the document list the same operations ------------------------------------------
def routed_operations(app: web.Application) -> set[Operation]:
    """Every (method, path) the application routes, sub-applications included. The HEAD route aiohttp
    adds next to each GET (same handler) is implied by the GET; any other HEAD or a catch-all method
    counts as an operation of its own, so the document would have to list it."""
    found: set[Operation] = set()
    for resource in app.router.resources():
        info = resource.get_info()
        if "app" in info:  # a sub-application mounted under a prefix
            found |= routed_operations(info["app"])
            continue
        handlers = {route.method: route.handler for route in resource}
        for method, handler in handlers.items():
            if method == "HEAD" and handlers.get("GET") is handler:
                continue
            found.add((method, resource.canonical))  # a sub-application's routes carry its prefix
    return found


def documented_operations(doc: dict[str, Any]) -> set[Operation]:
    return {
        (method.upper(), path) for path, item in doc["paths"].items() for method in item if method in METHODS
    }


def route_drift(app: web.Application, doc: dict[str, Any]) -> dict[str, list[str]]:
    routed, documented = routed_operations(app), documented_operations(doc)
    return {
        "routed but not documented": sorted(" ".join(op) for op in routed - documented),
        "documented but not routed": sorted(" ".join(op) for op in documented - routed),
    }


@pytest.fixture(scope="module")
def local_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[web.Application]:
    """The application as `thingbridge serve` builds it, around a core that is never started."""
    folder = tmp_path_factory.mktemp("openapi-app")
    cfg = Config(data_dir=folder / "data", pki=PkiConfig(dir=folder / "certs"))
    store = Store(cfg.db_path)
    try:
        yield make_app(Core(cfg, store))
    finally:
        store.close()


@pytest.fixture(scope="module")
def served(bridge: Bridge) -> dict[str, Any]:
    response = requests.get(f"{bridge.http}/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    return response.json()


def test_served_document_is_the_module_document(served: dict[str, Any]) -> None:
    assert served == orjson.loads(orjson.dumps(DOCUMENT))
    assert served["info"]["title"] == "thingbridge"
    assert served["info"]["version"] == __version__


def test_every_route_is_documented_and_every_documented_operation_routed(
    local_app: web.Application, served: dict[str, Any]
) -> None:
    assert route_drift(local_app, served) == {
        "routed but not documented": [],
        "documented but not routed": [],
    }
    assert len(documented_operations(served)) >= 31


def test_route_check_sees_drift_both_ways(local_app: web.Application) -> None:
    """The comparison itself: a route the document lacks, and a documented path nobody serves."""
    doc = copy.deepcopy(DOCUMENT)
    del doc["paths"]["/dev/v1/things/{thing_id}"]["patch"]
    doc["paths"]["/dev/v1/things/{thing_id}/reboot"] = {"post": {"responses": {}}}
    assert route_drift(local_app, doc) == {
        "routed but not documented": ["PATCH /dev/v1/things/{thing_id}"],
        "documented but not routed": ["POST /dev/v1/things/{thing_id}/reboot"],
    }
    extra = web.Application()
    extra.router.add_route("HEAD", "/probe", _probe)  # a HEAD of its own is an operation
    extra.router.add_route("*", "/any", _probe)
    assert routed_operations(extra) == {("HEAD", "/probe"), ("*", "/any")}


async def _probe(request: web.Request) -> web.Response:
    return web.Response()


# ---- (a2) mounts: a dialect moved in broker.yaml takes its routes, document and error shape along ---------
async def test_mounts_move_dialects_and_their_errors(tmp_path: Path) -> None:
    cfg = Config(data_dir=tmp_path / "data", pki=PkiConfig(dir=tmp_path / "certs"))
    cfg.http.mounts = {"things_gateway": "/gw/v2", "portal": "/portal", "upgrader": ["/up", "/up2"]}
    store = Store(cfg.db_path)
    try:
        app = make_app(Core(cfg, store))
        async with TestClient(TestServer(app)) as client:
            doc = await (await client.get("/openapi.json")).json()
            assert doc == orjson.loads(orjson.dumps(openapi_document(cfg.http.mounts)))
            assert route_drift(app, doc) == {"routed but not documented": [], "documented but not routed": []}
            assert {
                "/gw/v2/things",
                "/portal/GetURL",
                "/up/software",
                "/up2/software",
                "/openapi.json",
            } <= set(doc["paths"])
            assert not [
                path
                for path in doc["paths"]
                if path.startswith(("/dev/v1", "/v2", "/Upgrade")) or path == "/GetURL"
            ]
            for mount in ("/up", "/up2"):  # the upgrader's error body at each of its mounts
                for method, path, status in (("GET", "/software", 401), ("PATCH", "/software", 405)):
                    r = await client.request(method, mount + path)
                    assert (r.status, (await r.json())["errorCode"]) == (status, status), (method, path)
            # each failure in the shape of the dialect whose mount the path is under
            for method, path, status in (
                ("GET", "/gw/v2/things", 401),
                ("GET", "/gw/v2/nope", 404),
                ("PUT", "/gw/v2/things", 405),
            ):
                r = await client.request(method, path)
                assert (r.status, (await r.json())["code"]) == (status, status), (method, path)
            for method, path, status in (
                ("GET", "/portal/GetURL", 400),
                ("PUT", "/portal/GetURL", 405),
                ("GET", "/GetURL", 404),
                ("GET", "/dev/v1/things", 404),
            ):
                r = await client.request(method, path)
                assert r.status == status and set(await r.json()) == {"error"}, (method, path)
    finally:
        store.close()


@pytest.mark.parametrize(
    ("mounts", "error"),
    [
        ({"portal": "portal"}, 'http.mounts.portal: expected "" (the root) or a path like /dev/v1'),
        ({"portal": "/portal/"}, "http.mounts.portal: expected"),
        ({"portal": "/a b"}, "http.mounts.portal: expected"),
        ({"portal": 5}, "http.mounts.portal: expected"),
        (
            {"gadget": "/gk"},
            "http.mounts: unknown dialect(s) gadget; known: things_gateway, portal, upgrader, provisioning, firmware",
        ),
        ({"portal": "/dev/v1"}, "http.mounts: two dialects share a mount"),
        ({"upgrader": []}, "http.mounts.upgrader: expected"),
        ({"upgrader": ["/v2", "v3"]}, "http.mounts.upgrader: expected"),
        ({"upgrader": ["/v2", "/dev/v1"]}, "http.mounts: two dialects share a mount"),
        (["/dev/v1"], "http.mounts: expected a mapping"),
    ],
)
def test_mounts_are_checked_at_load(tmp_path: Path, mounts: Any, error: str) -> None:
    path = tmp_path / "broker.yaml"
    path.write_bytes(orjson.dumps({"http": {"mounts": mounts}}))
    with pytest.raises(ConfigError, match=re.escape(error)):
        load(path)


def test_every_dialect_has_a_mount() -> None:
    assert set(HttpConfig().mounts) == set(registry.DIALECTS)


# ---- (b) the document is valid OpenAPI --------------------------------------------------------------------
def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_document_is_valid_openapi(bridge: Bridge, served: dict[str, Any]) -> None:
    schema = schemathesis.openapi.from_url(f"{bridge.http}/openapi.json")
    schema.validate()  # the OpenAPI 3.1 meta-schema; raises on a malformed document
    # schemathesis leaves out the operation that served the schema itself
    assert {op.ok().label for op in schema.get_all_operations()} == {
        f"{method} {path}" for method, path in documented_operations(served)
    } - {"GET /openapi.json"}
    for path, item in served["paths"].items():
        for method, op in item.items():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == set(re.findall(r"{(\w+)}", path)), (method, path)
    for target in _refs(served):
        node: Any = served
        for part in target.removeprefix("#/").split("/"):
            node = node[part]  # a dangling $ref raises KeyError
    broken = copy.deepcopy(served)
    del broken["paths"]["/dev/v1/things"]["get"]["responses"]["200"]["description"]
    with pytest.raises(Exception, match='"description" is a required property'):
        schemathesis.openapi.from_dict(broken).validate()


# ---- (c) the docs page ------------------------------------------------------------------------------------
def test_docs_page_shows_every_operation(bridge: Bridge, served: dict[str, Any]) -> None:
    response = requests.get(f"{bridge.http}/docs", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    page = response.text
    assert "<script" not in page.lower() and "src=" not in page.lower()  # self-contained
    for method, path in documented_operations(served):
        op = served["paths"][path][method.lower()]
        assert f'id="{op["operationId"]}"' in page
        assert f"{method} {path}</code>" in page, (method, path)
        for parameter in op.get("parameters", []):
            assert f"<code>{parameter['name']}</code>" in page
    for field in ("flthingspk", "keyType", "UpdateRate", "regId", "accessToken", "encoding"):
        assert f"<code>{field}</code>" in page


# ---- (d) schemathesis against the live process --------------------------------------------------------------
# Per operation and generation mode (positive: data the document allows; negative: data it does not):
# the explicit cases below (positive only), then schemathesis' coverage cases (deterministic boundary
# and type-violation values for every parameter and body field), then EXAMPLES Hypothesis-generated
# cases, derandomized so every run sends the same requests.
# One budget for the whole run, shared by the operations, so that the suite's time stays bounded as
# dialects add operations: generated examples per (operation, mode) = the mode's total / the number
# of (operation, mode) pairs, between MIN_EXAMPLES and MAX_EXAMPLES; the same for seconds.
EXAMPLES_TOTAL = {GenerationMode.POSITIVE: 900, GenerationMode.NEGATIVE: 400}
MIN_EXAMPLES, MAX_EXAMPLES = 5, 25
SECONDS_TOTAL = 300  # a safety net: the examples above are what bounds the run
REQUEST_TIMEOUT = 15  # seconds; a hung request fails the run instead of stalling it
MAX_WAIT = 0.2  # long-poll `wait` is capped for the run (the document allows up to 60 s)
# A PEM body (POST /provision/certificate) is text to schemathesis.
schemathesis.serializer.alias("application/x-pem-file", "text/plain")
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
# Requests the generators are unlikely to make, as (METHOD, path) -> Case keyword arguments; the run
# fills in real resources (path parameters, regId) as for every other case.
EXPLICIT: dict[Operation, list[dict[str, Any]]] = {
    # A reported version that is not a version is ignored (the document says so): "²" is a digit to
    # str.isdigit() but not to int().
    ("POST", "/GetURL"): [
        {"body": {"regId": "", "DeviceInfo": {"version": "²"}}, "media_type": "application/json"}
    ],
    ("POST", "/SetStatus"): [
        {
            "body": {"regId": "", "status": "Alive", "info": {"appVersion": "¹"}},
            "media_type": "application/json",
        }
    ],
    # endts is bound as endts + 1: 2**63 - 1 overflowed SQLite's INTEGER (500) before integer query
    # parameters were bounded (400 now).
    ("GET", "/dev/v1/things/{thing_id}/messages"): [{"query": {"endts": str(2**63 - 1)}}],
    ("DELETE", "/dev/v1/things/{thing_id}/messages"): [{"query": {"endts": str(2**63 - 1)}}],
}
# Server bugs the run finds, by (mode, METHOD, path): marked xfail(strict) until fixed, so the run
# stays green and turns red the day the bug is gone (remove the entry then). None open.
KNOWN_BUGS: dict[tuple[str, str, str], str] = {}
# A dialect's further mounts (the upgrader's /v2 beside /Upgrade/v2) route the same handlers with the
# same models: fuzzed once, at the first mount, to keep the run's time in bounds.
ALIASED: set[Operation] = {
    (op.method, place.mount + op.path)
    for place in registry.mount(HttpConfig().mounts)
    if place.alias
    for op in place.dialect.operations
}


def _has_inputs(method: str, path: str) -> bool:
    """Negative cases need a parameter or body to violate (the credential is the test's choice)."""
    op = DOCUMENT["paths"][path][method.lower()]
    return bool(op.get("parameters") or op.get("requestBody"))


def _fuzz_params() -> list[Any]:
    params = []
    for path, item in DOCUMENT["paths"].items():
        for method in (m.upper() for m in item if m in METHODS):
            if (method, path) in ALIASED:
                continue
            for mode in EXAMPLES_TOTAL:
                if mode is GenerationMode.NEGATIVE and not _has_inputs(method, path):
                    continue
                reason = KNOWN_BUGS.get((mode.value, method, path))
                marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
                params.append(
                    pytest.param(mode, method, path, marks=marks, id=f"{mode.value}-{method} {path}")
                )
    return params


def _per_pair(total: float, pairs: int, low: float, high: float) -> float:
    return max(low, min(high, total / max(pairs, 1)))


_PAIRS = {mode: sum(1 for p in _fuzz_params() if p.values[0] is mode) for mode in EXAMPLES_TOTAL}
EXAMPLES = {
    mode: int(_per_pair(EXAMPLES_TOTAL[mode], _PAIRS[mode], MIN_EXAMPLES, MAX_EXAMPLES))
    for mode in EXAMPLES_TOTAL
}
OPERATION_BUDGET = _per_pair(SECONDS_TOTAL, sum(_PAIRS.values()), 3, 45)  # seconds per (operation, mode)


@dataclass
class World:
    """Real resources for path parameters, and the credentials to reach them."""

    base: str
    session: requests.Session
    token: str
    user_id: str
    subscription_id: str
    thing: str  # most operations work on this one
    patched: str  # PATCH /things/{id} may suspend it
    doomed: str  # DELETE /things/{id} may delete it
    thing_jwt: str
    message_id: str
    rollouts: dict[str, str]  # upgrader world -> its rollout's id
    vendor: str  # the provisioning vendor owning fuzz-model (with the content fuzz-content)
    vendor_token: str  # its X-Exosite-Token
    device_cik: str  # the CIK fuzz-sn activated with: GET /provision/download
    other_vendor: str  # a vendor fuzz-model is shared with
    fw_thing: str  # the thing of read-product's serial number read-fwsn (firmware device operations)
    fw_key: str  # its API key

    def fresh_token(self) -> str:
        response = self.session.get(
            f"{self.base}/dev/v1/token", headers=basic("admin", ADMIN_PASSWORD), timeout=REQUEST_TIMEOUT
        )
        assert response.status_code == 200, response.text
        return response.json()["accessToken"]

    def path_parameters(self, method: str, path: str, world: str = "fuzz") -> dict[str, str]:
        """`world`: which upgrader resources (upgrader_world) name the upgrader's parameters."""
        thing = {
            ("PATCH", "/dev/v1/things/{thing_id}"): self.patched,
            ("DELETE", "/dev/v1/things/{thing_id}"): self.doomed,
        }.get((method, path), self.thing)
        candidates = {
            "thing_id": thing,
            "sub": self.user_id,
            "subscription_id": self.subscription_id,
            "thing_type": "generic",  # the type of the world's things
            "softwareName": f"{world}-fw",
            "versionNumber": "1.0",
            "rolloutProfileId": f"{world}-profile",
            "accountId": f"{world}-account",
            "deviceId": self.thing,
            "rolloutId": self.rollouts[world],
            "model": "fuzz-model",
            "sn": "fuzz-sn",
            "id": "fuzz-content",
            "vendorname": self.other_vendor,
            "productId": f"{world}-product",
            "version": "1.0",
            "serialNumber": f"{world}-fwsn",
            "thingId": self.fw_thing,
        }
        return {name: value for name, value in candidates.items() if "{" + name + "}" in path}


def _thing_token(thing_id: str, private_pem: str) -> str:
    now = int(time.time())
    return jwt.encode(
        {"iss": f"urn:thing:{thing_id}", "iat": now, "exp": now + 3600},
        private_pem,
        algorithm="ES256",
        headers={"kid": thing_id},
    )


def upgrader_world(prefix: str, devices: list[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """The upgrader's resources of one world, in order; the last is a rollout."""
    profile, software = f"{prefix}-profile", f"{prefix}-fw"
    version = {
        "versionNumber": "1.0",
        "releaseDate": "2024-01-01T00:00:00Z",
        "status": "REQUIRED",
        "downloadUrl": "https://dl.example/1.0",
        "rolloutProfiles": [profile],
        "dependencies": [{"softwareName": software, "versionNumber": "1.0"}],
    }
    rollout = {"softwareName": software, "versionNumber": "1.0", "rolloutProfileId": profile}
    return [
        ("POST", "/rolloutProfile", {"id": profile}),
        (
            "PUT",
            f"/rolloutProfile/{profile}/accounts/{prefix}-account",
            {"devices": [{"id": d, "type": "STB"} for d in devices]},
        ),
        ("POST", "/software", {"name": software, "versions": [version]}),
        ("POST", "/rollouts", {**rollout, "waves": [100], "errorThreshold": 0.5, "waveTimeout": 3600}),
    ]


@pytest.fixture(scope="module")
def world(bridge: Bridge) -> Iterator[World]:
    """The admin's token, three things (EC keys: quick), one message each way, the thing's own JWT."""
    session = requests.Session()
    base = bridge.http
    response = session.get(f"{base}/dev/v1/token", headers=basic("admin", ADMIN_PASSWORD), timeout=10)
    tok = response.json()["accessToken"]
    session.headers["Authorization"] = f"Bearer {tok}"

    def post(path: str, **kwargs: Any) -> Any:
        response = session.post(f"{base}/dev/v1{path}", timeout=30, **kwargs)
        assert response.status_code == 200, response.text
        return response.json()["result"]

    things = [post("/things", json={"keyType": "EC", "thingName": f"fuzz {n}"}) for n in range(3)]
    main = things[0]
    post(f"/things/{main['flthingspk']}/publish", json={"hello": "thing"})
    thing_jwt = _thing_token(main["flthingspk"], main["keyPairPrivate"])
    collected = post(
        f"/things/{main['flthingspk']}/collect",
        data=b"21.5",
        headers={"Authorization": f"Bearer {thing_jwt}", "Content-Type": "text/plain"},
    )
    subscriptions = session.get(f"{base}/dev/v1/subscriptions", timeout=10).json()["result"]
    # "fuzz": the fuzz run's, which it may change or delete; "read": for the answers' fields
    rollouts = {}
    for prefix, devices in (("fuzz", [main["flthingspk"]]), ("read", [])):
        for method, path, body in upgrader_world(prefix, devices):
            response = session.request(method, f"{base}/v2{path}", json=body, timeout=30)
            assert response.status_code in (200, 201), response.text
        rollouts[prefix] = response.json()["id"]
    del session.headers["Authorization"]
    (vendor, vendor_token), other_vendor = _vendor(bridge), unique("vendor")
    bridge.cli("vendor", "add", other_vendor, "--owner", "admin")
    manage = {"X-Exosite-Token": vendor_token}
    for path, form in (
        ("/model/", {"model": "fuzz-model", "rid": "0" * 40}),
        ("/model/fuzz-model/", {"sn[]": ["fuzz-sn", "fuzz-sn-2"]}),
        ("/model/fuzz-model/fuzz-sn", {"enable": "true", "owner": "0" * 40}),
        ("/share/fuzz-model/", {"vendor": other_vendor}),
        ("/content/fuzz-model/", {"id": "fuzz-content", "description": "fuzzed"}),
    ):
        response = session.post(f"{base}/provision/manage{path}", data=form, headers=manage, timeout=10)
        assert response.status_code in (200, 205), response.text
    # a small blob of the documented type, so that downloads answer 200 (uploads the run makes are
    # as small as the generators' binary strings)
    blob = {**manage, "Content-Type": "application/octet-stream"}
    response = session.post(
        f"{base}/provision/manage/content/fuzz-model/fuzz-content", data=b"blob", headers=blob, timeout=10
    )
    assert response.status_code == 205, response.text
    fw_key = _firmware_world(session, base, tok, vendor, manage)
    activation = {"vendor": vendor, "model": "fuzz-model", "sn": "fuzz-sn"}
    response = session.post(f"{base}/provision/activate", data=activation, timeout=10)
    assert response.status_code == 200, response.text
    yield World(
        base=base,
        session=session,
        token=tok,
        user_id=jwt.decode(tok, options={"verify_signature": False})["sub"],
        subscription_id=subscriptions[0]["flsubscriptionspk"],
        thing=main["flthingspk"],
        patched=things[1]["flthingspk"],
        doomed=things[2]["flthingspk"],
        thing_jwt=thing_jwt,
        message_id=collected["flmessagespk"],
        rollouts=rollouts,
        vendor=vendor,
        vendor_token=vendor_token,
        device_cik=response.text,
        other_vendor=other_vendor,
        fw_thing="sn-read-fwmodel-read-fwsn",
        fw_key=fw_key,
    )
    session.close()


def _firmware_world(
    session: requests.Session, base: str, tok: str, vendor: str, manage: dict[str, str]
) -> str:
    """A firmware product per upgrader world ("fuzz", "read": its software, a model <world>-fwmodel of
    the admin's vendor with the serial number <world>-fwsn), firmware for version 1.0; read-fwsn
    activated: its API key (the device operations work on it, whatever the fuzz run does to fuzz-product)."""
    user = {"Authorization": f"Bearer {tok}"}
    for world in ("fuzz", "read"):
        model = f"{world}-fwmodel"
        for path, form in (
            ("/model/", {"model": model, "rid": "0" * 40}),
            (f"/model/{model}/", {"sn": f"{world}-fwsn"}),
        ):
            response = session.post(f"{base}/provision/manage{path}", data=form, headers=manage, timeout=10)
            assert response.status_code == 205, response.text
        product = f"{base}/fw/v1/manage/products/{world}-product"
        body = {"softwareName": f"{world}-fw", "vendor": vendor, "model": model}
        response = session.put(product, json=body, headers=user, timeout=10)
        assert response.status_code == 201, response.text
        response = session.put(f"{product}/versions/1.0/firmware", data=b"firmware", headers=user, timeout=10)
        assert response.status_code == 200, response.text
    response = session.post(f"{base}/fw/v1/activate", json={"serialNumber": "read-fwsn"}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["apiKey"]


def _vendor(bridge: Bridge) -> tuple[str, str]:
    """A provisioning vendor of the admin, and its token (`thingbridge vendor add` prints it once)."""
    name = unique("vendor")
    out = bridge.cli("vendor", "add", name, "--owner", "admin").stdout
    found = re.search(r"^X-Exosite-Token: (\S+)$", out, re.M)
    assert found, out
    return name, found[1]


@pytest.fixture(scope="module")
def live_schema(bridge: Bridge) -> Any:
    return schemathesis.openapi.from_url(f"{bridge.http}/openapi.json")


def _credential_headers(world: World, method: str, path: str, kind: int) -> dict[str, str]:
    """The credential headers of one request: the upgrader's device operations take the thing's JWT
    in `token` and provisioning's vendor operations a vendor token in X-Exosite-Token (kind 0: a wrong
    one, 1: none), everything else Authorization (_credential)."""
    op = DOCUMENT["paths"][path][method.lower()]
    schemes = {name for alternative in op["security"] for name in alternative}
    if "deviceToken" in schemes:
        return {} if kind == 1 else {"token": world.thing_jwt + ("x" if kind == 0 else "")}
    if "vendorToken" in schemes:
        return {} if kind == 1 else {"X-Exosite-Token": world.vendor_token + ("x" if kind == 0 else "")}
    if "apiKey" in schemes:  # the firmware dialect's devices
        return {} if kind == 1 else {"X-ApiKey": world.fw_key[: 39 if kind == 0 else 40]}
    if schemes == {"deviceCik"}:
        if {} in op["security"] and kind != 0:
            return {}  # optional (the portal's regId): the credential of another device is 403
        return {} if kind == 1 else {"X-Exosite-CIK": world.device_cik[: 39 if kind == 0 else 40]}
    credential = _credential(world, method, path, kind)
    return {"Authorization": credential} if credential else {}


def _credential(world: World, method: str, path: str, kind: int) -> str | None:
    """The Authorization header of one request, by `kind`: 0 a wrong credential, 1 none, 3 the access
    token raw, 4 the thing's JWT where the operation accepts it, else `Bearer <access token>`."""
    op = DOCUMENT["paths"][path][method.lower()]
    schemes = {name for alternative in op["security"] for name in alternative}
    if not schemes or kind == 1:
        return None
    if "basicAuth" in schemes:
        return basic("admin", "not-the-password" if kind == 0 else ADMIN_PASSWORD)["Authorization"]
    if kind == 0:
        return f"Bearer {world.token}x"
    if schemes == {"thingJwt", "deviceCik"} or ("thingJwt" in schemes and kind == 4):
        return f"Bearer {world.thing_jwt}"
    token = world.fresh_token() if (method, path) == ("DELETE", "/dev/v1/token") else world.token
    return token if kind == 3 else f"Bearer {token}"


def _use_real_resources(case: Any, world: World, method: str, path: str) -> None:
    case.path_parameters = {**(case.path_parameters or {}), **world.path_parameters(method, path)}
    if path in ("/GetURL", "/SetStatus", "/GetConfig"):
        if method == "GET" and isinstance(case.query, dict):
            case.query["regId"] = world.thing
        elif isinstance(case.body, dict):
            case.body["regId"] = world.thing
    if path == "/provision/download" and isinstance(case.query, dict):
        case.query.update(vendor=world.vendor, model="fuzz-model")  # the device's own pair
    if isinstance(case.query, dict) and "after" in case.query:
        case.query["after"] = world.message_id
    reg_id = case.body.get("regId") if path.endswith("/desired") and isinstance(case.body, dict) else None
    if isinstance(reg_id, str) and re.fullmatch(NAME_PATTERN, reg_id):
        # Ours alone: a generated regId may be the id of a thing another case created (409).
        case.body["regId"] = f"{world.thing}.reg"


def _route_of(case: Any, path: str) -> str:
    """The documented path a request for this case reaches: a generated path parameter may spell a
    literal path (subscription_id "active" is GET /subscriptions/active)."""
    concrete = path
    for name, value in (case.path_parameters or {}).items():
        concrete = concrete.replace("{" + name + "}", str(value))
    return concrete if concrete in DOCUMENT["paths"] else path


def _bound_wait(case: Any) -> None:
    wait = case.query.get("wait") if isinstance(case.query, dict) else None
    try:
        too_long = float(wait) > MAX_WAIT  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return
    if too_long:
        case.query["wait"] = MAX_WAIT


def _exercise(world: World, case: Any, method: str, path: str, real: bool, kind: int) -> None:
    """Send one case with real resources (when `real`) and a credential of `kind`; check the answer."""
    if real or _route_of(case, path) != path:
        _use_real_resources(case, world, method, path)
    _bound_wait(case)
    case.headers = {
        k: v for k, v in (case.headers or {}).items() if k.lower() not in ("authorization", "token")
    }
    extra = _credential_headers(world, method, path, kind) or None
    response = case.call(base_url=world.base, session=world.session, headers=extra, timeout=REQUEST_TIMEOUT)
    case.validate_response(response, checks=CHECKS, headers=extra)


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, BaseExceptionGroup) else f"{type(exc).__name__}: {exc}"


@pytest.mark.parametrize(("mode", "method", "path"), _fuzz_params())
def test_fuzz_live_server(
    live_schema: Any, world: World, mode: GenerationMode, method: str, path: str
) -> None:
    operation = live_schema[path][method]
    failures: list[str] = []
    deadline = time.monotonic() + OPERATION_BUDGET

    def attempt(label: str, case: Any, real: bool, kind: int) -> None:
        if time.monotonic() > deadline:
            return
        try:
            _exercise(world, case, method, path, real, kind)
        except Exception as exc:
            failures.append(f"{label}: {_describe(exc)}")

    if mode is GenerationMode.POSITIVE:
        for index, kwargs in enumerate(EXPLICIT.get((method, path), [])):
            attempt(f"explicit case {index}", operation.Case(**kwargs), True, 2)
    generation = live_schema.config.generation_for(operation=operation, phase="coverage")
    coverage = live_schema.iter_coverage_cases(
        operation, generation_modes=[mode], generation_config=generation
    )
    for index, case in enumerate(coverage):
        attempt(f"coverage case {index}", case, True, 2 + index % 2)

    @settings(
        max_examples=EXAMPLES[mode],
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode), real=st.integers(0, 3), kind=st.integers(0, 7))
    def fuzz(case: Any, real: int, kind: int) -> None:
        attempt("generated case", case, real > 0, kind)

    fuzz()
    assert not failures, f"{len(failures)} failing request(s); the first:\n\n" + "\n\n".join(failures[:3])


def test_fuzz_covers_every_operation() -> None:
    ids = {param.id for param in _fuzz_params()}
    assert ALIASED and documented_operations(DOCUMENT) > ALIASED
    for method, path in documented_operations(DOCUMENT) - ALIASED:
        assert f"positive-{method} {path}" in ids
        assert (f"negative-{method} {path}" in ids) == _has_inputs(method, path)
    assert sum(_has_inputs(method, path) for method, path in documented_operations(DOCUMENT)) >= 20


# ---- (e) fields: the document's properties against what the live API answers and accepts -----------------
def _schema_of(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def field_drift(doc: dict[str, Any], schema: dict[str, Any], value: Any, where: str = "$") -> list[str]:
    """Where a live answer has a field its schema does not name, or lacks one the schema requires,
    at any depth (objects, arrays, and the alternative of an anyOf that fits the value)."""
    schema = _schema_of(doc, schema)
    alternatives = [_schema_of(doc, s) for s in schema.get("anyOf", ())]
    if alternatives:
        kind = {dict: "object", list: "array"}.get(type(value))
        schema = next((s for s in alternatives if s.get("type") == kind), schema)
    if isinstance(value, list):
        return [
            d
            for i, v in enumerate(value)
            for d in field_drift(doc, schema.get("items", {}), v, f"{where}[{i}]")
        ]
    if not isinstance(value, dict) or "properties" not in schema:
        return []
    named = schema["properties"]
    drift = [f"{where}.{k}: not documented" for k in sorted(set(value) - set(named))]
    drift += [
        f"{where}.{k}: documented as required, not answered"
        for k in schema.get("required", ())
        if k not in value
    ]
    return drift + [
        d
        for k in sorted(set(value) & set(named))
        for d in field_drift(doc, named[k], value[k], f"{where}.{k}")
    ]


def test_field_check_sees_drift_both_ways() -> None:
    schema = {"$ref": "#/components/schemas/RestResponseThing"}
    answer = {
        "status": "OK",
        "code": 200,
        "messages": [{"key": "message", "value": "OK"}],
        "result": {"flthingspk": "t", "extra": 1},
    }
    drift = field_drift(DOCUMENT, schema, answer)
    assert "$.result.extra: not documented" in drift
    assert "$.result.keyType: documented as required, not answered" in drift


def _json_gets(doc: dict[str, Any]) -> list[str]:
    return sorted(
        path
        for path, item in doc["paths"].items()
        if "get" in item
        and "application/json" in item["get"]["responses"].get("200", {}).get("content", {})
        and path != "/openapi.json"
    )


def test_answers_have_the_documented_fields(world: World) -> None:
    """Every GET that answers JSON, asked for real resources: the fields it answers are the fields
    the document names, at every depth."""
    drift = {}
    for path in _json_gets(DOCUMENT):
        op = DOCUMENT["paths"][path]["get"]
        url = world.base + path.format(**world.path_parameters("GET", path, "read"))
        headers = _credential_headers(world, "GET", path, 2)
        named = {p["name"]: p["required"] for p in op.get("parameters", []) if p["in"] == "query"}
        # the portal's regId (optional beside a device credential) and every required parameter
        query = {
            name: value
            for name, value in {"regId": world.thing, "status": "Alive"}.items()
            if named.get(name) or (name == "regId" and name in named)
        }
        response = world.session.get(
            url,
            params=query,
            headers=headers,
            timeout=REQUEST_TIMEOUT,
        )
        assert response.status_code == 200, (path, response.text)
        schema = op["responses"]["200"]["content"]["application/json"]["schema"]
        drift[path] = field_drift(DOCUMENT, schema, response.json())
    assert {path: d for path, d in drift.items() if d} == {}
    assert len(drift) >= 15


def _not_allowed(schema: dict[str, Any]) -> Any:
    """A value the property's schema refuses (its type is wrong)."""
    validator = jsonschema.Draft202012Validator(schema)
    return next(v for v in ([], "x", 1.5) if not validator.is_valid(v))


def test_bodies_take_the_documented_fields(world: World) -> None:
    """Every documented JSON request field is known to the live API by that name (a wrong value is
    refused naming the field, not as an unknown one); a closed body refuses a field the document
    does not name."""
    checked = 0
    for path, item in DOCUMENT["paths"].items():
        for method, op in item.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body is None or "$ref" not in body:
                continue  # collect and publish take any JSON value
            schema = _schema_of(DOCUMENT, body)
            probes = {name: {name: _not_allowed(prop)} for name, prop in schema["properties"].items()}
            if schema.get("additionalProperties") is False:
                probes["undocumentedField"] = {"undocumentedField": 1}
            url = world.base + path.format(**world.path_parameters(method.upper(), path))
            headers = _credential_headers(world, method.upper(), path, 2)
            for name, probe in probes.items():
                response = world.session.request(
                    method,
                    url,
                    json=probe,
                    headers=headers,
                    timeout=REQUEST_TIMEOUT,
                )
                assert response.status_code == 400, (method, path, probe, response.text)
                message = response.text
                assert name in message, (method, path, probe, message)
                assert ("unknown field" in message) == (name == "undocumentedField"), (method, path, message)
                checked += 1
    assert checked >= 25


def test_twin_fields_are_the_cores() -> None:
    """The device twin's fields are declared once in the HTTP models; the core stores the same names."""
    assert gateway_models.DESIRED.keys() == DESIRED_FIELDS.keys()
