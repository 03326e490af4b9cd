"""The HTTP edge (#16): no input reaches a 500, every refusal is the JSON error shape, JSON is strict, the
enrollment answer never carries a forged host, clients cannot forge log lines, and slow or greedy clients
cannot hold the listeners. Malformed HTTP goes over raw sockets; the rest over httpx."""

from __future__ import annotations

import json
import select
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Box, wait_for

HEADER_TIMEOUT_S = 1.5
BODY_TIMEOUT_S = 1.5
PER_ADDRESS = 55
PER_LISTENER = 70


@pytest.fixture(scope="module")
def edge_box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    b = Box(tmp_path_factory.mktemp("edge") / "box", env={
        "INTRAPUSH_API_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S), "INTRAPUSH_API_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "INTRAPUSH_API_MAX_CONNECTIONS_PER_ADDRESS": str(PER_ADDRESS),
        "INTRAPUSH_API_MAX_CONNECTIONS": str(PER_LISTENER),
        "INTRAPUSH_BROKER_WS_LISTEN": "127.0.0.1:0"}).start()  # enrollment answers carry a websocket_url
    yield b
    b.stop()


@pytest.fixture(scope="module")
def world(edge_box: Box) -> dict[str, Any]:
    app = edge_box.create_app("edge-" + uuid.uuid4().hex[:6])
    enrolled = edge_box.enroll(app, "edge-device")
    return {"app": app, "token": enrolled["token"]}


# -- helpers ---------------------------------------------------------------------------------------
class Answer:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/") else 0
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


def _addr(box: Box, name: str = "http") -> tuple[str, int]:
    host, port = box.addresses[name].rsplit(":", 1)
    return host, int(port)


def _connect(box: Box, source: str = "127.0.0.1", name: str = "http", timeout: float = 10) -> socket.socket:
    return socket.create_connection(_addr(box, name), timeout=timeout, source_address=(source, 0))


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def send_raw(box: Box, data: bytes, *, half_close: bool = False, tls: bool = False) -> Answer:
    sock = _connect(box, name="https" if tls else "http")
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the test only needs the bytes, not the box's identity
        sock = ctx.wrap_socket(sock, server_hostname="localhost")
    with sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return Answer(_read_all(sock))


def assert_error_shape(body: dict[str, Any], http: int, code: int) -> None:
    assert body["code"] == code, body
    assert body["http"] == http
    assert body["link"] == f"docs/errors.md#{code}"
    assert isinstance(body["error"], str) and len(body["error"]) < 400


def post(path: str, body: bytes, headers: str | bytes = "", content_type: str = "application/json") -> bytes:
    extra = headers if isinstance(headers, bytes) else headers.encode()
    return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n").encode() + extra + b"\r\n" + body


# -- 3: no input reaches a 500 ----------------------------------------------------------------------
@pytest.mark.parametrize("body", [
    rb'{"to": {"tokens": ["\ud800"]}, "title": "x"}',
    rb'{"to": {"token": "T"}, "title": "x", "data": {"k": "\udfff"}}',
    rb'{"to": {"token": "T"}, "title": "x", "data": {"\ud83d": 1}}',
], ids=["token_list", "data_value", "data_key"])
def test_lone_surrogate_is_a_400(edge_box: Box, world: dict[str, Any], body: bytes) -> None:
    body = body.replace(b'"T"', json.dumps(world["token"]).encode())
    with edge_box.api(world["app"]) as api:
        r = api.post("/v1/messages", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert_error_shape(r.json(), 400, 40001)


def test_surrogate_pair_is_accepted(edge_box: Box, world: dict[str, Any]) -> None:
    body = b'{"to": {"token": "%s"}, "title": "\\ud83d\\ude00 shipped"}' % world["token"].encode()
    with edge_box.api(world["app"]) as api:
        r = api.post("/v1/messages", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 202, r.text


@pytest.mark.parametrize("key, http, code", [(b"\xff\xfe\x80key", 401, 40101), ("cl\u00e9".encode(), 401, 40101),
                                            (b"k\x7fey", 400, 40012), (b"a b", 401, 40101)],
                         ids=["not_utf8", "non_ascii", "delete_char", "space"])
def test_authorization_outside_printable_ascii_is_a_4xx(edge_box: Box, key: bytes, http: int, code: int) -> None:
    a = send_raw(edge_box, post("/v1/messages", b"{}", b"Authorization: Bearer " + key + b"\r\n"))
    assert a.status == http, a.raw
    assert_error_shape(a.json(), http, code)


@pytest.mark.parametrize("host", [b'a b<>"', b"a:99999999", b"a:-1", b"[::1", b"\xff\xfe"])
def test_bad_host_is_a_400(edge_box: Box, world: dict[str, Any], host: bytes) -> None:
    body = json.dumps({"app_id": world["app"]["app_id"], "platform": "android", "package": "com.example.app",
                       "device_id": "host-probe"}).encode()
    request = post("/v1/devices", body, f"Authorization: Bearer {world['app']['enrollment_secret']}\r\n")
    a = send_raw(edge_box, request.replace(b"Host: localhost", b"Host: " + host))
    assert a.status == 400, a.raw
    assert_error_shape(a.json(), 400, 40013)
    assert host not in a.body


def test_body_cut_short_by_the_client_is_a_400(edge_box: Box, world: dict[str, Any]) -> None:
    head = (f"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {world['app']['api_key']}\r\nContent-Length: 400\r\n\r\n").encode()
    a = send_raw(edge_box, head + b'{"to": {"token": "x"}, "ti', half_close=True)
    assert a.status == 400, a.raw
    assert_error_shape(a.json(), 400, 40014)


def test_body_that_stalls_is_a_408(edge_box: Box, world: dict[str, Any]) -> None:
    head = (f"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {world['app']['api_key']}\r\nContent-Length: 400\r\n\r\n").encode()
    with _connect(edge_box) as sock:
        sock.sendall(head + b'{"to": ')
        a = Answer(_read_all(sock))
    assert a.status == 408, a.raw
    assert_error_shape(a.json(), 408, 40801)


def test_broken_chunk_in_the_middle_of_a_body_is_a_400(edge_box: Box, world: dict[str, Any]) -> None:
    """The handler is already reading the body when the framing breaks: it answers at once, not at the
    body timeout."""
    head = (f"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {world['app']['api_key']}\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    with _connect(edge_box) as sock:
        sock.sendall(head + b'3\r\n{"t\r\n')
        time.sleep(0.3)
        sock.sendall(b"zz\r\n")
        a = Answer(_read_all(sock))
    assert a.status == 400, a.raw
    assert_error_shape(a.json(), 400, 40012)


@pytest.mark.parametrize("body", [
    b'{"to": {"token": "T"}, "title": "x", "title": "y"}',
    b'{"to": {"token": "T", "token": "T"}, "title": "x"}',
    b'{"to": {"token": "T"}, "title": "x", "data": {"k": 1, "k": 2}}',
], ids=["top_level", "target", "data"])
def test_duplicate_keys_are_a_400(edge_box: Box, world: dict[str, Any], body: bytes) -> None:
    body = body.replace(b'"T"', json.dumps(world["token"]).encode())
    with edge_box.api(world["app"]) as api:
        r = api.post("/v1/messages", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert_error_shape(r.json(), 400, 40001)
    assert "duplicate key" in r.json()["error"]


@pytest.mark.parametrize("value", [b"1e400", b"-1e400", b"NaN", b"Infinity", b"-Infinity", b"18446744073709551616",
                                   b"-9223372036854775809", b"1" * 5000])
def test_numbers_out_of_range_are_a_400(edge_box: Box, world: dict[str, Any], value: bytes) -> None:
    """#16 point 4: what a device receives is strict JSON, so `data` takes finite numbers in int64/double."""
    body = b'{"to": {"token": "%s"}, "title": "x", "data": {"n": %s}}' % (world["token"].encode(), value)
    with edge_box.api(world["app"]) as api:
        r = api.post("/v1/messages", content=body, headers={"Content-Type": "application/json"})
        ok = api.post("/v1/messages", json={"to": {"token": world["token"]}, "title": "x",
                                            "data": {"n": 9223372036854775807, "f": 1.5e308}})
    assert r.status_code == 400, r.text
    assert_error_shape(r.json(), 400, 40001)
    assert len(r.text) < 500
    assert ok.status_code == 202, ok.text


@pytest.mark.parametrize("depth", [33, 100, 100000])
def test_json_nested_too_deep_is_a_400(edge_box: Box, world: dict[str, Any], depth: int) -> None:
    body = b'{"to": {"token": "x"}, "title": "x", "data": {"k": ' + b"[" * depth + b"]" * depth + b"}}"
    with edge_box.api(world["app"]) as api:
        r = api.post("/v1/messages", content=body, headers={"Content-Type": "application/json"})
        ok = api.post("/v1/messages", content=b'{"to": {"token": "%s"}, "title": "x", "data": {"k": %s}}' % (
            world["token"].encode(), b"[" * 30 + b"]" * 30), headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert_error_shape(r.json(), 400, 40001)
    assert ok.status_code == 202, ok.text


def test_credentials_are_checked_before_the_body(edge_box: Box) -> None:
    """#10: a route refuses a caller without a key before it reads (or chokes on) the body."""
    r = httpx.post(f"{edge_box.url}/v1/messages", content=b"[" * 100000, headers={"Content-Type": "application/json"})
    assert r.status_code == 401, r.text
    assert_error_shape(r.json(), 401, 40101)


@pytest.mark.parametrize("request_bytes, http, code", [
    (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Bad: a\x00b\r\n\r\n", 400, 40012),
    (b"G\x01T /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n", 400, 40012),
    (b"GET /healthz HTTP/9.9\r\nHost: localhost\r\n\r\n", 400, 40012),
    (b"GET /healthz\r\n\r\n", 400, 40012),
    (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nContent-Length: -5\r\n\r\n", 400, 40012),
    (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nBad Name: x\r\n\r\n", 400, 40012),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n", 431, 43101),
    (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n", 431, 43101),
    (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
     400, 40012),
    (b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, 40012),
], ids=["nul_in_header", "bad_method", "bad_version", "http09", "negative_length", "space_in_name",
        "long_target", "long_header", "too_many_headers", "bad_chunk"])
def test_malformed_http_gets_the_json_error_shape(edge_box: Box, request_bytes: bytes, http: int, code: int) -> None:
    a = send_raw(edge_box, request_bytes)
    assert a.status == http, a.raw[:300]
    assert a.headers["content-type"].startswith("application/json")
    assert_error_shape(a.json(), http, code)
    assert b"aaaa" not in a.body


def test_malformed_http_over_tls_gets_the_json_error_shape(edge_box: Box) -> None:
    a = send_raw(edge_box, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Bad: a\x00b\r\n\r\n", tls=True)
    assert a.status == 400, a.raw
    assert_error_shape(a.json(), 400, 40012)


# -- 5: the enrollment answer's host -----------------------------------------------------------------
@pytest.mark.parametrize("host, expected", [(b"push.example.org:8443", "push.example.org"),
                                            (b"10.1.2.3", "10.1.2.3"), (b"[::1]:80", "::1")])
def test_enrollment_tells_devices_the_validated_host(edge_box: Box, world: dict[str, Any], host: bytes,
                                                     expected: str) -> None:
    body = json.dumps({"app_id": world["app"]["app_id"], "platform": "android", "package": "com.example.app",
                       "device_id": "host-" + uuid.uuid4().hex[:6]}).encode()
    request = post("/v1/devices", body, f"Authorization: Bearer {world['app']['enrollment_secret']}\r\n")
    a = send_raw(edge_box, request.replace(b"Host: localhost", b"Host: " + host))
    assert a.status == 201, a.raw
    assert a.json()["mqtt"]["host"] == expected
    url_host = f"[{expected}]" if ":" in expected else expected  # an IPv6 address in brackets (RFC 3986)
    assert a.json()["websocket_url"].startswith(f"ws://{url_host}:"), a.json()["websocket_url"]


def test_enrollment_uses_the_configured_public_host(tmp_path: Path) -> None:
    box = Box(tmp_path / "box", env={"INTRAPUSH_BROKER_PUBLIC_HOST": "push.corp.example"}).start()
    try:
        app = box.create_app("public-host")
        body = json.dumps({"app_id": app["app_id"], "platform": "ios", "package": "com.example.app",
                           "device_id": "d1"}).encode()
        request = post("/v1/devices", body, f"Authorization: Bearer {app['enrollment_secret']}\r\n")
        a = send_raw(box, request.replace(b"Host: localhost", b"Host: evil.example"))
        assert a.status == 201, a.raw
        assert a.json()["mqtt"]["host"] == "push.corp.example"
    finally:
        box.stop()


# -- 6: the log -----------------------------------------------------------------------------------
def test_client_values_cannot_forge_log_lines(edge_box: Box, world: dict[str, Any]) -> None:
    marker = "FORGED" + uuid.uuid4().hex[:8]
    with edge_box.api(world["app"]) as api:
        api.get(f"/v1/messages/x%0a2026-01-01 INFO appliance.api: {marker}")
        api.get(f"/v1/messages/%0d{marker} event=accepted")
        api.post("/v1/messages", content=json.dumps({"to": {"token": f"\n{marker}"}, "title": "x"}),
                 headers={"Content-Type": "application/json"})
    send_raw(edge_box, b"GET /\x1b[2J" + marker.encode() + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")

    def marker_logged() -> list[str]:
        return [line for line in edge_box.log().splitlines() if marker in line]
    lines = wait_for(lambda: len(marker_logged()) >= 2 and marker_logged())
    for line in lines:
        assert not line.startswith(marker) and "appliance.api:" in line, line
        assert "\x1b" not in line and "\r" not in line


def test_long_authorization_header_is_not_echoed_or_logged(edge_box: Box) -> None:
    secret = "sk" + uuid.uuid4().hex * 300  # 9,602 characters: over the header limit
    a = send_raw(edge_box, f"GET /v1/messages/abc HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {secret}\r\n\r\n"
                 .encode())
    assert a.status == 431, a.raw[:300]
    assert_error_shape(a.json(), 431, 43101)
    assert secret[:40].encode() not in a.raw
    shorter = secret[:2000]  # under the header limit, over any key we issue
    with httpx.Client(base_url=edge_box.url, headers={"Authorization": f"Bearer {shorter}"}) as api:
        r = api.get("/v1/messages/abc")
    assert r.status_code == 401, r.text
    assert secret[:40] not in r.text
    time.sleep(0.3)
    assert secret[2:42] not in edge_box.log()


def test_malformed_http_is_one_warning_line_with_the_peer(edge_box: Box) -> None:
    before = len(edge_box.log().splitlines())
    send_raw(edge_box, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Bad: a\x00b\r\n\r\n",)
    lines = wait_for(lambda: [line for line in edge_box.log().splitlines()[before:] if "malformed_http" in line])
    new = edge_box.log().splitlines()[before:]
    assert len(lines) == 1 and "WARNING" in lines[0] and "peer=127.0.0.1" in lines[0], lines
    assert not any("Traceback" in line or "ERROR" in line for line in new), new


# -- 7: slow, idle and greedy clients; bounded answers ---------------------------------------------
def test_slow_clients_are_closed_after_the_header_timeout(edge_box: Box) -> None:
    """50 clients dripping a request head a byte at a time are closed at api.header_timeout_s; a normal
    client is answered meanwhile."""
    closed_after: list[float] = []
    lock = threading.Lock()

    def drip() -> None:
        with _connect(edge_box, source="127.0.0.2", timeout=HEADER_TIMEOUT_S * 20) as sock:
            start = time.monotonic()
            try:
                for byte in b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 1000:
                    sock.sendall(bytes([byte]))
                    time.sleep(0.25)
                    if time.monotonic() - start > HEADER_TIMEOUT_S * 20:
                        return
            except OSError:
                pass
            else:
                return
            with lock:
                closed_after.append(time.monotonic() - start)

    threads = [threading.Thread(target=drip, daemon=True) for _ in range(50)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    r = httpx.get(f"{edge_box.url}/healthz", timeout=10)
    assert r.status_code == 200
    for t in threads:
        t.join(HEADER_TIMEOUT_S * 30)
    assert len(closed_after) == 50, closed_after
    assert min(closed_after) >= HEADER_TIMEOUT_S * 0.9


def test_slow_tls_handshake_is_closed_after_the_header_timeout(edge_box: Box) -> None:
    """A client dripping its ClientHello is closed at api.header_timeout_s, not asyncio's 60 s."""
    hello = bytes.fromhex("16030100c8010000c40303") + bytes(200)
    with _connect(edge_box, name="https", timeout=HEADER_TIMEOUT_S * 20) as sock:
        start = time.monotonic()
        with pytest.raises(OSError):  # noqa: PT012 - the drip ends when the box closes the socket
            for byte in hello:
                sock.sendall(bytes([byte]))
                if select.select([sock], [], [], 0.25)[0] and sock.recv(1024) == b"":
                    raise ConnectionResetError("closed by the box")
                if time.monotonic() - start > HEADER_TIMEOUT_S * 20:
                    break
        assert time.monotonic() - start >= HEADER_TIMEOUT_S * 0.9


def test_idle_connection_is_closed_after_the_header_timeout(edge_box: Box) -> None:
    with _connect(edge_box, timeout=HEADER_TIMEOUT_S * 20) as sock:
        start = time.monotonic()
        assert sock.recv(1) == b""  # closed by the box: a socket timeout would raise here
        assert time.monotonic() - start >= HEADER_TIMEOUT_S * 0.9


def _hold(box: Box, source: str, count: int) -> list[socket.socket]:
    held = []
    for _ in range(count):
        sock = _connect(box, source=source)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")  # answered, then kept alive
        assert Answer(sock.recv(65536)).status == 200
        held.append(sock)
    return held


def test_connections_per_address_are_capped(edge_box: Box) -> None:
    held = _hold(edge_box, "127.0.0.3", PER_ADDRESS)
    try:
        a = send_raw_from(edge_box, "127.0.0.3")
        assert a.status == 429, a.raw
        assert_error_shape(a.json(), 429, 42901)
        flood = [_connect(edge_box, source="127.0.0.3") for _ in range(20)]  # before the held ones time out
        try:
            time.sleep(0.3)
            assert all(sock.recv(65536).startswith(b"HTTP/1.1 429") for sock in flood)
        finally:
            for sock in flood:
                sock.close()
        # 21 refusals, one log line: a flood of refused connections cannot flood the log
        assert edge_box.log().count("event=connection_refused peer=127.0.0.3") == 1
        assert send_raw_from(edge_box, "127.0.0.4").status == 200
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: send_raw_from(edge_box, "127.0.0.3").status == 200)


def test_connections_per_listener_are_capped(edge_box: Box) -> None:
    held = _hold(edge_box, "127.0.0.5", PER_ADDRESS) + _hold(edge_box, "127.0.0.6", PER_LISTENER - PER_ADDRESS)
    try:
        a = send_raw_from(edge_box, "127.0.0.7")
        assert a.status == 503, a.raw
        assert_error_shape(a.json(), 503, 50301)
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: send_raw_from(edge_box, "127.0.0.7").status == 200)


def send_raw_from(box: Box, source: str) -> Answer:
    with _connect(box, source=source) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        return Answer(_read_all(sock))


def test_answers_list_a_bounded_number_of_unregistered_tokens(edge_box: Box, world: dict[str, Any]) -> None:
    """A batch naming 3,000 unknown tokens lists 1,000 (api.max_unregistered_listed) and counts the rest."""
    unknown = [f"dt_unknown{i:06d}" for i in range(3000)]
    batch = {"messages": [{"to": {"tokens": [world["token"], *unknown[:1500]]}, "title": "x"},
                          {"to": {"tokens": unknown[1500:]}, "title": "y"}]}
    with edge_box.api(world["app"]) as api:
        r = api.post("/v1/messages", json=batch)
        single = api.post("/v1/messages", json={"to": {"tokens": unknown}, "title": "z"})
    assert r.status_code == 202, r.text[:300]
    first, second = r.json()["results"]
    assert first["targeted"] == 1 and len(first["unregistered"]) == 1000 and first["unregistered_omitted"] == 500
    assert second["error"]["code"] == 40003
    assert second["error"]["unregistered"] == [] and second["error"]["unregistered_omitted"] == 1500
    assert len(r.content) < 100_000
    assert single.status_code == 400 and single.json()["code"] == 40003
    assert len(single.json()["unregistered"]) == 1000 and single.json()["unregistered_omitted"] == 2000


# -- 8: content types, methods, bounded errors ------------------------------------------------------
@pytest.mark.parametrize("ctype", ["text/plain", "application/octet-stream", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x"])
def test_non_json_content_type_is_a_415(edge_box: Box, world: dict[str, Any], ctype: str) -> None:
    body = json.dumps({"to": {"token": world["token"]}, "title": "x"})
    with edge_box.api(world["app"]) as api:
        r = api.post("/v1/messages", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 415, r.text
    assert_error_shape(r.json(), 415, 40010)


def test_405_carries_allow(edge_box: Box) -> None:
    r = httpx.patch(f"{edge_box.url}/v1/messages")
    assert r.status_code == 405, r.text
    assert_error_shape(r.json(), 405, 40501)
    assert r.headers["Allow"] == "POST"


def test_errors_do_not_echo_unbounded_input(edge_box: Box, world: dict[str, Any]) -> None:
    long = "x" * 5000
    with edge_box.api(world["app"]) as api:
        answers = [api.get(f"/v1/messages/{long}"), api.get(f"/nowhere/{long}"),
                   api.post(f"/v1/topics/{long}/subscribers", json={"tokens": [world["token"]]}),
                   api.post("/v1/messages", content=b'{"to": ' + long.encode(),
                            headers={"Content-Type": "application/json"}),
                   api.post("/v1/messages", content=b"{}", headers={"Content-Type": "text/" + long})]
    for r in answers:
        assert 400 <= r.status_code < 500, r.text[:200]
        assert len(r.content) < 1000, (r.status_code, r.text[:200])
