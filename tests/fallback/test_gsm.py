"""SMS encoding as pure functions, checked against published and hand-worked PDUs."""

from __future__ import annotations

import pytest

from fallback import gsm
from tests.fallback.gsm_modem import decode_submit, join_parts


def test_seven_bit_pdu_matches_the_published_hellohello_example() -> None:
    # The classic SMS-SUBMIT example: "hellohello" to +46708251358, relative validity 0xAA (4 days).
    [pdu] = gsm.encode_message("+46708251358", gsm.split_text("hellohello"), 0, validity_min=4 * 1440)
    assert pdu.hex == "0011000B916407281553F80000AA0AE8329BFD4697D9EC37"
    assert pdu.tpdu_length == 23


def test_ucs2_pdu_carries_utf16_octets() -> None:
    [pdu] = gsm.encode_message("+4915112345678", gsm.split_text("Привет"), 0)
    assert pdu.hex == "0001000D91945111325476F800080C" + "041F04400438043204350442"
    assert pdu.tpdu_length == 26


def test_concatenated_seven_bit_part_starts_text_on_a_septet_boundary() -> None:
    # UDH 05 00 03 CC 02 01 is 48 bits; one fill bit, then "H" (0x48) << 1 = 0x90, then "i" (0x69).
    pdu = gsm.encode_submit("+4915112345678", gsm.encode_gsm7("Hi"), "gsm7", udh=gsm.concat_udh(0xCC, 2, 1))
    assert pdu.hex == "0041000D91945111325476F8000009" + "050003CC0201" + "9069"


def test_smsc_address_precedes_the_tpdu() -> None:
    [pdu] = gsm.encode_message("+4915112345678", gsm.split_text("x"), 0, smsc="+491710760000")  # 12 digits: 6 octets + type = 07
    assert pdu.hex.startswith("0791" + "947101670000")
    assert len(bytes.fromhex(pdu.hex)) - 8 == pdu.tpdu_length


def test_extension_characters_stay_seven_bit_as_escape_pairs() -> None:
    assert gsm.is_gsm7("Preis: 5 € [netto] {x} ~ ^ | \\")
    assert gsm.encode_gsm7("€[") == bytes((0x1B, 0x65, 0x1B, 0x3C))
    parts = gsm.split_text("€" * 80)
    assert parts.encoding == "gsm7" and [len(c) for c in parts.chunks] == [160]


def test_text_outside_the_alphabet_uses_ucs2() -> None:
    assert not gsm.is_gsm7("Grüße, ç")  # ç is not in the default alphabet (only Ç is)
    assert gsm.split_text("Grüße, ç").encoding == "ucs2"
    with pytest.raises(ValueError):
        gsm.encode_gsm7("😀")


@pytest.mark.parametrize(("text", "encoding", "sizes"), [
    ("a" * 160, "gsm7", [160]),
    ("a" * 161, "gsm7", [153, 8]),
    ("a" * 306, "gsm7", [153, 153]),
    ("ж" * 70, "ucs2", [140]),
    ("ж" * 71, "ucs2", [134, 8]),
])
def test_texts_split_at_153_septets_or_67_ucs2_characters(text: str, encoding: str, sizes: list[int]) -> None:
    parts = gsm.split_text(text)
    assert (parts.encoding, [len(c) for c in parts.chunks]) == (encoding, sizes)


def test_a_split_never_separates_an_escape_from_its_character() -> None:
    parts = gsm.split_text("a" * 152 + "€" + "b" * 10)
    assert [len(c) for c in parts.chunks] == [152, 12]


def test_a_split_never_separates_a_surrogate_pair() -> None:
    parts = gsm.split_text("ж" * 66 + "😀" + "ж" * 10)
    assert [len(c) for c in parts.chunks] == [132, 24]
    assert b"".join(parts.chunks).decode("utf-16-be") == "ж" * 66 + "😀" + "ж" * 10


def test_long_texts_round_trip_through_concatenated_pdus() -> None:
    for text in ("The quick brown fox [€5] " * 20, "Сервер недоступен — проверьте VPN. " * 8):
        pdus = gsm.encode_message("+4915112345678", gsm.split_text(text), 42)
        assert len(pdus) > 1
        assert {decode_submit(p.hex).concat[0] for p in pdus} == {42}
        assert join_parts([p.hex for p in pdus]) == text


def test_fit_text_cuts_with_an_ellipsis_that_keeps_the_encoding() -> None:
    assert gsm.fit_text("short", 1) == "short"
    cut = gsm.fit_text("word " * 100, 2)
    assert cut.endswith("...") and len(gsm.split_text(cut).chunks) == 2 and gsm.is_gsm7(cut)
    cut = gsm.fit_text("слово " * 100, 1)
    assert cut.endswith("…") and len(gsm.split_text(cut).chunks) == 1


@pytest.mark.parametrize(("minutes", "vp"), [(5, 0), (60, 11), (720, 143), (750, 144), (1440, 167),
                                              (2 * 1440, 168), (4 * 1440, 170), (30 * 1440, 196),
                                              (35 * 1440, 197), (10**7, 255)])
def test_validity_period_uses_the_relative_format(minutes: int, vp: int) -> None:
    assert gsm.encode_validity(minutes) == vp
