"""Raw MQTT 3.1.1 packets, for what a well-behaved client library will not send (a silent peer, an
invalid topic). Adapted from shared/amqtt-lab/mqttraw.py."""

from __future__ import annotations

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


def connect(client_id: str, keepalive: int = 60, will: tuple[str, bytes] | None = None) -> bytes:
    """CONNECT with clean session; `will` = (topic, payload) at QoS 0."""
    flags, payload = 0x02, _str(client_id)
    if will is not None:
        flags |= 0x04
        payload += _str(will[0]) + _str(will[1])
    body = _str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + payload
    return b"\x10" + _remaining_length(len(body)) + body


def publish(topic: str, payload: bytes, qos: int = 0, packet_id: int = 1) -> bytes:
    body = _str(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return bytes([0x30 | (qos << 1)]) + _remaining_length(len(body)) + body
