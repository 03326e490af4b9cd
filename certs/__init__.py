"""The box's own certificate authority: a plain library over `cryptography`, without network or daemon state.

How the daemon and the CLI use it is in docs/certificates.md ("For the daemon").
"""

from certs.authority import check_can_sign, create_ca, export_ca_pem, import_ca, retire_previous_ca
from certs.errors import (AlreadyExists, BadInput, BadName, CertError, DamagedStore, KeyMismatch, MissingKey,
                          NotACA, NotSetUp, NotValidNow, PinMismatch, UnknownCert, WrongPassword)
from certs.issue import (IssuedDevice, issue_device_cert, issue_server_cert, needs_renewal,
                         renew_server_cert)
from certs.keys import DEFAULT_KEY_TYPE, KEY_TYPES
from certs.names import parse_san
from certs.pkcs12 import export_pkcs12, load_pkcs12, write_pkcs12
from certs.report import (CertStatus, CertSummary, describe, describe_ca, fingerprint, list_certs, spki_pin,
                          spki_pin_hex)
from certs.revocation import refresh_crl, revoke, revoke_device, revoke_serial
from certs.store import CertStore, IssuedCert
from certs.tls import client_ssl_context, server_ssl_context

__all__ = [
    "DEFAULT_KEY_TYPE", "KEY_TYPES",
    "AlreadyExists", "BadInput", "BadName", "CertError", "DamagedStore", "KeyMismatch", "MissingKey", "NotACA",
    "NotSetUp", "NotValidNow", "PinMismatch", "UnknownCert", "WrongPassword",
    "CertStatus", "CertStore", "CertSummary", "IssuedCert", "IssuedDevice",
    "check_can_sign", "client_ssl_context", "create_ca", "describe", "describe_ca", "export_ca_pem",
    "export_pkcs12", "fingerprint", "import_ca", "issue_device_cert", "issue_server_cert", "list_certs",
    "load_pkcs12", "needs_renewal", "parse_san", "refresh_crl", "renew_server_cert", "retire_previous_ca",
    "revoke", "revoke_device", "revoke_serial", "server_ssl_context", "spki_pin", "spki_pin_hex",
    "write_pkcs12",
]
