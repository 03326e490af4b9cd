"""Creating, importing, protecting and rotating the box's CA."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from certs import (AlreadyExists, BadInput, CertStore, KeyMismatch, MissingKey, NotACA, NotValidNow,
                   WrongPassword, create_ca, export_ca_pem, import_ca, issue_device_cert, issue_server_cert,
                   retire_previous_ca)
from tests.certs.pki import corporate_pki, make_cert, snapshot


def test_new_ca_is_an_ecdsa_p256_ca_for_ten_years(tmp_path: Path) -> None:
    store = CertStore(tmp_path / "certs")
    cert = create_ca(store)

    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=3650, hours=1)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert {p.name for p in store.directory.iterdir()} >= {"ca.pem", "ca.key", "crl.pem"}


def test_two_boxes_get_ca_names_an_operator_can_tell_apart(tmp_path: Path) -> None:
    first = create_ca(CertStore(tmp_path / "a")).subject.rfc4514_string()
    second = create_ca(CertStore(tmp_path / "b")).subject.rfc4514_string()
    assert first.startswith("CN=intrapush CA ") and first != second


def test_rsa_3072_ca_for_old_clients(tmp_path: Path) -> None:
    cert = create_ca(CertStore(tmp_path / "certs"), key_type="rsa-3072", common_name="Legacy CA")
    assert isinstance(cert.public_key(), rsa.RSAPublicKey) and cert.public_key().key_size == 3072


def test_unknown_key_type_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="ec-p256, rsa-2048, rsa-3072"):
        create_ca(CertStore(tmp_path / "certs"), key_type="dsa-1024")
    assert not (tmp_path / "certs").exists()


def test_existing_ca_is_never_overwritten_unless_asked(store: CertStore) -> None:
    before = snapshot(store.directory)
    with pytest.raises(AlreadyExists, match="overwrite=True"):
        create_ca(store)
    root, intermediate = corporate_pki()
    with pytest.raises(AlreadyExists):
        import_ca(store, intermediate.cert_pem(root), intermediate.key_pem())
    assert snapshot(store.directory) == before


# -- the CA key at rest ---------------------------------------------------------------------------------

def test_ca_key_encrypted_at_rest_needs_its_passphrase(tmp_path: Path) -> None:
    create_ca(CertStore(tmp_path / "certs", passphrase="correct horse"))
    assert b"BEGIN ENCRYPTED PRIVATE KEY" in (tmp_path / "certs" / "ca.key").read_bytes()

    with pytest.raises(WrongPassword, match="encrypted: give its passphrase"):
        CertStore(tmp_path / "certs").load_ca()
    with pytest.raises(WrongPassword, match="passphrase does not open"):
        CertStore(tmp_path / "certs", passphrase="battery staple").load_ca()
    assert CertStore(tmp_path / "certs", passphrase=b"correct horse").load_ca().cert is not None


def test_issuing_with_a_wrong_passphrase_writes_nothing(tmp_path: Path) -> None:
    create_ca(CertStore(tmp_path / "certs", passphrase="correct horse"))
    before = snapshot(tmp_path / "certs")
    wrong = CertStore(tmp_path / "certs", passphrase="nope")
    with pytest.raises(WrongPassword):
        issue_server_cert(wrong, ["push.example.com"])
    with pytest.raises(WrongPassword):
        issue_device_cert(wrong, "phone-1")
    assert snapshot(tmp_path / "certs") == before


def test_empty_passphrase_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="empty passphrase"):
        CertStore(tmp_path, passphrase="")


# -- importing an operator's CA -------------------------------------------------------------------------

def test_corporate_intermediate_is_imported_with_its_chain_and_stored_encrypted(tmp_path: Path) -> None:
    root, intermediate = corporate_pki()
    store = CertStore(tmp_path / "certs", passphrase="box secret")

    cert = import_ca(store, intermediate.cert_pem(root), intermediate.key_pem(b"corp secret"),
                     key_password="corp secret")

    assert cert == intermediate.cert
    authority = store.load_ca()
    assert authority.chain == (root.cert,)
    assert b"ENCRYPTED" in store.ca_key.read_bytes()
    assert export_ca_pem(store) == intermediate.cert_pem(root)
    device = issue_device_cert(store, "phone-1")
    assert device.cert.issuer == intermediate.cert.subject and device.chain == (intermediate.cert, root.cert)


def _bad_import(case: str) -> tuple[bytes, bytes | None, str | None]:
    root, intermediate = corporate_pki()
    if case == "cert-without-key":
        return intermediate.cert_pem(), None, None
    if case == "key-of-another-cert":
        return intermediate.cert_pem(), root.key_pem(), None
    if case == "not-a-ca":
        leaf = make_cert("push.example.com", signed_by=root, ca=False)
        return leaf.cert_pem(), leaf.key_pem(), None
    if case == "no-keyCertSign":
        odd = make_cert("Signs CRLs only", signed_by=root, key_cert_sign=False)
        return odd.cert_pem(), odd.key_pem(), None
    if case == "no-cRLSign":
        odd = make_cert("Signs certs only", signed_by=root, crl_sign=False)
        return odd.cert_pem(), odd.key_pem(), None
    if case == "no-keyUsage":
        odd = make_cert("No key usage", signed_by=root, key_usage=False)
        return odd.cert_pem(), odd.key_pem(), None
    if case == "expired":
        old = make_cert("Old Intermediate", signed_by=root, starts_in_days=-400, days=365)
        return old.cert_pem(), old.key_pem(), None
    if case == "not-yet-valid":
        early = make_cert("Future Intermediate", signed_by=root, starts_in_days=10)
        return early.cert_pem(), early.key_pem(), None
    if case == "encrypted-key-without-password":
        return intermediate.cert_pem(), intermediate.key_pem(b"corp secret"), None
    if case == "encrypted-key-with-wrong-password":
        return intermediate.cert_pem(), intermediate.key_pem(b"corp secret"), "guess"
    if case == "garbage-cert":
        return b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n", intermediate.key_pem(), None
    if case == "garbage-key":
        return intermediate.cert_pem(), b"not a key", None
    if case == "chain-from-another-root":
        return intermediate.cert_pem(make_cert("Some Other Root")), intermediate.key_pem(), None
    raise AssertionError(case)


BAD_IMPORTS = [
    ("cert-without-key", MissingKey, "without its private key"),
    ("key-of-another-cert", KeyMismatch, "does not belong"),
    ("not-a-ca", NotACA, "CA:TRUE"),
    ("no-keyCertSign", NotACA, "keyCertSign"),
    ("no-cRLSign", NotACA, "cRLSign"),
    ("no-keyUsage", NotACA, "no keyUsage"),
    ("expired", NotValidNow, "expired on"),
    ("not-yet-valid", NotValidNow, "not valid until"),
    ("encrypted-key-without-password", WrongPassword, "give its passphrase"),
    ("encrypted-key-with-wrong-password", WrongPassword, "does not open"),
    ("garbage-cert", BadInput, "not a PEM certificate"),
    ("garbage-key", BadInput, "not a PEM private key"),
    ("chain-from-another-root", BadInput, "chain does not lead up"),
]


@pytest.mark.parametrize(("case", "error", "says"), BAD_IMPORTS, ids=[c[0] for c in BAD_IMPORTS])
def test_bad_import_into_an_empty_store_is_refused_and_writes_nothing(case: str, error: type[Exception],
                                                                     says: str, tmp_path: Path) -> None:
    cert_pem, key_pem, password = _bad_import(case)
    store = CertStore(tmp_path / "certs")
    with pytest.raises(error, match=says):
        import_ca(store, cert_pem, key_pem, key_password=password)
    assert not store.directory.exists()


@pytest.mark.parametrize(("case", "error", "says"), BAD_IMPORTS, ids=[c[0] for c in BAD_IMPORTS])
def test_bad_import_over_an_existing_ca_leaves_it_untouched(case: str, error: type[Exception], says: str,
                                                            store: CertStore) -> None:
    cert_pem, key_pem, password = _bad_import(case)
    before = snapshot(store.directory)
    with pytest.raises(error, match=says):
        import_ca(store, cert_pem, key_pem, key_password=password, overwrite=True)
    assert snapshot(store.directory) == before


def test_importing_a_root_ca_works_too(tmp_path: Path) -> None:
    root = make_cert("Plant Root CA")
    store = CertStore(tmp_path / "certs")
    import_ca(store, root.cert_pem(), root.key_pem())
    assert issue_device_cert(store, "phone-1").cert.issuer == root.cert.subject


# -- rotation -------------------------------------------------------------------------------------------

def test_rotation_keeps_the_previous_ca_trusted_until_retired(store: CertStore) -> None:
    old = store.load_ca_cert()
    new = create_ca(store, overwrite=True)

    assert store.load_ca_cert() == new
    assert store.load_previous_ca_cert() == old
    exported = x509.load_pem_x509_certificates(export_ca_pem(store))
    assert exported == [new, old]
    assert x509.load_pem_x509_certificates(export_ca_pem(store, include_previous=False)) == [new]

    with pytest.raises(AlreadyExists, match="retire it first"):
        create_ca(store, overwrite=True)

    assert retire_previous_ca(store) == old
    assert store.load_previous_ca_cert() is None and not (store.directory / "previous").exists()
    assert retire_previous_ca(store) is None


def test_rotation_with_a_wrong_passphrase_changes_nothing(tmp_path: Path) -> None:
    create_ca(CertStore(tmp_path / "certs", passphrase="right"))
    before = snapshot(tmp_path / "certs")
    with pytest.raises(WrongPassword):
        create_ca(CertStore(tmp_path / "certs", passphrase="wrong"), overwrite=True)
    assert snapshot(tmp_path / "certs") == before

