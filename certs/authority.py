"""The box's CA: create one, import an operator's (e.g. a corporate intermediate), rotate, export.

Existing CA material is never replaced unless the caller passes overwrite=True; the replaced CA then
stays trusted as the "previous" CA until retire_previous_ca(), so devices can move over gradually.
"""

from __future__ import annotations

import logging
import secrets
import shutil
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from certs.errors import AlreadyExists, BadInput, KeyMismatch, MissingKey, NotACA, NotValidNow
from certs.keys import DEFAULT_KEY_TYPE, generate_key, key_from_pem, key_to_pem, key_type_of, keys_match
from certs.names import MAX_CN_CHARS
from certs.revocation import build_crl
from certs.store import (Authority, CertStore, cert_id, certs_to_pem, current_time, read_certs,
                         write_atomically)

log = logging.getLogger(__name__)

# Ten years: every phone holds this trust anchor through MDM, and replacing it is a fleet-wide change.
DEFAULT_CA_VALID_DAYS = 3650
BACKDATE = timedelta(hours=1)  # a device whose clock runs a little behind still accepts a fresh cert


def create_ca(store: CertStore, *, common_name: str | None = None, key_type: str = DEFAULT_KEY_TYPE,
              valid_days: int = DEFAULT_CA_VALID_DAYS, overwrite: bool = False,
              now: datetime | None = None) -> x509.Certificate:
    """Make a new self-signed CA in `store` and an empty CRL for it; returns the CA certificate."""
    now = current_time(now)
    if valid_days < 1:
        raise BadInput(f"valid_days must be at least 1, not {valid_days}")
    # A random suffix tells two boxes' CAs apart in a phone's list of trusted certificates.
    name = common_name or f"intrapush CA {secrets.token_hex(3)}"
    if not 0 < len(name) <= MAX_CN_CHARS:
        raise BadInput(f"the CA common name must be 1-{MAX_CN_CHARS} characters")
    _refuse_existing(store, overwrite)
    key = generate_key(key_type)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "intrapush"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + timedelta(days=valid_days))
            # path length 0: this CA signs servers and devices, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         key_cert_sign=True, crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256()))
    _install(store, Authority(cert, key), overwrite, now)
    log.info("event=ca_created subject=%r key=%s serial=%x not_after=%s", cert.subject.rfc4514_string(),
             key_type, cert.serial_number, cert.not_valid_after_utc.isoformat())
    return cert


def import_ca(store: CertStore, cert_pem: bytes | str, key_pem: bytes | str | None, *,
              key_password: str | bytes | None = None, overwrite: bool = False,
              now: datetime | None = None) -> x509.Certificate:
    """Adopt an operator's CA: `cert_pem` is the CA certificate, optionally followed by its chain up to the
    root; `key_pem` its key (encrypted with `key_password` or not). Stored under the store's passphrase."""
    now = current_time(now)
    cert_pem = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    key_pem = key_pem.encode() if isinstance(key_pem, str) else key_pem
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as e:
        _refused("not_pem", str(e))
        raise BadInput(f"the CA certificate is not a PEM certificate ({e})") from None
    ca_cert, chain = certs[0], tuple(certs[1:])
    subject = ca_cert.subject.rfc4514_string()
    try:
        if not key_pem or not key_pem.strip():
            raise MissingKey(f"the CA certificate {subject} came without its private key; the box signs "
                             "with it, so give both")
        password = key_password.encode() if isinstance(key_password, str) else key_password
        key = key_from_pem(key_pem, password or None, what="the CA key")
        if not keys_match(key, ca_cert):
            raise KeyMismatch(f"the key given does not belong to the CA certificate {subject}")
        check_can_sign(ca_cert, now)
        key_type_of(ca_cert.public_key())
        _check_chain(ca_cert, chain)
        _refuse_existing(store, overwrite)
    except Exception as e:
        _refused(type(e).__name__, str(e))
        raise
    _install(store, Authority(ca_cert, key, chain), overwrite, now)
    log.info("event=ca_imported subject=%r key=%s serial=%x not_after=%s chain=%d", subject, key_type_of(key),
             ca_cert.serial_number, ca_cert.not_valid_after_utc.isoformat(), len(chain))
    return ca_cert


def check_can_sign(cert: x509.Certificate, now: datetime | None = None) -> None:
    """Raise NotACA or NotValidNow unless `cert` may sign certificates and CRLs at `now`."""
    subject = cert.subject.rfc4514_string()
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise NotACA(f"{subject} is not a CA certificate (basicConstraints CA:TRUE is missing)")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise NotACA(f"{subject} has no keyUsage extension; a CA needs keyCertSign and cRLSign") from None
    if not usage.key_cert_sign:
        raise NotACA(f"{subject} may not sign certificates (keyUsage lacks keyCertSign)")
    if not usage.crl_sign:
        # Handshakes check the box's CRL, and clients refuse a CRL signed by a key without cRLSign.
        raise NotACA(f"{subject} may not sign revocation lists (keyUsage lacks cRLSign)")
    now = current_time(now)
    if cert.not_valid_after_utc <= now:
        raise NotValidNow(f"{subject} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    if cert.not_valid_before_utc > now:
        raise NotValidNow(f"{subject} is not valid until {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")


def retire_previous_ca(store: CertStore) -> x509.Certificate | None:
    """End a CA rotation: forget the previous CA (certificate, key, CRL); its certificates stop working.
    Returns the retired CA certificate, or None when there was none."""
    with store.locked():
        retired = store.load_previous_ca_cert()
        if not store.has_previous_ca():
            return None
        shutil.rmtree(store.previous_ca.cert.parent)
    if retired is not None:
        log.info("event=ca_retired subject=%r serial=%x", retired.subject.rfc4514_string(), retired.serial_number)
    return retired


def export_ca_pem(store: CertStore, *, include_previous: bool = True) -> bytes:
    """The PEM that devices and MDM should trust: the CA (with its chain) and, during a rotation, the
    previous CA too, so one profile covers the whole overlap."""
    certs = read_certs(store.ca.cert, "the CA certificate")
    if include_previous and store.previous_ca.cert.exists():
        certs += read_certs(store.previous_ca.cert, "the previous CA certificate")
    unique: dict[str, x509.Certificate] = {}
    for cert in certs:
        unique.setdefault(cert_id(cert), cert)
    return certs_to_pem(list(unique.values()))


def _refuse_existing(store: CertStore, overwrite: bool) -> None:
    if not store.has_ca():
        return
    if not overwrite:
        raise AlreadyExists(f"{store.ca.cert} already holds a CA; pass overwrite=True to replace it "
                            "(the current one stays trusted as the previous CA until retired)")
    if store.has_previous_ca():
        raise AlreadyExists("a previous CA is still trusted from an earlier rotation; retire it first")


def _install(store: CertStore, authority: Authority, overwrite: bool, now: datetime) -> None:
    with store.locked():
        _refuse_existing(store, overwrite)
        if store.has_ca():
            _archive_current(store)
        index = store.read_index()
        crl = build_crl(authority, index, now)
        write_atomically(store.ca.key, key_to_pem(authority.key, store.passphrase), private=True)
        write_atomically(store.ca.cert, certs_to_pem((authority.cert, *authority.chain)), private=False)
        write_atomically(store.ca.crl, crl.public_bytes(serialization.Encoding.PEM), private=False)
        store.write_index(index)


def _archive_current(store: CertStore) -> None:
    """Copy the current CA to previous/ before it is replaced (copies, so a crash loses nothing)."""
    old = store.load_ca()  # proves the passphrase opens it before anything moves
    for source, target, private in ((store.ca.key, store.previous_ca.key, True),
                                    (store.ca.cert, store.previous_ca.cert, False),
                                    (store.ca.crl, store.previous_ca.crl, False)):
        if source.exists():
            write_atomically(target, source.read_bytes(), private=private)
    log.info("event=ca_rotating previous=%r", old.cert.subject.rfc4514_string())


def _check_chain(cert: x509.Certificate, chain: tuple[x509.Certificate, ...]) -> None:
    below = cert
    for above in chain:
        try:
            below.verify_directly_issued_by(above)
        except Exception:  # noqa: BLE001 - InvalidSignature, ValueError or TypeError: all mean "not its issuer"
            raise BadInput(f"the chain does not lead up from {below.subject.rfc4514_string()}: "
                           f"{above.subject.rfc4514_string()} did not sign it") from None
        below = above


def _refused(reason: str, detail: str) -> None:
    log.info("event=ca_import_refused reason=%s detail=%r", reason, detail)
