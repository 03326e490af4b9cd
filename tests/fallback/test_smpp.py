"""The SMPP sender against a test SMSC built on the npm package `smpp` (tests/fallback/smsc/server.js)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from fallback import Notice, PermanentFailure, TemporaryFailure
from fallback.smpp import SmppConfig, SmppSender
from tests.fallback.conftest import closed_port, missing_counterpart, stop_process

pytestmark = pytest.mark.asyncio

SMSC_DIR = Path(__file__).parent / "smsc"
SYSTEM_ID, PASSWORD = "intrapush", "s3cret"
NUMBER = "+4915112345678"
THROTTLED_NUMBER = "+4915550000058"  # server.js answers ESME_RTHROTTLED
INVALID_NUMBER = "+4915550000011"  # server.js answers ESME_RINVDSTADR


@pytest.fixture(scope="session")
def node() -> str:
    """Node with the smpp package installed in tests/fallback/smsc (npm install on first use)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        missing_counterpart("node and npm are needed for the test SMSC (npm package smpp 0.5.1); not installed")
    if not (SMSC_DIR / "node_modules" / "smpp").is_dir():
        result = subprocess.run([npm, "install", "--no-audit", "--no-fund"], cwd=SMSC_DIR, capture_output=True,
                                text=True, timeout=120, check=False)
        if result.returncode != 0:
            pytest.fail(f"npm install in {SMSC_DIR} failed:\n{result.stdout}\n{result.stderr}")
    return node


class Smsc:
    """server.js in a subprocess; its JSON lines on stdout are collected in `events`."""

    def __init__(self, node: str, port: int = 0) -> None:
        self.node, self.port = node, port
        self.events: list[dict[str, Any]] = []
        self.proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> Smsc:
        self.proc = subprocess.Popen([self.node, "server.js", str(self.port), SYSTEM_ID, PASSWORD], cwd=SMSC_DIR,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        self.port = self.wait_for("listening")[0]["port"]
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                self.events.append({"event": "output", "line": line.rstrip()})

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            if self._reader is not None:
                self._reader.join(5)
            assert self.proc.stdout is not None
            self.proc.stdout.close()
            self.proc = None

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]

    def wait_for(self, kind: str, count: int = 1, timeout: float = 10) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.of(kind)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"SMSC saw {len(self.of(kind))} {kind}, wanted {count}: {self.events}")
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"SMSC exited: {self.events}")
            time.sleep(0.02)
        return self.of(kind)


@pytest.fixture
def smsc(node: str) -> Iterator[Smsc]:
    s = Smsc(node).start()
    yield s
    s.stop()


def make_sender(port: int, **overrides: Any) -> SmppSender:
    settings: dict[str, Any] = {"host": "127.0.0.1", "port": port, "system_id": SYSTEM_ID, "password": PASSWORD,
                                "sender": "Intrapush", "timeout_s": 2.0}
    settings.update(overrides)
    return SmppSender(SmppConfig(**settings))


@pytest_asyncio.fixture
async def sender(smsc: Smsc) -> AsyncIterator[SmppSender]:
    s = make_sender(smsc.port)
    yield s
    await s.aclose()


def sms(text: str, to: str = NUMBER) -> Notice:
    return Notice("sms", to, text, reference="push1:device1")


def joined(parts: list[dict[str, Any]]) -> str:
    """The text of concatenated submit_sm, ordered by the sequence octet of their UDH (IEI 00, length 03)."""
    headers = [bytes.fromhex(p["udh"][0]) for p in parts]
    assert all(h[:2] == b"\x00\x03" for h in headers)
    assert len({h[2] for h in headers}) == 1, "parts carry different references"
    assert {h[3] for h in headers} == {len(parts)}
    return "".join(p["message"] for _h, p in sorted(zip(headers, parts), key=lambda hp: hp[0][4]))


async def test_gsm_text_is_submitted_to_the_smsc(sender: SmppSender, smsc: Smsc) -> None:
    receipt = await sender.send(sms("Server db1 down [ticket #4711] - {prio} 5 €"))
    # The SMSC prints each event on a pipe that may lag its answer to us: wait for the line, not only the answer.
    [bound] = await asyncio.to_thread(smsc.wait_for, "bound")
    [submit] = await asyncio.to_thread(smsc.wait_for, "submit_sm")
    assert bound == {"event": "bound", "command": "bind_transmitter", "system_id": SYSTEM_ID}
    assert (submit["destination_addr"], submit["dest_addr_ton"], submit["data_coding"]) == ("4915112345678", 1, 0)
    assert (submit["source_addr"], submit["source_addr_ton"]) == ("Intrapush", 5)
    assert submit["message"] == "Server db1 down [ticket #4711] - {prio} 5 €"
    assert (receipt.transport, receipt.message_ids, receipt.parts) == ("smpp", (submit["message_id"],), 1)


async def test_long_ucs2_text_is_submitted_as_concatenated_parts(sender: SmppSender, smsc: Smsc) -> None:
    text = "Сервер db1 недоступен с 10:42. Дежурный, пожалуйста, проверьте VPN-шлюз. " * 3
    receipt = await sender.send(sms(text))
    parts = await asyncio.to_thread(smsc.wait_for, "submit_sm", 4)
    assert len(parts) == receipt.parts == 4  # 231 characters, 67 per part
    assert {(p["data_coding"], p["esm_class"]) for p in parts} == {(8, 0x40)}
    assert joined(parts) == text
    assert receipt.message_ids == tuple(p["message_id"] for p in parts)


async def test_long_gsm_text_is_split_without_breaking_escapes(sender: SmppSender, smsc: Smsc) -> None:
    text = "a" * 152 + "€" + "b" * 100
    await sender.send(sms(text))
    parts = await asyncio.to_thread(smsc.wait_for, "submit_sm", 2)
    assert [len(p["message"]) for p in parts] == [152, 101]
    assert joined(parts) == text


async def test_wrong_password_is_a_permanent_auth_failure(smsc: Smsc) -> None:
    s = make_sender(smsc.port, password="wrong")
    try:
        with pytest.raises(PermanentFailure) as caught:
            await s.send(sms("hello"))
    finally:
        await s.aclose()
    assert caught.value.reason == "auth"
    assert await asyncio.to_thread(smsc.wait_for, "bind_refused") and not smsc.of("submit_sm")


async def test_throttling_is_a_temporary_failure(sender: SmppSender) -> None:
    with pytest.raises(TemporaryFailure) as caught:
        await sender.send(sms("hello", to=THROTTLED_NUMBER))
    assert caught.value.reason == "throttled"


async def test_invalid_destination_is_a_permanent_failure(sender: SmppSender) -> None:
    with pytest.raises(PermanentFailure) as caught:
        await sender.send(sms("hello", to=INVALID_NUMBER))
    assert caught.value.reason == "invalid_recipient"


async def test_the_client_binds_again_after_the_smsc_restarts(node: str, smsc: Smsc, sender: SmppSender) -> None:
    await sender.send(sms("before"))
    smsc.stop()
    with pytest.raises(TemporaryFailure) as caught:
        await sender.send(sms("while down"))
    assert caught.value.reason in ("unreachable", "connection_lost")
    restarted = Smsc(node, smsc.port).start()
    try:
        receipt = await sender.send(sms("after"))
        assert [e["message"] for e in await asyncio.to_thread(restarted.wait_for, "submit_sm")] == ["after"]
        assert len(restarted.of("bound")) == 1 and receipt.parts == 1
    finally:
        await sender.aclose()
        restarted.stop()


async def test_smsc_down_is_a_temporary_failure() -> None:
    s = make_sender(closed_port())
    try:
        with pytest.raises(TemporaryFailure) as caught:
            await s.send(sms("hello"))
    finally:
        await s.aclose()
    assert caught.value.reason == "unreachable"


async def test_idle_session_is_kept_alive_and_unbound_on_close(smsc: Smsc) -> None:
    s = make_sender(smsc.port, enquire_link_s=0.2)
    await s.send(sms("hello"))
    await asyncio.to_thread(smsc.wait_for, "enquire_link", 2, 5)
    await s.send(sms("still bound"))
    await s.aclose()
    await asyncio.to_thread(smsc.wait_for, "unbind")
    assert len(smsc.of("bound")) == 1


async def test_delivery_receipts_bind_as_transceiver_and_are_logged(smsc: Smsc,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="fallback")
    s = make_sender(smsc.port, delivery_receipts=True)
    try:
        receipt = await s.send(sms("hello"))
        assert (await asyncio.to_thread(smsc.wait_for, "bound"))[0]["command"] == "bind_transceiver"
        assert (await asyncio.to_thread(smsc.wait_for, "submit_sm"))[0]["registered_delivery"] == 1
        deadline = time.monotonic() + 5
        wanted = f"smpp delivery receipt id={receipt.message_ids[0]} id:{receipt.message_ids[0]} stat:DELIVRD"
        while not any(wanted in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "no delivery receipt logged"
            await asyncio.sleep(0.05)
    finally:
        await s.aclose()
    assert not any(NUMBER in r.getMessage() for r in caplog.records if r.levelname != "DEBUG")
