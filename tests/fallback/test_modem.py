"""The modem sender against an emulated GSM modem on a pty (and on TCP via pyserial's socket:// URL)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import pytest_asyncio

from fallback import Notice, PermanentFailure, TemporaryFailure
from fallback.modem import ModemConfig, ModemSender
from tests.fallback.gsm_modem import PtyModem, TcpModem, decode_submit, join_parts

NUMBER = "+4915112345678"
pytestmark = pytest.mark.asyncio


def sms(text: str, to: str = NUMBER) -> Notice:
    return Notice("sms", to, text, reference="push1:device1")


@pytest.fixture
def modem() -> Iterator[PtyModem]:
    m = PtyModem().start()
    yield m
    m.stop()


@pytest_asyncio.fixture
async def sender(modem: PtyModem):
    s = ModemSender(ModemConfig(port=modem.port, command_timeout_s=0.5, send_timeout_s=0.5, validity_min=0))
    yield s
    await s.aclose()


async def test_seven_bit_text_reaches_the_modem_as_one_pdu(sender: ModemSender, modem: PtyModem) -> None:
    receipt = await sender.send(sms("Server db1 down since 10:42 [ticket #4711] - 5 €/min"))
    [pdu] = modem.received_pdus()
    decoded = decode_submit(pdu)
    assert (decoded.number, decoded.dcs, decoded.concat) == (NUMBER, 0x00, None)
    assert decoded.text == "Server db1 down since 10:42 [ticket #4711] - 5 €/min"
    assert (receipt.transport, receipt.parts, receipt.message_ids) == ("modem", 1, ("1",))
    assert modem.commands[:6] == ["AT", "ATZ", "ATE0", "AT+CMEE=1", "AT+CPIN?", "AT+CMGF=0"]


async def test_long_ucs2_text_arrives_as_concatenated_parts(sender: ModemSender, modem: PtyModem) -> None:
    text = "Сервер db1 недоступен с 10:42. Дежурный, пожалуйста, проверьте VPN-шлюз и перезапустите сервис. " * 2
    receipt = await sender.send(sms(text))
    pdus = modem.received_pdus()
    assert len(pdus) == receipt.parts == 3  # 196 characters, 67 per part
    decoded = [decode_submit(p) for p in pdus]
    assert {d.dcs for d in decoded} == {0x08}
    assert [d.concat[1:] for d in decoded if d.concat] == [(3, 1), (3, 2), (3, 3)]
    assert join_parts(pdus) == text
    assert receipt.message_ids == ("1", "2", "3")


async def test_sends_are_serialized_on_one_modem(sender: ModemSender, modem: PtyModem) -> None:
    texts = [f"message {i} " + "x" * 200 for i in range(4)]  # two parts each
    await asyncio.gather(*(sender.send(sms(t)) for t in texts))
    pdus = modem.received_pdus()
    assert len(pdus) == 8
    # parts of one message are never interleaved with another's
    assert sorted(join_parts(pdus[i:i + 2]) for i in range(0, 8, 2)) == sorted(texts)


@pytest.mark.parametrize(("code", "kind", "reason"), [
    (1, PermanentFailure, "invalid_recipient"),
    (28, PermanentFailure, "invalid_recipient"),
    (21, PermanentFailure, "rejected"),
    (38, TemporaryFailure, "network"),
    (42, TemporaryFailure, "network"),
    (331, TemporaryFailure, "network"),
    (332, TemporaryFailure, "timeout"),
    (330, PermanentFailure, "config"),
    (500, TemporaryFailure, "device"),
])
async def test_cms_errors_are_classified(sender: ModemSender, modem: PtyModem, code: int, kind: type,
                                         reason: str) -> None:
    modem.cms_errors.append(code)
    with pytest.raises(kind) as caught:
        await sender.send(sms("hello"))
    assert caught.value.reason == reason
    assert f"+CMS ERROR: {code}" in caught.value.detail
    await sender.send(sms("the port stays usable"))
    assert [decode_submit(p).text for p in modem.received_pdus()] == ["the port stays usable"]


async def test_silent_modem_is_a_temporary_failure_after_the_timeout_and_recovers(
        sender: ModemSender, modem: PtyModem) -> None:
    await sender.send(sms("first"))
    modem.silent = True
    started = time.monotonic()
    with pytest.raises(TemporaryFailure) as caught:
        await sender.send(sms("lost"))
    assert caught.value.reason == "timeout"
    assert 0.4 < time.monotonic() - started < 3
    modem.silent = False
    opened = modem.opened
    await sender.send(sms("after recovery"))
    assert modem.opened == opened + 1  # the port was reopened and the modem initialised again
    assert [decode_submit(p).text for p in modem.received_pdus()] == ["first", "after recovery"]


async def test_sim_pin_is_entered_when_the_sim_asks() -> None:
    modem = PtyModem(pin="4711").start()
    sender = ModemSender(ModemConfig(port=modem.port, pin="4711", command_timeout_s=0.5))
    try:
        await sender.send(sms("unlocked"))
        assert 'AT+CPIN="4711"' in modem.commands
        assert len(modem.received_pdus()) == 1
    finally:
        await sender.aclose()
        modem.stop()


@pytest.mark.parametrize("pin", ["", "0000"])
async def test_missing_or_wrong_pin_is_a_permanent_config_failure(pin: str) -> None:
    modem = PtyModem(pin="4711").start()
    sender = ModemSender(ModemConfig(port=modem.port, pin=pin, command_timeout_s=0.5))
    try:
        with pytest.raises(PermanentFailure) as caught:
            await sender.send(sms("locked"))
        assert caught.value.reason == "config"
        assert modem.received_pdus() == []
    finally:
        await sender.aclose()
        modem.stop()


async def test_missing_port_is_a_temporary_failure(tmp_path) -> None:
    sender = ModemSender(ModemConfig(port=str(tmp_path / "ttyUSB9"), command_timeout_s=0.5))
    with pytest.raises(TemporaryFailure) as caught:
        await sender.send(sms("nowhere"))
    assert caught.value.reason == "unreachable"


async def test_invalid_number_is_refused_before_the_modem_is_touched(sender: ModemSender, modem: PtyModem) -> None:
    with pytest.raises(PermanentFailure) as caught:
        await sender.send(sms("hello", to="0151 1234"))
    assert caught.value.reason == "invalid_recipient"
    assert modem.commands == []


async def test_modem_behind_a_tcp_serial_adapter_via_socket_url() -> None:
    modem = TcpModem().start()
    sender = ModemSender(ModemConfig(port=modem.port, command_timeout_s=0.5, smsc="+491710760000"))
    try:
        await sender.send(sms("over TCP"))
        [pdu] = modem.received_pdus()
        decoded = decode_submit(pdu)
        assert (decoded.text, decoded.smsc, decoded.validity) == ("over TCP", "+491710760000", 167)
    finally:
        await sender.aclose()
        modem.stop()


async def test_numbers_and_texts_stay_out_of_info_logs(sender: ModemSender, caplog) -> None:
    caplog.set_level("INFO", logger="fallback")
    await sender.send(sms("secret body"))
    info = [r.getMessage() for r in caplog.records if r.levelname != "DEBUG"]
    assert any("sms accepted transport=modem ref=push1:device1 to=+4915******678" in m for m in info)
    assert not any(NUMBER in m or "secret body" in m for m in info)
