"""SMS through an SMSC over SMPP 3.4 (smpplib, blocking, in one worker thread that owns the session).

The session is bound on first use and kept: enquire_link while idle, unbind on close. A dropped link is
noticed before the next submit and bound afresh; a drop in the middle of a submit is a TemporaryFailure.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import random
import select
import threading
import time
from dataclasses import dataclass
from typing import Any

import smpplib.client
import smpplib.consts as c
import smpplib.exceptions
import smpplib.smpp

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
)

log = logging.getLogger(__name__)

# command_status -> (temporary?, reason). Anything else is a permanent refusal (`rejected`).
SMPP_STATUS: dict[int, tuple[bool, Reason]] = {
    c.SMPP_ESME_RTHROTTLED: (True, Reason.THROTTLED),
    c.SMPP_ESME_RMSGQFUL: (True, Reason.BUSY),
    c.SMPP_ESME_RSYSERR: (True, Reason.SERVER_ERROR),
    c.SMPP_ESME_RSUBMITFAIL: (True, Reason.SERVER_ERROR),
    c.SMPP_ESME_RX_T_APPN: (True, Reason.SERVER_ERROR),  # ESME receiver temporary app error
    c.SMPP_ESME_RINVBNDSTS: (True, Reason.CONNECTION_LOST),  # the SMSC forgot our bind
    c.SMPP_ESME_RINVDSTADR: (False, Reason.INVALID_RECIPIENT),
    c.SMPP_ESME_RINVDSTTON: (False, Reason.INVALID_RECIPIENT),
    c.SMPP_ESME_RINVDSTNPI: (False, Reason.INVALID_RECIPIENT),
    c.SMPP_ESME_RINVSRCADR: (False, Reason.CONFIG),
    c.SMPP_ESME_RINVSRCTON: (False, Reason.CONFIG),
    c.SMPP_ESME_RINVSRCNPI: (False, Reason.CONFIG),
    c.SMPP_ESME_RINVMSGLEN: (False, Reason.INVALID_MESSAGE),
    c.SMPP_ESME_RINVESMCLASS: (False, Reason.INVALID_MESSAGE),
    c.SMPP_ESME_RBINDFAIL: (False, Reason.AUTH),
    c.SMPP_ESME_RINVPASWD: (False, Reason.AUTH),
    c.SMPP_ESME_RINVSYSID: (False, Reason.AUTH),
    c.SMPP_ESME_RINVSYSTYP: (False, Reason.AUTH),
}


def classify_status(status: int, stage: str) -> FallbackError:
    name = c.DESCRIPTIONS.get(status, "unknown status")
    detail = f"{stage}: command_status 0x{status:08X} ({name})"
    temporary, reason = SMPP_STATUS.get(status, (False, Reason.AUTH if stage == "bind" else Reason.REJECTED))
    return TemporaryFailure(reason, detail) if temporary else PermanentFailure(reason, detail)


def source_address(sender: str) -> tuple[str, int, int]:
    """(source_addr, TON, NPI): "+49..." international, digits as they are, letters alphanumeric."""
    if not sender:
        return "", c.SMPP_TON_UNK, c.SMPP_NPI_UNK
    if sender.startswith("+") and sender[1:].isdigit():
        return sender[1:], c.SMPP_TON_INTL, c.SMPP_NPI_ISDN
    if sender.isdigit():
        return sender, c.SMPP_TON_UNK, c.SMPP_NPI_ISDN
    return sender, c.SMPP_TON_ALNUM, c.SMPP_NPI_UNK


@dataclass(frozen=True)
class SmppConfig:
    """Settings of the `smpp` transport; `docs/fallback.md` and `fallback.transports.SETTINGS` explain each."""

    host: str
    system_id: str
    password: str = ""
    port: int = 2775
    system_type: str = ""
    sender: str = ""
    delivery_receipts: bool = False
    enquire_link_s: float = 30.0
    timeout_s: float = 10.0
    max_parts: int = 6
    default_country_code: str = ""

    def __post_init__(self) -> None:
        problems = []
        if not self.host:
            problems.append("host: required")
        if not self.system_id:
            problems.append("system_id: required")
        if len(self.system_id) > 15 or len(self.password) > 8:
            problems.append("system_id is at most 15 and password at most 8 characters (SMPP 3.4)")
        if self.sender and not self.sender.startswith("+") and not self.sender.isdigit() and len(self.sender) > 11:
            problems.append("sender: an alphanumeric sender is at most 11 characters")
        if not 1 <= self.max_parts <= gsm.MAX_PARTS:
            problems.append(f"max_parts: 1 to {gsm.MAX_PARTS}")
        if self.enquire_link_s <= 0 or self.timeout_s <= 0:
            problems.append("enquire_link_s and timeout_s must be positive")
        if problems:
            raise SettingsError(problems)


@dataclass
class _Job:
    number: str
    parts: gsm.SmsParts
    future: concurrent.futures.Future[list[str]]


_IDLE = _Job("", gsm.SmsParts("gsm7", ()), concurrent.futures.Future())  # "no job this tick"


class _Dropped(Exception):
    """The TCP link to the SMSC is gone."""


class SmppSender:
    """Sends `Notice(channel="sms")` to one SMSC over one bound session."""

    transport = "smpp"

    def __init__(self, config: SmppConfig) -> None:
        self.config = config
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._client: smpplib.client.Client | None = None
        self._last_io = 0.0
        self._reference = random.randrange(256)

    # -- public ----------------------------------------------------------------------------------
    async def send(self, notice: Notice) -> Receipt:
        masked = mask_phone(notice.to)
        try:
            sms = gsm.prepare_sms(notice, self.config.max_parts, self.config.default_country_code)
            masked, parts = mask_phone(sms.number), sms.parts
            job = _Job(sms.number, parts, concurrent.futures.Future())
            self._ensure_worker()
            self._jobs.put(job)
            ids = await asyncio.wrap_future(job.future)
        except FallbackError as exc:
            log.warning("sms refused transport=smpp ref=%s to=%s reason=%s temporary=%s detail=%s",
                        notice.reference, masked, exc.reason, exc.temporary, exc.detail)
            raise
        log.info("sms accepted transport=smpp ref=%s to=%s parts=%d encoding=%s message_ids=%s",
                 notice.reference, masked, len(parts.chunks), parts.encoding, ",".join(ids))
        log.debug("sms text ref=%s text=%r", notice.reference, notice.text)
        return Receipt(self.transport, tuple(ids), len(parts.chunks))

    async def aclose(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._jobs.put(None)
        await asyncio.to_thread(thread.join, self.config.timeout_s + 2)
        self._thread = None

    # -- worker thread ---------------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="fallback-smpp", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        tick = min(0.2, self.config.enquire_link_s)
        while True:
            try:
                job = self._jobs.get(timeout=tick)
            except queue.Empty:
                job = _IDLE
            if job is None:
                break
            try:
                self._service_link()
            except _Dropped as exc:
                self._drop(f"link lost while idle: {exc}")
            if job is _IDLE:
                continue
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                job.future.set_result(self._submit(job))
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine, which re-raises it
                job.future.set_exception(exc)
        self._unbind()
        while True:  # sends that raced with aclose() must not wait forever
            try:
                left = self._jobs.get_nowait()
            except queue.Empty:
                break
            if left is not None and left.future.set_running_or_notify_cancel():
                left.future.set_exception(TemporaryFailure(Reason.CONNECTION_LOST, "the sender was closed"))

    def _service_link(self) -> None:
        """Answer what the SMSC sent while we were idle, and keep the link alive with enquire_link."""
        if self._client is None:
            return
        self._drain()
        if time.monotonic() - self._last_io >= self.config.enquire_link_s:
            pdu = smpplib.smpp.make_pdu("enquire_link", client=self._client)
            self._send_pdu(pdu)
            self._await_response(pdu.sequence, "enquire_link_resp")

    def _drain(self) -> None:
        client = self._client
        assert client is not None
        while True:
            try:
                readable, _, _ = select.select([client._socket], [], [], 0)
            except (OSError, ValueError) as exc:
                raise _Dropped(str(exc)) from None
            if not readable:
                return
            self._handle(self._read_pdu())

    def _read_pdu(self) -> Any:
        assert self._client is not None
        try:
            pdu = self._client.read_pdu()
        except TimeoutError:
            raise _Dropped("no answer") from None
        except (smpplib.exceptions.ConnectionError, OSError) as exc:
            raise _Dropped(str(exc) or "closed by the SMSC") from None
        except smpplib.exceptions.PDUError as exc:
            raise _Dropped(f"broken PDU: {exc}") from None
        self._last_io = time.monotonic()
        return pdu

    def _send_pdu(self, pdu: Any) -> None:
        assert self._client is not None
        try:
            self._client.send_pdu(pdu)
        except (smpplib.exceptions.ConnectionError, OSError) as exc:
            raise _Dropped(str(exc) or "send failed") from None
        self._last_io = time.monotonic()

    def _handle(self, pdu: Any) -> None:
        """A PDU the SMSC sent on its own: answer it."""
        client = self._client
        assert client is not None
        if pdu.command == "enquire_link":
            resp = smpplib.smpp.make_pdu("enquire_link_resp", client=client)
            resp.sequence = pdu.sequence
            self._send_pdu(resp)
        elif pdu.command == "deliver_sm":
            receipt = pdu.short_message.decode("ascii", "replace") if pdu.short_message else ""
            receipted = getattr(pdu, "receipted_message_id", None) or b""
            if isinstance(receipted, bytes):
                receipted = receipted.decode("ascii", "replace")
            log.info("smpp delivery receipt id=%s %s", receipted,
                     " ".join(f for f in receipt.split() if f.startswith(("id:", "stat:", "err:"))))
            resp = smpplib.smpp.make_pdu("deliver_sm_resp", client=client)
            resp.sequence = pdu.sequence
            self._send_pdu(resp)
        elif pdu.command == "unbind":
            resp = smpplib.smpp.make_pdu("unbind_resp", client=client)
            resp.sequence = pdu.sequence
            self._send_pdu(resp)
            raise _Dropped("the SMSC unbound")
        else:
            log.debug("smpp ignored %s", pdu.command)

    def _await_response(self, sequence: int, command: str) -> Any:
        deadline = time.monotonic() + self.config.timeout_s
        while time.monotonic() < deadline:
            pdu = self._read_pdu()
            if pdu.sequence == sequence and pdu.command in (command, "generic_nack"):
                return pdu
            self._handle(pdu)
        raise _Dropped(f"no {command} within {self.config.timeout_s:g}s")

    def _bind(self) -> None:
        config = self.config
        client = smpplib.client.Client(config.host, config.port, timeout=config.timeout_s,
                                       logger_name=f"{__name__}.wire", allow_unknown_opt_params=True)
        try:
            client.connect()
        except smpplib.exceptions.ConnectionError as exc:
            client.state = c.SMPP_CLIENT_STATE_OPEN
            client.disconnect()  # closes the socket smpplib made for the failed attempt
            raise TemporaryFailure(Reason.UNREACHABLE, f"connect {config.host}:{config.port}: {exc}") from None
        self._client = client
        bind = client.bind_transceiver if config.delivery_receipts else client.bind_transmitter
        try:
            bind(system_id=config.system_id, password=config.password, system_type=config.system_type)
        except smpplib.exceptions.PDUError as exc:
            self._drop("bind refused")
            status = exc.args[1] if len(exc.args) > 1 else c.SMPP_ESME_RBINDFAIL
            raise classify_status(status, "bind") from None
        except (TimeoutError, smpplib.exceptions.ConnectionError, OSError) as exc:
            self._drop("bind failed")
            raise TemporaryFailure(Reason.CONNECTION_LOST, f"bind: {exc or 'no answer'}") from None
        self._last_io = time.monotonic()
        log.info("smpp bound host=%s port=%d system_id=%s mode=%s", config.host, config.port, config.system_id,
                 "transceiver" if config.delivery_receipts else "transmitter")

    def _submit(self, job: _Job) -> list[str]:
        if self._client is None:
            self._bind()
        source, ton, npi = source_address(self.config.sender)
        self._reference = (self._reference + 1) % 256
        total = len(job.parts.chunks)
        ids = []
        for seq, chunk in enumerate(job.parts.chunks, start=1):
            udh = gsm.concat_udh(self._reference, total, seq) if total > 1 else b""
            pdu = smpplib.smpp.make_pdu(
                "submit_sm", client=self._client,
                source_addr=source, source_addr_ton=ton, source_addr_npi=npi,
                destination_addr=job.number.lstrip("+"), dest_addr_ton=c.SMPP_TON_INTL,
                dest_addr_npi=c.SMPP_NPI_ISDN,
                esm_class=c.SMPP_GSMFEAT_UDHI if udh else c.SMPP_MSGMODE_DEFAULT,
                data_coding=gsm.DCS[job.parts.encoding],
                registered_delivery=1 if self.config.delivery_receipts else 0,
                short_message=udh + chunk,
            )
            try:
                self._send_pdu(pdu)
                resp = self._await_response(pdu.sequence, "submit_sm_resp")
            except _Dropped as exc:
                self._drop(str(exc))
                raise TemporaryFailure(Reason.CONNECTION_LOST, f"submit_sm part {seq}/{total}: {exc}") from None
            if resp.status != c.SMPP_ESME_ROK:
                raise classify_status(int(resp.status), "submit_sm")
            message_id = resp.message_id
            ids.append(message_id.decode() if isinstance(message_id, bytes) else str(message_id or ""))
        return ids

    def _drop(self, why: str) -> None:
        if self._client is not None:
            log.info("smpp link closed host=%s port=%d why=%s", self.config.host, self.config.port, why)
            # Marked open first: smpplib warns when a bound session is disconnected, which a drop is.
            self._client.state = c.SMPP_CLIENT_STATE_OPEN
            try:
                self._client.disconnect()
            except OSError:
                pass
        self._client = None

    def _unbind(self) -> None:
        if self._client is None:
            return
        try:
            pdu = smpplib.smpp.make_pdu("unbind", client=self._client)
            self._send_pdu(pdu)
            self._await_response(pdu.sequence, "unbind_resp")
        except (_Dropped, smpplib.exceptions.PDUError):
            pass
        self._drop("closed")
