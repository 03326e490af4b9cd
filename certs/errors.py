"""Errors of the box's certificate authority, grouped by what the caller does about them.

    CertError               anything certs raises on purpose
    ├── BadInput            refuse and show the message to the operator; nothing was written
    │   ├── BadName         a SAN that is no host name or IP address, or an unusable device identity
    │   ├── MissingKey      a CA certificate offered without its private key
    │   ├── KeyMismatch     a private key that does not belong to the certificate beside it
    │   ├── NotACA          a certificate that may not sign certificates and revocation lists
    │   ├── NotValidNow     a certificate that has expired or is not valid yet
    │   └── UnknownCert     no issued certificate has that serial or device identity
    ├── WrongPassword       ask again: a passphrase or PKCS#12 password is missing or wrong
    ├── AlreadyExists       ask the operator to confirm, then call again with overwrite=True
    ├── NotSetUp            run the missing step first (create or import the CA, issue the server cert)
    ├── DamagedStore        alert: a file in the store cannot be read; restore it from a backup
    └── PinMismatch         drop the connection: the server's key is not a pinned one (also an ssl error)
"""

from __future__ import annotations

import ssl


class CertError(Exception):
    """Base of everything certs raises on purpose."""


class BadInput(CertError):
    """The caller gave something unusable; the message says what, and nothing was written."""


class BadName(BadInput):
    """A subject alternative name or device identity that cannot go into a certificate."""

    def __init__(self, value: object, reason: str) -> None:
        self.value = value
        self.reason = reason
        super().__init__(f"{value!r}: {reason}")


class MissingKey(BadInput):
    """A CA certificate came without the private key the box needs to sign with it."""


class KeyMismatch(BadInput):
    """A private key does not belong to the certificate it came with."""


class NotACA(BadInput):
    """A certificate lacks basicConstraints CA:TRUE, keyCertSign or cRLSign."""


class NotValidNow(BadInput):
    """A certificate is expired or not yet valid."""


class UnknownCert(BadInput):
    """No certificate in the index has that serial or device identity."""


class WrongPassword(CertError):
    """A passphrase (CA key at rest, imported key) or PKCS#12 password is missing or wrong."""


class AlreadyExists(CertError):
    """CA material is already in place and the call did not ask to replace it."""


class NotSetUp(CertError):
    """The store lacks what the call needs: no CA yet, or no server certificate yet."""


class DamagedStore(CertError):
    """A file in the store exists but cannot be parsed."""


class PinMismatch(CertError, ssl.SSLCertVerificationError):
    """The server presented a key that matches none of the pins given to client_ssl_context."""
