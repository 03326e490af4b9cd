"""Per-source admission for MQTT connections: a token bucket of new connections and a cap of open ones.

Asked once per accepted socket, before TLS: O(1) and bounded memory. A bucket that has refilled carries
no information and is forgotten; the table of buckets is capped (the least recently seen source goes
first), so many sources cannot grow it without bound. Open connections are counted only while open.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

ADMITTED, OVER_RATE, OVER_CONCURRENT = "admitted", "connect_rate", "max_connections_per_source"
MAX_SOURCES = 65536  # buckets remembered at once: about 14 MB at most (measured)
LOG_INTERVAL_S = 60.0  # a refused source is logged at most once per this


def source_key(address: str) -> str:
    """The unit a limit applies to: an IPv4 address, or an IPv6 /64 (one host usually holds a whole /64,
    so a per-address limit would be no limit). An IPv4-mapped IPv6 address counts as its IPv4 address."""
    if ":" not in address:
        return address
    if address.startswith("::ffff:") and "." in address:
        return address[7:]
    try:
        prefix = socket.inet_pton(socket.AF_INET6, address.split("%", 1)[0])[:8]
        return socket.inet_ntop(socket.AF_INET6, prefix + bytes(8)) + "/64"
    except OSError:
        return address


def exempt_sources(text: str) -> frozenset[str]:
    """`broker.connect_limit_exempt` ("127.0.0.1,::1") as source keys."""
    return frozenset(source_key(a.strip()) for a in text.split(",") if a.strip())


class _Bucket:
    __slots__ = ("tokens", "stamp", "refused", "logged_at")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.refused = 0  # refusals since the last log line
        self.logged_at = -LOG_INTERVAL_S * 2


class Admission:
    """`admit(address)` gives (verdict, key, refusals to log or 0); `release(key)` when an admitted
    connection closes. A rate of 0 turns the bucket off, a cap of 0 the concurrent count."""

    def __init__(self, rate: float, burst: int, max_per_source: int, exempt: frozenset[str] = frozenset(),
                 max_sources: int = MAX_SOURCES, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.max_per_source = max_per_source
        self.exempt = exempt
        self.max_sources = max_sources
        self.clock = clock
        self.buckets: dict[str, _Bucket] = {}  # least recently seen first
        self.open: dict[str, int] = {}  # admitted connections still open, per source; no zero entries
        self.refill_s = self.burst / rate if rate > 0 else 0.0

    @property
    def is_active(self) -> bool:
        return self.rate > 0 or self.max_per_source > 0

    def admit(self, address: str) -> tuple[str, str, int]:
        key = source_key(address)
        if key in self.exempt:
            return ADMITTED, "", 0
        now = self.clock()
        if self.max_per_source and self.open.get(key, 0) >= self.max_per_source:
            return OVER_CONCURRENT, key, self._refused(key, now)
        if self.rate > 0:
            buckets = self.buckets
            bucket = buckets.pop(key, None)
            if bucket is None:
                bucket = _Bucket(self.burst, now)
                if len(buckets) >= self.max_sources:
                    del buckets[next(iter(buckets))]
            else:
                bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
                bucket.stamp = now
            buckets[key] = bucket  # now the most recently seen
            self._forget_refilled(now)
            if bucket.tokens < 1:
                return OVER_RATE, key, self._refused(key, now)
            bucket.tokens -= 1
        if self.max_per_source:
            self.open[key] = self.open.get(key, 0) + 1
        return ADMITTED, key, 0

    def release(self, key: str) -> None:
        if not key or not self.max_per_source:
            return
        left = self.open.get(key, 0) - 1
        if left > 0:
            self.open[key] = left
        else:
            self.open.pop(key, None)

    def _forget_refilled(self, now: float) -> None:
        """Drop up to two least recently seen buckets that are full again: amortised O(1) per admit."""
        buckets = self.buckets
        for _ in range(2):
            key = next(iter(buckets))
            bucket = buckets[key]
            if now - bucket.stamp < self.refill_s or now - bucket.logged_at < LOG_INTERVAL_S:
                return
            del buckets[key]

    def _refused(self, key: str, now: float) -> int:
        """Count a refusal; the number to log now (once per source per LOG_INTERVAL_S), else 0."""
        bucket = self.buckets.get(key)
        if bucket is None:  # over the concurrent cap with the bucket off (or forgotten)
            if len(self.buckets) >= self.max_sources:
                del self.buckets[next(iter(self.buckets))]
            bucket = self.buckets[key] = _Bucket(self.burst, now)
        bucket.refused += 1
        if now - bucket.logged_at < LOG_INTERVAL_S:
            return 0
        bucket.logged_at, count, bucket.refused = now, bucket.refused, 0
        return count


__all__ = ["ADMITTED", "OVER_CONCURRENT", "OVER_RATE", "Admission", "exempt_sources", "source_key"]
