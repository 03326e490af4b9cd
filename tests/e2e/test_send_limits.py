"""Per-app send limits (#10): pushes per second and devices reached per minute, answered with 429 and
Retry-After, one app's limit never slowing another's sends, and nothing stored for a refused request."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Box, PahoDevice


@pytest.fixture(scope="module")
def limited_box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    """Box-wide default: 3 pushes per second per app (an app's own limit overrides it)."""
    b = Box(tmp_path_factory.mktemp("limits") / "box", env={"INTRAPUSH_LIMITS_APP_PUSHES_PER_S": "3"}).start()
    yield b
    b.stop()


def push(api: httpx.Client, to: dict, n: int = 1) -> httpx.Response:
    if n == 1:
        return api.post("/v1/messages", json={"to": to, "title": "t"})
    return api.post("/v1/messages", json={"messages": [{"to": to, "title": f"t{i}"} for i in range(n)]})


def until_refused(api: httpx.Client, to: dict, most: int = 60) -> tuple[int, httpx.Response]:
    for sent in range(most):
        r = push(api, to)
        if r.status_code == 429:
            return sent, r
        assert r.status_code == 202, r.text
    raise AssertionError(f"no 429 after {most} pushes")


def test_over_the_limit_is_429_with_retry_after_and_nothing_stored(limited_box: Box) -> None:
    app = limited_box.create_app("limited-one")
    limited_box.cli("app", "set-limits", "limited-one", "--pushes-per-s", "5")
    e = limited_box.enroll(app, "phone")
    device = PahoDevice(e, limited_box.mqtt_port).connect()
    try:
        with limited_box.api(app) as api:
            accepted, refused = until_refused(api, {"token": e["token"]})
            assert accepted >= 5  # one second's worth passes at once
            body = refused.json()
            assert body["code"] == 42902 and body["http"] == 429 and body["retry_after_s"] >= 1
            assert refused.headers["Retry-After"] == str(body["retry_after_s"])
            received = [device.next()["title"] for _ in range(accepted)]
            assert len(received) == accepted and device.nothing_within(0.5)  # the refused push was not stored
            time.sleep(int(refused.headers["Retry-After"]))
            assert push(api, {"token": e["token"]}).status_code == 202
    finally:
        device.close()


def test_one_apps_limit_does_not_touch_another_app(limited_box: Box) -> None:
    slow, free = limited_box.create_app("slow-app"), limited_box.create_app("free-app")
    limited_box.cli("app", "set-limits", "free-app", "--pushes-per-s", "0")  # no limit, over the box's 3/s
    a, b = limited_box.enroll(slow, "a"), limited_box.enroll(free, "b")
    with limited_box.api(slow) as slow_api, limited_box.api(free) as free_api:
        until_refused(slow_api, {"token": a["token"]})
        for _ in range(20):  # the box's default would refuse the 4th
            assert push(free_api, {"token": b["token"]}).status_code == 202
        assert push(slow_api, {"token": a["token"]}).status_code == 429


def test_a_batch_may_run_into_debt_once_then_the_app_waits(limited_box: Box) -> None:
    app = limited_box.create_app("batcher")
    limited_box.cli("app", "set-limits", "batcher", "--pushes-per-s", "10")
    e = limited_box.enroll(app, "phone")
    with limited_box.api(app) as api:
        r = push(api, {"token": e["token"]}, n=50)
        assert r.status_code == 202 and r.json()["accepted"] == 50
        refused = push(api, {"token": e["token"]})
        assert refused.status_code == 429 and refused.json()["retry_after_s"] >= 3  # ~4 s of debt at 10/s


def test_targets_per_minute_counts_devices_reached(limited_box: Box) -> None:
    app = limited_box.create_app("broadcaster")
    limited_box.cli("app", "set-limits", "broadcaster", "--pushes-per-s", "0", "--targets-per-min", "4")
    for i in range(3):
        limited_box.enroll(app, f"d{i}")
    with limited_box.api(app) as api:
        assert push(api, {"all": True}).json()["targeted"] == 3
        assert push(api, {"all": True}).status_code == 202  # 1 left: passes, and leaves the app 2 in debt
        refused = push(api, {"all": True})
        assert refused.status_code == 429 and "targets per minute" in refused.json()["error"]
        assert refused.json()["retry_after_s"] >= 20  # 2 targets at 4 per minute


def test_limits_show_in_the_app_list_and_the_audit_log(limited_box: Box, tmp_path: Path) -> None:
    limited_box.create_app("shown")
    limited_box.cli("app", "set-limits", "shown", "--pushes-per-s", "250", "--targets-per-min", "default")
    listing = {a["name"]: a for a in json.loads(limited_box.cli("app", "list", "--json").stdout)}
    assert listing["shown"]["limits"] == {"pushes_per_s": 250.0, "targets_per_min": None}
    entries = json.loads(limited_box.cli("audit", "--app", "shown", "--json").stdout)
    assert entries[0]["action"] == "app.set_limits" and entries[0]["detail"]["pushes_per_s"] == 250.0
    bad = limited_box.cli("app", "set-limits", "shown", "--pushes-per-s", "-1", check=False)
    assert bad.returncode == 1 and "pushes_per_s" in bad.stderr
    word = limited_box.cli("app", "set-limits", "shown", "--pushes-per-s", "lots", check=False)
    assert word.returncode == 2
