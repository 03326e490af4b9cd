"""SMS through an HTTP gateway (aiohttp): Kannel's `sendsms`, or any gateway described by a URL template.

Placeholders in the generic template: {to} (+E.164), {to_digits} (without +), {text}, {sender},
{reference}. In the URL they are percent-encoded; in the JSON body they are JSON-escaped.
"""

from __future__ import annotations

import json
import logging
import ssl
import urllib.parse
from dataclasses import dataclass
from typing import Any

import aiohttp

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

HTTP_METHODS = ("GET", "POST", "PUT")
PLACEHOLDERS = ("to", "to_digits", "text", "sender", "reference")
_KANNEL_DENIED = "denied by white- and/or black-lists"


def parse_statuses(spec: str) -> frozenset[int]:
    """"200-299,302" -> the set of those statuses. Raises ValueError for anything else."""
    statuses: set[int] = set()
    for item in spec.replace(" ", "").split(","):
        low, _, high = item.partition("-")
        first, last = int(low), int(high or low)
        if not 100 <= first <= last <= 599:
            raise ValueError(f"bad status range {item!r}")
        statuses.update(range(first, last + 1))
    return frozenset(statuses)


def fill_template(template: str, values: dict[str, str], escape: Any) -> str:
    """Replace each {name} of PLACEHOLDERS with `escape(value)`; other braces (JSON) stay as they are."""
    for name in PLACEHOLDERS:
        template = template.replace("{" + name + "}", escape(values.get(name, "")))
    return template


def url_escape(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def json_escape(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)[1:-1]


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def classify_http_status(status: int, body: str, headers: Any) -> FallbackError:
    """HTTP status of a refused send: 5xx, 408 and 429 are temporary; other 4xx permanent."""
    detail = f"HTTP {status}: {' '.join(body.split())[:200]}"
    if status == 429:
        return TemporaryFailure(Reason.THROTTLED, detail, _retry_after(headers))
    if status == 408:
        return TemporaryFailure(Reason.TIMEOUT, detail)
    if status >= 500:
        return TemporaryFailure(Reason.SERVER_ERROR, detail, _retry_after(headers))
    if status in (401, 403):
        return PermanentFailure(Reason.AUTH, detail)
    if _KANNEL_DENIED in body:
        return PermanentFailure(Reason.INVALID_RECIPIENT, detail)
    return PermanentFailure(Reason.REJECTED, detail)


@dataclass(frozen=True)
class KannelConfig:
    """Settings of the `kannel` transport; `docs/fallback.md` and `fallback.transports.SETTINGS` explain each."""

    username: str
    password: str = ""
    url: str = "http://127.0.0.1:13013/cgi-bin/sendsms"
    sender: str = ""
    smsc: str = ""
    timeout_s: float = 10.0
    ca_file: str = ""
    max_parts: int = 6
    default_country_code: str = ""

    def __post_init__(self) -> None:
        problems = _common_problems(self.url, self.timeout_s, self.max_parts)
        if not self.username:
            problems.append("username: required")
        if problems:
            raise SettingsError(problems)


@dataclass(frozen=True)
class HttpSmsConfig:
    """Settings of the generic `http` transport; see `docs/fallback.md`."""

    url: str
    method: str = "POST"
    body: str = ""
    headers: str = ""
    success_statuses: str = "200-299"
    id_field: str = ""
    sender: str = ""
    timeout_s: float = 10.0
    ca_file: str = ""
    max_parts: int = 6
    default_country_code: str = ""

    def __post_init__(self) -> None:
        problems = _common_problems(self.url, self.timeout_s, self.max_parts)
        if self.method.upper() not in HTTP_METHODS:
            problems.append(f"method: expected one of {', '.join(HTTP_METHODS)}, got {self.method!r}")
        if self.body:
            try:
                json.loads(fill_template(self.body, {}, json_escape))
            except ValueError as exc:
                problems.append(f"body: not a JSON template: {exc}")
            if self.method.upper() == "GET":
                problems.append("body: a GET request carries no body")
        try:
            parse_statuses(self.success_statuses)
        except ValueError as exc:
            problems.append(f"success_statuses: {exc}")
        try:
            header_map = json.loads(self.headers) if self.headers else {}
            if not isinstance(header_map, dict) or not all(isinstance(v, str) for v in header_map.values()):
                raise ValueError("expected a JSON object of strings")
        except ValueError as exc:
            problems.append(f"headers: {exc}")
        if problems:
            raise SettingsError(problems)


def _common_problems(url: str, timeout_s: float, max_parts: int) -> list[str]:
    problems = []
    if not url.startswith(("http://", "https://")):
        problems.append(f"url: expected http:// or https://, got {url!r}")
    if timeout_s <= 0:
        problems.append("timeout_s: must be positive")
    if not 1 <= max_parts <= gsm.MAX_PARTS:
        problems.append(f"max_parts: 1 to {gsm.MAX_PARTS}")
    return problems


class _HttpSmsSender:
    transport = ""

    def __init__(self, ca_file: str, timeout_s: float, max_parts: int, default_country_code: str) -> None:
        self._ca_file = ca_file
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_parts = max_parts
        self._country = default_country_code
        self._session: aiohttp.ClientSession | None = None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            try:
                context = ssl.create_default_context(cafile=self._ca_file or None)
            except (OSError, ssl.SSLError) as exc:
                raise PermanentFailure(Reason.CONFIG, f"cannot load ca_file {self._ca_file!r}: {exc}") from None
            self._session = aiohttp.ClientSession(timeout=self._timeout,
                                                  connector=aiohttp.TCPConnector(ssl=context))
        return self._session

    async def send(self, notice: Notice) -> Receipt:
        masked = mask_phone(notice.to)
        try:
            sms = gsm.prepare_sms(notice, self._max_parts, self._country)
            masked, parts = mask_phone(sms.number), sms.parts
            ids = await self._post(sms.number, sms.text, parts.encoding, notice.reference)
        except FallbackError as exc:
            log.warning("sms refused transport=%s ref=%s to=%s reason=%s temporary=%s detail=%s", self.transport,
                        notice.reference, masked, exc.reason, exc.temporary, exc.detail)
            raise
        log.info("sms accepted transport=%s ref=%s to=%s parts=%d encoding=%s message_ids=%s", self.transport,
                 notice.reference, masked, len(parts.chunks), parts.encoding, ",".join(ids))
        log.debug("sms text ref=%s text=%r", notice.reference, notice.text)
        return Receipt(self.transport, tuple(ids), len(parts.chunks))

    async def _post(self, number: str, text: str, encoding: str, reference: str) -> tuple[str, ...]:
        raise NotImplementedError

    async def _request(self, method: str, url: str, ok: frozenset[int], **kwargs: Any) -> tuple[str, str]:
        """Return (content type, body) of an answer whose status is in `ok`; raise our failure otherwise."""
        session = self._get_session()
        try:
            async with session.request(method, url, **kwargs) as response:
                body = await response.text(errors="replace")
                if response.status not in ok:
                    raise classify_http_status(response.status, body, response.headers)
                return response.content_type, body
        except aiohttp.ClientConnectorCertificateError as exc:
            raise PermanentFailure(Reason.TLS_CERTIFICATE, str(exc.certificate_error)) from None
        except aiohttp.ClientConnectorError as exc:
            raise TemporaryFailure(Reason.UNREACHABLE, str(exc)) from None
        except TimeoutError:
            raise TemporaryFailure(Reason.TIMEOUT, f"no answer within {self._timeout.total:g}s") from None
        except aiohttp.ClientError as exc:
            raise TemporaryFailure(Reason.CONNECTION_LOST, repr(exc)) from None


class KannelSender(_HttpSmsSender):
    """Kannel smsbox `GET /cgi-bin/sendsms`: 202 means accepted; Kannel splits long texts itself."""

    transport = "kannel"

    def __init__(self, config: KannelConfig) -> None:
        super().__init__(config.ca_file, config.timeout_s, config.max_parts, config.default_country_code)
        self.config = config

    async def _post(self, number: str, text: str, encoding: str, reference: str) -> tuple[str, ...]:
        query = {"username": self.config.username, "password": self.config.password, "to": number, "text": text,
                 "charset": "UTF-8", "coding": "0" if encoding == "gsm7" else "2"}
        if self.config.sender:
            query["from"] = self.config.sender
        if self.config.smsc:
            query["smsc"] = self.config.smsc
        await self._request("GET", self.config.url, frozenset(range(200, 300)), params=query)
        return ()


class HttpSmsSender(_HttpSmsSender):
    """Any HTTP gateway: URL (and optional JSON body) from templates, success by status."""

    transport = "http"

    def __init__(self, config: HttpSmsConfig) -> None:
        super().__init__(config.ca_file, config.timeout_s, config.max_parts, config.default_country_code)
        self.config = config
        self._ok = parse_statuses(config.success_statuses)
        self._headers = json.loads(config.headers) if config.headers else {}

    async def _post(self, number: str, text: str, encoding: str, reference: str) -> tuple[str, ...]:
        values = {"to": number, "to_digits": number.lstrip("+"), "text": text, "sender": self.config.sender,
                  "reference": reference}
        url = fill_template(self.config.url, values, url_escape)
        kwargs: dict[str, Any] = {"headers": dict(self._headers)}
        if self.config.body:
            kwargs["data"] = fill_template(self.config.body, values, json_escape).encode("utf-8")
            kwargs["headers"].setdefault("Content-Type", "application/json")
        content_type, body = await self._request(self.config.method.upper(), url, self._ok, **kwargs)
        return self._message_ids(content_type, body)

    def _message_ids(self, content_type: str, body: str) -> tuple[str, ...]:
        """The gateway's message id at `id_field` (dotted path into a JSON answer), if configured."""
        if not self.config.id_field:
            return ()
        try:
            value: Any = json.loads(body)
            for key in self.config.id_field.split("."):
                value = value[int(key)] if isinstance(value, list) else value[key]
        except (ValueError, KeyError, IndexError, TypeError):
            log.warning("sms gateway answer has no %s (content type %s)", self.config.id_field, content_type)
            return ()
        return (str(value),)
