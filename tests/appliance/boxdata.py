"""Builders for store-level tests: a real SQLite store in tmp_path, apps, devices and pushes that read like
sentences (`data.device(phone=...)`, `data.push_to(device, ttl_s=5)`), and a fake clock to move time."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance.directory import App, Device, Directory
from appliance.dispatch import new_message_id
from appliance.store import Store
from appliance.store import apps as sql_apps
from appliance.store import devices as sql_devices
from appliance.store import messages as sql_messages

T0 = 1_800_000_000.0


class Clock:
    """Time that moves only when a test says so."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class BoxData:
    store: Store
    clock: Clock
    directory: Directory = field(default_factory=Directory)
    app_id: str = "app_1"
    _numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.store.write_now(sql_apps.insert_app, {"id": self.app_id, "name": "demo", "api_key_hash": "k",
                                                   "enrollment_secret_hash": "s", "created_at": self.clock()})
        self.directory.add_app(App(self.app_id, "demo", "k", "s"))

    def device(self, phone: str | None = None, email: str | None = None) -> Device:
        n = next(self._numbers)
        row = {"app_id": self.app_id, "token": f"dt_{n}", "client_id": f"d-{n}", "mqtt_password_hash": "h",
               "mqtt_password_pbkdf2": None, "platform": "android", "package": "p", "device_id": f"x{n}",
               "alias": None, "phone": phone, "email": email, "created_at": self.clock()}
        row["id"] = self._write(sql_devices.insert_device, row)
        device = Device.from_row({**row, "last_seq": 0, "dropped_through": 0})
        self.directory.add_device(device)
        return device

    def push_to(self, *devices: Device, ttl_s: float = 60, collapse_key: str | None = None,
                fallback: dict[str, Any] | None = None, title: str = "Alarm", body: str = "Hall B") -> str:
        """Persist one push to `devices` (each gets its next seq); returns the message id."""
        now = self.clock()
        mid = new_message_id(now)
        payload = {"id": mid, "app_id": self.app_id, "title": title, "body": body, "collapse_key": collapse_key}
        message = {"id": mid, "app_id": self.app_id, "created_at": now, "expires_at": now + ttl_s,
                   "payload": json.dumps(payload), "collapse_key": collapse_key, "target": "{}",
                   "targeted": len(devices), "fallback": json.dumps(fallback) if fallback else None}
        deliveries = []
        for device in devices:
            device.last_seq += 1
            deliveries.append((device.id, device.last_seq))
        channels = tuple(fallback["channels"]) if fallback else ()
        due = now + fallback["after_s"] if fallback else 0.0
        self._write(sql_messages.insert_pushes, [sql_messages.NewPush(message, deliveries, channels, due)])
        return mid

    def ack(self, device: Device, mid: str, state: str = "received") -> None:
        rank = sql_messages.ACK_RANKS[state]
        self._write(sql_messages.mark_acked, [], [(rank, self.clock(), mid, device.id, rank)])

    def delivery(self, device: Device, mid: str) -> tuple[str, str | None]:
        """(state name, ack name) of one inbox row."""
        state, ack = self.store.read_now(lambda conn: conn.execute(
            "SELECT state, ack FROM deliveries WHERE device = ? AND message_id = ?", (device.id, mid)).fetchone())
        return sql_messages.STATE_NAMES[state], sql_messages.ACK_NAMES.get(ack)

    def count(self, sql: str, *args: Any) -> int:
        return int(self.store.read_now(lambda conn: conn.execute(sql, args).fetchone()[0]))

    def _write(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Directly when the writer is stopped; tests with a running writer build their data before start()."""
        return self.store.write_now(fn, *args)
