"""SMS and e-mail for a device the box could not reach. Knows nothing of MQTT, the store or the daemon.

    sender = build_sender("sms", {"transport": "smpp", "smpp_host": "smsc.corp", ...})
    receipt = await sender.send(Notice("sms", "+4915112345678", "Server down", reference="m1:d7"))

`send` raises `TemporaryFailure` (retry later) or `PermanentFailure` (give up), each with a `reason`.
"""

from fallback.base import (
    FallbackError,
    InvalidAddress,
    Notice,
    PermanentFailure,
    Reason,
    Receipt,
    Sender,
    SettingsError,
    TemporaryFailure,
    check_email_address,
    mask_email,
    mask_phone,
    normalize_phone,
)
from fallback.transports import SETTINGS, build_sender

__all__ = [
    "SETTINGS",
    "FallbackError",
    "InvalidAddress",
    "Notice",
    "PermanentFailure",
    "Reason",
    "Receipt",
    "Sender",
    "SettingsError",
    "TemporaryFailure",
    "build_sender",
    "check_email_address",
    "mask_email",
    "mask_phone",
    "normalize_phone",
]
