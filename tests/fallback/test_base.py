"""Notice/Receipt, phone number and e-mail address validation, masking for logs."""

from __future__ import annotations

import pytest

from fallback import (
    InvalidAddress,
    Notice,
    PermanentFailure,
    Reason,
    Sender,
    TemporaryFailure,
    check_email_address,
    mask_email,
    mask_phone,
    normalize_phone,
)
from fallback.email import SmtpConfig, SmtpSender
from fallback.modem import ModemConfig, ModemSender
from fallback.smpp import SmppConfig, SmppSender
from fallback.sms_http import HttpSmsConfig, HttpSmsSender, KannelConfig, KannelSender


@pytest.mark.parametrize(("raw", "expected"), [
    ("+4915112345678", "+4915112345678"),
    ("+49 151 1234-5678", "+4915112345678"),
    ("0049 (151) 12345678", "+4915112345678"),
    ("+1 415.555.2671", "+14155552671"),
    ("+290 1234", "+2901234"),
])
def test_phone_numbers_are_normalized_to_e164(raw: str, expected: str) -> None:
    assert normalize_phone(raw) == expected


def test_national_number_uses_the_default_country_code() -> None:
    assert normalize_phone("0151 12345678", default_country_code="49") == "+4915112345678"


@pytest.mark.parametrize("raw", ["", "   ", "015112345678", "+49 151 CALL-ME", "+0151123456", "+12345",
                                 "+1234567890123456", "++4915112345678", "+49\n151"])
def test_invalid_phone_numbers_are_permanent_failures_and_value_errors(raw: str) -> None:
    with pytest.raises(InvalidAddress) as caught:
        normalize_phone(raw)
    assert isinstance(caught.value, PermanentFailure) and isinstance(caught.value, ValueError)
    assert caught.value.reason == Reason.INVALID_RECIPIENT == "invalid_recipient"
    assert "12345678" not in str(caught.value)  # no full numbers in messages that reach logs


def test_phone_numbers_are_masked_for_logs() -> None:
    assert mask_phone("+4915112345678") == "+4915******678"
    assert mask_phone("+491512345678") == "+4915*****678"
    assert mask_phone("+2901234") == "+2***234"


@pytest.mark.parametrize(("raw", "expected"), [
    ("jane.doe@example.com", "jane.doe@example.com"),
    ("Jane Doe <Jane.Doe@Example.COM>", "Jane.Doe@example.com"),
    ("ops+alerts@corp.example", "ops+alerts@corp.example"),
    ("max@müller.example", "max@xn--mller-kva.example"),
])
def test_email_addresses_are_checked_and_normalized(raw: str, expected: str) -> None:
    assert check_email_address(raw) == expected


@pytest.mark.parametrize("raw", ["", "jane", "jane@", "@example.com", "jane@localhost", "a@b.com, c@d.com",
                                 "jane doe@example.com", "jane..doe@example.com", "jane@-example.com",
                                 "jane@example.com\r\nBcc: all@example.com", "jäne@example.com"])
def test_invalid_email_addresses_are_permanent_failures(raw: str) -> None:
    with pytest.raises(InvalidAddress) as caught:
        check_email_address(raw)
    assert caught.value.reason == "invalid_recipient"


def test_email_addresses_are_masked_for_logs() -> None:
    assert mask_email("jane.doe@example.com") == "j***@example.com"


def test_notice_is_frozen_and_knows_only_two_channels() -> None:
    notice = Notice("sms", "+4915112345678", "Server down", reference="m1:d7")
    with pytest.raises(AttributeError):
        notice.text = "changed"  # type: ignore[misc]
    with pytest.raises(ValueError, match="channel"):
        Notice("pager", "x", "y", reference="r")  # type: ignore[arg-type]


def test_failures_carry_reason_and_retry_hint() -> None:
    temporary = TemporaryFailure(Reason.THROTTLED, "slow down", retry_after_s=7)
    assert (temporary.temporary, temporary.reason, temporary.retry_after_s) == (True, "throttled", 7)
    permanent = PermanentFailure(Reason.AUTH, "535")
    assert (permanent.temporary, permanent.reason, str(permanent)) == (False, "auth", "auth: 535")


def test_every_sender_satisfies_the_sender_protocol() -> None:
    senders = [
        SmtpSender(SmtpConfig(host="relay", from_address="alerts@example.com")),
        ModemSender(ModemConfig(port="/dev/ttyUSB0")),
        SmppSender(SmppConfig(host="smsc", system_id="box")),
        KannelSender(KannelConfig(username="box")),
        HttpSmsSender(HttpSmsConfig(url="http://gw/send?to={to}")),
    ]
    assert all(isinstance(s, Sender) for s in senders)


def test_error_tables_agree_with_the_kind_each_reason_stands_for() -> None:
    from fallback.modem import CME_ERRORS, CMS_ERRORS
    from fallback.smpp import SMPP_STATUS

    for table in (CMS_ERRORS, CME_ERRORS, SMPP_STATUS):
        for code, (temporary, reason) in table.items():
            assert temporary == reason.is_temporary, (code, reason)
