"""Logging setup: text or JSON lines on stderr, per-logger level overrides.

Logger names are a fixed list (LOGGERS); events use `key=value` fields, accepted and refused alike.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

LOGGERS = (
    "appliance.daemon",
    "appliance.broker",
    "appliance.dispatch",
    "appliance.store",
    "appliance.api",
    "appliance.presence",
    "fallback.sms",
    "fallback.email",
    "certs",
)


# C0 and C1 controls, DEL, and lone surrogates (undecodable bytes): none may reach a text log line.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _UNPRINTABLE.sub(_escape, record.getMessage()),  # a lone surrogate cannot be written as UTF-8
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """One event, one line: control characters in the message are escaped (`\\x0a`), so no value a
    client sends can start a forged line (#16); tracebacks keep their own lines below it."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = _UNPRINTABLE.sub(_escape, record.message)
        return super().formatMessage(record)


def setup_logging(level: str = "info", fmt: str = "text", overrides: str = "") -> None:
    """Configure the root logger once; amqtt's own chatter is held at WARNING unless overridden."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # amqtt logs an f-string per connection and per filter match at INFO/DEBUG.
    logging.getLogger("amqtt").setLevel(logging.WARNING)
    logging.getLogger("transitions").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    for item in filter(None, (part.strip() for part in overrides.split(","))):
        name, _, lvl = item.partition("=")
        logging.getLogger(name.strip()).setLevel(lvl.strip().upper() or "INFO")


def parse_overrides(overrides: str) -> list[str]:
    """Problems in a `log.overrides` value (empty when valid)."""
    problems = []
    for item in filter(None, (part.strip() for part in overrides.split(","))):
        name, sep, lvl = item.partition("=")
        if not sep or not name.strip() or lvl.strip().upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            problems.append(f"`log.overrides`: expected logger=level, got {item!r}")
    return problems
