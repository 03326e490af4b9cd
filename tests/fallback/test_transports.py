"""build_sender and the settings table: every key reaches a config field, and docs/fallback.md lists them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fallback import SETTINGS, Reason, SettingsError, build_sender
from fallback.email import SmtpConfig, SmtpSender
from fallback.modem import ModemConfig, ModemSender
from fallback.smpp import SmppConfig, SmppSender
from fallback.sms_http import HttpSmsConfig, HttpSmsSender, KannelConfig, KannelSender
from fallback.transports import settings_markdown

DOCS = Path(__file__).parents[2] / "docs" / "fallback.md"

MINIMAL = {
    ("sms", "modem"): ({"modem_port": "/dev/ttyUSB0"}, ModemSender, ModemConfig),
    ("sms", "smpp"): ({"smpp_host": "smsc.corp.example", "smpp_system_id": "box"}, SmppSender, SmppConfig),
    ("sms", "kannel"): ({"kannel_username": "box"}, KannelSender, KannelConfig),
    ("sms", "http"): ({"http_url": "https://gw.corp.example/sms?to={to}&text={text}"}, HttpSmsSender,
                      HttpSmsConfig),
    ("email", "smtp"): ({"host": "relay.corp.example", "from_address": "alerts@corp.example"}, SmtpSender,
                        SmtpConfig),
}


@pytest.mark.parametrize(("channel", "transport"), list(MINIMAL))
def test_build_sender_picks_the_transport_by_name(channel: str, transport: str) -> None:
    settings, sender_class, _config = MINIMAL[(channel, transport)]
    sender = build_sender(channel, {"transport": transport, **settings})
    assert type(sender) is sender_class


def test_the_whole_section_at_its_defaults_may_be_passed() -> None:
    section = {s.key: s.default for s in SETTINGS if s.channel == "sms"}
    section.update(transport="smpp", smpp_host="smsc", smpp_system_id="box", sender="+4915112345678",
                   max_parts="3", smpp_delivery_receipts="true", smpp_port="2776")
    sender = build_sender("sms", section)
    assert isinstance(sender, SmppSender)
    assert (sender.config.max_parts, sender.config.delivery_receipts, sender.config.port) == (3, True, 2776)


def test_unknown_transport_names_the_choices() -> None:
    with pytest.raises(SettingsError, match="transport: expected one of modem, smpp, kannel, http, got 'pager'"):
        build_sender("sms", {"transport": "pager"})
    with pytest.raises(SettingsError, match="channel: expected sms or email"):
        build_sender("fax", {})


def test_every_problem_is_reported_at_once_with_the_nearest_key() -> None:
    with pytest.raises(SettingsError) as caught:
        build_sender("sms", {"transport": "smpp", "smpp_hots": "smsc", "max_parts": "many"})
    assert caught.value.problems == [
        "smpp_hots: unknown setting (did you mean `smpp_host`?)",
        "max_parts: expected a whole number, got 'many'",
        "smpp_host: required when transport = 'smpp'",
        "smpp_system_id: required when transport = 'smpp'",
    ]


def test_bad_values_are_reported_under_their_setting_keys() -> None:
    with pytest.raises(SettingsError) as caught:
        build_sender("email", {"transport": "smtp", "host": "relay", "from_address": "not an address", "tls": "sometimes"})
    assert caught.value.problems == ["tls: expected one of starttls, opportunistic, implicit, none, got 'sometimes'"]
    with pytest.raises(SettingsError) as caught:
        build_sender("sms", {"transport": "http", "http_url": "gw/sms", "http_body": "{not json",
                             "http_success_statuses": "2xx"})
    assert [p.split(":")[0] for p in caught.value.problems] == ["http_url", "http_body", "http_success_statuses"]
    with pytest.raises(SettingsError, match="from_address: not an e-mail address"):
        build_sender("email", {"transport": "smtp", "host": "relay", "from_address": "not an address"})


@pytest.mark.parametrize(("channel", "transport"), list(MINIMAL))
def test_every_config_field_has_a_setting_and_the_same_default(channel: str, transport: str) -> None:
    _settings, _sender, config_class = MINIMAL[(channel, transport)]
    by_field = {s.field: s for s in SETTINGS if s.channel == channel and s.transport in ("", transport)}
    for f in dataclasses.fields(config_class):
        assert f.name in by_field, f"{config_class.__name__}.{f.name} has no setting"
        if f.default is not dataclasses.MISSING:
            assert by_field[f.name].default == f.default, f.name
        else:
            assert by_field[f.name].required, f.name


def test_docs_list_every_setting_with_its_default_and_every_reason_code() -> None:
    docs = DOCS.read_text(encoding="utf-8")
    for channel in ("sms", "email"):
        assert settings_markdown(channel) in docs, f"the [fallback.{channel}] table is stale: run cog -r {DOCS}"
    for reason in Reason:
        assert f"| `{reason.value}` | {'temporary' if reason.is_temporary else 'permanent'} |" in docs, (
            f"docs/fallback.md does not explain reason {reason.value}")
    assert "## Escalation" in docs

