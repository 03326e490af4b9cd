"""The one interface every fallback sender implements, its errors, and address validation.

A sender takes a `Notice`, returns a `Receipt`, or raises `TemporaryFailure` (retry later) or
`PermanentFailure` (give up); both carry a stable `reason` code from `Reason`.
"""

from __future__ import annotations

import email.utils
import enum
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, Protocol, runtime_checkable

Channel = Literal["sms", "email"]


class Reason(enum.StrEnum):
    """Stable reason codes carried by failures; logs and the daemon's records use these strings."""

    # permanent: this notice will not get through as it is
    INVALID_RECIPIENT = "invalid_recipient"  # malformed address, or the far end says it does not exist
    INVALID_MESSAGE = "invalid_message"  # the far end refused the content or its encoding
    AUTH = "auth"  # wrong credentials, or the account may not send
    TLS_REQUIRED = "tls_required"  # the relay insists on TLS and the sender is set to `none`
    TLS_UNAVAILABLE = "tls_unavailable"  # TLS is required by our settings but the relay offers none
    TLS_CERTIFICATE = "tls_certificate"  # the peer's certificate did not verify against the CA
    BARRED = "barred"  # the network bars this destination or this subscriber
    REJECTED = "rejected"  # any other final refusal (the log line has the far end's code)
    CONFIG = "config"  # the sender's own settings are unusable (e.g. unreadable CA file)
    # temporary: the same notice may get through later
    UNREACHABLE = "unreachable"  # connection refused, no route, port cannot be opened
    TIMEOUT = "timeout"  # the far end did not answer in time
    CONNECTION_LOST = "connection_lost"  # the link dropped in the middle of a send
    THROTTLED = "throttled"  # the far end asks us to slow down
    BUSY = "busy"  # the far end is busy or its queue is full
    NETWORK = "network"  # the mobile network is out of service or congested
    SERVER_ERROR = "server_error"  # the far end failed (SMTP 4xx, HTTP 5xx, SMSC system error)
    DEVICE = "device"  # the GSM modem or its SIM is in a state that needs it to recover

    @property
    def is_temporary(self) -> bool:
        """The kind of failure that carries this reason."""
        return self in _TEMPORARY_REASONS


_TEMPORARY_REASONS = frozenset({Reason.UNREACHABLE, Reason.TIMEOUT, Reason.CONNECTION_LOST, Reason.THROTTLED,
                                Reason.BUSY, Reason.NETWORK, Reason.SERVER_ERROR, Reason.DEVICE})


class FallbackError(Exception):
    """Base of both failures; `reason` is a `Reason` value, `detail` is for logs (no bodies, no numbers)."""

    temporary: bool = False

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = str(reason)
        self.detail = detail
        super().__init__(f"{self.reason}: {detail}" if detail else self.reason)


class TemporaryFailure(FallbackError):
    """Try again later; `retry_after_s` is the far end's hint when it gave one."""

    temporary = True

    def __init__(self, reason: str, detail: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(reason, detail)
        self.retry_after_s = retry_after_s


class PermanentFailure(FallbackError):
    """Give up on this notice: retrying it unchanged cannot succeed."""


class InvalidAddress(PermanentFailure, ValueError):
    """A phone number or e-mail address that cannot be used; also a ValueError for plain validation."""

    def __init__(self, detail: str) -> None:
        super().__init__(Reason.INVALID_RECIPIENT, detail)


class SettingsError(ValueError):
    """The settings given to `build_sender` are unusable; the message names every problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class Notice:
    """One message to one person. `reference` is `<push_id>:<device>`, used in logs and as idempotency key."""

    channel: Channel
    to: str
    text: str
    reference: str
    subject: str | None = None
    html: str | None = None

    def __post_init__(self) -> None:
        if self.channel not in ("sms", "email"):
            raise ValueError(f"channel must be 'sms' or 'email', got {self.channel!r}")


@dataclass(frozen=True)
class Receipt:
    """What the far end accepted: its message id(s), one per SMS part where it gives them."""

    transport: str
    message_ids: tuple[str, ...] = ()
    parts: int = 1
    accepted_at: datetime = field(default_factory=lambda: datetime.now(UTC))


@runtime_checkable
class Sender(Protocol):
    """What the daemon calls. One sender per configured transport; it may be used concurrently."""

    async def send(self, notice: Notice) -> Receipt: ...

    async def aclose(self) -> None: ...


# --- phone numbers ------------------------------------------------------------------------------

_PHONE_SEPARATORS = re.compile(r"[\s\-./()]")


def normalize_phone(raw: str, default_country_code: str = "") -> str:
    """Return `raw` as E.164 (`+` and 7-15 digits). `default_country_code` (e.g. "49") completes
    national numbers written with a leading 0; without it they are refused."""
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidAddress("empty phone number")
    s = _PHONE_SEPARATORS.sub("", raw.strip())
    if s.startswith("00"):
        s = "+" + s[2:]
    elif not s.startswith("+"):
        if s.startswith("0") and default_country_code:
            s = "+" + default_country_code.lstrip("+") + s[1:]
        else:
            raise InvalidAddress(f"phone number {mask_phone(s)} has no country code (write it as +<country><number>)")
    digits = s[1:]
    if not digits.isascii() or not digits.isdigit():
        raise InvalidAddress(f"phone number {mask_phone(s)} may hold only digits after the +")
    if digits.startswith("0"):
        raise InvalidAddress(f"phone number {mask_phone(s)}: a country code never starts with 0")
    if not 7 <= len(digits) <= 15:
        raise InvalidAddress(f"phone number {mask_phone(s)} has {len(digits)} digits; E.164 allows 7 to 15")
    return s


def mask_phone(number: str) -> str:
    """`+4915112345678` -> `+4915*****678`: enough to tell numbers apart in logs, not to dial them."""
    if len(number) <= 6:
        return "*" * len(number)
    head = 5 if len(number) > 9 else 2
    return number[:head] + "*" * (len(number) - head - 3) + number[-3:]


# --- e-mail addresses ---------------------------------------------------------------------------

_LOCAL_PART = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$")
_DOMAIN_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def check_email_address(raw: str) -> str:
    """Return the bare address (`user@example.com`) from `raw` (which may carry a display name);
    the domain is IDNA-encoded. Anything else raises `InvalidAddress`."""
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidAddress("empty e-mail address")
    if "\r" in raw or "\n" in raw:
        raise InvalidAddress("e-mail address contains a line break")
    found = email.utils.getaddresses([raw])
    addr = found[0][1] if len(found) == 1 else ""
    if not addr or addr.count("@") != 1:
        raise InvalidAddress(f"not an e-mail address: {mask_email(raw)}")
    local, domain = addr.split("@")
    if not _LOCAL_PART.match(local) or local.startswith(".") or local.endswith(".") or ".." in local:
        raise InvalidAddress(f"bad local part in {mask_email(addr)} (plain ASCII, no spaces)")
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise InvalidAddress(f"bad domain in {mask_email(addr)}") from None
    labels = ascii_domain.split(".")
    if len(labels) < 2 or not all(_DOMAIN_LABEL.match(label) for label in labels):
        raise InvalidAddress(f"bad domain in {mask_email(addr)}")
    address = f"{local}@{ascii_domain.lower()}"
    if len(address) > 254:
        raise InvalidAddress("e-mail address longer than 254 characters")
    return address


def mask_email(address: str) -> str:
    """`jane.doe@example.com` -> `j***@example.com`."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address[:1] + "***"
    return (local[:1] or "") + "***@" + domain
