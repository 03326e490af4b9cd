"""Revocation: mark issued certificates revoked and keep each CA's CRL (crl.pem) signed and current.

TLS servers built by certs.tls check the CRL at every handshake, so a revoked device is refused as soon
as the listener takes a new context.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from certs.errors import BadInput, UnknownCert
from certs.store import Authority, CaFiles, CertStore, Index, IssuedCert, current_time, write_atomically

log = logging.getLogger(__name__)

# A week: the daemon refreshes daily, so the box can miss six refreshes before handshakes that
# check the CRL start failing with "CRL has expired".
CRL_VALID_DAYS = 7


def parse_serial(text: str | int) -> int:
    """A serial as `cert list` prints it (hex, colons and a 0x prefix allowed) or as an int."""
    if isinstance(text, int):
        return text
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    try:
        if not cleaned:
            raise ValueError
        return int(cleaned, 16)
    except ValueError:
        raise BadInput(f"{text!r} is not a serial number (hex digits, as `cert list` shows)") from None


def revoke_serial(store: CertStore, serial: str | int, *, now: datetime | None = None) -> IssuedCert:
    """Revoke the certificate with this serial (again is harmless) and re-sign the CRL."""
    number = parse_serial(serial)

    def pick(index: Index) -> list[IssuedCert]:
        found = index.by_serial(number)
        if found is None:
            raise UnknownCert(f"no issued certificate has serial {serial}")
        return [found]

    return _revoke(store, pick, now)[0]


def revoke_device(store: CertStore, device_id: str, *, now: datetime | None = None) -> list[IssuedCert]:
    """Revoke every unrevoked certificate of a device and re-sign the CRL; returns those revoked."""

    def pick(index: Index) -> list[IssuedCert]:
        certs = index.by_device(device_id)
        if not certs:
            raise UnknownCert(f"no certificate was issued to device {device_id!r}")
        return [c for c in certs if c.revoked_at is None]

    return _revoke(store, pick, now)


def revoke(store: CertStore, serial_or_device: str, *, now: datetime | None = None) -> list[IssuedCert]:
    """`cert revoke SERIAL|DEVICE`: a serial from `cert list`, or a device identity (all its certs)."""

    def pick(index: Index) -> list[IssuedCert]:
        try:
            by_serial = index.by_serial(parse_serial(serial_or_device))
        except BadInput:
            by_serial = None
        by_device = index.by_device(serial_or_device)
        if by_serial and by_device:
            raise BadInput(f"{serial_or_device!r} is both a serial and a device identity; "
                           "use revoke_serial or revoke_device")
        if by_serial:
            return [by_serial]
        if by_device:
            return [c for c in by_device if c.revoked_at is None]
        raise UnknownCert(f"no issued certificate has serial or device identity {serial_or_device!r}")

    return _revoke(store, pick, now)


def refresh_crl(store: CertStore, *, now: datetime | None = None) -> x509.CertificateRevocationList:
    """Re-sign every CRL with a new next_update; the daemon calls this daily. Returns the current CA's."""
    now = current_time(now)
    with store.locked():
        index = store.read_index()
        signed = [(files, build_crl(authority, index, now)) for authority, files in _authorities(store)]
        store.write_index(index)
        for files, crl in signed:
            write_atomically(files.crl, crl.public_bytes(serialization.Encoding.PEM), private=False)
    log.info("event=crl_refreshed crls=%d next_update=%s", len(signed),
             (now + timedelta(days=CRL_VALID_DAYS)).isoformat())
    return signed[0][1]


def build_crl(authority: Authority, index: Index, now: datetime) -> x509.CertificateRevocationList:
    """A CRL of every revoked certificate `authority` issued; takes the next CRL number from `index`."""
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(authority.cert.subject)
               .last_update(now)
               .next_update(now + timedelta(days=CRL_VALID_DAYS))
               .add_extension(x509.CRLNumber(index.next_crl_number(authority.id)), critical=False)
               .add_extension(authority.key_identifier(), critical=False))
    for cert in index.certs:
        if cert.issuer == authority.id and cert.revoked_at is not None:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(int(cert.serial, 16))
                .revocation_date(cert.revoked_at).build())
    return builder.sign(authority.key, hashes.SHA256())


def _authorities(store: CertStore) -> list[tuple[Authority, CaFiles]]:
    pairs = [(store.load_ca(), store.ca)]
    previous = store.load_previous_ca()
    if previous is not None:
        pairs.append((previous, store.previous_ca))
    return pairs


def _revoke(store: CertStore, pick: Callable[[Index], list[IssuedCert]], now: datetime | None) -> list[IssuedCert]:
    now = current_time(now)
    with store.locked():
        index = store.read_index()
        targets = pick(index)
        fresh = [c for c in targets if c.revoked_at is None]
        if not fresh:
            return targets
        authorities = _authorities(store)  # loads the keys first: a wrong passphrase changes nothing
        for cert in fresh:
            cert.revoked_at = now
        issuers = {c.issuer for c in fresh}
        signed = [(files, build_crl(a, index, now)) for a, files in authorities if a.id in issuers]
        # Index first: if the CRL write fails, the next refresh_crl() still lists these as revoked.
        store.write_index(index)
        for files, crl in signed:
            write_atomically(files.crl, crl.public_bytes(serialization.Encoding.PEM), private=False)
    known = {a.id for a, _ in authorities}
    for cert in fresh:
        log.info("event=revoked serial=%s kind=%s name=%r", cert.serial, cert.kind, cert.name)
        if cert.issuer not in known:
            log.warning("event=revoked_unlisted serial=%s note=%r", cert.serial,
                        "its CA was retired, so no CRL lists it; that CA is no longer trusted anyway")
    return targets
