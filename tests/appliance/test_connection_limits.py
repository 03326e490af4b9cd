"""Per-source connection limits on the MQTT listeners (#10): a flooding address is refused at accept, a
storm of legitimate devices behind one address gets in over time, and Mosquitto's connection cap is
derived from the file limit it runs with."""

from __future__ import annotations

import asyncio
import random
import resource
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest

from appliance.broker.admission import ADMITTED, OVER_CONCURRENT, OVER_RATE, Admission, exempt_sources, source_key
from appliance.broker.mosquitto import PUBLISH_LANES
from appliance.broker.mosquitto_child import FILE_RESERVE, derived_max_connections
from tests.appliance.test_broker_hardening import connect_packet
from tests.conftest import Box, needs_mosquitto, wait_for

FLOODER, NEIGHBOUR = "127.0.0.2", "127.0.0.3"  # loopback addresses other than the exempt 127.0.0.1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the admission table ---------------------------------------------------------------------------------
def test_source_over_its_burst_is_refused_until_its_bucket_refills() -> None:
    clock = Clock()
    gate = Admission(rate=2.0, burst=3, max_per_source=0, clock=clock)
    assert [gate.admit("10.0.0.1")[0] for _ in range(4)] == [ADMITTED] * 3 + [OVER_RATE]
    assert gate.admit("10.0.0.2")[0] == ADMITTED  # another source has its own bucket
    clock.now += 0.5  # one token back at 2/s
    assert [gate.admit("10.0.0.1")[0] for _ in range(2)] == [ADMITTED, OVER_RATE]


def test_concurrent_cap_counts_only_connections_still_open() -> None:
    gate = Admission(rate=0, burst=1, max_per_source=2, clock=Clock())
    keys = [gate.admit("10.0.0.1")[1] for _ in range(2)]
    assert gate.admit("10.0.0.1")[0] == OVER_CONCURRENT
    gate.release(keys[0])
    assert gate.admit("10.0.0.1")[0] == ADMITTED
    gate.release(keys[1])
    gate.release(keys[0])
    assert gate.open == {}  # nothing kept for a source with nothing open


def test_refusals_of_one_source_are_logged_once_per_minute_with_their_count() -> None:
    clock = Clock()
    gate = Admission(rate=1.0, burst=1, max_per_source=0, clock=clock)
    gate.admit("10.0.0.1")
    to_log = [gate.admit("10.0.0.1")[2] for _ in range(50)]
    assert to_log[0] == 1 and sum(to_log[1:]) == 0
    clock.now += 61
    gate.admit("10.0.0.1")  # the bucket has refilled: admitted
    assert gate.admit("10.0.0.1")[2] == 50  # the 49 suppressed refusals and this one


def test_table_of_sources_stays_bounded_under_a_flood_of_source_addresses() -> None:
    clock = Clock()
    gate = Admission(rate=1.0, burst=1, max_per_source=0, max_sources=1000, clock=clock)
    for i in range(50_000):
        gate.admit(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
    assert len(gate.buckets) == 1000
    clock.now += 10  # every bucket has refilled: each admit forgets the two oldest
    for _ in range(600):
        gate.admit("192.0.2.1")
    assert len(gate.buckets) < 1000


def test_an_ipv6_host_is_limited_by_its_64_and_a_mapped_ipv4_address_as_itself() -> None:
    assert source_key("2001:db8:1:2::5") == source_key("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    assert source_key("::ffff:192.0.2.7") == "192.0.2.7"
    gate = Admission(rate=1.0, burst=1, max_per_source=0, exempt=exempt_sources("127.0.0.1, ::1"), clock=Clock())
    assert [gate.admit("127.0.0.1")[0] for _ in range(5)] == [ADMITTED] * 5
    assert [gate.admit("::1")[0] for _ in range(5)] == [ADMITTED] * 5


# -- the embedded broker ---------------------------------------------------------------------------------
def _box(tmp_path: Path, **limits: str) -> Box:
    env = {f"INTRAPUSH_BROKER_{k.upper()}": v for k, v in limits.items()}
    return Box(tmp_path / "box", env={"INTRAPUSH_BROKER_BACKEND": "embedded", **env}).start()


def _metric(box: Box, name: str) -> float:
    for line in httpx.get(box.metrics_url).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def _raw(port: int, source: str) -> socket.socket | None:
    """A TCP connection from `source`; None when the box's reset came back before connect() returned."""
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    except ConnectionResetError:
        return None


def _is_refused(sock: socket.socket | None) -> bool:
    """True when the box closed the connection without a byte; False when it is still open after 0.5 s."""
    if sock is None:
        return True
    sock.settimeout(0.5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _paho(enrollment: dict[str, Any], port: int, source: str) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=enrollment["mqtt"]["client_id"],
                         protocol=mqtt.MQTTv311)
    client.username_pw_set(enrollment["mqtt"]["username"], enrollment["mqtt"]["password"])
    client.connect("127.0.0.1", port, keepalive=30, bind_address=source)
    client.loop_start()
    return client


@pytest.fixture
def flooded(tmp_path: Path) -> Iterator[Box]:
    box = _box(tmp_path, connect_rate_per_source="1", connect_burst_per_source="5")
    yield box
    box.stop()


def test_flooding_source_is_refused_at_accept_and_does_not_stop_another_source(flooded: Box) -> None:
    app = flooded.create_app()
    neighbour = flooded.enroll(app, "neighbour")
    socks = [_raw(flooded.mqtt_port, FLOODER) for _ in range(40)]
    try:
        refused = sum(_is_refused(s) for s in socks)
        assert refused >= 30  # 5 in the burst, about one a second after
        # Another address connects at once, in the middle of the flood.
        client = _paho(neighbour, flooded.mqtt_port, NEIGHBOUR)
        wait_for(client.is_connected)
        client.disconnect()
        client.loop_stop()
        assert _metric(flooded, "intrapush_mqtt_connects_throttled_total") >= refused
        lines = [line for line in flooded.log().splitlines() if "event=refused" in line and FLOODER in line]
        assert len(lines) == 1 and "reason=connect_rate" in lines[0], lines  # logged once, not per connection
    finally:
        for s in socks:
            if s is not None:
                s.close()


def test_refused_connection_is_closed_before_the_tls_handshake(flooded: Box) -> None:
    port = flooded.port("mqtt-tls")
    socks = [_raw(port, FLOODER) for _ in range(12)]
    try:
        verdicts = [_is_refused(s) for s in socks]
        # The admitted ones wait for a ClientHello; the rest were closed before the box said anything.
        assert verdicts[:5] == [False] * 5 and sum(verdicts) >= 6, verdicts
    finally:
        for s in socks:
            if s is not None:
                s.close()


def test_loopback_address_127_0_0_1_is_exempt_by_default(flooded: Box) -> None:
    opened = [_raw(flooded.mqtt_port, "127.0.0.1") for _ in range(30)]
    socks = [s for s in opened if s is not None]
    try:
        assert len(socks) == 30
        for s in socks:
            s.sendall(connect_packet("nobody", "nobody", "wrong"))
        # Every one gets as far as its CONNACK (refused for its credentials, not by the per-source limit).
        for s in socks:
            s.settimeout(5)
            assert s.recv(4)[:2] == b"\x20\x02"
    finally:
        for s in socks:
            s.close()


def test_concurrent_cap_per_source_refuses_one_more_until_one_closes(tmp_path: Path) -> None:
    box = _box(tmp_path, connect_rate_per_source="0", max_connections_per_source="3")
    try:
        app = box.create_app()
        devices = [box.enroll(app, f"d{i}") for i in range(5)]
        clients = [_paho(e, box.mqtt_port, FLOODER) for e in devices[:3]]
        wait_for(lambda: all(c.is_connected() for c in clients))
        assert _is_refused(_raw(box.mqtt_port, FLOODER))
        other = _paho(devices[3], box.mqtt_port, NEIGHBOUR)
        wait_for(other.is_connected)
        clients[0].disconnect()
        clients[0].loop_stop()
        wait_for(lambda: _metric(box, "intrapush_devices_online") == 3)
        again = _paho(devices[4], box.mqtt_port, FLOODER)
        wait_for(again.is_connected)
        assert "reason=max_connections_per_source" in box.log()
        for c in (*clients[1:], other, again):
            c.disconnect()
            c.loop_stop()
    finally:
        box.stop()


def test_websocket_listener_applies_the_same_limits_after_the_upgrade(tmp_path: Path) -> None:
    box = _box(tmp_path, ws_listen="127.0.0.1:0", connect_rate_per_source="0.01", connect_burst_per_source="2")
    try:
        app = box.create_app()
        devices = [box.enroll(app, f"w{i}") for i in range(4)]
        port = box.port("mqtt-ws")

        def client(e: dict[str, Any], source: str) -> mqtt.Client:
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=e["mqtt"]["client_id"],
                            protocol=mqtt.MQTTv311, transport="websockets")
            c.username_pw_set(e["mqtt"]["username"], e["mqtt"]["password"])
            c.connect("127.0.0.1", port, keepalive=30, bind_address=source)
            c.loop_start()
            return c

        admitted = [client(e, FLOODER) for e in devices[:2]]
        wait_for(lambda: all(c.is_connected() for c in admitted))
        over = client(devices[2], FLOODER)
        wait_for(lambda: _metric(box, "intrapush_mqtt_connects_throttled_total") >= 1)
        assert not over.is_connected()
        neighbour = client(devices[3], NEIGHBOUR)
        wait_for(neighbour.is_connected)
        assert any("event=refused" in line and "listener=mqtt-ws" in line and "reason=connect_rate" in line
                   for line in box.log().splitlines())
        for c in (*admitted, over, neighbour):
            c.disconnect()
            c.loop_stop()
    finally:
        box.stop()


async def _enroll_many(box: Box, app: dict[str, str], n: int) -> list[dict[str, Any]]:
    limit = asyncio.Semaphore(20)
    async with httpx.AsyncClient(base_url=box.url, timeout=30,
                                 headers={"Authorization": f"Bearer {app['enrollment_secret']}"}) as http:
        async def one(i: int) -> dict[str, Any]:
            async with limit:
                r = await http.post("/v1/devices", json={"app_id": app["app_id"], "platform": "android",
                                                         "package": "com.example.app", "device_id": f"storm{i}"})
                assert r.status_code == 201, r.text
                return r.json()
        return await asyncio.gather(*(one(i) for i in range(n)))


async def _connect_with_backoff(e: dict[str, Any], port: int, source: str) -> tuple[asyncio.StreamWriter, int]:
    """A device that retries with jittered exponential back-off, as devices should (docs/protocol.md)."""
    delay, attempts = 0.1, 0
    login = connect_packet(e["mqtt"]["client_id"], e["mqtt"]["username"], e["mqtt"]["password"], keepalive=120)
    while True:
        attempts += 1
        writer = None
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
            writer.write(login)
            connack = await asyncio.wait_for(reader.readexactly(4), 30)
            assert connack == b"\x20\x02\x00\x00", connack
            return writer, attempts
        except (OSError, asyncio.IncompleteReadError):
            if writer is not None:
                writer.close()
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 3.0)


def test_storm_of_300_devices_behind_one_address_all_get_in_over_time(tmp_path: Path) -> None:
    box = _box(tmp_path, connect_rate_per_source="40", connect_burst_per_source="20")
    try:
        app = box.create_app()
        enrollments = asyncio.run(_enroll_many(box, app, 300))

        async def storm() -> list[int]:
            results = await asyncio.wait_for(asyncio.gather(
                *(_connect_with_backoff(e, box.mqtt_port, FLOODER) for e in enrollments)), 120)
            try:
                await asyncio.to_thread(wait_for, lambda: _metric(box, "intrapush_devices_online") == 300, 30)
            finally:
                for writer, _ in results:
                    writer.close()
            return [attempts for _, attempts in results]

        attempts = asyncio.run(storm())
        assert len(attempts) == 300
        assert max(attempts) > 1  # the limit did act: most were turned away at first, and got in later
        assert _metric(box, "intrapush_mqtt_connects_throttled_total") > 0
    finally:
        box.stop()


# -- Mosquitto -------------------------------------------------------------------------------------------
def test_mosquitto_max_connections_is_the_file_limit_less_its_own_files_shared_by_listeners() -> None:
    assert derived_max_connections(200_000, 1, PUBLISH_LANES) == 200_000 - FILE_RESERVE - PUBLISH_LANES
    assert derived_max_connections(20_000, 2, 16) == (20_000 - FILE_RESERVE - 16) // 2
    assert derived_max_connections(10, 1, 16) == 1


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


@needs_mosquitto
def test_mosquitto_child_runs_with_its_file_limit_and_the_derived_connection_cap(tmp_path: Path) -> None:
    box = Box(tmp_path / "box", backend="mosquitto").start()
    try:
        assert box.proc is not None
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # the daemon inherits ours
        child = next(p for p in _children(box.proc.pid) if "mosquitto" in Path(f"/proc/{p}/comm").read_text())
        limits = Path(f"/proc/{child}/limits").read_text()
        line = next(row for row in limits.splitlines() if row.startswith("Max open files"))
        assert line.split()[3:5] == [str(hard), str(hard)], line
        conf = (box.data_dir / "mosquitto" / "mosquitto.conf").read_text()
        expected = derived_max_connections(hard, 2, PUBLISH_LANES)  # the tests' box has a TLS and a plain listener
        assert conf.count(f"max_connections {expected}\n") == 2, conf
        assert f"event=mosquitto_limits file_limit={hard} max_connections={expected}" in box.log()
    finally:
        box.stop()


@needs_mosquitto
def test_mosquitto_keeps_an_explicit_max_connections(tmp_path: Path) -> None:
    box = Box(tmp_path / "box", backend="mosquitto", env={"INTRAPUSH_BROKER_MAX_CONNECTIONS": "777"}).start()
    try:
        conf = (box.data_dir / "mosquitto" / "mosquitto.conf").read_text()
        assert conf.count("max_connections 777\n") == 2
    finally:
        box.stop()
