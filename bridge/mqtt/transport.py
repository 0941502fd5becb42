"""The MQTT listeners' sockets, on either event loop (asyncio's own or uvloop): a guard between each
socket transport and its protocol (the stream, or the TLS layer) keeps what a peer sent before the
connection failed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from asyncio import sslproto
from collections.abc import Awaitable, Callable
from typing import Any

OnStream = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
STREAM_LIMIT = 64 * 1024  # asyncio.start_server's default
TLS_HANDSHAKE_TIMEOUT = 10


class _Guard(asyncio.BaseProtocol):
    """Passes everything to the protocol it stands in front of; only on a failed connection it
    first reads what the kernel still holds for the socket (see keep_unread_input)."""

    def __init__(self, inner: Any, transport: asyncio.BaseTransport | None = None) -> None:
        self.inner, self.transport = inner, transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.inner.connection_made(transport)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            with contextlib.suppress(Exception):
                self._feed_unread()
        self.inner.connection_lost(exc)

    def _feed_unread(self) -> None:
        # Both loops call connection_lost before they close the socket: it is still readable.
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        fd = sock.fileno() if sock is not None else -1
        if fd < 0 or os.get_blocking(fd):
            return
        with contextlib.suppress(OSError):
            while data := os.read(fd, 65536):
                if isinstance(self, _BufferedGuard):
                    view = memoryview(data)
                    while view:
                        buffer = self.inner.get_buffer(len(view))
                        n = min(len(buffer), len(view))
                        buffer[:n] = view[:n]
                        self.inner.buffer_updated(n)
                        view = view[n:]
                else:
                    self.inner.data_received(data)


class _StreamGuard(_Guard, asyncio.Protocol):
    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)


class _BufferedGuard(_Guard, asyncio.BufferedProtocol):
    """The guard of a TLS layer (a buffered protocol on both loops; uvloop takes a protocol for a
    buffered one only when it is no asyncio.Protocol)."""

    def get_buffer(self, sizehint: int) -> Any:
        return self.inner.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.inner.buffer_updated(nbytes)


def keep_unread_input(raw: asyncio.BaseTransport) -> None:
    """An event loop stops reading a socket at the first failed write and drops what the peer sent
    that was not read yet. A client that acknowledges its last message, sends DISCONNECT and resets
    the connection (it leaves with our later packets unread, so its kernel sends RST; mosquitto_sub
    -C does this) made our next write fail, and its PUBACK was lost: the acknowledged message was
    re-sent on every reconnect. The kernel still holds those bytes: the guard put in front of the
    socket transport `raw`'s protocol reads them before the connection is reported lost."""
    protocol = raw.get_protocol()  # type: ignore[attr-defined]
    # uvloop's TLS layer is buffered without subclassing asyncio.BufferedProtocol
    guard = _BufferedGuard if hasattr(protocol, "get_buffer") else _StreamGuard
    raw.set_protocol(guard(protocol, raw))  # type: ignore[attr-defined]


def _tls_protocol(ctx: ssl.SSLContext, on_stream: OnStream) -> asyncio.BaseProtocol:
    """What a loop's create_server(ssl=ctx) puts on a new connection, its TLS layer (the loop's own
    class: uvloop has one of its own), made here so that its guard stands in front of it from the
    first byte; the handshake done, the layer hands the stream to `on_stream`."""
    loop = asyncio.get_running_loop()
    tls_layer: Any = sslproto.SSLProtocol
    if type(loop).__module__.startswith("uvloop"):
        import uvloop.loop

        tls_layer = uvloop.loop.SSLProtocol
    app = asyncio.StreamReaderProtocol(asyncio.StreamReader(STREAM_LIMIT), on_stream)
    layer = tls_layer(loop, app, ctx, None, server_side=True, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
    return _BufferedGuard(layer)


async def listen(host: str, port: int, ctx: ssl.SSLContext | None, on_stream: OnStream) -> asyncio.Server:
    """A listener whose every connection is handed to `on_stream(reader, writer)` (over TLS when
    `ctx` is given), its socket guarded by keep_unread_input."""
    if ctx is None:

        async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            keep_unread_input(writer.transport)
            await on_stream(reader, writer)

        return await asyncio.start_server(plain, host, port, limit=STREAM_LIMIT)
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _tls_protocol(ctx, on_stream), host, port)
