"""The byte streams under amqtt's protocol handler: a reader that bounds what a packet may make it
wait for and read (size, time) and hands the hot packets to codec; a writer that coalesces a loop
turn's writes and can be cut; the keepalive (D) as one timer per connection."""

from __future__ import annotations

import asyncio
from typing import Any

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter

from bridge.mqtt import codec


class MalformedPacket(ConnectionError):
    """Raised for a packet that did not parse; the reader loop then ends the connection."""


class Keepalive:
    """D: a client that sends nothing for its keepalive (1.5 x what it announced) is cut. One timer
    per connection that looks at how long the reader loop has been waiting (`waiting`: since
    when, None while it handles a packet), instead of a timeout (a timer, a task lookup) around
    each read; when it has waited that long, the loop's deadline expires (TimeoutError)."""

    __slots__ = ("_deadline", "_loop", "_seconds", "_timer", "waiting")

    def __init__(self, deadline: asyncio.Timeout, seconds: float) -> None:
        self._deadline, self._seconds = deadline, seconds
        self._loop = asyncio.get_running_loop()
        self.waiting: float | None = None
        self._timer = self._loop.call_later(seconds, self._check)

    def _check(self) -> None:
        now, since = self._loop.time(), self.waiting
        if since is not None and now - since >= self._seconds:
            self._deadline.reschedule(now)
        else:
            self._timer = self._loop.call_at((now if since is None else since) + self._seconds, self._check)

    def cancel(self) -> None:
        self._timer.cancel()


class CappedReader(StreamReaderAdapter):
    """amqtt reads a packet body with one readexactly(n), n up to 256 MiB, and with no time limit
    (its keepalive covers only the fixed header). Refuse a large n up front, and a body that does
    not arrive within `body_timeout` (1.5 x keepalive once the session is known, else 60 s)."""

    def __init__(self, reader: asyncio.StreamReader, max_read: int, body_timeout: float = 60) -> None:
        super().__init__(reader)
        self.max_read = max_read
        self.body_timeout = body_timeout

    def take_hot(self) -> tuple[int, Any] | None:
        """The next packet when codec decodes it from what is buffered (PUBLISH at QoS 0/1, PUBACK,
        PINGREQ): (type, packet); else None, and the stock parser reads it."""
        try:
            hot = codec.take(self._reader._buffer, self.max_read)  # type: ignore[attr-defined]
        except codec.Malformed as exc:
            raise MalformedPacket(str(exc)) from exc
        if hot is not None:
            self._reader._maybe_resume_transport()  # type: ignore[attr-defined]
        return hot

    def empty(self) -> bool:
        reader = self._reader
        return not reader._buffer and not reader.at_eof() and reader.exception() is None

    async def wait_for_data(self) -> None:
        """Until bytes arrive (or the stream ends): the reader loop then tries take_hot first, so
        the first packet of each read is not parsed the stock way, byte by byte."""
        await self._reader._wait_for_data("read")  # type: ignore[attr-defined]

    def take_connect(self) -> codec.Connect | None:
        """The CONNECT when it is buffered whole already (as it mostly is, in the TLS record after
        the handshake's), without a read to await or a timer; else None."""
        try:
            connect = codec.take_connect(self._reader._buffer, self.max_read)  # type: ignore[attr-defined]
        except codec.Malformed as exc:
            raise MalformedPacket(f"malformed CONNECT: {exc}") from exc
        if connect is not None:
            self._reader._maybe_resume_transport()  # type: ignore[attr-defined]
        return connect

    async def read_connect(self) -> codec.Connect:
        """The first packet, which must be a CONNECT, read whole (up to `max_read`) and decoded."""
        reader = self._reader
        try:
            while (header := codec.connect_header(reader._buffer)) is None:  # type: ignore[attr-defined]
                if reader.at_eof() or reader.exception() is not None:
                    raise MalformedPacket("the connection ended within its CONNECT")
                await self.wait_for_data()
            length, size = header
            del reader._buffer[:size]  # type: ignore[attr-defined]
            return codec.Connect(await self.read(length) if length else b"")
        except asyncio.IncompleteReadError:
            raise MalformedPacket("the connection ended within its CONNECT") from None
        except codec.Malformed as exc:
            raise MalformedPacket(f"malformed CONNECT: {exc}") from exc

    async def read(self, n: int = -1) -> bytes:
        if n > self.max_read:
            # Not ConnectionResetError: amqtt turns that into NoDataError and reads on.
            raise MalformedPacket(f"MQTT packet of {n} bytes exceeds the limit of {self.max_read}")
        reader = self._reader
        if 0 < n <= len(reader._buffer):
            # Served from the buffer, with no timer (the common case: a TLS record holds whole
            # packets), and even when the connection has failed since: a write to a client that
            # left sets the error on the reader too, and readexactly would then drop the PUBACK
            # and DISCONNECT the client sent before it left.
            data = bytes(reader._buffer[:n])
            del reader._buffer[:n]
            reader._maybe_resume_transport()
            return data
        # n <= 1: the fixed header, read byte by byte, is bounded by the reader loop's keepalive.
        if n <= 1:
            return await super().read(n)
        try:
            async with asyncio.timeout(self.body_timeout):
                return await super().read(n)
        except TimeoutError:
            raise MalformedPacket(f"no complete packet within {self.body_timeout:.0f} s") from None


class BridgeWriter(StreamWriterAdapter):
    """A writer that can be cut: stock close() waits in drain(), forever for a peer that does not
    read, and so do the writes queued behind it. Writes are coalesced: the packets written during
    one turn of the event loop go out in one transport write at its end (one TLS record, one
    send(); stock sent each packet on its own, a third of the loop's time under QoS 1 load)."""

    FLUSH_AT = 64 * 1024  # bytes held before a turn ends at most

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        super().__init__(writer)
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if self.is_closed:
            return
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes >= self.FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        if self._held:
            data = b"".join(self._held) if len(self._held) > 1 else self._held[0]
            self._held.clear()
            self._held_bytes = 0
            if not self._writer.transport.is_closing():
                self._writer.write(data)

    def peercert(self) -> dict[str, Any] | None:
        return self._writer.get_extra_info("peercert")  # type: ignore[no-any-return]

    def abort(self) -> None:
        self._held.clear()
        self._writer.transport.abort()

    def unsent(self) -> int:
        """Bytes written and not sent yet (held for this turn, or in the transport's buffer)."""
        return self._held_bytes + self._writer.transport.get_write_buffer_size()

    async def drain(self) -> None:
        if self._writer.transport.is_closing():
            raise ConnectionResetError("connection closed")
        await super().drain()

    async def close(self) -> None:
        """Stock's close (drain, close, wait until closed), cut after 5 s: by a timer, not by
        asyncio.timeout (a task lookup and three getpid() calls per connection; issue #14)."""
        self.flush()
        transport = self._writer.transport
        cut = self._loop.call_later(5, transport.abort)
        try:
            await super().close()
        except ConnectionError:
            transport.abort()
        finally:
            cut.cancel()
