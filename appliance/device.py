"""The Python device SDK: enroll over HTTP, hold one MQTT 3.1.1 connection, say hello with a cursor,
receive pushes in order, acknowledge them. Small enough to hold thousands of devices in one process
(benchmarks and `intrapush device simulate` use it).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import struct
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from appliance.broker.topics import mqtt_packet, mqtt_string

_PACK_H = struct.Struct("!H").pack
_UNPACK_H = struct.Struct("!H").unpack_from


class MqttRefused(Exception):
    """CONNACK with a non-zero return code."""

    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(f"CONNACK return code {code}")


def tls_context(cafile: str | None = None, cadata: str | None = None) -> ssl.SSLContext:
    """A client context that trusts the box's CA (its PEM file, or the `ca_pem` of an enrollment answer)."""
    return ssl.create_default_context(cafile=cafile, cadata=cadata)


class EnrollmentRefused(Exception):
    """The box refused the enrollment: `status` and the error body (`code`, `error`) say why."""

    def __init__(self, status: int, doc: Any) -> None:
        self.status = status
        self.doc = doc
        detail = doc.get("error") if isinstance(doc, dict) else doc
        code = doc.get("code") if isinstance(doc, dict) else None
        super().__init__(f"HTTP {status}" + (f" code {code}" if code else "") + f": {detail}")


async def enroll(url: str, app_id: str, credential: str, device_id: str, platform: str = "desktop",
                 package: str = "com.example.app", previous: dict[str, str] | None = None,
                 session: aiohttp.ClientSession | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> dict[str, Any]:
    """POST /v1/devices with the app's enrollment secret (an anonymous device) or a one-time ticket from the
    app server (a device bound to a user); `previous` ({"token", "password"}) retires the token it replaces.
    Returns the enrollment answer (token, mqtt credentials, topics, keepalive, CA)."""
    body: dict[str, Any] = {"app_id": app_id, "platform": platform, "package": package, "device_id": device_id}
    if previous:
        body["previous"] = previous
    own = session is None
    session = session or aiohttp.ClientSession()
    try:
        async with session.post(f"{url}/v1/devices", json=body, ssl=ssl_context if ssl_context else True,
                                headers={"Authorization": f"Bearer {credential}"}) as resp:
            text = await resp.text()
            try:
                doc = json.loads(text)
            except ValueError:
                doc = text[:500]
            if resp.status != 201:
                raise EnrollmentRefused(resp.status, doc)
            return doc
    finally:
        if own:
            await session.close()


class Device:
    """One device connection. Pushes arrive in `pushes` (dicts); resync notices have type=resync."""

    def __init__(self, enrollment: dict[str, Any], host: str | None = None, port: int | None = None,
                 on_push: Callable[[dict[str, Any]], None] | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.enrollment = enrollment
        mqtt = enrollment["mqtt"]
        self.host = host or mqtt["host"]
        self.port = port or mqtt["port"]
        # TLS when the box says so: trust the CA it sent at enrollment unless told otherwise.
        self.ssl_context = ssl_context
        if ssl_context is None and mqtt.get("tls"):
            self.ssl_context = tls_context(cadata=enrollment["ca_pem"])
        self.client_id = mqtt["client_id"]
        self.cursor = 0
        self.pushes: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.on_push = on_push
        self.connected = False
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._pid = 0
        self._suback: asyncio.Future[bytes] | None = None
        self.closed = asyncio.Event()

    def _next_pid(self) -> int:
        self._pid = self._pid % 65535 + 1
        return self._pid

    async def connect(self, keepalive: int | None = None, hello: bool = True, will: bool = True,
                      timeout: float = 10.0) -> None:
        """Connect, subscribe to the inbox, then say hello with the cursor (unless hello=False)."""
        e = self.enrollment
        keepalive = keepalive or e["keepalive_s"]
        self.closed.clear()
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=self.ssl_context), timeout)
        flags = 0x80 | 0x40 | 0x02
        payload = mqtt_string(self.client_id)
        if will:
            flags |= 0x04 | 0x08  # will, QoS 1
            payload += mqtt_string(e["status_topic"]) + mqtt_string(b'{"online":false}')
        payload += mqtt_string(e["mqtt"]["username"]) + mqtt_string(e["mqtt"]["password"])
        self._writer.write(mqtt_packet(0x10, b"\x00\x04MQTT\x04" + bytes([flags]) + _PACK_H(keepalive) + payload))
        head = await asyncio.wait_for(self._reader.readexactly(4), timeout)
        if head[0] != 0x20 or head[3] != 0:
            self._writer.close()
            raise MqttRefused(head[3])
        self.connected = True
        loop = asyncio.get_running_loop()
        self._suback = loop.create_future()
        self._tasks = [asyncio.create_task(self._read_loop()), asyncio.create_task(self._ping_loop(keepalive))]
        self._writer.write(mqtt_packet(0x82, _PACK_H(self._next_pid()) + mqtt_string(e["inbox_topic"]) + b"\x01"))
        codes = await asyncio.wait_for(self._suback, timeout)
        if codes[0] == 0x80:
            raise RuntimeError("the box refused the inbox subscription")
        if hello:
            self.say_hello()

    def say_hello(self, cursor: int | None = None) -> None:
        self.publish(self.enrollment["hello_topic"], {"cursor": self.cursor if cursor is None else cursor})

    def publish(self, topic: str, doc: Any, qos: int = 1) -> None:
        assert self._writer is not None
        data = json.dumps(doc).encode() if not isinstance(doc, bytes) else doc
        if qos:
            self._writer.write(mqtt_packet(0x30 | (qos << 1), mqtt_string(topic) + _PACK_H(self._next_pid()) + data))
        else:
            self._writer.write(mqtt_packet(0x30, mqtt_string(topic) + data))

    def ack(self, ids: list[str], state: str = "received") -> None:
        self.publish(self.enrollment["ack_topic"], {"ids": ids, "state": state})

    async def _read_loop(self) -> None:
        reader, writer = self._reader, self._writer
        assert reader is not None and writer is not None
        try:
            while True:
                head = await reader.readexactly(2)
                length, multiplier, digit = head[1] & 0x7F, 128, head[1]
                while digit & 0x80:
                    digit = (await reader.readexactly(1))[0]
                    length += (digit & 0x7F) * multiplier
                    multiplier *= 128
                body = await reader.readexactly(length) if length else b""
                ptype = head[0] >> 4
                if ptype == 3:
                    qos = (head[0] >> 1) & 3
                    tlen = _UNPACK_H(body)[0]
                    off = 2 + tlen
                    if qos:
                        writer.write(b"\x40\x02" + body[off:off + 2])
                        off += 2
                    doc = json.loads(body[off:])
                    kind = doc.get("type")
                    if kind == "resync":
                        self.cursor = max(self.cursor, doc["through"])
                    elif kind is None:
                        self.cursor = max(self.cursor, doc["seq"])
                    # "gap" and "ack_receipt" notices leave the cursor alone (docs/protocol.md)
                    if self.on_push is not None:
                        self.on_push(doc)
                    else:
                        self.pushes.put_nowait(doc)
                elif ptype == 9 and self._suback is not None and not self._suback.done():
                    self._suback.set_result(body[2:])
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self.connected = False
            self.closed.set()
            if self._suback is not None and not self._suback.done():
                self._suback.set_exception(ConnectionError("closed before SUBACK"))

    async def _ping_loop(self, keepalive: int) -> None:
        while self._writer is not None and not self._writer.is_closing():
            await asyncio.sleep(keepalive * 0.75)
            self._writer.write(b"\xc0\x00")

    async def next_push(self, timeout: float = 10.0) -> dict[str, Any]:
        return await asyncio.wait_for(self.pushes.get(), timeout)

    async def close(self, clean: bool = True) -> None:
        """Disconnect (clean: DISCONNECT first, so no last will) and stop the tasks."""
        if self._writer is not None and not self._writer.is_closing():
            if clean:
                self._writer.write(b"\xe0\x00")
            self._writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self.connected = False


async def simulate(url: str, app_id: str, credentials: list[str], seconds: float, platform: str,
                   mqtt_host: str | None, cafile: str | None = None) -> int:
    """Enroll one device per credential (the enrollment secret, or a ticket), connect them, print every push
    they get and ack it as opened."""
    stop_at = time.monotonic() + seconds if seconds else None
    devices: list[Device] = []
    https = tls_context(cafile=cafile) if url.startswith("https:") else None
    async with aiohttp.ClientSession() as session:
        for i, credential in enumerate(credentials):
            answer = await enroll(url, app_id, credential, f"simulated-{i}", platform, "org.intrapush.simulator",
                                  session=session, ssl_context=https)

            def show(doc: dict[str, Any], n: int = i) -> None:
                dev = devices[n]
                print(json.dumps({"device": n, "token": dev.enrollment["token"], "push": doc}), flush=True)
                if "id" in doc:
                    dev.ack([doc["id"]], "opened")

            dev = Device(answer, host=mqtt_host, on_push=show)
            devices.append(dev)
            await dev.connect()
            print(json.dumps({"device": i, "token": answer["token"], "alias": answer.get("alias"), "connected": True}),
                  flush=True)
    try:
        while stop_at is None or time.monotonic() < stop_at:
            await asyncio.sleep(0.2)
            for i, dev in enumerate(devices):
                if not dev.connected:
                    print(json.dumps({"device": i, "reconnecting": True}), flush=True)
                    await dev.connect()
    finally:
        for dev in devices:
            await dev.close()
    return 0
