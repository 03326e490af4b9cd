"""TLS for every listener from the box's own CA: created on first start, server contexts that follow
renewals and CRL changes without a restart, daily CRL refresh, renewal and expiry reports.

Each listener gets one long-lived `ssl.SSLContext` whose SNI callback (called at every handshake,
with or without SNI) swaps in the newest context built from the files: a renewed server certificate
or a new CRL applies to the next handshake, and connections already open stay as they are.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import certs

log = logging.getLogger("appliance.daemon")
DAILY_S = 86400.0


def default_names() -> list[str]:
    """What the server certificate covers when `certs.names` is empty: this host's names and loopback."""
    names = [socket.gethostname(), socket.getfqdn(), "localhost", "127.0.0.1", "::1"]
    return list(dict.fromkeys(n for n in names if n))


@dataclass(frozen=True)
class TlsSettings:
    directory: Path
    names: list[str]
    passphrase: str | None
    key_type: str
    renew_before_days: int
    check_interval_s: float


class TlsManager:
    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self.store = certs.CertStore(settings.directory, passphrase=settings.passphrase or None)
        self._bases: dict[str, ssl.SSLContext] = {}
        self._current: dict[str, ssl.SSLContext] = {}
        self._stamp: tuple[Any, ...] = ()
        self.on_reloaded: Callable[[], None] | None = None  # a listener outside this process re-reads the files

    def ensure(self) -> None:
        """First start: create the CA and a server certificate for the configured names."""
        s = self.settings
        if not self.store.has_ca():
            ca = certs.create_ca(self.store, key_type=s.key_type)
            log.info("event=ca_created subject=%r pin=sha256/%s", ca.subject.rfc4514_string(), certs.spki_pin(ca))
        if not self.store.has_server_cert():
            certs.issue_server_cert(self.store, s.names, key_type=s.key_type)
            log.info("event=server_cert_issued names=%s", ",".join(s.names))
        self.check_daily()
        self._stamp = self._file_stamp()

    def context(self, client_cert: str) -> ssl.SSLContext:
        """The listener's context for a client-certificate mode: none, optional or required."""
        if client_cert not in self._bases:
            base = certs.server_ssl_context(self.store, client_cert)  # type: ignore[arg-type]
            self._current[client_cert] = base

            def pick_current(sslobj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext,
                             mode: str = client_cert) -> None:
                current = self._current[mode]
                if sslobj.context is not current:
                    sslobj.context = current

            base.sni_callback = pick_current
            self._bases[client_cert] = base
        return self._bases[client_cert]

    def _file_stamp(self) -> tuple[Any, ...]:
        stamp = []
        for path in (self.store.server_pem, self.store.server_key, self.store.crl_pem, self.store.ca_pem,
                     self.store.previous_ca.crl):  # a revocation under the previous CA during a rotation
            try:
                st = path.stat()
                stamp.append((st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                stamp.append(None)
        previous = self.store.directory / "previous"
        stamp.append(previous.exists())
        return tuple(stamp)

    def build_if_changed(self) -> tuple[tuple[Any, ...], dict[str, ssl.SSLContext]] | None:
        """New contexts when a certificate, key or CRL file changed (renewal, revocation), else None. Reads
        and parses files (a CRL may list thousands of serials): run it off the event loop."""
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return None
        fresh: dict[str, ssl.SSLContext] = {}
        for mode in list(self._current):
            try:
                fresh[mode] = certs.server_ssl_context(self.store, mode)  # type: ignore[arg-type]
            except certs.CertError as exc:
                log.error("event=tls_reload_failed mode=%s error=%r note=%r", mode, str(exc),
                          "the previous certificates stay in use")
                return None
        return stamp, fresh

    def apply(self, built: tuple[tuple[Any, ...], dict[str, ssl.SSLContext]]) -> None:
        """Swap the new contexts in (on the loop: new handshakes pick them, open connections keep theirs)."""
        self._stamp, fresh = built
        self._current.update(fresh)
        log.info("event=tls_reloaded modes=%s", ",".join(self._current))

    def check_daily(self) -> None:
        """Refresh the CRL, renew the server certificate when it nears expiry, report what expires."""
        certs.refresh_crl(self.store)
        server = self.store.load_server_cert()
        if certs.needs_renewal(server, self.settings.renew_before_days):
            certs.renew_server_cert(self.store)
            log.warning("event=server_cert_renewed")
        ca = certs.describe_ca(self.store).as_dict()
        if ca.get("days_left", 9999) <= self.settings.renew_before_days * 6:
            log.warning("event=ca_expiring not_after=%s days_left=%s", ca.get("not_after"), ca.get("days_left"))
        for status in certs.list_certs(self.store, expiring_within_days=self.settings.renew_before_days):
            if status.state in ("expiring", "expired"):
                log.warning("event=cert_%s kind=%s name=%r serial=%s not_after=%s days_left=%d", status.state,
                            status.kind, status.name, status.serial, status.not_after.isoformat(),
                            status.days_left)

    async def watch(self) -> None:
        elapsed = 0.0
        while True:
            await asyncio.sleep(self.settings.check_interval_s)
            elapsed += self.settings.check_interval_s
            try:
                if elapsed >= DAILY_S:
                    elapsed = 0.0
                    await asyncio.to_thread(self.check_daily)
                built = await asyncio.to_thread(self.build_if_changed)  # never parse files on the loop (#10)
                if built is not None:
                    self.apply(built)
                    if self.on_reloaded is not None:  # Mosquitto's bundles are files too: written off the loop
                        await asyncio.to_thread(self.on_reloaded)
            except Exception:
                log.exception("event=tls_check_failed")

    def enrollment_info(self) -> dict[str, str]:
        """What a device pins: the CA certificate and the SPKI pins of the CA and the server key."""
        ca = self.store.load_ca_cert()
        return {
            "ca_pem": certs.export_ca_pem(self.store).decode(),
            "ca_pin": "sha256/" + certs.spki_pin(ca),
            "server_pin": "sha256/" + certs.spki_pin(self.store.load_server_cert()),
        }
