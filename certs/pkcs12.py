"""PKCS#12 bundles (cert + key + CA chain, password-protected) that phones and MDM servers import.

AES-256 by default; legacy=True writes the 3DES/SHA-1 form that older Apple and Android releases need.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from certs.errors import AlreadyExists, BadInput, WrongPassword
from certs.issue import IssuedDevice
from certs.keys import key_type_of
from certs.store import write_atomically, write_new_file

log = logging.getLogger(__name__)

# Slows guessing the password of a lost file; still well under a second to open on a phone.
KDF_ROUNDS = 50_000
# The count OpenSSL has always written, which older importers are known to handle.
LEGACY_KDF_ROUNDS = 2048


def export_pkcs12(device: IssuedDevice, password: str | bytes, *, legacy: bool = False) -> bytes:
    """The device's certificate, key and CA chain as a PKCS#12 file encrypted with `password`."""
    secret = _password(password)
    if not secret:
        raise BadInput("a PKCS#12 bundle needs a password; phones refuse to import one without")
    builder = serialization.PrivateFormat.PKCS12.encryption_builder()
    if legacy:
        builder = (builder.kdf_rounds(LEGACY_KDF_ROUNDS)
                   .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC).hmac_hash(hashes.SHA1()))
    else:
        builder = (builder.kdf_rounds(KDF_ROUNDS)
                   .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC).hmac_hash(hashes.SHA256()))
    bundle = pkcs12.serialize_key_and_certificates(device.device_id.encode(), device.key, device.cert,
                                                   list(device.chain), builder.build(secret))
    log.info("event=exported kind=pkcs12 name=%r serial=%x legacy=%s", device.device_id,
             device.cert.serial_number, legacy)
    return bundle


def load_pkcs12(data: bytes, password: str | bytes) -> IssuedDevice:
    """Open a bundle made by export_pkcs12 (or any PKCS#12 with a key and a certificate)."""
    try:
        key, cert, chain = pkcs12.load_key_and_certificates(data, _password(password) or None)
    except ValueError:
        # OpenSSL cannot tell a wrong password from a damaged file: the MAC check fails either way.
        raise WrongPassword("the password does not open this PKCS#12 bundle (or it is not one)") from None
    if key is None or cert is None:
        raise BadInput("the PKCS#12 bundle holds no private key or no certificate")
    key_type_of(key)
    return IssuedDevice(cert, key, tuple(chain))  # type: ignore[arg-type]


def write_pkcs12(path: str | os.PathLike[str], bundle: bytes, *, overwrite: bool = False) -> None:
    """Save a bundle with mode 0600 (it holds a private key, if encrypted); never clobbers unless asked."""
    target = Path(path)
    try:
        if overwrite:
            write_atomically(target, bundle, private=True)
        else:
            write_new_file(target, bundle, private=True)
    except FileExistsError:
        raise AlreadyExists(f"{target} exists; choose another name or pass overwrite=True") from None


def _password(password: str | bytes) -> bytes:
    return password.encode() if isinstance(password, str) else password
