"""An emulated GSM modem for tests: an AT-command state machine in a thread behind a pty (or a TCP port),
plus an SMS-SUBMIT decoder written from TS 23.040 independently of fallback.gsm."""

from __future__ import annotations

import collections
import os
import select
import socket
import threading
import time
from dataclasses import dataclass

# TS 23.038 default alphabet, row by row (16 per row); "\x1b" is the escape to the extension table.
_ROWS = [
    "@£$¥èéùìòÇ\nØø\rÅå",
    "Δ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ",
    " !\"#¤%&'()*+,-./",
    "0123456789:;<=>?",
    "¡ABCDEFGHIJKLMNO",
    "PQRSTUVWXYZÄÖÑÜ§",
    "¿abcdefghijklmno",
    "pqrstuvwxyzäöñüà",
]
BASIC = "".join(_ROWS)
EXTENSION = {0x0A: "\f", 0x14: "^", 0x28: "{", 0x29: "}", 0x2F: "\\", 0x3C: "[", 0x3D: "~", 0x3E: "]",
             0x40: "|", 0x65: "€"}
assert len(BASIC) == 128


@dataclass(frozen=True)
class DecodedSubmit:
    smsc: str
    number: str
    dcs: int
    validity: int | None
    status_report: bool
    concat: tuple[int, int, int] | None  # (reference, total, sequence)
    text: str


def _digits(semi_octets: bytes, count: int) -> str:
    out = "".join(f"{b & 0x0F:X}{b >> 4:X}" for b in semi_octets)
    return out[:count]


def decode_submit(pdu_hex: str) -> DecodedSubmit:
    data = bytes.fromhex(pdu_hex)
    sca_len = data[0]
    smsc = ""
    if sca_len:
        smsc = "+" + _digits(data[2:1 + sca_len], (sca_len - 1) * 2).rstrip("F")
    tpdu = data[1 + sca_len:]
    first = tpdu[0]
    assert first & 0x03 == 0x01, "not an SMS-SUBMIT"
    vpf = (first >> 3) & 0x03
    da_digits = tpdu[2]
    da_type = tpdu[3]
    da_octets = (da_digits + 1) // 2
    number = _digits(tpdu[4:4 + da_octets], da_digits)
    if da_type == 0x91:
        number = "+" + number
    pos = 4 + da_octets
    dcs = tpdu[pos + 1]
    pos += 2
    validity = None
    if vpf == 2:
        validity = tpdu[pos]
        pos += 1
    elif vpf in (1, 3):
        pos += 7
    udl = tpdu[pos]
    ud = tpdu[pos + 1:]
    concat = None
    header_octets = 0
    if first & 0x40:
        udhl = ud[0]
        header_octets = udhl + 1
        i = 1
        while i < header_octets:
            iei, length = ud[i], ud[i + 1]
            if iei == 0x00:
                concat = (ud[i + 2], ud[i + 3], ud[i + 4])
            i += 2 + length
    if dcs & 0x0C == 0x08:
        text = ud[header_octets:udl].decode("utf-16-be")
    else:
        as_int = int.from_bytes(ud, "little")
        skip = -(-header_octets * 8 // 7)
        septets = [(as_int >> (7 * i)) & 0x7F for i in range(skip, udl)]
        chars, escaped = [], False
        for s in septets:
            if escaped:
                chars.append(EXTENSION.get(s, " "))
                escaped = False
            elif s == 0x1B:
                escaped = True
            else:
                chars.append(BASIC[s])
        text = "".join(chars)
    return DecodedSubmit(smsc, number, dcs, validity, bool(first & 0x20), concat, text)


def join_parts(pdus: list[str]) -> str:
    """The text of a message from its SMS-SUBMITs, put in order by their concatenation headers."""
    decoded = [decode_submit(p) for p in pdus]
    if len(decoded) == 1 and decoded[0].concat is None:
        return decoded[0].text
    references = {d.concat[0] for d in decoded if d.concat}
    assert len(references) == 1 and all(d.concat for d in decoded), "parts of different messages"
    totals = {d.concat[1] for d in decoded if d.concat}
    assert totals == {len(decoded)}, f"header says {totals} parts, got {len(decoded)}"
    return "".join(d.text for d in sorted(decoded, key=lambda d: d.concat[2] if d.concat else 0))


class EmulatedModem:
    """Answers AT commands like a GSM modem in PDU mode. Tell it what to do next through its fields:
    `cms_errors` (codes for the next AT+CMGS answers), `silent` (swallow everything), `pin`."""

    def __init__(self, pin: str | None = None) -> None:
        self.pin = pin
        self.pin_ok = pin is None
        self.echo = True
        self.pdu_mode = False
        self.silent = False
        self.cms_errors: collections.deque[int] = collections.deque()
        self.pdus: list[str] = []
        self.commands: list[str] = []
        self.opened = 0  # how many times a client connected / reset with ATZ
        self._mr = 0
        self._line = bytearray()
        self._awaiting_pdu: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- transport, overridden by the pty and TCP flavours ---------------------------------------
    def _readable_fds(self) -> list[int]:
        raise NotImplementedError

    def _read(self, fd: int) -> bytes:
        raise NotImplementedError

    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> EmulatedModem:
        self._thread = threading.Thread(target=self._run, name="emulated-modem", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def received_pdus(self) -> list[str]:
        with self._lock:
            return list(self.pdus)

    def _run(self) -> None:
        while not self._stop.is_set():
            fds = self._readable_fds()
            if not fds:
                time.sleep(0.01)
                continue
            readable, _, _ = select.select(fds, [], [], 0.05)
            for fd in readable:
                try:
                    data = self._read(fd)
                except OSError:
                    data = b""
                if data:
                    self._feed(data)

    # -- the AT state machine ----------------------------------------------------------------------
    def _say(self, text: str) -> None:
        if not self.silent:
            self._write(text.encode())

    def _feed(self, data: bytes) -> None:
        if self.silent:
            return
        for byte in data:
            if self._awaiting_pdu is not None:
                if byte == 0x1A:
                    self._finish_pdu(self._line.decode("ascii", "replace"))
                    self._line.clear()
                elif byte == 0x1B:
                    self._awaiting_pdu = None
                    self._line.clear()
                    self._say("\r\nOK\r\n")
                elif byte not in (0x0D, 0x0A):
                    self._line.append(byte)
                continue
            if byte == 0x1B:
                self._line.clear()
            elif byte == 0x0D:
                line = self._line.decode("ascii", "replace").strip()
                self._line.clear()
                if line:
                    if self.echo:
                        self._write(line.encode() + b"\r")
                    self._command(line)
            elif byte != 0x0A:
                self._line.append(byte)

    def _command(self, line: str) -> None:
        self.commands.append(line)
        cmd = line.upper()
        if cmd in ("AT", "ATE1"):
            self.echo = self.echo or cmd == "ATE1"
            self._say("\r\nOK\r\n")
        elif cmd == "ATZ":
            self.echo, self.pdu_mode = True, False
            self.opened += 1
            self._say("\r\nOK\r\n")
        elif cmd == "ATE0":
            self.echo = False
            self._say("\r\nOK\r\n")
        elif cmd == "AT+CMEE=1":
            self._say("\r\nOK\r\n")
        elif cmd == "AT+CPIN?":
            self._say("\r\n+CPIN: READY\r\n\r\nOK\r\n" if self.pin_ok else "\r\n+CPIN: SIM PIN\r\n\r\nOK\r\n")
        elif cmd.startswith("AT+CPIN="):
            if line.split("=", 1)[1].strip('"') == self.pin:
                self.pin_ok = True
                self._say("\r\nOK\r\n")
            else:
                self._say("\r\n+CME ERROR: 16\r\n")
        elif cmd in ("AT+CMGF=0", "AT+CMGF=1"):
            self.pdu_mode = cmd.endswith("0")
            self._say("\r\nOK\r\n")
        elif cmd.startswith("AT+CMGS="):
            if not self.pin_ok:
                self._say("\r\n+CMS ERROR: 311\r\n")
            elif not self.pdu_mode:
                self._say("\r\n+CMS ERROR: 305\r\n")
            else:
                self._awaiting_pdu = int(cmd.split("=", 1)[1])
                self._say("\r\n> ")
        else:
            self._say("\r\nERROR\r\n")

    def _finish_pdu(self, pdu_hex: str) -> None:
        expected, self._awaiting_pdu = self._awaiting_pdu, None
        try:
            data = bytes.fromhex(pdu_hex)
            length_ok = len(data) - 1 - data[0] == expected
        except ValueError:
            length_ok = False
        if not length_ok:
            self._say("\r\n+CMS ERROR: 304\r\n")
            return
        if self.cms_errors:
            self._say(f"\r\n+CMS ERROR: {self.cms_errors.popleft()}\r\n")
            return
        with self._lock:
            self.pdus.append(pdu_hex)
        self._mr = (self._mr + 1) % 256
        self._say(f"\r\n+CMGS: {self._mr}\r\n\r\nOK\r\n")


class PtyModem(EmulatedModem):
    """The modem behind a pseudo-terminal; `port` is the device path a serial library opens."""

    def __init__(self, pin: str | None = None) -> None:
        super().__init__(pin)
        self._master, self._slave = os.openpty()
        self.port = os.ttyname(self._slave)

    def _readable_fds(self) -> list[int]:
        return [self._master]

    def _read(self, fd: int) -> bytes:
        return os.read(fd, 4096)

    def _write(self, data: bytes) -> None:
        os.write(self._master, data)

    def stop(self) -> None:
        super().stop()
        os.close(self._master)
        os.close(self._slave)


class TcpModem(EmulatedModem):
    """The modem behind a TCP port on 127.0.0.1, as a serial-over-IP adapter offers it (socket://)."""

    def __init__(self, pin: str | None = None) -> None:
        super().__init__(pin)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = f"socket://127.0.0.1:{self._server.getsockname()[1]}"
        self._conn: socket.socket | None = None

    def _readable_fds(self) -> list[int]:
        return [self._server.fileno()] + ([self._conn.fileno()] if self._conn else [])

    def _read(self, fd: int) -> bytes:
        if fd == self._server.fileno():
            if self._conn is not None:
                self._conn.close()
            self._conn, _ = self._server.accept()
            self.echo, self.pdu_mode = True, False
            return b""
        assert self._conn is not None
        data = self._conn.recv(4096)
        if not data:
            self._conn.close()
            self._conn = None
        return data

    def _write(self, data: bytes) -> None:
        if self._conn is not None:
            self._conn.sendall(data)

    def stop(self) -> None:
        super().stop()
        if self._conn is not None:
            self._conn.close()
        self._server.close()
