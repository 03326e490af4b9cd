"""Request and answer bodies of the provider API. Requests are validated strictly (unknown fields and wrong
types are refused); the answer models describe what the handlers send. /openapi.json is built from both."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, model_validator

from appliance.store.escalations import STATE_NAMES as ESCALATION_STATES
from appliance.store.messages import ACK_RANKS, STATE_NAMES

TOPIC_PATTERN = r"^[A-Za-z0-9_.\-]{1,64}$"
NAME_PATTERN = r"^[A-Za-z0-9_.:\-]{1,200}$"


def _integral(value: Any) -> Any:
    # JSON has numbers, not integers: 900.0 is 900, as JSON Schema's "integer" says (#16). Strings, booleans
    # and fractions are still refused.
    return int(value) if isinstance(value, float) and value.is_integer() else value


Integer = Annotated[int, BeforeValidator(_integral)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# Unicode White_Space spelled out, not `\s`: the validators of the description (ECMA-262, Python, Rust) each
# read `\s` differently (U+0085, U+FEFF), and the description must mean what the box checks (#16).
WHITESPACE = r"\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
EMAIL_PATTERN = rf"^[^@{WHITESPACE}]{{1,64}}@[^@{WHITESPACE}]{{1,255}}$"


class Contact(Strict):
    phone: str | None = Field(None, pattern=r"^\+[1-9][0-9]{6,14}$", description="E.164, e.g. +4915112345678")
    email: str | None = Field(None, pattern=EMAIL_PATTERN, max_length=254)


def _alias() -> Any:
    return Field(None, min_length=1, max_length=128, description="the user, e.g. an employee id")


_REFUSED = {"deprecated": True, "description": "refused unless null (403, code 40302): only the app server binds a "
                                               "device to a user, with a ticket or PUT /v1/devices/{token}/identity"}


class PreviousDevice(Strict):
    """The credentials of the token this enrollment replaces (kept by the app across an update or restore)."""

    token: str = Field(..., min_length=1, max_length=128)
    password: str = Field(..., min_length=1, max_length=256, description="the MQTT password it was given")


class EnrollRequest(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"app_id": "app_0123456789ab", "platform": "android", "package": "com.corp.app", "device_id": "install-1"}]})

    app_id: str = Field(..., min_length=1, max_length=64)
    platform: Literal["ios", "android", "web", "desktop"]
    package: str = Field(..., pattern=NAME_PATTERN, description="bundle id / package name")
    device_id: str = Field(..., min_length=1, max_length=200, description="stable per install")
    previous: PreviousDevice | None = Field(None, description="retire this token, carrying its alias, contact "
                                                                "and topics over to the new one")
    # Refused unless empty (403 identity_needs_ticket): kept here so that old clients get that clear answer.
    alias: str | None = Field(None, min_length=1, max_length=128, json_schema_extra=_REFUSED)
    contact: Contact | None = Field(None, json_schema_extra=_REFUSED)


TICKET_TTL_DEFAULT_S = 900
TICKET_TTL_MAX_S = 7 * 86400


class TicketRequest(Strict):
    """What the app server binds a device to when it redeems the ticket."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"alias": "emp-4711", "contact": {"phone": "+4915112345678"}, "ttl_s": 900}]})


    alias: str | None = _alias()
    contact: Contact | None = None
    ttl_s: Integer = Field(TICKET_TTL_DEFAULT_S, ge=1, le=TICKET_TTL_MAX_S, description="seconds until it expires")


class IdentityRequest(Strict):
    """A device's user and fallback contact, set (or cleared with null) by the app server."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"alias": "emp-4711", "contact": {"email": "a@corp.example"}}]})


    alias: str | None = _alias()
    contact: Contact | None = None


def _not_null(schema: dict[str, Any]) -> None:
    """Describe an optional field that is absent or a value, never null (see Target.exactly_one)."""
    branches = [b for b in schema.pop("anyOf", []) if b.get("type") != "null"]
    schema.pop("default", None)
    if branches:
        schema.update(branches[0])


class Target(Strict):
    """Exactly one of the fields."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1, "maxProperties": 1})

    token: str | None = Field(None, min_length=1, max_length=128, json_schema_extra=_not_null)
    tokens: list[str] | None = Field(None, min_length=1, json_schema_extra=_not_null,
                                     description="at most api.max_tokens")
    topic: str | None = Field(None, pattern=TOPIC_PATTERN, json_schema_extra=_not_null)
    alias: str | None = Field(None, min_length=1, max_length=128, json_schema_extra=_not_null)
    all: Literal[True] | None = Field(None, json_schema_extra=_not_null)

    @model_validator(mode="before")
    @classmethod
    def exactly_one(cls, doc: Any) -> Any:
        # Checked on the document, so that an explicit null counts as given: `to` is exactly one key (#16).
        if isinstance(doc, dict) and (len(doc) != 1 or None in doc.values()):
            raise ValueError(f"`to` needs exactly one of token, tokens, topic, alias, all; got {sorted(doc) or 'none'}")
        return doc


class FallbackPolicy(Strict):
    """Send by SMS and/or e-mail when the device has not acknowledged the push after `after_s`."""

    after_s: Integer = Field(..., ge=0, le=2419200)
    channels: list[Literal["sms", "email"]] = Field(..., min_length=1, max_length=2,
                                                    json_schema_extra={"uniqueItems": True})
    sms_text: str | None = Field(None, min_length=1, max_length=1000, description="default: title: body")
    email_subject: str | None = Field(None, min_length=1, max_length=200, description="default: the title")
    even_if_expired: bool = Field(False, description="also escalate when the push expired before its deadline")

    @model_validator(mode="after")
    def distinct_channels(self) -> FallbackPolicy:
        if len(set(self.channels)) != len(self.channels):
            raise ValueError("channels must not repeat")
        return self


class AppFallbackRequest(Strict):
    policy: FallbackPolicy | None


class PushMessage(Strict):
    # The rule of not_empty, for the description (#16).
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": ["title"], "properties": {"title": {"type": "string"}}},
        {"required": ["body"], "properties": {"body": {"type": "string"}}},
        {"required": ["data"], "properties": {"data": {"type": "object", "minProperties": 1}}}],
        "examples": [{"to": {"topic": "hall-b"}, "title": "Shift change", "body": "Hall B at 14:00", "ttl_s": 3600}]})

    to: Target
    title: str | None = Field(None, max_length=1024)
    body: str | None = Field(None, max_length=4096)
    data: dict[str, Any] | None = None
    ttl_s: Annotated[int, Field(ge=0), BeforeValidator(_integral)] | None = Field(
        None, description="at most push.max_ttl_s; 0: deliver to connected devices now or never")
    priority: Literal["high", "normal"] | None = None
    collapse_key: str | None = Field(None, min_length=1, max_length=64)
    fallback: FallbackPolicy | None = None

    @model_validator(mode="after")
    def not_empty(self) -> PushMessage:
        if self.title is None and self.body is None and not self.data:
            raise ValueError("a push needs a title, a body or data")
        return self


class PushBatch(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"messages": [{"to": {"token": "dt_a"}, "body": "Hall B"}, {"to": {"all": True}, "title": "Shift change"}]}]})


    messages: list[PushMessage] = Field(..., min_length=1, description="at most api.max_batch")


class Subscribers(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"tokens": ["dt_a"]}]})

    tokens: list[str] = Field(..., min_length=1, description="at most api.max_tokens")


class NewAppRequest(Strict):
    name: str = Field(..., pattern=NAME_PATTERN)


class RotateRequest(Strict):
    grace_s: Annotated[int, Field(ge=0, le=365 * 86400), BeforeValidator(_integral)] | None = Field(None,
                                description="how long the previous key or secret keeps working; 0 ends it now")


class LimitsRequest(Strict):
    """Per-app send limits; null: the box's default (`limits.app_*`), 0: no limit."""

    pushes_per_s: float | None = Field(..., ge=0, le=1e6)
    targets_per_min: float | None = Field(..., ge=0, le=1e9)


class EnrollmentPolicyRequest(Strict):
    require_ticket: bool


# -- answers -------------------------------------------------------------------------------------
# What the handlers send, described once; tests/e2e/test_openapi_contract.py validates real answers with them.
class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


UNREGISTERED_REASONS = Literal["unknown", "retired", "reenrolled", "revoked", "unregistered"]


class UnregisteredToken(Answer):
    """Why a token cannot be sent to, and since when (APNs' 410 Unregistered)."""

    token: str
    reason: UNREGISTERED_REASONS = Field(..., description="unknown: never issued for this app")
    unregistered_at: float | None = Field(..., description="null for an unknown token")


class Problem(Answer):
    at: str = Field(..., description="the field, dotted, or (body)")
    problem: str


class Error(Answer):
    """Every refusal (docs/errors.md). Some codes add fields: 40002 `problems`; 40003 `unregistered`;
    41001 `token`, `reason`, `unregistered_at`; 42902 `retry_after_s`."""

    code: int
    http: int
    error: str
    link: str
    problems: list[Problem] | None = None
    unregistered: list[UnregisteredToken] | None = None
    unregistered_omitted: int | None = Field(None, ge=1, description="entries left out of `unregistered`")
    token: str | None = None
    reason: UNREGISTERED_REASONS | None = None
    unregistered_at: float | None = None
    retry_after_s: int | None = Field(None, ge=1, description="as the Retry-After header")


class Mqtt(Answer):
    host: str
    port: int
    tls: bool
    client_id: str
    username: str
    password: str = Field(..., description="shown once; keep it to come back with `previous`")


class Enrolled(Answer):
    token: str = Field(..., pattern=r"^dt_")
    mqtt: Mqtt
    inbox_topic: str
    hello_topic: str
    ack_topic: str
    status_topic: str
    keepalive_s: int
    alias: str | None
    replaced: list[str] = Field(..., description="the tokens this enrollment retired (reenrolled)")
    websocket_url: str | None = Field(None, description="MQTT over WebSocket, when the box serves it")
    ca_pem: str | None = Field(None, description="the box's CA, to trust or pin")
    ca_pin: str | None = Field(None, description="sha256/ SPKI pin of the CA")
    server_pin: str | None = Field(None, description="sha256/ SPKI pin of the server key")


class Ticket(Answer):
    ticket: str = Field(..., pattern=r"^et_", description="works once, for this app, until expires_at")
    expires_at: float
    alias: str | None


class ContactAnswer(Answer):
    phone: str | None
    email: str | None


class DeviceInfo(Answer):
    token: str
    platform: Literal["ios", "android", "web", "desktop"]
    alias: str | None
    contact: ContactAnswer
    online: bool
    subscribed: bool
    last_seq: int
    topics: list[str]


class Identity(Answer):
    token: str
    alias: str | None
    contact: ContactAnswer


class Unregistered(Answer):
    token: str
    unregistered_at: float


class PushAccepted(Answer):
    """Committed to disk."""

    id: str = Field(..., pattern=r"^m[0-9a-f]{28}$")
    targeted: int = Field(..., ge=1)
    unregistered: list[UnregisteredToken]
    unregistered_omitted: int | None = Field(None, ge=1, description="entries left out of `unregistered`")


class PushRefused(Answer):
    """A message of a batch that was refused; the others are unaffected."""

    index: int = Field(..., ge=0)
    error: Error


class BatchAccepted(Answer):
    accepted: int = Field(..., ge=0)
    refused: int = Field(..., ge=0)
    results: list[PushAccepted | PushRefused] = Field(..., min_length=1, description="one per message, in order")


DeliveryCounts = create_model("DeliveryCounts", __base__=Answer, __doc__="devices per delivery state",
                              **{name: (int, Field(..., ge=0)) for name in STATE_NAMES})
AckCounts = create_model("AckCounts", __base__=Answer, __doc__="devices per furthest acknowledgement",
                         **{name: (int, Field(..., ge=0)) for name in ACK_RANKS})
ChannelCounts = create_model("ChannelCounts", __base__=Answer, __doc__="devices per fallback state on one channel",
                             **{name: (int, Field(..., ge=0)) for name in ESCALATION_STATES})


class ChannelState(Answer):
    state: Literal[ESCALATION_STATES]  # type: ignore[valid-type]
    reason: str | None
    attempts: int


class TokenState(Answer):
    state: Literal[STATE_NAMES]  # type: ignore[valid-type]
    ack: Literal[tuple(ACK_RANKS)] | None  # type: ignore[valid-type]
    updated_at: float | None
    fallback: dict[str, ChannelState] | None = None


class MessageStatus(Answer):
    id: str
    created_at: float
    expires_at: float
    collapse_key: str | None
    cancelled_at: float | None
    targeted: int
    counts: DeliveryCounts  # type: ignore[valid-type]
    acks: AckCounts  # type: ignore[valid-type]
    tokens: dict[str, TokenState] | None = Field(None, description="up to push.status_detail_limit targets")
    fallback_sent: int
    fallback_failed: int
    fallback: dict[str, ChannelCounts] | None = Field(  # type: ignore[valid-type]
        None, description="per channel, with fallback")


class Cancelled(Answer):
    id: str
    cancelled: int = Field(..., ge=0, description="deliveries that were still pending")


class AliasContact(Answer):
    alias: str
    phone: str | None
    email: str | None


class Subscribed(Answer):
    topic: str
    subscribed: int = Field(..., ge=0)
    unregistered: list[UnregisteredToken]
    unregistered_omitted: int | None = Field(None, ge=1, description="entries left out of `unregistered`")
    subscribers: int = Field(..., ge=0)


class Unsubscribed(Answer):
    topic: str
    unsubscribed: int = Field(..., ge=0)
    unregistered: list[UnregisteredToken]
    unregistered_omitted: int | None = Field(None, ge=1, description="entries left out of `unregistered`")
    subscribers: int = Field(..., ge=0)


class Health(Answer):
    status: Literal["ok"]
