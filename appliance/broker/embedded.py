"""The embedded broker: amqtt's listeners (TCP, WebSocket, TLS) under a hardened connection layer.

amqtt 0.12.1 accepts the socket and owns the listeners; each connection is then served here, because
its own session layer cannot face real devices (see docs/architecture.md, "Embedded broker"):
  - a source address over its connect rate or connection cap is closed right after accept, before TLS;
  - authentication runs before any session state is touched (a wrong password cannot take over);
  - a complete CONNECT must arrive within `connect_timeout_s`, as the first packet;
  - keepalive is enforced: a client silent for keepalive x grace is closed and reported offline;
  - every packet's size is checked against `max_packet_bytes` before its body is read;
  - a malformed packet or a protocol violation closes the connection;
  - nothing is retained, queued or relayed between clients: a device talks only to the box, through
    its own four topics, and pushes are written straight into its connection (no subscription scan);
  - a client that does not read (write buffer over `max_write_buffer_bytes`) is dropped.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from amqtt.adapters import BufferReader, WebSocketsReader, WebSocketsWriter
from amqtt.broker import Broker, Server
from amqtt.contexts import ListenerType
from amqtt.mqtt.connack import (
    BAD_USERNAME_PASSWORD,
    CONNECTION_ACCEPTED,
    NOT_AUTHORIZED,
    UNACCEPTABLE_PROTOCOL_VERSION,
    ConnackPacket,
)
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.packet import MQTTFixedHeader

from appliance.broker import topics
from appliance.broker.admission import ADMITTED, Admission
from appliance.broker.backlog import ACCEPT_BACKLOG

log = logging.getLogger("appliance.broker")

CONNECT, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 3, 4, 5, 6, 7
SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT = 8, 10, 12, 14
PINGRESP = b"\xd0\x00"
_PACK_H = struct.Struct("!H").pack
_UNPACK_H = struct.Struct("!H").unpack_from
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


class ProtocolViolation(Exception):
    """The client broke MQTT 3.1.1: the connection is closed."""


class DeviceGate(Protocol):
    """What the broker needs from the box: who may log in, and where device events go."""

    def authenticate(self, client_id: str, username: str | None, password: str | None) -> Any | None: ...
    def handle_connected(self, link: DeviceLink) -> None: ...
    def handle_publish(self, link: DeviceLink, kind: str, payload: bytes) -> None: ...
    def handle_ack(self, link: DeviceLink, payload: bytes, confirm: Callable[[], None]) -> None: ...
    def handle_disconnected(self, link: DeviceLink, reason: str) -> None: ...


@dataclass(frozen=True)
class ListenerSpec:
    """One MQTT listener: `kind` tcp or ws; with an ssl context it is TLS (MQTTS or WSS)."""

    name: str
    kind: str
    host: str
    port: int
    ssl_context: ssl.SSLContext | None = None
    client_cert: str = "none"


@dataclass(frozen=True)
class BrokerLimits:
    connect_timeout_s: float = 10.0
    max_packet_bytes: int = 65536
    max_keepalive_s: int = 1200
    keepalive_grace: float = 1.5
    max_write_buffer_bytes: int = 1 << 20
    connect_rate_per_source: float = 0.0  # new connections per second per source address; 0: no limit
    connect_burst_per_source: int = 100
    max_connections_per_source: int = 0
    limit_exempt: frozenset[str] = frozenset()


class _Stream:
    """A TCP (or TLS) connection."""

    is_websocket = False

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.transport = writer.transport

    async def read(self, n: int) -> bytes:
        return await self.reader.readexactly(n)

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size()

    def peer(self) -> str:
        peer = self.writer.get_extra_info("peername")
        return f"{peer[0]}:{peer[1]}" if peer else "?"

    def peer_cert(self) -> dict[str, Any] | None:
        return self.writer.get_extra_info("peercert")

    async def flush(self) -> None:
        return None

    def close(self) -> None:
        self.transport.close()

    def abort(self) -> None:
        self.transport.abort()


class _WebSocket:
    """An MQTT-over-WebSocket connection, through amqtt's adapters."""

    is_websocket = True

    def __init__(self, websocket: Any) -> None:
        self.websocket = websocket
        self.reader = WebSocketsReader(websocket)
        self.writer = WebSocketsWriter(websocket)
        self.pending = 0

    async def read(self, n: int) -> bytes:
        data = await self.reader.read(n)
        if len(data) < n:
            raise asyncio.IncompleteReadError(data, n)
        return data

    def write(self, data: bytes) -> None:
        self.writer.write(data)
        self.pending += len(data)

    def buffered(self) -> int:
        return self.pending + self.websocket.transport.get_write_buffer_size()

    def peer(self) -> str:
        peer = self.writer.get_peer_info()
        return f"{peer[0]}:{peer[1]}" if peer else "?"

    def peer_cert(self) -> dict[str, Any] | None:
        return self.websocket.transport.get_extra_info("peercert")

    async def flush(self) -> None:
        self.pending = 0
        await self.writer.drain()

    def close(self) -> None:
        self.websocket.transport.close()

    def abort(self) -> None:
        self.websocket.transport.abort()


class _GatedListener:
    """A TCP listener that accepts sockets itself, so a source over its limits is closed right after
    accept(): before asyncio allocates a transport and before any TLS handshake (#10). What asyncio's
    server would do next, it does through loop.connect_accepted_socket()."""

    def __init__(self, loop: asyncio.AbstractEventLoop, host: str, port: int,
                 on_socket: Any) -> None:
        self._loop = loop
        self._on_socket = on_socket
        self.sockets: list[socket.socket] = []
        seen = set()
        try:
            for family, kind, proto, _, addr in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                                   flags=socket.AI_PASSIVE):
                if (family, addr) in seen:
                    continue
                seen.add((family, addr))
                sock = socket.socket(family, kind, proto)
                self.sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
                sock.listen(ACCEPT_BACKLOG)
                sock.setblocking(False)
        except OSError:
            self.close()
            raise
        for sock in self.sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BACKLOG):
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                # Out of files: Linux keeps the socket readable, so pause accepting for a second (as asyncio does).
                log.warning("event=accept_failed error=%s", errno.errorcode.get(exc.errno, exc.errno))
                self._loop.remove_reader(sock.fileno())
                self._loop.call_later(1.0, self._resume, sock)
                return
            self._on_socket(conn, addr)

    def _resume(self, sock: socket.socket) -> None:
        if sock.fileno() >= 0:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        for sock in self.sockets:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
                sock.close()

    async def wait_closed(self) -> None:
        return None


class DeviceLink:
    """One authenticated device connection, as the rest of the box sees it."""

    __slots__ = ("client_id", "principal", "peer", "_conn", "_inbox_header", "_next_pid", "_inflight",
                 "closed", "subscribed", "_limits", "_flushing", "close_reason", "last_rx", "timeout", "_timer",
                 "_loop", "__weakref__")

    def __init__(self, client_id: str, principal: Any, conn: _Stream | _WebSocket, limits: BrokerLimits,
                 timeout: float, loop: asyncio.AbstractEventLoop) -> None:
        self.client_id = client_id
        self.principal = principal
        self.peer = conn.peer()
        self._conn = conn
        topic = topics.inbox_topic(client_id).encode()
        self._inbox_header = _PACK_H(len(topic)) + topic
        self._next_pid = 0
        self._inflight: set[int] = set()
        self.closed = False
        self.subscribed = False
        self._limits = limits
        self._flushing = False
        self.close_reason = ""
        self.last_rx = loop.time()
        self.timeout = timeout
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = loop.call_later(timeout, self._check_keepalive)

    def send_push(self, payload: bytes) -> bool:
        """Write one QoS 1 PUBLISH to the device's inbox; False when the link is gone."""
        if self.closed:
            return False
        pid = self._next_pid % 65535 + 1
        if pid in self._inflight:
            # 65,535 PUBLISHes without a PUBACK: the client is not processing; the store keeps the pushes.
            self.close("inflight window full")
            return False
        self._next_pid = pid
        self._inflight.add(pid)
        body_len = len(self._inbox_header) + 2 + len(payload)
        self._conn.write(b"\x32" + topics.encode_length(body_len) + self._inbox_header + _PACK_H(pid) + payload)
        self._after_write()
        return True

    def _after_write(self) -> None:
        if self._conn.buffered() > self._limits.max_write_buffer_bytes:
            log.warning("event=dropped client=%s addr=%s reason=slow_consumer", self.client_id, self.peer)
            self.close("slow consumer", abort=True)
        elif self._conn.is_websocket and not self._flushing:
            self._flushing = True
            self._loop.create_task(self._flush())

    async def _flush(self) -> None:
        try:
            await asyncio.sleep(0)  # let a burst of writes collect into one WebSocket message
            await self._conn.flush()
        except Exception:  # noqa: BLE001 - a failed flush is a closed link; the reader sees it
            self.close("write failed", abort=True)
        finally:
            self._flushing = False

    def write_raw(self, data: bytes) -> None:
        if not self.closed:
            self._conn.write(data)
            self._after_write()

    def close(self, reason: str, abort: bool = False) -> None:
        """Close the connection; the reader loop then reports the disconnect once."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if abort:
            self._conn.abort()
        else:
            self._conn.close()

    def _check_keepalive(self) -> None:
        self._timer = None
        if self.closed:
            return
        idle = self._loop.time() - self.last_rx
        if idle >= self.timeout:
            log.info("event=keepalive_timeout client=%s addr=%s idle_s=%.1f", self.client_id, self.peer, idle)
            self.close("keepalive timeout", abort=True)
        else:
            self._timer = self._loop.call_later(self.timeout - idle, self._check_keepalive)

    def acknowledge(self, pid: int) -> None:
        self._inflight.discard(pid)


def _common_name(cert: dict[str, Any] | None) -> str | None:
    """The subject CN of a verified peer certificate (as ssl.getpeercert() gives it)."""
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class EmbeddedBroker(Broker):
    """amqtt's Broker with its session layer replaced by the hardened one above."""

    def __init__(self, listeners: list[ListenerSpec], gate: DeviceGate, limits: BrokerLimits,
                 max_connections: int = 0) -> None:
        self.specs = {spec.name: spec for spec in listeners}
        self._max_connections = max_connections
        # amqtt requires a `default` listener in its config; _start_listeners binds ours instead.
        super().__init__({"listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}}, "plugins": {}})
        self.gate = gate
        self.limits = limits
        self.links: dict[str, DeviceLink] = {}
        self._connections: set[_Stream | _WebSocket] = set()
        self.accepted = 0
        self.refused = 0
        self.throttled = 0  # connections closed at accept by the per-source limits (#10)
        self.admission = Admission(limits.connect_rate_per_source, limits.connect_burst_per_source,
                                   limits.max_connections_per_source, limits.limit_exempt)

    # amqtt's monitor walks every session each second to expire persistent sessions; there are none here.
    async def _session_monitor(self) -> None:
        return None

    async def _start_listeners(self) -> None:
        """Our listener specs, bound as given: amqtt's config would copy the `default` listener's type and
        TLS flag into every listener that leaves them at their defaults."""
        for name, spec in self.specs.items():
            instance = await self._create_server_instance(name, ListenerType(spec.kind), spec.host, spec.port,
                                                          spec.ssl_context)
            self._servers[name] = Server(name, instance, self._max_connections)
            log.info("event=listener name=%s kind=%s tls=%s client_cert=%s", spec.name, spec.kind,
                     spec.ssl_context is not None, spec.client_cert)

    async def _create_server_instance(self, listener_name: str, listener_type: ListenerType, address: str | None,
                                      port: int, ssl_context: ssl.SSLContext | None) -> Any:
        """TCP listeners with a deep accept backlog: amqtt keeps asyncio's 100, so a reconnect storm of
        thousands of devices overflowed it and lost SYNs came back only after 1, 3, 7 s of retransmits. Each
        accepted socket passes the per-source limits first (#10)."""
        if listener_type != ListenerType.TCP:
            return await super()._create_server_instance(listener_name, listener_type, address, port, ssl_context)
        return _GatedListener(asyncio.get_running_loop(), address or "", port,
                              partial(self._handle_accepted, listener_name=listener_name))

    def bound_addresses(self) -> dict[str, tuple[str, int]]:
        """The address each listener actually listens on (port 0 resolved), by our listener names."""
        out = {}
        for name, server in self._servers.items():
            sockets = getattr(server.instance, "sockets", None) or []
            if sockets:
                out[name] = sockets[0].getsockname()[:2]
        return out

    def _admit(self, address: str, listener_name: str) -> str | None:
        """The admission key of a connection from `address` ("" when none is kept), or None: refused (#10)."""
        verdict, key, to_log = self.admission.admit(address)
        if verdict == ADMITTED:
            return key
        self.throttled += 1
        if to_log:
            log.warning("event=refused addr=%s listener=%s reason=%s refused=%d note=%r", address, listener_name,
                        verdict, to_log, "connections from this source are refused for a while; logged once a minute")
        return None

    def _handle_accepted(self, sock: socket.socket, addr: Any, listener_name: str) -> None:
        """A socket just accepted on a TCP listener: refused at once, or served (after TLS, on a TLS listener)."""
        key = ""
        if self.admission.is_active:
            admitted = self._admit(addr[0], listener_name)
            if admitted is None:
                # A reset, not a FIN: no TIME_WAIT is left behind for a flood, and the client retries anyway.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                sock.close()
                return
            key = admitted
        sock.setblocking(False)
        asyncio.get_running_loop().create_task(self._serve_socket(listener_name, sock, key))

    async def _serve_socket(self, listener_name: str, sock: socket.socket, key: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            reader = asyncio.StreamReader(loop=loop)
            protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
            ctx = self.specs[listener_name].ssl_context
            try:
                transport, _ = await loop.connect_accepted_socket(
                    lambda: protocol, sock, ssl=ctx,
                    ssl_handshake_timeout=self.limits.connect_timeout_s if ctx is not None else None)
            except Exception:  # noqa: BLE001 - a failed or timed-out TLS handshake: the loop closed the socket
                return
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            await self._serve(listener_name, _Stream(reader, writer))
        finally:
            self.admission.release(key)

    async def ws_connected(self, websocket: Any, listener_name: str) -> None:
        """A WebSocket connection, after websockets' TLS and HTTP upgrade: the per-source limits apply here."""
        key = ""
        if self.admission.is_active:
            peer = websocket.remote_address
            admitted = self._admit(peer[0] if peer else "?", listener_name)
            if admitted is None:
                websocket.transport.abort()
                return
            key = admitted
        try:
            await self._serve(listener_name, _WebSocket(websocket))
        finally:
            self.admission.release(key)

    async def shutdown(self) -> None:
        for link in list(self.links.values()):
            link.close("shutdown")
        for conn in list(self._connections):
            conn.abort()
        await super().shutdown()

    async def _serve(self, listener_name: str, conn: _Stream | _WebSocket) -> None:
        server = self._servers[listener_name]
        await server.acquire_connection()
        self._connections.add(conn)
        link: DeviceLink | None = None
        reason = "closed"
        try:
            link = await self._handshake(conn)
            if link is not None:
                reason = await self._read_loop(conn, link)
        except ProtocolViolation as exc:
            reason = f"protocol violation: {exc}"
            log.warning("event=closed addr=%s client=%s reason=%r", conn.peer(),
                        link.client_id if link else "-", reason)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            reason = "connection lost"
        except asyncio.CancelledError:
            reason = "shutdown"
            raise
        except Exception:
            reason = "internal error"
            log.exception("event=closed addr=%s reason=internal_error", conn.peer())
        finally:
            self._connections.discard(conn)
            if link is not None:
                if not link.closed:
                    link.close(reason)
                if self.links.get(link.client_id) is link:
                    del self.links[link.client_id]
                try:
                    self.gate.handle_disconnected(link, link.close_reason or reason)
                except Exception:
                    log.exception("event=disconnect_hook_failed client=%s", link.client_id)
            else:
                conn.abort()
            server.release_connection()

    async def _read_packet(self, conn: _Stream | _WebSocket) -> tuple[int, int, bytes]:
        head = await conn.read(2)
        byte1, digit = head[0], head[1]
        length, multiplier, count = digit & 0x7F, 128, 1
        while digit & 0x80:
            if count == 4:
                raise ProtocolViolation("remaining length longer than 4 bytes")
            digit = (await conn.read(1))[0]
            length += (digit & 0x7F) * multiplier
            multiplier *= 128
            count += 1
        if length + 1 + count > self.limits.max_packet_bytes:
            raise ProtocolViolation(f"packet of {length} bytes over max_packet_bytes={self.limits.max_packet_bytes}")
        body = await conn.read(length) if length else b""
        return byte1 >> 4, byte1 & 0x0F, body

    async def _handshake(self, conn: _Stream | _WebSocket) -> DeviceLink | None:
        """Read CONNECT, authenticate, take over an older link, answer CONNACK: or close."""
        peer = conn.peer()
        try:
            ptype, flags, body = await asyncio.wait_for(self._read_packet(conn), self.limits.connect_timeout_s)
        except asyncio.TimeoutError:
            log.info("event=refused addr=%s reason=connect_timeout", peer)
            self.refused += 1
            return None
        if ptype != CONNECT or flags != 0:
            raise ProtocolViolation(f"first packet is type {ptype}, not CONNECT")
        try:
            reader = BufferReader(body)
            fixed = MQTTFixedHeader(CONNECT, 0, len(body))
            packet = await ConnectPacket.from_stream(reader, fixed_header=fixed)
        except Exception as exc:
            raise ProtocolViolation(f"malformed CONNECT: {exc}") from None
        vh, payload = packet.variable_header, packet.payload
        if vh is None or payload is None:
            raise ProtocolViolation("malformed CONNECT")
        if packet.proto_name != "MQTT" or packet.proto_level != 4:
            conn.write(ConnackPacket.build(0, UNACCEPTABLE_PROTOCOL_VERSION).to_bytes())
            log.info("event=refused addr=%s reason=protocol protocol=%r level=%s", peer, packet.proto_name,
                     packet.proto_level)
            self.refused += 1
            await conn.flush()
            return None
        if vh.reserved_flag or reader._stream.tell() != len(body):  # noqa: SLF001 - BufferReader has no tell()
            raise ProtocolViolation("malformed CONNECT (reserved flag or trailing bytes)")
        if vh.will_flag and (payload.will_topic is None or payload.will_message is None):
            raise ProtocolViolation("will flag without will topic/message")
        if (vh.username_flag and payload.username is None) or (vh.password_flag and payload.password is None):
            raise ProtocolViolation("username/password flag without the field")
        client_id = payload.client_id or ""
        principal = None
        if not getattr(payload, "client_id_is_random", False):
            principal = self.gate.authenticate(client_id, payload.username, payload.password)
        if principal is None:
            code = BAD_USERNAME_PASSWORD if vh.password_flag else NOT_AUTHORIZED
            conn.write(ConnackPacket.build(0, code).to_bytes())
            log.warning("event=refused addr=%s client=%s reason=bad_credentials", peer, client_id[:64])
            self.refused += 1
            await conn.flush()
            return None
        cert_name = _common_name(conn.peer_cert())
        if cert_name is not None and cert_name != client_id:
            conn.write(ConnackPacket.build(0, NOT_AUTHORIZED).to_bytes())
            log.warning("event=refused addr=%s client=%s reason=certificate_identity cert_cn=%r", peer, client_id,
                        cert_name[:64])
            self.refused += 1
            await conn.flush()
            return None
        if vh.will_flag and topics.device_publish_kind(client_id, payload.will_topic) != "status":
            conn.write(ConnackPacket.build(0, NOT_AUTHORIZED).to_bytes())
            log.warning("event=refused addr=%s client=%s reason=will_topic topic=%r", peer, client_id,
                        payload.will_topic[:128])
            self.refused += 1
            await conn.flush()
            return None

        keepalive = packet.keep_alive
        if keepalive <= 0 or keepalive > self.limits.max_keepalive_s:
            keepalive = self.limits.max_keepalive_s
        loop = asyncio.get_running_loop()
        link = DeviceLink(client_id, principal, conn, self.limits, keepalive * self.limits.keepalive_grace, loop)
        older = self.links.get(client_id)
        if older is not None:
            log.info("event=taken_over client=%s old_addr=%s new_addr=%s", client_id, older.peer, link.peer)
            older.close("taken over")
        self.links[client_id] = link
        # No broker session survives a connection: the store is the truth, so session present is always 0.
        conn.write(ConnackPacket.build(0, CONNECTION_ACCEPTED).to_bytes())
        await conn.flush()
        self.accepted += 1
        log.info("event=connected client=%s addr=%s keepalive=%d", client_id, link.peer, keepalive)
        self.gate.handle_connected(link)
        return link

    async def _read_loop(self, conn: _Stream | _WebSocket, link: DeviceLink) -> str:
        loop = asyncio.get_running_loop()
        client_id = link.client_id
        while not link.closed:
            ptype, flags, body = await self._read_packet(conn)
            link.last_rx = loop.time()
            if ptype == PUBLISH:
                self._handle_publish(link, flags, body)
            elif ptype == PUBACK:
                if flags != 0 or len(body) != 2:
                    raise ProtocolViolation("malformed PUBACK")
                link.acknowledge(_UNPACK_H(body)[0])
            elif ptype == PINGREQ:
                if flags != 0 or body:
                    raise ProtocolViolation("malformed PINGREQ")
                link.write_raw(PINGRESP)
            elif ptype == SUBSCRIBE:
                self._handle_subscribe(link, flags, body)
            elif ptype == UNSUBSCRIBE:
                self._handle_unsubscribe(link, flags, body)
            elif ptype == PUBREL:
                if flags != 2 or len(body) != 2:
                    raise ProtocolViolation("malformed PUBREL")
                link.write_raw(b"\x70\x02" + body)
            elif ptype in (PUBREC, PUBCOMP):
                raise ProtocolViolation("QoS 2 flow for a PUBLISH the box never sent at QoS 2")
            elif ptype == DISCONNECT:
                if flags != 0 or body:
                    raise ProtocolViolation("malformed DISCONNECT")
                log.info("event=disconnected client=%s addr=%s reason=disconnect", client_id, link.peer)
                link.close("disconnect")
                return "disconnect"
            else:
                raise ProtocolViolation(f"unexpected packet type {ptype}")
            if conn.is_websocket and link._conn.pending:  # noqa: SLF001
                await conn.flush()
        return link.close_reason

    def _handle_publish(self, link: DeviceLink, flags: int, body: bytes) -> None:
        qos = (flags >> 1) & 0x03
        if qos == 3:
            raise ProtocolViolation("PUBLISH with QoS 3")
        if len(body) < 2:
            raise ProtocolViolation("PUBLISH too short")
        tlen = _UNPACK_H(body)[0]
        end = 2 + tlen
        if end + (2 if qos else 0) > len(body):
            raise ProtocolViolation("PUBLISH topic longer than the packet")
        try:
            topic = body[2:end].decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolViolation("PUBLISH topic is not UTF-8") from None
        if not topic or "+" in topic or "#" in topic or "\x00" in topic:
            raise ProtocolViolation("PUBLISH topic is empty or has wildcards")
        pid = 0
        if qos:
            pid = _UNPACK_H(body, end)[0]
            if pid == 0:
                raise ProtocolViolation("PUBLISH packet id 0")
            end += 2
        payload = body[end:]
        kind = topics.device_publish_kind(link.client_id, topic)
        if qos == 1 and kind == "ack":
            # The PUBACK of an ack follows the ack's commit: a device that got it may forget the ack (#10).
            self.gate.handle_ack(link, payload, partial(link.write_raw, b"\x40\x02" + _PACK_H(pid)))
            return
        if qos == 1:
            link.write_raw(b"\x40\x02" + _PACK_H(pid))
        elif qos == 2:
            link.write_raw(b"\x50\x02" + _PACK_H(pid))
        if kind is None:
            # MQTT 3.1.1 cannot refuse a PUBLISH: it is acknowledged and dropped, as Mosquitto does.
            log.info("event=denied_publish client=%s topic=%r", link.client_id, topic[:128])
            return
        self.gate.handle_publish(link, kind, payload)

    def _handle_subscribe(self, link: DeviceLink, flags: int, body: bytes) -> None:
        if flags != 2:
            raise ProtocolViolation("SUBSCRIBE flags must be 2")
        pid, filters = _read_filters(body, with_options=True)
        codes = bytearray()
        for topic_filter, qos in filters:
            # One string comparison: the device's own inbox, exactly; wildcards, `$share/…`, `$SYS/…` and every
            # other device's topics are refused (#9).
            if topics.may_subscribe(link.client_id, topic_filter):
                codes.append(min(qos, 1))
                link.subscribed = True
            else:
                codes.append(0x80)
                log.info("event=denied_subscribe client=%s filter=%r", link.client_id, topic_filter[:128])
        link.write_raw(topics.mqtt_packet(0x90, _PACK_H(pid) + bytes(codes)))

    def _handle_unsubscribe(self, link: DeviceLink, flags: int, body: bytes) -> None:
        if flags != 2:
            raise ProtocolViolation("UNSUBSCRIBE flags must be 2")
        pid, filters = _read_filters(body, with_options=False)
        if any(topic_filter == topics.inbox_topic(link.client_id) for topic_filter, _ in filters):
            link.subscribed = False
        link.write_raw(b"\xb0\x02" + _PACK_H(pid))


def _read_filters(body: bytes, with_options: bool) -> tuple[int, list[tuple[str, int]]]:
    """The packet id and the (filter, QoS) list of a SUBSCRIBE (`with_options`) or UNSUBSCRIBE body. Anything
    MQTT 3.1.1 calls malformed closes the connection: no packet id or filter, ill-formed UTF-8 (overlong
    forms, surrogates), U+0000, an empty filter, reserved option bits or QoS 3."""
    if len(body) < 2 or _UNPACK_H(body)[0] == 0:
        raise ProtocolViolation("SUBSCRIBE/UNSUBSCRIBE without a packet id, or packet id 0")
    pos, size, filters = 2, len(body), []
    while pos < size:
        if pos + 2 > size:
            raise ProtocolViolation("topic filter length cut short")
        end = pos + 2 + _UNPACK_H(body, pos)[0]
        if end + (1 if with_options else 0) > size:
            raise ProtocolViolation("topic filter longer than the packet")
        try:
            topic_filter = body[pos + 2:end].decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolViolation("topic filter is not well-formed UTF-8") from None
        if not topic_filter or "\x00" in topic_filter:
            raise ProtocolViolation("empty topic filter, or U+0000 in one")
        qos = 0
        if with_options:
            qos = body[end]
            if qos > 2:
                raise ProtocolViolation("SUBSCRIBE with reserved option bits or QoS 3")
            end += 1
        filters.append((topic_filter, qos))
        pos = end
    if not filters:
        raise ProtocolViolation("SUBSCRIBE/UNSUBSCRIBE without topic filters")
    return _UNPACK_H(body)[0], filters

__all__ = ["BrokerLimits", "DeviceGate", "DeviceLink", "EmbeddedBroker", "ListenerSpec"]
