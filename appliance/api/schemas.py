"""Request bodies of the provider API, validated strictly: unknown fields and wrong types are refused."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TOPIC_PATTERN = r"^[A-Za-z0-9_.\-]{1,64}$"
NAME_PATTERN = r"^[A-Za-z0-9_.:\-]{1,200}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Contact(Strict):
    phone: str | None = Field(None, pattern=r"^\+[1-9][0-9]{6,14}$", description="E.164, e.g. +4915112345678")
    email: str | None = Field(None, pattern=r"^[^@\s]{1,64}@[^@\s]{1,255}$", max_length=254)


def _alias() -> Any:
    return Field(None, min_length=1, max_length=128, description="the user, e.g. an employee id")


class PreviousDevice(Strict):
    """The credentials of the token this enrollment replaces (kept by the app across an update or restore)."""

    token: str = Field(..., min_length=1, max_length=128)
    password: str = Field(..., min_length=1, max_length=256, description="the MQTT password it was given")


class EnrollRequest(Strict):
    app_id: str = Field(..., min_length=1, max_length=64)
    platform: Literal["ios", "android", "web", "desktop"]
    package: str = Field(..., pattern=NAME_PATTERN, description="bundle id / package name")
    device_id: str = Field(..., min_length=1, max_length=200, description="stable per install")
    previous: PreviousDevice | None = Field(None, description="retire this token, carrying its alias, contact "
                                                                "and topics over to the new one")
    # Refused unless empty (403 identity_needs_ticket): kept here so that old clients get that clear answer.
    alias: str | None = _alias()
    contact: Contact | None = None


TICKET_TTL_DEFAULT_S = 900
TICKET_TTL_MAX_S = 7 * 86400


class TicketRequest(Strict):
    """What the app server binds a device to when it redeems the ticket."""

    alias: str | None = _alias()
    contact: Contact | None = None
    ttl_s: int = Field(TICKET_TTL_DEFAULT_S, ge=1, le=TICKET_TTL_MAX_S, description="seconds until it expires")


class IdentityRequest(Strict):
    """A device's user and fallback contact, set (or cleared with null) by the app server."""

    alias: str | None = _alias()
    contact: Contact | None = None


class Target(Strict):
    """Exactly one of the fields."""

    token: str | None = Field(None, min_length=1, max_length=128)
    tokens: list[str] | None = Field(None, min_length=1)
    topic: str | None = Field(None, pattern=TOPIC_PATTERN)
    alias: str | None = Field(None, min_length=1, max_length=128)
    all: Literal[True] | None = None

    @model_validator(mode="after")
    def exactly_one(self) -> Target:
        given = [k for k in ("token", "tokens", "topic", "alias", "all") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"`to` needs exactly one of token, tokens, topic, alias, all; got {given or 'none'}")
        return self


class FallbackPolicy(Strict):
    """Send by SMS and/or e-mail when the device has not acknowledged the push after `after_s`."""

    after_s: int = Field(..., ge=0, le=2419200)
    channels: list[Literal["sms", "email"]] = Field(..., min_length=1, max_length=2)
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
    to: Target
    title: str | None = Field(None, max_length=1024)
    body: str | None = Field(None, max_length=4096)
    data: dict[str, Any] | None = None
    ttl_s: int | None = Field(None, ge=0, description="0: deliver to connected devices now or never")
    priority: Literal["high", "normal"] | None = None
    collapse_key: str | None = Field(None, min_length=1, max_length=64)
    fallback: FallbackPolicy | None = None

    @model_validator(mode="after")
    def not_empty(self) -> PushMessage:
        if self.title is None and self.body is None and not self.data:
            raise ValueError("a push needs a title, a body or data")
        return self


class PushBatch(Strict):
    messages: list[PushMessage] = Field(..., min_length=1)


class Subscribers(Strict):
    tokens: list[str] = Field(..., min_length=1)


class NewAppRequest(Strict):
    name: str = Field(..., pattern=NAME_PATTERN)


class RotateRequest(Strict):
    grace_s: int | None = Field(None, ge=0, le=365 * 86400,
                                description="how long the previous key or secret keeps working; 0 ends it now")


class LimitsRequest(Strict):
    """Per-app send limits; null: the box's default (`limits.app_*`), 0: no limit."""

    pushes_per_s: float | None = Field(..., ge=0, le=1e6)
    targets_per_min: float | None = Field(..., ge=0, le=1e9)


class EnrollmentPolicyRequest(Strict):
    require_ticket: bool
