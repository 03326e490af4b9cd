"""Real TLS peers on loopback: a threaded server that greets clients by CN, a Python and an openssl client."""

from __future__ import annotations

import contextlib
import queue
import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

OPENSSL = "/usr/bin/openssl"


@dataclass(frozen=True)
class Outcome:
    accepted: bool
    detail: str  # the client's CN when accepted, the server's error when refused


class TlsServer:
    """A TLS listener on 127.0.0.1, port 0. Each client that completes the handshake gets
    "welcome <CN>\\n"; every handshake's outcome, as the server saw it, is queued."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.outcomes: queue.Queue[Outcome] = queue.Queue()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(5)
            try:
                tls = self.ctx.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError) as e:
                conn.close()
                self.outcomes.put(Outcome(False, str(e)))
                continue
            with tls:
                peer = tls.getpeercert()
                cn = dict(x[0] for x in peer["subject"]).get("commonName") if peer else None
                self.outcomes.put(Outcome(True, str(cn)))
                with contextlib.suppress(ssl.SSLError, OSError):
                    tls.sendall(f"welcome {cn}\n".encode())

    def outcome(self, timeout: float = 5) -> Outcome:
        return self.outcomes.get(timeout=timeout)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() in the thread; close() alone would not
        self.sock.close()
        self.thread.join(5)


def python_client(port: int, ctx: ssl.SSLContext, identity: tuple[Path, Path] | None = None) -> str:
    """Connect with Python's ssl; the server's greeting, or the error text when refused."""
    if identity:
        ctx.load_cert_chain(*identity)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            # With TLS 1.3 a refused client certificate shows up at the first read, as an alert.
            return tls.recv(200).decode() or "closed without a greeting"
    except (ssl.SSLError, OSError) as e:
        return f"error: {e}"


def python_client_peer_cert(port: int, ctx: ssl.SSLContext, identity: tuple[Path, Path]) -> bytes:
    """The DER certificate the server presented to a Python client that verified it."""
    ctx.load_cert_chain(*identity)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
        tls.recv(200)
    assert der is not None
    return der


def openssl_client(port: int, ca_file: Path, identity: tuple[Path, Path] | None = None) -> str:
    """Connect with `openssl s_client`, verifying the server against `ca_file`; its stdout and stderr."""
    cmd = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(ca_file),
           "-verify_return_error", "-verify_ip", "127.0.0.1", "-quiet"]
    if identity:
        cmd += ["-cert", str(identity[0]), "-key", str(identity[1])]
    done = subprocess.run(cmd, input=b"", capture_output=True, timeout=15)
    return done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")


def openssl_spki_pin(cert_pem: Path) -> str:
    """The pin as OkHttp's and Apple's documentation compute it with openssl, for comparison."""
    pub = subprocess.run([OPENSSL, "x509", "-in", str(cert_pem), "-pubkey", "-noout"], capture_output=True,
                         check=True).stdout
    der = subprocess.run([OPENSSL, "pkey", "-pubin", "-outform", "der"], input=pub, capture_output=True,
                         check=True).stdout
    digest = subprocess.run([OPENSSL, "dgst", "-sha256", "-binary"], input=der, capture_output=True,
                            check=True).stdout
    return subprocess.run([OPENSSL, "base64"], input=digest, capture_output=True, check=True).stdout.decode().strip()
