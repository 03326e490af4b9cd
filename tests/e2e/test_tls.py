"""TLS from the box's own CA on every listener, checked by clients nobody here wrote: paho-mqtt,
mosquitto_sub, openssl s_client, curl, httpx, Python's ssl; device certificates built on the fly."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import ssl
import subprocess
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import certs
from tests.appliance.test_broker_hardening import connect_packet, read_packet
from tests.conftest import Box, PahoDevice, wait_for


def ca_file(box: Box) -> Path:
    return box.data_dir / "certs" / "ca.pem"


def trust(box: Box) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file(box)))


def https(box: Box) -> str:
    return "https://" + box.addresses["https"].replace("127.0.0.1", "localhost")


def enroll_tls(box: Box, app: dict, device_id: str) -> dict:
    r = httpx.post(f"{https(box)}/v1/devices", verify=trust(box),
                   headers={"Authorization": f"Bearer {app['enrollment_secret']}"},
                   json={"app_id": app["app_id"], "platform": "ios", "package": "com.corp.app",
                         "device_id": device_id})
    assert r.status_code == 201, r.text
    return r.json()


def push(box: Box, app: dict, token: str, title: str) -> str:
    r = httpx.post(f"{https(box)}/v1/messages", verify=trust(box),
                   headers={"Authorization": f"Bearer {app['api_key']}"},
                   json={"to": {"token": token}, "title": title})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def served_serial(box: Box) -> int:
    """The serial of the server certificate the box's MQTT-over-TLS listener presents right now."""
    with socket.create_connection(("127.0.0.1", box.port("mqtt-tls"))) as raw, \
            trust(box).wrap_socket(raw, server_hostname="localhost") as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def spki_pin_of(der: bytes) -> str:
    cert = x509.load_der_x509_certificate(der)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256/" + base64.b64encode(hashlib.sha256(spki).digest()).decode()


class TlsPaho(PahoDevice):
    def __init__(self, enrollment: dict, port: int, cafile: Path, certfile: Path | None = None,
                 keyfile: Path | None = None) -> None:
        super().__init__(enrollment, port)
        self.client.tls_set(ca_certs=str(cafile), certfile=str(certfile) if certfile else None,
                            keyfile=str(keyfile) if keyfile else None)


@pytest.fixture(scope="module")
def tls_box(tmp_path_factory: pytest.TempPathFactory):
    box = Box(tmp_path_factory.mktemp("tls") / "box").start()
    yield box
    box.stop()


def test_enrollment_carries_the_ca_and_pins_that_a_python_ssl_client_verifies(tls_box: Box) -> None:
    app = tls_box.create_app("pins-" + uuid.uuid4().hex[:6])
    e = enroll_tls(tls_box, app, "iphone")
    assert e["mqtt"]["tls"] is True and e["mqtt"]["port"] == tls_box.port("mqtt-tls")
    assert e["ca_pem"] == ca_file(tls_box).read_text()
    ctx = ssl.create_default_context(cadata=e["ca_pem"])
    with socket.create_connection(("127.0.0.1", e["mqtt"]["port"])) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        assert spki_pin_of(tls.getpeercert(binary_form=True)) == e["server_pin"]
    ca = x509.load_pem_x509_certificate(e["ca_pem"].encode())
    assert e["ca_pin"] == "sha256/" + certs.spki_pin(ca)
    shown = json.loads(tls_box.cli("ca", "show", "--json").stdout)
    assert shown["ca_pin"] == e["ca_pin"] and shown["server_pin"] == e["server_pin"]
    assert tls_box.cli("ca", "export").stdout == e["ca_pem"]
    pinned = certs.client_ssl_context(ca_file(tls_box), pin=e["ca_pin"])
    with socket.create_connection(("127.0.0.1", e["mqtt"]["port"])) as raw, \
            pinned.wrap_socket(raw, server_hostname="localhost"):
        pass


def test_paho_and_mosquitto_sub_over_tls_receive_pushes(tls_box: Box) -> None:
    app = tls_box.create_app("mqtts-" + uuid.uuid4().hex[:6])
    a, b = enroll_tls(tls_box, app, "a"), enroll_tls(tls_box, app, "b")
    device = TlsPaho(a, tls_box.port("mqtt-tls"), ca_file(tls_box)).connect()
    mid = push(tls_box, app, a["token"], "over tls")
    assert device.next()["id"] == mid
    device.close()
    m = b["mqtt"]
    proc = subprocess.Popen(["mosquitto_sub", "-h", "localhost", "-p", str(m["port"]), "--cafile",
                             str(ca_file(tls_box)), "-i", m["client_id"], "-u", m["username"], "-P", m["password"],
                             "-t", b["inbox_topic"], "-q", "1", "-C", "1", "-W", "10"], stdout=subprocess.PIPE,
                            text=True)
    try:
        wait_for(lambda: httpx.get(f"{https(tls_box)}/v1/devices/{b['token']}", verify=trust(tls_box),
                                   headers={"Authorization": f"Bearer {app['api_key']}"}).json()["subscribed"])
        mid = push(tls_box, app, b["token"], "to mosquitto_sub")
        out, _ = proc.communicate(timeout=15)
        assert json.loads(out)["id"] == mid
    finally:
        proc.kill()


def test_https_api_is_trusted_with_the_ca_and_refused_without(tls_box: Box) -> None:
    assert httpx.get(f"{https(tls_box)}/healthz", verify=trust(tls_box)).json() == {"status": "ok"}
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{https(tls_box)}/healthz")  # the system's public CAs do not know the box
    curl = subprocess.run(["curl", "-sS", "--cacert", str(ca_file(tls_box)), f"{https(tls_box)}/healthz"],
                          capture_output=True, text=True, timeout=20)
    assert curl.returncode == 0 and json.loads(curl.stdout) == {"status": "ok"}


def test_openssl_s_client_verifies_the_mqtt_listener(tls_box: Box) -> None:
    r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{tls_box.port('mqtt-tls')}",
                        "-servername", "localhost", "-verify_hostname", "localhost", "-CAfile",
                        str(ca_file(tls_box)), "-verify_return_error", "-brief"],
                       input="", capture_output=True, text=True, timeout=20)
    assert "Verification: OK" in r.stdout + r.stderr, r.stdout + r.stderr


def test_plain_listeners_are_warned_about(tls_box: Box) -> None:
    log = tls_box.log()
    assert "event=plain_listener name=mqtt " in log and "event=plain_listener name=http " in log
    assert "event=plain_listener name=mqtt-tls" not in log


# --- mutual TLS -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mtls_box(tmp_path_factory: pytest.TempPathFactory):
    env = {"INTRAPUSH_BROKER_TLS_CLIENT_CERT": "required", "INTRAPUSH_CERTS_CHECK_INTERVAL_S": "0.2"}
    box = Box(tmp_path_factory.mktemp("mtls") / "box", env=env).start()
    yield box
    box.stop()


def write_pem(device: certs.IssuedDevice, directory: Path, label: str) -> tuple[Path, Path]:
    crt, key = directory / f"{label}.crt", directory / f"{label}.key"
    crt.write_bytes(device.cert.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(device.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    return crt, key


def from_p12(box: Box, token: str, directory: Path, label: str) -> tuple[Path, Path]:
    """The operator's path: `intrapush cert device TOKEN --out F.p12`, then what a phone imports."""
    password = directory / f"{label}.pw"
    password.write_text("correct horse battery")
    out = directory / f"{label}.p12"
    box.cli("cert", "device", token, "--out", str(out), "--password-file", str(password))
    return write_pem(certs.load_pkcs12(out.read_bytes(), "correct horse battery"), directory, label)


def mqtt_over_tls(box: Box, e: dict, cert: tuple[Path, Path] | None, trust_file: Path | None = None) -> str:
    """'accepted', 'refused:<connack code>' or 'tls-refused'."""
    ctx = ssl.create_default_context(cafile=str(trust_file or ca_file(box)))
    if cert is not None:
        ctx.load_cert_chain(*map(str, cert))
    try:
        with socket.create_connection(("127.0.0.1", box.port("mqtt-tls")), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(connect_packet(e["mqtt"]["client_id"], e["mqtt"]["username"], e["mqtt"]["password"]))
            kind, body = read_packet(tls)
    except (ssl.SSLError, ConnectionError, OSError):
        return "tls-refused"
    return "accepted" if body[1] == 0 else f"refused:{body[1]}"


def test_required_client_certificates(mtls_box: Box, tmp_path: Path) -> None:
    app = mtls_box.create_app("mtls-" + uuid.uuid4().hex[:6])
    a, b = enroll_tls(mtls_box, app, "a"), enroll_tls(mtls_box, app, "b")
    good = from_p12(mtls_box, a["token"], tmp_path, "a")
    assert mqtt_over_tls(mtls_box, a, good) == "accepted"
    assert mqtt_over_tls(mtls_box, a, None) == "tls-refused"
    # A certificate of device a presented with device b's credentials: one device cannot be another.
    assert mqtt_over_tls(mtls_box, b, good) == "refused:5"

    stranger = certs.CertStore(tmp_path / "other-ca")
    certs.create_ca(stranger)
    foreign = write_pem(certs.issue_device_cert(stranger, a["mqtt"]["client_id"]), tmp_path, "foreign")
    assert mqtt_over_tls(mtls_box, a, foreign) == "tls-refused"

    box_ca = certs.CertStore(mtls_box.data_dir / "certs")
    long_ago = datetime.now(timezone.utc) - timedelta(days=30)
    expired = write_pem(certs.issue_device_cert(box_ca, a["mqtt"]["client_id"], valid_days=2, now=long_ago),
                        tmp_path, "expired")
    assert mqtt_over_tls(mtls_box, a, expired) == "tls-refused"

    device = TlsPaho(a, mtls_box.port("mqtt-tls"), ca_file(mtls_box), *good).connect()
    mid = push(mtls_box, app, a["token"], "with a client certificate")
    assert device.next()["id"] == mid
    device.close()


def test_revoked_certificate_is_refused_without_a_restart(mtls_box: Box, tmp_path: Path) -> None:
    app = mtls_box.create_app("revoke-" + uuid.uuid4().hex[:6])
    e = enroll_tls(mtls_box, app, "phone")
    cert = from_p12(mtls_box, e["token"], tmp_path, "phone")
    assert mqtt_over_tls(mtls_box, e, cert) == "accepted"
    out = json.loads(mtls_box.cli("cert", "revoke", e["token"], "--json").stdout)
    assert len(out) == 1 and out[0]["revoked_at"]
    wait_for(lambda: mqtt_over_tls(mtls_box, e, cert) == "tls-refused", timeout=10)
    listed = {c["serial"]: c["state"] for c in json.loads(mtls_box.cli("cert", "list", "--json").stdout)}
    assert listed[out[0]["serial"]] == "revoked"


def test_device_revoke_also_revokes_its_certificates(mtls_box: Box, tmp_path: Path) -> None:
    app = mtls_box.create_app("devrevoke-" + uuid.uuid4().hex[:6])
    e = enroll_tls(mtls_box, app, "phone")
    from_p12(mtls_box, e["token"], tmp_path, "phone")
    out = json.loads(mtls_box.cli("device", "revoke", e["token"], "--json").stdout)
    assert out["certificates_revoked"] == 1


def test_server_certificate_reissue_applies_to_new_connections_only(tls_box: Box) -> None:
    app = tls_box.create_app("renew-" + uuid.uuid4().hex[:6])
    e = enroll_tls(tls_box, app, "steady")
    device = TlsPaho(e, tls_box.port("mqtt-tls"), ca_file(tls_box)).connect()
    before = served_serial(tls_box)
    issued = json.loads(tls_box.cli("cert", "server", "--san", "localhost", "--san", "127.0.0.1", "--json").stdout)
    wait_for(lambda: served_serial(tls_box) != before, timeout=10)
    assert served_serial(tls_box) == int(issued["serial"], 16)
    mid = push(tls_box, app, e["token"], "still connected")
    assert device.next()["id"] == mid and device.disconnects.empty()
    device.close()


@pytest.mark.parametrize("bad", ["exa mple.com", "-bad.com", "300.1.1.1"])
def test_bad_san_is_refused_and_changes_nothing(tls_box: Box, bad: str) -> None:
    before = (tls_box.data_dir / "certs" / "server.pem").read_bytes()
    r = tls_box.cli("cert", "server", f"--san={bad}", check=False)
    assert r.returncode == 1 and "refused" in r.stderr
    assert (tls_box.data_dir / "certs" / "server.pem").read_bytes() == before


def test_keys_are_private(tls_box: Box) -> None:
    for name in ("ca.key", "server.key"):
        assert (tls_box.data_dir / "certs" / name).stat().st_mode & 0o077 == 0


def test_browser_transport_secure_websocket_gets_push(tmp_path: Path) -> None:
    box = Box(tmp_path / "box", env={"INTRAPUSH_BROKER_WSS_LISTEN": "127.0.0.1:0"}).start()
    try:
        app = box.create_app("wss")
        e = enroll_tls(box, app, "browser")
        assert e["websocket_url"] == f"wss://localhost:{box.port('mqtt-wss')}/"
        device = PahoDevice(e, box.port("mqtt-wss"), transport="websockets")
        device.client.tls_set(ca_certs=str(ca_file(box)))
        device.connect()
        mid = push(box, app, e["token"], "over wss")
        assert device.next()["id"] == mid
        device.close()
    finally:
        box.stop()


def test_ca_key_encrypted_at_rest_with_a_passphrase(tmp_path: Path) -> None:
    env = {"INTRAPUSH_CERTS_CA_PASSPHRASE": "an operator secret"}
    box = Box(tmp_path / "box", env=env).start()
    box.stop()
    assert b"ENCRYPTED" in (box.data_dir / "certs" / "ca.key").read_bytes()
    box.start()  # the passphrase opens it again
    box.stop()
    box.extra_env = {"INTRAPUSH_CERTS_CA_PASSPHRASE": "wrong"}
    with pytest.raises(RuntimeError, match="cannot be used"):
        box.start()


def test_server_certificate_near_expiry_is_renewed_at_start(tmp_path: Path) -> None:
    data = tmp_path / "box"
    store = certs.CertStore(data / "certs")
    certs.create_ca(store)
    short = certs.issue_server_cert(store, ["localhost", "127.0.0.1"], valid_days=5)
    box = Box(data).start()
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file(box)))
        with socket.create_connection(("127.0.0.1", box.port("mqtt-tls"))) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            served = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
        assert served.serial_number != short.serial_number
        assert served.not_valid_after_utc - datetime.now(timezone.utc) > timedelta(days=300)
        assert "event=server_cert_renewed" in box.log()
    finally:
        box.stop()


def test_ca_rotation_keeps_old_devices_trusted_until_retired(tmp_path: Path) -> None:
    box = Box(tmp_path / "box", env={"INTRAPUSH_BROKER_TLS_CLIENT_CERT": "required",
                                     "INTRAPUSH_CERTS_CHECK_INTERVAL_S": "0.2"}).start()
    try:
        app = box.create_app("rotate")
        e = enroll_tls(box, app, "old-phone")
        old_cert = from_p12(box, e["token"], tmp_path, "old")
        created = json.loads(box.cli("ca", "create", "--force", "--json").stdout)
        assert "server" not in created  # the server keeps its certificate until devices trust the new CA
        bundle = tmp_path / "bundle.pem"  # what MDM distributes during the overlap: both CAs
        box.cli("ca", "export", "--out", str(bundle))
        time.sleep(0.5)
        assert mqtt_over_tls(box, e, old_cert, bundle) == "accepted"
        assert created["ca_pin"] != e["ca_pin"]
        box.cli("cert", "server")
        box.cli("ca", "retire-previous")
        wait_for(lambda: mqtt_over_tls(box, e, old_cert, bundle) == "tls-refused", timeout=10)
    finally:
        box.stop()


def test_mosquitto_sub_with_a_device_certificate(mtls_box: Box, tmp_path: Path) -> None:
    app = mtls_box.create_app("mosq-mtls-" + uuid.uuid4().hex[:6])
    e = enroll_tls(mtls_box, app, "mosq")
    crt, key = from_p12(mtls_box, e["token"], tmp_path, "mosq")
    m = e["mqtt"]
    base = ["mosquitto_sub", "-h", "localhost", "-p", str(m["port"]), "--cafile", str(ca_file(mtls_box)),
            "-i", m["client_id"], "-u", m["username"], "-P", m["password"], "-t", e["inbox_topic"], "-q", "1",
            "-C", "1", "-W", "10"]
    refused = subprocess.run(base[:-4] + ["-C", "1", "-W", "3"], capture_output=True, text=True, timeout=20)
    assert refused.returncode != 0  # no certificate: the handshake fails
    proc = subprocess.Popen(base + ["--cert", str(crt), "--key", str(key)], stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: httpx.get(f"{https(mtls_box)}/v1/devices/{e['token']}", verify=trust(mtls_box),
                                   headers={"Authorization": f"Bearer {app['api_key']}"}).json()["subscribed"])
        mid = push(mtls_box, app, e["token"], "mosquitto with a certificate")
        out, _ = proc.communicate(timeout=15)
        assert json.loads(out)["id"] == mid
    finally:
        proc.kill()
