"""The hot path's packets, decoded and encoded directly (issue #14): amqtt builds every packet from
header objects and reads each field with an awaited read of its own. BridgeHandler's reader loop
takes here a PUBLISH at QoS 0 or 1, a PUBACK or a PINGREQ whose bytes are all buffered, with the
rules of the strict parsing in hardened.py (UTF-8 topic without U+0000 or wildcards); any other
packet, or one not wholly buffered yet, is left to amqtt's parser. The broker's direct delivery
(HardenedBroker._deliver) encodes its PUBLISH packets here."""

from __future__ import annotations

from typing import Any

from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.pingreq import PingReqPacket
from amqtt.mqtt.publish import PublishPacket, PublishPayload, PublishVariableHeader

PUBLISH, PUBACK, PINGREQ = 3, 4, 12


class Malformed(ValueError):
    """A hot packet that does not parse: the connection ends (streams.MalformedPacket)."""


class Publish:
    """A PUBLISH at QoS 0 or 1 as the reader loop takes it: one object where amqtt's PublishPacket
    is four; `packet()` makes amqtt's, for a message the broker's own code handles."""

    __slots__ = ("data", "flags", "length", "packet_id", "qos", "retain_flag", "topic_name")

    def __init__(self, flags: int, topic_name: str, packet_id: int | None, data: bytes, length: int) -> None:
        self.flags = flags
        self.qos = (flags >> 1) & 0x03
        self.retain_flag = bool(flags & 0x01)
        self.topic_name = topic_name
        self.packet_id = packet_id
        self.data = data
        self.length = length  # the remaining length: what follows the fixed header

    def packet(self) -> PublishPacket:
        return PublishPacket(
            MQTTFixedHeader(PUBLISH, self.flags, self.length),
            PublishVariableHeader(self.topic_name, self.packet_id),
            PublishPayload(self.data),
        )


def connack(session_present: bool) -> bytes:
    """A CONNACK accepting the connection."""
    return b"\x20\x02\x01\x00" if session_present else b"\x20\x02\x00\x00"


def puback(packet_id: int) -> bytes:
    return b"\x40\x02" + packet_id.to_bytes(2, "big")


def topic_field(topic: str) -> bytes:
    """A PUBLISH's topic as it is sent (length, UTF-8): once per message, whatever its receivers."""
    raw = topic.encode()
    return len(raw).to_bytes(2, "big") + raw


def publish(topic: bytes, payload: bytes, qos: int, packet_id: int | None = None, dup: bool = False) -> bytes:
    """A PUBLISH packet (RETAIN off) with `topic` from topic_field."""
    packet_id_field = packet_id.to_bytes(2, "big") if packet_id is not None else b""
    length = len(topic) + len(packet_id_field) + len(payload)
    header = bytearray((0x30 | qos << 1 | dup << 3,))
    while True:
        byte, length = length & 0x7F, length >> 7
        header.append(byte | 0x80 if length else byte)
        if not length:
            break
    return b"".join((header, topic, packet_id_field, payload))


def take(buffer: bytearray, max_size: int) -> tuple[int, Any] | None:
    """(packet type, packet) of the packet at the start of `buffer`, removed from it, when it is a
    hot one and wholly there (a PUBACK as its packet id); else None and `buffer` is left as it is."""
    size = len(buffer)
    if size < 2:
        return None
    first = buffer[0]
    kind = first >> 4
    if kind == PUBLISH:
        if (first >> 1) & 0x03 > 1:  # QoS 2 (or the invalid 3): amqtt's exchange
            return None
    elif first not in (0x40, 0xC0):  # PUBACK, PINGREQ with their fixed flags
        return None
    length, mult, i = 0, 1, 1
    while True:
        if i >= size or i > 4:
            return None  # incomplete, or a 5th length byte: amqtt's parser says so
        byte = buffer[i]
        i += 1
        length += (byte & 0x7F) * mult
        if not byte & 0x80:
            break
        mult <<= 7
    if length > max_size or size < i + length:
        return None
    if kind == PUBACK:
        if length != 2:
            return None
        packet: Any = (buffer[i] << 8) | buffer[i + 1]
    elif kind == PINGREQ:
        if length != 0:
            return None
        packet = PingReqPacket()
    else:
        packet = _publish(first, bytes(buffer[i : i + length]))
    del buffer[: i + length]
    return kind, packet


def _publish(first: int, body: bytes) -> Publish:
    qos = (first >> 1) & 0x03
    if len(body) < 2:
        raise Malformed("PUBLISH without a topic")
    n = (body[0] << 8) | body[1]
    head = 2 + n + (2 if qos else 0)
    if len(body) < head:
        raise Malformed("PUBLISH shorter than its topic and packet id")
    try:
        topic = body[2 : 2 + n].decode()
    except UnicodeDecodeError as exc:
        raise Malformed("a string field is not valid UTF-8") from exc
    if "\x00" in topic:
        raise Malformed("a string field contains U+0000")
    if "#" in topic or "+" in topic:
        raise Malformed("malformed PublishPacket: [MQTT-3.3.2-2] a topic name has no wildcards")
    packet_id = ((body[2 + n] << 8) | body[3 + n]) if qos else None
    return Publish(first & 0x0F, topic, packet_id, body[head:], len(body))
