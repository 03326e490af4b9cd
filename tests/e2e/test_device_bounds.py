"""What one device may ask of the box, on both brokers (#10): a hello cursor out of range closes the connection,
one past the device's last seq gets a resync, acks of other devices' real ids are dropped and counted, ids past
the cap in one ack are ignored, and a device that keeps over its message rate is disconnected while the
others are served."""

from __future__ import annotations

import json
import queue
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import BACKENDS, Box, PahoDevice, backend_param, wait_for

backend = pytest.fixture(scope="module", params=BACKENDS)(backend_param)
LIMITS = {"INTRAPUSH_LIMITS_DEVICE_ACK_IDS_MAX": "3", "INTRAPUSH_LIMITS_DEVICE_MESSAGES_PER_S": "2",
          "INTRAPUSH_LIMITS_DEVICE_MESSAGES_BURST": "30"}


@pytest.fixture(scope="module")
def bounded_box(tmp_path_factory: pytest.TempPathFactory, backend: str) -> Iterator[Box]:
    b = Box(tmp_path_factory.mktemp("bounds") / "box", env=LIMITS, backend=backend).start()
    yield b
    b.stop()


def metric(box: Box, name: str) -> float:
    for line in httpx.get(box.metrics_url).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def new_app(box: Box) -> dict[str, str]:
    return box.create_app("bounds-" + uuid.uuid4().hex[:8])


def push(box: Box, app: dict[str, str], token: str, title: str = "t") -> str:
    with box.api(app) as api:
        r = api.post("/v1/messages", json={"to": {"token": token}, "title": title})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def status(box: Box, app: dict[str, str], mid: str) -> dict[str, Any]:
    with box.api(app) as api:
        return dict(api.get(f"/v1/messages/{mid}").json())


def disconnected(device: PahoDevice) -> bool:
    try:
        device.disconnects.get_nowait()
    except queue.Empty:
        return False
    return True


@pytest.mark.parametrize("cursor", [2**64, 2**63, -1, "0"])
def test_a_hello_cursor_outside_0_to_2_63_closes_the_connection(bounded_box: Box, cursor: Any) -> None:
    app = new_app(bounded_box)
    e = bounded_box.enroll(app, "cursor")
    refused = metric(bounded_box, "intrapush_device_hellos_refused_total")
    device = PahoDevice(e, bounded_box.mqtt_port).connect(cursor=None)
    device.client.reconnect_delay_set(30, 60)  # the close must show, not be hidden by a quick reconnect
    try:
        device.client.publish(e["hello_topic"], json.dumps({"cursor": cursor}), qos=1)
        wait_for(lambda: disconnected(device), 15)
        wait_for(lambda: metric(bounded_box, "intrapush_device_hellos_refused_total") > refused)
    finally:
        device.close()


def test_a_hello_cursor_past_the_last_seq_gets_a_resync_to_it(bounded_box: Box) -> None:
    app = new_app(bounded_box)
    e = bounded_box.enroll(app, "ahead")
    push(bounded_box, app, e["token"])
    push(bounded_box, app, e["token"])
    device = PahoDevice(e, bounded_box.mqtt_port).connect(cursor=10**15)
    try:
        assert device.next() == {"type": "resync", "through": 2, "reset": True}
        mid = push(bounded_box, app, e["token"], "after")
        got = device.next()
        assert (got["seq"], got["id"]) == (3, mid)
    finally:
        device.close()


def test_an_ack_of_another_devices_real_ids_leaves_them_pending_and_is_counted_as_bogus(bounded_box: Box) -> None:
    app = new_app(bounded_box)
    forger_e, victim_e = bounded_box.enroll(app, "forger"), bounded_box.enroll(app, "victim")
    victim = PahoDevice(victim_e, bounded_box.mqtt_port).connect()
    forger = PahoDevice(forger_e, bounded_box.mqtt_port).connect()
    try:
        theirs = push(bounded_box, app, victim_e["token"], "theirs")
        assert victim.next()["id"] == theirs  # delivered to the victim, not acked
        bogus = metric(bounded_box, "intrapush_device_ack_ids_bogus_total")
        forger.ack([theirs], "opened")  # the victim's real id, on the forger's own ack topic
        wait_for(lambda: metric(bounded_box, "intrapush_device_ack_ids_bogus_total") >= bogus + 1)
        doc = status(bounded_box, app, theirs)
        assert doc["acks"] == {"received": 0, "displayed": 0, "opened": 0}
        assert doc["tokens"][victim_e["token"]]["ack"] is None
        victim.ack([theirs])
        wait_for(lambda: status(bounded_box, app, theirs)["acks"]["received"] == 1)
    finally:
        victim.close()
        forger.close()


def test_ids_past_the_cap_in_one_ack_are_ignored_and_come_again(bounded_box: Box) -> None:
    app = new_app(bounded_box)
    e = bounded_box.enroll(app, "many")
    device = PahoDevice(e, bounded_box.mqtt_port).connect()
    try:
        mids = [push(bounded_box, app, e["token"], f"p{n}") for n in range(5)]
        assert [device.next()["id"] for _ in mids] == mids
        device.ack(mids)  # the cap is 3
        wait_for(lambda: all(status(bounded_box, app, mid)["acks"]["received"] == 1 for mid in mids[:3]))
        assert [status(bounded_box, app, mid)["acks"]["received"] for mid in mids[3:]] == [0, 0]
        device.hello(0)  # the ignored two come again
        assert [device.next()["id"] for _ in range(2)] == mids[3:]
    finally:
        device.close()


def test_a_device_that_keeps_over_its_rate_is_disconnected_and_others_are_served(bounded_box: Box) -> None:
    app = new_app(bounded_box)
    flooder_e, other_e = bounded_box.enroll(app, "flooder"), bounded_box.enroll(app, "calm")
    other = PahoDevice(other_e, bounded_box.mqtt_port).connect()
    flooder = PahoDevice(flooder_e, bounded_box.mqtt_port).connect(cursor=None)
    flooder.client.reconnect_delay_set(30, 60)
    try:
        throttled = metric(bounded_box, "intrapush_device_messages_throttled_total")
        for _ in range(200):  # the burst is 30 and the rate 2/s: far over, at once
            flooder.client.publish(flooder_e["hello_topic"], b'{"cursor":0}', qos=0)
        wait_for(lambda: disconnected(flooder), 15)
        assert metric(bounded_box, "intrapush_device_messages_throttled_total") > throttled
        assert metric(bounded_box, "intrapush_devices_disconnected_total") >= 1
        mid = push(bounded_box, app, other_e["token"], "still served")
        assert other.next()["id"] == mid
    finally:
        flooder.close()
        other.close()
