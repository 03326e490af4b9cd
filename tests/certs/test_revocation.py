"""Revoking by serial or device, and the CRL the box signs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from certs import (BadInput, CertStore, UnknownCert, WrongPassword, create_ca, issue_device_cert, refresh_crl,
                   revoke, revoke_device, revoke_serial)
from tests.certs.pki import snapshot


def crl_of(store: CertStore) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(store.crl_pem.read_bytes())


def revoked_serials(store: CertStore) -> set[int]:
    return {r.serial_number for r in crl_of(store)}


def crl_number(store: CertStore) -> int:
    return crl_of(store).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def test_new_ca_publishes_an_empty_crl_valid_for_a_week(store: CertStore) -> None:
    crl = crl_of(store)
    assert len(crl) == 0
    assert crl.is_signature_valid(store.load_ca_cert().public_key())
    assert crl.next_update_utc - crl.last_update_utc == timedelta(days=7)
    crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)


def test_revoking_by_serial_lists_it_in_a_newly_signed_crl(store: CertStore) -> None:
    device = issue_device_cert(store, "phone-1")
    keep = issue_device_cert(store, "phone-2")
    number = crl_number(store)

    record = revoke_serial(store, format(device.cert.serial_number, "X"))

    assert record.name == "phone-1" and record.revoked_at is not None
    assert revoked_serials(store) == {device.cert.serial_number}
    assert keep.cert.serial_number not in revoked_serials(store)
    assert crl_number(store) == number + 1
    assert crl_of(store).is_signature_valid(store.load_ca_cert().public_key())


def test_revoking_a_device_revokes_all_its_certificates(store: CertStore) -> None:
    first = issue_device_cert(store, "phone-1")
    second = issue_device_cert(store, "phone-1")
    other = issue_device_cert(store, "phone-2")

    revoked = revoke_device(store, "phone-1")

    assert {r.serial for r in revoked} == {format(first.cert.serial_number, "x"),
                                          format(second.cert.serial_number, "x")}
    assert revoked_serials(store) == {first.cert.serial_number, second.cert.serial_number}
    assert other.cert.serial_number not in revoked_serials(store)
    assert revoke_device(store, "phone-1") == []  # nothing left to revoke


@pytest.mark.parametrize("spelling", ["plain", "colons", "0x"])
def test_cert_revoke_takes_a_serial_in_any_usual_spelling(spelling: str, store: CertStore) -> None:
    device = issue_device_cert(store, "phone-1")
    serial = device.cert.serial_number
    given = {"plain": format(serial, "X"), "colons": serial.to_bytes(20, "big").hex(":"),
             "0x": hex(serial)}[spelling]

    assert [r.name for r in revoke(store, given)] == ["phone-1"]
    assert revoked_serials(store) == {device.cert.serial_number}


def test_cert_revoke_takes_a_device_identity(store: CertStore) -> None:
    device = issue_device_cert(store, "tok_77")
    assert [r.name for r in revoke(store, "tok_77")] == ["tok_77"]
    assert revoked_serials(store) == {device.cert.serial_number}


def test_revoking_twice_keeps_the_first_date(store: CertStore) -> None:
    device = issue_device_cert(store, "phone-1")
    first = revoke_serial(store, device.cert.serial_number, now=datetime(2030, 1, 1, tzinfo=UTC))
    again = revoke_serial(store, device.cert.serial_number)
    assert again.revoked_at == first.revoked_at == datetime(2030, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("target", ["nobody", "abc123", "0"])
def test_unknown_serial_or_device_is_refused_and_nothing_is_written(target: str, store: CertStore) -> None:
    issue_device_cert(store, "phone-1")
    before = snapshot(store.directory)
    with pytest.raises(UnknownCert, match="no issued certificate"):
        revoke(store, target)
    with pytest.raises(UnknownCert):
        revoke_device(store, target)
    assert snapshot(store.directory) == before


def test_malformed_serial_is_refused(store: CertStore) -> None:
    with pytest.raises(BadInput, match="not a serial"):
        revoke_serial(store, "xyz")


def test_revoking_with_a_wrong_passphrase_writes_nothing(tmp_path: Path) -> None:
    right = CertStore(tmp_path / "certs", passphrase="right")
    create_ca(right)
    issue_device_cert(right, "phone-1")
    before = snapshot(right.directory)
    with pytest.raises(WrongPassword):
        revoke(CertStore(tmp_path / "certs", passphrase="wrong"), "phone-1")
    assert snapshot(right.directory) == before


def test_daily_refresh_moves_next_update_and_keeps_the_revocations(store: CertStore) -> None:
    device = issue_device_cert(store, "phone-1")
    revoke(store, "phone-1")
    number = crl_number(store)
    tomorrow = datetime.now(UTC) + timedelta(days=1)

    crl = refresh_crl(store, now=tomorrow)

    assert crl.next_update_utc >= tomorrow + timedelta(days=7) - timedelta(seconds=1)
    assert crl_number(store) == number + 1
    assert revoked_serials(store) == {device.cert.serial_number}


def test_during_rotation_each_ca_revokes_its_own_certificates(store: CertStore) -> None:
    old_phone = issue_device_cert(store, "old-phone")
    create_ca(store, overwrite=True)
    new_phone = issue_device_cert(store, "new-phone")

    revoke(store, "old-phone")
    revoke(store, "new-phone")

    previous_crl = x509.load_pem_x509_crl(store.previous_ca.crl.read_bytes())
    assert {r.serial_number for r in previous_crl} == {old_phone.cert.serial_number}
    assert previous_crl.is_signature_valid(store.load_previous_ca_cert().public_key())
    assert revoked_serials(store) == {new_phone.cert.serial_number}
