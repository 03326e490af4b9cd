"""Escalation end to end: the real daemon sends SMS to an emulated GSM modem on a pty and e-mail to an
aiosmtpd server, exactly once, only for pushes not acknowledged in time, and across a restart."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from email import message_from_bytes
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP

from tests.conftest import Box, PahoDevice, wait_for
from tests.fallback.gsm_modem import PtyModem, decode_submit

PHONE, EMAIL = "+4915112345678", "alice@corp.example"


class SmtpSink:
    """aiosmtpd on its own thread and loop, port 0; records every message it accepts."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()

        async def handle_DATA(server, session, envelope):  # noqa: N802 - aiosmtpd hook name
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
            return "250 OK"

        handler = type("Handler", (), {"handle_DATA": staticmethod(handle_DATA)})()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            server = self.loop.run_until_complete(
                self.loop.create_server(lambda: SMTP(handler), "127.0.0.1", 0))
            self.port = server.sockets[0].getsockname()[1]
            self.server = server
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(5)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def modem() -> Iterator[PtyModem]:
    m = PtyModem().start()
    yield m
    m.stop()


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    sink = SmtpSink()
    yield sink
    sink.stop()


def fallback_env(modem: PtyModem, smtp: SmtpSink) -> dict[str, str]:
    return {
        "INTRAPUSH_FALLBACK_SMS_TRANSPORT": "modem",
        "INTRAPUSH_FALLBACK_SMS_MODEM_PORT": modem.port,
        "INTRAPUSH_FALLBACK_SMS_MODEM_COMMAND_TIMEOUT_S": "2",
        "INTRAPUSH_FALLBACK_SMS_RATE_PER_MIN": "6000",
        "INTRAPUSH_FALLBACK_EMAIL_TRANSPORT": "smtp",
        "INTRAPUSH_FALLBACK_EMAIL_HOST": "127.0.0.1",
        "INTRAPUSH_FALLBACK_EMAIL_PORT": str(smtp.port),
        "INTRAPUSH_FALLBACK_EMAIL_TLS": "none",
        "INTRAPUSH_FALLBACK_EMAIL_FROM_ADDRESS": "push@corp.example",
        "INTRAPUSH_FALLBACK_EMAIL_RATE_PER_MIN": "6000",
    }


def sms_texts(modem: PtyModem) -> list[tuple[str, str]]:
    return [(d.number, d.text) for d in map(decode_submit, modem.received_pdus())]


def test_unacknowledged_push_goes_out_by_sms_and_email_once_and_acked_one_sends_nothing(
        tmp_path: Path, modem: PtyModem, smtp: SmtpSink) -> None:
    box = Box(tmp_path / "box", env=fallback_env(modem, smtp)).start()
    try:
        app = box.create_app("fallback")
        offline = box.enroll(app, "offline", contact={"phone": PHONE, "email": EMAIL})
        online = box.enroll(app, "online", contact={"phone": "+4915199999999", "email": "bob@corp.example"})
        device = PahoDevice(online, box.mqtt_port).connect()
        policy = {"after_s": 1, "channels": ["sms", "email"]}
        with box.api(app) as api:
            missed = api.post("/v1/messages", json={"to": {"token": offline["token"]}, "title": "Alarm",
                                                    "body": "Hall B", "fallback": policy}).json()
            seen = api.post("/v1/messages", json={"to": {"token": online["token"]}, "title": "Fine",
                                                  "body": "all good", "fallback": policy}).json()
            push = device.next()
            device.ack([push["id"]])
            wait_for(lambda: api.get(f"/v1/messages/{missed['id']}").json()["fallback_sent"] == 2, timeout=15)
            time.sleep(1.5)  # give a duplicate every chance to show up
            assert sms_texts(modem) == [(PHONE, "Alarm: Hall B")]
            [(mail_from, rcpts, raw)] = smtp.messages
            mail = message_from_bytes(raw)
            assert (mail_from, rcpts, mail["Subject"]) == ("push@corp.example", [EMAIL], "Alarm")
            status = api.get(f"/v1/messages/{missed['id']}").json()
            assert status["fallback"]["sms"]["sent"] == 1 and status["fallback"]["email"]["sent"] == 1
            assert status["tokens"][offline["token"]]["fallback"]["sms"]["state"] == "sent"
            quiet = api.get(f"/v1/messages/{seen['id']}").json()
            assert quiet["fallback_sent"] == 0
            assert quiet["tokens"][online["token"]]["fallback"]["sms"] == {"state": "skipped", "reason": "acked",
                                                                          "attempts": 0}
        device.close()
    finally:
        box.stop()


def test_alias_contact_app_default_and_escalation_across_restart(tmp_path: Path, modem: PtyModem,
                                                                 smtp: SmtpSink) -> None:
    box = Box(tmp_path / "box", env=fallback_env(modem, smtp)).start()
    try:
        app = box.create_app("defaults")
        e = box.enroll(app, "phone", alias="carol")
        out = box.cli("app", "set-fallback", "defaults", "--after-s", "3", "--channels", "sms", "--json")
        assert json.loads(out.stdout)["fallback"]["channels"] == ["sms"]
        with box.api(app) as api:
            r = api.put("/v1/aliases/carol/contact", json={"phone": PHONE})
            assert r.status_code == 200
            sent = api.post("/v1/messages", json={"to": {"token": e["token"]}, "title": "Restart",
                                                  "body": "survives"}).json()
        box.stop()  # before the deadline: the escalation waits in the store
        assert sms_texts(modem) == []
        box.start()
        with box.api(app) as api:
            wait_for(lambda: api.get(f"/v1/messages/{sent['id']}").json()["fallback_sent"] == 1, timeout=15)
        assert sms_texts(modem) == [(PHONE, "Restart: survives")]
        assert smtp.messages == []
    finally:
        box.stop()


def test_failures_are_recorded_not_crashed_on(tmp_path: Path, modem: PtyModem, smtp: SmtpSink) -> None:
    env = fallback_env(modem, smtp) | {"INTRAPUSH_FALLBACK_MAX_ATTEMPTS": "2",
                                       "INTRAPUSH_FALLBACK_RETRY_INITIAL_S": "0.2"}
    box = Box(tmp_path / "box", env=env).start()
    try:
        app = box.create_app("failing")
        no_contact = box.enroll(app, "nobody")
        bad_number = box.enroll(app, "bad", contact={"phone": "+4915100000001"})
        modem.cms_errors.extend([38, 38])  # network out of order: temporary, twice
        with box.api(app) as api:
            policy = {"after_s": 0, "channels": ["sms"]}
            a = api.post("/v1/messages", json={"to": {"token": no_contact["token"]}, "body": "x",
                                               "fallback": policy}).json()
            b = api.post("/v1/messages", json={"to": {"token": bad_number["token"]}, "body": "y",
                                               "fallback": policy}).json()
            wait_for(lambda: api.get(f"/v1/messages/{a['id']}").json()["fallback_failed"] == 1, timeout=15)
            wait_for(lambda: api.get(f"/v1/messages/{b['id']}").json()["fallback_failed"] == 1, timeout=15)
            detail_a = api.get(f"/v1/messages/{a['id']}").json()["tokens"][no_contact["token"]]["fallback"]["sms"]
            detail_b = api.get(f"/v1/messages/{b['id']}").json()["tokens"][bad_number["token"]]["fallback"]["sms"]
        assert detail_a["reason"] == "no_contact"
        assert detail_b["state"] == "failed" and detail_b["attempts"] == 2 and detail_b["reason"] == "network"
    finally:
        box.stop()


def test_unconfigured_channel_is_refused_and_fallback_test_command_reports(tmp_path: Path, smtp: SmtpSink) -> None:
    env = {"INTRAPUSH_FALLBACK_EMAIL_TRANSPORT": "smtp", "INTRAPUSH_FALLBACK_EMAIL_HOST": "127.0.0.1",
           "INTRAPUSH_FALLBACK_EMAIL_PORT": str(smtp.port), "INTRAPUSH_FALLBACK_EMAIL_TLS": "none",
           "INTRAPUSH_FALLBACK_EMAIL_FROM_ADDRESS": "push@corp.example"}
    box = Box(tmp_path / "box", env=env).start()
    try:
        app = box.create_app("email-only")
        e = box.enroll(app, "d")
        with box.api(app) as api:
            r = api.post("/v1/messages", json={"to": {"token": e["token"]}, "body": "x",
                                               "fallback": {"after_s": 5, "channels": ["sms"]}})
            assert r.status_code == 400 and r.json()["code"] == 40011
    finally:
        box.stop()
    import os
    run = subprocess.run([sys.executable, "-m", "appliance", "fallback", "test", "email", "--to", EMAIL, "--json",
                          "--data-dir", str(box.data_dir)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **env})
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["ok"] is True
    assert smtp.messages[-1][1] == [EMAIL]
    bad = subprocess.run([sys.executable, "-m", "appliance", "fallback", "test", "email", "--to", "not-an-address",
                          "--json", "--data-dir", str(box.data_dir)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **env})
    assert bad.returncode == 1 and json.loads(bad.stdout)["reason"] == "invalid_recipient"
