"""Acknowledged means committed: kill -9 the server right after the last PUBACK / HTTP 200 and
every acknowledged message is in the database after a restart."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import aiohttp
import jwt

from tests.conftest import Bridge
from tests.helpers import create_thing, new_user, thing_client, token

N_MQTT = 1500
N_HTTP = 300


def stored(bridge: Bridge, thing_id: str) -> list[bytes]:
    with sqlite3.connect(bridge.db_path) as conn:
        return [
            r[0]
            for r in conn.execute("SELECT payload FROM messages WHERE thing_id = ? ORDER BY seq", (thing_id,))
        ]


def integrity(bridge: Bridge) -> str:
    with sqlite3.connect(bridge.db_path) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


async def test_kill_9_after_last_puback_and_http_200_loses_nothing(
    fresh_bridge: Bridge, tmp_path: Path
) -> None:
    bridge = fresh_bridge
    tok = await token(bridge, *new_user(bridge))
    mqtt_thing = await create_thing(bridge, tok, tmp_path)
    http_thing = await create_thing(bridge, tok, tmp_path)
    claims = {"iss": f"urn:thing:{http_thing.id}", "iat": int(time.time()), "exp": int(time.time()) + 600}
    device_jwt = jwt.encode(
        claims, http_thing.key.read_text(), algorithm="RS256", headers={"kid": http_thing.id}
    )

    async def mqtt_burst() -> int:
        async with thing_client(bridge, mqtt_thing, max_inflight_messages=100, timeout=60) as dev:
            await asyncio.gather(
                *(
                    dev.publish(f"things/{mqtt_thing.id}/collect", f"m{i}".encode(), qos=1)
                    for i in range(N_MQTT)
                )
            )
        return N_MQTT  # every publish above returned: its PUBACK arrived

    async def http_burst() -> int:
        headers = {"Authorization": f"Bearer {device_jwt}", "Content-Type": "text/plain"}
        async with aiohttp.ClientSession(headers=headers) as s:

            async def one(i: int) -> None:
                async with s.post(f"{bridge.api}/things/{http_thing.id}/collect", data=f"h{i}") as r:
                    assert r.status == 200, await r.text()

            await asyncio.gather(*(one(i) for i in range(N_HTTP)))
        return N_HTTP

    acked_mqtt, acked_http = await asyncio.gather(mqtt_burst(), http_burst())
    bridge.kill()  # SIGKILL, right after the last acknowledgement

    assert integrity(bridge) == "ok"
    mqtt_rows = stored(bridge, mqtt_thing.id)
    http_rows = stored(bridge, http_thing.id)
    assert sorted(mqtt_rows) == sorted(f"m{i}".encode() for i in range(acked_mqtt))
    assert sorted(http_rows) == sorted(f"h{i}".encode() for i in range(acked_http))
    # MQTT 3.1.1 keeps one client's messages in order on a topic
    assert mqtt_rows == [f"m{i}".encode() for i in range(acked_mqtt)]

    bridge.start()  # and the restarted bridge serves the same history
    async with (
        aiohttp.ClientSession(headers={"Authorization": tok}) as s,
        s.get(f"{bridge.api}/things/{mqtt_thing.id}/messages", params={"messagetype": "ingress"}) as r,
    ):
        assert r.status == 200
        records = (await r.json())["result"]
    assert [rec["message"] for rec in records] == [f"m{i}" for i in range(acked_mqtt)]
