"""Provisioning by serial number in-process: the core with a real Store on a temporary SQLite file
and a real data directory (no server, no mocks), the clock injected. Vendors and their hashed
credentials; models; serial numbers one by one and by a streamed CSV import (RFC 4180, one
transaction, the document's 409); the client lifecycle with expiry; activation making a thing of
the vendor's owner in its plan and a CIK that is a device credential until it is regenerated,
remapped, disabled or deleted. The `vendor` commands through the real `python -m bridge`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bridge import config as bridge_config
from bridge.core.accounts import User
from bridge.core.errors import Conflict, Invalid, NotFound, Revoked, Unauthorized
from bridge.core.provisioning import Provisioning
from bridge.core.provisioning.common import Page, Vendor, csv_batches, secret_hash
from bridge.core.provisioning.serials import Model, SerialInfo, SerialNumber
from bridge.core.service import Core
from bridge.store import Store
from bridge.store import create as create_store
from tests.conftest import write_config

DAY = 24 * 3600


@dataclass
class Clock:
    t: float = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class World:
    core: Core
    prov: Provisioning
    clock: Clock

    async def user(self, name: str, things: int = 10) -> User:
        await self.core.accounts.create_user(name, "vendor-owner-password")
        await self.core.accounts.set_plan(name, things)
        return await self.core.accounts.user_by_name(name)

    async def vendor(self, name: str, things: int = 10) -> Vendor:
        return (await self.prov.vendors.add(name, await self.user(f"{name}-owner", things))).vendor


@contextlib.asynccontextmanager
async def open_world(tmp_path: Path, store_url: str = "sqlite:", **settings: int) -> AsyncIterator[World]:
    """`settings`: provisioning settings other than the defaults."""
    cfg = bridge_config.load(write_config(tmp_path, store={"url": store_url}))
    store = create_store(cfg.store.url, cfg.db_path, "OFF")
    store.open()
    core = Core(cfg, store)
    clock = Clock()
    provisioning = dataclasses.replace(cfg.provisioning, **settings)
    prov = Provisioning(store, core.things, core.outbox, provisioning, free_plan_things=10, clock=clock)
    try:
        yield World(core, prov, clock)
    finally:
        await asyncio.to_thread(store.close)


@pytest.fixture
async def world(tmp_path: Path, store_url: str) -> AsyncIterator[World]:
    async with open_world(tmp_path, store_url) as opened:
        yield opened


async def body(data: bytes, size: int = 7) -> AsyncIterator[bytes]:
    """A request body as the HTTP layer streams it, in chunks that split lines and characters."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


# ---- vendors --------------------------------------------------------------------------------------
async def test_vendor_credentials_are_hashed_checked_and_revocable(world: World) -> None:
    owner = await world.user("acme-owner")
    new = await world.prov.vendors.add("acme", owner)
    assert re.fullmatch(r"[0-9a-f]{40}", new.cik) and len(new.token) >= 40
    stored = await world.core.store.read(lambda c: c.execute("SELECT * FROM vendors").fetchone())
    assert new.token not in str(dict(stored)) and new.cik not in str(dict(stored))
    assert stored["token_hash"] == secret_hash(new.token) and stored["cik_hash"] == secret_hash(new.cik)

    vendors = world.prov.vendors
    assert await vendors.authenticate(token=new.token) == new.vendor
    assert await vendors.authenticate(cik=new.cik) == new.vendor
    assert await vendors.authenticate(token="", cik=new.cik) == new.vendor  # an empty header is absent
    for bad in ({}, {"token": new.cik}, {"cik": new.token}, {"token": "x" * 300}):
        with pytest.raises(Unauthorized):
            await vendors.authenticate(**bad)
    with pytest.raises(Conflict):
        await vendors.add("acme", owner)
    with pytest.raises(Invalid):
        await vendors.add("bad name", owner)

    await vendors.revoke("acme")
    for credential in ({"token": new.token}, {"cik": new.cik}):
        with pytest.raises(Unauthorized):
            await vendors.authenticate(**credential)
    [record] = await vendors.list()
    assert (record.name, record.owner) == ("acme", "acme-owner") and record.revoked is not None
    with pytest.raises(NotFound):
        await vendors.revoke("nobody")


# ---- models ---------------------------------------------------------------------------------------
async def test_models_crud_options_and_tenancy(world: World) -> None:
    acme, other = await world.vendor("acme"), await world.vendor("other")
    serials = world.prov.serials
    rid = "a" * 40
    assert await serials.create_model(acme, "m1", rid, ["noaliases", "nohistorical"]) == Model(
        "m1", rid, ("noaliases", "nohistorical")
    )
    await serials.create_model(acme, "m0", rid)
    await serials.create_model(other, "m1", rid)  # names are per vendor
    with pytest.raises(Conflict):
        await serials.create_model(acme, "m1", rid)
    for bad in (("m/2", rid, []), ("m2", "", []), ("m2", rid, ["nosuch"]), ("", rid, [])):
        with pytest.raises(Invalid):
            await serials.create_model(acme, *bad)
    assert await serials.list_models(acme) == ["m0", "m1"]
    assert await serials.model(acme, "m1") == Model("m1", rid, ("noaliases", "nohistorical"))
    await serials.update_model(acme, "m1", "b" * 40, ["nocomments"])
    assert await serials.model(acme, "m1") == Model("m1", "b" * 40, ("nocomments",))
    assert (await serials.model(other, "m1")).rid == rid  # untouched
    await serials.delete_model(acme, "m0")
    await serials.delete_model(acme, "m0")  # gone already: done
    assert await serials.list_models(acme) == ["m1"]
    with pytest.raises(NotFound):
        await serials.model(acme, "m0")
    with pytest.raises(NotFound):
        await serials.update_model(acme, "m0", rid)


# ---- serial numbers -------------------------------------------------------------------------------
def test_csv_parsing_and_pages_follow_the_document() -> None:
    async def records(data: bytes, size: int) -> list[list[str]]:
        return [r async for batch in csv_batches(body(data, size), (1, 2)) for r in batch]

    data = b'a,1\r\n"b,2","x ""quoted""\r\nwith a line break"\r\n\r\nc\nd,\n'
    expected = [["a", "1"], ["b,2", 'x "quoted"\r\nwith a line break'], ["c"], ["d", ""]]
    for size in (1, 2, 5, len(data)):
        assert asyncio.run(records(data, size)) == expected
    assert asyncio.run(records("é,ü\n".encode(), 1)) == [["é", "ü"]]  # a character split in two
    for bad in (b"a,b,c\n", b'"open\n', b"\xff\n"):
        with pytest.raises(Invalid):
            asyncio.run(records(bad, 3))

    assert Page.parse() == Page(0, 5)
    assert Page.parse("10", "2") == Page(10, 5) and Page.parse(limit="5000") == Page(0, 1000)
    for bad in ({"offset": "-1"}, {"limit": "x"}, {"offset": "1.5"}):
        with pytest.raises(Invalid):
            Page.parse(**bad)


async def test_serial_numbers_one_many_csv_and_conflicts(world: World) -> None:
    acme = await world.vendor("acme")
    serials = world.prov.serials
    await serials.create_model(acme, "m", "r" * 40)
    assert await serials.add_serials(acme, "m", [("sn1", "first")]) == 1
    assert await serials.add_serials(acme, "m", [("sn2", ""), ("sn3", "")]) == 2
    with pytest.raises(Conflict, match="sn2"):
        await serials.add_serials(acme, "m", [("sn4", ""), ("sn2", "")])  # all or none
    csv_body = b'sn4,"a, b"\r\nsn5,"say ""hi"""\r\nsn6\r\n'
    assert await serials.import_csv(acme, "m", body(csv_body)) == 3
    page = await serials.list_serials(acme, "m", Page(0, 1000))
    assert page == [
        SerialNumber("sn1", "", "first"),
        SerialNumber("sn2", "", ""),
        SerialNumber("sn3", "", ""),
        SerialNumber("sn4", "", "a, b"),
        SerialNumber("sn5", "", 'say "hi"'),
        SerialNumber("sn6", "", ""),
    ]
    assert [s.sn for s in await serials.list_serials(acme, "m", Page(2, 5))] == ["sn3", "sn4", "sn5", "sn6"]

    # A duplicate anywhere (enrolled, or twice in the body, across chunks) refuses the whole import.
    for dup in (b"x1\nsn3\n", b"x1\nx2\nx1\n"):
        with pytest.raises(Conflict, match=r"x1|sn3"):
            await serials.import_csv(acme, "m", body(dup))
    assert len(await serials.list_serials(acme, "m", Page(0, 1000))) == 6
    with pytest.raises(Invalid):
        await serials.import_csv(acme, "m", body(b"bad/sn,\n"))

    await serials.remove_serials(acme, "m", ["sn1", "missing"])
    await serials.remove_csv(acme, "m", body(b"sn2\r\nsn3\r\n"))
    assert [s.sn for s in await serials.list_serials(acme, "m", Page(0, 1000))] == ["sn4", "sn5", "sn6"]
    other = await world.vendor("other")
    with pytest.raises(NotFound):
        await serials.add_serials(other, "m", [("z", "")])  # another vendor's model


async def test_csv_import_of_100000_serial_numbers_is_one_fast_transaction(world: World) -> None:
    acme = await world.vendor("acme")
    await world.prov.serials.create_model(acme, "m", "r" * 40)
    count = 100_000
    data = "".join(f"SN{i:08d},batch 7\r\n" for i in range(count)).encode()
    started = time.perf_counter()
    assert await world.prov.serials.import_csv(acme, "m", body(data, 64 * 1024)) == count
    elapsed = time.perf_counter() - started
    print(f"\nCSV import: {count} serial numbers in {elapsed:.2f} s = {count / elapsed:,.0f}/s")
    # A duplicate at the very end leaves nothing of the 100,000 before it.
    await world.prov.serials.create_model(acme, "n", "r" * 40)
    with pytest.raises(Conflict, match="SN00000000"):
        await world.prov.serials.import_csv(acme, "n", body(data + b"SN00000000,again\r\n", 64 * 1024))
    assert await world.prov.serials.list_serials(acme, "n", Page()) == []


# ---- the client lifecycle and activation ----------------------------------------------------------
async def activate(world: World, sn: str, vendor: str = "acme", model: str = "m") -> str:
    return await world.prov.serials.activate(vendor, model, sn, remote="192.0.2.7", agent="fw/1.0")


async def test_lifecycle_activation_and_the_cik_as_device_credential(world: World) -> None:
    acme = await world.vendor("acme", things=2)
    serials, things = world.prov.serials, world.core.things
    await serials.create_model(acme, "m", "r" * 40)
    await serials.add_serials(acme, "m", [("sn1", "x"), ("sn2", ""), ("sn3", ""), ("sn4", "")])

    assert await serials.info(acme, "m", "sn1") is None  # unused
    with pytest.raises(Conflict, match="no client"):
        await activate(world, "sn1")
    with pytest.raises(NotFound):
        await activate(world, "nosuch")
    with pytest.raises(NotFound):
        await activate(world, "sn1", vendor="nobody")

    rid = await serials.make_client(acme, "m", "sn1", "o" * 40)
    assert re.fullmatch(r"[0-9a-f]{40}", rid)
    assert await serials.info(acme, "m", "sn1") == SerialInfo("enabled", rid, "x")
    assert (await serials.list_serials(acme, "m", Page()))[0] == SerialNumber("sn1", rid, "x")
    with pytest.raises(Conflict):
        await serials.make_client(acme, "m", "sn1", "o" * 40)

    # The enable period expires (24 h by default): activation refused, until enabled again.
    world.clock.t += DAY
    assert (await serials.info(acme, "m", "sn1")).status == "expired"
    with pytest.raises(Conflict, match="expired"):
        await activate(world, "sn1")
    await serials.regenerate(acme, "m", "sn1")

    owner = await world.core.accounts.user_by_name("acme-owner")
    cik = await activate(world, "sn1")
    assert re.fullmatch(r"[0-9a-f]{40}", cik)
    assert (await serials.info(acme, "m", "sn1")).status == "activated"
    identity = await serials.identify_cik(cik)
    assert identity.thing_id == "sn-m-sn1" and identity.owner_id == owner.id
    thing = await things.get(owner, "sn-m-sn1")  # a thing of the vendor's owner, in its plan
    assert thing.enabled and thing.name == "sn1"
    assert (await world.core.accounts.active_policy(owner)).statements[0].actual == 1
    stored = await world.core.store.read(lambda c: c.execute("SELECT * FROM sn_clients").fetchone())
    assert stored["cik_hash"] == secret_hash(cik) and cik not in str(dict(stored))
    await world.core.messages.collect(identity, b'{"t": 1}', transport="http")

    with pytest.raises(Conflict, match="activated already"):  # the second activation: 409
        await activate(world, "sn1")
    log = await serials.log(acme, "m", "sn1")
    assert [(e.remote, e.agent) for e in log] == [("192.0.2.7", "fw/1.0")] * 4
    assert [e.entry for e in log][1:3] == [log[1].entry, "activated"] and "expired" in log[1].entry

    # Regenerating the CIK: the old one fails at once, the identity it gave is gone, its writes
    # are refused; the next activation gives a new CIK to the same thing.
    before = things.revocations
    await serials.regenerate(acme, "m", "sn1")
    with pytest.raises(Unauthorized):
        await serials.identify_cik(cik)
    assert await things.standing(identity, before) == "disabled"
    with pytest.raises(Revoked):
        await world.core.messages.collect(identity, b"{}", transport="http")
    assert (await serials.info(acme, "m", "sn1")).status == "enabled"
    cik2 = await activate(world, "sn1")
    identity2 = await serials.identify_cik(cik2)
    assert cik2 != cik and identity2.thing_id == identity.thing_id and identity2.cert_id != identity.cert_id
    assert await things.standing(identity, before) == "gone"  # the old CIK's incarnation
    with pytest.raises(Unauthorized):
        await serials.identify_cik(cik)

    # Disable: CIK refused, thing disabled; activation refused until enabled again.
    await serials.disable(acme, "m", "sn1")
    assert (await serials.info(acme, "m", "sn1")).status == "disabled"
    assert not (await things.get(owner, "sn-m-sn1")).enabled
    with pytest.raises(Unauthorized):
        await serials.identify_cik(cik2)
    with pytest.raises(Conflict, match="disabled"):
        await activate(world, "sn1")

    # Remap: the client (rid, thing, history) moves to sn2, which must be activated; sn1 is unused.
    await serials.remap(acme, "m", "sn2", "sn1")
    assert await serials.info(acme, "m", "sn1") is None
    assert await serials.info(acme, "m", "sn2") == SerialInfo("enabled", rid, "")
    cik3 = await activate(world, "sn2")
    assert (await serials.identify_cik(cik3)).thing_id == "sn-m-sn1"  # its id is for life
    with pytest.raises(Conflict):
        await serials.remap(acme, "m", "sn2", "sn3")  # sn3 has no client to move

    # The plan: 2 things. sn3 becomes the second; sn4 cannot get a client (the document's 409).
    await serials.make_client(acme, "m", "sn3", "o" * 40)
    await activate(world, "sn3")
    with pytest.raises(Conflict, match="not sufficient"):
        await serials.make_client(acme, "m", "sn4", "o" * 40)

    # Deleting the serial number deletes its thing (sessions closed, history gone).
    identity3 = await serials.identify_cik(cik3)
    before = things.revocations
    await serials.remove_serials(acme, "m", ["sn2"])
    assert await things.standing(identity3, before) == "gone"
    with pytest.raises(NotFound):
        await things.get(owner, "sn-m-sn1")
    with pytest.raises(Unauthorized):
        await serials.identify_cik(cik3)

    # The owner deleting the thing leaves its serial number unused (the link cascades).
    await things.delete(owner, "sn-m-sn3")
    assert await serials.info(acme, "m", "sn3") is None
    # Deleting the model deletes the things its serial numbers became.
    await serials.make_client(acme, "m", "sn4", "o" * 40)
    await activate(world, "sn4")
    await serials.delete_model(acme, "m")
    assert await things.list(owner) == []


async def test_thing_ids_stay_unique_and_short(world: World) -> None:
    acme, other = await world.vendor("acme"), await world.vendor("other")
    serials = world.prov.serials
    long_sn, odd_sn = "S" * 70, "sn with spaces"
    for vendor in (acme, other):
        await serials.create_model(vendor, "m", "r" * 40)
        await serials.add_serials(vendor, "m", [("sn1", ""), (long_sn, ""), (odd_sn, "")])
    found = []
    for vendor in (acme, other):
        for sn in ("sn1", long_sn, odd_sn):
            await serials.make_client(vendor, "m", sn, "o" * 40)
            found.append((await serials.identify_cik(await activate(world, sn, vendor.name))).thing_id)
    assert found[0] == "sn-m-sn1" and found[3] != found[0]  # the same model and sn at another vendor
    assert len(set(found)) == 6 and all(len(t) <= 64 and re.fullmatch(r"sn-[\w.-]+", t) for t in found)


async def test_cik_format_is_checked_before_any_lookup(world: World) -> None:
    for bad in ("", "x" * 40, "A" * 40, "0" * 39):
        with pytest.raises(Unauthorized):
            await world.prov.serials.identify_cik(bad)


# ---- the command line -----------------------------------------------------------------------------
def thingbridge(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_vendor_commands(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    cfg = bridge_config.load(config)

    async def install() -> None:  # what `serve` creates: database, secret, CA; and a user
        store = Store(cfg.db_path)
        store.open()
        try:
            await Core(cfg, store).accounts.create_user("alice", "alice-password-1")
        finally:
            await asyncio.to_thread(store.close)

    asyncio.run(install())
    added = thingbridge(config, "vendor", "add", "acme", "--owner", "alice")
    assert added.returncode == 0, added.stderr
    token = re.search(r"X-Exosite-Token: (\S+)", added.stdout)
    cik = re.search(r"X-Exosite-CIK: ([0-9a-f]{40})\n", added.stdout)
    assert token and cik
    assert thingbridge(config, "vendor", "add", "acme", "--owner", "alice").returncode == 1  # taken
    assert thingbridge(config, "vendor", "add", "b", "--owner", "nobody").returncode == 1
    listed = thingbridge(config, "vendor", "list").stdout.splitlines()
    assert listed[1].split()[:2] == ["acme", "alice"] and listed[1].endswith(" -")

    async def check(expect_valid: bool) -> None:
        store = Store(cfg.db_path)
        store.open()
        try:
            vendors = Core(cfg, store).provisioning.vendors
            for credential in ({"token": token.group(1)}, {"cik": cik.group(1)}):
                if expect_valid:
                    assert (await vendors.authenticate(**credential)).name == "acme"
                else:
                    with pytest.raises(Unauthorized):
                        await vendors.authenticate(**credential)
        finally:
            await asyncio.to_thread(store.close)

    asyncio.run(check(True))
    revoked = thingbridge(config, "vendor", "revoke", "acme")
    assert revoked.returncode == 0 and token.group(1) not in revoked.stdout + revoked.stderr
    asyncio.run(check(False))
    assert not thingbridge(config, "vendor", "list").stdout.splitlines()[1].endswith(" -")
    assert thingbridge(config, "vendor", "revoke", "nobody").returncode == 1


# ---- shares ---------------------------------------------------------------------------------------
async def test_a_shared_vendor_enables_and_disables_but_sees_only_its_own(world: World) -> None:
    acme, partner, stranger = (
        await world.vendor("acme"),
        await world.vendor("partner"),
        await world.vendor("x"),
    )
    serials, shares = world.prov.serials, world.prov.shares
    await serials.create_model(acme, "m", "r" * 40)
    await serials.add_serials(acme, "m", [("own", "secret extra"), ("p1", "extra"), ("p2", "")])
    await serials.make_client(acme, "m", "own", "o" * 40)
    with pytest.raises(NotFound):  # not shared yet
        await serials.make_client(partner, "m", "p1", "o" * 40, as_vendor="acme")

    assert await shares.list(acme, "m") == []
    await shares.add(acme, "m", "partner")
    await shares.add(acme, "m", "partner")  # again: done already
    assert await shares.list(acme, "m") == ["partner"]
    assert await shares.shared_with(acme, "m", "partner") and not await shares.shared_with(acme, "m", "x")
    assert await serials.list_shared_models(partner) == [("acme", "m")]
    with pytest.raises(Invalid):
        await shares.add(acme, "m", "acme")
    with pytest.raises(NotFound):
        await shares.add(acme, "m", "nobody")
    with pytest.raises(NotFound):
        await shares.list(partner, "m")  # the share is acme's to manage

    # Enable, disable, re-enable: allowed, on the serial numbers it enabled; the thing is acme's owner's.
    shared = {"as_vendor": "acme"}
    rid = await serials.make_client(partner, "m", "p1", "o" * 40, **shared)
    cik = await activate(world, "p1")
    assert (await serials.identify_cik(cik)).owner_id == acme.owner_id
    await serials.disable(partner, "m", "p1", **shared)
    await serials.regenerate(partner, "m", "p1", **shared)
    assert await serials.info(partner, "m", "p1", **shared) == SerialInfo("enabled", rid, "")  # no extra
    assert await serials.list_serials(partner, "m", Page(), **shared) == [SerialNumber("p1", rid, "")]
    assert [s.sn for s in await serials.list_serials(acme, "m", Page(), enabled_by="partner")] == ["p1"]
    assert len(await serials.log(partner, "m", "p1", **shared)) == 1
    for call in (  # acme's own serial number does not exist for the partner
        serials.info(partner, "m", "own", **shared),
        serials.disable(partner, "m", "own", **shared),
        serials.regenerate(partner, "m", "own", **shared),
        serials.log(partner, "m", "own", **shared),
    ):
        with pytest.raises(NotFound):
            await call
    # Nothing else: the owner's operations take no X-Exosite-Vendor, and the partner has no "m".
    with pytest.raises(NotFound):
        await serials.add_serials(partner, "m", [("p9", "")])
    with pytest.raises(NotFound):
        await serials.remove_serials(partner, "m", ["p1"])
    with pytest.raises(NotFound):
        await serials.make_client(stranger, "m", "p2", "o" * 40, **shared)

    await shares.remove(acme, "m", "partner")
    await shares.remove(acme, "m", "partner")  # gone already: done
    with pytest.raises(NotFound):
        await serials.info(partner, "m", "p1", **shared)
    assert (await serials.info(acme, "m", "p1")).status == "enabled"  # stays, out of its reach
