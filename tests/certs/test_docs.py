"""docs/certificates.md keeps up with the code: every error, every default, every CLI command."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import certs.errors
from certs.authority import DEFAULT_CA_VALID_DAYS
from certs.issue import DEFAULT_DEVICE_VALID_DAYS, DEFAULT_SERVER_VALID_DAYS, RENEW_WITHIN_DAYS
from certs.revocation import CRL_VALID_DAYS

DOC = (Path(__file__).parents[2] / "docs" / "certificates.md").read_text()
ERRORS = [name for name, obj in inspect.getmembers(certs.errors, inspect.isclass)
          if issubclass(obj, certs.errors.CertError)]


@pytest.mark.parametrize("name", ERRORS)
def test_every_error_is_documented(name: str) -> None:
    assert f"`{name}`" in DOC


def test_defaults_in_the_doc_match_the_code() -> None:
    assert DEFAULT_CA_VALID_DAYS == 3650 and "| 10 years |" in DOC
    assert f"| {DEFAULT_SERVER_VALID_DAYS} days |" in DOC
    assert f"| {DEFAULT_DEVICE_VALID_DAYS} days |" in DOC
    assert f"| {RENEW_WITHIN_DAYS} days before expiry |" in DOC
    assert f"| {CRL_VALID_DAYS} days, re-signed daily |" in DOC


@pytest.mark.parametrize("command", ["ca show", "ca export", "cert server --san", "cert device DEVICE --out",
                                     "cert revoke SERIAL|DEVICE", "cert list"])
def test_every_cli_command_is_documented(command: str) -> None:
    assert f"intrapush {command}" in DOC
