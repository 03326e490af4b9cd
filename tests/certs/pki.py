"""Certificates built on the fly for tests: an operator's corporate PKI, odd CAs, and files on disk."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.issue import IssuedDevice
from certs.keys import PrivateKey


@dataclass(frozen=True)
class Made:
    """A certificate and its key, as an operator would hand them over."""

    cert: x509.Certificate
    key: PrivateKey

    def cert_pem(self, *chain: Made) -> bytes:
        return b"".join(m.cert.public_bytes(serialization.Encoding.PEM) for m in (self, *chain))

    def key_pem(self, password: bytes | None = None) -> bytes:
        encryption = (serialization.BestAvailableEncryption(password) if password
                      else serialization.NoEncryption())
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def make_cert(name: str, *, signed_by: Made | None = None, ca: bool = True, key_cert_sign: bool = True,
              crl_sign: bool = True, key_usage: bool = True, starts_in_days: int = -1, days: int = 365,
              purpose: x509.ObjectIdentifier | None = None) -> Made:
    """A certificate named `name`: a CA by default, self-signed unless `signed_by` is given."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer = signed_by.cert.subject if signed_by else subject
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now + timedelta(days=starts_in_days))
               .not_valid_after(now + timedelta(days=starts_in_days + days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if key_usage:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=not ca, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=ca and key_cert_sign, crl_sign=ca and crl_sign,
            encipher_only=False, decipher_only=False), critical=True)
    if signed_by:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signed_by.key.public_key()), critical=False)
    if purpose:
        builder = builder.add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
    return Made(builder.sign(signed_by.key if signed_by else key, hashes.SHA256()), key)


def corporate_pki() -> tuple[Made, Made]:
    """A corporate root and an intermediate under it, the kind an operator imports as the box's CA."""
    root = make_cert("Example Corp Root")
    return root, make_cert("Example Corp Push Intermediate", signed_by=root)


def client_cert_from(issuer: Made, name: str) -> Made:
    return make_cert(name, signed_by=issuer, ca=False, purpose=ExtendedKeyUsageOID.CLIENT_AUTH)


def write_identity(directory: Path, device: IssuedDevice | Made) -> tuple[Path, Path]:
    """The certificate and key as PEM files, for clients that load them from disk."""
    cn = device.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    stem = str(cn).replace("/", "_")
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(device.cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(device.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return cert_path, key_path


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes, to prove a refused call wrote nothing."""
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
