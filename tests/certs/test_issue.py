"""Issuing and renewing the server certificate, issuing device certificates, and checking their names."""

from __future__ import annotations

import ipaddress
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs import (BadInput, BadName, CertStore, NotSetUp, NotValidNow, create_ca, issue_device_cert,
                   issue_server_cert, needs_renewal, renew_server_cert, spki_pin)
from certs.names import parse_san
from tests.certs.pki import snapshot

BAD_SANS = [
    ("exa mple.com", "label 'exa mple'"),
    ("-bad.com", "label '-bad'"),
    ("bad-.com", "label 'bad-'"),
    ("a..b", "empty label"),
    (".example.com", "empty label"),
    ("example.com.", "empty label"),
    ("*.*.x", "wildcard may only be the whole leftmost label"),
    ("f*o.example.com", "wildcard may only be the whole leftmost label"),
    ("*.com", "at least two labels after it"),
    ("*", "at least two labels after it"),
    ("300.1.1.1", "not a valid IPv4 address"),
    ("1.2.3", "not a valid IPv4 address"),
    ("010.0.0.1", "not a valid IPv4 address"),
    ("example.123", "last label may not be all digits"),
    ("", "empty"),
    ("under_score.example.com", "label 'under_score'"),
    ("b\u00fccher.example", "punycode"),
    ("a" * 64 + ".example.com", "1-63 letters"),
    (("a" * 60 + ".") * 5 + "com", "at most 253"),
    ("[::1]", "without brackets"),
    ("fe80::1%eth0", "zone index"),
    ("::g", "not a valid IPv6 address"),
    ("push.example.com:443", "without a port"),
    ("0.0.0.0", "unspecified address"),
    ("10.0.0.0/8", "label '0/8'"),
]


@pytest.mark.parametrize(("value", "says"), BAD_SANS, ids=[repr(v)[:30] for v, _ in BAD_SANS])
def test_bad_san_is_refused_by_name_and_nothing_is_written(value: str, says: str, store: CertStore) -> None:
    before = snapshot(store.directory)
    with pytest.raises(BadName, match=says) as caught:
        issue_server_cert(store, ["push.example.com", value])
    assert caught.value.value == value
    assert repr(value) in str(caught.value)
    assert snapshot(store.directory) == before


@pytest.mark.parametrize(("value", "kind", "stored"), [
    ("push.example.com", x509.DNSName, "push.example.com"),
    ("PUSH.Example.COM", x509.DNSName, "push.example.com"),
    ("*.push.example.com", x509.DNSName, "*.push.example.com"),
    ("localhost", x509.DNSName, "localhost"),
    ("intrapush-01", x509.DNSName, "intrapush-01"),
    ("xn--bcher-kva.example", x509.DNSName, "xn--bcher-kva.example"),
    ("10.0.0.5", x509.IPAddress, ipaddress.ip_address("10.0.0.5")),
    ("fd00::5", x509.IPAddress, ipaddress.ip_address("fd00::5")),
    ("::1", x509.IPAddress, ipaddress.ip_address("::1")),
])
def test_good_san_values(value: str, kind: type, stored: object) -> None:
    name = parse_san(value)
    assert isinstance(name, kind) and name.value == stored


def test_server_cert_needs_at_least_one_san(store: CertStore) -> None:
    with pytest.raises(BadName, match="at least one"):
        issue_server_cert(store, [])


def test_server_certificate_profile(store: CertStore) -> None:
    cert = issue_server_cert(store, ["push.example.com", "*.push.example.com", "10.0.0.5", "push.example.com"])
    ca = store.load_ca_cert()

    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["push.example.com", "*.push.example.com"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "push.example.com"
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH])
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=397, hours=1)
    cert.verify_directly_issued_by(ca)
    # server.pem carries the chain, so clients that trust only a root can build the path.
    assert x509.load_pem_x509_certificates(store.server_pem.read_bytes()) == [cert, ca]
    assert stat.S_IMODE(store.server_key.stat().st_mode) == 0o600


def test_long_first_san_does_not_become_an_oversized_common_name(store: CertStore) -> None:
    long_name = "a" * 60 + ".example.com"
    cert = issue_server_cert(store, [long_name])
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "intrapush server"


def test_server_cert_needs_a_ca_first(tmp_path: Path) -> None:
    with pytest.raises(NotSetUp, match="no CA yet"):
        issue_server_cert(CertStore(tmp_path / "certs"), ["push.example.com"])


# -- renewal --------------------------------------------------------------------------------------------

def test_fresh_server_certificate_does_not_need_renewal_until_the_last_month(store: CertStore) -> None:
    cert = store.load_server_cert()
    assert not needs_renewal(cert)
    assert needs_renewal(cert, now=cert.not_valid_after_utc - timedelta(days=30))
    assert not needs_renewal(cert, now=cert.not_valid_after_utc - timedelta(days=31))
    assert needs_renewal(cert, within_days=400)
    assert needs_renewal(cert, now=cert.not_valid_after_utc + timedelta(days=1))


def test_renewal_keeps_sans_and_key_so_pins_survive(store: CertStore) -> None:
    old = store.load_server_cert()
    old_key = store.server_key.read_bytes()
    later = datetime.now(UTC) + timedelta(days=370)

    new = renew_server_cert(store, now=later)

    assert new.serial_number != old.serial_number
    assert new.extensions.get_extension_for_class(x509.SubjectAlternativeName) == \
        old.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert spki_pin(new) == spki_pin(old) and store.server_key.read_bytes() == old_key
    assert store.load_server_cert() == new and not needs_renewal(new, now=later)


def test_renewal_with_a_new_key_changes_the_pin(store: CertStore) -> None:
    old = store.load_server_cert()
    new = renew_server_cert(store, rotate_key=True)
    assert spki_pin(new) != spki_pin(old)
    assert stat.S_IMODE(store.server_key.stat().st_mode) == 0o600


def test_renewal_without_a_server_certificate_says_so(tmp_path: Path) -> None:
    store = CertStore(tmp_path / "certs")
    create_ca(store)
    with pytest.raises(NotSetUp, match="server certificate is missing"):
        renew_server_cert(store)


# -- device certificates --------------------------------------------------------------------------------

def test_device_certificate_profile(store: CertStore) -> None:
    device = issue_device_cert(store, "tok_8f2a91")
    cert = device.cert

    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "tok_8f2a91"
    assert device.device_id == "tok_8f2a91"
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH])
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert device.chain == (store.load_ca_cert(),)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=730, hours=1)
    # The device key leaves with the PKCS#12 bundle; the box keeps only the index entry.
    assert sorted(p.name for p in store.directory.iterdir()) == [
        ".lock", "ca.key", "ca.pem", "crl.pem", "index.json", "server.key", "server.pem"]


@pytest.mark.parametrize(("device_id", "says"), [
    ("", "non-empty"),
    (" phone", "white space"),
    ("x" * 65, "at most 64"),
    ("phone\n1", "control characters"),
])
def test_bad_device_identity_is_refused_and_nothing_is_written(device_id: str, says: str,
                                                               store: CertStore) -> None:
    before = snapshot(store.directory)
    with pytest.raises(BadName, match=says):
        issue_device_cert(store, device_id)
    assert snapshot(store.directory) == before


def test_a_certificate_never_outlives_its_ca(tmp_path: Path) -> None:
    store = CertStore(tmp_path / "certs")
    ca = create_ca(store, valid_days=100)
    assert issue_device_cert(store, "phone-1").cert.not_valid_after_utc == ca.not_valid_after_utc


def test_an_expired_ca_issues_nothing(store: CertStore) -> None:
    after_expiry = store.load_ca_cert().not_valid_after_utc + timedelta(days=1)
    with pytest.raises(NotValidNow, match="the CA expired"):
        issue_device_cert(store, "phone-1", now=after_expiry)


@pytest.mark.parametrize("valid_days", [0, -5, 1.5])
def test_validity_must_be_whole_positive_days(valid_days: float, store: CertStore) -> None:
    with pytest.raises(BadInput, match="valid_days"):
        issue_device_cert(store, "phone-1", valid_days=valid_days)  # type: ignore[arg-type]
