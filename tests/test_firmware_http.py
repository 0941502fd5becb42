"""The firmware activation dialect against the real `thingbridge serve` process (one server for the
module): every device operation and vendor route, success and each documented error, in the
`{"error", "message"}` shape; what they store is checked where the upgrader and provisioning
dialects show it (upgrade results, the model's content, the activation log)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import STORES, Bridge, store_bridge
from tests.helpers import Account, Product, Resp, account, call, firmware_product, run_sync, unique

V1, V2 = os.urandom(70_000), os.urandom(50_000)
MAX_FIRMWARE = 128 * 1024  # provisioning.max_content_size here
MAX_IMPORT = 4096  # provisioning.max_import_size here


@pytest.fixture(scope="module", params=STORES)
def bridge(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    limits = {"max_content_size": MAX_FIRMWARE, "max_import_size": MAX_IMPORT}
    yield from store_bridge(request, tmp_path_factory, provisioning=limits)


def failed(resp: Resp, status: int, text: str) -> None:
    """The dialect's error: the status, `{"error": <status name>, "message": <a sentence>}`."""
    assert resp.status == status, (resp.status, resp.body)
    assert resp.headers["Content-Type"].startswith("application/json")
    body = resp.json
    assert set(body) == {"error", "message"}, body
    assert body["error"] == {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                             409: "conflict", 413: "request_entity_too_large",
                             429: "too_many_requests"}[status]  # fmt: skip
    assert text in body["message"], body


def answer(resp: Resp, status: int = 200) -> Any:
    assert resp.status == status, (resp.status, resp.body)
    return resp.json


class Fw:
    """/fw/v1 as the owner (token) or as a device (X-ApiKey)."""

    def __init__(self, bridge: Bridge, token: str | None = None, api_key: str | None = None) -> None:
        self.base = f"{bridge.http}/fw/v1"
        self.token = token
        self.headers = {"X-ApiKey": api_key} if api_key else {}

    async def __call__(self, method: str, path: str, **kw: Any) -> Resp:
        headers = {**self.headers, **kw.pop("headers", {})}
        return await call(method, self.base + path, self.token, headers=headers, **kw)


@pytest.fixture(scope="module")
def owner(bridge: Bridge) -> Account:
    acct = account(bridge)
    bridge.cli("plan", "set", acct.name, "--things", "100")  # the free plan's 10 are not enough here
    return acct


async def versions(bridge: Bridge, product: Product) -> None:
    """1.0 and 2.0 with their firmware."""
    manage = Fw(bridge, product.owner.token)
    for number, day, blob in (("1.0", 1, V1), ("2.0", 2, V2)):
        path = f"/manage/products/{product.id}/versions/{number}"
        answer(await manage("PUT", path, json={"releaseDate": f"2025-01-0{day}T00:00:00Z"}), 201)
        done = answer(await manage("PUT", path + "/firmware", data=blob))
        assert (done["size"], done["sha256"]) == (len(blob), hashlib.sha256(blob).hexdigest())


async def enrol(bridge: Bridge, product: Product, *serials: str) -> None:
    body = "".join(f"{sn},extra\r\n" for sn in serials).encode()
    resp = await Fw(bridge, product.owner.token)(
        "POST", f"/manage/products/{product.id}/serials", data=body, headers={"Content-Type": "text/csv"}
    )
    assert answer(resp) == {"added": len(serials)}


async def activate(bridge: Bridge, sn: str, **extra: str) -> dict[str, str]:
    return answer(await Fw(bridge)("POST", "/activate", json={"serialNumber": sn, **extra}))


@pytest.fixture(scope="module")
def shop(bridge: Bridge, owner: Account) -> Product:
    async def make() -> Product:
        product = await firmware_product(bridge, owner)
        await versions(bridge, product)
        return product

    return run_sync(make())


# ---- products -------------------------------------------------------------------------------------
async def test_product_routes(bridge: Bridge, owner: Account, shop: Product) -> None:
    manage = Fw(bridge, owner.token)
    doc = {"id": shop.id, "softwareName": shop.software, "vendor": shop.vendor, "model": shop.model}
    assert answer(await manage("GET", f"/manage/products/{shop.id}")) == {**doc, "enabled": True}
    assert {**doc, "enabled": True} in answer(await manage("GET", "/manage/products"))
    body = {"softwareName": shop.software, "vendor": shop.vendor, "model": shop.model}
    assert answer(await manage("PUT", f"/manage/products/{shop.id}", json=body)) == {**doc, "enabled": True}

    failed(await manage("GET", "/manage/products/nothing-here"), 404, "not found")
    failed(await Fw(bridge)("GET", "/manage/products"), 401, "Authorization")
    failed(await manage("PUT", f"/manage/products/{shop.id}", json={**body, "colour": 1}), 400, "colour")
    failed(
        await manage("PUT", f"/manage/products/{shop.id}", json={**body, "softwareName": "nope"}), 400, "nope"
    )
    failed(await manage("PUT", f"/manage/products/{shop.id}", json={**body, "model": "nope"}), 400, "nope")
    failed(await manage("PUT", "/manage/products/other", json=body), 409, "another product")
    failed(await manage("PUT", "/manage/products/-bad", json=body), 400, "productId")

    stranger = account(bridge)
    failed(await Fw(bridge, stranger.token)("GET", f"/manage/products/{shop.id}"), 404, "not found")
    assert answer(await Fw(bridge, stranger.token)("GET", "/manage/products")) == []
    theirs = await firmware_product(bridge, stranger)
    theirs_body = {"softwareName": theirs.software, "vendor": theirs.vendor, "model": theirs.model}
    failed(
        await Fw(bridge, stranger.token)("PUT", f"/manage/products/{shop.id}", json=theirs_body),
        409,
        "not available",
    )
    # another owner's software or model cannot be bound
    failed(await manage("PUT", "/manage/products/mine", json=theirs_body), 400, "not found")

    throwaway = await firmware_product(bridge, owner)
    assert (await manage("DELETE", f"/manage/products/{throwaway.id}")).status == 204
    failed(await manage("GET", f"/manage/products/{throwaway.id}"), 404, "not found")
    failed(await manage("DELETE", f"/manage/products/{throwaway.id}"), 404, "not found")


async def test_version_routes(bridge: Bridge, owner: Account, shop: Product) -> None:
    manage = Fw(bridge, owner.token)
    base = f"/manage/products/{shop.id}/versions"
    listed = answer(await manage("GET", base))
    assert [(v["version"], v["size"], v["status"]) for v in listed] == [
        ("1.0", len(V1), "OK"),
        ("2.0", len(V2), "OK"),
    ]
    one = answer(await manage("GET", f"{base}/1.0"))
    assert one == {**listed[0], "sha256": hashlib.sha256(V1).hexdigest()}
    assert one["contentType"] == "application/octet-stream"

    # the upgrader's version, the provisioning model's content entity
    software = answer(
        await call("GET", f"{bridge.http}/v2/software/{shop.software}/versions/1.0", owner.token)
    )
    assert software["downloadUrl"] == "/fw/v1/things/{thingId}/versions/1.0/firmware"
    content = await call(
        "GET",
        f"{bridge.http}/provision/manage/content/{shop.model}/fw-1.0",
        headers={"X-Exosite-Token": shop.vendor_token},
    )
    assert content.body.decode().startswith(f"application/octet-stream,{len(V1)},")

    body = {"releaseDate": "2025-01-03T00:00:00Z", "status": "REQUIRED", "releaseNote": "beta"}
    created = answer(await manage("PUT", f"{base}/3.0 beta", json=body), 201)
    assert created == {"version": "3.0 beta", "releaseDate": body["releaseDate"], "status": "REQUIRED",
                       "rolloutProfiles": [], "size": None, "sha256": None, "contentType": None}  # fmt: skip
    assert answer(await manage("PUT", f"{base}/3.0 beta", json=body))["status"] == "REQUIRED"
    blob = b"\x7fELF" + os.urandom(100)
    up = answer(
        await manage(
            "PUT", f"{base}/3.0 beta/firmware", data=blob, headers={"Content-Type": "application/x-elf"}
        )
    )
    assert (up["size"], up["contentType"]) == (len(blob), "application/x-elf")
    # an empty body is refused before anything is replaced: the image stays
    failed(await manage("PUT", f"{base}/3.0 beta/firmware", data=b""), 400, "empty")
    assert answer(await manage("GET", f"{base}/3.0 beta"))["size"] == len(blob)
    beta = answer(
        await call("GET", f"{bridge.http}/v2/software/{shop.software}/versions/3.0 beta", owner.token)
    )
    assert beta["downloadUrl"] == "/fw/v1/things/{thingId}/versions/3.0%20beta/firmware"  # percent-encoded

    failed(await manage("PUT", f"{base}/4.0", json={"releaseDate": "yesterday"}), 400, "RFC 3339")
    failed(await manage("PUT", f"{base}/4.0", json={**body, "rolloutProfiles": ["none"]}), 400, "none")
    failed(await manage("PUT", f"{base}/4.0", json={**body, "status": "MAYBE"}), 400, "status")
    failed(await manage("PUT", f"{base}/4.0/firmware", data=b"x"), 404, "not found")
    failed(await manage("GET", f"{base}/4.0"), 404, "not found")
    failed(await manage("PUT", "/manage/products/nothing/versions/1.0", json=body), 404, "not found")
    failed(await manage("PUT", f"{base}/{'9' * 121}", json=body), 400, "version")
    failed(await Fw(bridge)("GET", base), 401, "Authorization")

    assert (await manage("DELETE", f"{base}/3.0 beta")).status == 204
    failed(await manage("GET", f"{base}/3.0 beta"), 404, "not found")
    gone = await call(
        "GET",
        f"{bridge.http}/provision/manage/content/{shop.model}/fw-3.0 beta",
        headers={"X-Exosite-Token": shop.vendor_token},
    )
    assert gone.status == 404
    failed(await manage("DELETE", f"{base}/3.0 beta"), 404, "not found")

    # Deleted through the upgrader's own route, a version loses its image too: entity and blob.
    answer(await manage("PUT", f"{base}/5.0", json=body), 201)
    blob = os.urandom(64)
    answer(await manage("PUT", f"{base}/5.0/firmware", data=blob))
    stored = bridge.folder / "data" / "content" / hashlib.sha256(blob).hexdigest()
    assert stored.exists()
    deleted = await call("DELETE", f"{bridge.http}/v2/software/{shop.software}/versions/5.0", owner.token)
    assert answer(deleted) == {"deletedCount": 1}
    content = await call(
        "GET",
        f"{bridge.http}/provision/manage/content/{shop.model}/fw-5.0",
        headers={"X-Exosite-Token": shop.vendor_token},
    )
    assert content.status == 404 and not stored.exists()


async def test_serial_routes(bridge: Bridge, owner: Account, shop: Product) -> None:
    manage = Fw(bridge, owner.token)
    sn = unique("SN-")
    await enrol(bridge, shop, sn)
    path = f"/manage/products/{shop.id}/serials"
    assert answer(await manage("GET", f"{path}/{sn}")) == {
        "serialNumber": sn,
        "status": "unused",
        "thingId": None,
    }
    csv = {"Content-Type": "text/csv"}
    failed(await manage("POST", path, data=f"{sn}\r\n".encode(), headers=csv), 409, sn)
    failed(await manage("POST", path, data=b"a,b,c\r\n", headers=csv), 400, "fields")
    failed(
        await manage("POST", "/manage/products/nothing/serials", data=b"x\r\n", headers=csv), 404, "not found"
    )
    failed(await manage("GET", f"{path}/absent"), 404, "not found")
    # a serial number never activated: enabling it changes nothing (activation needs no enable
    # step), disabling it blocks its activation until it is enabled again
    assert answer(await manage("PUT", f"{path}/{sn}", json={"enabled": True}))["status"] == "unused"
    assert answer(await manage("PUT", f"{path}/{sn}", json={"enabled": False}))["status"] == "disabled"
    failed(await Fw(bridge)("POST", "/activate", json={"serialNumber": sn}), 403, "disabled")
    vendor = {"X-Exosite-Token": shop.vendor_token}
    info = await call("GET", f"{bridge.http}/provision/manage/model/{shop.model}/{sn}", headers=vendor)
    assert info.body.startswith(b"disabled,")  # provisioning sees the same serial number
    assert answer(await manage("PUT", f"{path}/{sn}", json={"enabled": True}))["status"] == "enabled"

    thing = (await activate(bridge, sn))["thingId"]
    assert answer(await manage("GET", f"{path}/{sn}")) == {
        "serialNumber": sn,
        "status": "activated",
        "thingId": thing,
    }
    disabled = answer(await manage("PUT", f"{path}/{sn}", json={"enabled": False}))
    assert disabled["status"] == "disabled"
    failed(await manage("PUT", f"{path}/{sn}", json={"enabled": "no"}), 400, "enabled")
    assert answer(await manage("PUT", f"{path}/{sn}", json={"enabled": True}))["status"] == "enabled"
    # the attempts are in the serial number's activation log (provisioning's)
    log = await call(
        "GET",
        f"{bridge.http}/provision/manage/model/{shop.model}/{sn}?show=log",
        headers={"X-Exosite-Token": shop.vendor_token},
    )
    assert "activated (firmware)" in log.body.decode()


# ---- the device ------------------------------------------------------------------------------------
async def test_activate(bridge: Bridge, owner: Account, shop: Product) -> None:
    sn, off, lone = unique("SN-"), unique("SN-"), unique("SN-")
    await enrol(bridge, shop, sn, off)
    first = await activate(bridge, sn)
    assert set(first) == {"apiKey", "thingId"} and len(first["apiKey"]) == 40
    assert first["thingId"] == f"sn-{shop.model}-{sn}"
    target = f"/things/{first['thingId']}/target"
    assert (await Fw(bridge, api_key=first["apiKey"])("GET", target)).status == 200

    # every activation: a new key, the old one void at once; the thing stays
    second = await activate(bridge, sn)
    assert second["thingId"] == first["thingId"] and second["apiKey"] != first["apiKey"]
    failed(await Fw(bridge, api_key=first["apiKey"])("GET", target), 401, "replaced")
    assert (await Fw(bridge, api_key=second["apiKey"])("GET", target)).status == 200

    failed(
        await Fw(bridge)("POST", "/activate", json={"serialNumber": "never-enrolled"}),
        404,
        "not one of a product",
    )
    failed(await Fw(bridge)("POST", "/activate", json={"serial": sn}), 400, "serial")
    failed(await Fw(bridge)("POST", "/activate", data=b"{"), 400, "JSON")

    await activate(bridge, off)
    manage = Fw(bridge, owner.token)
    answer(await manage("PUT", f"/manage/products/{shop.id}/serials/{off}", json={"enabled": False}))
    failed(await Fw(bridge)("POST", "/activate", json={"serialNumber": off}), 403, "disabled")

    # a disabled product refuses activations; a serial number in two products needs the product named
    other = await firmware_product(bridge, owner, enabled=False)
    await enrol(bridge, other, lone)
    failed(await Fw(bridge)("POST", "/activate", json={"serialNumber": lone}), 403, "product is disabled")
    await enrol(bridge, other, sn)
    failed(await Fw(bridge)("POST", "/activate", json={"serialNumber": sn}), 400, "several products")
    named = await activate(bridge, sn, product=shop.id)
    assert named["thingId"] == first["thingId"]


async def test_guessing_serial_numbers_is_slowed_down(bridge: Bridge, shop: Product) -> None:
    """Unknown serial numbers from one address: after five, 429 with Retry-After, in the dialect's
    error shape (the same limiter as provisioning's activation)."""
    device = Fw(bridge)
    for i in range(5):
        guess = {"serialNumber": f"guess-{i}", "product": shop.id}
        failed(await device("POST", "/activate", json=guess), 404, "not one")
    statuses = []
    for i in range(5, 15):  # the back-off doubles with each failure: a slow run meets it too
        got = await device("POST", "/activate", json={"serialNumber": f"guess-{i}", "product": shop.id})
        statuses.append(got.status)
        if got.status == 429:
            break
    assert statuses[-1] == 429 and set(statuses[:-1]) <= {404}, statuses
    assert int(got.headers["Retry-After"]) >= 1
    failed(got, 429, "too many failed activations")


async def test_target_download_and_switch(bridge: Bridge, owner: Account, shop: Product) -> None:
    sn, other_sn = unique("SN-"), unique("SN-")
    await enrol(bridge, shop, sn, other_sn)
    me, other = await activate(bridge, sn), await activate(bridge, other_sn)
    device = Fw(bridge, api_key=me["apiKey"])
    thing = me["thingId"]
    # in no account: every version is offered, the latest by release date
    sha2 = hashlib.sha256(V2).hexdigest()
    url = f"/fw/v1/things/{thing}/versions/2.0/firmware"
    assert answer(await device("GET", f"/things/{thing}/target")) == {
        "thingId": thing, "currentVersion": None, "targetVersion": "2.0", "size": len(V2), "sha256": sha2,
        "firmwareUrl": url,
    }  # fmt: skip
    by_query = await call("GET", f"{bridge.http}/fw/v1/things/{thing}/target?ApiKey={me['apiKey']}")
    assert by_query.status == 200

    whole = await device("GET", f"/things/{thing}/versions/2.0/firmware")
    assert (whole.status, whole.body, whole.headers["ETag"]) == (200, V2, f'"{sha2}"')
    part = await device("GET", f"/things/{thing}/versions/2.0/firmware", headers={"Range": "bytes=100-199"})
    assert (part.status, part.body) == (206, V2[100:200])
    several = await device(
        "GET", f"/things/{thing}/versions/2.0/firmware", headers={"Range": "bytes=0-9,20-29"}
    )
    assert (several.status, several.body) == (200, V2)  # several ranges: the whole firmware
    assert part.headers["Content-Range"] == f"bytes 100-199/{len(V2)}"
    stale = await device(
        "GET", f"/things/{thing}/versions/2.0/firmware", headers={"Range": "bytes=100-", "If-Range": '"0000"'}
    )
    assert (stale.status, stale.body) == (200, V2)
    past = await device(
        "GET", f"/things/{thing}/versions/2.0/firmware", headers={"Range": f"bytes={len(V2)}-"}
    )
    assert past.status == 416 and past.headers["Content-Range"] == f"bytes */{len(V2)}"
    none = await device("GET", f"/things/{thing}/versions/2.0/firmware", headers={"Range": "bytes=-0"})
    assert none.status == 416 and none.headers["Content-Range"] == f"bytes */{len(V2)}"
    failed(await device("GET", f"/things/{thing}/versions/9.9/firmware"), 404, "not found")

    # credentials: none, unknown, another thing's
    failed(await Fw(bridge)("GET", f"/things/{thing}/target"), 401, "X-ApiKey")
    failed(await Fw(bridge, api_key="f" * 40)("GET", f"/things/{thing}/target"), 401, "API key")
    failed(await Fw(bridge, api_key=other["apiKey"])("GET", f"/things/{thing}/target"), 403, "another thing")
    failed(
        await Fw(bridge, api_key=other["apiKey"])("GET", f"/things/{thing}/versions/2.0/firmware"),
        403,
        "another",
    )
    failed(
        await Fw(bridge, api_key=other["apiKey"])("PUT", f"/things/{thing}/version", json={"version": "1.0"}),
        403,
        "another",
    )

    failed(await device("PUT", f"/things/{thing}/version", json={"version": "9.9"}), 404, "not found")
    failed(await device("PUT", f"/things/{thing}/version", json={"version": ""}), 400, "version")
    failed(await device("PUT", f"/things/{thing}/version", json={}), 400, "version")
    assert answer(await device("PUT", f"/things/{thing}/version", json={"version": "1.0"})) == {
        "thingId": thing, "currentVersion": "1.0"
    }  # fmt: skip
    assert answer(await device("GET", f"/things/{thing}/target"))["currentVersion"] == "1.0"
    # an upgrade result in the upgrader's history
    results = answer(await call("GET", f"{bridge.http}/v2/devices/{thing}/upgradeResults", owner.token))
    assert [(r["softwareName"], r["versionNumber"], r["status"], r["transport"]) for r in results["upgradeResultList"]] == [
        (shop.software, "1.0", "SUCCESS", "http")
    ]  # fmt: skip
    answer(await device("PUT", f"/things/{thing}/version", json={"version": "2.0"}))
    assert answer(await device("GET", f"/things/{thing}/target"))["targetVersion"] == "2.0"

    # a thing whose model is in no product (any more) is refused
    product = await firmware_product(bridge, owner)
    lone = unique("SN-")
    await enrol(bridge, product, lone)
    orphan = await activate(bridge, lone)
    assert (await Fw(bridge, owner.token)("DELETE", f"/manage/products/{product.id}")).status == 204
    failed(
        await Fw(bridge, api_key=orphan["apiKey"])("GET", f"/things/{orphan['thingId']}/target"),
        403,
        "no firmware product",
    )


def test_cli_imports_serial_numbers(bridge: Bridge, owner: Account, shop: Product, tmp_path: Path) -> None:
    serials = [unique("CLI-") for _ in range(3)]
    csv = tmp_path / "serials.csv"
    csv.write_text("".join(f'{sn},"batch, 7"\n' for sn in serials))
    out = bridge.cli("firmware", "import-serials", shop.id, str(csv)).stdout
    assert f"enrolled 3 serial numbers in product {shop.id}" in out
    found = run_sync(
        call("GET", f"{bridge.http}/fw/v1/manage/products/{shop.id}/serials/{serials[2]}", owner.token)
    )
    assert found.json == {"serialNumber": serials[2], "status": "unused", "thingId": None}
    again = bridge.cli("firmware", "import-serials", shop.id, str(csv), check=False)
    assert again.returncode == 1 and serials[0] in again.stderr
    missing = bridge.cli("firmware", "import-serials", "no-such-product", str(csv), check=False)
    assert missing.returncode == 1 and "not found" in missing.stderr
    absent = bridge.cli("firmware", "import-serials", shop.id, str(tmp_path / "absent.csv"), check=False)
    assert absent.returncode == 2 and "absent.csv" in absent.stderr


async def test_size_limits(bridge: Bridge, owner: Account, shop: Product) -> None:
    """An upload past provisioning.max_content_size is 413: declared (answered before the body is
    sent) or streamed without a length (cut as it passes); the firmware stays as it was. A serial
    number import past provisioning.max_import_size is 413, none of it enrolled."""
    manage = Fw(bridge, owner.token)
    version = f"/manage/products/{shop.id}/versions/1.0"
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge.ports["http"])
    writer.write(
        f"PUT /fw/v1{version}/firmware HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {owner.token}\r\n"
        f"Content-Length: {MAX_FIRMWARE + 1}\r\nConnection: close\r\n\r\n".encode()
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")  # the server answers after the head alone
    writer.close()
    assert head.startswith(b"HTTP/1.1 413 "), head[:200]

    async def stream() -> Any:
        for _ in range(MAX_FIRMWARE // 16_384 + 1):
            yield os.urandom(16_384)

    failed(await manage("PUT", f"{version}/firmware", data=stream()), 413, f"limited to {MAX_FIRMWARE}")
    assert answer(await manage("GET", version))["sha256"] == hashlib.sha256(V1).hexdigest()

    serials = f"/manage/products/{shop.id}/serials"
    first = unique("BIG-")
    body = f"{first}\r\n".encode() + b"".join(b"big-%06d\r\n" % i for i in range(MAX_IMPORT // 12 + 1))
    assert len(body) > MAX_IMPORT
    failed(await manage("POST", serials, data=body, headers={"Content-Type": "text/csv"}), 413, "larger than")
    failed(await manage("GET", f"{serials}/{first}"), 404, "not found")
