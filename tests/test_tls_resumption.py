"""TLS session resumption on the MQTT TLS listener (issue #14): a device resumes with the session
ticket of its previous connection, and a resumed session is still checked at CONNECT, so a thing
disabled since its ticket was issued is refused like any other connection."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import aiohttp

from tests import mqttraw
from tests.conftest import Bridge
from tests.helpers import create_thing, new_user, token

DISCONNECT = b"\xe0\x00"


def _connect(port: int, ctx: ssl.SSLContext, client_id: str, session: ssl.SSLSession | None) -> tuple:
    """One connection: TLS (offering `session`), CONNECT, CONNACK, DISCONNECT. (CONNACK return code,
    whether the server resumed the session, the session with its new ticket)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls,
    ):
        tls.sendall(mqttraw.connect(client_id))
        connack = b""
        while len(connack) < 4:  # the ticket arrives before it, in the same reads
            chunk = tls.recv(4 - len(connack))
            if not chunk:
                break
            connack += chunk
        code = connack[3] if len(connack) == 4 else None
        if code == 0:
            tls.sendall(DISCONNECT)
        return code, tls.session_reused, tls.session


async def test_a_device_resumes_and_is_still_checked_at_connect(bridge: Bridge, tmp_path: Path) -> None:
    tok = await token(bridge, *new_user(bridge))
    thing = await create_thing(bridge, tok, tmp_path, keyType="EC")
    ctx = bridge.client_tls(thing.cert, thing.key)
    port = bridge.ports["mqtt_tls"]

    code, reused, session = await asyncio.to_thread(_connect, port, ctx, thing.id, None)
    assert (code, reused) == (0, False) and session.has_ticket
    code, reused, session = await asyncio.to_thread(_connect, port, ctx, thing.id, session)
    assert (code, reused) == (0, True)  # resumed, and accepted

    async with (
        aiohttp.ClientSession(headers={"Authorization": tok}) as s,
        s.patch(f"{bridge.api}/things/{thing.id}", json={"enabled": False}) as r,
    ):
        assert r.status == 200
    code, reused, _ = await asyncio.to_thread(_connect, port, ctx, thing.id, session)
    assert (code, reused) == (5, True)  # the TLS session resumed; the CONNECT is refused
