"""HTTP SMS gateways: a real Kannel (bearerbox + smsbox + fakesmsc) for `kannel`, and an aiohttp.web
gateway on the test's loop for the generic URL-template `http` transport."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from fallback import Notice, PermanentFailure, TemporaryFailure
from fallback.sms_http import HttpSmsConfig, HttpSmsSender, KannelConfig, KannelSender
from tests.fallback.conftest import (
    closed_port,
    free_port,
    require_binary,
    stop_process,
    wait_for_port,
)

pytestmark = pytest.mark.asyncio

NUMBER = "+4915112345678"


def sms(text: str, to: str = NUMBER) -> Notice:
    return Notice("sms", to, text, reference="push1:device1")


# --- Kannel -------------------------------------------------------------------------------------------

KANNEL_CONFIG = """
group = core
admin-port = {admin}
admin-interface = 127.0.0.1
admin-password = test-admin
admin-allow-ip = 127.0.0.1
smsbox-port = {smsbox}
smsbox-interface = 127.0.0.1
box-allow-ip = 127.0.0.1
box-deny-ip = "*.*.*.*"
log-level = 0
store-type = spool
store-location = {dir}/spool

group = smsc
smsc = fake
smsc-id = FAKE
port = {fake}
connect-allow-ip = 127.0.0.1

group = smsbox
bearerbox-host = 127.0.0.1
bearerbox-port = {smsbox}
sendsms-port = {sendsms}
sendsms-interface = 127.0.0.1
global-sender = 12345
log-level = 0

group = sms-service
keyword = default
text = "No service specified"

group = sendsms-user
username = intrapush
password = s3cret
max-messages = 10
concatenation = true
"""


@dataclass
class Kannel:
    url: str
    fakesmsc_log: Path

    def received(self) -> list[tuple[str, str, str, str]]:
        """(from, to, type, data) of every message fakesmsc got, data decoded to text ("<udh hex> <text>"
        for a part of a concatenated message)."""
        found = []
        text = self.fakesmsc_log.read_text(errors="replace")
        for sender, to, kind, data in re.findall(r"Got message \d+: <(\S+) (\S+) (\S+) (.*)>", text):
            if kind == "udh":  # "<udh> data <text>", both URL-encoded; the UDH is kept as hex
                udh, _, rest = data.partition(" ")
                data = urllib.parse.unquote_to_bytes(udh).hex() + " " + urllib.parse.unquote_plus(
                    rest.removeprefix("data "))
            elif kind == "ucs-2":
                # fakesmsc URL-encodes the UTF-16 octets, a 0x20 octet as "+"
                data = urllib.parse.unquote_to_bytes(data.replace("+", " ")).decode("utf-16-be")
            found.append((sender, to, kind, data))
        return found

    async def wait_for(self, count: int, timeout: float = 10) -> list[tuple[str, str, str, str]]:
        deadline = time.monotonic() + timeout
        while len(self.received()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"fakesmsc got {self.received()}, wanted {count} messages")
            await asyncio.sleep(0.05)
        return self.received()


@pytest.fixture(scope="module")
def kannel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kannel]:
    """bearerbox first (wait for its ports), then fakesmsc and smsbox, all on loopback ports."""
    found = require_binary("bearerbox", "smsbox", package="kannel")
    found |= require_binary("fakesmsc", package="kannel-extras")
    directory = tmp_path_factory.mktemp("kannel")
    (directory / "spool").mkdir()
    ports = {name: free_port() for name in ("admin", "smsbox", "fake", "sendsms")}
    conf = directory / "kannel.conf"
    conf.write_text(KANNEL_CONFIG.format(dir=directory, **ports))
    procs: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], log: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        with open(directory / log, "wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, **kwargs)
        procs.append(proc)
        return proc

    try:
        bearerbox = start([found["bearerbox"], "-v", "1", str(conf)], "bearerbox.log")
        wait_for_port(ports["smsbox"], 10, lambda: bearerbox.poll() is None)
        wait_for_port(ports["fake"], 10, lambda: bearerbox.poll() is None)
        # fakesmsc without messages to send reads more from stdin; an open pipe keeps it listening.
        fakesmsc = start([found["fakesmsc"], "-H", "127.0.0.1", "-r", str(ports["fake"])], "fakesmsc.log",
                         stdin=subprocess.PIPE)
        smsbox = start([found["smsbox"], "-v", "1", str(conf)], "smsbox.log")
        wait_for_port(ports["sendsms"], 10, lambda: smsbox.poll() is None and fakesmsc.poll() is None)
        yield Kannel(f"http://127.0.0.1:{ports['sendsms']}/cgi-bin/sendsms", directory / "fakesmsc.log")
    finally:
        for proc in reversed(procs):  # smsbox and fakesmsc before bearerbox
            # bearerbox takes seconds to stop cleanly; its spool is a throwaway directory.
            stop_process(proc, grace=0.5)
            if proc.stdin:
                proc.stdin.close()


@pytest_asyncio.fixture
async def kannel_sender(kannel: Kannel) -> AsyncIterator[KannelSender]:
    s = KannelSender(KannelConfig(url=kannel.url, username="intrapush", password="s3cret", sender="Intrapush",
                                  timeout_s=5))
    yield s
    await s.aclose()


async def test_kannel_delivers_a_gsm_text_to_the_smsc(kannel: Kannel, kannel_sender: KannelSender) -> None:
    before = len(kannel.received())
    receipt = await kannel_sender.send(sms("Server db1 down [#4711], 5 EUR"))
    messages = await kannel.wait_for(before + 1)
    assert messages[before] == ("Intrapush", NUMBER, "text", "Server db1 down [#4711], 5 EUR")
    assert (receipt.transport, receipt.parts) == ("kannel", 1)


async def test_kannel_delivers_a_ucs2_text(kannel: Kannel, kannel_sender: KannelSender) -> None:
    before = len(kannel.received())
    await kannel_sender.send(sms("Сервер db1 недоступен"))
    messages = await kannel.wait_for(before + 1)
    assert messages[before] == ("Intrapush", NUMBER, "ucs-2", "Сервер db1 недоступен")


async def test_kannel_splits_a_long_text_into_parts(kannel: Kannel, kannel_sender: KannelSender) -> None:
    before = len(kannel.received())
    text = "Server db1 is down since 10:42, the failover did not start. " * 4
    receipt = await kannel_sender.send(sms(text))
    parts = (await kannel.wait_for(before + 2))[before:]
    assert receipt.parts == 2 and [kind for _f, _t, kind, _d in parts] == ["udh", "udh"]
    # each carries a concatenation header 05 00 03 <ref> 02 <seq>; Kannel split the text, we did not
    headers = [data.split(" ", 1)[0] for *_rest, data in parts]
    assert [h[:6] + h[8:] for h in headers] == ["0500030201", "0500030202"]
    assert "".join(data.split(" ", 1)[1] for *_rest, data in parts) == text


async def test_kannel_wrong_password_is_a_permanent_auth_failure(kannel: Kannel) -> None:
    s = KannelSender(KannelConfig(url=kannel.url, username="intrapush", password="wrong", timeout_s=5))
    try:
        with pytest.raises(PermanentFailure) as caught:
            await s.send(sms("hello"))
    finally:
        await s.aclose()
    assert caught.value.reason == "auth"
    assert "403" in caught.value.detail


async def test_kannel_down_is_a_temporary_failure() -> None:
    s = KannelSender(KannelConfig(url=f"http://127.0.0.1:{closed_port()}/cgi-bin/sendsms", username="x"))
    try:
        with pytest.raises(TemporaryFailure) as caught:
            await s.send(sms("hello"))
    finally:
        await s.aclose()
    assert caught.value.reason == "unreachable"


# --- the generic URL-template gateway ----------------------------------------------------------------------

@dataclass
class Gateway:
    url: str
    requests: list[dict[str, Any]]
    answers: list[web.Response]  # consumed one per request; empty: 200 {"messages": [{"id": "gw-1"}]}
    delay_s: float = 0.0


@asynccontextmanager
async def gateway() -> AsyncIterator[Gateway]:
    gw = Gateway("", [], [])

    async def handle(request: web.Request) -> web.StreamResponse:
        gw.requests.append({"method": request.method, "path": request.path, "query": dict(request.query),
                            "headers": dict(request.headers), "body": await request.text()})
        if gw.delay_s:
            await asyncio.sleep(gw.delay_s)
        if gw.answers:
            return gw.answers.pop(0)
        return web.json_response({"messages": [{"id": f"gw-{len(gw.requests)}"}]})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    gw.url = f"http://127.0.0.1:{port}"
    try:
        yield gw
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture
async def gw() -> AsyncIterator[Gateway]:
    async with gateway() as g:
        yield g


@asynccontextmanager
async def http_sender(**settings: Any) -> AsyncIterator[HttpSmsSender]:
    s = HttpSmsSender(HttpSmsConfig(**{"timeout_s": 2.0, **settings}))
    try:
        yield s
    finally:
        await s.aclose()


async def test_json_body_template_is_filled_and_escaped(gw: Gateway) -> None:
    body = '{"to": "{to_digits}", "from": "{sender}", "message": "{text}", "ref": "{reference}", "n": 1}'
    async with http_sender(url=gw.url + "/v1/sms", body=body, sender="Ops",
                           headers='{"Authorization": "Bearer t0ken"}', id_field="messages.0.id") as s:
        receipt = await s.send(sms('Say "hi"\nГрüße & {braces} 100%'))
    [request] = gw.requests
    assert (request["method"], request["path"]) == ("POST", "/v1/sms")
    assert request["headers"]["Authorization"] == "Bearer t0ken"
    assert request["headers"]["Content-Type"] == "application/json"
    assert json.loads(request["body"]) == {"to": "4915112345678", "from": "Ops", "ref": "push1:device1", "n": 1,
                                           "message": 'Say "hi"\nГрüße & {braces} 100%'}
    assert (receipt.transport, receipt.message_ids) == ("http", ("gw-1",))


async def test_url_template_placeholders_are_percent_encoded(gw: Gateway) -> None:
    async with http_sender(url=gw.url + "/send?to={to}&msg={text}&key=abc", method="GET") as s:
        await s.send(sms("a&b=c #1 €"))
    [request] = gw.requests
    assert request["method"] == "GET"
    assert request["query"] == {"to": NUMBER, "msg": "a&b=c #1 €", "key": "abc"}


@pytest.mark.parametrize(("status", "kind", "reason"), [
    (500, TemporaryFailure, "server_error"),
    (503, TemporaryFailure, "server_error"),
    (408, TemporaryFailure, "timeout"),
    (401, PermanentFailure, "auth"),
    (403, PermanentFailure, "auth"),
    (400, PermanentFailure, "rejected"),
    (404, PermanentFailure, "rejected"),
])
async def test_http_statuses_are_classified(gw: Gateway, status: int, kind: type, reason: str) -> None:
    gw.answers.append(web.Response(status=status, text="gateway says no"))
    async with http_sender(url=gw.url + "/send?to={to}&text={text}") as s:
        with pytest.raises(kind) as caught:
            await s.send(sms("hello"))
    assert caught.value.reason == reason
    assert f"HTTP {status}: gateway says no" == caught.value.detail


async def test_throttling_429_carries_retry_after(gw: Gateway) -> None:
    gw.answers.append(web.Response(status=429, headers={"Retry-After": "7"}))
    async with http_sender(url=gw.url + "/send?to={to}&text={text}") as s:
        with pytest.raises(TemporaryFailure) as caught:
            await s.send(sms("hello"))
    assert (caught.value.reason, caught.value.retry_after_s) == ("throttled", 7.0)


async def test_only_the_configured_statuses_mean_success(gw: Gateway) -> None:
    gw.answers.append(web.Response(status=200, text="queued"))
    async with http_sender(url=gw.url + "/send?to={to}&text={text}", success_statuses="202") as s:
        with pytest.raises(PermanentFailure):
            await s.send(sms("hello"))
        gw.answers.append(web.Response(status=202, text="queued"))
        receipt = await s.send(sms("hello"))
    assert receipt.message_ids == ()


async def test_slow_gateway_is_a_temporary_timeout(gw: Gateway) -> None:
    gw.delay_s = 0.5
    async with http_sender(url=gw.url + "/send?to={to}&text={text}", timeout_s=0.2) as s:
        with pytest.raises(TemporaryFailure) as caught:
            await s.send(sms("hello"))
    assert caught.value.reason == "timeout"


async def test_long_text_is_cut_to_max_parts_before_it_leaves(gw: Gateway) -> None:
    async with http_sender(url=gw.url + "/send?to={to}&text={text}", max_parts=1) as s:
        receipt = await s.send(sms("word " * 100))
    sent = gw.requests[0]["query"]["text"]
    assert len(sent) == 160 and sent.endswith("...") and receipt.parts == 1


async def test_invalid_number_never_reaches_the_gateway(gw: Gateway) -> None:
    async with http_sender(url=gw.url + "/send?to={to}&text={text}") as s:
        with pytest.raises(PermanentFailure) as caught:
            await s.send(sms("hello", to="12345"))
    assert caught.value.reason == "invalid_recipient"
    assert gw.requests == []
