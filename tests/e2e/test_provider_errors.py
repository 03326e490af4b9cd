"""Every bad input to the provider API gets a clear JSON error with a stable code, and changes nothing."""

from __future__ import annotations

import json
import re
import uuid

import httpx
import pytest

from tests.conftest import Box, PahoDevice


@pytest.fixture(scope="module")
def world(shared_box: Box) -> dict:
    app = shared_box.create_app("errors-" + uuid.uuid4().hex[:6])
    other = shared_box.create_app("errors-other-" + uuid.uuid4().hex[:6])
    e = shared_box.enroll(app, "target")
    foreign = shared_box.enroll(other, "foreign")
    return {"app": app, "other": other, "token": e["token"], "foreign": foreign["token"], "enrollment": e}


def _token(world: dict) -> str:
    return world["token"]


BAD_SENDS = [
    # (case id, body bytes or JSON, headers, expected http, expected code)
    ("malformed_json", b'{"to": ', {}, 400, 40001),
    ("not_an_object", b"[1, 2]", {}, 400, 40002),
    ("unknown_field", {"to": {"token": "T"}, "title": "x", "colour": "red"}, {}, 400, 40002),
    ("unknown_target_field", {"to": {"tokn": "T"}, "title": "x"}, {}, 400, 40002),
    ("two_targets", {"to": {"token": "T", "all": True}, "title": "x"}, {}, 400, 40002),
    ("no_target", {"title": "x"}, {}, 400, 40002),
    ("empty_push", {"to": {"token": "T"}}, {}, 400, 40002),
    ("title_not_string", {"to": {"token": "T"}, "title": 5}, {}, 400, 40002),
    ("ttl_as_string", {"to": {"token": "T"}, "title": "x", "ttl_s": "60"}, {}, 400, 40002),
    ("negative_ttl", {"to": {"token": "T"}, "title": "x", "ttl_s": -1}, {}, 400, 40002),
    ("bad_priority", {"to": {"token": "T"}, "title": "x", "priority": "urgent"}, {}, 400, 40002),
    ("long_collapse_key", {"to": {"token": "T"}, "title": "x", "collapse_key": "k" * 65}, {}, 400, 40002),
    ("bad_topic", {"to": {"topic": "a/b"}, "title": "x"}, {}, 400, 40002),
    ("ttl_over_max", {"to": {"token": "T"}, "title": "x", "ttl_s": 10**9}, {}, 400, 40005),
    ("payload_too_large", {"to": {"token": "T"}, "title": "x", "data": {"blob": "x" * 5000}}, {}, 400, 40004),
    ("empty_topic", {"to": {"topic": "nobody-here"}, "title": "x"}, {}, 400, 40003),
    ("unknown_token", {"to": {"token": "dt_unknown"}, "title": "x"}, {}, 410, 41001),
    ("foreign_token", {"to": {"token": "FOREIGN"}, "title": "x"}, {}, 410, 41001),
    ("all_tokens_unknown", {"to": {"tokens": ["dt_a", "dt_b"]}, "title": "x"}, {}, 400, 40003),
    ("form_encoded", b"to=x", {"Content-Type": "application/x-www-form-urlencoded"}, 415, 40010),
    ("empty_batch", {"messages": []}, {}, 400, 40002),
    ("batch_with_bad_item", {"messages": [{"to": {"token": "T"}, "title": "ok"}, {"to": {}, "title": "x"}]},
     {}, 400, 40002),
]


def _fill(doc, world: dict):
    text = json.dumps(doc).replace('"T"', json.dumps(world["token"])).replace('"FOREIGN"', json.dumps(world["foreign"]))
    return json.loads(text)


def _pending_for(box: Box, world: dict) -> int:
    """What the target device would get: connect, hello with cursor 0, count what arrives."""
    device = PahoDevice(world["enrollment"], box.mqtt_port).connect()
    count = 0
    try:
        while True:
            device.next(timeout=0.4)
            count += 1
    except Exception:  # noqa: BLE001 - queue.Empty ends the count
        pass
    device.close()
    return count


@pytest.mark.parametrize(("case", "body", "headers", "http", "code"), BAD_SENDS, ids=[c[0] for c in BAD_SENDS])
def test_bad_send_is_refused_with_its_code_and_stores_nothing(shared_box: Box, world: dict, case, body, headers,
                                                              http, code) -> None:
    with shared_box.api(world["app"]) as api:
        if isinstance(body, bytes):
            r = api.post("/v1/messages", content=body, headers={"Content-Type": "application/json", **headers})
        else:
            r = api.post("/v1/messages", json=_fill(body, world), headers=headers)
    assert r.status_code == http, r.text
    doc = r.json()
    assert doc["code"] == code and doc["http"] == http
    assert doc["error"] and doc["link"].endswith(f"#{code}")
    assert _pending_for(shared_box, world) == 0


def test_oversized_body_is_refused_with_413(shared_box: Box, world: dict) -> None:
    with shared_box.api(world["app"]) as api:
        r = api.post("/v1/messages", content=b'{"to":' + b" " * (3 << 20) + b"}",
                     headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["code"] == 41301


@pytest.mark.parametrize(("headers", "code"), [
    ({}, 40101),
    ({"Authorization": "Basic abc"}, 40101),
    ({"Authorization": "Bearer ak_wrong"}, 40102),
])
def test_missing_or_wrong_key_is_refused(shared_box: Box, world: dict, headers: dict, code: int) -> None:
    r = httpx.post(f"{shared_box.url}/v1/messages", json={"to": {"token": world["token"]}, "title": "x"},
                   headers=headers)
    assert r.status_code == 401 and r.json()["code"] == code


def test_enrollment_secret_is_not_an_api_key_and_vice_versa(shared_box: Box, world: dict) -> None:
    app = world["app"]
    r = httpx.post(f"{shared_box.url}/v1/messages", json={"to": {"token": world["token"]}, "title": "x"},
                   headers={"Authorization": f"Bearer {app['enrollment_secret']}"})
    assert r.status_code == 401
    r = httpx.post(f"{shared_box.url}/v1/devices", headers={"Authorization": f"Bearer {app['api_key']}"},
                   json={"app_id": app["app_id"], "platform": "ios", "package": "p", "device_id": "d"})
    assert r.status_code == 401 and r.json()["code"] == 40102


@pytest.mark.parametrize("body", [
    {"app_id": "A", "platform": "symbian", "package": "p", "device_id": "d"},
    {"app_id": "A", "platform": "ios", "package": "has space", "device_id": "d"},
    {"app_id": "A", "platform": "ios", "package": "p", "device_id": ""},
    {"app_id": "A", "platform": "ios", "package": "p", "device_id": "d", "contact": {"phone": "12345"}},
    {"app_id": "A", "platform": "ios", "package": "p", "device_id": "d", "contact": {"email": "nope"}},
    {"app_id": "A", "platform": "ios", "package": "p", "device_id": "d", "extra": 1},
])
def test_bad_enrollment_is_refused(shared_box: Box, world: dict, body: dict) -> None:
    app = world["app"]
    body = {**body, "app_id": app["app_id"]}
    r = httpx.post(f"{shared_box.url}/v1/devices", json=body,
                   headers={"Authorization": f"Bearer {app['enrollment_secret']}"})
    assert r.status_code == 400 and r.json()["code"] == 40002, r.text


def test_status_of_unknown_foreign_or_malformed_message_id(shared_box: Box, world: dict) -> None:
    with shared_box.api(world["other"]) as other_api:
        other_id = other_api.post("/v1/messages", json={"to": {"token": world["foreign"]}, "title": "x"}).json()["id"]
    with shared_box.api(world["app"]) as api:
        assert api.get(f"/v1/messages/{other_id}").json()["code"] == 40402  # another app's message
        assert api.delete(f"/v1/messages/{other_id}").json()["code"] == 40402
        assert api.get("/v1/messages/m" + "0" * 28).status_code == 404
        assert api.get("/v1/messages/not-an-id").json()["code"] == 40009
        assert api.get("/v1/nowhere").json()["code"] == 40404
        assert api.put("/v1/messages").json()["code"] == 40501


def test_openapi_and_docs_are_served_without_any_external_asset(shared_box: Box) -> None:
    doc = httpx.get(f"{shared_box.url}/openapi.json").json()
    assert doc["openapi"].startswith("3.") and "/v1/messages" in doc["paths"]
    assert "PushMessage" in doc["components"]["schemas"]
    html = httpx.get(f"{shared_box.url}/docs").text
    assert "openapi.json" in html
    assert not re.search(r"(src|href)=\"(https?:)?//", html)


def test_metrics_count_accepted_pushes(shared_box: Box, world: dict) -> None:
    def accepted() -> float:
        text = httpx.get(shared_box.metrics_url).text
        return float(re.search(r"^intrapush_pushes_accepted_total (\S+)$", text, re.M).group(1))

    before = accepted()
    with shared_box.api(world["app"]) as api:
        api.post("/v1/messages", json={"to": {"token": world["token"]}, "title": "counted", "ttl_s": 0})
    assert accepted() == before + 1
