"""Fixtures for the CA tests: a store with a CA and a server certificate, and TLS servers on loopback."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from certs import CertStore, create_ca, export_ca_pem, issue_server_cert
from tests.certs.peers import TlsServer

SERVER_NAMES = ["localhost", "127.0.0.1", "::1"]


@pytest.fixture
def store(tmp_path: Path) -> CertStore:
    """A box's store after first start: a CA and a server certificate for loopback."""
    s = CertStore(tmp_path / "certs")
    create_ca(s)
    issue_server_cert(s, SERVER_NAMES)
    return s


@pytest.fixture
def ca_file(store: CertStore, tmp_path: Path) -> Path:
    """The CA as an operator exports it for MDM."""
    path = tmp_path / "exported-ca.pem"
    path.write_bytes(export_ca_pem(store))
    return path


@pytest.fixture
def serve() -> Iterator[Callable[[ssl.SSLContext], TlsServer]]:
    servers: list[TlsServer] = []

    def start(ctx: ssl.SSLContext) -> TlsServer:
        servers.append(TlsServer(ctx))
        return servers[-1]

    yield start
    for server in servers:
        server.close()
