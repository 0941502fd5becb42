"""The hot path's packets, decoded and encoded directly (issue #14): amqtt builds every packet from
header objects and reads each field with an awaited read of its own. BridgeHandler's reader loop
takes here a PUBLISH at QoS 0 or 1, a PUBACK, a PINGREQ or a DISCONNECT whose bytes are all
buffered, with the rules of the strict parsing (`text`: UTF-8 without U+0000; a topic name without
wildcards); any other packet, or one not wholly buffered yet, is left to amqtt's parser, made
strict in handler.py with the same `text`. The CONNECT is read whole and decoded here too
(`Connect`, `take_connect`), once per connection. The broker's direct delivery
(HardenedBroker._deliver) encodes its PUBLISH packets here."""

from __future__ import annotations

from typing import Any

from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.pingreq import PingReqPacket
from amqtt.mqtt.publish import PublishPacket, PublishPayload, PublishVariableHeader

CONNECT, PUBLISH, PUBACK, PINGREQ, DISCONNECT = 1, 3, 4, 12, 14
# CONNECT flags [MQTT-3.1.2-3..-22]
RESERVED, CLEAN_SESSION, WILL, WILL_QOS, WILL_RETAIN, PASSWORD, USERNAME = (
    0x01,
    0x02,
    0x04,
    0x18,
    0x20,
    0x40,
    0x80,
)


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


class Connect:
    """A CONNECT's fields, as amqtt's ConnectPacket names them (`proto_name` "MQTT" and
    `proto_level` 4 are checked by the caller, which answers a wrong level with a CONNACK)."""

    __slots__ = (
        "client_id",
        "flags",
        "keep_alive",
        "password",
        "proto_level",
        "proto_name",
        "username",
        "will_message",
        "will_topic",
    )

    def __init__(self, body: bytes) -> None:
        """Decode a whole CONNECT body (what follows its fixed header): every field must lie within
        it, and nothing may follow the last one."""
        view = _Fields(body)
        self.proto_name = view.text()
        self.proto_level, self.flags = view.byte(), view.byte()
        self.keep_alive, self.client_id = 0, ""
        self.will_topic = self.will_message = self.username = self.password = None
        if self.proto_name != "MQTT" or self.proto_level != 4:
            return  # another protocol: what follows is not read (the caller refuses it)
        self.keep_alive = view.uint16()
        self.client_id = view.text()
        self.will_topic = view.text() if self.will_flag else None
        self.will_message = view.data() if self.will_flag else None
        self.username = view.text() if self.flags & USERNAME else None
        # Binary data [MQTT-3.1.3.5]; ours are text: one that is not UTF-8 stays None (CONNACK 4)
        self.password = _utf8(view.data()) if self.flags & PASSWORD else None
        if view.left():
            raise Malformed("CONNECT longer than its fields")
        if not self.will_flag and self.flags & (WILL_QOS | WILL_RETAIN):
            raise Malformed("[MQTT-3.1.2-11/13] will QoS or retain without a will")
        if self.will_qos == 3:
            raise Malformed("[MQTT-3.1.2-14] will QoS 3")

    @property
    def will_flag(self) -> bool:
        return bool(self.flags & WILL)

    @property
    def will_qos(self) -> int:
        return (self.flags & WILL_QOS) >> 3


def text(raw: bytes) -> str:
    """An MQTT string field [MQTT-1.5.3-1/2]: UTF-8 without U+0000, else Malformed."""
    try:
        decoded = raw.decode()
    except UnicodeDecodeError as exc:
        raise Malformed("a string field is not valid UTF-8") from exc
    if "\x00" in decoded:
        raise Malformed("a string field contains U+0000")
    return decoded


def _utf8(raw: bytes) -> str | None:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None


class _Fields:
    """Reads a packet body's fields in turn; a field past its end is Malformed."""

    __slots__ = ("_at", "_body")

    def __init__(self, body: bytes) -> None:
        self._body, self._at = body, 0

    def _take(self, n: int) -> bytes:
        end = self._at + n
        if end > len(self._body):
            raise Malformed("a field runs past the end of the packet")
        field, self._at = self._body[self._at : end], end
        return field

    def byte(self) -> int:
        return self._take(1)[0]

    def uint16(self) -> int:
        return int.from_bytes(self._take(2), "big")

    def data(self) -> bytes:
        return self._take(self.uint16())

    def text(self) -> str:
        return text(self.data())

    def left(self) -> int:
        return len(self._body) - self._at


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
    elif first not in (0x40, 0xC0, 0xE0):  # PUBACK, PINGREQ, DISCONNECT with their fixed flags
        return None
    header = fixed_header(buffer)
    if header is None:
        return None
    length, i = header
    if length > max_size or size < i + length:
        return None
    if kind == PUBACK:
        if length != 2:
            return None
        packet: Any = (buffer[i] << 8) | buffer[i + 1]
    elif kind in (PINGREQ, DISCONNECT):
        if length != 0:
            return None
        packet = PingReqPacket() if kind == PINGREQ else DisconnectPacket()
    else:
        packet = _publish(first, bytes(buffer[i : i + length]))
    del buffer[: i + length]
    return kind, packet


def take_connect(buffer: bytearray, max_size: int) -> Connect | None:
    """The CONNECT at the start of `buffer`, removed from it, when it is wholly there; else None
    (and `buffer` is left as it is). Malformed when the buffer starts with another packet."""
    header = connect_header(buffer)
    if header is None:
        return None
    length, i = header
    if length > max_size or len(buffer) < i + length:
        return None  # the reader's own read says what is wrong, or waits for the rest
    body = bytes(buffer[i : i + length])
    del buffer[: i + length]
    return Connect(body)


def connect_header(buffer: bytearray) -> tuple[int, int] | None:
    """fixed_header() of the first packet, which must be a CONNECT."""
    if buffer and buffer[0] != CONNECT << 4:  # [MQTT-3.1.0-1], its flags 0 [MQTT-2.2.2-2]
        raise Malformed("the first packet is not a CONNECT")
    return fixed_header(buffer)


def fixed_header(buffer: bytearray) -> tuple[int, int] | None:
    """(remaining length, size of the fixed header) of the packet at the start of `buffer`; None
    while its header is incomplete. Malformed for a fifth length byte [MQTT-2.2.3]."""
    size, length, shift, i = len(buffer), 0, 0, 1
    while True:
        if i >= size:
            return None
        byte = buffer[i]
        i += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return length, i
        shift += 7
        if shift > 21:
            raise Malformed("a remaining length of more than four bytes")


def _publish(first: int, body: bytes) -> Publish:
    qos = (first >> 1) & 0x03
    if len(body) < 2:
        raise Malformed("PUBLISH without a topic")
    n = (body[0] << 8) | body[1]
    head = 2 + n + (2 if qos else 0)
    if len(body) < head:
        raise Malformed("PUBLISH shorter than its topic and packet id")
    topic = text(body[2 : 2 + n])
    if "#" in topic or "+" in topic:
        raise Malformed("malformed PublishPacket: [MQTT-3.3.2-2] a topic name has no wildcards")
    packet_id = ((body[2 + n] << 8) | body[3 + n]) if qos else None
    return Publish(first & 0x0F, topic, packet_id, body[head:], len(body))
