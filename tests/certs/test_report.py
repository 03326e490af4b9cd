"""What `ca show` and `cert list` report: fingerprints, pins, days left, and each certificate's state."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta

from certs import CertStore, create_ca, describe, describe_ca, issue_device_cert, list_certs, retire_previous_ca, revoke
from tests.certs.peers import OPENSSL, openssl_spki_pin


def test_describe_ca_matches_what_openssl_says(store: CertStore) -> None:
    summary = describe_ca(store)
    openssl = subprocess.run([OPENSSL, "x509", "-in", str(store.ca_pem), "-noout", "-fingerprint", "-sha256",
                              "-serial"], capture_output=True, text=True, check=True).stdout

    assert f"sha256 Fingerprint={summary.fingerprint_sha256}" in openssl
    assert f"serial={summary.serial.upper()}" in openssl.replace("serial=0", "serial=")
    assert summary.spki_pin == openssl_spki_pin(store.ca_pem)
    assert summary.is_ca and summary.key_type == "ec-p256"
    assert summary.subject.startswith("CN=intrapush CA ")
    assert summary.days_left == 3650


def test_describe_a_server_certificate(store: CertStore) -> None:
    summary = describe(store.load_server_cert())
    assert summary.sans == ("localhost", "127.0.0.1", "::1")
    assert not summary.is_ca and summary.days_left == 397
    assert len(bytes.fromhex(summary.spki_pin_hex)) == 32
    assert json.loads(json.dumps(summary.as_dict()))["sans"] == ["localhost", "127.0.0.1", "::1"]


def test_days_left_goes_negative_after_expiry(store: CertStore) -> None:
    cert = store.load_server_cert()
    assert describe(cert, now=cert.not_valid_after_utc + timedelta(days=3)).days_left == -3


def test_cert_list_shows_every_certificate_with_its_state(store: CertStore) -> None:
    now = datetime.now(UTC)
    issue_device_cert(store, "fresh")
    issue_device_cert(store, "soon", valid_days=10)
    issue_device_cert(store, "gone", valid_days=30, now=now - timedelta(days=60))
    issue_device_cert(store, "lost")
    revoke(store, "lost")

    states = {(c.kind, c.name): c.state for c in list_certs(store)}

    assert states == {("server", "localhost"): "valid", ("device", "fresh"): "valid",
                      ("device", "soon"): "expiring", ("device", "gone"): "expired", ("device", "lost"): "revoked"}
    rows = [c.as_dict() for c in list_certs(store)]
    assert json.loads(json.dumps(rows)) == rows
    assert next(r for r in rows if r["name"] == "lost")["revoked_at"] is not None


def test_cert_list_marks_certificates_of_a_retired_ca(store: CertStore) -> None:
    issue_device_cert(store, "old-ca-phone")
    create_ca(store, overwrite=True)
    assert {c.name: c.state for c in list_certs(store)}["old-ca-phone"] == "valid"
    retire_previous_ca(store)
    assert {c.name: c.state for c in list_certs(store)}["old-ca-phone"] == "retired"


def test_empty_store_lists_nothing(tmp_path) -> None:
    assert list_certs(CertStore(tmp_path / "none")) == []
