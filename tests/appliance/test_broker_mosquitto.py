"""The Mosquitto backend's own duties: supervise the child, refuse what Mosquitto cannot do, drive an
external broker through `broker.url`. (The device protocol itself runs on both backends in tests/e2e.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from appliance.broker.mosquitto_child import ACL, ChildListener, ChildSettings, free_port, render_config, render_dynsec
from tests.conftest import Box, PahoDevice, needs_mosquitto, wait_for

pytestmark = needs_mosquitto


def child_pid(box: Box) -> int | None:
    out = subprocess.run(["pgrep", "-f", str(box.data_dir / "mosquitto" / "mosquitto.conf")],
                         capture_output=True, text=True).stdout.split()
    assert len(out) <= 1, out
    return int(out[0]) if out else None


def test_dead_mosquitto_is_restarted_and_devices_catch_up(tmp_path: Path) -> None:
    box = Box(tmp_path / "box", backend="mosquitto").start()
    try:
        app = box.create_app("restart")
        e = box.enroll(app, "phone")
        device = PahoDevice(e, box.mqtt_port).connect()
        first = child_pid(box)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert device.disconnects.get(timeout=5) is not None
        wait_for(lambda: child_pid(box) not in (None, first), timeout=10)
        with box.api(app) as api:
            sent = api.post("/v1/messages", json={"to": {"token": e["token"]}, "title": "after"}).json()
        device.close()
        device = wait_for(lambda: _try_connect(e, box.mqtt_port), timeout=10)  # logins came back from the store
        assert device.next()["id"] == sent["id"]
        device.close()
        assert "event=mosquitto_exited" in box.log()
    finally:
        box.stop()


def _try_connect(e: dict, port: int) -> PahoDevice | None:
    try:
        return PahoDevice(e, port).connect()
    except (OSError, AssertionError):
        return None


def test_websocket_listener_is_refused_with_a_clear_reason(tmp_path: Path) -> None:
    box = Box(tmp_path / "box", env={"INTRAPUSH_BROKER_WS_LISTEN": "127.0.0.1:0"}, backend="mosquitto")
    with pytest.raises(RuntimeError, match="broker.ws_listen.*no WebSocket listener"):
        box.start()


def test_daemon_stops_its_mosquitto(tmp_path: Path) -> None:
    box = Box(tmp_path / "box", backend="mosquitto").start()
    pid = child_pid(box)
    assert pid is not None and box.stop() == 0
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(),
             timeout=5)


def test_external_broker_via_url(tmp_path: Path) -> None:
    """A Mosquitto the box does not run (as a cluster would be): same ACL and dynamic security, our login
    in the URL; enrollment provisions the device over $CONTROL and pushes flow."""
    d = tmp_path / "external"
    d.mkdir()
    port, admin_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    settings = ChildSettings(directory=d, listeners=[ChildListener("mqtt", "127.0.0.1", port)], max_packet_bytes=65536,
                             max_keepalive_s=1200, max_queued_bytes=1 << 20, max_connections=0,
                             internal_port=admin_port)
    dynsec, _ = render_dynsec("s3cret", [])
    (d / "dynamic-security.json").write_text(dynsec)
    (d / "acl").write_text(ACL)
    (d / "mosquitto.conf").write_text(render_config(settings))
    broker = subprocess.Popen(["mosquitto", "-c", str(d / "mosquitto.conf")], stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _port_open(admin_port), timeout=5)
        box = Box(tmp_path / "box", backend="mosquitto",
                  env={"INTRAPUSH_BROKER_URL": f"mqtt://intrapush:s3cret@127.0.0.1:{admin_port}"}).start()
        try:
            app = box.create_app("ext")
            e = box.enroll(app, "phone")
            assert e["mqtt"]["port"] == admin_port  # tell devices `public_port` in real life
            device = PahoDevice(e, port).connect()
            with box.api(app) as api:
                sent = api.post("/v1/messages", json={"to": {"token": e["token"]}, "title": "ext"}).json()
                assert device.next()["id"] == sent["id"]
                assert api.get(f"/v1/devices/{e['token']}").json()["online"] is True
            device.close()
            clients = json.loads((d / "dynamic-security.json").read_text())["clients"]
            assert e["mqtt"]["client_id"] in [c["username"] for c in clients]  # provisioned over $CONTROL
        finally:
            box.stop()
    finally:
        broker.terminate()
        broker.wait(5)


def _port_open(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        time.sleep(0.05)
        return False
