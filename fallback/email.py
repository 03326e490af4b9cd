"""E-mail through the intranet SMTP relay (aiosmtplib): `format_mail` builds the message, `SmtpSender` sends it.

A connection per notice: fallback mail is rare, and a fresh session never inherits a half-dead one.
"""

from __future__ import annotations

import email.policy
import email.utils
import hashlib
import logging
import re
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage

import aiosmtplib

from fallback.base import (
    FallbackError,
    Notice,
    PermanentFailure,
    Reason,
    Receipt,
    SettingsError,
    TemporaryFailure,
    check_email_address,
    mask_email,
)

log = logging.getLogger(__name__)

TLS_MODES = ("starttls", "opportunistic", "implicit", "none")
_DEFAULT_PORTS = {"starttls": 587, "opportunistic": 25, "implicit": 465, "none": 25}
_NOT_IN_MESSAGE_ID = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class SmtpConfig:
    """Settings of the `smtp` transport; `docs/fallback.md` and `fallback.transports.SETTINGS` explain each."""

    host: str
    from_address: str
    port: int = 0
    tls: str = "starttls"
    ca_file: str = ""
    tls_verify: bool = True
    username: str = ""
    password: str = ""
    reply_to: str = ""
    helo_name: str = ""
    timeout_s: float = 30.0
    default_subject: str = "Notification"

    def __post_init__(self) -> None:
        problems = []
        if self.tls not in TLS_MODES:
            problems.append(f"tls: expected one of {', '.join(TLS_MODES)}, got {self.tls!r}")
        if not 0 <= self.port <= 65535:
            problems.append(f"port: out of range: {self.port}")
        for key in ("from_address", "reply_to"):
            value = getattr(self, key)
            if value or key == "from_address":
                try:
                    check_email_address(value)
                except PermanentFailure as exc:
                    problems.append(f"{key}: {exc.detail}")
        if self.timeout_s <= 0:
            problems.append("timeout_s: must be positive")
        if problems:
            raise SettingsError(problems)

    @property
    def effective_port(self) -> int:
        return self.port or _DEFAULT_PORTS[self.tls]


def make_message_id(reference: str, from_address: str) -> str:
    """A Message-ID derived from the notice reference, so a retried notice keeps its id and relays or
    mailbox rules can drop the duplicate. The hash keeps ids apart that differ only in odd characters."""
    domain = check_email_address(from_address).rsplit("@", 1)[1]
    digest = hashlib.sha256(reference.encode()).hexdigest()[:12]
    readable = _NOT_IN_MESSAGE_ID.sub(".", reference).strip(".")[:64] or "notice"
    return f"<{readable}.{digest}@{domain}>"


def _one_line(value: str) -> str:
    return " ".join(value.split())


def format_mail(notice: Notice, from_addr: str, *, reply_to: str = "", default_subject: str = "Notification",
                now: datetime | None = None) -> EmailMessage:
    """The message for `notice`: text/plain, or multipart/alternative with an HTML part. Pure: the same
    notice and `now` give the same bytes (the boundary is derived from the content)."""
    to = check_email_address(notice.to)
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = from_addr
    msg["To"] = to
    if reply_to:
        msg["Reply-To"] = reply_to
    msg["Subject"] = _one_line(notice.subject or default_subject)
    msg["Date"] = email.utils.format_datetime(now or datetime.now(UTC))
    msg["Message-ID"] = make_message_id(notice.reference, from_addr)
    msg["X-Intrapush-Reference"] = _one_line(notice.reference)
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: out-of-office replies must not answer
    msg.set_content(notice.text, subtype="plain", charset="utf-8", cte="quoted-printable")
    if notice.html:
        msg.add_alternative(notice.html, subtype="html", charset="utf-8", cte="quoted-printable")
        for part in msg.iter_parts():
            del part["MIME-Version"]  # the stdlib adds it to each new part; it belongs on the top only
        digest = hashlib.sha256((notice.text + "\0" + notice.html).encode()).hexdigest()[:32]
        msg.set_boundary(f"=_intrapush_{digest}")
    return msg


def _tls_context(config: SmtpConfig) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=config.ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise PermanentFailure(Reason.CONFIG, f"cannot load ca_file {config.ca_file!r}: {exc}") from None
    if not config.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _classify_reply(code: int, text: str, stage: str) -> Exception:
    """Turn an SMTP reply into our failure: 4xx is temporary, 5xx permanent, with a reason code."""
    detail = f"{stage}: {code} {_one_line(text)[:200]}"
    lowered = text.lower()
    if 400 <= code < 500:
        if code in (421, 451, 452):
            return TemporaryFailure(Reason.BUSY, detail)
        return TemporaryFailure(Reason.SERVER_ERROR, detail)
    if code == 530 and "tls" in lowered:
        return PermanentFailure(Reason.TLS_REQUIRED, detail)
    if code in (530, 534, 535, 538) or stage == "auth":
        return PermanentFailure(Reason.AUTH, detail)
    if stage == "rcpt" and code in (550, 551, 553):
        return PermanentFailure(Reason.INVALID_RECIPIENT, detail)
    if stage == "data" or code in (552, 554):
        return PermanentFailure(Reason.INVALID_MESSAGE, detail)
    return PermanentFailure(Reason.REJECTED, detail)


class SmtpSender:
    """Sends `Notice(channel="email")` through one SMTP relay."""

    transport = "smtp"

    def __init__(self, config: SmtpConfig) -> None:
        self.config = config

    async def aclose(self) -> None:
        """Nothing stays open between notices."""

    async def send(self, notice: Notice) -> Receipt:
        fields = (f"ref={notice.reference} to={mask_email(notice.to)} "
                  f"relay={self.config.host}:{self.config.effective_port}")
        try:
            to = check_email_address(notice.to)
            msg = format_mail(notice, self.config.from_address, reply_to=self.config.reply_to,
                              default_subject=self.config.default_subject)
            reply = await self._deliver(msg, to)
        except FallbackError as exc:
            log.warning("email refused %s reason=%s temporary=%s detail=%s", fields, exc.reason, exc.temporary,
                        exc.detail)
            raise
        log.info("email accepted %s message_id=%s relay_reply=%s", fields, msg["Message-ID"],
                 _one_line(reply)[:120])
        return Receipt(self.transport, (str(msg["Message-ID"]),), 1)

    async def _deliver(self, msg: EmailMessage, to: str) -> str:
        config = self.config
        context = _tls_context(config) if config.tls != "none" else None
        smtp = aiosmtplib.SMTP(hostname=config.host, port=config.effective_port, timeout=config.timeout_s,
                               use_tls=config.tls == "implicit", start_tls=False, tls_context=context,
                               local_hostname=config.helo_name or None)
        stage = "connect"
        offered_starttls = stalled = False
        try:
            await smtp.connect()
            stage = "ehlo"
            await smtp.ehlo()
            offered_starttls = smtp.supports_extension("starttls")
            if config.tls in ("starttls", "opportunistic") and offered_starttls:
                stage = "starttls"
                await smtp.starttls(tls_context=context)
                await smtp.ehlo()
            elif config.tls == "starttls":
                raise PermanentFailure(Reason.TLS_UNAVAILABLE, "the relay does not offer STARTTLS (tls = starttls)")
            if config.username:
                stage = "auth"
                if not smtp.supports_extension("auth"):
                    if offered_starttls and not smtp.get_transport_info("sslcontext"):
                        raise PermanentFailure(Reason.TLS_REQUIRED,
                                               "the relay offers AUTH only after STARTTLS; set tls = starttls")
                    raise PermanentFailure(Reason.AUTH, "the relay does not offer AUTH")
                await smtp.login(config.username, config.password)
            stage = "mail"
            _refused, reply = await smtp.send_message(msg, sender=check_email_address(config.from_address),
                                                      recipients=[to])
            return reply
        except FallbackError:
            raise
        except aiosmtplib.SMTPRecipientsRefused as exc:
            first = exc.recipients[0]
            raise _classify_reply(first.code, first.message, "rcpt") from None
        except aiosmtplib.SMTPSenderRefused as exc:
            raise _classify_reply(exc.code, exc.message, "mail") from None
        except aiosmtplib.SMTPDataError as exc:
            raise _classify_reply(exc.code, exc.message, "data") from None
        except aiosmtplib.SMTPResponseException as exc:
            raise _classify_reply(exc.code, exc.message, stage) from None
        except ssl.SSLCertVerificationError as exc:
            raise PermanentFailure(Reason.TLS_CERTIFICATE, f"{stage}: {exc.verify_message}") from None
        except aiosmtplib.SMTPTimeoutError as exc:
            stalled = True
            raise TemporaryFailure(Reason.TIMEOUT, f"{stage}: {exc}") from None
        except aiosmtplib.SMTPConnectError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, ssl.SSLCertVerificationError):
                raise PermanentFailure(Reason.TLS_CERTIFICATE, f"{stage}: {cause.verify_message}") from None
            raise TemporaryFailure(Reason.UNREACHABLE, f"{stage}: {exc}") from None
        except aiosmtplib.SMTPServerDisconnected as exc:
            raise TemporaryFailure(Reason.CONNECTION_LOST, f"{stage}: {exc}") from None
        except aiosmtplib.SMTPException as exc:
            raise PermanentFailure(Reason.REJECTED, f"{stage}: {exc}") from None
        except (ssl.SSLError, ConnectionError, OSError, TimeoutError) as exc:
            raise TemporaryFailure(Reason.CONNECTION_LOST, f"{stage}: {exc!r}") from None
        finally:
            if smtp.is_connected and not stalled:  # a stalled relay would only cost another timeout
                try:
                    await smtp.quit(timeout=min(config.timeout_s, 5.0))
                except (aiosmtplib.SMTPException, OSError):
                    pass  # the outcome is decided; a relay that drops the goodbye changes nothing
            smtp.close()
