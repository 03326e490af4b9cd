"""Both broker backends face hostile and broken clients: raw MQTT packets on a real socket.

Where a defect is generic, the same probe also runs against stock amqtt 0.12.1 and must fail there
(strict xfail): the test proves it detects the defect the hardened broker fixes. Where Mosquitto 2.0.11
behaves differently, the test says how, and docs/broker.md states it.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import Box, PahoDevice, needs_mosquitto, wait_for

DATA = Path(__file__).parent.parent / "data"
STOCK = pytest.param("stock-amqtt", marks=pytest.mark.xfail(strict=True, reason="defect of stock amqtt 0.12.1"))
MOSQUITTO = pytest.param("mosquitto", marks=needs_mosquitto)
# Mosquitto 2.0.11 checks keepalives about every 5 s: a silent client goes between 1.5 x and 1.5 x + 5 s.
KEEPALIVE_SLACK_S = {"embedded": 0.0, "mosquitto": 5.5}


def _string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    out, n = bytearray([first]), len(body)
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out) + body


def connect_packet(client_id: str, user: str | None, password: str | None, keepalive: int = 60,
                   level: int = 4) -> bytes:
    flags = 0x02 | (0x80 if user else 0) | (0x40 if password else 0)
    payload = _string(client_id) + (_string(user) if user else b"") + (_string(password) if password else b"")
    return _packet(0x10, _string("MQTT") + bytes([level, flags]) + struct.pack("!H", keepalive) + payload)


def publish_packet(topic: str, payload: bytes, qos: int = 0, retain: bool = False, pid: int = 1) -> bytes:
    body = _string(topic) + (struct.pack("!H", pid) if qos else b"") + payload
    return _packet(0x30 | (qos << 1) | int(retain), body)


def subscribe_packet(topic: str, pid: int = 1) -> bytes:
    return _packet(0x82, struct.pack("!H", pid) + _string(topic) + b"\x01")


def read_packet(sock: socket.socket, timeout: float = 5) -> tuple[int, bytes]:
    sock.settimeout(timeout)
    head = _recv_exactly(sock, 2)
    length, mult, digit = head[1] & 0x7F, 128, head[1]
    while digit & 0x80:
        digit = _recv_exactly(sock, 1)[0]
        length += (digit & 0x7F) * mult
        mult *= 128
    return head[0], _recv_exactly(sock, length) if length else b""


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the peer closes the connection within `seconds` (data before EOF is read and dropped)."""
    deadline = time.monotonic() + seconds
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except (TimeoutError, socket.timeout):
        return False
    return False


@dataclass
class Target:
    name: str
    port: int
    box: Box | None

    def credentials(self, label: str = "") -> tuple[str, str | None, str | None, dict | None]:
        if self.box is None:
            cid = f"probe-{label}-{uuid.uuid4().hex[:6]}"
            return cid, None, None, None
        app = self.box.create_app("probe-" + uuid.uuid4().hex[:8])
        e = self.box.enroll(app, f"probe-{label}")
        return e["mqtt"]["client_id"], e["mqtt"]["username"], e["mqtt"]["password"], e

    def open(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5)

    def login(self, label: str = "", keepalive: int = 60) -> tuple[socket.socket, str]:
        cid, user, password, _ = self.credentials(label)
        sock = self.open()
        sock.sendall(connect_packet(cid, user, password, keepalive))
        kind, body = read_packet(sock)
        assert kind == 0x20 and body[1] == 0, body
        return sock, cid


def _start_hardened(tmp_path_factory: pytest.TempPathFactory, backend: str) -> Box:
    env = {"INTRAPUSH_BROKER_CONNECT_TIMEOUT_S": "1", "INTRAPUSH_BROKER_MAX_PACKET_BYTES": "4096"}
    return Box(tmp_path_factory.mktemp("hard") / "box", env=env, backend=backend).start()


@pytest.fixture(scope="module")
def embedded_box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    box = _start_hardened(tmp_path_factory, "embedded")
    yield box
    box.stop()


@pytest.fixture(scope="module")
def mosquitto_box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    box = _start_hardened(tmp_path_factory, "mosquitto")
    yield box
    box.stop()


@pytest.fixture(params=["embedded", MOSQUITTO])
def hardened_box(request: pytest.FixtureRequest) -> Box:
    """The box under attack, on each backend (one daemon per backend for the whole module)."""
    return request.getfixturevalue(f"{request.param}_box")


@pytest.fixture(scope="module")
def stock_port() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, str(DATA / "stock_amqtt.py")], stdout=subprocess.PIPE, text=True)
    try:
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(params=["embedded", MOSQUITTO, STOCK])
def target(request: pytest.FixtureRequest) -> Target:
    if request.param == "stock-amqtt":
        return Target("stock-amqtt", request.getfixturevalue("stock_port"), None)
    box = request.getfixturevalue(f"{request.param}_box")
    return Target(request.param, box.mqtt_port, box)


def test_silent_client_is_closed_after_keepalive_times_grace(target: Target) -> None:
    sock, _ = target.login("silent", keepalive=1)
    started = time.monotonic()
    slack = KEEPALIVE_SLACK_S.get(target.name, 0.0)
    assert closed_within(sock, 4 + slack)
    assert 1.3 <= time.monotonic() - started <= 3.5 + slack


def test_connection_that_sends_no_connect_is_closed(target: Target) -> None:
    if target.name == "mosquitto":
        pytest.xfail("Mosquitto 2.0.11 never closes a connection that sends no CONNECT (docs/broker.md)")
    sock = target.open()
    assert closed_within(sock, 3)


def test_first_packet_other_than_connect_is_refused(target: Target) -> None:
    sock = target.open()
    sock.sendall(b"\xc0\x00")  # PINGREQ
    assert closed_within(sock, 2)


def test_malformed_remaining_length_closes_the_connection(target: Target) -> None:
    sock, _ = target.login("badlen")
    sock.sendall(b"\x30\xff\xff\xff\xff\x01")
    assert closed_within(sock, 2)


def test_topic_longer_than_the_packet_closes_the_connection(target: Target) -> None:
    sock, _ = target.login("badtopic")
    sock.sendall(_packet(0x30, struct.pack("!H", 200) + b"short"))
    assert closed_within(sock, 2)


def test_oversized_packet_is_refused_before_its_body_is_read(target: Target) -> None:
    sock, _ = target.login("huge")
    sock.sendall(b"\x30" + bytes([0x80, 0x80, 0x80, 0x0A]) + b"x" * 100)  # announces 20 MiB
    assert closed_within(sock, 2)


def test_retained_message_never_reaches_another_client(target: Target) -> None:
    victim_cid, user, password, _ = target.credentials("victim")
    attacker, _ = target.login("attacker")
    inbox = f"push/{victim_cid}/inbox"
    attacker.sendall(publish_packet(inbox, b'{"id":"forged"}', qos=1, retain=True))
    read_packet(attacker)  # PUBACK
    victim = target.open()
    victim.sendall(connect_packet(victim_cid, user, password))
    assert read_packet(victim)[0] == 0x20
    victim.sendall(subscribe_packet(inbox))
    kind, _ = read_packet(victim)
    assert kind == 0x90
    victim.settimeout(0.7)
    with pytest.raises((TimeoutError, socket.timeout)):
        victim.recv(1)


# --- intrapush-only probes (stock amqtt has no device identities to compare with) ---------------

def test_wrong_password_with_a_victims_client_id_cannot_disturb_it(hardened_box: Box) -> None:
    app = hardened_box.create_app("takeover-" + uuid.uuid4().hex[:6])
    e = hardened_box.enroll(app, "victim")
    victim = PahoDevice(e, hardened_box.mqtt_port).connect()
    sock = socket.create_connection(("127.0.0.1", hardened_box.mqtt_port))
    sock.sendall(connect_packet(e["mqtt"]["client_id"], e["mqtt"]["username"], "wrong-password"))
    kind, body = read_packet(sock)
    assert kind == 0x20 and body[1] in (4, 5)
    assert closed_within(sock, 2)
    with hardened_box.api(app) as api:
        r = api.post("/v1/messages", json={"to": {"token": e["token"]}, "title": "still here"})
        assert r.status_code == 202
    assert victim.next()["title"] == "still here"
    assert victim.disconnects.empty()
    victim.close()


def test_device_reaches_only_its_own_topics(hardened_box: Box) -> None:
    app = hardened_box.create_app("acl-" + uuid.uuid4().hex[:6])
    a, b = hardened_box.enroll(app, "a"), hardened_box.enroll(app, "b")
    device_b = PahoDevice(b, hardened_box.mqtt_port).connect()
    sock = socket.create_connection(("127.0.0.1", hardened_box.mqtt_port))
    sock.sendall(connect_packet(a["mqtt"]["client_id"], a["mqtt"]["username"], a["mqtt"]["password"]))
    assert read_packet(sock)[1][1] == 0
    # Both backends refuse a foreign filter (0x80); tests/appliance/test_device_isolation.py attacks more (#9).
    for pid, topic in enumerate((b["inbox_topic"], "#", "push/+/inbox", "$SYS/#"), start=1):
        sock.sendall(subscribe_packet(topic, pid))
        kind, body = read_packet(sock)
        assert kind == 0x90 and body[2] == 0x80, topic
    # Publishing into b's topics is acknowledged (MQTT 3.1.1 cannot refuse) and dropped.
    sock.sendall(publish_packet(b["inbox_topic"], b'{"id":"forged"}', qos=1, pid=9))
    sock.sendall(publish_packet(b["ack_topic"], b'{"ids":[],"state":"opened"}', qos=1, pid=10))
    assert read_packet(sock)[0] == 0x40 and read_packet(sock)[0] == 0x40
    assert device_b.nothing_within(0.5)
    with hardened_box.api(app) as api:
        assert api.post("/v1/messages", json={"to": {"token": b["token"]}, "title": "for b"}).status_code == 202
    assert device_b.next()["title"] == "for b"
    sock.settimeout(0.5)
    with pytest.raises((TimeoutError, socket.timeout)):
        sock.recv(1)  # a's subscriptions to b's inbox, '#' and 'push/+/inbox' got nothing
    device_b.close()


def test_keepalive_timeout_marks_the_device_offline(hardened_box: Box) -> None:
    app = hardened_box.create_app("ka-" + uuid.uuid4().hex[:6])
    e = hardened_box.enroll(app, "sleepy")
    sock = socket.create_connection(("127.0.0.1", hardened_box.mqtt_port))
    sock.sendall(connect_packet(e["mqtt"]["client_id"], e["mqtt"]["username"], e["mqtt"]["password"], keepalive=1))
    read_packet(sock)
    with hardened_box.api(app) as api:
        assert api.get(f"/v1/devices/{e['token']}").json()["online"] is True
        wait_for(lambda: api.get(f"/v1/devices/{e['token']}").json()["online"] is False,
                 timeout=5 + KEEPALIVE_SLACK_S[hardened_box.backend])


def test_mqtt5_is_refused_with_unacceptable_protocol_version(hardened_box: Box) -> None:
    if hardened_box.backend == "mosquitto":
        pytest.skip("Mosquitto speaks MQTT 5 too; the same ACLs apply (docs/broker.md)")
    sock = socket.create_connection(("127.0.0.1", hardened_box.mqtt_port))
    sock.sendall(connect_packet("x", None, None, level=5))
    kind, body = read_packet(sock)
    assert kind == 0x20 and body[1] == 1
    assert closed_within(sock, 2)


def test_bad_json_from_a_device_is_ignored_and_the_box_keeps_serving(hardened_box: Box) -> None:
    app = hardened_box.create_app("junk-" + uuid.uuid4().hex[:6])
    e = hardened_box.enroll(app, "junk")
    device = PahoDevice(e, hardened_box.mqtt_port).connect(cursor=None)
    # A hello whose cursor is not an int in [0, 2^63) closes the connection (tests/e2e/test_device_bounds.py).
    for junk in (b"not json", b"[1,2]", b"\xff\xfe", b""):
        device.client.publish(e["hello_topic"], junk, qos=1).wait_for_publish(5)
        device.client.publish(e["ack_topic"], junk, qos=1).wait_for_publish(5)
    device.client.publish(e["ack_topic"], json.dumps({"ids": ["x"] * 5, "state": "eaten"}), qos=1).wait_for_publish(5)
    for _ in range(20):  # garbage connections
        s = socket.create_connection(("127.0.0.1", hardened_box.mqtt_port))
        s.sendall(b"\x10\x05garbage" + bytes(range(256)))
        s.close()
    device.hello(0)
    with hardened_box.api(app) as api:
        r = api.post("/v1/messages", json={"to": {"token": e["token"]}, "title": "alive"})
        assert r.status_code == 202
    assert device.next()["title"] == "alive"
    assert httpx.get(f"{hardened_box.url}/healthz").json() == {"status": "ok"}
    device.close()


def test_pinging_client_outlives_the_keepalive_window(hardened_box: Box) -> None:
    app = hardened_box.create_app("ping-" + uuid.uuid4().hex[:6])
    e = hardened_box.enroll(app, "pinger")
    sock = socket.create_connection(("127.0.0.1", hardened_box.mqtt_port))
    sock.sendall(connect_packet(e["mqtt"]["client_id"], e["mqtt"]["username"], e["mqtt"]["password"], keepalive=1))
    read_packet(sock)
    for _ in range(6):  # 3 s: twice the 1.5 s window
        time.sleep(0.5)
        sock.sendall(b"\xc0\x00")
        assert read_packet(sock)[0] == 0xD0
    with hardened_box.api(app) as api:
        assert api.get(f"/v1/devices/{e['token']}").json()["online"] is True


def test_device_that_stops_reading_is_dropped_and_its_pushes_wait(tmp_path: Path) -> None:
    box = Box(tmp_path / "box", env={"INTRAPUSH_BROKER_MAX_WRITE_BUFFER_BYTES": "65536"}).start()
    try:
        app = box.create_app("slow")
        e = box.enroll(app, "slow")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", box.mqtt_port))
        sock.sendall(connect_packet(e["mqtt"]["client_id"], e["mqtt"]["username"], e["mqtt"]["password"]))
        read_packet(sock)
        sock.sendall(subscribe_packet(e["inbox_topic"]))
        read_packet(sock)
        sock.sendall(publish_packet(e["hello_topic"], b'{"cursor":0}'))
        body = "x" * 3000
        with box.api(app) as api:
            for _ in range(4):  # 2,000 pushes of 3 KB: far beyond what the socket buffers hold
                batch = [{"to": {"token": e["token"]}, "body": body} for _ in range(500)]
                assert api.post("/v1/messages", json={"messages": batch}).status_code == 202
            wait_for(lambda: api.get(f"/v1/devices/{e['token']}").json()["online"] is False, timeout=10)
        assert "reason=slow_consumer" in box.log()
        sock.close()
        device = PahoDevice(e, box.mqtt_port).connect(cursor=0)
        # The store kept every push up to the inbox limit (1,000) and says what overflowed.
        assert device.next() == {"type": "resync", "through": 1000}
        assert [device.next()["seq"] for _ in range(1000)] == list(range(1001, 2001))
        device.close()
    finally:
        box.stop()
