"""What `ca show` and `cert list` print: summaries, fingerprints, SPKI pins and expiry states."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from certs.keys import key_type_of
from certs.names import san_text
from certs.store import CertStore, cert_id, current_time, serial_hex

# A month: the same margin as server renewal, so "expiring" means "act this month".
EXPIRING_WITHIN_DAYS = 30


@dataclass(frozen=True)
class CertSummary:
    """One certificate as an operator reads it."""

    subject: str
    issuer: str
    serial: str                 # lower-case hex, as `cert list` and `cert revoke` use it
    fingerprint_sha256: str     # colon hex of the whole certificate, as browsers and openssl show it
    spki_pin: str               # base64 SHA-256 of the public key ("sha256/<this>" in OkHttp)
    spki_pin_hex: str
    key_type: str
    is_ca: bool
    sans: tuple[str, ...]
    not_before: datetime
    not_after: datetime
    days_left: int              # negative once expired

    def as_dict(self) -> dict[str, Any]:
        doc = dict(self.__dict__)
        doc.update(sans=list(self.sans), not_before=self.not_before.isoformat(), not_after=self.not_after.isoformat())
        return doc


@dataclass(frozen=True)
class CertStatus:
    """One issued certificate with its state: valid, expiring, expired, revoked or retired (its CA is gone)."""

    serial: str
    kind: str
    name: str
    state: str
    days_left: int
    not_before: datetime
    not_after: datetime
    revoked_at: datetime | None
    sans: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"serial": self.serial, "kind": self.kind, "name": self.name, "state": self.state,
                "days_left": self.days_left, "not_before": self.not_before.isoformat(),
                "not_after": self.not_after.isoformat(),
                "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None, "sans": list(self.sans)}


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate as colon-separated upper-case hex."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def spki_digest(cert: x509.Certificate) -> bytes:
    """SHA-256 over the DER SubjectPublicKeyInfo: the value iOS and Android pin."""
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


def spki_pin(cert: x509.Certificate) -> str:
    """The SPKI pin in base64, as OkHttp's CertificatePinner ("sha256/" + this) and pin-set use it."""
    return base64.b64encode(spki_digest(cert)).decode()


def spki_pin_hex(cert: x509.Certificate) -> str:
    """The same SPKI pin as lower-case hex, for code that compares hex digests."""
    return spki_digest(cert).hex()


def describe(cert: x509.Certificate, *, now: datetime | None = None) -> CertSummary:
    """Subject, serial, fingerprint, pins, SANs and validity of any certificate."""
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    try:
        sans = tuple(san_text(n) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        sans = ()
    try:
        key_type = key_type_of(cert.public_key())
    except Exception:  # noqa: BLE001 - an unusual key is still worth describing
        key_type = type(cert.public_key()).__name__
    return CertSummary(subject=cert.subject.rfc4514_string(), issuer=cert.issuer.rfc4514_string(),
                       serial=serial_hex(cert.serial_number), fingerprint_sha256=fingerprint(cert),
                       spki_pin=spki_pin(cert), spki_pin_hex=spki_pin_hex(cert), key_type=key_type, is_ca=is_ca,
                       sans=sans, not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc,
                       days_left=_days_left(cert.not_valid_after_utc, current_time(now)))


def describe_ca(store: CertStore, *, now: datetime | None = None) -> CertSummary:
    """`ca show`: the current CA (see store.load_previous_ca_cert() during a rotation)."""
    return describe(store.load_ca_cert(), now=now)


def list_certs(store: CertStore, *, now: datetime | None = None,
               expiring_within_days: int = EXPIRING_WITHIN_DAYS) -> list[CertStatus]:
    """`cert list`: every certificate the box issued, oldest first, with its state."""
    now = current_time(now)
    live_cas = {cert_id(store.load_ca_cert())} if store.ca.cert.exists() else set()
    previous = store.load_previous_ca_cert()
    if previous is not None:
        live_cas.add(cert_id(previous))
    rows = []
    for c in store.read_index().certs:
        if c.revoked_at is not None:
            state = "revoked"
        elif c.not_after <= now:
            state = "expired"
        elif c.issuer not in live_cas:
            state = "retired"
        elif c.not_after - now <= timedelta(days=expiring_within_days):
            state = "expiring"
        else:
            state = "valid"
        rows.append(CertStatus(serial=c.serial, kind=c.kind, name=c.name, state=state,
                               days_left=_days_left(c.not_after, now), not_before=c.not_before,
                               not_after=c.not_after, revoked_at=c.revoked_at, sans=tuple(c.sans)))
    return rows


def _days_left(not_after: datetime, now: datetime) -> int:
    return (not_after - now) // timedelta(days=1)
