"""The HTTP edge: strict JSON bodies, header checks, log-safe values, and the connection gate with its
timeouts and JSON answers for HTTP that never reaches a handler (#16)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo

from appliance import errors as E
from appliance.errors import ApiError

log = logging.getLogger("appliance.api")

# --- strict JSON --------------------------------------------------------------------------------
MAX_DEPTH = 32
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
# Escaped UTF-16 surrogates (`\ud800`): the only way a lone surrogate gets into a parsed str.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
# Digits as "0" and E as "e", "+" dropped: one C pass that shows where a number may overflow (19 digits
# in a row, or an exponent of 3 digits or more), so the per-number checks run only for such bodies.
_NUMBER_SHAPES = bytes.maketrans(b"0123456789E", b"0000000000e")


class JsonRefused(ValueError):
    """The body is JSON we do not take (NaN, duplicate key, too deep, out of range)."""


def _reject_constant(name: str) -> Any:
    raise JsonRefused(f"{name} is not JSON (numbers must be finite)")


def _checked_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise JsonRefused(f"the number {text[:40]} is out of range")
    return value


def _checked_int(text: str) -> int:
    if len(text) < 19:  # fast path: always inside int64
        return int(text)
    value = int(text)
    if not INT_MIN <= value <= INT_MAX:
        raise JsonRefused(f"the number {text[:24]}... is outside the 64-bit integer range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise JsonRefused(f"duplicate key {log_value(dup, 64)}")
    return doc


# Built once: json.loads builds a decoder per call when given hooks. Keyed by (big, huge) number shapes.
_DECODERS = {(big, huge): json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_reject_constant,
                                           parse_float=_checked_float if big or huge else None,
                                           parse_int=_checked_int if big else None)
             for big in (False, True) for huge in (False, True)}


def _has_lone_surrogate(doc: Any) -> bool:
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _nests_deeper(text: bytes, limit: int) -> bool:
    """True if the brackets nest deeper than `limit` or do not balance.

    Each round removes every innermost pair, so brackets of depth d are gone after d rounds; all of it
    runs in C, before the parser recurses."""
    brackets = text.translate(None, _NOT_BRACKETS).replace(b"{", b"[").replace(b"}", b"]")
    for _ in range(limit):
        if not brackets:
            return False
        brackets = brackets.replace(b"[]", b"")
    return bool(brackets)


def _too_deep(raw: bytes) -> bool:
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return False
    # Brackets inside strings can only make the raw count look deeper or unbalanced, never shallower:
    # only then strip the strings (slower) and count again.
    return _nests_deeper(raw, MAX_DEPTH) and _nests_deeper(_STRING.sub(b'""', raw), MAX_DEPTH)


def parse_json(raw: bytes) -> Any:
    """Parse a request body as strict JSON (RFC 8259 within I-JSON's limits), or raise ApiError 40001.

    Refused: invalid UTF-8, lone surrogates, NaN and Infinity, numbers outside int64 or float range,
    duplicate keys, nesting deeper than MAX_DEPTH; every payload a device receives is strict JSON (#16)."""
    try:
        if _too_deep(raw):
            raise JsonRefused(f"nested deeper than {MAX_DEPTH} levels")
        shapes = raw.translate(_NUMBER_SHAPES, b"+")
        big = b"0000000000000000000" in shapes
        huge = b"e000" in shapes
        doc = _DECODERS[big, huge].decode(raw.decode("utf-8"))
        if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(doc):
            raise JsonRefused("a string holds a lone UTF-16 surrogate (\\ud800-\\udfff)")
        return doc
    except JsonRefused as exc:
        raise ApiError(E.MALFORMED_JSON, f"the body is not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ApiError(E.MALFORMED_JSON, f"the body is not valid UTF-8 (byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        # json's messages give a position, never the input: safe to pass on, cut to size.
        raise ApiError(E.MALFORMED_JSON, f"the body is not valid JSON: {str(exc)[:160]}") from None


# --- log-safe values ----------------------------------------------------------------------------
_PLAIN = re.compile(r"[A-Za-z0-9_.,:/@+\-]{1,200}")


def log_value(value: object, limit: int = 200) -> str:
    """A value as one `key=value` token: plain when it is only safe characters, else a JSON string with
    every control character, quote, space and non-ASCII character escaped, cut to `limit` characters."""
    text = value if isinstance(value, str) else str(value)
    if _PLAIN.fullmatch(text):
        return text
    cut = text[:limit]
    return json.dumps(cut) + ("…" if len(text) > limit else "")


# --- headers ------------------------------------------------------------------------------------
MAX_KEY_CHARS = 512  # our keys and secrets are about 43 characters; anything far longer is not one
_TOKEN = re.compile(r"[!-~]{1,%d}" % MAX_KEY_CHARS)
# RFC 1123 labels, plus `_`, which internal DNS names carry often enough that refusing them would hurt.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")
JSON_TYPES = ("application/json",)


def bearer_credential(header: str | None) -> str:
    """The key of an `Authorization: Bearer <key>` header, or ApiError 40101; never echoes the value."""
    scheme, _, value = (header or "").partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value:
        raise ApiError(E.MISSING_CREDENTIALS)
    if not _TOKEN.fullmatch(value):
        raise ApiError(E.MISSING_CREDENTIALS, f"the bearer key must be 1-{MAX_KEY_CHARS} printable ASCII characters")
    return value


def host_name(value: str | None) -> str | None:
    """The host (name or IP, without port) of a `Host` header, or None when it is not a valid host[:port]."""
    if value is None:
        return None
    if value.startswith("["):
        inner, sep, rest = value[1:].partition("]")
        if not sep or (rest and not _is_port(rest)):
            return None
        try:
            return str(ipaddress.IPv6Address(inner))
        except ValueError:
            return None
    host, sep, port = value.partition(":")
    if sep and not _is_port(sep + port):
        return None
    return host if _HOSTNAME.fullmatch(host) else None


def _is_port(text: str) -> bool:
    digits = text[1:]
    return text[:1] == ":" and 0 < len(digits) <= 5 and digits.isascii() and digits.isdigit() and int(digits) <= 65535


def check_host(request: web.BaseRequest) -> None:
    """Refuse a request whose Host header is not a valid host[:port] (#16): it would break URL building."""
    value = request.headers.get("Host")
    if value is not None and host_name(value) is None:
        raise ApiError(E.BAD_HOST, "the Host header is not a valid host[:port]")


def device_host(request: web.BaseRequest) -> str:
    """The host devices are told to connect to when broker.public_host is unset: the validated name the
    device reached us by, else this listener's own address."""
    name = host_name(request.headers.get("Host"))
    if name:
        return name
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return str(sockname[0]) if isinstance(sockname, tuple) else "localhost"


def check_json_content_type(request: web.BaseRequest) -> None:
    """A JSON route takes application/json (or no Content-Type at all), else 415 (#16)."""
    if "Content-Type" not in request.headers:
        return
    ctype = request.content_type
    if ctype not in JSON_TYPES and not ctype.endswith("+json"):
        raise ApiError(E.WRONG_CONTENT_TYPE, f"Content-Type {log_value(ctype, 60)} is not application/json")


# --- bodies -------------------------------------------------------------------------------------
async def read_json_body(request: web.Request) -> Any:
    """Read and strictly parse a JSON body within api.body_timeout_s; a cut or stalled body is a 4xx."""
    check_json_content_type(request)
    limits = request.app.get(EDGE_LIMITS) or EdgeLimits()
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise ApiError(E.BODY_TIMEOUT, f"the body did not arrive within api.body_timeout_s={limits.body_timeout_s:g}") \
            from None
    except RequestPayloadError:
        raise ApiError(E.MALFORMED_HTTP, "the body's framing (Content-Length, chunks, encoding) is not valid") from None
    except ConnectionResetError:
        raise ApiError(E.INCOMPLETE_BODY, "the connection closed in the middle of the body") from None
    if getattr(request.protocol, "body_malformed", False):
        raise ApiError(E.MALFORMED_HTTP, "the body's framing (Content-Length, chunks, encoding) is not valid")
    if request.content_length is not None and len(raw) != request.content_length:
        raise ApiError(E.INCOMPLETE_BODY, f"the body ended after {len(raw)} of {request.content_length} bytes")
    return parse_json(raw)


# --- bounded answers ----------------------------------------------------------------------------
# Shorter than any `unregistered` entry (`{"token": "", "reason": "", "unregistered_at": null}` is 52): an
# answer shorter than limit x this cannot list more than `limit` entries, so it is not even parsed.
MIN_ENTRY_BYTES = 50


def cap_unregistered(body: bytes, limit: int) -> bytes | None:
    """The answer with at most `limit` `unregistered` entries in all, each cut list followed by
    `unregistered_omitted` (how many were left out); None when nothing had to be cut (#16)."""
    if len(body) <= limit * MIN_ENTRY_BYTES:
        return None
    doc = json.loads(body)
    budget = limit
    cut = False
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
            continue
        if not isinstance(item, dict):
            continue
        listed = item.get("unregistered")
        if isinstance(listed, list):
            if len(listed) > budget:
                item["unregistered_omitted"] = len(listed) - budget
                item["unregistered"] = listed[:budget]
                cut = True
            budget -= len(item["unregistered"])
        stack.extend(reversed([v for k, v in item.items() if k != "unregistered" and isinstance(v, (dict, list))]))
    return json.dumps(doc).encode() if cut else None


# --- connections --------------------------------------------------------------------------------
@dataclass(frozen=True)
class EdgeLimits:
    """The HTTP listeners' limits (api.* settings); the defaults are the shipped ones."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 1024
    max_connections_per_address: int = 64
    max_header_bytes: int = 8190
    max_unregistered_listed: int = 1000


EDGE_LIMITS = web.AppKey("edge_limits", EdgeLimits)

_PARSE_ERRORS: dict[type[BaseException], str] = {
    http_exceptions.LineTooLong: "a request line or header is over api.max_header_bytes",
    http_exceptions.BadHttpMethod: "the request method is not an HTTP token",
    http_exceptions.BadStatusLine: "the request line is not `METHOD /path HTTP/1.x`",
    http_exceptions.InvalidURLError: "the request target is not a valid URL path",
    http_exceptions.InvalidHeader: "a header name or value holds bytes HTTP does not allow",
    http_exceptions.ContentLengthError: "Content-Length is not valid or does not match the body",
    http_exceptions.TransferEncodingError: "the chunked body is not well-formed",
    http_exceptions.ContentEncodingError: "the Content-Encoding is not supported or the body does not decode",
}


def describe_parse_error(exc: BaseException | None) -> tuple[E.ErrorKind, str]:
    """The catalog entry and a fixed sentence for an HTTP parser error; the input is never echoed."""
    if isinstance(exc, http_exceptions.LineTooLong):
        return E.HEADER_TOO_LARGE, _PARSE_ERRORS[http_exceptions.LineTooLong]
    for cls in type(exc).__mro__ if exc is not None else ():
        if cls in _PARSE_ERRORS:
            return E.MALFORMED_HTTP, _PARSE_ERRORS[cls]
    return E.MALFORMED_HTTP, "the request is not well-formed HTTP/1.1"


SERVER_NAME = "intrapush"  # never Python's or aiohttp's version: an attacker's map of known flaws (#9)


def refusal(kind: E.ErrorKind, detail: str) -> bytes:
    """A whole HTTP/1.1 answer, written before any request is read (the connection gate)."""
    body = json.dumps(ApiError(kind, detail).body()).encode()
    head = (f"HTTP/1.1 {kind.http} {HTTPStatus(kind.http).phrase}\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nServer: {SERVER_NAME}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class ConnectionGate:
    """Counts open connections per listener and per source address, and refuses those over the caps."""

    def __init__(self, limits: EdgeLimits) -> None:
        self.limits = limits
        self.per_listener: Counter[Any] = Counter()
        self.per_address: Counter[str] = Counter()

    def admit(self, listener: Any, address: str) -> tuple[E.ErrorKind, str] | None:
        lim = self.limits
        if lim.max_connections and self.per_listener[listener] >= lim.max_connections:
            return E.SERVER_BUSY, f"this listener holds api.max_connections={lim.max_connections} connections"
        if lim.max_connections_per_address and self.per_address[address] >= lim.max_connections_per_address:
            return (E.TOO_MANY_CONNECTIONS,
                    f"your address holds api.max_connections_per_address={lim.max_connections_per_address} connections")
        self.per_listener[listener] += 1
        self.per_address[address] += 1
        return None

    def release(self, listener: Any, address: str) -> None:
        for counter, key in ((self.per_listener, listener), (self.per_address, address)):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]


class LogThrottle:
    """At most one log line per key per `interval_s`; says how many were held back meanwhile. Bounded: past
    `max_keys` keys it starts over (a spoofed-source flood costs memory no more than log lines)."""

    def __init__(self, interval_s: float = 10.0, max_keys: int = 4096) -> None:
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._seen: dict[str, tuple[float, int]] = {}

    def admit(self, key: str) -> int | None:
        """The number of lines held back since the last one for `key`, or None to hold this one back too."""
        now = time.monotonic()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.interval_s:
            self._seen[key] = (last[0], last[1] + 1)
            return None
        if len(self._seen) >= self.max_keys:
            self._seen.clear()
        self._seen[key] = (now, 0)
        return last[1] if last is not None else 0


REFUSAL_LOG = LogThrottle()


class EdgeRequestHandler(RequestHandler):
    """aiohttp's connection protocol with our gate, timeouts and JSON answers to malformed HTTP."""

    def __init__(self, manager: web.Server, *, gate: ConnectionGate, **kwargs: Any) -> None:
        lim = gate.limits
        # keepalive_timeout closes a connection whose next request head is not complete in time: from
        # connect, and after each answer. aiohttp arms it while it waits for a head, so a client dripping
        # a byte every few seconds is closed as surely as a silent one.
        kwargs.update(keepalive_timeout=lim.header_timeout_s, max_line_size=lim.max_header_bytes,
                      max_field_size=lim.max_header_bytes, lingering_time=min(2.0, lim.body_timeout_s))
        super().__init__(manager, **kwargs)
        self._gate = gate
        self._gate_key: tuple[Any, str] | None = None
        self._last_body: Any = None
        self.body_malformed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) else "local"
        listener = transport.get_extra_info("sockname")
        refused = self._gate.admit(listener, address)
        if refused is not None:
            suppressed = REFUSAL_LOG.admit(address)
            if suppressed is not None:  # one line per address per interval: a flood cannot flood the log
                log.warning("event=connection_refused peer=%s code=%d suppressed_since_last=%d", log_value(address),
                            refused[0].code, suppressed)
            transport.write(refusal(*refused))  # type: ignore[attr-defined]
            # Close only once the client has had a moment to read the answer: closing with its
            # request unread would reset the connection and lose the answer.
            asyncio.get_running_loop().call_later(1.0, transport.close)
            self.transport = None
            self._force_close = True
            return
        self._gate_key = (listener, address)
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._gate_key is None:
            return
        self._gate.release(*self._gate_key)
        self._gate_key = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._messages:
            return
        message, body = self._messages[-1]
        if isinstance(message, _ErrInfo) and self._last_body is not None and not self._last_body.is_eof():
            # The parser failed inside a body a handler may be reading (a broken chunk): end that body,
            # flag it for read_json_body, and close after its answer instead of queueing a second one.
            self._messages.pop()
            self.body_malformed = True
            self._last_body.feed_eof()
            self.close()
        else:  # the body of the newest request, even once it has left the queue
            self._last_body = body

    def eof_received(self) -> bool:
        # A client that half-closes in the middle of a body still gets its 400 (#16).
        # The body ends where the client stopped; read_json_body compares it with Content-Length.
        # The request may be in a handler or still queued behind the head that came with it.
        bodies = [payload for _, payload in self._messages]
        if self._last_body is not None:
            bodies.append(self._last_body)
        unfinished = [body for body in bodies if not body.is_eof()]
        for body in unfinished:
            body.feed_eof()
        if unfinished:
            self.close()
        return bool(unfinished)

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        peer = self.peername[0] if isinstance(self.peername, tuple) else self.peername
        if status != 400 or not isinstance(exc, http_exceptions.HttpProcessingError):
            # Not the parser's: a handler failed past the middleware (it should never happen).
            log.error("event=internal_error peer=%s", log_value(peer), exc_info=exc)
            kind, detail = E.INTERNAL, None
        else:
            kind, detail = describe_parse_error(exc)
            log.warning("event=malformed_http peer=%s code=%d reason=%s", log_value(peer), kind.code,
                        log_value(type(exc).__name__ if exc else status))
        if request.writer.output_size > 0:
            raise ConnectionError("the answer is already on its way; no error answer can follow")
        resp = web.json_response(ApiError(kind, detail).body(), status=kind.http, headers={"Server": SERVER_NAME})
        resp.force_close()
        return resp


class EdgeServer(web.Server):
    """aiohttp's low-level server, building EdgeRequestHandler connections that share one gate."""

    def __init__(self, *args: Any, limits: EdgeLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = ConnectionGate(limits)

    def __call__(self) -> RequestHandler:
        return EdgeRequestHandler(self, loop=self._loop, gate=self.gate, **self._kwargs)


class EdgeRunner(web.AppRunner):
    """An AppRunner whose connections go through the edge (limits from the app's EDGE_LIMITS)."""

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return EdgeServer(plain.request_handler, request_factory=plain.request_factory,
                          handler_cancellation=plain.handler_cancellation, loop=plain._loop,  # noqa: SLF001
                          limits=self.app.get(EDGE_LIMITS) or EdgeLimits(), **plain._kwargs)  # noqa: SLF001


class EdgeSite(web.TCPSite):
    """A TCP site whose TLS handshakes must finish within api.header_timeout_s, like a request head
    (asyncio's default is 60 s, long enough for slow clients to hold sockets before the gate counts them)."""

    async def start(self) -> None:
        await web.BaseSite.start(self)
        runner = self._runner
        limits = runner.app.get(EDGE_LIMITS) if isinstance(runner, web.AppRunner) else None
        self._server = await asyncio.get_running_loop().create_server(
            runner.server, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port,
            ssl_handshake_timeout=(limits or EdgeLimits()).header_timeout_s if self._ssl_context else None)
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port
