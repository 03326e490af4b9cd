"""Checks for the names that go into certificates: server SANs and device identities.

A SAN is a DNS name (RFC 1123, a wildcard only as the whole leftmost label) or an IPv4/IPv6 address.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Iterable

from cryptography import x509

from certs.errors import BadName

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
MAX_CN_CHARS = 64  # the X.520 upper bound for a common name


def parse_san(value: str) -> x509.GeneralName:
    """One SAN string as a certificate name; BadName says why when it is neither a host nor an address."""
    if not isinstance(value, str):
        raise BadName(value, "a SAN must be a string")
    if value == "":
        raise BadName(value, "empty; give a host name or an IP address")
    if value.startswith("[") or value.endswith("]"):
        raise BadName(value, "write an IPv6 address without brackets")
    if value.count(":") == 1:
        raise BadName(value, "looks like host:port; give the host name or address without a port")
    if ":" in value or "%" in value:
        return x509.IPAddress(_parse_ip(value, "IPv6"))
    try:
        return x509.IPAddress(_parse_ip(value, "IPv4"))
    except BadName:
        if re.fullmatch(r"[0-9.]+", value):
            raise
    return x509.DNSName(_check_dns_name(value))


def parse_sans(values: Iterable[str] | str) -> list[x509.GeneralName]:
    """Every SAN checked, duplicates dropped, order kept; at least one is required."""
    if isinstance(values, str):
        values = [values]
    names: list[x509.GeneralName] = []
    for value in values:
        name = parse_san(value)
        if name not in names:
            names.append(name)
    if not names:
        raise BadName("", "a server certificate needs at least one host name or IP address")
    return names


def san_text(name: x509.GeneralName) -> str:
    """A SAN as the operator writes it: "push.example.com" or "10.0.0.5"."""
    return str(name.value)


def check_device_id(value: str) -> str:
    """A device identity usable as a certificate's common name (1-64 printable characters)."""
    if not isinstance(value, str) or not value:
        raise BadName(value, "a device identity must be a non-empty string")
    if len(value) > MAX_CN_CHARS:
        raise BadName(value, f"a device identity is at most {MAX_CN_CHARS} characters")
    if value != value.strip():
        raise BadName(value, "a device identity may not start or end with white space")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs") for ch in value):
        raise BadName(value, "a device identity may not contain control characters")
    return value


def _parse_ip(value: str, family: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise BadName(value, f"not a valid {family} address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        raise BadName(value, "a zone index (%...) cannot go into a certificate")
    if address.is_unspecified:
        raise BadName(value, "the unspecified address is not one a client can connect to")
    return address


def _check_dns_name(value: str) -> str:
    if not value.isascii():
        raise BadName(value, "non-ASCII host name; give its punycode form (xn--...)")
    name = value.lower()
    if len(name) > 253:
        raise BadName(value, "a host name is at most 253 characters")
    labels = name.split(".")
    if labels[0] == "*":
        labels = labels[1:]
        if len(labels) < 2:
            raise BadName(value, "a wildcard needs at least two labels after it, as in *.example.com")
    for label in labels:
        if label == "":
            raise BadName(value, "empty label (a leading, trailing or doubled dot)")
        if "*" in label:
            raise BadName(value, "a wildcard may only be the whole leftmost label, as in *.example.com")
        if not _LABEL.match(label):
            raise BadName(value, f"label {label!r} must be 1-63 letters, digits or hyphens, "
                                 "not starting or ending with a hyphen")
    if labels[-1].isdigit():
        raise BadName(value, "the last label may not be all digits")
    return name
