"""intrapush's own MQTT 5 connection to a broker it does not run in-process (Mosquitto, or a cluster).

A small asyncio client rather than paho-mqtt, aiomqtt or gmqtt, because these connections carry every
push and every device message of the box: a QoS 1 PUBLISH here is one bytes concatenation appended to a
buffer that is written once per event-loop pass, and an incoming PUBLISH is parsed in place and its PUBACK
batched the same way; no Future, callback object, thread or lock per message. Measured on the 2-core
build machine against Mosquitto 2.0.11 (bench/client_choice.py, QoS 1 until every PUBACK): paho-mqtt 2.2
16k publishes/s at 61 us of CPU each for 2,000 messages, 2.6k/s at 380 us for 20,000; this client 68k-99k/s
at 6-9 us each.

MQTT 5 for this connection only (devices speak 3.1.1): Receive Maximum lets the broker keep 65,535 messages
in flight to us instead of its global `max_inflight_messages`, and Session Expiry keeps our subscriptions
and queued device messages across a short reconnect.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import struct
from collections.abc import Callable
from typing import Any

from appliance.broker.topics import encode_length
from appliance.broker.topics import mqtt_string as _string

log = logging.getLogger("appliance.broker")

_PACK_H = struct.Struct("!H").pack
_UNPACK_H = struct.Struct("!H").unpack_from
_PACK_I = struct.Struct("!I").pack
PINGREQ = b"\xc0\x00"
WINDOW_CAP = 65000  # packet ids in flight to the broker; the rest wait in the backlog
MAX_BACKLOG = 1_000_000  # publishes held while disconnected or while the window is full

# MQTT 5 property id -> encoded size (0: variable-byte integer, -1: string/binary, -2: string pair)
_PROP_SIZES = {0x01: 1, 0x17: 1, 0x19: 1, 0x24: 1, 0x25: 1, 0x28: 1, 0x29: 1, 0x2A: 1, 0x13: 2, 0x21: 2,
               0x22: 2, 0x23: 2, 0x02: 4, 0x11: 4, 0x18: 4, 0x27: 4, 0x0B: 0, 0x03: -1, 0x08: -1, 0x09: -1,
               0x12: -1, 0x15: -1, 0x16: -1, 0x1A: -1, 0x1C: -1, 0x1F: -1, 0x26: -2}


class MqttError(Exception):
    """The broker refused us or broke the protocol."""


def _varint(buf: bytes | bytearray, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    for _ in range(4):
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise MqttError("variable byte integer longer than 4 bytes")


def parse_properties(buf: bytes, pos: int) -> tuple[dict[int, Any], int]:
    length, pos = _varint(buf, pos)
    end, props = pos + length, {}
    while pos < end:
        pid = buf[pos]
        pos += 1
        size = _PROP_SIZES.get(pid)
        if size is None:
            raise MqttError(f"unknown property 0x{pid:02x}")
        if size > 0:
            props[pid] = int.from_bytes(buf[pos:pos + size], "big")
            pos += size
        elif size == 0:
            props[pid], pos = _varint(buf, pos)
        else:
            for _ in range(-size):
                n = _UNPACK_H(buf, pos)[0]
                props[pid] = bytes(buf[pos + 2:pos + 2 + n])
                pos += 2 + n
    return props, end


def topic_header(topic: str) -> bytes:
    """A topic as it sits in a PUBLISH (length-prefixed UTF-8): build it once per destination."""
    return _string(topic)


class _Connection(asyncio.Protocol):
    """One TCP/TLS connection: parses the byte stream, hands packets to the session."""

    def __init__(self, session: MqttSession) -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.connack: asyncio.Future[tuple[bool, dict[int, Any]]] = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.last_rx = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connack.done():
            self.connack.set_exception(ConnectionError(f"closed before CONNACK: {exc}"))
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        self.last_rx = self.session.loop.time()
        pos, end = 0, len(buf)
        session = self.session
        try:
            while end - pos >= 2:
                first, i, length, multiplier, complete = buf[pos], pos + 1, 0, 1, False
                while i < end:
                    digit = buf[i]
                    i += 1
                    length += (digit & 0x7F) * multiplier
                    multiplier *= 128
                    if not digit & 0x80:
                        complete = True
                        break
                    if i - pos > 4:
                        raise MqttError("remaining length longer than 4 bytes")
                if not complete or i + length > end:
                    break
                ptype = first >> 4
                if ptype == 3:
                    session.handle_publish(first, buf, i, i + length)
                elif ptype == 4:
                    session.handle_puback(_UNPACK_H(buf, i)[0])
                elif ptype == 2:
                    flags, code = buf[i], buf[i + 1]
                    props = parse_properties(bytes(buf[i:i + length]), 2)[0] if length > 2 else {}
                    if code:
                        raise MqttError(f"CONNACK reason code 0x{code:02x}")
                    if not self.connack.done():
                        self.connack.set_result((bool(flags & 1), props))
                elif ptype == 9:
                    codes = bytes(buf[i + 2:i + length])
                    props_len, start = _varint(codes, 0)
                    failed = [c for c in codes[start + props_len:] if c >= 0x80]
                    if failed:
                        log.error("event=broker_subscribe_refused codes=%s", failed)
                elif ptype == 13:
                    pass  # PINGRESP: last_rx is enough
                elif ptype == 14:
                    raise MqttError(f"DISCONNECT from the broker, reason 0x{buf[i] if length else 0:02x}")
                pos = i + length
        except MqttError as exc:
            log.error("event=broker_link_error error=%r", str(exc))
            if self.transport is not None:
                self.transport.abort()
            buf.clear()
            return
        del buf[:pos]
        session.flush()


class MqttSession:
    """A persistent MQTT 5 session that reconnects by itself. Publishes made while disconnected wait in a
    bounded backlog; QoS 1 publishes the broker has not acknowledged are sent again (DUP) on resume."""

    def __init__(self, host: str, port: int, client_id: str, username: str, password: str, *,
                 on_message: Callable[[str, bytes, bool], None], on_connected: Callable[[bool], None],
                 on_lost: Callable[[], None], subscriptions: list[tuple[str, int]],
                 ssl_context: ssl.SSLContext | None = None, keepalive: int = 30,
                 session_expiry_s: int = 600) -> None:
        self.host, self.port = host, port
        self.client_id, self.username, self.password = client_id, username, password
        self.on_message, self.on_connected, self.on_lost = on_message, on_connected, on_lost
        self.subscriptions = subscriptions
        self.ssl_context = ssl_context
        self.keepalive = keepalive
        self.session_expiry_s = session_expiry_s
        self.loop = asyncio.get_running_loop()
        self.conn: _Connection | None = None
        self.connected = asyncio.Event()
        self._out = bytearray()
        self._flush_scheduled = False
        self._next_pid = 0
        self._inflight: dict[int, bytes] = {}
        self._backlog: collections.deque[tuple[bytes, bytes]] = collections.deque()  # (topic header, payload)
        self._window = WINDOW_CAP
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.published = 0
        self.received = 0
        self.dropped = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = self.loop.create_task(self._run())

    async def close(self) -> None:
        """End the session (expiry 0) so the broker stops queueing for us, then disconnect."""
        self._stopping = True
        conn = self.conn
        if conn is not None and conn.transport is not None and self.connected.is_set():
            self.flush()
            conn.transport.write(b"\xe0\x07\x00\x05\x11\x00\x00\x00\x00")
            conn.transport.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def reconnect_now(self) -> None:
        """Drop the current connection (if any) so the loop reconnects, e.g. after new credentials."""
        if self.conn is not None and self.conn.transport is not None:
            self.conn.transport.abort()

    async def _run(self) -> None:
        delay = 0.05
        while not self._stopping:
            try:
                clean = await self._connect_once()
                delay = 0.05
                await self._serve(clean)
            except (OSError, ConnectionError, MqttError, asyncio.TimeoutError) as exc:
                log.debug("event=broker_link_retry address=%s:%d error=%r", self.host, self.port, str(exc))
            self.connected.clear()
            self.conn = None
            if not self._stopping:
                self.on_lost()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _connect_once(self) -> bool:
        _, conn = await asyncio.wait_for(self.loop.create_connection(
            lambda: _Connection(self), self.host, self.port, ssl=self.ssl_context), 10)
        self.conn = conn
        props = b"\x11" + _PACK_I(self.session_expiry_s) + b"\x21" + _PACK_H(65535)
        body = (_string("MQTT") + b"\x05" + bytes([0xC0]) + _PACK_H(self.keepalive)
                + encode_length(len(props)) + props
                + _string(self.client_id) + _string(self.username) + _string(self.password))
        assert conn.transport is not None
        conn.transport.write(b"\x10" + encode_length(len(body)) + body)
        try:
            present, connack = await asyncio.wait_for(conn.connack, 10)
        except BaseException:
            conn.transport.abort()
            raise
        self._window = min(connack.get(0x21, 65535), WINDOW_CAP)
        return present

    async def _serve(self, session_present: bool) -> None:
        conn = self.conn
        assert conn is not None and conn.transport is not None
        if not session_present:
            self.dropped += len(self._inflight)
            self._inflight.clear()  # a new broker session: what was in flight went with the old one
        else:
            for packet in list(self._inflight.values()):  # resume: resend unacknowledged, marked DUP
                self._out += bytes([packet[0] | 0x08]) + packet[1:]
        if self.subscriptions:  # an empty SUBSCRIBE is a protocol error
            subscribe = b"\x00" + b"".join(_string(t) + bytes([q]) for t, q in self.subscriptions)
            self._out += b"\x82" + encode_length(2 + len(subscribe)) + _PACK_H(self._pid()) + subscribe
        self.connected.set()
        self._drain_backlog()
        self.flush()
        log.info("event=broker_link_up client=%s address=%s:%d session_present=%s", self.client_id, self.host,
                 self.port, session_present)
        self.on_connected(session_present)
        while not conn.lost.done():
            await asyncio.wait([conn.lost], timeout=self.keepalive / 2)
            if conn.lost.done():
                break
            if self.loop.time() - conn.last_rx > self.keepalive * 1.5:
                log.warning("event=broker_link_timeout address=%s:%d", self.host, self.port)
                conn.transport.abort()
                break
            conn.transport.write(PINGREQ)
        log.warning("event=broker_link_down address=%s:%d", self.host, self.port)

    # -- outgoing --------------------------------------------------------------------------------
    def _pid(self) -> int:
        pid = self._next_pid % 65535 + 1
        while pid in self._inflight:
            pid = pid % 65535 + 1
        self._next_pid = pid
        return pid

    def publish(self, topic_hdr: bytes, payload: bytes) -> bool:
        """Queue one QoS 1 PUBLISH (topic as `topic_header()` built it); False if the backlog is full."""
        if len(self._inflight) < self._window and self.connected.is_set():
            self._send_publish(topic_hdr, payload)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self.loop.call_soon(self.flush)
            return True
        if len(self._backlog) >= MAX_BACKLOG:
            self.dropped += 1
            return False
        self._backlog.append((topic_hdr, payload))
        return True

    def _send_publish(self, topic_hdr: bytes, payload: bytes) -> None:
        """Frame a QoS 1 PUBLISH (empty MQTT 5 properties), keep it until its PUBACK, queue it for writing."""
        pid = self._pid()
        packet = b"\x32" + encode_length(len(topic_hdr) + 3 + len(payload)) + topic_hdr + _PACK_H(pid) + b"\x00" + payload
        self._inflight[pid] = packet
        self._out += packet
        self.published += 1

    def _drain_backlog(self) -> None:
        backlog = self._backlog
        while backlog and len(self._inflight) < self._window:
            self._send_publish(*backlog.popleft())

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.conn is not None and self.conn.transport is not None and self.connected.is_set():
            self.conn.transport.write(bytes(self._out))
            self._out.clear()

    # -- incoming --------------------------------------------------------------------------------
    def handle_puback(self, pid: int) -> None:
        self._inflight.pop(pid, None)
        if self._backlog:
            self._drain_backlog()

    def handle_publish(self, first: int, buf: bytearray, pos: int, end: int) -> None:
        qos = (first >> 1) & 3
        tlen = (buf[pos] << 8) | buf[pos + 1]
        topic = buf[pos + 2:pos + 2 + tlen].decode("utf-8", "replace")
        pos += 2 + tlen
        if qos:
            self._out += b"\x40\x02" + buf[pos:pos + 2]
            pos += 2
        props_len = buf[pos]
        if props_len & 0x80:
            props_len, pos = _varint(buf, pos)
        else:
            pos += 1
        pos += props_len
        self.received += 1
        try:
            self.on_message(topic, bytes(buf[pos:end]), bool(first & 1))
        except Exception:
            log.exception("event=broker_message_failed topic=%r", topic[:128])
