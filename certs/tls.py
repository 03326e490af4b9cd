"""TLS contexts from the store: a server side that checks client certificates against the CA and its CRL,
and a client side that trusts the exported CA and can also pin the server's SPKI.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import ssl
import time
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509

from certs.errors import BadInput, DamagedStore, NotSetUp, PinMismatch
from certs.report import spki_pin
from certs.store import CertStore, certs_to_pem, current_time

log = logging.getLogger(__name__)

ClientCertMode = Literal["none", "optional", "required"]
_VERIFY_MODES = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
# A day before a CRL runs out, warn: once it has, OpenSSL refuses every client certificate.
CRL_WARN_BEFORE = timedelta(days=1)
_PAIR_TRIES = 5  # renewal replaces key then cert; a reload in between reads a mismatched pair


def server_ssl_context(store: CertStore, client_cert: ClientCertMode = "none") -> ssl.SSLContext:
    """A TLS server context with the store's server certificate. With client_cert "optional" or
    "required", client certificates must come from the box's CA (or the previous one during a
    rotation) and are checked against its CRL. Build a new context after every revoke or refresh_crl."""
    if client_cert not in _VERIFY_MODES:
        raise BadInput(f"client_cert must be one of {', '.join(_VERIFY_MODES)}, not {client_cert!r}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_server_pair(ctx, store)
    if client_cert == "none":
        return ctx
    ctx.verify_mode = _VERIFY_MODES[client_cert]
    # Only the signing CAs, not the chain above an imported intermediate: other certificates from the
    # corporate root must not pass as devices. PARTIAL_CHAIN lets an intermediate be the anchor.
    cas, crls = [store.load_ca_cert()], [store.ca.crl]
    previous = store.load_previous_ca_cert()
    if previous is not None:
        cas.append(previous)
        crls.append(store.previous_ca.crl)
    ctx.load_verify_locations(cadata=certs_to_pem(cas).decode())
    for crl in crls:
        _check_crl_fresh(crl)
        ctx.load_verify_locations(cafile=str(crl))
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF | ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx


def client_ssl_context(ca_pem_path: str | os.PathLike[str], pin: str | Iterable[str] | None = None) -> ssl.SSLContext:
    """A TLS client context trusting the CA PEM (as export_ca_pem writes it), with host name checks.
    `pin`: one or more SPKI pins (base64, "sha256/base64" or hex); the server's own key or the key of
    the CA that signed it must match one, checked at the end of every handshake."""
    pins = _parse_pins(pin)
    ctx: ssl.SSLContext = PinnedContext(ssl.PROTOCOL_TLS_CLIENT) if pins else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        cas = x509.load_pem_x509_certificates(Path(ca_pem_path).read_bytes())
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot read a CA certificate from {ca_pem_path} ({e})") from None
    ctx.load_verify_locations(cafile=os.fspath(ca_pem_path))
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the CA may be an intermediate
    if isinstance(ctx, PinnedContext):
        ctx.pins = pins
        ctx.pin_cas = tuple(cas)
    return ctx


class PinnedContext(ssl.SSLContext):
    """A client context that, after the usual verification, also requires a pinned SPKI."""

    pins: frozenset[str] = frozenset()
    pin_cas: tuple[x509.Certificate, ...] = ()

    def check_pin(self, der: bytes | None) -> None:
        if der is None:
            raise PinMismatch("the server presented no certificate to check against the pin")
        leaf = x509.load_der_x509_certificate(der)
        candidates = [leaf, *(ca for ca in self.pin_cas if _signed(leaf, ca))]
        if not any(spki_pin(c) in self.pins for c in candidates):
            log.warning("event=pin_refused server_pin=sha256/%s", spki_pin(leaf))
            raise PinMismatch(f"the server's key sha256/{spki_pin(leaf)} matches none of the pinned keys")


class _PinnedSocket(ssl.SSLSocket):
    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        self.context.check_pin(self.getpeercert(binary_form=True))  # type: ignore[attr-defined]


class _PinnedObject(ssl.SSLObject):  # what asyncio uses
    def do_handshake(self) -> None:
        super().do_handshake()
        self.context.check_pin(self.getpeercert(binary_form=True))  # type: ignore[attr-defined]


PinnedContext.sslsocket_class = _PinnedSocket
PinnedContext.sslobject_class = _PinnedObject


def _signed(leaf: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        leaf.verify_directly_issued_by(ca)
    except Exception:  # noqa: BLE001 - any failure means "not the issuer"
        return False
    return True


def _parse_pins(pin: str | Iterable[str] | None) -> frozenset[str]:
    if pin is None:
        return frozenset()
    values = [pin] if isinstance(pin, str) else list(pin)
    pins = set()
    for value in values:
        text = value.strip().removeprefix("sha256/")
        try:
            if re.fullmatch(r"[0-9a-fA-F:]+", text):
                digest = bytes.fromhex(text.replace(":", ""))
            else:
                digest = base64.b64decode(text, validate=True)
        except (ValueError, binascii.Error):
            digest = b""
        if len(digest) != 32:
            raise BadInput(f"{value!r} is not a SHA-256 SPKI pin (base64, sha256/base64 or hex)")
        pins.add(base64.b64encode(digest).decode())
    if not pins:
        raise BadInput("give at least one pin, or pin=None")
    return frozenset(pins)


def _load_server_pair(ctx: ssl.SSLContext, store: CertStore) -> None:
    for attempt in range(_PAIR_TRIES):
        try:
            ctx.load_cert_chain(store.server_pem, store.server_key)
            return
        except FileNotFoundError:
            raise NotSetUp(f"no server certificate yet ({store.server_pem}, {store.server_key}): "
                           "issue one with issue_server_cert") from None
        except ssl.SSLError as e:
            error = e
            time.sleep(0.05 * (attempt + 1))
    raise DamagedStore(f"{store.server_pem} and {store.server_key} do not load as a pair ({error})")


def _check_crl_fresh(path: Path) -> None:
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except FileNotFoundError:
        raise NotSetUp(f"{path} is missing: call refresh_crl()") from None
    except ValueError as e:
        raise DamagedStore(f"{path} is not a PEM CRL ({e})") from None
    next_update = crl.next_update_utc
    now = current_time()
    if next_update is None or next_update <= now:
        log.error("event=crl_expired path=%s note=%r", path, "every client certificate will be refused; "
                  "call refresh_crl()")
    elif next_update - now < CRL_WARN_BEFORE:
        log.warning("event=crl_expiring path=%s next_update=%s", path, next_update.isoformat())
