"""Per-app send limits: pushes per second and targets (devices reached) per minute, as token buckets that may
run into debt, so a batch bigger than one second's allowance still passes once and the next request waits.
A request is refused only while a bucket is in debt, before its body is read."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from appliance import errors as E
from appliance.errors import ApiError


@dataclass(slots=True)
class Bucket:
    rate_per_s: float  # refill
    capacity: float  # burst: one second of pushes, one minute of targets
    level: float
    at: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate_per_s)
        self.at = now

    def wait_s(self) -> float:
        """Seconds until the bucket is out of debt (0 when it is not in debt)."""
        return 0.0 if self.level > 0 else (-self.level + 1e-9) / self.rate_per_s


@dataclass(frozen=True, slots=True)
class Limits:
    pushes_per_s: float  # 0: no limit
    targets_per_min: float


class SendLimits:
    def __init__(self, defaults: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.defaults = defaults
        self.clock = clock
        self._buckets: dict[tuple[str, str], Bucket] = {}
        self._limits: dict[str, Limits] = {}

    def set_app(self, app_id: str, pushes_per_s: float | None, targets_per_min: float | None) -> None:
        """The app's own limits (None: the box's default); its buckets start full again."""
        self._limits[app_id] = Limits(self.defaults.pushes_per_s if pushes_per_s is None else pushes_per_s,
                                      self.defaults.targets_per_min if targets_per_min is None else targets_per_min)
        self._buckets.pop((app_id, "pushes"), None)
        self._buckets.pop((app_id, "targets"), None)

    def limits(self, app_id: str) -> Limits:
        return self._limits.get(app_id, self.defaults)

    def _bucket(self, app_id: str, kind: str) -> Bucket | None:
        limits = self.limits(app_id)
        per_s = limits.pushes_per_s if kind == "pushes" else limits.targets_per_min / 60.0
        if per_s <= 0:
            return None
        bucket = self._buckets.get((app_id, kind))
        now = self.clock()
        if bucket is None:
            capacity = per_s if kind == "pushes" else limits.targets_per_min
            bucket = self._buckets[(app_id, kind)] = Bucket(per_s, capacity, capacity, now)
        else:
            bucket.refill(now)
        return bucket

    def check(self, app_id: str) -> None:
        """Refuse with 429 while either of the app's buckets is in debt."""
        for kind, what in (("pushes", "pushes per second"), ("targets", "targets per minute")):
            bucket = self._bucket(app_id, kind)
            if bucket is not None and bucket.level <= 0:
                wait = bucket.wait_s()
                limits = self.limits(app_id)
                limit = limits.pushes_per_s if kind == "pushes" else limits.targets_per_min
                raise ApiError(E.RATE_LIMITED, f"the app is over its limit of {limit:g} {what}; retry in "
                               f"{math.ceil(wait)} s", retry_after_s=math.ceil(wait))

    def charge(self, app_id: str, pushes: int, targets: int) -> None:
        for kind, cost in (("pushes", pushes), ("targets", targets)):
            bucket = self._bucket(app_id, kind)
            if bucket is not None:
                bucket.level -= cost
