"""The device topic layout and the topic ACL: a device reaches only its own four topics.

    push/<client_id>/inbox   box -> device: pushes and resync notices (device subscribes, QoS 1)
    push/<client_id>/hello   device -> box: {"cursor": N} after each (re)connect
    push/<client_id>/ack     device -> box: {"ids": [...], "state": "received|displayed|opened"}
    push/<client_id>/status  device's last will: {"online": false}
"""

from __future__ import annotations

PREFIX = "push/"


def encode_length(n: int) -> bytes:
    """MQTT's Remaining Length: a variable-byte integer of 1 to 4 bytes."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def mqtt_string(value: str | bytes) -> bytes:
    """An MQTT UTF-8 string or binary field: two length bytes, then the bytes."""
    data = value.encode() if isinstance(value, str) else value
    return len(data).to_bytes(2, "big") + data


def mqtt_packet(first: int, body: bytes) -> bytes:
    """A whole control packet: its first byte, the Remaining Length, the body."""
    return bytes([first]) + encode_length(len(body)) + body


def inbox_topic(client_id: str) -> str:
    return f"{PREFIX}{client_id}/inbox"


def hello_topic(client_id: str) -> str:
    return f"{PREFIX}{client_id}/hello"


def ack_topic(client_id: str) -> str:
    return f"{PREFIX}{client_id}/ack"


def status_topic(client_id: str) -> str:
    return f"{PREFIX}{client_id}/status"


def device_publish_kind(client_id: str, topic: str) -> str | None:
    """'hello', 'ack' or 'status' when `client_id` may publish to `topic`, else None."""
    prefix = f"{PREFIX}{client_id}/"
    if not topic.startswith(prefix):
        return None
    kind = topic[len(prefix):]
    return kind if kind in ("hello", "ack", "status") else None


def may_subscribe(client_id: str, topic_filter: str) -> bool:
    """A device may subscribe to its own inbox only: the exact string, so no wildcard, no `$share/<group>/` or
    `$queue/` form of it, no `$SYS/…` and nothing of another device or of the box's own subscriptions (#9)."""
    return topic_filter == inbox_topic(client_id)
