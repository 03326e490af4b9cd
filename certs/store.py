"""The certificate store: one directory with the CA, the server certificate, the CRL and an index.

Every write is atomic (temporary file, fsync, os.replace); private keys are created with mode 0600.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certs.errors import BadInput, DamagedStore, NotSetUp
from certs.keys import PrivateKey, is_encrypted_pem, key_from_pem

log = logging.getLogger(__name__)

INDEX_VERSION = 1


def current_time(now: datetime | None = None) -> datetime:
    """`now` (naive means UTC) or the wall clock, in UTC, to the second as certificates store it."""
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return now.astimezone(UTC).replace(microsecond=0)


def cert_id(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, lower-case hex: how the index names the CA that signed a cert."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def serial_hex(serial: int) -> str:
    """A serial number as the index and `cert list` show it: lower-case hex, no colons."""
    return format(serial, "x")


def certs_to_pem(certs: list[x509.Certificate] | tuple[x509.Certificate, ...]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@dataclass(frozen=True)
class Authority:
    """A CA that can sign: its certificate, its key, and the certificates above it (often none)."""

    cert: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def id(self) -> str:
        return cert_id(self.cert)

    def key_identifier(self) -> x509.AuthorityKeyIdentifier:
        """The AuthorityKeyIdentifier for what this CA signs: its own SKI when it has one."""
        try:
            ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        except x509.ExtensionNotFound:
            return x509.AuthorityKeyIdentifier.from_issuer_public_key(self.cert.public_key())  # type: ignore[arg-type]
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


@dataclass(frozen=True)
class CaFiles:
    """Where one CA lives: its certificate (plus chain), its key and its CRL."""

    cert: Path
    key: Path
    crl: Path

    def exist(self) -> bool:
        return self.cert.exists() or self.key.exists()


@dataclass
class IssuedCert:
    """One line of the index: a certificate this box issued."""

    serial: str                 # lower-case hex, as `cert list` shows it
    kind: str                   # "server" or "device"
    name: str                   # the device identity, or the server's first SAN
    issuer: str                 # cert_id() of the CA that signed it
    not_before: datetime
    not_after: datetime
    sans: list[str] = field(default_factory=list)
    revoked_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {"serial": self.serial, "kind": self.kind, "name": self.name, "issuer": self.issuer,
                "not_before": self.not_before.isoformat(), "not_after": self.not_after.isoformat(),
                "sans": self.sans, "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> IssuedCert:
        return cls(serial=doc["serial"], kind=doc["kind"], name=doc["name"], issuer=doc["issuer"],
                   not_before=datetime.fromisoformat(doc["not_before"]),
                   not_after=datetime.fromisoformat(doc["not_after"]), sans=list(doc.get("sans", [])),
                   revoked_at=datetime.fromisoformat(doc["revoked_at"]) if doc.get("revoked_at") else None)


@dataclass
class Index:
    """Every certificate issued, and the last CRL number used per CA."""

    certs: list[IssuedCert] = field(default_factory=list)
    crl_numbers: dict[str, int] = field(default_factory=dict)

    def by_serial(self, serial: int) -> IssuedCert | None:
        text = serial_hex(serial)
        return next((c for c in self.certs if c.serial == text), None)

    def by_device(self, device_id: str) -> list[IssuedCert]:
        return [c for c in self.certs if c.kind == "device" and c.name == device_id]

    def next_crl_number(self, issuer: str) -> int:
        self.crl_numbers[issuer] = self.crl_numbers.get(issuer, 0) + 1
        return self.crl_numbers[issuer]


def write_atomically(path: Path, data: bytes, *, private: bool) -> None:
    """Replace `path` with `data` so readers see the old file or the new one, never a part of either."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # The mode is set at creation: a key is never readable by others, not even for a moment.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600 if private else 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_new_file(path: Path, data: bytes, *, private: bool) -> None:
    """Write `data` to `path`, which must not exist yet (FileExistsError otherwise); atomic like the above."""
    if path.exists():
        raise FileExistsError(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    write_atomically(tmp, data, private=private)
    try:
        os.link(tmp, path)  # fails if `path` appeared meanwhile: never clobber
    finally:
        os.unlink(tmp)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_certs(path: Path, what: str) -> list[x509.Certificate]:
    """Every certificate in a PEM file of the store; NotSetUp if missing, DamagedStore if unreadable."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotSetUp(f"{what} is missing ({path})") from None
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise DamagedStore(f"{path} holds no readable PEM certificate ({e})") from None


class CertStore:
    """The files of the box's CA in one directory (for the daemon, DATA_DIR/certs).

    `passphrase` encrypts the CA key at rest; give it to every store that opens an encrypted one.
    """

    def __init__(self, directory: str | os.PathLike[str], passphrase: str | bytes | None = None) -> None:
        self.directory = Path(directory)
        self.passphrase = passphrase.encode() if isinstance(passphrase, str) else passphrase
        if self.passphrase == b"":
            raise BadInput("an empty passphrase protects nothing; give none or a real one")
        d = self.directory
        self.ca = CaFiles(d / "ca.pem", d / "ca.key", d / "crl.pem")
        # During a CA rotation the replaced CA stays trusted from here until retire_previous_ca().
        self.previous_ca = CaFiles(d / "previous" / "ca.pem", d / "previous" / "ca.key", d / "previous" / "crl.pem")
        self.server_pem = d / "server.pem"   # the server certificate followed by its CA chain
        self.server_key = d / "server.key"
        self.index_json = d / "index.json"

    def __repr__(self) -> str:
        return f"CertStore({str(self.directory)!r}, encrypted={self.passphrase is not None})"

    # -- convenience paths ---------------------------------------------------------------------------
    @property
    def ca_pem(self) -> Path:
        return self.ca.cert

    @property
    def ca_key(self) -> Path:
        return self.ca.key

    @property
    def crl_pem(self) -> Path:
        return self.ca.crl

    # -- questions -------------------------------------------------------------------------------------
    def has_ca(self) -> bool:
        return self.ca.exist()

    def has_previous_ca(self) -> bool:
        return self.previous_ca.exist()

    def has_server_cert(self) -> bool:
        return self.server_pem.exists() and self.server_key.exists()

    # -- reading ---------------------------------------------------------------------------------------
    def load_ca_cert(self) -> x509.Certificate:
        """The CA certificate alone, without touching its key."""
        return read_certs(self.ca.cert, "the CA certificate")[0]

    def load_previous_ca_cert(self) -> x509.Certificate | None:
        return read_certs(self.previous_ca.cert, "the previous CA")[0] if self.previous_ca.cert.exists() else None

    def load_ca(self) -> Authority:
        """The current CA with its key (decrypted with the store's passphrase)."""
        return self._load_authority(self.ca, "the CA")

    def load_previous_ca(self) -> Authority | None:
        return self._load_authority(self.previous_ca, "the previous CA") if self.has_previous_ca() else None

    def _load_authority(self, files: CaFiles, what: str) -> Authority:
        if not files.cert.exists() and not files.key.exists():
            raise NotSetUp(f"the box has no CA yet ({files.cert} is missing): create or import one")
        certs = read_certs(files.cert, f"{what} certificate")
        try:
            data = files.key.read_bytes()
        except FileNotFoundError:
            raise DamagedStore(f"{what} certificate is there but its key {files.key} is missing") from None
        if self.passphrase and not is_encrypted_pem(data):
            log.warning("event=plain_ca_key path=%s note=%r", files.key,
                        "a passphrase is set but the key is not encrypted")
        try:
            key = key_from_pem(data, self.passphrase, what=str(files.key))
        except BadInput as e:
            if type(e) is BadInput:
                raise DamagedStore(str(e)) from None
            raise
        return Authority(certs[0], key, tuple(certs[1:]))

    def load_server_cert(self) -> x509.Certificate:
        return read_certs(self.server_pem, "the server certificate")[0]

    def load_server_key(self) -> PrivateKey:
        try:
            data = self.server_key.read_bytes()
        except FileNotFoundError:
            raise NotSetUp(f"the server key is missing ({self.server_key})") from None
        try:
            return key_from_pem(data, None, what=str(self.server_key))
        except BadInput as e:
            raise DamagedStore(str(e)) from None

    def read_index(self) -> Index:
        try:
            doc = json.loads(self.index_json.read_text())
        except FileNotFoundError:
            return Index()
        except ValueError as e:
            raise DamagedStore(f"{self.index_json} is not valid JSON ({e})") from None
        if doc.get("version", 0) > INDEX_VERSION:
            raise DamagedStore(f"{self.index_json} is version {doc['version']}, newer than this software reads")
        try:
            return Index([IssuedCert.from_json(c) for c in doc.get("certs", [])],
                         {k: int(v) for k, v in doc.get("crl_numbers", {}).items()})
        except (KeyError, TypeError, ValueError) as e:
            raise DamagedStore(f"{self.index_json} has a malformed entry ({e!r})") from None

    # -- writing (callers hold self.locked()) ------------------------------------------------------------
    def write_index(self, index: Index) -> None:
        doc = {"version": INDEX_VERSION, "crl_numbers": index.crl_numbers,
               "certs": [c.to_json() for c in index.certs]}
        write_atomically(self.index_json, json.dumps(doc, indent=1).encode() + b"\n", private=False)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's lock, so the daemon and a CLI command never interleave their changes."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
