"""The trust model attacked the way a hostile copy of the app would: it knows the enrollment secret (it ships
inside every copy) and other devices' device ids, and tries to take users' pushes, contacts and tokens (#9).
Only the app server, holding the API key, binds a device to a user."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import httpx
import pytest

from tests.conftest import BACKENDS, Box, PahoDevice, backend_param, wait_for

backend = pytest.fixture(scope="module", params=BACKENDS)(backend_param)  # a broker is involved: both


def new_app(box: Box) -> dict[str, str]:
    return box.create_app("trust-" + uuid.uuid4().hex[:8])


def enroll_raw(box: Box, credential: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{box.url}/v1/devices", json=body, headers={"Authorization": f"Bearer {credential}"})


def device_body(app: dict[str, str], device_id: str, **extra: Any) -> dict[str, Any]:
    return {"app_id": app["app_id"], "platform": "android", "package": "com.example.app", "device_id": device_id,
            **extra}


def send(box: Box, app: dict[str, str], to: dict[str, Any], **fields: Any) -> httpx.Response:
    with box.api(app) as api:
        return api.post("/v1/messages", json={"to": to, "title": "t", **fields})


# -- a hostile app copy cannot bind itself to a user or a contact ----------------------------------------
@pytest.mark.parametrize("identity", [{"alias": "ceo"}, {"contact": {"phone": "+4915112345678"}},
                                      {"contact": {"email": "ceo@corp.example"}},
                                      {"alias": "ceo", "contact": {"phone": "+4915112345678"}}])
def test_enrollment_secret_cannot_claim_an_alias_or_a_contact(shared_box: Box, identity: dict[str, Any]) -> None:
    app = new_app(shared_box)
    ceo = shared_box.enroll(app, "ceo-phone", alias="ceo")
    r = enroll_raw(shared_box, app["enrollment_secret"], device_body(app, "hostile", **identity))
    assert r.status_code == 403 and r.json()["code"] == 40302, r.text
    sent = send(shared_box, app, {"alias": "ceo"})
    assert sent.status_code == 202 and sent.json()["targeted"] == 1  # the CEO's own phone, nobody else
    devices = json.loads(shared_box.cli("device", "list", "--app", app["app_id"], "--json").stdout)
    assert [d["token"] for d in devices] == [ceo["token"]]  # the refused enrollment left nothing behind


def test_ticket_binds_the_alias_and_contact_the_app_server_chose(shared_box: Box) -> None:
    app = new_app(shared_box)
    ticket = shared_box.ticket(app, alias="emp-4711", contact={"phone": "+4915112345678"}, ttl_s=600)
    assert ticket["ticket"].startswith("et_") and ticket["alias"] == "emp-4711"
    assert ticket["expires_at"] == pytest.approx(time.time() + 600, abs=30)
    r = enroll_raw(shared_box, ticket["ticket"], device_body(app, "phone-1"))
    assert r.status_code == 201, r.text
    enrolled = r.json()
    assert enrolled["alias"] == "emp-4711" and enrolled["replaced"] == []
    device = PahoDevice(enrolled, shared_box.mqtt_port).connect()
    try:
        sent = send(shared_box, app, {"alias": "emp-4711"}, body="for emp-4711")
        assert sent.status_code == 202 and sent.json()["targeted"] == 1
        assert device.next()["body"] == "for emp-4711"
        with shared_box.api(app) as api:
            info = api.get(f"/v1/devices/{enrolled['token']}").json()
        assert info["alias"] == "emp-4711" and info["contact"] == {"phone": "+4915112345678", "email": None}
    finally:
        device.close()


def test_ticket_works_once_even_when_devices_race_for_it(shared_box: Box) -> None:
    app = new_app(shared_box)
    ticket = shared_box.ticket(app, alias="racer")["ticket"]
    statuses: list[int] = []
    codes: list[int] = []

    def redeem(n: int) -> None:
        r = enroll_raw(shared_box, ticket, device_body(app, f"racer-{n}"))
        statuses.append(r.status_code)
        if r.status_code != 201:
            codes.append(r.json()["code"])

    threads = [threading.Thread(target=redeem, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(statuses) == [201] + [401] * 7 and set(codes) == {40105}
    assert send(shared_box, app, {"alias": "racer"}).json()["targeted"] == 1


def test_tickets_are_refused_when_expired_unknown_or_for_another_app(shared_box: Box) -> None:
    app, other = new_app(shared_box), new_app(shared_box)
    short = shared_box.ticket(app, alias="late", ttl_s=1)["ticket"]
    time.sleep(1.5)
    r = enroll_raw(shared_box, short, device_body(app, "late"))
    assert r.status_code == 401 and r.json()["code"] == 40104
    r = enroll_raw(shared_box, "et_" + "A" * 32, device_body(app, "forged"))
    assert r.status_code == 401 and r.json()["code"] == 40103
    foreign = shared_box.ticket(other, alias="x")["ticket"]
    r = enroll_raw(shared_box, foreign, device_body(app, "cross-app"))
    assert r.status_code == 401 and r.json()["code"] == 40102
    with httpx.Client(base_url=shared_box.url) as anonymous:
        r = anonymous.post("/v1/enrollment-tickets", json={"alias": "ceo"},
                           headers={"Authorization": f"Bearer {app['enrollment_secret']}"})
    assert r.status_code == 401  # only the API key mints tickets, never the secret an app copy carries
    assert send(shared_box, app, {"alias": "late"}).status_code == 400  # nobody was bound to it


def test_credentials_are_checked_before_the_body(shared_box: Box) -> None:
    r = httpx.post(f"{shared_box.url}/v1/devices", content=b"{not json",
                   headers={"Authorization": "Bearer es_wrong", "Content-Type": "application/json"})
    assert r.status_code == 401 and r.json()["code"] == 40102


def test_app_can_require_tickets_for_every_enrollment(shared_box: Box) -> None:
    app = new_app(shared_box)
    shared_box.cli("app", "set-enrollment", app["app_id"], "--require-ticket")
    r = enroll_raw(shared_box, app["enrollment_secret"], device_body(app, "anon"))
    assert r.status_code == 403 and r.json()["code"] == 40301
    ticket = shared_box.ticket(app)["ticket"]  # no alias: an anonymous device, but one the app server vouched for
    assert enroll_raw(shared_box, ticket, device_body(app, "vouched")).status_code == 201
    shared_box.cli("app", "set-enrollment", app["app_id"], "--allow-secret")
    assert enroll_raw(shared_box, app["enrollment_secret"], device_body(app, "anon")).status_code == 201
    listing = {a["app_id"]: a for a in json.loads(shared_box.cli("app", "list", "--json").stdout)}
    assert listing[app["app_id"]]["require_ticket"] is False


# -- knowing the secret and a device_id is not enough to retire or replace a device --------------------
def test_reenrolling_a_known_device_id_leaves_the_real_device_alone(shared_box: Box) -> None:
    app = new_app(shared_box)
    victim = shared_box.enroll(app, "victim-install", alias="alice")
    phone = PahoDevice(victim, shared_box.mqtt_port).connect()
    try:
        hostile = enroll_raw(shared_box, app["enrollment_secret"], device_body(app, "victim-install")).json()
        assert hostile["token"] != victim["token"] and hostile["replaced"] == [] and hostile["alias"] is None
        other_user = shared_box.ticket(app, alias="mallory")["ticket"]
        r = enroll_raw(shared_box, other_user, device_body(app, "victim-install"))
        assert r.status_code == 201 and r.json()["replaced"] == []
        assert phone.nothing_within(0.5)  # not disconnected, nothing received
        assert phone.disconnects.empty()
        sent = send(shared_box, app, {"token": victim["token"]}, body="still yours")
        assert sent.status_code == 202
        assert phone.next()["body"] == "still yours"
        assert send(shared_box, app, {"alias": "alice"}).json()["targeted"] == 1
    finally:
        phone.close()


def test_previous_credentials_replace_a_token_and_carry_its_user_and_topics(shared_box: Box) -> None:
    app = new_app(shared_box)
    old = shared_box.enroll(app, "install-1", alias="bob")
    with shared_box.api(app) as api:
        assert api.post("/v1/topics/news/subscribers", json={"tokens": [old["token"]]}).status_code == 200
    wrong = enroll_raw(shared_box, app["enrollment_secret"],
                       device_body(app, "install-1", previous={"token": old["token"], "password": "guess"}))
    assert wrong.status_code == 401 and wrong.json()["code"] == 40106
    r = enroll_raw(shared_box, app["enrollment_secret"],
                   device_body(app, "install-1", previous={"token": old["token"], "password": old["mqtt"]["password"]}))
    assert r.status_code == 201, r.text
    new = r.json()
    assert new["replaced"] == [old["token"]] and new["alias"] == "bob"
    gone = send(shared_box, app, {"token": old["token"]})
    assert gone.status_code == 410 and gone.json()["reason"] == "reenrolled"
    with shared_box.api(app) as api:
        info = api.get(f"/v1/devices/{new['token']}").json()
    assert info["topics"] == ["news"] and info["alias"] == "bob"
    assert send(shared_box, app, {"topic": "news"}).json()["targeted"] == 1


def test_previous_credentials_of_another_app_are_refused(shared_box: Box) -> None:
    app, other = new_app(shared_box), new_app(shared_box)
    theirs = shared_box.enroll(other, "theirs")
    r = enroll_raw(shared_box, app["enrollment_secret"], device_body(
        app, "mine", previous={"token": theirs["token"], "password": theirs["mqtt"]["password"]}))
    assert r.status_code == 401 and r.json()["code"] == 40106
    assert send(shared_box, other, {"token": theirs["token"]}).status_code == 202


def test_a_new_ticket_for_the_same_user_replaces_the_reinstalled_device(shared_box: Box) -> None:
    app = new_app(shared_box)
    first = shared_box.enroll(app, "install-9", alias="carol")
    old_phone = PahoDevice(first, shared_box.mqtt_port).connect()
    try:
        again = shared_box.enroll(app, "install-9", alias="carol")
        assert again["replaced"] == [first["token"]]
        assert old_phone.disconnects.get(timeout=10) is not None  # the old connection is closed
        assert send(shared_box, app, {"token": first["token"]}).status_code == 410
        assert send(shared_box, app, {"alias": "carol"}).json()["targeted"] == 1
    finally:
        old_phone.close()


# -- the app server binds and unbinds ----------------------------------------------------------------
def test_app_server_sets_and_clears_a_devices_user_and_contact(shared_box: Box) -> None:
    app, other = new_app(shared_box), new_app(shared_box)
    anon = shared_box.enroll(app, "kiosk")
    assert send(shared_box, app, {"alias": "dave"}).status_code == 400
    with shared_box.api(other) as api:
        stolen = api.put(f"/v1/devices/{anon['token']}/identity", json={"alias": "dave"})
    assert stolen.status_code == 410  # another app's key cannot touch this app's device
    with shared_box.api(app) as api:
        r = api.put(f"/v1/devices/{anon['token']}/identity",
                    json={"alias": "dave", "contact": {"email": "dave@corp.example"}})
        assert r.status_code == 200 and r.json() == {"token": anon["token"], "alias": "dave",
                                                     "contact": {"phone": None, "email": "dave@corp.example"}}
        assert send(shared_box, app, {"alias": "dave"}).json()["targeted"] == 1
        r = api.put(f"/v1/devices/{anon['token']}/identity", json={"alias": None, "contact": None})
        assert r.status_code == 200 and r.json()["alias"] is None
    assert send(shared_box, app, {"alias": "dave"}).status_code == 400


def test_app_server_unregisters_its_own_devices_only(shared_box: Box) -> None:
    app, other = new_app(shared_box), new_app(shared_box)
    e = shared_box.enroll(app, "leaver")
    phone = PahoDevice(e, shared_box.mqtt_port).connect()
    try:
        with shared_box.api(other) as api:
            assert api.delete(f"/v1/devices/{e['token']}").status_code == 410
        assert phone.disconnects.empty()
        with shared_box.api(app) as api:
            r = api.delete(f"/v1/devices/{e['token']}")
            assert r.status_code == 200 and r.json()["unregistered_at"] > 0
            assert api.delete(f"/v1/devices/{e['token']}").status_code == 410
        assert phone.disconnects.get(timeout=10) is not None
        gone = send(shared_box, app, {"token": e["token"]})
        assert gone.status_code == 410 and gone.json()["reason"] == "unregistered"
    finally:
        phone.close()


# -- secrets rotate without an outage, and every change is audited --------------------------------------
def test_rotated_secret_and_key_keep_working_through_the_grace_period(shared_box: Box) -> None:
    app = new_app(shared_box)
    rotated = json.loads(shared_box.cli("app", "rotate-secret", app["app_id"], "--json").stdout)
    assert rotated["previous_valid_until"] == pytest.approx(time.time() + 30 * 86400, abs=60)
    for secret in (app["enrollment_secret"], rotated["enrollment_secret"]):  # both during the grace period
        assert enroll_raw(shared_box, secret, device_body(app, f"d-{secret[-4:]}")).status_code == 201
    key = json.loads(shared_box.cli("app", "rotate-key", app["app_id"], "--grace-s", "3600", "--json").stdout)
    e = shared_box.enroll(app, "target")
    for api_key in (app["api_key"], key["api_key"]):
        with httpx.Client(base_url=shared_box.url, headers={"Authorization": f"Bearer {api_key}"}) as api:
            assert api.post("/v1/messages", json={"to": {"token": e["token"]}, "title": "x"}).status_code == 202
    # A leak: rotate again with no grace; the leaked one and the one before it stop at once.
    leaked = rotated["enrollment_secret"]
    fresh = json.loads(shared_box.cli("app", "rotate-secret", app["app_id"], "--grace-s", "0", "--json").stdout)
    for dead in (app["enrollment_secret"], leaked):
        r = enroll_raw(shared_box, dead, device_body(app, "late"))
        assert r.status_code == 401 and r.json()["code"] == 40102
    assert enroll_raw(shared_box, fresh["enrollment_secret"], device_body(app, "new")).status_code == 201
    json.loads(shared_box.cli("app", "rotate-key", app["app_id"], "--grace-s", "0", "--json").stdout)
    for dead in (app["api_key"], key["api_key"]):
        with httpx.Client(base_url=shared_box.url, headers={"Authorization": f"Bearer {dead}"}) as api:
            assert api.post("/v1/messages", json={"to": {"token": e["token"]}, "title": "x"}).status_code == 401


def test_every_change_is_in_the_audit_log_with_who_made_it(shared_box: Box) -> None:
    app = new_app(shared_box)
    shared_box.cli("app", "rotate-key", app["app_id"], "--grace-s", "60")
    shared_box.cli("app", "rotate-secret", app["app_id"])
    shared_box.cli("app", "set-enrollment", app["app_id"], "--require-ticket")
    a = shared_box.enroll(app, "a", alias="erin")
    b = shared_box.enroll(app, "b", alias="frank")
    shared_box.cli("device", "revoke", a["token"])
    with shared_box.api(app) as api:
        assert api.put(f"/v1/devices/{b['token']}/identity",
                       json={"alias": "frank", "contact": {"phone": "+4915112345678"}}).status_code == 200
        assert api.delete(f"/v1/devices/{b['token']}").status_code == 200
    entries = json.loads(shared_box.cli("audit", "--app", app["app_id"], "--json").stdout)
    actions = [(e["action"], e["actor"].split(" ")[0], e["subject"]) for e in reversed(entries)]
    provider = f"provider:{app['app_id']}"
    assert actions == [
        ("app.create", "unix:root", app_name(shared_box, app)),
        ("app.rotate_key", "unix:root", None),
        ("app.rotate_secret", "unix:root", None),
        ("app.set_enrollment", "unix:root", None),
        ("device.revoke", "unix:root", a["token"]),
        ("device.set_identity", provider, b["token"]),
        ("device.unregister", provider, b["token"]),
    ]
    assert all(e["actor"].startswith("unix:root pid=") for e in entries if e["actor"].startswith("unix:"))
    by_action = {e["action"]: e for e in entries}
    assert by_action["app.rotate_key"]["detail"]["grace_s"] == 60
    assert "+4915112345678" not in json.dumps(entries)  # contacts are masked in the log
    page = json.loads(shared_box.cli("audit", "--app", app["app_id"], "--limit", "2", "--json").stdout)
    older = json.loads(shared_box.cli("audit", "--app", app["app_id"], "--before", str(page[-1]["id"]),
                                      "--json").stdout)
    assert [e["id"] for e in page + older] == [e["id"] for e in entries]


def app_name(box: Box, app: dict[str, str]) -> str:
    listing = json.loads(box.cli("app", "list", "--json").stdout)
    return next(a["name"] for a in listing if a["app_id"] == app["app_id"])


def test_audit_log_survives_a_restart_and_records_offline_changes(box: Box) -> None:
    app = box.create_app("audited")
    box.stop()
    box.cli("app", "rotate-key", "audited", "--grace-s", "0")  # no daemon: the CLI writes the store itself
    box.start()
    entries = json.loads(box.cli("audit", "--json").stdout)
    assert [(e["action"], e["actor"]) for e in reversed(entries)] == [
        ("app.create", entries[-1]["actor"]), ("app.rotate_key", "unix:root (offline)")]
    assert entries[-1]["actor"].startswith("unix:root pid=") and entries[-1]["app_id"] == app["app_id"]
    bad = box.cli("audit", "--limit", "0", check=False)
    assert bad.returncode == 1 and "limit" in bad.stderr


def test_simulated_device_enrolls_with_a_ticket_and_gets_pushes_to_its_alias(shared_box: Box) -> None:
    """The README's first push: mint a ticket, `intrapush device simulate --ticket`, push to the alias."""
    app = new_app(shared_box)
    ticket = shared_box.ticket(app, alias="emp-4711")["ticket"]
    cmd = [sys.executable, "-m", "appliance", "device", "simulate", "--url", shared_box.url,
           "--app-id", app["app_id"], "--seconds", "60"]
    sim = subprocess.Popen([*cmd, "--ticket", ticket], stdout=subprocess.PIPE, text=True)
    try:
        first = json.loads(sim.stdout.readline())
        assert first["alias"] == "emp-4711" and first["connected"] is True
        sent = send(shared_box, app, {"alias": "emp-4711"}, body="from the box")
        assert sent.status_code == 202 and sent.json()["targeted"] == 1
        got = json.loads(sim.stdout.readline())
        assert got["push"]["body"] == "from the box" and got["token"] == first["token"]
        with shared_box.api(app) as api:
            wait_for(lambda: api.get(f"/v1/messages/{sent.json()['id']}").json()["counts"]["acked"] == 1, 15)
    finally:
        sim.terminate()
        sim.wait(10)
    again = subprocess.run([*cmd, "--ticket", ticket], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "40105" in again.stderr and "Traceback" not in again.stderr
