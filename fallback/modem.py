"""SMS through a GSM modem on a serial port: AT commands in PDU mode (TS 27.005), via pyserial.

The port is a device path (/dev/ttyUSB0) or a pyserial URL (socket://host:port, rfc2217://...). Blocking
serial I/O runs in a worker thread; one modem does one thing at a time, so sends are serialized.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import threading
import time
from dataclasses import dataclass

import serial

from fallback import gsm
from fallback.base import (
    FallbackError,
    Notice,
    PermanentFailure,
    Reason,
    Receipt,
    SettingsError,
    TemporaryFailure,
    mask_phone,
    normalize_phone,
)

log = logging.getLogger(__name__)

CTRL_Z = b"\x1a"
ESC = b"\x1b"
_FINAL_ERROR = re.compile(r"^\+(CMS|CME) ERROR:\s*(.+)$")

# +CMS ERROR codes (TS 24.011 annex E / TS 27.005 3.2.5) -> (temporary?, reason). Unlisted codes below
# 128 are network refusals of this message (permanent); unlisted codes from 128 up are modem-side
# conditions (temporary).
CMS_ERRORS: dict[int, tuple[bool, Reason]] = {
    1: (False, Reason.INVALID_RECIPIENT),  # unassigned (unallocated) number
    8: (False, Reason.BARRED),  # operator determined barring
    10: (False, Reason.BARRED),  # call barred
    21: (False, Reason.REJECTED),  # short message transfer rejected
    22: (True, Reason.BUSY),  # memory capacity exceeded
    27: (True, Reason.NETWORK),  # destination out of service
    28: (False, Reason.INVALID_RECIPIENT),  # unidentified subscriber
    29: (False, Reason.REJECTED),  # facility rejected
    30: (False, Reason.INVALID_RECIPIENT),  # unknown subscriber
    38: (True, Reason.NETWORK),  # network out of order
    41: (True, Reason.NETWORK),  # temporary failure
    42: (True, Reason.NETWORK),  # congestion
    47: (True, Reason.NETWORK),  # resources unavailable
    50: (False, Reason.BARRED),  # requested facility not subscribed
    69: (False, Reason.REJECTED),  # requested facility not implemented
    81: (True, Reason.NETWORK),  # invalid short message transfer reference value
    95: (False, Reason.INVALID_MESSAGE),  # invalid message, unspecified
    96: (False, Reason.INVALID_MESSAGE),  # invalid mandatory information
    97: (False, Reason.INVALID_MESSAGE),  # message type non-existent
    98: (True, Reason.NETWORK),  # message not compatible with protocol state
    99: (False, Reason.INVALID_MESSAGE),  # information element non-existent
    111: (True, Reason.NETWORK),  # protocol error, unspecified
    127: (True, Reason.NETWORK),  # interworking, unspecified
    300: (True, Reason.DEVICE),  # ME failure
    301: (True, Reason.BUSY),  # SMS service of ME reserved
    302: (True, Reason.BUSY),  # operation not allowed (often: modem still registering)
    303: (False, Reason.CONFIG),  # operation not supported
    304: (False, Reason.INVALID_MESSAGE),  # invalid PDU mode parameter
    305: (False, Reason.INVALID_MESSAGE),  # invalid text mode parameter
    310: (True, Reason.DEVICE),  # SIM not inserted
    311: (False, Reason.CONFIG),  # SIM PIN required
    312: (False, Reason.CONFIG),  # PH-SIM PIN required
    313: (True, Reason.DEVICE),  # SIM failure
    314: (True, Reason.BUSY),  # SIM busy
    315: (True, Reason.DEVICE),  # SIM wrong
    316: (False, Reason.CONFIG),  # SIM PUK required
    320: (True, Reason.DEVICE),  # memory failure
    322: (True, Reason.BUSY),  # memory full
    330: (False, Reason.CONFIG),  # SMSC address unknown
    331: (True, Reason.NETWORK),  # no network service
    332: (True, Reason.TIMEOUT),  # network timeout
    500: (True, Reason.DEVICE),  # unknown error
}

# +CME ERROR codes (TS 27.007 9.2) a modem may give instead during init or send.
CME_ERRORS: dict[int, tuple[bool, Reason]] = {
    3: (True, Reason.BUSY),  # operation not allowed
    10: (True, Reason.DEVICE),  # SIM not inserted
    11: (False, Reason.CONFIG),  # SIM PIN required
    12: (False, Reason.CONFIG),  # SIM PUK required
    13: (True, Reason.DEVICE),  # SIM failure
    14: (True, Reason.BUSY),  # SIM busy
    16: (False, Reason.CONFIG),  # incorrect password (wrong PIN)
    30: (True, Reason.NETWORK),  # no network service
    31: (True, Reason.TIMEOUT),  # network timeout
}


def classify_modem_error(kind: str, code: str) -> FallbackError:
    """A `+CMS ERROR: n` / `+CME ERROR: n` / plain `ERROR` as our failure."""
    detail = f"+{kind} ERROR: {code}" if kind else "ERROR"
    if not code.isdigit():
        return TemporaryFailure(Reason.DEVICE, detail)
    n = int(code)
    table = CMS_ERRORS if kind == "CMS" else CME_ERRORS
    if n in table:
        temporary, reason = table[n]
    elif kind == "CMS" and n < 128:
        temporary, reason = False, Reason.REJECTED
    else:
        temporary, reason = True, Reason.DEVICE
    return TemporaryFailure(reason, detail) if temporary else PermanentFailure(reason, detail)


@dataclass(frozen=True)
class ModemConfig:
    """Settings of the `modem` transport; `docs/fallback.md` and `fallback.transports.SETTINGS` explain each."""

    port: str
    baudrate: int = 115200
    pin: str = ""
    smsc: str = ""
    init: str = ""
    validity_min: int = 1440
    command_timeout_s: float = 10.0
    send_timeout_s: float = 60.0
    max_parts: int = 6
    default_country_code: str = ""

    def __post_init__(self) -> None:
        problems = []
        if not self.port:
            problems.append("port: required")
        if self.smsc:
            try:
                normalize_phone(self.smsc)
            except PermanentFailure as exc:
                problems.append(f"smsc: {exc.detail}")
        if self.pin and not (self.pin.isdigit() and 4 <= len(self.pin) <= 8):
            problems.append("pin: 4 to 8 digits")
        if not 1 <= self.max_parts <= gsm.MAX_PARTS:
            problems.append(f"max_parts: 1 to {gsm.MAX_PARTS}")
        if self.validity_min < 0:
            problems.append("validity_min: 0 (network default) or more")
        if self.command_timeout_s <= 0 or self.send_timeout_s <= 0:
            problems.append("command_timeout_s and send_timeout_s must be positive")
        if problems:
            raise SettingsError(problems)


class _Silent(Exception):
    """The modem said nothing within the deadline."""


class ModemSender:
    """Sends `Notice(channel="sms")` through one GSM modem."""

    transport = "modem"

    def __init__(self, config: ModemConfig) -> None:
        self.config = config
        self._port: serial.SerialBase | None = None
        self._buf = bytearray()
        self._io_lock = threading.Lock()  # the real guard: a cancelled await leaves its thread running
        self._queue_lock = asyncio.Lock()  # keeps waiting sends out of the thread pool
        self._reference = random.randrange(256)

    # -- public ----------------------------------------------------------------------------------
    async def send(self, notice: Notice) -> Receipt:
        masked = mask_phone(notice.to)
        try:
            sms = gsm.prepare_sms(notice, self.config.max_parts, self.config.default_country_code)
            masked, parts = mask_phone(sms.number), sms.parts
            self._reference = (self._reference + 1) % 256
            pdus = gsm.encode_message(sms.number, parts, self._reference, smsc=self.config.smsc,
                                      validity_min=self.config.validity_min)
            async with self._queue_lock:
                refs = await asyncio.to_thread(self._send_pdus, pdus)
        except FallbackError as exc:
            log.warning("sms refused transport=modem ref=%s to=%s reason=%s temporary=%s detail=%s",
                        notice.reference, masked, exc.reason, exc.temporary, exc.detail)
            raise
        log.info("sms accepted transport=modem ref=%s to=%s parts=%d encoding=%s mr=%s", notice.reference,
                 masked, len(pdus), parts.encoding, ",".join(refs))
        log.debug("sms text ref=%s text=%r", notice.reference, notice.text)
        return Receipt(self.transport, tuple(refs), len(pdus))

    async def aclose(self) -> None:
        await asyncio.to_thread(self._close_locked)

    # -- worker thread ---------------------------------------------------------------------------
    def _close_locked(self) -> None:
        with self._io_lock:
            self._close()

    def _close(self) -> None:
        if self._port is not None:
            try:
                self._port.close()
            except (OSError, serial.SerialException):
                pass
        self._port = None
        self._buf.clear()

    def _send_pdus(self, pdus: list[gsm.SubmitPdu]) -> list[str]:
        with self._io_lock:
            try:
                if self._port is None:
                    self._open()
                return [self._submit(pdu) for pdu in pdus]
            except _Silent as exc:
                self._close()  # its state is unknown: start afresh next time
                raise TemporaryFailure(Reason.TIMEOUT, f"modem did not answer: {exc}") from None
            except (OSError, serial.SerialException) as exc:
                self._close()
                raise TemporaryFailure(Reason.UNREACHABLE, f"modem port {self.config.port}: {exc}") from None

    def _open(self) -> None:
        config = self.config
        self._port = serial.serial_for_url(config.port, baudrate=config.baudrate, timeout=0.05,
                                           write_timeout=config.command_timeout_s)
        try:
            self._initialise()
        except BaseException:
            self._close()  # half-initialised: the next send starts from the beginning
            raise
        log.info("modem ready port=%s", config.port)

    def _initialise(self) -> None:
        config = self.config
        assert self._port is not None
        self._buf.clear()
        self._port.reset_input_buffer()
        # ESC ends a PDU prompt a previous session may have left open; the AT after it absorbs the noise.
        self._write(ESC + b"AT\r")
        try:
            self._final(time.monotonic() + config.command_timeout_s)
        except FallbackError:
            pass
        for command in ("ATZ", "ATE0", "AT+CMEE=1"):
            self._command(command)
        pin_state = " ".join(self._command("AT+CPIN?"))
        if "SIM PIN" in pin_state:
            if not config.pin:
                raise PermanentFailure(Reason.CONFIG, "the SIM asks for a PIN; set modem_pin")
            self._command(f'AT+CPIN="{config.pin}"', secret=True)
        elif "READY" not in pin_state:
            raise PermanentFailure(Reason.CONFIG, f"SIM is locked: {pin_state.strip() or 'no +CPIN answer'}")
        self._command("AT+CMGF=0")
        if config.init:
            self._command(config.init)

    def _write(self, data: bytes) -> None:
        assert self._port is not None
        self._port.write(data)
        self._port.flush()

    def _command(self, command: str, secret: bool = False) -> list[str]:
        log.debug("modem >> %s", "AT+CPIN=***" if secret else command)
        self._write(command.encode("ascii") + b"\r")
        return self._final(time.monotonic() + self.config.command_timeout_s, echo=command)

    def _submit(self, pdu: gsm.SubmitPdu) -> str:
        command = f"AT+CMGS={pdu.tpdu_length}"
        log.debug("modem >> %s", command)
        self._write(command.encode("ascii") + b"\r")
        self._final(time.monotonic() + self.config.command_timeout_s, echo=command, until_prompt=True)
        log.debug("modem >> PDU %s", pdu.hex)
        self._write(pdu.hex.encode("ascii") + CTRL_Z)
        lines = self._final(time.monotonic() + self.config.send_timeout_s, echo=pdu.hex)
        for line in lines:
            if line.startswith("+CMGS:"):
                return line.split(":", 1)[1].strip().split(",")[0]
        return ""

    def _final(self, deadline: float, echo: str = "", until_prompt: bool = False) -> list[str]:
        """Read until OK (return the lines before it), an error (raise), or the `> ` prompt."""
        lines: list[str] = []
        while True:
            event = self._next_event(deadline)
            if event == ">":
                if until_prompt:
                    return lines
                continue
            if not event or event == echo:
                continue
            log.debug("modem << %s", event)
            if event == "OK":
                if until_prompt:
                    raise TemporaryFailure(Reason.DEVICE, "modem answered OK instead of the PDU prompt")
                return lines
            if event in ("ERROR", "NO CARRIER"):
                raise classify_modem_error("", "")
            match = _FINAL_ERROR.match(event)
            if match:
                raise classify_modem_error(match.group(1), match.group(2).strip())
            lines.append(event)

    def _next_event(self, deadline: float) -> str:
        """The next line, or ">" for the PDU prompt (which has no line end)."""
        assert self._port is not None
        while True:
            while self._buf and self._buf[0] in (0x0D, 0x0A):
                del self._buf[:1]
            if self._buf[:1] == b">":
                del self._buf[:2 if self._buf[1:2] == b" " else 1]
                return ">"
            end = next((i for i, b in enumerate(self._buf) if b in (0x0D, 0x0A)), -1)
            if end >= 0:
                line = bytes(self._buf[:end]).decode("ascii", "replace").strip()
                del self._buf[: end + 1]
                return line
            if time.monotonic() > deadline:
                if self._buf:
                    raise _Silent(f"incomplete answer {bytes(self._buf[:40])!r}")
                raise _Silent("no answer before the timeout")
            chunk = self._port.read(max(1, self._port.in_waiting))
            if chunk:
                self._buf += chunk
