"""Every fallback setting, defined once with its default and one line of help, and `build_sender`.

Settings are flat scalars, as in the daemon's `[fallback.sms]` and `[fallback.email]` sections: keys of
all SMS transports may sit side by side; `transport` picks which ones are used.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fallback.base import Sender, SettingsError

SMS_TRANSPORTS = ("modem", "smpp", "kannel", "http")
EMAIL_TRANSPORTS = ("smtp",)


@dataclass(frozen=True)
class FallbackSetting:
    channel: str  # "sms" or "email": the `[fallback.<channel>]` section
    key: str
    default: Any
    help: str
    transport: str = ""  # the transport that reads it; "" for all of the channel
    required: bool = False  # must be non-empty when its transport is chosen
    choices: tuple[str, ...] | None = None
    secret: bool = False

    @property
    def field(self) -> str:
        """Name of the field in the transport's config dataclass."""
        prefix = self.transport + "_"
        return self.key[len(prefix):] if self.transport and self.key.startswith(prefix) else self.key


S = FallbackSetting
SETTINGS: tuple[FallbackSetting, ...] = (
    # --- [fallback.sms], every transport ----------------------------------------------------------
    S("sms", "transport", "", "how SMS leave the box; empty: no SMS fallback", choices=("",) + SMS_TRANSPORTS),
    S("sms", "sender", "", "sender shown to recipients: +E.164 number, short code, or up to 11 letters; "
      "empty: the gateway's default (a modem always sends from its SIM's number)"),
    # Six parts (~900 GSM characters) is far beyond a useful alert; it caps the cost of a runaway text.
    S("sms", "max_parts", 6, "longest SMS in concatenated parts; a longer text is cut and ends in an ellipsis"),
    S("sms", "default_country_code", "", "country code (e.g. 49) for numbers written with a leading 0; "
      "empty: such numbers are refused"),
    # --- modem ----------------------------------------------------------------------------------
    S("sms", "modem_port", "", "serial device (/dev/ttyUSB0) or pyserial URL (socket://host:port)",
      transport="modem", required=True),
    S("sms", "modem_baudrate", 115200, "serial speed; USB modems ignore it", transport="modem"),
    S("sms", "modem_pin", "", "SIM PIN, sent only when the SIM asks for it", transport="modem", secret=True),
    S("sms", "modem_smsc", "", "SMS service centre number (+E.164); empty: the one stored on the SIM",
      transport="modem"),
    S("sms", "modem_init", "", "one extra AT command sent after the standard initialisation", transport="modem"),
    # A day: an alert older than that is noise; the SMSC stops retrying an unreachable phone then.
    S("sms", "modem_validity_min", 1440, "how long the network keeps trying to deliver, minutes; "
      "0: the network's default", transport="modem"),
    S("sms", "modem_command_timeout_s", 10.0, "a modem silent this long after an AT command is reopened",
      transport="modem"),
    # Submitting waits for the network's answer, which takes seconds on a weak signal.
    S("sms", "modem_send_timeout_s", 60.0, "wait for +CMGS after a PDU before giving up (temporary)",
      transport="modem"),
    # --- smpp -----------------------------------------------------------------------------------
    S("sms", "smpp_host", "", "SMSC host name or address", transport="smpp", required=True),
    S("sms", "smpp_port", 2775, "SMSC port", transport="smpp"),
    S("sms", "smpp_system_id", "", "SMPP account (system_id)", transport="smpp", required=True),
    S("sms", "smpp_password", "", "SMPP password (at most 8 characters)", transport="smpp", secret=True),
    S("sms", "smpp_system_type", "", "system_type sent in the bind, if the SMSC wants one", transport="smpp"),
    S("sms", "smpp_delivery_receipts", False, "bind as transceiver and ask for delivery receipts "
      "(logged as they arrive)", transport="smpp"),
    # Below the 60 s idle timeout common on SMSCs and firewalls.
    S("sms", "smpp_enquire_link_s", 30.0, "keepalive interval of an idle session", transport="smpp"),
    S("sms", "smpp_timeout_s", 10.0, "connect and response timeout", transport="smpp"),
    # --- kannel ---------------------------------------------------------------------------------
    S("sms", "kannel_url", "http://127.0.0.1:13013/cgi-bin/sendsms", "smsbox sendsms URL", transport="kannel"),
    S("sms", "kannel_username", "", "sendsms-user username", transport="kannel", required=True),
    S("sms", "kannel_password", "", "sendsms-user password", transport="kannel", secret=True),
    S("sms", "kannel_smsc", "", "route through this smsc-id; empty: Kannel's own routing", transport="kannel"),
    S("sms", "kannel_timeout_s", 10.0, "HTTP request timeout", transport="kannel"),
    S("sms", "kannel_ca_file", "", "PEM CA file for an https URL; empty: the system's CAs", transport="kannel"),
    # --- http -----------------------------------------------------------------------------------
    S("sms", "http_url", "", "URL template; {to} {to_digits} {text} {sender} {reference} are percent-encoded",
      transport="http", required=True),
    S("sms", "http_method", "POST", "HTTP method", transport="http", choices=("GET", "POST", "PUT")),
    S("sms", "http_body", "", "JSON body template with the same placeholders, JSON-escaped; empty: no body",
      transport="http"),
    S("sms", "http_headers", "", "extra headers as a JSON object, e.g. {\"Authorization\": \"Bearer ...\"}",
      transport="http", secret=True),
    S("sms", "http_success_statuses", "200-299", "statuses that mean accepted, e.g. 200,202 or 200-299",
      transport="http"),
    S("sms", "http_id_field", "", "dotted path to the message id in a JSON answer, e.g. messages.0.id",
      transport="http"),
    S("sms", "http_timeout_s", 10.0, "HTTP request timeout", transport="http"),
    S("sms", "http_ca_file", "", "PEM CA file for an https URL; empty: the system's CAs", transport="http"),
    # --- [fallback.email] -----------------------------------------------------------------------
    S("email", "transport", "", "how e-mail leaves the box; empty: no e-mail fallback",
      choices=("",) + EMAIL_TRANSPORTS),
    S("email", "host", "", "SMTP relay host name or address", transport="smtp", required=True),
    S("email", "port", 0, "relay port; 0: 587 for starttls, 465 for implicit, 25 otherwise", transport="smtp"),
    # Relays on the intranet still carry names and alert texts: refuse to send them in clear by default.
    S("email", "tls", "starttls", "starttls (required), opportunistic (if offered), implicit (TLS from the "
      "first byte), none", transport="smtp", choices=("starttls", "opportunistic", "implicit", "none")),
    S("email", "ca_file", "", "PEM CA file that signed the relay's certificate; empty: the system's CAs",
      transport="smtp"),
    S("email", "tls_verify", True, "verify the relay's certificate and name; false accepts any certificate",
      transport="smtp"),
    S("email", "username", "", "AUTH user; empty: no AUTH", transport="smtp"),
    S("email", "password", "", "AUTH password", transport="smtp", secret=True),
    S("email", "from_address", "", "From header and envelope sender, e.g. Alerts <alerts@example.com>",
      transport="smtp", required=True),
    S("email", "reply_to", "", "Reply-To header; empty: none", transport="smtp"),
    S("email", "helo_name", "", "name sent in EHLO; empty: this host's fully qualified name", transport="smtp"),
    S("email", "timeout_s", 30.0, "connect and per-command timeout", transport="smtp"),
    S("email", "default_subject", "Notification", "subject of a notice that has none", transport="smtp"),
)
del S


def _config_class(channel: str, transport: str) -> tuple[type, type]:
    """(config dataclass, sender class); imported here so a box without pyserial can still mail."""
    if channel == "email":
        from fallback.email import SmtpConfig, SmtpSender

        return SmtpConfig, SmtpSender
    if transport == "modem":
        from fallback.modem import ModemConfig, ModemSender

        return ModemConfig, ModemSender
    if transport == "smpp":
        from fallback.smpp import SmppConfig, SmppSender

        return SmppConfig, SmppSender
    from fallback.sms_http import (
        HttpSmsConfig,
        HttpSmsSender,
        KannelConfig,
        KannelSender,
    )

    return (KannelConfig, KannelSender) if transport == "kannel" else (HttpSmsConfig, HttpSmsSender)


def _coerce(setting: FallbackSetting, raw: Any) -> Any:
    kind = type(setting.default)
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return raw.lower() in ("1", "true", "yes", "on")
        raise ValueError(f"expected true or false, got {raw!r}")
    if kind in (int, float):
        if isinstance(raw, bool):
            raise ValueError(f"expected a number, got {raw!r}")
        try:
            return kind(raw)
        except (TypeError, ValueError):
            raise ValueError(f"expected a {'whole ' if kind is int else ''}number, got {raw!r}") from None
    if not isinstance(raw, str):
        raise ValueError(f"expected a string, got {raw!r}")  # noqa: TRY004 - collected as a settings problem
    return raw


def build_sender(channel: str, settings: Mapping[str, Any]) -> Sender:
    """The sender for `[fallback.<channel>]`; `settings["transport"]` names it. Raises SettingsError
    naming every unknown key (with the nearest known one), missing required key and bad value."""
    if channel not in ("sms", "email"):
        raise SettingsError([f"channel: expected sms or email, got {channel!r}"])
    known = {s.key: s for s in SETTINGS if s.channel == channel}
    problems = []
    for key in settings:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
            problems.append(f"{key}: unknown setting" + (f" (did you mean `{close[0]}`?)" if close else ""))
    names = SMS_TRANSPORTS if channel == "sms" else EMAIL_TRANSPORTS
    transport = settings.get("transport", known["transport"].default)
    if transport not in names:
        problems.append(f"transport: expected one of {', '.join(names)}, got {transport!r}")
        raise SettingsError(problems)
    config_class, sender_class = _config_class(channel, transport)
    fields = {f.name for f in dataclasses.fields(config_class)}
    by_field: dict[str, str] = {}
    kwargs: dict[str, Any] = {}
    for setting in known.values():
        if setting.transport not in ("", transport) or setting.field not in fields:
            continue
        by_field[setting.field] = setting.key
        try:
            value = _coerce(setting, settings.get(setting.key, setting.default))
        except ValueError as exc:
            problems.append(f"{setting.key}: {exc}")
            continue
        if setting.required and value == "":
            problems.append(f"{setting.key}: required when transport = {transport!r}")
        if setting.choices is not None and value not in setting.choices:
            problems.append(f"{setting.key}: expected one of {', '.join(setting.choices)}, got {value!r}")
        kwargs[setting.field] = value
    if problems:
        raise SettingsError(problems)
    try:
        config = config_class(**kwargs)
    except SettingsError as exc:
        renamed = []
        for problem in exc.problems:
            name, sep, rest = problem.partition(":")
            renamed.append(f"{by_field.get(name, name)}{sep}{rest}")
        raise SettingsError(renamed) from None
    sender: Sender = sender_class(config)
    return sender


def toml_literal(value: Any) -> str:
    """A default as it is written in intrapush.toml."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def settings_markdown(channel: str) -> str:
    """The reference table of `[fallback.<channel>]` for docs/fallback.md (generated there with cog)."""
    lines = ["| key | default | used by | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        if s.channel != channel:
            continue
        notes = []
        if s.required:
            notes.append("Required.")
        if s.choices:
            notes.append("One of: " + ", ".join(f"`{c}`" if c else '`""`' for c in s.choices) + ".")
        if s.secret:
            notes.append("Secret.")
        meaning = (s.help + ". " + " ".join(notes)).strip().replace("|", "\\|")
        lines.append(f"| `{s.key}` | `{toml_literal(s.default)}` | {s.transport or 'all'} | {meaning} |")
    return "\n".join(lines)
