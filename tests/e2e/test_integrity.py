"""Integrity end to end, on both brokers, at the shipped durability (`synchronous=full`): an ack the box
confirmed survives kill -9 and never turns into a fallback; a graceful stop lets a fallback send under way
finish (#10)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP

from tests.conftest import BACKENDS, Box, PahoDevice, backend_param, wait_for
from tests.e2e.test_fallback_escalation import SmtpSink

backend = pytest.fixture(scope="module", params=BACKENDS)(backend_param)
EMAIL = "alice@corp.example"
PUSHES = 20


def email_env(smtp_port: int) -> dict[str, str]:
    return {"INTRAPUSH_STORE_SYNCHRONOUS": "full",
            "INTRAPUSH_FALLBACK_EMAIL_TRANSPORT": "smtp", "INTRAPUSH_FALLBACK_EMAIL_HOST": "127.0.0.1",
            "INTRAPUSH_FALLBACK_EMAIL_PORT": str(smtp_port), "INTRAPUSH_FALLBACK_EMAIL_TLS": "none",
            "INTRAPUSH_FALLBACK_EMAIL_FROM_ADDRESS": "push@corp.example",
            "INTRAPUSH_FALLBACK_EMAIL_RATE_PER_MIN": "6000"}


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    sink = SmtpSink()
    yield sink
    sink.stop()


def ack_confirmed(device: PahoDevice, ids: list[str], backend: str) -> None:
    """Ack every push and wait for the box's confirmation: the PUBACK on the embedded broker (it follows the
    commit), the ack receipt on Mosquitto (which PUBACKs by itself)."""
    if backend == "embedded":
        for mid in ids:
            device.ack([mid])  # returns once the PUBACK arrived
        return
    for mid in ids:
        device.client.publish(device.e["ack_topic"], json.dumps({"ids": [mid], "receipt": True}), qos=1)
    confirmed: set[str] = set()
    while confirmed != set(ids):
        notice = device.next()
        assert notice.get("type") == "ack_receipt", notice
        confirmed.update(notice["ids"])


def test_a_confirmed_ack_survives_kill_9_and_no_fallback_fires(tmp_path: Path, backend: str, smtp: SmtpSink) -> None:
    box = Box(tmp_path / "box", env=email_env(smtp.port), backend=backend).start()
    app = box.create_app("acks")
    e = box.enroll(app, "phone", contact={"email": EMAIL})
    device = PahoDevice(e, box.mqtt_port).connect()
    with box.api(app) as api:
        r = api.post("/v1/messages", json={"messages": [
            {"to": {"token": e["token"]}, "title": f"p{n}", "fallback": {"after_s": 3, "channels": ["email"]}}
            for n in range(PUSHES)]})
        assert r.status_code == 202, r.text
        ids = [item["id"] for item in r.json()["results"]]
    assert [device.next()["id"] for _ in ids] == ids
    ack_confirmed(device, ids, backend)
    box.kill9()
    device.client.loop_stop()
    box.start()
    try:
        with box.api(app) as api:
            for mid in ids:
                status = api.get(f"/v1/messages/{mid}").json()
                assert status["counts"]["acked"] == 1, status
            time.sleep(4)  # past every fallback deadline
            wait_for(lambda: all(api.get(f"/v1/messages/{mid}").json()["fallback"]["email"]["skipped"] == 1
                                 for mid in ids), timeout=15)
            assert all(api.get(f"/v1/messages/{mid}").json()["fallback_sent"] == 0 for mid in ids)
        assert smtp.messages == []
    finally:
        box.stop()


def test_a_graceful_stop_lets_a_fallback_send_under_way_finish(tmp_path: Path, backend: str) -> None:
    received: list[bytes] = []
    arrived = threading.Event()

    async def handle_DATA(server, session, envelope):  # noqa: N802, ANN001, ANN202 - aiosmtpd hook
        arrived.set()
        await asyncio.sleep(2)  # the relay is slow: the daemon is told to stop meanwhile
        received.append(envelope.original_content)
        return "250 OK"

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port: list[int] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        handler = type("Handler", (), {"handle_DATA": staticmethod(handle_DATA)})()
        server = loop.run_until_complete(loop.create_server(lambda: SMTP(handler), "127.0.0.1", 0))
        port.append(server.sockets[0].getsockname()[1])
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(5)
    box = Box(tmp_path / "box", env=email_env(port[0]), backend=backend).start()
    try:
        app = box.create_app("stop")
        e = box.enroll(app, "offline", contact={"email": EMAIL})
        with box.api(app) as api:
            sent = api.post("/v1/messages", json={"to": {"token": e["token"]}, "title": "Alarm",
                                                  "fallback": {"after_s": 0, "channels": ["email"]}}).json()
        assert arrived.wait(15)
        assert box.stop() == 0  # SIGTERM while the relay still holds the message
        assert len(received) == 1
        box.start()
        with box.api(app) as api:
            status = api.get(f"/v1/messages/{sent['id']}").json()
        assert status["fallback"]["email"]["sent"] == 1, status
        assert status["tokens"][e["token"]]["fallback"]["email"]["reason"] is None
    finally:
        box.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
