"""The Provisioning v1.1 HTTP dialect against the real `thingbridge serve` process (one server for
the module): every served operation's success and documented errors, CSV and text answers byte for
byte, trailing-slash twins reaching different operations, and a device walk with plain aiohttp:
a vendor enrols serial numbers by CSV, enables one, the device activates, collects with its CIK on
the things-gateway, a second activation is refused, a regenerated CIK invalidates the old one at
once, and a vendor the model is shared with enables and disables only its own serial numbers."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import STORES, Bridge, store_bridge
from tests.helpers import Account, Resp, account, call, csr_pem, device_files, ok, thing_client, unique

FORM = "application/x-www-form-urlencoded"
CSV = "text/csv; charset=utf-8"


@dataclass(frozen=True)
class Vendor:
    name: str
    token: str
    cik: str

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Exosite-Token": self.token}


def add_vendor(bridge: Bridge, owner: Account) -> Vendor:
    """`thingbridge vendor add`, which prints the credentials once."""
    name = unique("vendor")
    out = bridge.cli("vendor", "add", name, "--owner", owner.name).stdout
    token = re.search(r"^X-Exosite-Token: (\S+)$", out, re.M)
    cik = re.search(r"^X-Exosite-CIK: (\S+)$", out, re.M)
    assert token and cik, out
    return Vendor(name, token[1], cik[1])


IMPORT_LIMIT = 2 * 1024 * 1024  # provisioning.max_import_size here: twice http.max_body (1 MiB)


@pytest.fixture(scope="module", params=STORES)
def bridge(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    yield from store_bridge(request, tmp_path_factory, provisioning={"max_import_size": IMPORT_LIMIT})


@pytest.fixture(scope="module")
def owner(bridge: Bridge) -> Account:
    return account(bridge)


@pytest.fixture(scope="module")
def acme(bridge: Bridge, owner: Account) -> Vendor:
    return add_vendor(bridge, owner)


@pytest.fixture(scope="module")
def other(bridge: Bridge) -> Vendor:
    """Another user's vendor: the one models are shared with."""
    return add_vendor(bridge, account(bridge))


class Api:
    def __init__(self, bridge: Bridge, vendor: Vendor | None = None, **headers: str) -> None:
        self.base = f"{bridge.http}/provision"
        self.headers = {**(vendor.headers if vendor else {}), **headers}

    async def __call__(
        self, method: str, path: str, *, form: Any = None, csv: bytes | None = None, **kw: Any
    ) -> Resp:
        headers = {**self.headers, **kw.pop("headers", {})}
        if form is not None:
            kw["data"] = form  # aiohttp form-encodes a dict or a list of pairs
        if csv is not None:
            kw["data"] = csv
            headers["Content-Type"] = "text/csv"
        return await call(method, self.base + path, headers=headers, **kw)


def reset(resp: Resp) -> None:
    """205 Reset Content, Content-Length 0, no body."""
    assert (resp.status, resp.body) == (205, b""), (resp.status, resp.body)
    assert resp.headers["Content-Length"] == "0"


def csv_body(resp: Resp) -> bytes:
    assert resp.status == 200, (resp.status, resp.body)
    assert resp.headers["Content-Type"] == CSV
    return resp.body


def refused(resp: Resp, status: int, text: str) -> None:
    """A documented error: the status and a readable plain-text sentence."""
    assert resp.status == status, (resp.status, resp.body)
    assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert text in resp.body.decode(), resp.body


async def new_model(api: Api, rid: str = "0" * 40) -> str:
    name = unique("model")
    reset(await api("POST", "/manage/model/", form={"model": name, "rid": rid}))
    return name


# ---- vendor credential ------------------------------------------------------------------------------
async def test_vendor_credential(bridge: Bridge, acme: Vendor) -> None:
    path = "/manage/model/"
    assert (await Api(bridge, acme)("GET", path)).status in (200, 204)
    assert (await Api(bridge, **{"X-Exosite-CIK": acme.cik})("GET", path)).status in (200, 204)
    refused(await Api(bridge)("GET", path), 401, "X-Exosite-Token or X-Exosite-CIK")
    refused(await Api(bridge, **{"X-Exosite-Token": ""})("GET", path), 401, "required")
    refused(await Api(bridge, **{"X-Exosite-Token": acme.token + "x"})("GET", path), 401, "unknown")
    refused(await Api(bridge, **{"X-Exosite-CIK": acme.token})("GET", path), 401, "unknown")
    # a device credential is not a vendor's: the vendor CIK is not a device CIK either way
    refused(await Api(bridge, **{"X-Exosite-Vendor": acme.name})("GET", path), 401, "required")
    refused(await Api(bridge, acme, **{"X-Exosite-Vendor": "someone"})("GET", path), 403, "shared model")


async def test_revoked_vendor_is_refused_at_once(bridge: Bridge, owner: Account) -> None:
    vendor = add_vendor(bridge, owner)
    api = Api(bridge, vendor)
    assert (await api("GET", "/manage/model/")).status == 204
    bridge.cli("vendor", "revoke", vendor.name)
    refused(await api("GET", "/manage/model/"), 401, "unknown or revoked")


# ---- models -------------------------------------------------------------------------------------------
async def test_models(bridge: Bridge, owner: Account) -> None:
    api = Api(bridge, add_vendor(bridge, owner))
    assert (await api("GET", "/manage/model/")).status == 204  # no models: 204, no body
    rid = "a" * 40
    form = [("model", "m,1"), ("rid", rid), ("options[]", "noaliases"), ("options[]", "nohistorical")]
    reset(await api("POST", "/manage/model/", form=form))
    reset(await api("POST", "/manage/model/", form={"model": "m2", "rid": rid}))
    refused(await api("POST", "/manage/model/", form={"model": "m2", "rid": rid}), 409, "already exists")
    refused(await api("POST", "/manage/model/", form={"model": "m3"}), 400, "rid is required")
    refused(
        await api("POST", "/manage/model/", form={"model": "m3", "rid": rid, "options[]": "x"}),
        400,
        "options[]",
    )
    refused(
        await api("POST", "/manage/model/", form={"model": "m3", "rid": rid, "colour": "red"}), 400, "colour"
    )
    refused(await api("POST", "/manage/model/", csv=b"m3\r\n"), 400, "Content-Type")
    assert csv_body(await api("GET", "/manage/model/")) == b'"m,1"\r\nm2\r\n'  # RFC 4180 quoting

    info = await api("GET", "/manage/model/m,1")
    assert info.status == 200 and info.headers["Content-Type"] == CSV
    assert info.body == f"rid={rid}&options%5B%5D=noaliases&options%5B%5D=nohistorical".encode()
    reset(await api("PUT", "/manage/model/m2", form={"rid": "b" * 40, "options[]": "nocomments"}))
    assert (await api("GET", "/manage/model/m2")).body == b"rid=" + b"b" * 40 + b"&options%5B%5D=nocomments"
    # the document's own spelling `options=` (CATALOG 002 note 10) is taken as `options[]=`
    mixed = [("rid", rid), ("options[]", "noaliases"), ("options", "nohistorical")]
    reset(await api("PUT", "/manage/model/m2", form=mixed))
    assert (await api("GET", "/manage/model/m2")).body == (
        f"rid={rid}&options%5B%5D=noaliases&options%5B%5D=nohistorical".encode()
    )
    refused(await api("PUT", "/manage/model/nope", form={"rid": rid}), 404, "not found")
    refused(await api("GET", "/manage/model/nope"), 404, "not found")

    reset(await api("DELETE", "/manage/model/m2"))
    reset(await api("DELETE", "/manage/model/m2"))  # deleted already: done
    reset(await api("POST", "/manage/model/", form={"model": "m,1", "delete": "true"}))
    assert (await api("GET", "/manage/model/")).status == 204


async def test_trailing_slash_twins_are_different_operations(bridge: Bridge, acme: Vendor) -> None:
    api = Api(bridge, acme)
    model = await new_model(api, "c" * 40)
    reset(await api("POST", f"/manage/model/{model}/", form={"sn": "sn1", "extra": "x"}))
    assert csv_body(await api("GET", f"/manage/model/{model}")) == b"rid=" + b"c" * 40  # the model
    assert csv_body(await api("GET", f"/manage/model/{model}/")) == b"sn1,,x\r\n"  # its serial numbers
    reset(await api("DELETE", f"/manage/model/{model}/", csv=b"sn1\r\n"))  # serial numbers only
    assert csv_body(await api("GET", f"/manage/model/{model}")) == b"rid=" + b"c" * 40
    # the share twins: the list (204: none) and one vendor (404: not shared)
    assert (await api("GET", f"/manage/share/{model}/")).status == 204
    refused(await api("GET", f"/manage/share/{model}/somebody"), 404, "not shared")


# ---- serial numbers ---------------------------------------------------------------------------------
async def test_serial_numbers(bridge: Bridge, acme: Vendor) -> None:
    api = Api(bridge, acme)
    model = await new_model(api)
    sns = f"/manage/model/{model}/"
    assert (await api("GET", sns)).status == 204
    reset(await api("POST", sns, form={"sn": "a1", "extra": 'with "quotes", commas'}))
    reset(await api("POST", sns, form=[("sn[]", "a2"), ("sn[]", "a3")]))
    reset(await api("POST", sns, csv=b'b1,one\r\nb2,"two, quoted"\nb3\r\n\r\nb4,"multi\r\nline"\r\n'))
    refused(await api("POST", sns, form={"sn": "a1"}), 409, "'a1' already exists")
    refused(await api("POST", sns, csv=b"c1\r\nb2\r\n"), 409, "'b2' already exists")  # all or none
    refused(await api("POST", sns, csv=b'c1,"open\r\n'), 400, "quoted field")
    refused(await api("POST", sns, csv=b"c1,x,y\r\n"), 400, "1 to 2 fields")
    refused(await api("POST", sns, form={"sn": "a/b"}), 400, "sn must be")
    refused(await api("POST", sns, form={"sn": "c1", "sn[]": "c2"}), 400, "either sn or sn[]")
    refused(await api("POST", sns, form="sn=c1&sn=c2", headers={"Content-Type": FORM}), 400, "more than once")
    refused(await api("POST", "/manage/model/nope/", form={"sn": "c1"}), 404, "not found")
    # a serial-number import is bounded by provisioning.max_import_size, not http.max_body
    big = b"".join(b"big-%06d,%s\r\n" % (i, b"e" * 40) for i in range(30_000))
    assert 1024 * 1024 < len(big) < IMPORT_LIMIT
    reset(await api("POST", f"/manage/model/{await new_model(api)}/", csv=big))
    refused(await api("POST", sns, csv=b"x" * (IMPORT_LIMIT + 1)), 413, "larger than")

    # paging: defaults 0 and 5, the limit clamped to 5..1000
    expected = (
        b'a1,,"with ""quotes"", commas"\r\na2,,\r\na3,,\r\nb1,,one\r\nb2,,"two, quoted"\r\n'
        b'b3,,\r\nb4,,"multi\r\nline"\r\n'
    )
    lines = expected.split(b"\r\n")
    assert csv_body(await api("GET", sns)) == b"\r\n".join(lines[:5]) + b"\r\n"
    assert csv_body(await api("GET", sns, params={"limit": "1"})) == b"\r\n".join(lines[:5]) + b"\r\n"
    assert csv_body(await api("GET", sns, params={"limit": "5000"})) == expected
    assert csv_body(await api("GET", sns, params={"offset": "5"})) == expected.split(b"\r\n", 5)[5]
    assert (await api("GET", sns, params={"offset": "7"})).status == 204
    refused(await api("GET", sns, params={"offset": "-1"}), 400, "offset")
    refused(await api("GET", sns, params={"limit": "many"}), 400, "limit")

    # one serial number: 204 while unused
    assert (await api("GET", f"{sns}a1")).status == 204
    refused(await api("GET", f"{sns}zz"), 404, "not found")
    assert (await api("GET", f"{sns}a1", params={"show": "log"})).status == 204

    # removal: by form (one, many), by DELETE with a CSV body, by DELETE on the serial number
    reset(await api("POST", sns, form={"sn": "a1", "delete": "true"}))
    reset(await api("POST", sns, form=[("sn[]", "a2"), ("sn[]", "nothere"), ("delete", "true")]))
    reset(await api("DELETE", sns, csv=b"b1\r\nb2\r\n"))
    refused(await api("DELETE", sns, form={"sn": "b3"}), 400, "Content-Type must be text/csv")
    reset(await api("DELETE", f"{sns}b3"))
    assert csv_body(await api("GET", sns)) == b"a3,,\r\n" + b'b4,,"multi\r\nline"\r\n'


async def test_client_lifecycle_errors(bridge: Bridge, acme: Vendor) -> None:
    api = Api(bridge, acme)
    model = await new_model(api)
    reset(await api("POST", f"/manage/model/{model}/", csv=b"s1\r\ns2\r\n"))
    one = f"/manage/model/{model}/s1"
    refused(await api("POST", one, form={"enable": "true"}), 409, "has no client")
    refused(await api("POST", one, form={"enable": "true", "disable": "true"}), 400, "enable=true or disable")
    refused(await api("POST", one, form={}), 400, "enable=true or disable")
    made = await api("POST", one, form={"enable": "true", "owner": "f" * 40})
    rid = csv_body(made).decode().strip()
    assert re.fullmatch(r"[0-9a-f]{40}", rid)
    assert csv_body(await api("GET", one)) == f"enabled,{rid},\r\n".encode()
    refused(await api("POST", one, form={"enable": "true", "owner": "f" * 40}), 409, "has a client already")
    refused(await api("POST", f"/manage/model/{model}/zz", form={"disable": "true"}), 404, "not found")
    # remapping onto a serial number with a client is a conflict
    csv_body(await api("POST", f"/manage/model/{model}/s2", form={"enable": "true", "owner": "f" * 40}))
    refused(await api("POST", one, form={"enable": "true", "oldsn": "s2"}), 409, "has a client already")


async def test_activation_errors(bridge: Bridge, acme: Vendor) -> None:
    api, device = Api(bridge, acme), Api(bridge)
    model = await new_model(api)
    reset(await api("POST", f"/manage/model/{model}/", form={"sn": "s1"}))
    form = {"vendor": acme.name, "model": model, "sn": "s1"}
    refused(await device("POST", "/activate", form={**form, "sn": "s9"}), 404, "not found")
    refused(await device("POST", "/activate", form={**form, "vendor": "nobody"}), 404, "not found")
    refused(await device("POST", "/activate", form=form), 409, "not enabled for activation")
    refused(await device("POST", "/activate", form={"vendor": acme.name}), 400, "model")


async def test_guessing_serial_numbers_is_slowed_down(bridge: Bridge, acme: Vendor) -> None:
    """Unknown serial numbers from one address: after five, 429 with Retry-After (an exponential
    back-off, credentials.FailureLimiter); the back-off is per address and model, so the same
    address still activates a device of another model."""
    api, device = Api(bridge, acme), Api(bridge)
    guessed, other = await new_model(api), await new_model(api)
    for i in range(5):
        refused(await device("POST", "/activate", form={"vendor": acme.name, "model": guessed, "sn": f"g{i}"}),
                404, "not found")  # fmt: skip
    statuses = []
    for i in range(5, 15):  # the back-off doubles with each failure: a slow run meets it too
        got = await device("POST", "/activate", form={"vendor": acme.name, "model": guessed, "sn": f"g{i}"})
        statuses.append(got.status)
        if got.status == 429:
            break
    assert statuses[-1] == 429 and set(statuses[:-1]) <= {404}, statuses
    assert int(got.headers["Retry-After"]) >= 1
    refused(got, 429, "too many failed activations")
    assert await activated(api, bridge, acme, other, "fine")  # another model: not held back


# ---- the device walk ------------------------------------------------------------------------------------
async def test_device_walk(bridge: Bridge, acme: Vendor, other: Vendor) -> None:
    api = Api(bridge, acme)
    model = await new_model(api)
    sns = f"/manage/model/{model}/"
    reset(await api("POST", sns, csv=b"dev-1,batch 7\r\ndev-2,batch 7\r\ndev-3,\r\n"))
    rid = (
        csv_body(await api("POST", f"{sns}dev-1", form={"enable": "true", "owner": "e" * 40}))
        .decode()
        .strip()
    )
    assert csv_body(await api("GET", f"{sns}dev-1")) == f"enabled,{rid},batch 7\r\n".encode()

    # the device activates (empty credential headers tolerated) and gets its CIK as plain text
    form = {"vendor": acme.name, "model": model, "sn": "dev-1"}
    empty = {"X-Exosite-CIK": "", "X-Exosite-Token": "", "User-Agent": "walk-device/1.0"}
    got = await Api(bridge)("POST", "/activate", form=form, headers=empty)
    assert got.status == 200 and got.headers["Content-Type"] == "text/plain; charset=utf-8", got
    cik = got.body.decode()
    assert re.fullmatch(r"[0-9a-f]{40}", cik)
    assert csv_body(await api("GET", f"{sns}dev-1")) == f"activated,{rid},batch 7\r\n".encode()
    refused(await Api(bridge)("POST", "/activate", form=form), 409, "activated already")
    log = csv_body(await api("GET", f"{sns}dev-1", params={"show": "log"})).decode().splitlines()
    assert [line.split(",", 1)[1] for line in log] == [
        "127.0.0.1 walk-device/1.0,activated",
        "127.0.0.1 Python/3.11 aiohttp/" + log[1].split("aiohttp/")[1].split(",")[0] + ",activated already "
        "(enable=true issues a new CIK)",
    ]
    assert all(abs(int(line.split(",")[0]) - int(__import__("time").time())) < 60 for line in log)

    # the device collects on the things-gateway with its CIK; the thing is the vendor owner's
    thing_id = f"sn-{model}-dev-1"
    collect = f"{bridge.api}/things/{thing_id}/collect"
    cik_header = {"X-Exosite-CIK": cik, "Content-Type": "text/plain"}
    sent = await call("POST", collect, data=b"21.5", headers=cik_header)
    assert sent.status == 200 and sent.json["result"]["flthingspk"] == thing_id, sent.body
    refused_other = await call(
        "POST", f"{bridge.api}/things/sn-{model}-dev-2/collect", data=b"x", headers=cik_header
    )
    assert refused_other.status == 401, refused_other.body
    poll = await call(
        "GET",
        f"{bridge.api}/things/{thing_id}/messages",
        params={"messagetype": "egress"},
        headers=cik_header,
    )
    assert poll.status == 200 and poll.json["result"] == [], poll.body

    # regenerating the CIK invalidates the old one at once; the next activation gets a new one
    reset(await api("POST", f"{sns}dev-1", form={"enable": "true"}))
    assert (await call("POST", collect, data=b"late", headers=cik_header)).status == 401
    new_cik = (await Api(bridge)("POST", "/activate", form=form)).body.decode()
    assert new_cik != cik
    assert (
        await call("POST", collect, data=b"22", headers={**cik_header, "X-Exosite-CIK": new_cik})
    ).status == 200
    assert (await call("POST", collect, data=b"old", headers=cik_header)).status == 401

    # shares: the other vendor enables and disables, and sees only the serial numbers it enabled
    shared = Api(bridge, other, **{"X-Exosite-Vendor": acme.name})
    refused(await shared("GET", sns), 404, "not found")  # not shared yet
    reset(await api("POST", f"/manage/share/{model}/", form={"vendor": other.name}))
    reset(await api("POST", f"/manage/share/{model}/", form={"vendor": other.name}))  # shared already: done
    assert csv_body(await api("GET", f"/manage/share/{model}/")) == f"{other.name}\r\n".encode()
    share_one = await api("GET", f"/manage/share/{model}/{other.name}")
    assert (share_one.status, share_one.body) == (204, b"")
    assert csv_body(await Api(bridge, other)("GET", "/manage/model/", params={"show": "shared"})) == (
        f"{acme.name},{model}\r\n".encode()
    )
    assert (await shared("GET", sns)).status == 204  # it enabled none yet
    refused(await shared("GET", f"{sns}dev-1"), 404, "not found")  # acme's client
    made = await shared("POST", f"{sns}dev-2", form={"enable": "true", "owner": "d" * 40})
    other_rid = csv_body(made).removesuffix(b"\r\n")
    assert (
        csv_body(await shared("GET", sns)) == b"dev-2," + other_rid + b",\r\n"
    )  # extra hidden through a share
    assert csv_body(await shared("GET", f"{sns}dev-2")) == b"enabled," + other_rid + b",\r\n"
    reset(await shared("POST", f"{sns}dev-2", form={"disable": "true"}))
    assert csv_body(await shared("GET", f"{sns}dev-2")) == b"disabled," + other_rid + b",\r\n"
    refused(await shared("POST", f"{sns}dev-1", form={"disable": "true"}), 404, "not found")
    refused(await shared("POST", sns, form={"sn": "dev-9"}), 403, "shared model")  # owner-only operations
    refused(await shared("DELETE", f"{sns}dev-2"), 403, "shared model")
    refused(await shared("GET", f"/manage/model/{model}"), 403, "shared model")
    assert (
        csv_body(await api("GET", sns, params={"shared": other.name}))
        == b"dev-2," + other_rid + b",batch 7\r\n"
    )
    # the owner still sees them all
    assert csv_body(await api("GET", sns)).count(b"\r\n") == 3

    # unsharing: by form and by DELETE; the other vendor loses access at once
    reset(await api("DELETE", f"/manage/share/{model}/{other.name}"))
    refused(await shared("GET", sns), 404, "not found")
    reset(await api("POST", f"/manage/share/{model}/", form={"vendor": other.name}))
    reset(await api("POST", f"/manage/share/{model}/", form={"vendor": other.name, "delete": "true"}))
    assert (await api("GET", f"/manage/share/{model}/")).status == 204
    refused(await api("POST", f"/manage/share/{model}/", form={"vendor": "nobody"}), 404, "not found")
    refused(await api("POST", f"/manage/share/{model}/", form={"vendor": acme.name}), 400, "own vendor")

    # disabling takes the CIK away; removing the serial number deletes the thing
    reset(await api("POST", f"{sns}dev-1", form={"disable": "true"}))
    assert (
        await call("POST", collect, data=b"x", headers={**cik_header, "X-Exosite-CIK": new_cik})
    ).status == 401
    reset(await api("DELETE", f"{sns}dev-1"))
    assert (await api("GET", f"{sns}dev-1")).status == 404


async def test_remap_moves_the_thing(bridge: Bridge, acme: Vendor) -> None:
    api = Api(bridge, acme)
    model = await new_model(api)
    sns = f"/manage/model/{model}/"
    reset(await api("POST", sns, form=[("sn[]", "old"), ("sn[]", "new")]))
    await api("POST", f"{sns}old", form={"enable": "true", "owner": "e" * 40})
    cik = (
        await Api(bridge)("POST", "/activate", form={"vendor": acme.name, "model": model, "sn": "old"})
    ).body
    reset(await api("POST", f"{sns}new", form={"enable": "true", "oldsn": "old"}))
    collect = f"{bridge.api}/things/sn-{model}-old/collect"
    assert (await call("POST", collect, data=b"x", headers={"X-Exosite-CIK": cik.decode()})).status == 401
    assert (await api("GET", f"{sns}old")).status == 204  # unused now
    again = await Api(bridge)("POST", "/activate", form={"vendor": acme.name, "model": model, "sn": "new"})
    assert again.status == 200
    # the thing keeps its id (and history) under the new serial number
    assert (
        await call("POST", collect, data=b"y", headers={"X-Exosite-CIK": again.body.decode()})
    ).status == 200


async def test_cik_is_the_device_credential_of_every_dialect(bridge: Bridge, acme: Vendor) -> None:
    """Portal and upgrader device operations take the CIK as things-gateway's verifyThing does."""
    api = Api(bridge, acme)
    model = await new_model(api)
    cik = await activated(api, bridge, acme, model, "dev")
    other_cik = await activated(api, bridge, acme, model, "dev-b")
    thing_id = f"sn-{model}-dev"
    own = {"X-Exosite-CIK": cik}

    # portal: the CIK names the device (regId optional), a regId of another device is 403
    config = await call("GET", f"{bridge.http}/GetConfig", headers=own)
    assert config.status == 200 and set(config.json) == {"UpdateRate", "AppParam"}, config.body
    status = await call("POST", f"{bridge.http}/SetStatus", json={"status": "Alive"}, headers=own)
    assert (status.status, status.json) == (200, {"config": "sync"}), status.body
    named = await call("GET", f"{bridge.http}/GetURL", params={"regId": thing_id}, headers=own)
    assert named.status == 200, named.body
    foreign = await call("GET", f"{bridge.http}/GetURL", params={"regId": f"sn-{model}-dev-b"}, headers=own)
    assert foreign.status == 403 and "another device" in foreign.json["error"], foreign.body
    unknown = await call("GET", f"{bridge.http}/GetConfig", headers={"X-Exosite-CIK": "0" * 40})
    assert unknown.status == 401 and unknown.json["error"], unknown.body
    assert (await call("GET", f"{bridge.http}/GetConfig")).status == 400  # neither regId nor credential

    # upgrader: the CIK in place of the token header; another device's path is 403
    upgrade = f"{bridge.http}/Upgrade/v2"
    versions = {"currentVersionNumbers": [{"softwareName": "fw", "currentVersionNumber": "1"}]}
    reported = await call(
        "PUT", f"{upgrade}/devices/{thing_id}/currentVersionNumbers", json=versions, headers=own
    )
    assert reported.status == 202, reported.body
    other_path = f"{upgrade}/devices/sn-{model}-dev-b/currentVersionNumbers"
    assert (await call("PUT", other_path, json=versions, headers=own)).status == 403
    assert (await call("PUT", other_path, json=versions, headers={"X-Exosite-CIK": other_cik})).status == 202

    # regenerating the CIK takes it away from every dialect at once
    reset(await api("POST", f"/manage/model/{model}/dev", form={"enable": "true"}))
    assert (await call("GET", f"{bridge.http}/GetConfig", headers=own)).status == 401
    assert (
        await call("PUT", f"{upgrade}/devices/{thing_id}/currentVersionNumbers", json=versions, headers=own)
    ).status == 401


async def test_csr_with_the_cik_moves_the_device_to_mqtt(
    bridge: Bridge, acme: Vendor, owner: Account, tmp_path: Path
) -> None:
    api = Api(bridge, acme)
    model = await new_model(api)
    cik = await activated(api, bridge, acme, model, "dev")
    thing_id = f"sn-{model}-dev"
    device = Api(bridge, **{"X-Exosite-CIK": cik})
    key = ec.generate_private_key(ec.SECP256R1())

    refused(await Api(bridge)("POST", "/certificate", data=csr_pem(key)), 401, "X-Exosite-CIK")
    refused(await device("POST", "/certificate", data=b"not a csr"), 400, "certificate signing request")
    refused(await device("POST", "/certificate", data=b"\xff\xfe"), 400, "PEM")
    got = await device(
        "POST", "/certificate", data=csr_pem(key), headers={"Content-Type": "application/x-pem-file"}
    )
    assert got.status == 200 and got.headers["Content-Type"] == "application/x-pem-file; charset=utf-8", got
    leaf, ca = x509.load_pem_x509_certificates(got.body)
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == thing_id
    assert ca.public_bytes(serialization.Encoding.PEM) == bridge.ca_file.read_bytes()
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()

    # the same thing over MQTT/TLS: what it collects is in its history, and the CIK still works
    files = device_files(tmp_path / "first", thing_id, key, got.body, bridge.ca_file)
    async with thing_client(bridge, files) as mqtt:
        await mqtt.publish(f"things/{thing_id}/collect", b"from-mqtt", qos=1)
    history = ok(await call("GET", f"{bridge.api}/things/{thing_id}/messages", owner.token))
    assert [(m["message"], m["messagetype"]) for m in history] == [("from-mqtt", "ingress")], history
    assert (await call("GET", f"{bridge.http}/GetConfig", headers={"X-Exosite-CIK": cik})).status == 200

    # a second CSR voids the first certificate: its live session is closed, a new one refused
    key2 = ec.generate_private_key(ec.SECP256R1())
    async with thing_client(bridge, files) as mqtt:
        second = await device("POST", "/certificate", data=csr_pem(key2))
        assert second.status == 200, second
        with pytest.raises(aiomqtt.MqttError):
            async with asyncio.timeout(5):
                async for _ in mqtt.messages:
                    pass
    with pytest.raises(aiomqtt.MqttError):
        async with thing_client(bridge, files):
            pass
    files2 = device_files(tmp_path / "second", thing_id, key2, second.body, bridge.ca_file)
    async with thing_client(bridge, files2):
        pass

    # regenerating the CIK takes the certificate away too, also after the next activation
    reset(await api("POST", f"/manage/model/{model}/dev", form={"enable": "true"}))
    with pytest.raises(aiomqtt.MqttError):
        async with thing_client(bridge, files2):
            pass
    again = await Api(bridge)("POST", "/activate", form={"vendor": acme.name, "model": model, "sn": "dev"})
    assert again.status == 200
    with pytest.raises(aiomqtt.MqttError):
        async with thing_client(bridge, files2):
            pass
    refused(await device("POST", "/certificate", data=csr_pem(key2)), 401, "")  # the old CIK


# ---- content ------------------------------------------------------------------------------------------
async def activated(api: Api, bridge: Bridge, vendor: Vendor, model: str, sn: str) -> str:
    """A serial number of `model` enabled and activated: its device CIK."""
    reset(await api("POST", f"/manage/model/{model}/", form={"sn": sn}))
    csv_body(await api("POST", f"/manage/model/{model}/{sn}", form={"enable": "true", "owner": "e" * 40}))
    got = await Api(bridge)("POST", "/activate", form={"vendor": vendor.name, "model": model, "sn": sn})
    assert got.status == 200, got
    return got.body.decode()


async def test_content_management(bridge: Bridge, acme: Vendor, other: Vendor) -> None:
    api = Api(bridge, acme)
    model = await new_model(api)
    base = f"/manage/content/{model}/"
    reset(await api("POST", f"/manage/model/{model}/", form={"sn": "s1"}))
    assert (await api("GET", base)).status == 204
    reset(await api("POST", base, form={"id": "fw,1", "description": "firmware, v1"}))
    reset(await api("POST", base, form={"id": "secret", "description": "", "protected": "true"}))
    refused(await api("POST", base, form={"id": "fw,1", "description": "again"}), 409, "already exists")
    refused(await api("POST", base, form={"id": "x"}), 400, "description is required")
    refused(await api("POST", base, form={"id": "a/b", "description": ""}), 400, "id must be")
    assert csv_body(await api("GET", base)) == b'"fw,1"\r\nsecret\r\n'
    assert csv_body(await api("GET", base, params={"sn": "s1"})) == b'"fw,1"\r\n'  # not the protected one
    refused(await api("GET", base, params={"sn": "zz"}), 404, "serial number")

    # info before any upload: size 0, the default type; CINFO5 for the vendor, CINFO4 with sn=
    info = csv_body(await api("GET", f"{base}fw,1")).decode()
    kind, size, updated, rest = info.split(",", 3)
    assert (kind, size, rest) == ("application/octet-stream", "0", '"firmware, v1",false\r\n')
    assert abs(int(updated) - int(__import__("time").time())) < 60
    assert csv_body(await api("GET", f"{base}fw,1", params={"sn": "s1"})).endswith(b'"firmware, v1"\r\n')
    refused(await api("GET", f"{base}secret", params={"sn": "s1"}), 404, "not found")  # not authorised
    refused(await api("GET", f"{base}fw,1", params={"download": "true"}), 404, "no blob")

    # upload replaces the blob and its type; download answers it with that type
    up = await api("POST", f"{base}fw,1", data=b"first", headers={"Content-Type": "application/x-fw"})
    reset(up)
    reset(await api("POST", f"{base}fw,1", data=b"v1 bytes", headers={"Content-Type": "text/x-fw; v=1"}))
    got = await api("GET", f"{base}fw,1", params={"download": "true"})
    assert (got.status, got.body, got.headers["Content-Type"]) == (200, b"v1 bytes", "text/x-fw; v=1")
    assert got.headers["ETag"] == '"' + hashlib.sha256(b"v1 bytes").hexdigest() + '"'
    assert got.headers["Accept-Ranges"] == "bytes" and "Last-Modified" in got.headers
    assert csv_body(await api("GET", f"{base}fw,1")).startswith(b"text/x-fw; v=1,8,")
    via_sn = await api("GET", f"{base}fw,1", params={"download": "true", "sn": "s1"})
    assert (via_sn.status, via_sn.body) == (200, b"v1 bytes")
    refused(await api("GET", f"{base}secret", params={"download": "true", "sn": "s1"}), 404, "not found")
    refused(await api("POST", f"{base}nope", data=b"x"), 404, "not found")
    refused(
        await api("POST", f"{base}fw,1", data=b"x", headers={"Content-Type": "\u00e9"}), 400, "content type"
    )

    # an invalid vendor/model pair: 400 on the lists and sn info, 403 on the downloads, 404 elsewhere
    theirs = Api(bridge, other)
    refused(await theirs("GET", base), 400, "not found for this vendor")
    refused(await theirs("GET", base, params={"sn": "s1"}), 400, "not found for this vendor")
    refused(await theirs("GET", f"{base}fw,1", params={"sn": "s1"}), 400, "not found for this vendor")
    refused(await theirs("GET", f"{base}fw,1", params={"download": "true"}), 403, "not found for this vendor")
    refused(
        await theirs("GET", f"{base}fw,1", params={"download": "true", "sn": "s1"}),
        403,
        "not found for this vendor",
    )
    refused(await theirs("GET", f"{base}fw,1"), 404, "not found")
    refused(await theirs("POST", f"{base}fw,1", data=b"x"), 404, "not found")
    refused(await theirs("POST", base, form={"id": "x", "description": ""}), 404, "not found")
    refused(await Api(bridge)("GET", base), 401, "X-Exosite-Token or X-Exosite-CIK")

    # deletes: POST delete=true and DELETE; a missing one is done already
    reset(await api("POST", base, form={"id": "secret", "delete": "true"}))
    reset(await api("DELETE", f"{base}fw,1"))
    reset(await api("DELETE", f"{base}fw,1"))
    assert (await api("GET", base)).status == 204
    refused(await api("GET", f"{base}fw,1"), 404, "not found")


async def test_upload_refused_by_content_length_before_reading(bridge: Bridge, acme: Vendor) -> None:
    """A declared Content-Length past provisioning.max_content_size (256 MiB by default) is answered
    413 without sending the body: the server answers while the client has sent only the headers."""
    api = Api(bridge, acme)
    model = await new_model(api)
    reset(await api("POST", f"/manage/content/{model}/", form={"id": "big", "description": ""}))
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge.ports["http"])
    writer.write(
        f"POST /provision/manage/content/{model}/big HTTP/1.1\r\nHost: x\r\nX-Exosite-Token: {acme.token}\r\n"
        f"Content-Length: {256 * 1024 * 1024 + 1}\r\nConnection: close\r\n\r\n".encode()
    )
    await writer.drain()
    answer = await reader.readuntil(b"\r\n\r\n")  # the head: the server need not close first
    writer.close()
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    length = int(re.search(rb"Content-Length: (\d+)", answer)[1])  # type: ignore[index]
    assert b"max_content_size" in await reader.readexactly(length)


async def test_device_downloads_by_ranges(bridge: Bridge, acme: Vendor, other: Vendor) -> None:
    api = Api(bridge, acme)
    model = await new_model(api)
    base = f"/manage/content/{model}/"
    cik = await activated(api, bridge, acme, model, "dev")
    blob = bytes(range(256)) * 4  # 1024 bytes
    reset(await api("POST", base, form={"id": "fw", "description": "the firmware"}))
    reset(await api("POST", f"{base}fw", data=blob, headers={"Content-Type": "application/x-fw"}))
    reset(await api("POST", base, form={"id": "locked", "description": "", "protected": "true"}))
    reset(await api("POST", f"{base}locked", data=b"private"))
    device = Api(bridge, **{"X-Exosite-CIK": cik})
    pair = {"vendor": acme.name, "model": model}

    assert csv_body(await device("GET", "/download", params=pair)) == b"fw\r\n"
    info = csv_body(await device("GET", "/download", params={**pair, "id": "fw", "info": "true"})).decode()
    assert info.startswith("application/x-fw,1024,") and info.endswith(",the firmware\r\n")
    whole = await device("GET", "/download", params={**pair, "id": "fw"})
    assert (whole.status, whole.body, whole.headers["Content-Type"]) == (200, blob, "application/x-fw")
    etag = whole.headers["ETag"]

    async def ranged(rng: str, **headers: str) -> Any:
        return await device(
            "GET", "/download", params={**pair, "id": "fw"}, headers={"Range": rng, **headers}
        )

    part = await ranged("bytes=0-99")
    assert (part.status, part.body, part.headers["Content-Range"]) == (206, blob[:100], "bytes 0-99/1024")
    tail = await ranged("bytes=1000-")
    assert (tail.status, tail.body, tail.headers["Content-Range"]) == (
        206,
        blob[1000:],
        "bytes 1000-1023/1024",
    )
    last = await ranged("bytes=-24")
    assert (last.status, last.body) == (206, blob[-24:])
    beyond = await ranged("bytes=2000-")
    assert (beyond.status, beyond.headers["Content-Range"]) == (416, "bytes */1024")
    # conditional requests compare the SHA-256 tag: a cached copy is current (304), a write
    # guarded by another tag fails (412), and a weak tag never passes If-Match
    assert etag == f'"{hashlib.sha256(blob).hexdigest()}"'
    cached = await device("GET", "/download", params={**pair, "id": "fw"}, headers={"If-None-Match": etag})
    assert (cached.status, cached.body, cached.headers["ETag"]) == (304, b"", etag)
    other_tag = await device(
        "GET", "/download", params={**pair, "id": "fw"}, headers={"If-None-Match": '"x"'}
    )
    assert (other_tag.status, other_tag.body) == (200, blob)
    for guard, status in ((etag, 206), ('"x"', 412), (f"W/{etag}", 412)):
        assert (await ranged("bytes=0-9", **{"If-Match": guard})).status == status, guard
    # a resume: the same ETag serves the range, a stale one the whole new blob
    assert (await ranged("bytes=100-", **{"If-Range": etag})).body == blob[100:]
    reset(await api("POST", f"{base}fw", data=blob[::-1], headers={"Content-Type": "application/x-fw"}))
    stale = await ranged("bytes=100-", **{"If-Range": etag})
    assert (stale.status, stale.body) == (200, blob[::-1])

    # protected content: absent from the list and 404 as a missing id, for info and blob alike
    refused(await device("GET", "/download", params={**pair, "id": "locked"}), 404, "not found")
    refused(
        await device("GET", "/download", params={**pair, "id": "locked", "info": "true"}), 404, "not found"
    )
    # the pair must be the device's: 403 for the list and the blob, 400 for the information
    wrong = {"vendor": other.name, "model": model}
    refused(await device("GET", "/download", params=wrong), 403, "pair")
    refused(await device("GET", "/download", params={**wrong, "id": "fw"}), 403, "pair")
    refused(await device("GET", "/download", params={**wrong, "id": "fw", "info": "true"}), 400, "pair")
    refused(await Api(bridge)("GET", "/download", params=pair), 401, "X-Exosite-CIK")
    refused(await Api(bridge, **{"X-Exosite-CIK": "0" * 40})("GET", "/download", params=pair), 401, "")
    refused(await device("GET", "/download", params={"vendor": acme.name}), 400, "model")
    # a vendor's credential is no device's
    refused(await Api(bridge, **{"X-Exosite-CIK": acme.cik})("GET", "/download", params=pair), 401, "")


async def test_protected_content_shared_through_groups(bridge: Bridge, acme: Vendor) -> None:
    api = Api(bridge, acme)
    model = await new_model(api)
    cik = await activated(api, bridge, acme, model, "dev")
    reset(
        await api(
            "POST", f"/manage/content/{model}/", form={"id": "locked", "description": "", "protected": "true"}
        )
    )
    reset(await api("POST", f"/manage/content/{model}/locked", data=b"private"))
    device = Api(bridge, **{"X-Exosite-CIK": cik})
    query = {"vendor": acme.name, "model": model, "id": "locked"}
    refused(await device("GET", "/download", params=query), 404, "not found")

    groups = f"/manage/group/{model}/"
    reset(await api("POST", groups, form={"id": "outer", "description": "fleet"}))
    reset(await api("POST", groups, form={"id": "inner", "description": ""}))
    refused(await api("POST", groups, form={"id": "inner", "description": ""}), 409, "already exists")
    refused(await api("POST", groups, form={"id": "x"}), 400, "description is required")
    # the device in the outer group, the content in a group nested in it
    reset(await api("POST", f"{groups}outer/", form={"type": "sn", "id": "dev"}))
    reset(await api("POST", f"{groups}outer/", csv=b"group,inner,0\r\n"))
    reset(await api("POST", f"{groups}inner/", form=[("type", "content"), ("id[]", "locked")]))
    refused(await api("POST", f"{groups}inner/", form={"type": "group", "id": "outer"}), 409, "")
    refused(await api("POST", f"{groups}inner/", form={"type": "thing", "id": "x"}), 400, "member type")
    refused(await api("POST", f"{groups}inner/", form={"type": "sn"}), 400, "either id or id[]")
    got = await device("GET", "/download", params=query)
    assert (got.status, got.body) == (200, b"private")
    assert csv_body(await api("GET", f"/manage/content/{model}/", params={"sn": "dev"})) == b"locked\r\n"
    # an expired membership counts as absent; removing the member or the group takes the content away
    reset(await api("POST", f"{groups}outer/", form={"type": "sn", "id": "dev", "expire": "1"}))
    refused(await device("GET", "/download", params=query), 404, "not found")
    reset(await api("POST", f"{groups}outer/", form={"type": "sn", "id": "dev"}))
    assert (await device("GET", "/download", params=query)).status == 200
    reset(await api("POST", f"{groups}inner/", form={"type": "content", "id": "locked", "delete": "true"}))
    refused(await device("GET", "/download", params=query), 404, "not found")
    reset(await api("POST", f"{groups}inner/", form={"type": "content", "id": "locked"}))
    reset(await api("POST", groups, form={"id": "inner", "delete": "true"}))
    refused(await device("GET", "/download", params=query), 404, "not found")


async def test_group_reads_and_deletes(bridge: Bridge, acme: Vendor, other: Vendor) -> None:
    api = Api(bridge, acme)
    model = await new_model(api)
    groups = f"/manage/group/{model}/"
    assert (await api("GET", groups)).status == 204  # #16: no groups
    for i in range(7):
        reset(await api("POST", groups, form={"id": f"g{i}", "description": f"d,{i}" if i == 1 else ""}))
    # #16: GLIST in creation order, paginated (defaults 0 and 5, the limit clamped to 5..1000)
    assert csv_body(await api("GET", groups)) == b'g0,\r\ng1,"d,1"\r\ng2,\r\ng3,\r\ng4,\r\n'
    assert csv_body(await api("GET", groups, params={"offset": "5", "limit": "1"})) == b"g5,\r\ng6,\r\n"
    assert (await api("GET", groups, params={"offset": "7"})).status == 204
    refused(await api("GET", groups, params={"offset": "x"}), 400, "")
    refused(await Api(bridge, other)("GET", groups), 404, "")

    reset(await api("POST", f"/manage/model/{model}/", form={"sn": "s1"}))
    reset(await api("POST", f"/manage/content/{model}/", form={"id": "s1", "description": ""}))
    reset(
        await api("POST", f"{groups}g0/", csv=b'sn,s1,0\r\ncontent,s1,99999999999,"a,b"\r\ngroup,g1,0,x\r\n')
    )
    reset(await api("POST", f"{groups}g2/", form={"type": "group", "id": "g1", "expire": "1"}))  # expired
    # #19 GINFO (expired members not counted); #20 the groups a group is in
    assert csv_body(await api("GET", f"{groups}g0")) == b",3\r\n"
    assert csv_body(await api("GET", f"{groups}g1")) == b'"d,1",0\r\n'
    assert csv_body(await api("GET", f"{groups}g1", params={"show": "groups"})) == b"g0\r\n"
    assert (await api("GET", f"{groups}g0", params={"show": "groups"})).status == 204
    refused(await api("GET", f"{groups}nope"), 404, "not found")
    refused(await api("GET", f"{groups}nope", params={"show": "groups"}), 404, "not found")
    # #22-#25 MEMBERS: all, by type, by member id, one member
    members = f"{groups}g0/"
    assert csv_body(await api("GET", members)) == (
        b'sn,s1,0,\r\ncontent,s1,99999999999,"a,b"\r\ngroup,g1,0,x\r\n'
    )
    assert csv_body(await api("GET", members, params={"offset": "2"})) == b"group,g1,0,x\r\n"
    assert csv_body(await api("GET", members, params={"type": "group"})) == b"group,g1,0,x\r\n"
    assert csv_body(await api("GET", members, params={"id": "s1"})) == (
        b'sn,s1,0,\r\ncontent,s1,99999999999,"a,b"\r\n'
    )
    assert csv_body(await api("GET", members, params={"type": "sn", "id": "s1"})) == b"sn,s1,0,\r\n"
    assert (await api("GET", members, params={"type": "sn", "id": "s2"})).status == 204
    assert (await api("GET", f"{groups}g2/")).status == 204  # only an expired member
    refused(await api("GET", members, params={"type": "thing"}), 400, "member type")
    refused(await api("GET", f"{groups}nope/"), 404, "not found")
    # #13, #45: the groups a content / a serial number is a direct member of (204: none)
    reset(await api("POST", f"{groups}g3/", form={"type": "sn", "id": "s1"}))
    sn_groups = f"/manage/model/{model}/s1"
    assert csv_body(await api("GET", sn_groups, params={"show": "groups"})) == b"g0\r\ng3\r\n"
    assert csv_body(await api("GET", sn_groups, params={"show": "groups", "offset": "1"})) == b"g3\r\n"
    content_groups = f"/manage/content/{model}/s1"
    assert csv_body(await api("GET", content_groups, params={"show": "groups"})) == b"g0\r\n"
    reset(await api("POST", f"/manage/model/{model}/", form={"sn": "s2"}))
    assert (await api("GET", f"/manage/model/{model}/s2", params={"show": "groups"})).status == 204
    refused(await api("GET", f"/manage/model/{model}/s9", params={"show": "groups"}), 404, "not found")
    refused(await api("GET", f"/manage/content/{model}/c9", params={"show": "groups"}), 404, "not found")
    reset(await api("POST", f"/manage/share/{model}/", form={"vendor": other.name}))
    shared = Api(bridge, other, **{"X-Exosite-Vendor": acme.name})
    refused(await shared("GET", sn_groups, params={"show": "groups"}), 403, "X-Exosite-Vendor")
    # #29 DELETE with <type>,<id> lines; a member not in the group is gone already
    reset(await api("DELETE", members, csv=b"sn,s1\r\ngroup,g6\r\n"))
    assert csv_body(await api("GET", f"{groups}g0/")) == b'content,s1,99999999999,"a,b"\r\ngroup,g1,0,x\r\n'
    refused(await api("DELETE", members, csv=b"thing,s1\r\n"), 400, "member type")
    refused(await api("DELETE", f"{groups}nope/", csv=b"sn,s1\r\n"), 404, "not found")
    # member lists are read whole: bounded by http.max_body (1 MiB), not the import limit
    refused(await api("DELETE", members, csv=b"sn,s1\r\n" * 200_000), 413, "larger than")
    # #21 DELETE: with its memberships; a missing group is deleted already
    reset(await api("DELETE", f"{groups}g1"))
    reset(await api("DELETE", f"{groups}g1"))
    assert csv_body(await api("GET", sn_groups, params={"show": "groups"})) == b"g3\r\n"  # out of g0 by #29
    refused(await api("GET", f"{groups}g1"), 404, "not found")
    assert csv_body(await api("GET", f"{groups}g0")) == b",1\r\n"
