"""The core push path end to end: provider HTTP API -> store -> MQTT -> paho device -> ack -> status."""

from __future__ import annotations

import json
import subprocess
import time
import uuid

import httpx
import pytest

from tests.conftest import BACKENDS, Box, PahoDevice, backend_param, wait_for

backend = pytest.fixture(scope="module", params=BACKENDS)(backend_param)  # every test runs on both brokers
PUSH_FIELDS = {"id", "seq", "app_id", "title", "body", "data", "priority", "collapse_key", "sent_at", "expires_at"}


def new_app(box: Box) -> dict[str, str]:
    return box.create_app("app-" + uuid.uuid4().hex[:8])


def send(api: httpx.Client, to: dict, **fields) -> dict:
    r = api.post("/v1/messages", json={"to": to, **fields})
    assert r.status_code == 202, r.text
    return r.json()


def test_connected_device_gets_push_and_its_ack_shows_in_status(shared_box: Box) -> None:
    app = new_app(shared_box)
    enrollment = shared_box.enroll(app, "phone-1", alias="emp-42")
    device = PahoDevice(enrollment, shared_box.mqtt_port).connect()
    with shared_box.api(app) as api:
        sent = send(api, {"token": enrollment["token"]}, title="Hello", body="World", data={"k": 1},
                    priority="high", collapse_key="news")
        assert sent["targeted"] == 1 and sent["unregistered"] == []
        push = device.next()
        assert set(push) == PUSH_FIELDS
        assert (push["id"], push["seq"], push["title"], push["body"], push["data"], push["priority"]) == \
            (sent["id"], 1, "Hello", "World", {"k": 1}, "high")
        assert push["app_id"] == app["app_id"] and push["expires_at"] > push["sent_at"]
        device.ack([push["id"]], "opened")

        def acked() -> dict | None:
            status = api.get(f"/v1/messages/{sent['id']}").json()
            return status if status["counts"]["acked"] == 1 else None

        status = wait_for(acked)
        assert status["acks"]["opened"] == 1
        assert status["tokens"][enrollment["token"]] ["ack"] == "opened"
    device.close()


def test_offline_device_gets_every_pending_push_in_order_on_reconnect(shared_box: Box) -> None:
    app = new_app(shared_box)
    enrollment = shared_box.enroll(app, "phone-offline")
    with shared_box.api(app) as api:
        ids = [send(api, {"token": enrollment["token"]}, title=f"n{i}")["id"] for i in range(5)]
        status = api.get(f"/v1/messages/{ids[0]}").json()
        assert status["counts"]["queued"] == 1
    device = PahoDevice(enrollment, shared_box.mqtt_port).connect(cursor=0)
    got = [device.next() for _ in ids]
    assert [p["id"] for p in got] == ids
    assert [p["seq"] for p in got] == [1, 2, 3, 4, 5]
    device.close()


def test_hello_cursor_skips_what_the_device_holds(shared_box: Box) -> None:
    app = new_app(shared_box)
    enrollment = shared_box.enroll(app, "phone-cursor")
    with shared_box.api(app) as api:
        for i in range(4):
            send(api, {"token": enrollment["token"]}, title=f"n{i}")
    device = PahoDevice(enrollment, shared_box.mqtt_port).connect(cursor=2)
    assert [device.next()["seq"], device.next()["seq"]] == [3, 4]
    assert device.nothing_within(0.5)
    device.close()


def test_unacked_push_is_delivered_again_after_reconnect(shared_box: Box) -> None:
    app = new_app(shared_box)
    enrollment = shared_box.enroll(app, "phone-redeliver")
    device = PahoDevice(enrollment, shared_box.mqtt_port).connect()
    with shared_box.api(app) as api:
        sent = send(api, {"token": enrollment["token"]}, title="once")
    assert device.next()["id"] == sent["id"]
    device.close()  # no ack
    device = PahoDevice(enrollment, shared_box.mqtt_port).connect(cursor=0)
    again = device.next()
    assert again["id"] == sent["id"] and again["seq"] == 1
    device.ack([again["id"]])
    device.close()
    time.sleep(0.3)
    device = PahoDevice(enrollment, shared_box.mqtt_port).connect(cursor=0)
    assert device.nothing_within(0.5)
    device.close()


def test_collapse_key_replaces_the_older_pending_push(shared_box: Box) -> None:
    app = new_app(shared_box)
    enrollment = shared_box.enroll(app, "phone-collapse")
    with shared_box.api(app) as api:
        first = send(api, {"token": enrollment["token"]}, title="score 1-0", collapse_key="score")
        second = send(api, {"token": enrollment["token"]}, title="score 2-0", collapse_key="score")
        other = send(api, {"token": enrollment["token"]}, title="unrelated")
        assert api.get(f"/v1/messages/{first['id']}").json()["counts"]["replaced"] == 1
    device = PahoDevice(enrollment, shared_box.mqtt_port).connect()
    # The replaced push is not delivered, and the device is told why (#10).
    assert device.next() == {"type": "gap", "skipped": [{"seq": 1, "id": first["id"], "reason": "replaced"}]}
    assert [device.next()["id"], device.next()["id"]] == [second["id"], other["id"]]
    assert device.nothing_within(0.3)
    device.close()


def test_expired_push_is_not_delivered(shared_box: Box) -> None:
    app = new_app(shared_box)
    enrollment = shared_box.enroll(app, "phone-ttl")
    with shared_box.api(app) as api:
        short = send(api, {"token": enrollment["token"]}, title="brief", ttl_s=1)
        lasting = send(api, {"token": enrollment["token"]}, title="lasting")
        time.sleep(1.3)
        wait_for(lambda: api.get(f"/v1/messages/{short['id']}").json()["counts"]["expired"] == 1)
    device = PahoDevice(enrollment, shared_box.mqtt_port).connect()
    assert device.next() == {"type": "gap", "skipped": [{"seq": 1, "id": short["id"], "reason": "expired"}]}
    assert device.next()["id"] == lasting["id"]
    assert device.nothing_within(0.3)
    device.close()


def test_cancelled_push_is_not_delivered(shared_box: Box) -> None:
    app = new_app(shared_box)
    enrollment = shared_box.enroll(app, "phone-cancel")
    with shared_box.api(app) as api:
        sent = send(api, {"token": enrollment["token"]}, title="oops")
        r = api.delete(f"/v1/messages/{sent['id']}")
        assert r.status_code == 200 and r.json()["cancelled"] == 1
        assert api.get(f"/v1/messages/{sent['id']}").json()["counts"]["cancelled"] == 1
        assert api.delete(f"/v1/messages/{sent['id']}").json()["cancelled"] == 0
    device = PahoDevice(enrollment, shared_box.mqtt_port).connect()
    assert device.next() == {"type": "gap", "skipped": [{"seq": 1, "id": sent["id"], "reason": "cancelled"}]}
    assert device.nothing_within(0.5)
    device.close()


def test_topic_alias_and_all_reach_exactly_their_audience(shared_box: Box) -> None:
    app = new_app(shared_box)
    a = shared_box.enroll(app, "a", alias="alice")
    b = shared_box.enroll(app, "b", alias="bob")
    other_app = new_app(shared_box)
    stranger = shared_box.enroll(other_app, "c")
    devs = {name: PahoDevice(e, shared_box.mqtt_port).connect() for name, e in
            (("a", a), ("b", b), ("c", stranger))}
    with shared_box.api(app) as api:
        r = api.post("/v1/topics/sales/subscribers", json={"tokens": [a["token"], b["token"], stranger["token"]]})
        assert r.status_code == 200
        assert r.json()["subscribed"] == 2 and r.json()["unregistered"][0]["token"] == stranger["token"]
        assert send(api, {"topic": "sales"}, title="t1")["targeted"] == 2
        assert devs["a"].next()["title"] == "t1" and devs["b"].next()["title"] == "t1"
        assert api.request("DELETE", "/v1/topics/sales/subscribers", json={"tokens": [b["token"]]}).status_code == 200
        assert send(api, {"topic": "sales"}, title="t2")["targeted"] == 1
        assert devs["a"].next()["title"] == "t2"
        assert send(api, {"alias": "bob"}, title="for bob")["targeted"] == 1
        assert devs["b"].next()["title"] == "for bob"
        assert send(api, {"all": True}, title="everyone")["targeted"] == 2
        assert devs["a"].next()["title"] == "everyone" and devs["b"].next()["title"] == "everyone"
        multi = send(api, {"tokens": [a["token"], "dt_never_issued"]}, title="multi")
        assert multi["targeted"] == 1 and multi["unregistered"][0]["reason"] == "unknown"
        assert devs["a"].next()["title"] == "multi"
    assert devs["b"].nothing_within(0.2) and devs["c"].nothing_within(0.2)
    for d in devs.values():
        d.close()


def test_batch_of_500_is_accepted_in_one_request(shared_box: Box) -> None:
    app = new_app(shared_box)
    enrollment = shared_box.enroll(app, "batch")
    device = PahoDevice(enrollment, shared_box.mqtt_port).connect()
    with shared_box.api(app) as api:
        batch = [{"to": {"token": enrollment["token"]}, "body": f"b{i}"} for i in range(500)]
        r = api.post("/v1/messages", json={"messages": batch})
        assert r.status_code == 202, r.text
        assert r.json()["accepted"] == 500
        too_many = api.post("/v1/messages", json={"messages": batch + batch[:1]})
        assert too_many.status_code == 400 and too_many.json()["code"] == 40006
    seqs = [device.next()["seq"] for _ in range(500)]
    assert seqs == list(range(1, 501))
    device.close()


def test_reenrolled_device_gets_a_new_token_and_the_old_one_answers_410(shared_box: Box) -> None:
    app = new_app(shared_box)
    old = shared_box.enroll(app, "phone-re")
    old_device = PahoDevice(old, shared_box.mqtt_port).connect()
    new = shared_box.enroll(app, "phone-re", previous={"token": old["token"], "password": old["mqtt"]["password"]})
    assert new["token"] != old["token"] and new["replaced"] == [old["token"]]
    assert old_device.disconnects.get(timeout=5) is not None  # the old connection is closed
    with shared_box.api(app) as api:
        r = api.post("/v1/messages", json={"to": {"token": old["token"]}, "title": "x"})
        assert r.status_code == 410
        body = r.json()
        assert body["code"] == 41001 and body["reason"] == "reenrolled" and body["unregistered_at"] > 0
        assert send(api, {"token": new["token"]}, title="fresh")["targeted"] == 1
    refused = PahoDevice(old, shared_box.mqtt_port)
    refused.client.connect("127.0.0.1", shared_box.mqtt_port)
    refused.client.loop_start()
    assert refused.connack.get(timeout=5).is_failure
    refused.client.loop_stop()


def test_revoked_device_is_disconnected_and_refused(shared_box: Box) -> None:
    app = new_app(shared_box)
    e = shared_box.enroll(app, "phone-revoke")
    device = PahoDevice(e, shared_box.mqtt_port).connect()
    out = json.loads(shared_box.cli("device", "revoke", e["token"], "--json").stdout)
    assert out["token"] == e["token"]
    assert device.disconnects.get(timeout=5) is not None
    with shared_box.api(app) as api:
        r = api.post("/v1/messages", json={"to": {"token": e["token"]}, "title": "x"})
        assert r.status_code == 410 and r.json()["reason"] == "revoked"
    listing = json.loads(shared_box.cli("device", "list", "--app", app["app_id"], "--json").stdout)
    assert listing[0]["retired_reason"] == "revoked"


def test_inbox_overflow_sends_a_resync_notice(tmp_path, backend: str) -> None:
    box = Box(tmp_path / "box", env={"INTRAPUSH_PUSH_INBOX_LIMIT": "3"}, backend=backend).start()
    try:
        app = box.create_app("overflow")
        e = box.enroll(app, "phone-of")
        with box.api(app) as api:
            ids = [send(api, {"token": e["token"]}, title=f"n{i}")["id"] for i in range(6)]
        device = PahoDevice(e, box.mqtt_port).connect()
        notice = device.next()
        assert notice == {"type": "resync", "through": 3}
        assert [device.next()["id"] for _ in range(3)] == ids[3:]
        device.close()
    finally:
        box.stop()


def test_plain_mqtt_client_receives_live_pushes(shared_box: Box) -> None:
    """mosquitto_sub (Debian's mosquitto-clients) as a device that never says hello."""
    app = new_app(shared_box)
    e = shared_box.enroll(app, "mosq")
    m = e["mqtt"]
    proc = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(shared_box.mqtt_port), "-i",
                             m["client_id"], "-u", m["username"], "-P", m["password"], "-t", e["inbox_topic"],
                             "-q", "1", "-C", "1", "-W", "10"], stdout=subprocess.PIPE, text=True)
    try:
        with shared_box.api(app) as api:
            wait_for(lambda: api.get(f"/v1/devices/{e['token']}").json()["subscribed"])
            sent = send(api, {"token": e["token"]}, title="from the box")
        out, _ = proc.communicate(timeout=15)
        assert json.loads(out)["id"] == sent["id"]
    finally:
        proc.kill()


def test_push_answered_202_survives_kill_9(tmp_path, backend: str) -> None:
    box = Box(tmp_path / "box", env={"INTRAPUSH_STORE_SYNCHRONOUS": "full"}, backend=backend).start()
    app = box.create_app("durable")
    e = box.enroll(app, "phone-durable")
    with box.api(app) as api:
        ids = [send(api, {"token": e["token"]}, title=f"d{i}")["id"] for i in range(20)]
    box.kill9()
    box.start()
    try:
        device = PahoDevice(e, box.mqtt_port).connect()
        assert [device.next()["id"] for _ in ids] == ids
        device.close()
    finally:
        box.stop()


@pytest.mark.parametrize("transport", ["websockets"])
def test_browser_transport_websocket_gets_push(tmp_path, transport: str, backend: str) -> None:
    if backend == "mosquitto":
        pytest.skip("Debian's Mosquitto 2.0.11 has no WebSocket listener (docs/broker.md)")
    box = Box(tmp_path / "box", env={"INTRAPUSH_BROKER_WS_LISTEN": "127.0.0.1:0"}, backend=backend).start()
    try:
        app = box.create_app("web")
        e = box.enroll(app, "browser", platform="web")
        assert e["keepalive_s"] == 45
        device = PahoDevice(e, box.port("mqtt-ws"), transport=transport).connect()
        with box.api(app) as api:
            sent = send(api, {"token": e["token"]}, title="web push")
        assert device.next()["id"] == sent["id"]
        device.close()
    finally:
        box.stop()
