"""Errors of the appliance and the API error catalog.

    ApplianceError                 anything we raise on purpose
    ├── ApiError                   refused request: answered with a catalog entry, nothing changed
    ├── StoreError                 the database cannot be used (newer schema, unreadable file)
    └── StartupError               the daemon cannot start (port taken, bad data directory)

Catalog codes are stable and never reused; every one is listed in docs/errors.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DOCS_BASE = "docs/errors.md"


@dataclass(frozen=True)
class ErrorKind:
    code: int
    http: int
    message: str
    name: str

    @property
    def link(self) -> str:
        return f"{DOCS_BASE}#{self.code}"


CATALOG: dict[int, ErrorKind] = {}


def _kind(code: int, http: int, name: str, message: str) -> ErrorKind:
    assert code not in CATALOG, code
    kind = ErrorKind(code, http, message, name)
    CATALOG[code] = kind
    return kind


MALFORMED_JSON = _kind(40001, 400, "malformed_json", "the request body is not valid JSON")
INVALID_REQUEST = _kind(40002, 400, "invalid_request", "the request does not match the schema")
NO_TARGET = _kind(40003, 400, "no_target", "the push targets nobody")
PAYLOAD_TOO_LARGE = _kind(40004, 400, "payload_too_large", "the push is larger than push.max_payload_bytes")
TTL_TOO_LONG = _kind(40005, 400, "ttl_too_long", "ttl_s is larger than push.max_ttl_s")
BATCH_TOO_LARGE = _kind(40006, 400, "batch_too_large", "more messages in one request than api.max_batch")
TOO_MANY_TOKENS = _kind(40007, 400, "too_many_tokens", "more tokens in one message than api.max_tokens")
BAD_TOPIC_NAME = _kind(40008, 400, "bad_topic_name", "topic names are 1-64 characters of A-Z a-z 0-9 _ - .")
BAD_MESSAGE_ID = _kind(40009, 400, "bad_message_id", "the message id is not one this box issues")
FALLBACK_UNAVAILABLE = _kind(40011, 400, "fallback_unavailable", "a fallback channel is not configured on this box")
WRONG_CONTENT_TYPE = _kind(40010, 415, "wrong_content_type", "the request body must be application/json")
MISSING_CREDENTIALS = _kind(40101, 401, "missing_credentials", "send Authorization: Bearer <key>")
WRONG_CREDENTIALS = _kind(40102, 401, "wrong_credentials", "the key is not valid for this app")
TICKET_UNKNOWN = _kind(40103, 401, "ticket_unknown", "the enrollment ticket was never issued for this app")
TICKET_EXPIRED = _kind(40104, 401, "ticket_expired", "the enrollment ticket has expired; ask the app server for a new one")
TICKET_USED = _kind(40105, 401, "ticket_used", "the enrollment ticket was already redeemed; tickets work once")
WRONG_PREVIOUS = _kind(40106, 401, "wrong_previous_credentials",
                       "`previous` does not name an active device of this app with that MQTT password")
TICKET_REQUIRED = _kind(40301, 403, "ticket_required", "this app enrolls devices only with an enrollment ticket")
IDENTITY_NEEDS_TICKET = _kind(40302, 403, "identity_needs_ticket",
                              "alias and contact are bound by the app server (a ticket or PUT /v1/devices/{token}/identity), "
                              "never by the device")
APP_NOT_FOUND = _kind(40401, 404, "app_not_found", "no app with that id")
MESSAGE_NOT_FOUND = _kind(40402, 404, "message_not_found", "no message with that id for this app")
DEVICE_NOT_FOUND = _kind(40403, 404, "device_not_found", "no device with that token")
ROUTE_NOT_FOUND = _kind(40404, 404, "route_not_found", "no such endpoint")
METHOD_NOT_ALLOWED = _kind(40501, 405, "method_not_allowed", "the endpoint does not take this method")
APP_EXISTS = _kind(40902, 409, "app_exists", "an app with that name exists")
UNREGISTERED = _kind(41001, 410, "unregistered", "the token is no longer valid; stop sending to it")
BODY_TOO_LARGE = _kind(41301, 413, "body_too_large", "the request body is larger than api.max_body_bytes")
RATE_LIMITED = _kind(42902, 429, "rate_limited",
                     "the app is over its send limit (pushes per second or targets per minute); retry after Retry-After")
INTERNAL = _kind(50001, 500, "internal", "internal error; the box logged the details")
# The HTTP edge (#16): answers to requests that never reach an endpoint, or that the edge cuts short.
MALFORMED_HTTP = _kind(40012, 400, "malformed_http", "the request is not well-formed HTTP/1.1")
BAD_HOST = _kind(40013, 400, "bad_host", "the Host header is not a valid host[:port]")
INCOMPLETE_BODY = _kind(40014, 400, "incomplete_body", "the client ended the request body before Content-Length")
BODY_TIMEOUT = _kind(40801, 408, "body_timeout", "the request body did not arrive within api.body_timeout_s")
TOO_MANY_CONNECTIONS = _kind(42901, 429, "too_many_connections",
                             "this address holds api.max_connections_per_address connections already")
HEADER_TOO_LARGE = _kind(43101, 431, "header_too_large", "a request line or header is longer than api.max_header_bytes")
SERVER_BUSY = _kind(50301, 503, "server_busy", "the listener holds api.max_connections connections already")


class ApplianceError(Exception):
    """Base of everything the appliance raises on purpose."""


class ApiError(ApplianceError):
    """A refused request: `kind` says which, `detail` says exactly what, `extra` adds fields."""

    def __init__(self, kind: ErrorKind, detail: str | None = None, **extra: Any) -> None:
        self.kind = kind
        self.detail = detail
        self.extra = extra
        super().__init__(detail or kind.message)

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "code": self.kind.code,
            "http": self.kind.http,
            "error": self.detail or self.kind.message,
            "link": self.kind.link,
        }
        body.update(self.extra)
        return body


class StoreError(ApplianceError):
    """The database cannot be used as it is (newer schema, corrupt or unreadable file)."""


class StartupError(ApplianceError):
    """The daemon cannot start: the message says what to fix."""
