"""A lean load generator: thousands of MQTT 3.1.1 devices in one asyncio process (one Protocol object and
one socket each, no task per device), speaking the intrapush device protocol: CONNECT, SUBSCRIBE inbox,
hello with cursor (pipelined in one write), PUBACK every push and ack them (one ack message for all the
pushes that arrive in one read, as the protocol's `ids` list allows). Also a raw 1 -> 1 QoS 1 relay for
the baselines. Traffic goes to 127.0.0.0/8 only.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from appliance.broker.topics import mqtt_packet as packet
from appliance.broker.topics import mqtt_string as _string

_PACK_H = struct.Struct("!H").pack
_UNPACK_H = struct.Struct("!H").unpack_from
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux 4.2
SOURCES_PER_ADDRESS = 20000  # sockets per source address 127.0.0.x (well inside the ephemeral port range)


def frame(buf: bytearray, pos: int, end: int) -> tuple[int, int] | None:
    """Where the body of the packet at `pos` starts and ends, or None until all of it is in `buf[:end]`."""
    i, length, mult = pos + 1, 0, 1
    while i < end:
        digit = buf[i]
        i += 1
        length += (digit & 0x7F) * mult
        mult *= 128
        if not digit & 0x80:
            return (i, i + length) if i + length <= end else None
    return None


def connect_packet(client_id: str, username: str | None, password: str | None, keepalive: int,
                   will_topic: str | None = None) -> bytes:
    flags, payload = 0x02, _string(client_id)
    if will_topic:
        flags |= 0x04 | 0x08
        payload += _string(will_topic) + _string(b'{"online":false}')
    if username:
        flags |= 0x80
        payload += _string(username)
    if password:
        flags |= 0x40
        payload += _string(password)
    return packet(0x10, b"\x00\x04MQTT\x04" + bytes([flags]) + _PACK_H(keepalive) + payload)


@dataclass
class Stats:
    received: int = 0  # pushes (not resync notices)
    latencies: list[float] = field(default_factory=list)
    record_latency: bool = False
    connected: int = 0
    lost: int = 0
    waiters: list[tuple[int, asyncio.Future[None]]] = field(default_factory=list)

    def wait_received(self, count: int) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.received >= count:
            fut.set_result(None)
        else:
            self.waiters.append((count, fut))
        return fut

    def _check(self) -> None:
        if self.waiters and self.received >= self.waiters[0][0]:
            keep = []
            for count, fut in self.waiters:
                if self.received >= count:
                    if not fut.done():
                        fut.set_result(None)
                else:
                    keep.append((count, fut))
            self.waiters = keep


class DeviceProtocol(asyncio.Protocol):
    """One simulated device. `ready` resolves at SUBACK (CONNECT, SUBSCRIBE and hello went in one write)."""

    def __init__(self, enrollment: dict[str, Any], stats: Stats, keepalive: int) -> None:
        self.e = enrollment
        self.stats = stats
        self.keepalive = keepalive
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.cursor = 0
        self.got = 0
        self.pid = 0
        self.acks: list[bytes] = []
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.connected = False
        mqtt = enrollment["mqtt"]
        self.ack_topic = _string(enrollment["ack_topic"])
        self.hello = packet(0x32, _string(enrollment["hello_topic"]) + _PACK_H(2) + b'{"cursor":%d}')
        self.opening = (connect_packet(mqtt["client_id"], mqtt["username"], mqtt["password"], keepalive,
                                       enrollment["status_topic"])
                        + packet(0x82, _PACK_H(1) + _string(enrollment["inbox_topic"]) + b"\x01"))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        hello = packet(0x32, _string(self.e["hello_topic"]) + _PACK_H(2) + b'{"cursor":%d}' % self.cursor)
        transport.write(self.opening + hello)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.connected:
            self.stats.lost += 1
            self.stats.connected -= 1
        self.connected = False
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before SUBACK: {exc}"))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos, end = 0, len(buf)
        out = []
        while (bounds := frame(buf, pos, end)) is not None:
            first, (i, body_end) = buf[pos], bounds
            ptype = first >> 4
            if ptype == 3:
                tlen = _UNPACK_H(buf, i)[0]
                off = i + 2 + tlen
                if first & 0x06:
                    out.append(b"\x40\x02" + bytes(buf[off:off + 2]))
                    off += 2
                self._on_push(bytes(buf[off:body_end]), out)
            elif ptype == 2:
                if buf[i + 1] != 0:
                    self.ready.set_exception(ConnectionError(f"CONNACK {buf[i + 1]}"))
            elif ptype == 9:
                self.connected = True
                self.stats.connected += 1
                if not self.ready.done():
                    self.ready.set_result(None)
            pos = body_end
        self._keep(pos, out)

    def _keep(self, pos: int, out: list[bytes]) -> None:
        del self.buf[:pos]
        if self.acks:  # everything that arrived together is acked in one message, as an app does
            self.pid = self.pid % 65000 + 3
            out.append(packet(0x32, self.ack_topic + _PACK_H(self.pid) + b'{"ids":["%s"]}' % b'","'.join(self.acks)))
            self.acks = []
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def _on_push(self, payload: bytes, out: list[bytes]) -> None:
        doc = json.loads(payload)
        if doc.get("type") == "resync":
            self.cursor = max(self.cursor, doc["through"])
            return
        self.cursor = max(self.cursor, doc["seq"])
        self.got += 1
        stats = self.stats
        stats.received += 1
        if stats.record_latency and doc.get("data"):
            stats.latencies.append(time.time() - doc["data"]["t"])
        self.acks.append(doc["id"].encode())
        stats._check()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # no DISCONNECT: as a phone losing its network


class Fleet:
    """Many devices; connect() opens them with bounded concurrency, from 127.0.0.x source addresses."""

    def __init__(self, enrollments: list[dict[str, Any]], host: str, port: int, keepalive: int = 600) -> None:
        self.enrollments = enrollments
        self.host, self.port, self.keepalive = host, port, keepalive
        self.stats = Stats()
        self.devices: list[DeviceProtocol] = []

    async def connect(self, concurrency: int = 400, timeout: float = 300) -> float:
        """Connect every device (keeping each one's cursor); returns the seconds it took."""
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(concurrency)
        old = {id(d.e): d.cursor for d in self.devices}
        self.devices = []

        async def one(i: int, e: dict[str, Any]) -> DeviceProtocol:
            async with sem:
                source = (f"127.0.0.{1 + i // SOURCES_PER_ADDRESS}", 0)
                error: BaseException | None = None
                for attempt in range(20):  # bounded retries: a refused SYN under a storm
                    proto = DeviceProtocol(e, self.stats, self.keepalive)
                    proto.cursor = old.get(id(e), 0)
                    try:
                        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                        # Bind the source address only; the port is picked at connect() from the whole
                        # 4-tuple. A bind() to port 0 searches every port in use: at 10,000 sockets that
                        # search took a whole core of kernel time and throttled the generator.
                        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                        sock.setblocking(False)
                        sock.bind(source)
                        try:
                            await loop.sock_connect(sock, (self.host, self.port))
                        except BaseException:
                            sock.close()
                            raise
                        await loop.create_connection(lambda p=proto: p, sock=sock)
                        await asyncio.wait_for(proto.ready, 30)
                        return proto
                    except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
                        proto.close()
                        error = exc
                        await asyncio.sleep(0.05 * (attempt + 1))
                raise RuntimeError(f"device {i} could not connect: {error!r}")

        t = time.perf_counter()
        self.devices = list(await asyncio.wait_for(
            asyncio.gather(*(one(i, e) for i, e in enumerate(self.enrollments))), timeout))
        return time.perf_counter() - t

    def drop_all(self) -> None:
        for d in self.devices:
            d.close()


async def relay_rate(host: str, port: int, messages: int, payload: int = 100, window: int = 1000,
                     auth: tuple[str, str] | None = None) -> float:
    """Raw broker baseline: one publisher -> one subscriber, QoS 1, `payload` bytes; messages per second
    from the first PUBLISH to the last one received by the subscriber."""
    loop = asyncio.get_running_loop()
    got = 0
    done = loop.create_future()
    sub_ready = loop.create_future()
    acked = asyncio.Semaphore(window)

    class Sub(asyncio.Protocol):
        def connection_made(self, t: asyncio.BaseTransport) -> None:
            self.t, self.buf = t, bytearray()
            t.write(connect_packet("bench-sub", *(auth or (None, None)), 60)  # type: ignore[attr-defined]
                    + packet(0x82, _PACK_H(1) + _string("bench/relay") + b"\x01"))

        def data_received(self, data: bytes) -> None:
            nonlocal got
            self.buf += data
            buf, pos, out = self.buf, 0, []
            while (bounds := frame(buf, pos, len(buf))) is not None:
                i, body_end = bounds
                if buf[pos] >> 4 == 3:
                    tlen = _UNPACK_H(buf, i)[0]
                    out.append(b"\x40\x02" + bytes(buf[i + 2 + tlen:i + 4 + tlen]))
                    got += 1
                    if got == messages and not done.done():
                        done.set_result(None)
                elif buf[pos] >> 4 == 9 and not sub_ready.done():
                    sub_ready.set_result(None)
                pos = body_end
            del buf[:pos]
            if out:
                self.t.write(b"".join(out))  # type: ignore[attr-defined]

    class Pub(asyncio.Protocol):
        def connection_made(self, t: asyncio.BaseTransport) -> None:
            self.t, self.buf = t, bytearray()
            t.write(connect_packet("bench-pub", *(auth or (None, None)), 60))  # type: ignore[attr-defined]

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while len(self.buf) >= 2 and len(self.buf) >= 2 + self.buf[1]:
                if self.buf[0] >> 4 == 4:
                    acked.release()
                del self.buf[:2 + self.buf[1]]

    sub_t, _ = await loop.create_connection(Sub, host, port)
    await asyncio.wait_for(sub_ready, 10)
    pub_t, _ = await loop.create_connection(Pub, host, port)
    await asyncio.sleep(0.1)
    body = b"x" * payload
    topic = _string("bench/relay")
    t = time.perf_counter()
    for n in range(messages):
        await acked.acquire()
        pub_t.write(packet(0x32, topic + _PACK_H(n % 65000 + 1) + body))
    await asyncio.wait_for(done, 120)
    rate = messages / (time.perf_counter() - t)
    pub_t.close()
    sub_t.close()
    return rate
