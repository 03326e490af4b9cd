"""The SMTP sender: the message format (golden string), then real SMTP servers on loopback: aiosmtpd with
STARTTLS and AUTH on the test's event loop, and a real exim4 relay in front of an aiosmtpd sink."""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from fallback import Notice, PermanentFailure, TemporaryFailure
from fallback.email import SmtpConfig, SmtpSender, format_mail
from tests.fallback.conftest import (
    TlsFiles,
    closed_port,
    free_port,
    require_binary,
    stop_process,
    wait_for_port,
)

pytestmark = pytest.mark.asyncio

USER, PASSWORD = "alerts", "s3cret"
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def mail(to: str = "jane.doe@example.com", **extra: Any) -> Notice:
    return Notice("email", to, extra.pop("text", "Server db1 is down."), reference="push1:device1", **extra)


# --- the message, without a network ----------------------------------------------------------------

async def test_plain_text_mail_matches_the_golden_string() -> None:
    msg = format_mail(mail(), "alerts@corp.example", now=NOW)
    assert msg.as_string() == "\r\n".join([  # noqa: FLY002 - one line per header reads best
        "From: alerts@corp.example",
        "To: jane.doe@example.com",
        "Subject: Notification",
        "Date: Fri, 02 Jan 2026 03:04:05 +0000",
        "Message-ID: <push1.device1.accb509c9b5d@corp.example>",
        "X-Intrapush-Reference: push1:device1",
        "Auto-Submitted: auto-generated",
        'Content-Type: text/plain; charset="utf-8"',
        "Content-Transfer-Encoding: quoted-printable",
        "MIME-Version: 1.0",
        "",
        "Server db1 is down.",
        "",
    ])


async def test_text_and_html_mail_matches_the_golden_string() -> None:
    notice = Notice("email", "Jane Doe <jane.doe@example.com>", "Server db1 is down.\nGrüße, ops",
                    reference="01JH5Z:dev-7", subject="Alert: db1 down — again",
                    html="<p>Server <b>db1</b> is down.</p>")
    msg = format_mail(notice, "Intrapush <alerts@corp.example>", reply_to="ops@corp.example", now=NOW)
    boundary = "=_intrapush_43ead6e16d14a4b883df7125fd8d0362"
    assert msg.as_string() == "\r\n".join([
        "From: Intrapush <alerts@corp.example>",
        "To: jane.doe@example.com",
        "Reply-To: ops@corp.example",
        "Subject: Alert: db1 down =?utf-8?b?4oCU?= again",
        "Date: Fri, 02 Jan 2026 03:04:05 +0000",
        "Message-ID: <01JH5Z.dev-7.58da2e72ce6f@corp.example>",
        "X-Intrapush-Reference: 01JH5Z:dev-7",
        "Auto-Submitted: auto-generated",
        "MIME-Version: 1.0",
        "Content-Type: multipart/alternative;",
        f' boundary="{boundary}"',
        "",
        f"--{boundary}",
        'Content-Type: text/plain; charset="utf-8"',
        "Content-Transfer-Encoding: quoted-printable",
        "",
        "Server db1 is down.",
        "Gr=C3=BC=C3=9Fe, ops",
        "",
        f"--{boundary}",
        'Content-Type: text/html; charset="utf-8"',
        "Content-Transfer-Encoding: quoted-printable",
        "",
        "<p>Server <b>db1</b> is down.</p>",
        "",
        f"--{boundary}--",
        "",
    ])


async def test_line_breaks_in_the_subject_cannot_inject_headers() -> None:
    msg = format_mail(mail(subject="db1 down\r\nBcc: everyone@example.com"), "alerts@corp.example", now=NOW)
    assert msg["Subject"] == "db1 down Bcc: everyone@example.com"
    assert msg["Bcc"] is None


async def test_a_retried_notice_keeps_its_message_id() -> None:
    first = format_mail(mail(), "alerts@corp.example")
    again = format_mail(mail(text="other text"), "alerts@corp.example")
    other = format_mail(Notice("email", "jane.doe@example.com", "x", reference="push1:device2"), "alerts@corp.example")
    assert first["Message-ID"] == again["Message-ID"] != other["Message-ID"]


# --- aiosmtpd relays on loopback ----------------------------------------------------------------------

@dataclass
class Relay:
    """What an SMTP server on loopback accepted, and how the client talked to it."""

    port: int = 0
    messages: list[EmailMessage] = field(default_factory=list)
    envelopes: list[tuple[str, list[str]]] = field(default_factory=list)
    sessions: list[dict[str, Any]] = field(default_factory=list)

    async def handle_RCPT(self, server: SMTP, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        local = address.split("@")[0]
        if local == "nobody":
            return "550 5.1.1 <nobody>: Recipient address rejected: User unknown"
        if local == "later":
            return "451 4.3.0 Temporary local problem, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        self.messages.append(email.message_from_bytes(envelope.original_content, policy=email.policy.default))
        self.sessions.append({"tls": session.ssl is not None, "authenticated": bool(session.authenticated),
                              "login": getattr(session.auth_data, "login", None)})
        return "250 2.0.0 Ok: queued as 4711"

    async def next_message(self, timeout: float = 10) -> EmailMessage:
        deadline = time.monotonic() + timeout
        while not self.messages:
            if time.monotonic() > deadline:
                raise AssertionError("no message reached the relay")
            await asyncio.sleep(0.02)
        return self.messages[0]


def body(msg: EmailMessage, subtype: str) -> str:
    part = msg.get_body((subtype,))
    assert part is not None, f"no text/{subtype} part"
    return "\n".join(part.get_content().splitlines())


def check_password(server: SMTP, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (USER.encode(),
                                                                                             PASSWORD.encode())
    return AuthResult(success=ok, handled=False, auth_data=auth_data)


@asynccontextmanager
async def smtp_relay(tls: TlsFiles | None = None, *, implicit: bool = False, **smtp_args: Any) -> AsyncIterator[Relay]:
    """An aiosmtpd server on 127.0.0.1, port 0, on the running loop. With `tls` and not `implicit` it
    offers STARTTLS; with `implicit` it speaks TLS from the first byte."""
    relay = Relay()
    loop = asyncio.get_running_loop()
    context = tls.server_context() if tls else None
    if context and not implicit:
        smtp_args["tls_context"] = context
    server = await loop.create_server(lambda: SMTP(relay, hostname="relay.test", **smtp_args), "127.0.0.1", 0,
                                      ssl=context if implicit else None)
    relay.port = server.sockets[0].getsockname()[1]
    try:
        yield relay
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)


def secure_relay(tls: TlsFiles) -> Any:
    """STARTTLS required, AUTH required (offered only after STARTTLS)."""
    return smtp_relay(tls, require_starttls=True, auth_required=True, auth_require_tls=True,
                      authenticator=check_password)


def sender(port: int, **overrides: Any) -> SmtpSender:
    settings: dict[str, Any] = {"host": "127.0.0.1", "port": port, "from_address": "Intrapush <alerts@corp.example>",
                                "timeout_s": 5.0, "tls": "none"}
    settings.update(overrides)
    return SmtpSender(SmtpConfig(**settings))


async def test_mail_arrives_with_both_parts_over_starttls_and_auth(tls_files: TlsFiles) -> None:
    async with secure_relay(tls_files) as relay:
        s = sender(relay.port, tls="starttls", ca_file=str(tls_files.ca), username=USER, password=PASSWORD,
                   reply_to="ops@corp.example")
        receipt = await s.send(mail(subject="db1 down", html="<p>Server <b>db1</b> is down.</p>"))
        msg = await relay.next_message()
    assert relay.sessions == [{"tls": True, "authenticated": True, "login": USER.encode()}]
    assert relay.envelopes == [("alerts@corp.example", ["jane.doe@example.com"])]
    assert (msg["Subject"], msg["To"], msg["Reply-To"]) == ("db1 down", "jane.doe@example.com", "ops@corp.example")
    assert msg.get_content_type() == "multipart/alternative"
    assert body(msg, "plain") == "Server db1 is down."
    assert body(msg, "html") == "<p>Server <b>db1</b> is down.</p>"
    assert receipt.transport == "smtp" and receipt.message_ids == (msg["Message-ID"],)


async def test_wrong_password_is_a_permanent_auth_failure(tls_files: TlsFiles) -> None:
    async with secure_relay(tls_files) as relay:
        s = sender(relay.port, tls="starttls", ca_file=str(tls_files.ca), username=USER, password="wrong")
        with pytest.raises(PermanentFailure) as caught:
            await s.send(mail())
    assert caught.value.reason == "auth"
    assert "535" in caught.value.detail
    assert relay.messages == []


@pytest.mark.parametrize("username", [USER, ""])
async def test_relay_requiring_starttls_refuses_a_sender_set_to_none(tls_files: TlsFiles, username: str) -> None:
    async with secure_relay(tls_files) as relay:
        s = sender(relay.port, tls="none", username=username, password=PASSWORD)
        with pytest.raises(PermanentFailure) as caught:
            await s.send(mail())
    assert caught.value.reason == "tls_required"
    assert relay.messages == []


async def test_starttls_required_but_not_offered_is_refused_before_any_secret_is_sent() -> None:
    async with smtp_relay(authenticator=check_password, auth_require_tls=False) as relay:
        s = sender(relay.port, tls="starttls", username=USER, password=PASSWORD)
        with pytest.raises(PermanentFailure) as caught:
            await s.send(mail())
    assert caught.value.reason == "tls_unavailable"
    assert relay.sessions == []


async def test_opportunistic_tls_upgrades_when_offered_and_sends_plain_when_not(tls_files: TlsFiles) -> None:
    async with smtp_relay(tls_files) as relay:
        await sender(relay.port, tls="opportunistic", ca_file=str(tls_files.ca)).send(mail())
        await relay.next_message()
    async with smtp_relay() as plain:
        await sender(plain.port, tls="opportunistic").send(mail())
        await plain.next_message()
    assert (relay.sessions[0]["tls"], plain.sessions[0]["tls"]) == (True, False)


async def test_implicit_tls_relay(tls_files: TlsFiles) -> None:
    async with smtp_relay(tls_files, implicit=True) as relay:
        await sender(relay.port, tls="implicit", ca_file=str(tls_files.ca)).send(mail())
        msg = await relay.next_message()
    assert msg["To"] == "jane.doe@example.com"


async def test_certificate_from_another_ca_is_a_permanent_failure(tls_files: TlsFiles,
                                                                  other_tls_files: TlsFiles) -> None:
    async with smtp_relay(other_tls_files) as relay:
        with pytest.raises(PermanentFailure) as caught:
            await sender(relay.port, tls="starttls", ca_file=str(tls_files.ca)).send(mail())
    assert caught.value.reason == "tls_certificate"
    assert relay.messages == []


async def test_relay_down_is_a_temporary_failure() -> None:
    with pytest.raises(TemporaryFailure) as caught:
        await sender(closed_port()).send(mail())
    assert caught.value.reason == "unreachable"


async def test_relay_that_never_greets_is_a_temporary_timeout() -> None:
    connections: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)  # accepts, then says nothing

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    try:
        with pytest.raises(TemporaryFailure) as caught:
            await sender(server.sockets[0].getsockname()[1], timeout_s=0.3).send(mail())
    finally:
        server.close()
        for writer in connections:
            writer.close()
            await writer.wait_closed()
        await server.wait_closed()
    assert caught.value.reason == "timeout"


async def test_unknown_recipient_550_is_a_permanent_failure() -> None:
    async with smtp_relay() as relay:
        with pytest.raises(PermanentFailure) as caught:
            await sender(relay.port).send(mail(to="nobody@example.com"))
    assert caught.value.reason == "invalid_recipient"
    assert "550" in caught.value.detail


async def test_temporary_refusal_451_is_a_temporary_failure() -> None:
    async with smtp_relay() as relay:
        with pytest.raises(TemporaryFailure) as caught:
            await sender(relay.port).send(mail(to="later@example.com"))
    assert caught.value.reason == "busy"


async def test_malformed_address_is_refused_without_connecting() -> None:
    async with smtp_relay() as relay:
        with pytest.raises(PermanentFailure) as caught:
            await sender(relay.port).send(mail(to="jane.doe@"))
    assert caught.value.reason == "invalid_recipient"
    assert relay.sessions == []


async def test_unreadable_ca_file_is_a_permanent_config_failure(tmp_path: Path) -> None:
    with pytest.raises(PermanentFailure) as caught:
        await sender(closed_port(), tls="starttls", ca_file=str(tmp_path / "missing.pem")).send(mail())
    assert caught.value.reason == "config"


async def test_addresses_and_bodies_stay_out_of_info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="fallback")
    async with smtp_relay() as relay:
        await sender(relay.port).send(mail(text="top secret body"))
        with pytest.raises(PermanentFailure):
            await sender(relay.port).send(mail(to="nobody@example.com"))
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("email accepted ref=push1:device1 to=j***@example.com") for line in lines)
    assert any(line.startswith("email refused ref=push1:device1 to=n***@example.com") for line in lines)
    assert not any("jane.doe" in line or "top secret" in line for line in lines)


# --- a real exim4 relay ---------------------------------------------------------------------------------

EXIM_CONFIG = """
primary_hostname = relay.test
keep_environment =
spool_directory = @DIR@/spool
log_file_path = @DIR@/log/%slog
local_interfaces = 127.0.0.1
host_lookup =
rfc1413_hosts =
tls_advertise_hosts = *
tls_certificate = @DIR@/server.pem
tls_privatekey = @DIR@/server.key
auth_advertise_hosts = ${if eq{$tls_in_cipher}{}{}{*}}
acl_smtp_rcpt = acl_rcpt

begin acl
acl_rcpt:
  deny    message = authentication required
          !authenticated = *
  deny    local_parts = nobody
          message = 5.1.1 no such user here
  accept

begin routers
to_sink:
  driver = manualroute
  transport = to_sink
  route_list = * 127.0.0.1 byname
  self = send

begin transports
to_sink:
  driver = smtp
  port = @SINK_PORT@
  hosts_avoid_tls = *
  allow_localhost

begin retry
* * F,1m,10s

begin authenticators
plain:
  driver = plaintext
  public_name = PLAIN
  server_prompts = :
  server_condition = ${if and{{eq{$auth2}{@USER@}}{eq{$auth3}{@PASSWORD@}}}}
login:
  driver = plaintext
  public_name = LOGIN
  server_prompts = Username:: : Password::
  server_condition = ${if and{{eq{$auth1}{@USER@}}{eq{$auth2}{@PASSWORD@}}}}
"""


@asynccontextmanager
async def exim_relay(tls: TlsFiles, sink_port: int) -> AsyncIterator[int]:
    """exim4 in the foreground on a free loopback port, relaying everything to 127.0.0.1:`sink_port`."""
    exim = require_binary("exim4", package="exim4-daemon-light")["exim4"]
    # exim drops to its own user (Debian-exim) to deliver: its directory must not sit under a 0700 tmp_path.
    workdir = Path(tempfile.mkdtemp(prefix="intrapush-exim-"))
    proc = None
    try:
        os.chmod(workdir, 0o755)
        for sub in ("spool", "log"):
            (workdir / sub).mkdir()
            if os.geteuid() == 0:
                shutil.chown(workdir / sub, "Debian-exim", "Debian-exim")
        for source, name in ((tls.cert, "server.pem"), (tls.key, "server.key")):
            shutil.copy(source, workdir / name)
            os.chmod(workdir / name, 0o644)  # a throwaway test key, read by exim after it drops privileges
        conf = workdir / "exim.conf"
        values = {"@DIR@": str(workdir), "@SINK_PORT@": str(sink_port), "@USER@": USER, "@PASSWORD@": PASSWORD}
        text = EXIM_CONFIG
        for placeholder, value in values.items():
            text = text.replace(placeholder, value)
        conf.write_text(text)
        port = free_port()
        # Spawning does not block; the wait for the port runs in a thread.
        proc = subprocess.Popen([exim, "-C", str(conf), "-bdf", "-oX", str(port)],  # noqa: ASYNC220
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await asyncio.to_thread(wait_for_port, port, 10, lambda: proc.poll() is None)
        yield port
    finally:
        if proc is not None:
            stop_process(proc)
        shutil.rmtree(workdir, ignore_errors=True)


async def test_mail_passes_through_a_real_exim_relay_with_starttls_and_auth(tls_files: TlsFiles) -> None:
    async with smtp_relay() as sink, exim_relay(tls_files, sink.port) as exim_port:
        s = sender(exim_port, tls="starttls", ca_file=str(tls_files.ca), username=USER, password=PASSWORD)
        await s.send(mail(subject="db1 down", html="<p>db1 down</p>"))
        with pytest.raises(PermanentFailure) as refused:
            await s.send(mail(to="nobody@example.com"))
        with pytest.raises(PermanentFailure) as wrong_password:
            await sender(exim_port, tls="starttls", ca_file=str(tls_files.ca), username=USER,
                         password="wrong").send(mail())
        msg = await sink.next_message()
    assert "by relay.test with esmtpsa" in msg["Received"]  # esmtp + s (TLS) + a (authenticated)
    assert msg["Subject"] == "db1 down"
    assert body(msg, "html") == "<p>db1 down</p>"
    assert sink.envelopes == [("alerts@corp.example", ["jane.doe@example.com"])]
    assert (refused.value.reason, wrong_password.value.reason) == ("invalid_recipient", "auth")
