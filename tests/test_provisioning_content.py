"""Provisioning content and groups in-process: a real Store and real blob files in a temporary data
directory, no mocks, the clock injected. Streamed uploads (written as they arrive, refused as soon
as they pass the bound), replace and blob clean-up (a blob two entities share survives the
deletion of one), groups (typed members, nesting, cycles refused, expiry), and what a device may download (its model's unprotected content, protected
content only through a shared group, its own vendor and model only)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge.core.errors import Conflict, Forbidden, Invalid, NotFound, TooLarge, Unauthorized
from bridge.core.provisioning.common import Page, Vendor
from bridge.core.provisioning.content import ContentInfo
from bridge.core.provisioning.groups import GroupInfo, Member
from tests.test_provisioning_core import World, activate, body, open_world

MAX = 4 * 1024 * 1024 + 5  # the configured bound of these tests: a few MiB


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with open_world(tmp_path, max_content_size=MAX) as opened:
        yield opened


def blobs(world: World) -> list[str]:
    """The blob files on disk (temporary files included: none may be left behind)."""
    folder = world.prov.blobs.folder
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


async def model_with_content(world: World) -> Vendor:
    acme = await world.vendor("acme")
    await world.prov.serials.create_model(acme, "m", "r" * 40)
    await world.prov.content.create(acme, "m", "fw", "firmware, v1")
    return acme


async def test_upload_streams_into_a_file_as_chunks_arrive(world: World) -> None:
    acme = await model_with_content(world)
    content, folder = world.prov.content, world.prov.blobs.folder
    chunk, count = 16 * 1024 - 3, 256  # 4 MiB in odd-sized chunks
    digest, on_disk = hashlib.sha256(), []

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(count):
            # Before chunk i is handed over, the temporary file holds exactly chunks 0..i-1: the
            # upload writes each chunk as it arrives and keeps none of the body in memory.
            temps = list(folder.glob(".upload-*"))
            on_disk.append(sum(p.stat().st_size for p in temps))
            data = bytes([i]) * chunk
            digest.update(data)
            yield data

    world.clock.t += 100
    await content.upload(acme, "m", "fw", "application/x-firmware", chunks())
    assert on_disk == [i * chunk for i in range(count)]
    sha = digest.hexdigest()
    assert blobs(world) == [sha]
    info = await content.info(acme, "m", "fw")
    assert info == ContentInfo(
        "fw", "application/x-firmware", chunk * count, int(world.clock.t), "firmware, v1", False
    )
    download = await content.download(acme, "m", "fw")
    assert (download.content_type, download.size, download.etag) == (
        "application/x-firmware",
        chunk * count,
        sha,
    )
    assert download.updated == int(world.clock.t) and download.path == folder / sha
    assert hashlib.sha256(download.path.read_bytes()).hexdigest() == sha


async def test_the_size_bound_refuses_at_once_and_leaves_nothing(world: World) -> None:
    acme = await model_with_content(world)
    content = world.prov.content
    pulled = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal pulled
        while True:
            pulled += 1
            yield b"x" * (1024 * 1024)

    with pytest.raises(TooLarge):
        await content.upload(acme, "m", "fw", "application/octet-stream", endless())
    assert pulled == 5  # the fifth MiB passes the bound: no further chunk is read
    assert blobs(world) == []
    assert (await content.info(acme, "m", "fw")).size == 0
    with pytest.raises(NotFound, match="no blob"):
        await content.download(acme, "m", "fw")
    # exactly at the bound is allowed
    await content.upload(acme, "m", "fw", "application/octet-stream", body(b"y" * MAX, 1024 * 1024))
    assert (await content.info(acme, "m", "fw")).size == MAX


async def test_entities_crud_replace_and_blob_clean_up(world: World) -> None:
    acme = await model_with_content(world)
    content = world.prov.content
    await content.create(acme, "m", "cfg", "", protected=True)
    with pytest.raises(Conflict):
        await content.create(acme, "m", "fw", "again")
    with pytest.raises(Invalid):
        await content.create(acme, "m", "a/b", "")
    with pytest.raises(NotFound):
        await content.create(acme, "nosuch", "x", "")
    with pytest.raises(NotFound):
        await content.upload(acme, "m", "nosuch", "text/plain", body(b"never read"))
    with pytest.raises(Invalid):
        await content.upload(acme, "m", "fw", "text/plain\r\nX-Injected: 1", body(b"x"))
    assert await content.list(acme, "m") == ["fw", "cfg"]
    assert (await content.info(acme, "m", "cfg")).protected

    one, two = b"first blob", b"second blob"
    sha1, sha2 = hashlib.sha256(one).hexdigest(), hashlib.sha256(two).hexdigest()
    await content.upload(acme, "m", "fw", "text/plain", body(one))
    await content.upload(acme, "m", "cfg", "text/plain", body(one))  # the same bytes: one file
    assert blobs(world) == [sha1]
    await content.upload(acme, "m", "fw", "text/plain", body(two))  # replaces fw's blob only
    assert blobs(world) == sorted([sha1, sha2])
    assert (await content.download(acme, "m", "fw")).etag == sha2
    await content.upload(acme, "m", "fw", "text/plain", body(one))  # shared again; sha2 unused
    assert blobs(world) == [sha1]
    await content.delete(acme, "m", "fw")  # cfg still points to sha1: it stays
    assert blobs(world) == [sha1]
    assert (await content.download(acme, "m", "cfg")).path.read_bytes() == one
    await content.delete(acme, "m", "fw")  # done already
    await content.delete(acme, "m", "cfg")
    assert blobs(world) == [] and await content.list(acme, "m") == []

    # deleting the model releases its blobs, except those another model's content shares
    await world.prov.serials.create_model(acme, "n", "r" * 40)
    for model in ("m", "n"):
        await content.create(acme, model, "fw", "")
        await content.upload(acme, model, "fw", "text/plain", body(one))
    await content.create(acme, "m", "only-m", "")
    await content.upload(acme, "m", "only-m", "text/plain", body(two))
    await world.prov.serials.delete_model(acme, "m")
    assert blobs(world) == [sha1]


async def test_a_device_downloads_its_models_content_only(world: World) -> None:
    acme = await model_with_content(world)
    serials, content = world.prov.serials, world.prov.content
    await content.create(acme, "m", "secret", "", protected=True)
    await content.upload(acme, "m", "fw", "application/x-firmware", body(b"fw-bytes"))
    await content.upload(acme, "m", "secret", "text/plain", body(b"secret-bytes"))
    await serials.add_serials(acme, "m", [("sn1", "")])
    await serials.make_client(acme, "m", "sn1", "o" * 40)
    cik = await activate(world, "sn1")
    await serials.create_model(acme, "other", "r" * 40)
    other = await world.vendor("other")
    await serials.create_model(other, "m", "r" * 40)

    assert await content.device_content(cik, "acme", "m") == ["fw"]  # protected: no shared group
    assert await content.authorized(acme, "m", "sn1") == ["fw"]
    download = await content.device_download(cik, "acme", "m", "fw")
    assert download.path.read_bytes() == b"fw-bytes" and download.content_type == "application/x-firmware"
    assert (await content.device_info(cik, "acme", "m", "fw")).size == len(b"fw-bytes")
    for missing in ("secret", "nosuch"):  # not allowed and missing look the same
        with pytest.raises(NotFound):
            await content.device_download(cik, "acme", "m", missing)
        with pytest.raises(NotFound):
            await content.info(acme, "m", missing, sn="sn1")
    for vendor, model in (("acme", "other"), ("other", "m"), ("nobody", "m"), ("acme", "nosuch")):
        with pytest.raises(Forbidden):
            await content.device_content(cik, vendor, model)
        with pytest.raises(Forbidden):
            await content.device_download(cik, vendor, model, "fw")
    with pytest.raises(Unauthorized):
        await content.device_content("0" * 40, "acme", "m")
    with pytest.raises(NotFound):
        await content.authorized(acme, "m", "nosuch")


# ---- groups ---------------------------------------------------------------------------------------
async def test_groups_members_nesting_cycles_and_expiry(world: World) -> None:
    acme = await model_with_content(world)
    groups, now = world.prov.groups, int(world.clock.t)
    await world.prov.serials.add_serials(acme, "m", [("sn1", ""), ("sn2", "")])
    for group in ("a", "b", "c"):
        await groups.create(acme, "m", group, f"group {group}")
    with pytest.raises(Conflict):
        await groups.create(acme, "m", "a", "again")
    assert await groups.list(acme, "m", Page(0, 5)) == [("a", "group a"), ("b", "group b"), ("c", "group c")]
    assert await groups.list(acme, "m", Page(2, 5)) == [("c", "group c")]

    await groups.add(acme, "m", "a", "sn", ["sn1", "sn2"], 0, "line 1")
    await groups.add(acme, "m", "a", "sn", ["sn2"], now + 60, "until soon")  # an update
    csv = b'content,fw,0,"firmware, pinned"\r\ngroup,b,0\r\n'
    await groups.add_csv(acme, "m", "a", body(csv))
    await groups.add(acme, "m", "b", "group", ["c"], 0, "")
    assert await groups.members(acme, "m", "a", Page()) == [
        Member("sn", "sn1", 0, "line 1"),
        Member("sn", "sn2", now + 60, "until soon"),
        Member("content", "fw", 0, "firmware, pinned"),
        Member("group", "b", 0, ""),
    ]
    assert await groups.members(acme, "m", "a", Page(), type="sn", id="sn2") == [
        Member("sn", "sn2", now + 60, "until soon")
    ]
    assert await groups.info(acme, "m", "a") == GroupInfo("group a", 4)
    assert await groups.groups_of(acme, "m", "sn", "sn2", Page()) == ["a"]
    assert await groups.groups_of(acme, "m", "group", "c", Page()) == ["b"]
    assert await groups.groups_of(acme, "m", "content", "fw", Page()) == ["a"]

    # cycles are refused, directly and through nesting; nothing of the request is kept
    for inner, outer in (("a", "a"), ("a", "b"), ("a", "c")):
        with pytest.raises(Conflict, match="cycle"):
            await groups.add(acme, "m", outer, "group", [inner], 0, "")
    with pytest.raises(Conflict):
        await groups.add_csv(acme, "m", "c", body(b"sn,sn1,0,x\r\ngroup,a,0,x\r\n"))
    assert await groups.members(acme, "m", "c", Page()) == []
    with pytest.raises(NotFound):
        await groups.add(acme, "m", "a", "sn", ["nosuch"], 0, "")
    with pytest.raises(Invalid):
        await groups.add(acme, "m", "a", "thing", ["sn1"], 0, "")

    # an expired member counts as absent
    world.clock.t = now + 60
    assert await groups.groups_of(acme, "m", "sn", "sn2", Page()) == []
    assert await groups.info(acme, "m", "a") == GroupInfo("group a", 3)

    await groups.remove(acme, "m", "a", "sn", ["sn1", "nosuch"])
    await groups.remove_csv(acme, "m", "a", body(b"content,fw\r\ngroup,b\r\n"))
    assert await groups.members(acme, "m", "a", Page()) == []
    await groups.delete(acme, "m", "b")
    assert await groups.groups_of(acme, "m", "group", "c", Page()) == []
    await groups.delete(acme, "m", "b")  # done already


async def test_protected_content_through_nested_groups(world: World) -> None:
    acme = await model_with_content(world)
    serials, content, groups = world.prov.serials, world.prov.content, world.prov.groups
    await serials.add_serials(acme, "m", [("sn1", ""), ("sn2", "")])
    await serials.make_client(acme, "m", "sn1", "o" * 40)
    cik = await activate(world, "sn1")
    await content.create(acme, "m", "secret", "", protected=True)
    await content.upload(acme, "m", "secret", "text/plain", body(b"secret-bytes"))
    for group in ("fleet", "line", "beta"):
        await groups.create(acme, "m", group, "")

    # sn1 in `line`, nested in `fleet`, which holds `beta`, which holds the content
    await groups.add(acme, "m", "line", "sn", ["sn1"], 0, "")
    await groups.add(acme, "m", "fleet", "group", ["line", "beta"], 0, "")
    await groups.add(acme, "m", "beta", "content", ["secret"], 0, "")
    assert await content.device_content(cik, "acme", "m") == ["fw", "secret"]
    assert (await content.device_download(cik, "acme", "m", "secret")).path.read_bytes() == b"secret-bytes"
    assert await content.authorized(acme, "m", "sn2") == ["fw"]
    assert (await content.info(acme, "m", "secret", sn="sn1")).protected

    # the nesting expires: the shared group is gone
    await groups.add(acme, "m", "fleet", "group", ["beta"], int(world.clock.t) + 10, "")
    world.clock.t += 10
    assert await content.device_content(cik, "acme", "m") == ["fw"]
    with pytest.raises(NotFound):
        await content.device_download(cik, "acme", "m", "secret")
