"""Raw MQTT 3.1.1 packets, for what a well-behaved client library will not send (a silent peer, an
invalid topic)."""

from __future__ import annotations

import asyncio
import struct

PINGREQ, PINGRESP = b"\xc0\x00", b"\xd0\x00"


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(raw)) + raw


def connect(
    client_id: str, keepalive: int = 60, will: tuple[str, bytes] | None = None, clean: bool = True
) -> bytes:
    """CONNECT; `will` = (topic, payload) at QoS 0."""
    flags, payload = (0x02 if clean else 0x00), _str(client_id)
    if will is not None:
        flags |= 0x04
        payload += _str(will[0]) + _str(will[1])
    body = _str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + payload
    return b"\x10" + _remaining_length(len(body)) + body


def publish(topic: str, payload: bytes, qos: int = 0, packet_id: int = 1) -> bytes:
    body = _str(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return bytes([0x30 | (qos << 1)]) + _remaining_length(len(body)) + body


def subscribe(topic: str, qos: int = 1, packet_id: int = 1) -> bytes:
    body = struct.pack("!H", packet_id) + _str(topic) + bytes([qos])
    return b"\x82" + _remaining_length(len(body)) + body


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    """(packet type, flags, body) of the next packet."""
    first = (await reader.readexactly(1))[0]
    length, multiplier = 0, 1
    while True:
        byte = (await reader.readexactly(1))[0]
        length += (byte & 0x7F) * multiplier
        multiplier *= 128
        if not byte & 0x80:
            break
    return first >> 4, first & 0x0F, await reader.readexactly(length)


def parse_publish(flags: int, body: bytes) -> tuple[str, int | None, bytes, bool]:
    """(topic, packet id, payload, dup) of a PUBLISH body."""
    (topic_len,) = struct.unpack("!H", body[:2])
    topic, rest = body[2 : 2 + topic_len].decode(), body[2 + topic_len :]
    packet_id = None
    if flags & 0x06:
        (packet_id,) = struct.unpack("!H", rest[:2])
        rest = rest[2:]
    return topic, packet_id, rest, bool(flags & 0x08)


def connect_login(client_id: str, username: str, password: str, keepalive: int = 60) -> bytes:
    """CONNECT with a username and password (clean session): how an application logs in on the
    plain listener."""
    flags = 0x02 | 0x80 | 0x40
    payload = _str(client_id) + _str(username) + _str(password)
    body = _str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + payload
    return b"\x10" + _remaining_length(len(body)) + body


def publish_raw_topic(topic: bytes, payload: bytes, qos: int = 0, packet_id: int = 1) -> bytes:
    """PUBLISH whose topic is given as raw bytes (for example invalid UTF-8)."""
    body = _str(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return bytes([0x30 | (qos << 1)]) + _remaining_length(len(body)) + body


def subscribe_raw_topic(topic_filter: bytes, qos: int = 1, packet_id: int = 1) -> bytes:
    """SUBSCRIBE whose filter is given as raw bytes (for example invalid UTF-8)."""
    body = struct.pack("!H", packet_id) + _str(topic_filter) + bytes([qos])
    return b"\x82" + _remaining_length(len(body)) + body


def publish_header(topic: str, remaining_length: int, qos: int = 0, packet_id: int = 1) -> bytes:
    """The start of a PUBLISH that claims `remaining_length` bytes (up to 268435455, the MQTT
    maximum) but carries only its topic (and packet id): what a client announcing a huge packet
    sends before the payload."""
    head = _str(topic) + (struct.pack("!H", packet_id) if qos else b"")
    return bytes([0x30 | (qos << 1)]) + _remaining_length(remaining_length) + head
