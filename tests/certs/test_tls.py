"""Real handshakes on loopback against server_ssl_context / client_ssl_context, with Python and openssl clients."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import socket
import ssl
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certs import (BadInput, CertStore, NotSetUp, PinMismatch, client_ssl_context, create_ca, export_ca_pem,
                   import_ca, issue_device_cert, issue_server_cert, renew_server_cert, retire_previous_ca, revoke,
                   server_ssl_context, spki_pin, spki_pin_hex)
from tests.certs.conftest import SERVER_NAMES
from tests.certs.peers import (TlsServer, openssl_client, openssl_spki_pin, python_client,
                               python_client_peer_cert)
from tests.certs.pki import client_cert_from, corporate_pki, write_identity

Serve = Callable[[ssl.SSLContext], TlsServer]


def connect(client: str, server: TlsServer, ca_file: Path, identity: tuple[Path, Path] | None) -> str:
    if client == "python":
        return python_client(server.port, client_ssl_context(ca_file), identity)
    return openssl_client(server.port, ca_file, identity)


# -- who gets in ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("client", ["python", "openssl"])
def test_device_with_a_valid_certificate_is_accepted(client: str, store: CertStore, ca_file: Path,
                                                     serve: Serve, tmp_path: Path) -> None:
    server = serve(server_ssl_context(store, "required"))
    identity = write_identity(tmp_path, issue_device_cert(store, "phone-1"))

    assert "welcome phone-1" in connect(client, server, ca_file, identity)
    assert server.outcome().accepted


def _no_cert(store: CertStore, tmp_path: Path) -> tuple[Path, Path] | None:
    return None


def _other_ca(store: CertStore, tmp_path: Path) -> tuple[Path, Path] | None:
    other = CertStore(tmp_path / "other-box")
    create_ca(other)
    return write_identity(tmp_path, issue_device_cert(other, "intruder"))


def _expired(store: CertStore, tmp_path: Path) -> tuple[Path, Path] | None:
    long_ago = datetime.now(UTC) - timedelta(days=400)
    return write_identity(tmp_path, issue_device_cert(store, "old-phone", valid_days=30, now=long_ago))


def _revoked(store: CertStore, tmp_path: Path) -> tuple[Path, Path] | None:
    identity = write_identity(tmp_path, issue_device_cert(store, "lost-phone"))
    revoke(store, "lost-phone")
    return identity


@pytest.mark.parametrize("client", ["python", "openssl"])
@pytest.mark.parametrize(("make_identity", "server_says"), [
    (_no_cert, "peer did not return a certificate"),
    (_other_ca, "unable to get local issuer certificate"),
    (_expired, "certificate has expired"),
    (_revoked, "certificate revoked"),
], ids=["no-cert", "other-ca", "expired", "revoked"])
def test_device_without_a_good_certificate_is_refused(make_identity: Callable[..., tuple[Path, Path] | None],
                                                      server_says: str, client: str, store: CertStore,
                                                      ca_file: Path, serve: Serve, tmp_path: Path) -> None:
    identity = make_identity(store, tmp_path)
    server = serve(server_ssl_context(store, "required"))  # built after any revocation: it reads the new CRL

    answer = connect(client, server, ca_file, identity)

    outcome = server.outcome()
    assert not outcome.accepted
    assert server_says in outcome.detail
    assert "welcome" not in answer


def test_revocation_takes_effect_in_the_next_context(store: CertStore, ca_file: Path, serve: Serve,
                                                     tmp_path: Path) -> None:
    identity = write_identity(tmp_path, issue_device_cert(store, "phone-2"))
    before = serve(server_ssl_context(store, "required"))
    assert "welcome phone-2" in python_client(before.port, client_ssl_context(ca_file), identity)

    revoke(store, "phone-2")
    after = serve(server_ssl_context(store, "required"))

    assert "welcome" not in python_client(after.port, client_ssl_context(ca_file), identity)
    assert before.outcome().accepted and not after.outcome().accepted


def test_optional_client_cert_admits_anonymous_clients_but_still_refuses_revoked_ones(
        store: CertStore, ca_file: Path, serve: Serve, tmp_path: Path) -> None:
    good = write_identity(tmp_path, issue_device_cert(store, "phone-3"))
    bad = _revoked(store, tmp_path)
    server = serve(server_ssl_context(store, "optional"))

    assert "welcome None" in python_client(server.port, client_ssl_context(ca_file))
    assert "welcome phone-3" in python_client(server.port, client_ssl_context(ca_file), good)
    assert "welcome" not in python_client(server.port, client_ssl_context(ca_file), bad)


def test_no_client_cert_mode_needs_only_the_server_certificate(store: CertStore, ca_file: Path,
                                                               serve: Serve) -> None:
    server = serve(server_ssl_context(store))
    assert "welcome None" in openssl_client(server.port, ca_file)


def test_a_server_cert_cannot_pass_as_a_device(store: CertStore, ca_file: Path, serve: Serve) -> None:
    server = serve(server_ssl_context(store, "required"))
    # The server's own certificate is from the right CA, but its EKU is serverAuth only.
    assert "welcome" not in python_client(server.port, client_ssl_context(ca_file),
                                          (store.server_pem, store.server_key))
    assert "unsuitable certificate purpose" in server.outcome().detail


# -- what clients see of the server -----------------------------------------------------------------------

def test_client_trusting_the_exported_ca_sees_the_pinned_key(store: CertStore, ca_file: Path, serve: Serve,
                                                            tmp_path: Path) -> None:
    server = serve(server_ssl_context(store, "required"))
    identity = write_identity(tmp_path, issue_device_cert(store, "phone-4"))

    der = python_client_peer_cert(server.port, client_ssl_context(ca_file), identity)

    spki = x509.load_der_x509_certificate(der).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert base64.b64encode(hashlib.sha256(spki).digest()).decode() == spki_pin(store.load_server_cert())
    assert hashlib.sha256(spki).hexdigest() == spki_pin_hex(store.load_server_cert())


def test_spki_pin_matches_the_openssl_recipe_in_okhttp_docs(store: CertStore) -> None:
    assert openssl_spki_pin(store.server_pem) == spki_pin(store.load_server_cert())
    assert openssl_spki_pin(store.ca_pem) == spki_pin(store.load_ca_cert())


@pytest.mark.parametrize("which", ["server", "ca", "server-prefixed", "server-hex", "with-a-backup"])
def test_pinned_client_connects_when_a_pin_matches(which: str, store: CertStore, ca_file: Path, serve: Serve,
                                                   tmp_path: Path) -> None:
    server_cert, ca_cert = store.load_server_cert(), store.load_ca_cert()
    pin = {"server": spki_pin(server_cert), "ca": spki_pin(ca_cert),
           "server-prefixed": "sha256/" + spki_pin(server_cert), "server-hex": spki_pin_hex(server_cert),
           "with-a-backup": ["sha256/" + base64.b64encode(b"\1" * 32).decode(), spki_pin(ca_cert)]}[which]
    server = serve(server_ssl_context(store))

    assert "welcome" in python_client(server.port, client_ssl_context(ca_file, pin=pin))


def test_pinned_client_refuses_a_server_with_another_key(store: CertStore, ca_file: Path, serve: Serve) -> None:
    server = serve(server_ssl_context(store))
    ctx = client_ssl_context(ca_file, pin=base64.b64encode(b"\0" * 32).decode())

    with pytest.raises(PinMismatch, match="matches none of the pinned keys"), \
            socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def test_pinned_client_works_under_asyncio(store: CertStore, ca_file: Path, serve: Serve) -> None:
    server = serve(server_ssl_context(store))
    good = client_ssl_context(ca_file, pin=spki_pin(store.load_server_cert()))
    bad = client_ssl_context(ca_file, pin=spki_pin(store.load_ca_cert()).swapcase())

    async def greet(ctx: ssl.SSLContext) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=ctx)
        try:
            return await reader.readline()
        finally:
            writer.close()

    assert asyncio.run(greet(good)) == b"welcome None\n"
    with pytest.raises(ssl.SSLCertVerificationError, match="matches none"):
        asyncio.run(greet(bad))


@pytest.mark.parametrize("pin", ["", "sha256/abc", "zz" * 32, "AAAA"])
def test_a_malformed_pin_is_refused_up_front(pin: str, ca_file: Path) -> None:
    with pytest.raises(BadInput):
        client_ssl_context(ca_file, pin=pin)


def test_server_certificate_passes_strict_x509_checks(store: CertStore, ca_file: Path, serve: Serve) -> None:
    # Python 3.13 turns VERIFY_X509_STRICT on in create_default_context(): our certificates must pass it.
    server = serve(server_ssl_context(store))
    ctx = client_ssl_context(ca_file)
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    assert "welcome" in python_client(server.port, ctx)


@pytest.mark.parametrize("name", [*SERVER_NAMES, "other.example.com"])
def test_server_certificate_covers_its_sans_and_nothing_else(name: str, store: CertStore, ca_file: Path,
                                                             serve: Serve) -> None:
    server = serve(server_ssl_context(store))
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        if name in SERVER_NAMES:
            with client_ssl_context(ca_file).wrap_socket(raw, server_hostname=name) as tls:
                assert tls.recv(200) == b"welcome None\n"
        else:
            with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
                client_ssl_context(ca_file).wrap_socket(raw, server_hostname=name)


# -- renewal, rotation, imported CAs ----------------------------------------------------------------------

def test_renewed_server_certificate_is_served_by_the_next_context_with_the_same_pin(
        store: CertStore, ca_file: Path, serve: Serve, tmp_path: Path) -> None:
    identity = write_identity(tmp_path, issue_device_cert(store, "phone-5"))
    old = store.load_server_cert()
    running = serve(server_ssl_context(store, "required"))

    renewed = renew_server_cert(store)
    reloaded = serve(server_ssl_context(store, "required"))

    seen_old = x509.load_der_x509_certificate(python_client_peer_cert(running.port, client_ssl_context(ca_file),
                                                                      identity))
    seen_new = x509.load_der_x509_certificate(python_client_peer_cert(reloaded.port, client_ssl_context(ca_file),
                                                                      identity))
    assert seen_old.serial_number == old.serial_number
    assert seen_new.serial_number == renewed.serial_number != old.serial_number
    assert spki_pin(seen_new) == spki_pin(seen_old)


def test_ca_rotation_keeps_old_devices_working_until_the_previous_ca_is_retired(
        store: CertStore, serve: Serve, tmp_path: Path) -> None:
    old_phone = write_identity(tmp_path, issue_device_cert(store, "old-ca-phone"))
    create_ca(store, overwrite=True)
    new_phone = write_identity(tmp_path, issue_device_cert(store, "new-ca-phone"))
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(export_ca_pem(store))  # MDM pushes both CAs during the overlap

    during = serve(server_ssl_context(store, "required"))
    assert "welcome old-ca-phone" in python_client(during.port, client_ssl_context(bundle), old_phone)
    assert "welcome new-ca-phone" in python_client(during.port, client_ssl_context(bundle), new_phone)

    renew_server_cert(store)  # now signed by the new CA; devices trust it through the bundle
    retire_previous_ca(store)
    after = serve(server_ssl_context(store, "required"))
    assert "welcome new-ca-phone" in python_client(after.port, client_ssl_context(bundle), new_phone)
    assert "welcome" not in python_client(after.port, client_ssl_context(bundle), old_phone)


def test_imported_corporate_intermediate_serves_devices_that_trust_only_the_root(
        tmp_path: Path, serve: Serve) -> None:
    root, intermediate = corporate_pki()
    store = CertStore(tmp_path / "certs")
    import_ca(store, intermediate.cert_pem(root), intermediate.key_pem())
    issue_server_cert(store, SERVER_NAMES)
    root_file = tmp_path / "corp-root.pem"
    root_file.write_bytes(root.cert_pem())
    server = serve(server_ssl_context(store, "required"))
    phone = write_identity(tmp_path, issue_device_cert(store, "corp-phone"))
    # Another certificate under the same corporate root is not one of the box's devices.
    elsewhere = write_identity(tmp_path, client_cert_from(root, "laptop"))

    assert "welcome corp-phone" in openssl_client(server.port, root_file, phone)
    assert "welcome corp-phone" in python_client(server.port, ssl.create_default_context(cafile=root_file), phone)
    assert "welcome" not in python_client(server.port, ssl.create_default_context(cafile=root_file), elsewhere)


def test_rsa_ca_and_server_certificate_for_old_clients(tmp_path: Path, serve: Serve) -> None:
    store = CertStore(tmp_path / "certs")
    create_ca(store, key_type="rsa-2048")
    issue_server_cert(store, SERVER_NAMES, key_type="rsa-2048")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(export_ca_pem(store))
    server = serve(server_ssl_context(store, "required"))
    phone = write_identity(tmp_path, issue_device_cert(store, "old-android"))

    assert "welcome old-android" in openssl_client(server.port, ca_file, phone)


# -- refusing to build a context --------------------------------------------------------------------------

def test_server_context_needs_a_server_certificate(tmp_path: Path) -> None:
    store = CertStore(tmp_path / "certs")
    create_ca(store)
    with pytest.raises(NotSetUp, match="issue_server_cert"):
        server_ssl_context(store)


def test_server_context_refuses_an_unknown_client_cert_mode(store: CertStore) -> None:
    with pytest.raises(BadInput, match="none, optional, required"):
        server_ssl_context(store, "sometimes")  # type: ignore[arg-type]
