"""PKCS#12 bundles for phones and MDM: contents, encryption, passwords and the file on disk."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from certs import (AlreadyExists, BadInput, CertStore, WrongPassword, export_pkcs12, issue_device_cert,
                   load_pkcs12, write_pkcs12)
from certs.keys import keys_match
from tests.certs.peers import OPENSSL


def openssl_info(bundle: Path, password: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([OPENSSL, "pkcs12", "-in", str(bundle), "-passin", f"pass:{password}", "-info",
                           "-noout"], capture_output=True, text=True, timeout=15)


def test_bundle_holds_the_device_cert_its_key_and_the_ca(store: CertStore) -> None:
    device = issue_device_cert(store, "phone-1")

    opened = load_pkcs12(export_pkcs12(device, "s3cret-pw"), "s3cret-pw")

    assert opened.cert == device.cert and opened.device_id == "phone-1"
    assert keys_match(opened.key, device.cert)
    assert opened.chain == (store.load_ca_cert(),)


def test_bundle_uses_aes_256_and_openssl_can_open_it(store: CertStore, tmp_path: Path) -> None:
    path = tmp_path / "phone-1.p12"
    write_pkcs12(path, export_pkcs12(issue_device_cert(store, "phone-1"), "s3cret-pw"))

    info = openssl_info(path, "s3cret-pw")

    assert info.returncode == 0, info.stderr
    assert "AES-256-CBC" in info.stderr and "MAC: sha256" in info.stderr
    assert "3DES" not in info.stderr and "RC2" not in info.stderr


def test_legacy_bundle_for_old_phones_uses_3des_and_sha1(store: CertStore, tmp_path: Path) -> None:
    device = issue_device_cert(store, "old-iphone")
    path = tmp_path / "old-iphone.p12"
    write_pkcs12(path, export_pkcs12(device, "s3cret-pw", legacy=True))

    info = openssl_info(path, "s3cret-pw")

    assert info.returncode == 0, info.stderr
    assert "pbeWithSHA1And3-KeyTripleDES-CBC" in info.stderr and "MAC: sha1" in info.stderr
    assert load_pkcs12(path.read_bytes(), "s3cret-pw").cert == device.cert


@pytest.mark.parametrize("password", ["wrong", ""])
def test_wrong_password_is_a_wrong_password_error(password: str, store: CertStore) -> None:
    bundle = export_pkcs12(issue_device_cert(store, "phone-1"), "s3cret-pw")
    with pytest.raises(WrongPassword, match="does not open this PKCS#12"):
        load_pkcs12(bundle, password)


def test_not_a_bundle_at_all(tmp_path: Path) -> None:
    with pytest.raises(WrongPassword):
        load_pkcs12(b"\x30\x03\x02\x01\x03", "pw")


def test_bundle_needs_a_password(store: CertStore) -> None:
    with pytest.raises(BadInput, match="needs a password"):
        export_pkcs12(issue_device_cert(store, "phone-1"), "")


def test_bundle_file_is_private_and_not_clobbered(store: CertStore, tmp_path: Path) -> None:
    path = tmp_path / "out" / "phone-1.p12"
    first = export_pkcs12(issue_device_cert(store, "phone-1"), "pw-one")
    write_pkcs12(path, first)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    second = export_pkcs12(issue_device_cert(store, "phone-1"), "pw-two")
    with pytest.raises(AlreadyExists, match="overwrite=True"):
        write_pkcs12(path, second)
    assert path.read_bytes() == first

    write_pkcs12(path, second, overwrite=True)
    assert path.read_bytes() == second and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["phone-1.p12"]
