"""The Mosquitto backend's own duties: supervise the child, refuse what Mosquitto cannot do, drive an
external broker through `broker.url`, and keep its TLS listener on the box's CA: renewal, revocation and CA
rotation without a restart, one device certificate per identity. (The device protocol itself runs on both
backends in tests/e2e.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

import certs
from appliance.broker.mosquitto_child import ChildListener, ChildSettings, free_port, render_config, render_dynsec
from appliance.broker.mosquitto import PUBLISH_LANES
from tests.conftest import Box, PahoDevice, needs_mosquitto, wait_for
from tests.e2e.test_tls import (TlsPaho, ca_file, enroll_tls, from_p12, https, mqtt_over_tls, push, served_serial,
                                 trust)

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
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        time.sleep(0.05)
        return False


# -- TLS on the Mosquitto child -----------------------------------------------------------------------------

FAST_TLS_CHECKS = {"INTRAPUSH_CERTS_CHECK_INTERVAL_S": "0.2"}


@pytest.fixture(scope="module")
def tls_mosquitto(tmp_path_factory: pytest.TempPathFactory):
    box = Box(tmp_path_factory.mktemp("mosq-tls") / "box", env=dict(FAST_TLS_CHECKS), backend="mosquitto").start()
    yield box
    box.stop()


@pytest.fixture(scope="module")
def mtls_mosquitto(tmp_path_factory: pytest.TempPathFactory):
    env = {"INTRAPUSH_BROKER_TLS_CLIENT_CERT": "required", **FAST_TLS_CHECKS}
    box = Box(tmp_path_factory.mktemp("mosq-mtls") / "box", env=env, backend="mosquitto").start()
    yield box
    box.stop()


def mosquitto_cli(tool: str, box: Box, login: dict, cafile: Path, cert: tuple[Path, Path] | None = None) -> list[str]:
    """mosquitto_sub or mosquitto_pub on the TLS listener with `login`'s client id, username and password."""
    m = login["mqtt"]
    cmd = [tool, "-h", "localhost", "-p", str(box.port("mqtt-tls")), "--cafile", str(cafile), "-i", m["client_id"],
           "-u", m["username"], "-P", m["password"], "-q", "1"]
    return cmd + (["--cert", str(cert[0]), "--key", str(cert[1])] if cert else [])


def device_state(box: Box, app: dict, token: str) -> dict:
    return httpx.get(f"{https(box)}/v1/devices/{token}", verify=trust(box),
                     headers={"Authorization": f"Bearer {app['api_key']}"}).json()


def receives_one_push(proc: subprocess.Popen[str], box: Box, app: dict, e: dict, title: str) -> None:
    """A mosquitto_sub for device `e`, once the box sees it subscribed, prints the push sent to it."""
    try:
        wait_for(lambda: device_state(box, app, e["token"])["subscribed"])
        mid = push(box, app, e["token"], title)
        out, _ = proc.communicate(timeout=15)
        assert json.loads(out)["id"] == mid
    finally:
        proc.kill()


def message_state(box: Box, app: dict, mid: str, token: str) -> dict:
    return httpx.get(f"{https(box)}/v1/messages/{mid}", verify=trust(box),
                     headers={"Authorization": f"Bearer {app['api_key']}"}).json()["tokens"][token]


def test_mosquitto_sub_trusting_the_exported_ca_gets_a_push_and_one_trusting_another_ca_is_refused(
        tls_mosquitto: Box, tmp_path: Path) -> None:
    box = tls_mosquitto
    app = box.create_app("mosq-tls-sub")
    e = enroll_tls(box, app, "sub")
    exported = tmp_path / "box-ca.pem"
    box.cli("ca", "export", "--out", str(exported))
    stranger = certs.CertStore(tmp_path / "other-box")
    certs.create_ca(stranger)
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_bytes(certs.export_ca_pem(stranger))
    sub = ["-t", e["inbox_topic"], "-C", "1"]

    refused = subprocess.run(mosquitto_cli("mosquitto_sub", box, e, other_ca) + sub + ["-W", "3"],
                             capture_output=True, text=True, timeout=20)
    assert refused.returncode != 0 and refused.stdout == ""
    assert device_state(box, app, e["token"])["online"] is False

    receives_one_push(subprocess.Popen(mosquitto_cli("mosquitto_sub", box, e, exported) + sub + ["-W", "10"],
                                       stdout=subprocess.PIPE, text=True), box, app, e, "over mosquitto's TLS listener")


def test_renewed_server_certificate_is_served_by_mosquitto_without_a_restart(tls_mosquitto: Box) -> None:
    box = tls_mosquitto
    app = box.create_app("mosq-renew")
    e = enroll_tls(box, app, "steady")
    device = TlsPaho(e, box.port("mqtt-tls"), ca_file(box)).connect()
    pid = child_pid(box)
    before = served_serial(box)
    issued = json.loads(box.cli("cert", "server", "--san", "localhost", "--san", "127.0.0.1", "--json").stdout)
    wait_for(lambda: served_serial(box) != before, timeout=5)
    assert served_serial(box) == int(issued["serial"], 16)
    assert child_pid(box) == pid
    mid = push(box, app, e["token"], "still connected")
    assert device.next()["id"] == mid and device.disconnects.empty()
    device.close()


def test_revoked_device_certificate_is_refused_by_mosquitto_without_a_restart(mtls_mosquitto: Box,
                                                                             tmp_path: Path) -> None:
    box = mtls_mosquitto
    app = box.create_app("mosq-revoke")
    e, other = enroll_tls(box, app, "phone"), enroll_tls(box, app, "other")
    cert, other_cert = from_p12(box, e["token"], tmp_path, "phone"), from_p12(box, other["token"], tmp_path, "other")
    pid = child_pid(box)
    receives_one_push(subprocess.Popen(mosquitto_cli("mosquitto_sub", box, e, ca_file(box), cert)
                                       + ["-t", e["inbox_topic"], "-C", "1", "-W", "10"], stdout=subprocess.PIPE,
                                       text=True), box, app, e, "before revocation")

    box.cli("cert", "revoke", e["token"])

    wait_for(lambda: mqtt_over_tls(box, e, cert) == "tls-refused", timeout=5)
    again = subprocess.run(mosquitto_cli("mosquitto_sub", box, e, ca_file(box), cert)
                           + ["-t", e["inbox_topic"], "-C", "1", "-W", "3"], capture_output=True, text=True, timeout=20)
    assert again.returncode != 0 and again.stdout == ""
    assert child_pid(box) == pid  # reloaded, not restarted
    assert "event=mosquitto_tls_reloaded" in box.log()
    assert mqtt_over_tls(box, other, other_cert) == "accepted"
    # Logins added at run time survive the reload (here on the plain listener, with the password).
    PahoDevice(other, box.mqtt_port).connect().close()


def test_a_device_certificate_logs_in_as_its_own_device_only(mtls_mosquitto: Box, tmp_path: Path) -> None:
    """A's certificate with B's client id and password: Mosquitto takes A's identity from the certificate,
    so the intruder neither takes B's place nor receives B's pushes nor acks them on B's topic."""
    box = mtls_mosquitto
    app = box.create_app("mosq-identity")
    a, b = enroll_tls(box, app, "a"), enroll_tls(box, app, "b")
    a_cert, b_cert = from_p12(box, a["token"], tmp_path, "a"), from_p12(box, b["token"], tmp_path, "b")
    real_b = TlsPaho(b, box.port("mqtt-tls"), ca_file(box), *b_cert).connect()
    intruder = subprocess.Popen(mosquitto_cli("mosquitto_sub", box, b, ca_file(box), a_cert)
                                + ["-t", b["inbox_topic"], "-t", a["inbox_topic"], "-C", "1", "-W", "3"],
                                stdout=subprocess.PIPE, text=True)  # B's inbox refused, A's keeps it connected (#9)
    try:
        wait_for(lambda: device_state(box, app, a["token"])["online"])  # it logged in as A
        assert real_b.disconnects.empty() and device_state(box, app, b["token"])["online"]
        mid = push(box, app, b["token"], "for b only")
        assert real_b.next()["id"] == mid
        out, _ = intruder.communicate(timeout=15)
        assert out == ""
    finally:
        intruder.kill()

    forged = subprocess.run(mosquitto_cli("mosquitto_pub", box, b, ca_file(box), a_cert)
                            + ["-t", b["ack_topic"], "-m", json.dumps({"ids": [mid], "state": "opened"})],
                            capture_output=True, text=True, timeout=20)
    assert forged.returncode == 0  # MQTT 3.1.1 cannot refuse a PUBLISH: Mosquitto acknowledges and drops it
    real_b.ack([mid], "received")
    wait_for(lambda: message_state(box, app, mid, b["token"])["state"] == "acked")
    assert message_state(box, app, mid, b["token"])["ack"] == "received"  # an ack only raises: "opened" never came
    assert real_b.disconnects.empty()
    real_b.close()
    # The limit (docs/broker.md): with the identity from the certificate, Mosquitto does not check the password.
    assert mqtt_over_tls(box, {"mqtt": {**a["mqtt"], "password": "not the password"}}, a_cert) == "accepted"


def test_device_revoke_disconnects_a_certificate_login_and_refuses_its_certificate(mtls_mosquitto: Box,
                                                                                  tmp_path: Path) -> None:
    box = mtls_mosquitto
    app = box.create_app("mosq-devrevoke")
    e = enroll_tls(box, app, "lost")
    cert = from_p12(box, e["token"], tmp_path, "lost")
    device = TlsPaho(e, box.port("mqtt-tls"), ca_file(box), *cert).connect()

    out = json.loads(box.cli("device", "revoke", e["token"], "--json").stdout)

    assert out["certificates_revoked"] == 1
    assert device.disconnects.get(timeout=5) is not None  # deleteClient kicks by username: the certificate's CN
    wait_for(lambda: mqtt_over_tls(box, e, cert) == "tls-refused", timeout=5)
    device.close()


def test_ca_rotation_on_mosquitto_trusts_the_previous_ca_until_it_is_retired(tmp_path: Path) -> None:
    env = {"INTRAPUSH_BROKER_TLS_CLIENT_CERT": "required", **FAST_TLS_CHECKS}
    box = Box(tmp_path / "box", env=env, backend="mosquitto").start()
    try:
        app = box.create_app("mosq-rotate")
        old, new = enroll_tls(box, app, "old-phone"), enroll_tls(box, app, "new-phone")
        old_cert = from_p12(box, old["token"], tmp_path, "old")
        pid = child_pid(box)
        box.cli("ca", "create", "--force")
        new_cert = from_p12(box, new["token"], tmp_path, "new")  # from the new CA
        bundle = tmp_path / "bundle.pem"  # what MDM distributes during the overlap: both CAs
        box.cli("ca", "export", "--out", str(bundle))

        wait_for(lambda: mqtt_over_tls(box, new, new_cert, bundle) == "accepted", timeout=5)
        assert mqtt_over_tls(box, old, old_cert, bundle) == "accepted"

        box.cli("cert", "server")
        box.cli("ca", "retire-previous")
        wait_for(lambda: mqtt_over_tls(box, old, old_cert, bundle) == "tls-refused", timeout=5)
        assert mqtt_over_tls(box, new, new_cert, bundle) == "accepted"
        assert child_pid(box) == pid
    finally:
        box.stop()


def _internal_port(box: Box) -> int:
    """intrapush's own listener in the generated mosquitto.conf (the line after its comment)."""
    lines = (box.data_dir / "mosquitto" / "mosquitto.conf").read_text().splitlines()
    return int(lines[lines.index("# intrapush's own connection") + 1].split()[1])


def _connections_to(port: int) -> int:
    out = subprocess.run(["ss", "-tnH", "state", "established", f"dport = :{port}"], capture_output=True,
                         text=True, check=True).stdout
    return len(out.splitlines())


def test_pushes_and_acks_use_every_connection_to_mosquitto_and_they_come_back(tmp_path: Path) -> None:
    """Pushes spread over PUBLISH_LANES connections, acks over a shared subscription; after Mosquitto
    dies, all of them log in again and every device's push is delivered and acked."""
    box = Box(tmp_path / "box", backend="mosquitto").start()
    try:
        port = _internal_port(box)
        wait_for(lambda: _connections_to(port) == PUBLISH_LANES, timeout=5)
        first = child_pid(box)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: child_pid(box) not in (None, first), timeout=10)
        port = _internal_port(box)
        wait_for(lambda: _connections_to(port) == PUBLISH_LANES, timeout=10)
        app = box.create_app("lanes")
        enrollments = [box.enroll(app, f"phone-{n}") for n in range(24)]  # 24 devices: all lanes, most surely
        devices = [wait_for(lambda e=e: _try_connect(e, box.mqtt_port), timeout=10) for e in enrollments]
        with box.api(app) as api:
            sent = [api.post("/v1/messages", json={"to": {"token": e["token"]}, "title": "t"}).json()["id"]
                    for e in enrollments]
            for device, mid in zip(devices, sent):
                assert device.next()["id"] == mid
                device.ack([mid])
            wait_for(lambda: all(api.get(f"/v1/messages/{mid}").json()["counts"]["acked"] == 1 for mid in sent),
                     timeout=10)
        for device in devices:
            device.close()
    finally:
        box.stop()
