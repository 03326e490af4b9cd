"""Nothing private on the provider listener (#9): Prometheus metrics are served on `metrics.listen` and
through the admin socket, never on the port every application server reaches."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import Box


def admin_get(box: Box, path: str) -> httpx.Response:
    transport = httpx.HTTPTransport(uds=box.addresses["admin"])
    with httpx.Client(transport=transport, base_url="http://box") as client:
        return client.get(path)


def test_provider_port_answers_404_for_metrics_in_the_error_shape(shared_box: Box) -> None:
    for base in (shared_box.url, f"https://{shared_box.addresses['https']}"):
        r = httpx.get(f"{base}/metrics", verify=False)
        assert r.status_code == 404
        assert r.json()["code"] == 40404 and r.json()["http"] == 404
        assert "intrapush_" not in r.text


def test_metrics_listener_serves_prometheus_text(shared_box: Box) -> None:
    r = httpx.get(shared_box.metrics_url)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE intrapush_pushes_accepted_total counter" in r.text
    assert any(line.startswith("intrapush_devices_online ") for line in r.text.splitlines())
    assert shared_box.addresses["metrics"].startswith("127.0.0.1:")
    other = httpx.get(shared_box.metrics_url.replace("/metrics", "/v1/messages"))
    assert other.status_code == 404  # the metrics listener serves metrics only


def test_admin_socket_serves_the_same_metrics(shared_box: Box) -> None:
    r = admin_get(shared_box, "/admin/metrics")
    assert r.status_code == 200 and "# TYPE intrapush_acks_total counter" in r.text


def test_public_endpoints_reveal_nothing_private(shared_box: Box) -> None:
    health = httpx.get(f"{shared_box.url}/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert httpx.get(f"{shared_box.url}/openapi.json").status_code == 200
    assert httpx.get(f"{shared_box.url}/docs").status_code == 200
    missing = httpx.get(f"{shared_box.url}/admin/status")
    assert missing.status_code == 404
    for answer in (health, missing):  # no Python or aiohttp version for an attacker's map
        assert answer.headers["Server"] == "intrapush"
    with socket.create_connection(("127.0.0.1", shared_box.port("http"))) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")  # never reaches the app
        head = raw.recv(65536).split(b"\r\n\r\n")[0].lower()
    assert b"aiohttp" not in head and b"python" not in head


def test_metrics_listener_defaults_to_loopback_and_empty_turns_it_off(tmp_path: Path) -> None:
    box = Box(tmp_path / "box", env={"INTRAPUSH_METRICS_LISTEN": ""}).start()
    try:
        assert "metrics" not in box.addresses
        assert admin_get(box, "/admin/metrics").status_code == 200
    finally:
        box.stop()
    r = subprocess.run([sys.executable, "-m", "appliance", "config", "show", "--json", "--data-dir",
                        str(tmp_path / "box")], capture_output=True, text=True, timeout=30, env={"PATH": ""})
    listen = {row["key"]: row["value"] for row in json.loads(r.stdout)}["metrics.listen"]
    assert listen.startswith("127.0.0.1:")


def test_metrics_listener_on_a_taken_port_stops_the_start_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        box = Box(tmp_path / "box", env={"INTRAPUSH_METRICS_LISTEN": f"127.0.0.1:{port}"})
        try:
            box.start()
        except RuntimeError as exc:
            assert f"metrics listener cannot listen on 127.0.0.1:{port}" in str(exc)
        else:
            box.stop()
            raise AssertionError("the daemon started without its metrics listener")
