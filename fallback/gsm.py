"""SMS text encoding as pure functions: GSM 7-bit or UCS-2, concatenated parts, SMS-SUBMIT PDUs.

Follows 3GPP TS 23.038 (alphabet) and TS 23.040 (SMS-SUBMIT, concatenation UDH with an 8-bit
reference). Nothing here does I/O, so it is tested against published PDUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fallback.base import Notice, PermanentFailure, Reason, normalize_phone

Encoding = Literal["gsm7", "ucs2"]

# TS 23.038 default alphabet, index = septet value. 0x1B is the escape to the extension table.
GSM7_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = {"\f": 0x0A, "^": 0x14, "{": 0x28, "}": 0x29, "\\": 0x2F, "[": 0x3C, "~": 0x3D, "]": 0x3E,
                  "|": 0x40, "€": 0x65}
ESCAPE = 0x1B
_BASIC_INDEX = {ch: i for i, ch in enumerate(GSM7_BASIC) if i != ESCAPE}

# Capacity of one SMS: 140 octets of user data. With the 6-octet concatenation header, 134 remain.
GSM7_SINGLE_SEPTETS = 160
GSM7_PART_SEPTETS = 153
UCS2_SINGLE_OCTETS = 140
UCS2_PART_OCTETS = 134
MAX_PARTS = 255
DCS = {"gsm7": 0x00, "ucs2": 0x08}


@dataclass(frozen=True)
class SmsParts:
    """A text cut into SMS payloads. For gsm7 each chunk is unpacked septets (one per byte, the form
    SMPP carries); for ucs2 it is UTF-16BE octets. More than one chunk means concatenation is needed."""

    encoding: Encoding
    chunks: tuple[bytes, ...]

    @property
    def is_concatenated(self) -> bool:
        return len(self.chunks) > 1


def is_gsm7(text: str) -> bool:
    """True when every character is in the default alphabet or its extension table."""
    return all(ch in _BASIC_INDEX or ch in GSM7_EXTENSION for ch in text)


def encode_gsm7(text: str) -> bytes:
    """Unpacked septets (extension characters become ESC + code). Raises ValueError if not GSM 7-bit."""
    out = bytearray()
    for ch in text:
        if ch in _BASIC_INDEX:
            out.append(_BASIC_INDEX[ch])
        elif ch in GSM7_EXTENSION:
            out += bytes((ESCAPE, GSM7_EXTENSION[ch]))
        else:
            raise ValueError(f"character U+{ord(ch):04X} is not in the GSM 7-bit alphabet")
    return bytes(out)


def pack_septets(septets: bytes, skip_bits: int = 0) -> bytes:
    """Pack 7-bit values LSB first into octets, starting `skip_bits` into the first octet."""
    acc, nbits, out = 0, skip_bits, bytearray()
    for septet in septets:
        acc |= (septet & 0x7F) << nbits
        nbits += 7
        while nbits >= 8:
            out.append(acc & 0xFF)
            acc >>= 8
            nbits -= 8
    if nbits:
        out.append(acc & 0xFF)
    return bytes(out)


def split_text(text: str) -> SmsParts:
    """Encode `text` (GSM 7-bit when it fits the alphabet, else UCS-2) and cut it into parts.
    A cut never separates an escape from its character nor the halves of a surrogate pair."""
    encoding: Encoding
    if is_gsm7(text):
        units = [encode_gsm7(ch) for ch in text]
        single, part, encoding = GSM7_SINGLE_SEPTETS, GSM7_PART_SEPTETS, "gsm7"
    else:
        units = [ch.encode("utf-16-be") for ch in text]
        single, part, encoding = UCS2_SINGLE_OCTETS, UCS2_PART_OCTETS, "ucs2"
    whole = b"".join(units)
    if len(whole) <= single:
        return SmsParts(encoding, (whole,))
    chunks: list[bytes] = []
    current = bytearray()
    for unit in units:
        if len(current) + len(unit) > part:
            chunks.append(bytes(current))
            current = bytearray()
        current += unit
    chunks.append(bytes(current))
    return SmsParts(encoding, tuple(chunks))


def fit_text(text: str, max_parts: int) -> str:
    """`text` if it fits in `max_parts` SMS, else its longest prefix that does with an ellipsis added
    ("..." keeps a GSM text in 7-bit; "…" is used when the text needs UCS-2 anyway)."""
    if len(split_text(text).chunks) <= max_parts:
        return text
    ellipsis = "..." if is_gsm7(text) else "…"
    lo, hi = 0, len(text)  # longest prefix length n with text[:n] + ellipsis fitting: binary search
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(split_text(text[:mid].rstrip() + ellipsis).chunks) <= max_parts:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + ellipsis


def concat_udh(reference: int, total: int, sequence: int) -> bytes:
    """User data header for part `sequence` of `total` (IEI 0x00, 8-bit reference)."""
    return bytes((0x05, 0x00, 0x03, reference & 0xFF, total, sequence))


def encode_semi_octets(digits: str) -> bytes:
    """BCD digits, low nibble first, padded with F: "4670" -> 0x64 0x07."""
    if len(digits) % 2:
        digits += "F"
    return bytes(int(digits[i + 1] + digits[i], 16) for i in range(0, len(digits), 2))


def encode_destination(number: str) -> bytes:
    """TP-DA for an E.164 number: digit count, type 0x91 (international, ISDN), semi-octets."""
    digits = number.lstrip("+")
    return bytes((len(digits), 0x91)) + encode_semi_octets(digits)


def encode_smsc(number: str) -> bytes:
    """The SMSC address that precedes the TPDU; empty means "the one stored on the SIM" (0x00)."""
    if not number:
        return b"\x00"
    body = b"\x91" + encode_semi_octets(number.lstrip("+"))
    return bytes((len(body),)) + body


def encode_validity(minutes: int) -> int:
    """TP-VP relative format (TS 23.040 9.2.3.12.1), rounded up to the next step it can express."""
    if minutes <= 0:
        raise ValueError("validity must be positive")
    if minutes <= 720:
        return max(0, -(-minutes // 5) - 1)
    if minutes <= 1440:
        return 143 + -(-(minutes - 720) // 30)
    if minutes <= 30 * 1440:
        return 166 + max(2, -(-minutes // 1440))
    return min(255, 192 + -(-minutes // (7 * 1440)))


@dataclass(frozen=True)
class SubmitPdu:
    """One SMS-SUBMIT as the modem wants it: hex of SMSC address + TPDU, and the TPDU length for AT+CMGS."""

    hex: str
    tpdu_length: int


def encode_submit(number: str, chunk: bytes, encoding: Encoding, *, udh: bytes = b"", smsc: str = "",
                  validity_min: int = 0, status_report: bool = False) -> SubmitPdu:
    """One SMS-SUBMIT PDU for an E.164 `number` carrying `chunk` (see `SmsParts`)."""
    first = 0x01  # TP-MTI = SMS-SUBMIT, TP-MR chosen by the phone
    if validity_min:
        first |= 0x10  # TP-VPF relative
    if status_report:
        first |= 0x20
    if udh:
        first |= 0x40  # TP-UDHI
    if encoding == "gsm7":
        header_septets = -(-len(udh) * 8 // 7)
        # Pack as if the header were septets, then overwrite its octets: the text starts on a septet boundary.
        packed = pack_septets(bytes(header_septets) + chunk)
        user_data = udh + packed[len(udh):]
        udl = header_septets + len(chunk)
    else:
        user_data = udh + chunk
        udl = len(user_data)
    tpdu = bytes((first, 0x00)) + encode_destination(number) + bytes((0x00, DCS[encoding]))
    if validity_min:
        tpdu += bytes((encode_validity(validity_min),))
    tpdu += bytes((udl,)) + user_data
    return SubmitPdu((encode_smsc(smsc) + tpdu).hex().upper(), len(tpdu))


def encode_message(number: str, parts: SmsParts, reference: int, *, smsc: str = "", validity_min: int = 0,
                   status_report: bool = False) -> list[SubmitPdu]:
    """Every SMS-SUBMIT for a message; concatenated parts share `reference` (0-255)."""
    total = len(parts.chunks)
    if total > MAX_PARTS:
        raise ValueError(f"{total} parts; concatenation allows {MAX_PARTS}")
    return [
        encode_submit(number, chunk, parts.encoding, udh=concat_udh(reference, total, seq) if total > 1 else b"",
                      smsc=smsc, validity_min=validity_min, status_report=status_report)
        for seq, chunk in enumerate(parts.chunks, start=1)
    ]


@dataclass(frozen=True)
class PreparedSms:
    """A notice checked and encoded: E.164 number, the text as sent (cut to fit), its parts."""

    number: str
    text: str
    parts: SmsParts


def prepare_sms(notice: Notice, max_parts: int, default_country_code: str = "") -> PreparedSms:
    """What every SMS transport does first; a bad number or an empty text is a PermanentFailure."""
    number = normalize_phone(notice.to, default_country_code)
    if not notice.text.strip():
        raise PermanentFailure(Reason.INVALID_MESSAGE, "empty text")
    text = fit_text(notice.text, max_parts)
    return PreparedSms(number, text, split_text(text))
