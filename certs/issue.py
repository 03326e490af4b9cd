"""Issuing leaf certificates: the server's (its SANs, serverAuth) and devices' (CN = identity, clientAuth).

The server key and certificate are replaced atomically, key first, so a running listener can reload.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.authority import BACKDATE
from certs.errors import BadInput, DamagedStore, NotValidNow
from certs.keys import DEFAULT_KEY_TYPE, KEY_TYPES, PrivateKey, generate_key, key_to_pem, key_type_of, keys_match
from certs.names import MAX_CN_CHARS, check_device_id, parse_sans, san_text
from certs.store import Authority, CertStore, IssuedCert, certs_to_pem, current_time, serial_hex, write_atomically

log = logging.getLogger(__name__)

# 397 days: the longest life Apple platforms and browsers accept for a server certificate (398 at most),
# and well under the 825 days iOS enforces even for certificates from a private CA.
DEFAULT_SERVER_VALID_DAYS = 397
# Two years: re-enrolling a phone through MDM is a chore, and a lost phone is revoked, not waited out.
DEFAULT_DEVICE_VALID_DAYS = 730
# A month of margin: renewal runs daily, so a failing renewal has weeks to be noticed.
RENEW_WITHIN_DAYS = 30
SERVER_CN_FALLBACK = "intrapush server"


@dataclass(frozen=True)
class IssuedDevice:
    """A device certificate with its new private key and the CA chain above it, ready for PKCS#12."""

    cert: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...]

    @property
    def device_id(self) -> str:
        return str(self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def issue_server_cert(store: CertStore, sans: Iterable[str] | str, *, key_type: str = DEFAULT_KEY_TYPE,
                      valid_days: int = DEFAULT_SERVER_VALID_DAYS, now: datetime | None = None) -> x509.Certificate:
    """A new server key and certificate for these host names and IP addresses, replacing server.pem/.key."""
    names = parse_sans(sans)
    _check_days(valid_days)
    return _issue_server(store, names, generate_key(key_type), new_key=True, valid_days=valid_days, now=now)


def renew_server_cert(store: CertStore, *, rotate_key: bool = False, valid_days: int = DEFAULT_SERVER_VALID_DAYS,
                      now: datetime | None = None) -> x509.Certificate:
    """Reissue the server certificate with the same SANs. The key is kept unless rotate_key=True,
    because devices may pin the server's SPKI and a new key would break them."""
    _check_days(valid_days)
    current = store.load_server_cert()
    try:
        sans = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise DamagedStore(f"{store.server_pem} has no subjectAltName to renew") from None
    names: list[x509.GeneralName] = [n for n in sans if isinstance(n, (x509.DNSName, x509.IPAddress))]
    if rotate_key:
        old_type = key_type_of(current.public_key())
        key = generate_key(old_type if old_type in KEY_TYPES else DEFAULT_KEY_TYPE)
    else:
        key = store.load_server_key()
        if not keys_match(key, current):
            raise DamagedStore(f"{store.server_key} does not belong to {store.server_pem}; "
                               "renew with rotate_key=True")
    return _issue_server(store, names, key, new_key=rotate_key, valid_days=valid_days, now=now)


def needs_renewal(cert: x509.Certificate, within_days: int = RENEW_WITHIN_DAYS, *,
                  now: datetime | None = None) -> bool:
    """Whether `cert` expires within `within_days` (or already has)."""
    return cert.not_valid_after_utc - current_time(now) <= timedelta(days=within_days)


def issue_device_cert(store: CertStore, device_id: str, *, key_type: str = DEFAULT_KEY_TYPE,
                      valid_days: int = DEFAULT_DEVICE_VALID_DAYS, now: datetime | None = None) -> IssuedDevice:
    """A client certificate with CN = `device_id` and a fresh key; recorded in the index, key not stored."""
    check_device_id(device_id)
    _check_days(valid_days)
    key = generate_key(key_type)
    now = current_time(now)
    with store.locked():
        authority = store.load_ca()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
        cert = _sign_leaf(authority, subject, key, ExtendedKeyUsageOID.CLIENT_AUTH, [], valid_days, now)
        index = store.read_index()
        index.certs.append(_record(cert, "device", device_id, authority, []))
        store.write_index(index)
    log.info("event=issued kind=device name=%r serial=%x not_after=%s", device_id, cert.serial_number,
             cert.not_valid_after_utc.isoformat())
    return IssuedDevice(cert, key, (authority.cert, *authority.chain))


def _issue_server(store: CertStore, names: list[x509.GeneralName], key: PrivateKey, *, new_key: bool,
                  valid_days: int, now: datetime | None) -> x509.Certificate:
    now = current_time(now)
    first = san_text(names[0])
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                            first if len(first) <= MAX_CN_CHARS else SERVER_CN_FALLBACK)])
    with store.locked():
        authority = store.load_ca()
        cert = _sign_leaf(authority, subject, key, ExtendedKeyUsageOID.SERVER_AUTH, names, valid_days, now)
        index = store.read_index()
        # Key first, then certificate: a listener reloading in between sees a mismatched pair, which
        # server_ssl_context() retries, and never a certificate whose key is not on disk yet.
        if new_key:
            write_atomically(store.server_key, key_to_pem(key), private=True)
        write_atomically(store.server_pem, certs_to_pem((cert, authority.cert, *authority.chain)), private=False)
        index.certs.append(_record(cert, "server", first, authority, [san_text(n) for n in names]))
        store.write_index(index)
    log.info("event=issued kind=server name=%r serial=%x sans=%s new_key=%s not_after=%s", first,
             cert.serial_number, ",".join(san_text(n) for n in names), new_key, cert.not_valid_after_utc.isoformat())
    return cert


def _sign_leaf(authority: Authority, subject: x509.Name, key: PrivateKey, purpose: x509.ObjectIdentifier,
               sans: list[x509.GeneralName], valid_days: int, now: datetime) -> x509.Certificate:
    ca_end = authority.cert.not_valid_after_utc
    if ca_end <= now:
        raise NotValidNow(f"the CA expired on {ca_end:%Y-%m-%d}; create or import a new one")
    not_after = now + timedelta(days=valid_days)
    if not_after > ca_end:
        log.warning("event=validity_capped subject=%r not_after=%s note=%r", subject.rfc4514_string(),
                    ca_end.isoformat(), "a certificate cannot outlive its CA")
        not_after = ca_end
    is_rsa = isinstance(key, rsa.RSAPrivateKey)
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(authority.cert.subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - BACKDATE)
               .not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               # RSA keys also allow key encipherment, for old clients that still use RSA key exchange.
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                            key_encipherment=is_rsa, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=False, crl_sign=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(authority.key_identifier(), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(authority.key, hashes.SHA256())


def _record(cert: x509.Certificate, kind: str, name: str, authority: Authority, sans: list[str]) -> IssuedCert:
    return IssuedCert(serial=serial_hex(cert.serial_number), kind=kind, name=name, issuer=authority.id,
                      not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc, sans=sans)


def _check_days(valid_days: int) -> None:
    if not isinstance(valid_days, int) or valid_days < 1:
        raise BadInput(f"valid_days must be a whole number of days, at least 1, not {valid_days!r}")
