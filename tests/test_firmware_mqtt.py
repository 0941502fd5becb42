"""Firmware over MQTT against the real `thingbridge serve` process, and the device walk of issue
#13: the vendor's owner uploads v1 and v2, two devices activate, one downloads v1 by HTTP ranges
(resuming once with If-Range) and confirms it; a staged rollout of v2 reaches it in the second wave,
which the retained `firmware/target` announces; it pulls v2 over MQTT chunk by chunk, loses power
in the middle, resumes from the offset it had after reconnecting, checks the SHA-256 and confirms
with `firmware/switched`. Bad requests are answered on `.../rejected`; a thing sees only its own
firmware topics."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest

from bridge.core.rollouts import wave_order
from tests import mqttraw
from tests.conftest import Bridge, on_each_store
from tests.helpers import (
    Account,
    Product,
    ThingFiles,
    account,
    call,
    certified_device,
    create_thing,
    firmware_product,
    thing_client,
    unique,
)

V1, V2 = os.urandom(60_000), os.urandom(100_000)
CHUNK = 16_384


@pytest.fixture(scope="module")
def owner(bridge: Bridge) -> Account:
    return account(bridge)


def answer(resp: Any, status: int = 200) -> Any:
    assert resp.status == status, (resp.status, resp.body)
    return resp.json


async def upload(
    bridge: Bridge, product: Product, number: str, day: int, blob: bytes, profiles: list[str]
) -> None:
    path = f"{bridge.http}/fw/v1/manage/products/{product.id}/versions/{number}"
    body = {"releaseDate": f"2025-03-0{day}T00:00:00Z", "status": "REQUIRED", "rolloutProfiles": profiles}
    answer(await call("PUT", path, product.owner.token, json=body), 201)
    answer(await call("PUT", path + "/firmware", product.owner.token, data=blob))


async def enrol_and_activate(bridge: Bridge, product: Product, *serials: str) -> list[dict[str, str]]:
    csv = "".join(f"{sn}\n" for sn in serials).encode()
    url = f"{bridge.http}/fw/v1/manage/products/{product.id}/serials"
    answer(await call("POST", url, product.owner.token, data=csv, headers={"Content-Type": "text/csv"}))
    return [
        answer(await call("POST", f"{bridge.http}/fw/v1/activate", json={"serialNumber": sn}))
        for sn in serials
    ]


async def until(
    client: aiomqtt.Client, topic: str, check: Any = lambda doc: True, timeout: float = 10
) -> Any:
    """The first message on `topic` whose JSON passes `check` (earlier ones are skipped)."""
    async with asyncio.timeout(timeout):
        async for message in client.messages:
            if message.topic.value == topic:
                doc = orjson.loads(message.payload) if message.payload else None
                if doc is not None and check(doc):
                    return doc
    raise AssertionError(f"nothing on {topic}")


async def get_chunk(
    client: aiomqtt.Client, thing: str, version: str, offset: int, length: int = CHUNK
) -> bytes:
    request = {"version": version, "offset": offset, "length": length}
    await client.publish(f"things/{thing}/firmware/get", orjson.dumps(request), qos=1)
    async with asyncio.timeout(10):
        async for message in client.messages:
            if message.topic.value == f"things/{thing}/firmware/chunk/{offset}":
                return bytes(message.payload)
            assert message.topic.value != f"things/{thing}/firmware/get/rejected", message.payload
    raise AssertionError("no chunk")


class RawDevice:
    """A minimal MQTT client over TLS (what a microcontroller runs): QoS 0, one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, thing: str) -> None:
        self.reader, self.writer, self.thing = reader, writer, thing

    @classmethod
    async def connect(cls, bridge: Bridge, files: ThingFiles, client_id: str) -> RawDevice:
        tls = bridge.client_tls(files.cert, files.key)
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.ports["mqtt_tls"], ssl=tls)
        device = cls(reader, writer, files.id)
        writer.write(mqttraw.connect(client_id))
        assert await device.packet() == (2, b"\x00\x00")  # CONNACK, accepted
        writer.write(mqttraw.subscribe(f"things/{files.id}/firmware/chunk/+", qos=0))
        assert await device.packet() == (9, b"\x00\x01\x00")  # SUBACK, QoS 0 granted
        return device

    async def packet(self) -> tuple[int, bytes]:
        kind, _, body = await asyncio.wait_for(mqttraw.read_packet(self.reader), 10)
        return kind, body

    async def chunk(self, version: str, offset: int) -> bytes:
        request = {"version": version, "offset": offset, "length": CHUNK}
        self.writer.write(mqttraw.publish(f"things/{self.thing}/firmware/get", orjson.dumps(request)))
        kind, body = await self.packet()
        assert kind == 3, (kind, body)
        topic, _, payload, _ = mqttraw.parse_publish(0, body)
        assert topic == f"things/{self.thing}/firmware/chunk/{offset}", topic
        return payload

    def cut(self) -> None:
        self.writer.transport.abort()


@on_each_store()
async def test_device_walk(bridge: Bridge, owner: Account, tmp_path: Path) -> None:
    product = await firmware_product(bridge, owner)
    api, tok = f"{bridge.http}", owner.token
    profile, account_id = unique("fwprofile"), unique("fwaccount")
    answer(await call("POST", f"{api}/v2/rolloutProfile", tok, json={"id": profile}), 201)
    await upload(bridge, product, "1.0", 1, V1, [profile])
    await upload(bridge, product, "2.0", 2, V2, [profile])

    # two devices; the walker is the one a 50/100 rollout reaches in its second wave
    peer_sn = unique("PEER-")
    walker_sn = next(
        sn
        for sn in (unique("WALK-") for _ in range(64))
        if wave_order([f"sn-{product.model}-{sn}", f"sn-{product.model}-{peer_sn}"])[1].endswith(sn)
    )
    walker, peer = await enrol_and_activate(bridge, product, walker_sn, peer_sn)
    thing, key = walker["thingId"], walker["apiKey"]
    devices = [{"id": walker["thingId"], "type": "fw"}, {"id": peer["thingId"], "type": "fw"}]
    put = await call(
        "PUT", f"{api}/v2/rolloutProfile/{profile}/accounts/{account_id}", tok, json={"devices": devices}
    )
    assert put.status in (200, 201), put.body
    rollout = {
        "softwareName": product.software,
        "versionNumber": "2.0",
        "rolloutProfileId": profile,
        "waves": [50, 100],
        "errorThreshold": 0.5,
        "waveTimeout": 3600,
    }
    # the walker, with a certificate for its own key (got with its API key), watches its target
    files = await certified_device(bridge, tmp_path / "walker", thing, key)
    flows = ("firmware/target", "firmware/chunk/+", "firmware/get/rejected", "firmware/switched/+")
    target_topic = f"things/{thing}/firmware/target"
    async with thing_client(bridge, files, clean_session=True) as client:
        for flow in flows:
            await client.subscribe(f"things/{thing}/{flow}", qos=1)
        assert (await until(client, target_topic))["targetVersion"] == "2.0"  # no rollout yet
        rollout_id = answer(await call("POST", f"{api}/v2/rollouts", tok, json=rollout), 201)["id"]
        # held back by the rollout from now on: the retained target says so at once
        held = await until(client, target_topic, lambda d: d["targetVersion"] == "1.0")
        assert held["currentVersion"] is None

        # HTTP: the walker downloads v1 by ranges, resuming once, and confirms it
        device = {"X-ApiKey": key}
        target = answer(await call("GET", f"{api}/fw/v1/things/{thing}/target", headers=device))
        assert target == held and target["size"] == len(V1)
        url = api + target["firmwareUrl"]
        first = await call("GET", url, headers={**device, "Range": "bytes=0-24999"})
        assert first.status == 206
        etag = first.headers["ETag"]
        rest = await call(
            "GET", url, headers={**device, "Range": f"bytes={len(first.body)}-", "If-Range": etag}
        )
        assert rest.status == 206 and rest.headers["Content-Range"] == f"bytes 25000-{len(V1) - 1}/{len(V1)}"
        image = first.body + rest.body
        assert hashlib.sha256(image).hexdigest() == target["sha256"] == etag.strip('"')
        done = answer(
            await call("PUT", f"{api}/fw/v1/things/{thing}/version", headers=device, json={"version": "1.0"})
        )
        assert done == {"thingId": thing, "currentVersion": "1.0"}
        held = await until(client, f"things/{thing}/firmware/target", lambda d: d["currentVersion"] == "1.0")
        assert held["targetVersion"] == "1.0"
        # the first wave (the peer) confirms v2: the second wave is released, the target re-sent
        peer_key = {"X-ApiKey": peer["apiKey"]}
        answer(
            await call(
                "PUT",
                f"{api}/fw/v1/things/{peer['thingId']}/version",
                headers=peer_key,
                json={"version": "2.0"},
            )
        )
        offered = await until(
            client, f"things/{thing}/firmware/target", lambda d: d["targetVersion"] == "2.0"
        )
        assert offered == {
            **offered,
            "currentVersion": "1.0",
            "size": len(V2),
            "sha256": hashlib.sha256(V2).hexdigest(),
        }

    # a device with a few KiB of RAM and a minimal MQTT client pulls v2 chunk by chunk; after two
    # chunks its power is cut (the connection drops without a DISCONNECT) and it resumes from the
    # offset it had stored, on a new connection
    received = bytearray()
    for chunks in (2, None):
        ota = await RawDevice.connect(bridge, files, f"{thing}:ota")
        try:
            while len(received) < offered["size"] and (chunks is None or chunks > 0):
                received += await ota.chunk("2.0", len(received))
                chunks = None if chunks is None else chunks - 1
        finally:
            ota.cut()
        if chunks == 0:
            assert len(received) == 2 * CHUNK
    assert hashlib.sha256(received).hexdigest() == offered["sha256"]

    async with thing_client(bridge, files, clean_session=True) as client:
        for flow in flows:
            await client.subscribe(f"things/{thing}/{flow}", qos=1)
        await client.publish(f"things/{thing}/firmware/switched", orjson.dumps({"version": "2.0"}), qos=1)
        accepted = await until(client, f"things/{thing}/firmware/switched/accepted")
        assert accepted == {"thingId": thing, "currentVersion": "2.0"}
        final = await until(client, f"things/{thing}/firmware/target", lambda d: d["currentVersion"] == "2.0")
        assert final["targetVersion"] == "2.0"

    # both confirmations are upgrade results (one per transport); the rollout completed
    results = answer(await call("GET", f"{api}/v2/devices/{thing}/upgradeResults", tok))["upgradeResultList"]
    assert [(r["versionNumber"], r["status"], r["transport"]) for r in results] == [
        ("1.0", "SUCCESS", "http"),
        ("2.0", "SUCCESS", "mqtt"),
    ]
    state = answer(await call("GET", f"{api}/v2/rollouts/{rollout_id}", tok))
    assert (state["state"], state["counts"]["succeeded"]) == ("completed", 2)


async def test_rejected_requests_and_topic_rules(bridge: Bridge, owner: Account, tmp_path: Path) -> None:
    product = await firmware_product(bridge, owner)
    await upload(bridge, product, "1.0", 1, V1, [])
    (device,) = await enrol_and_activate(bridge, product, unique("MQ-"))
    thing = device["thingId"]
    files = await certified_device(bridge, tmp_path / "device", thing, device["apiKey"])
    plain = await create_thing(bridge, owner.token, tmp_path, keyType="EC")

    async with thing_client(bridge, files, clean_session=True) as client:
        await client.subscribe(f"things/{thing}/firmware/#", qos=1)
        get = f"things/{thing}/firmware/get"
        rejected = f"things/{thing}/firmware/get/rejected"
        for body, code, text in (
            (b"{", 400, "JSON"),
            (orjson.dumps({"version": "1.0", "offset": -1}), 400, "offset"),
            (orjson.dumps({"version": "1.0", "offset": len(V1)}), 400, "past the end"),
            (orjson.dumps({"version": "1.0", "offset": 0, "colour": 1}), 400, "colour"),
            (orjson.dumps({"version": "9.9", "offset": 0}), 404, "not found"),
        ):
            await client.publish(get, body, qos=1)
            refusal = await until(client, rejected)
            assert refusal["errorCode"] == code and text in refusal["errorMessage"], refusal
        # a length beyond the cap gets the cap; the last chunk what is left
        assert await get_chunk(client, thing, "1.0", 0, 10**6) == V1[: 32 * 1024]
        assert await get_chunk(client, thing, "1.0", len(V1) - 10, 100) == V1[-10:]

        await client.publish(f"things/{thing}/firmware/switched", orjson.dumps({"version": "9.9"}), qos=1)
        refusal = await until(client, f"things/{thing}/firmware/switched/rejected")
        assert refusal["errorCode"] == 404
        await client.publish(f"things/{thing}/firmware/switched", orjson.dumps({"v": "1.0"}), qos=1)
        assert (await until(client, f"things/{thing}/firmware/switched/rejected"))["errorCode"] == 400

        # a thing may not publish the cloud's firmware topics: nothing reaches its own subscription
        await client.publish(f"things/{thing}/firmware/target", b'{"targetVersion": "forged"}', qos=1)
        await client.publish(f"things/{thing}/firmware/chunk/0", b"forged", qos=1)
        await client.publish(get, orjson.dumps({"version": "1.0", "offset": 5, "length": 1}), qos=1)
        async with asyncio.timeout(10):
            async for message in client.messages:
                assert b"forged" not in message.payload, message.topic
                if message.topic.value.endswith("/firmware/chunk/5"):
                    break

    # another thing sees none of these topics; a thing of no product is refused
    async with thing_client(bridge, plain, clean_session=True) as other:
        granted = await other.subscribe(f"things/{thing}/firmware/target", qos=1)
        assert list(granted) == [128] or granted[0] == 128, granted  # type: ignore[index]
        await other.subscribe(f"things/{plain.id}/firmware/get/rejected", qos=1)
        await other.publish(
            f"things/{plain.id}/firmware/get", orjson.dumps({"version": "1.0", "offset": 0}), qos=1
        )
        refusal = await until(other, f"things/{plain.id}/firmware/get/rejected")
        assert refusal["errorCode"] == 403 and "no firmware product" in refusal["errorMessage"]


async def test_a_new_activation_voids_the_certificate(bridge: Bridge, owner: Account, tmp_path: Path) -> None:
    product = await firmware_product(bridge, owner)
    sn = unique("MQ-")
    (device,) = await enrol_and_activate(bridge, product, sn)
    files = await certified_device(bridge, tmp_path / "device", device["thingId"], device["apiKey"])
    async with thing_client(bridge, files, clean_session=True) as client:
        await client.subscribe(f"things/{device['thingId']}/firmware/target", qos=1)
        assert (await until(client, f"things/{device['thingId']}/firmware/target"))["thingId"] == device[
            "thingId"
        ]
        again = answer(await call("POST", f"{bridge.http}/fw/v1/activate", json={"serialNumber": sn}))
        assert again["thingId"] == device["thingId"]
        with pytest.raises(aiomqtt.MqttError):  # its session is closed at once
            async with asyncio.timeout(10):
                async for _ in client.messages:
                    pass
    with pytest.raises(aiomqtt.MqttError):  # and the certificate is refused (CONNACK 5)
        async with thing_client(bridge, files, clean_session=True):
            pass


async def test_the_target_follows_account_moves(bridge: Bridge, owner: Account, tmp_path: Path) -> None:
    """1.0 targets the profile, 2.0 none: in the profile's account the thing is offered 1.0, in no
    account every version (2.0); each move re-sends the retained target, and so does a version
    added or deleted through the upgrader's own routes."""
    product = await firmware_product(bridge, owner)
    profile, account_id = unique("fwprofile"), unique("fwaccount")
    answer(await call("POST", f"{bridge.http}/v2/rolloutProfile", owner.token, json={"id": profile}), 201)
    await upload(bridge, product, "1.0", 1, V1, [profile])
    await upload(bridge, product, "2.0", 2, V2, [])
    (device,) = await enrol_and_activate(bridge, product, unique("MOVE-"))
    thing = device["thingId"]
    files = await certified_device(bridge, tmp_path / "device", thing, device["apiKey"])
    account = f"{bridge.http}/v2/rolloutProfile/{profile}/accounts/{account_id}"
    target = f"things/{thing}/firmware/target"
    async with thing_client(bridge, files, clean_session=True) as client:
        await client.subscribe(target, qos=1)
        assert (await until(client, target))["targetVersion"] == "2.0"
        answer(
            await call(
                "PUT",
                f"{account}/devices/add",
                owner.token,
                json={"deviceList": [{"id": thing, "type": "fw"}]},
            )
        )
        await until(client, target, lambda d: d["targetVersion"] == "1.0")
        answer(await call("PUT", f"{account}/devices/remove", owner.token, json={"deviceIdList": [thing]}))
        await until(client, target, lambda d: d["targetVersion"] == "2.0")
        assert (
            await call("PUT", account, owner.token, json={"devices": [{"id": thing, "type": "fw"}]})
        ).status == 200
        await until(client, target, lambda d: d["targetVersion"] == "1.0")
        answer(await call("DELETE", account, owner.token))
        await until(client, target, lambda d: d["targetVersion"] == "2.0")
        # versions changed through the upgrader's own routes re-send it too (3.0: no firmware yet)
        version = f"{bridge.http}/v2/software/{product.software}/versions/3.0"
        body = {
            "releaseDate": "2025-03-03T00:00:00Z",
            "status": "OK",
            "downloadUrl": "https://cdn.example/3.0",
        }
        answer(await call("PUT", version, owner.token, json=body))  # created: matchedCount 0
        newer = await until(client, target, lambda d: d["targetVersion"] == "3.0")
        assert (newer["size"], newer["sha256"], newer["firmwareUrl"]) == (None, None, None)
        answer(await call("DELETE", version, owner.token))
        await until(client, target, lambda d: d["targetVersion"] == "2.0")
        # its firmware replaced through provisioning's content route: the size and SHA-256 follow
        patched = os.urandom(1000)
        resp = await call(
            "POST",
            f"{bridge.http}/provision/manage/content/{product.model}/fw-2.0",
            headers={"X-Exosite-Token": product.vendor_token, "Content-Type": "application/octet-stream"},
            data=patched,
        )
        assert resp.status == 205, resp.body
        replaced = await until(client, target, lambda d: d["sha256"] == hashlib.sha256(patched).hexdigest())
        assert replaced["size"] == len(patched)

    # the software deleted through the upgrader's route takes the product with it: the thing is of
    # no product, its retained target is gone (as when the product is deleted)
    assert (await call("DELETE", f"{bridge.http}/v2/software/{product.software}", owner.token)).status == 200
    async with thing_client(bridge, files, clean_session=True) as client:
        await client.subscribe(target, qos=1)
        await client.subscribe(f"things/{thing}/status/accepted", qos=1)
        await client.publish(f"things/{thing}/status", b'{"status": "ok"}', qos=1)  # answered after
        async with asyncio.timeout(10):
            async for message in client.messages:
                assert message.topic.value != target, message.payload
                if message.topic.value.endswith("/status/accepted"):
                    break
