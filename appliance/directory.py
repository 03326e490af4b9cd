"""Who is enrolled: apps, active devices and topic subscribers, held in memory.

Loaded from the store at start and updated only after the store committed the change, so the
hot path (auth, target resolution) never reads the database.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any


def hash_secret(secret: str) -> str:
    """SHA-256 of a high-entropy random secret: safe (no dictionary attack applies) and fast on the loop."""
    return hashlib.sha256(secret.encode()).hexdigest()


def hash_secret_pbkdf2(secret: str, iterations: int = 101) -> str:
    """The same secret as Mosquitto's dynamic-security plugin stores it (PBKDF2-SHA512, 12-byte salt), so a
    broker can be provisioned without the secret: `pbkdf2-sha512$<iterations>$<salt b64>$<hash b64>`.
    101 iterations is the plugin's own default; the secret's 192 random bits are what protect it."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", secret.encode(), salt, iterations)
    return f"pbkdf2-sha512${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def secret_matches(secret: str, digest: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), digest)


def new_secret(prefix: str, nbytes: int = 32) -> str:
    return prefix + secrets.token_urlsafe(nbytes)


@dataclass(slots=True)
class App:
    id: str
    name: str
    api_key_hash: str
    enrollment_secret_hash: str
    fallback: dict[str, Any] | None = None
    # After a rotation the previous key / secret stays valid until its `_until` (epoch seconds).
    api_key_prev_hash: str | None = None
    api_key_prev_until: float = 0.0
    secret_prev_hash: str | None = None
    secret_prev_until: float = 0.0
    require_ticket: bool = False
    pushes_per_s: float | None = None  # send limits; None: the box's default
    targets_per_min: float | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> App:
        return cls(row["id"], row["name"], row["api_key_hash"], row["enrollment_secret_hash"],
                   json.loads(row["fallback"]) if row["fallback"] else None,
                   row["api_key_prev_hash"], row["api_key_prev_until"] or 0.0,
                   row["secret_prev_hash"], row["secret_prev_until"] or 0.0, bool(row["require_ticket"]),
                   row["pushes_per_s"], row["targets_per_min"])

    def credential(self, index: str) -> tuple[str, str | None, float]:
        """("key" or "secret"): the current hash, the previous one and until when the previous works."""
        if index == "key":
            return self.api_key_hash, self.api_key_prev_hash, self.api_key_prev_until
        return self.enrollment_secret_hash, self.secret_prev_hash, self.secret_prev_until


@dataclass(slots=True, eq=False)
class Device:
    id: int
    app_id: str
    token: str
    client_id: str
    password_hash: str
    platform: str
    package: str
    device_id: str
    alias: str | None
    phone: str | None
    email: str | None
    last_seq: int
    dropped_through: int
    topics: set[str] = field(default_factory=set)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Device:
        return cls(
            id=row["id"], app_id=row["app_id"], token=row["token"], client_id=row["client_id"],
            password_hash=row["mqtt_password_hash"], platform=row["platform"], package=row["package"],
            device_id=row["device_id"], alias=row["alias"], phone=row["phone"], email=row["email"],
            last_seq=row["last_seq"], dropped_through=row["dropped_through"],
        )


class Directory:
    """In-memory indexes over apps and active devices."""

    def __init__(self) -> None:
        self.apps: dict[str, App] = {}
        self.app_by_key: dict[str, str] = {}
        self.app_by_secret: dict[str, str] = {}
        self.by_token: dict[str, Device] = {}
        self.by_client: dict[str, Device] = {}
        self.by_id: dict[int, Device] = {}
        self.app_devices: dict[str, dict[int, Device]] = {}
        self.aliases: dict[tuple[str, str], dict[int, Device]] = {}
        self.topics: dict[tuple[str, str], dict[int, Device]] = {}

    # -- apps ------------------------------------------------------------------------------------
    def add_app(self, app: App) -> None:
        """Add an app, or replace it (after a rotation): its current and previous key and secret map to it."""
        old = self.apps.get(app.id)
        for name, index in self._credential_indexes():
            if old is not None:
                for digest in old.credential(name)[:2]:
                    index.pop(digest or "", None)
            for digest in app.credential(name)[:2]:
                if digest:
                    index[digest] = app.id
        self.apps[app.id] = app
        self.app_devices.setdefault(app.id, {})

    def _credential_indexes(self) -> tuple[tuple[str, dict[str, str]], ...]:
        return ("key", self.app_by_key), ("secret", self.app_by_secret)

    def app_for_key(self, api_key: str) -> App | None:
        return self._app_for(self.app_by_key, "key", api_key)

    def app_for_secret(self, secret: str) -> App | None:
        return self._app_for(self.app_by_secret, "secret", secret)

    def _app_for(self, index: dict[str, str], name: str, credential: str) -> App | None:
        """The app whose current credential this is, or whose previous one within its grace period."""
        digest = hash_secret(credential)
        app = self.apps.get(index.get(digest, ""))
        if app is None:
            return None
        current, _, previous_until = app.credential(name)
        return app if digest == current or time.time() < previous_until else None

    # -- devices ---------------------------------------------------------------------------------
    def add_device(self, device: Device) -> None:
        self.by_token[device.token] = device
        self.by_client[device.client_id] = device
        self.by_id[device.id] = device
        self.app_devices.setdefault(device.app_id, {})[device.id] = device
        if device.alias:
            self.aliases.setdefault((device.app_id, device.alias), {})[device.id] = device

    def remove_device(self, device: Device) -> None:
        self.by_token.pop(device.token, None)
        self.by_client.pop(device.client_id, None)
        self.by_id.pop(device.id, None)
        self.app_devices.get(device.app_id, {}).pop(device.id, None)
        self._unindex_alias(device)
        for topic in device.topics:
            subs = self.topics.get((device.app_id, topic), {})
            subs.pop(device.id, None)
            if not subs:
                self.topics.pop((device.app_id, topic), None)
        device.topics.clear()

    def set_identity(self, device: Device, alias: str | None, phone: str | None, email: str | None) -> None:
        """Bind the device to another user (alias) and contact, as the provider said."""
        self._unindex_alias(device)
        device.alias, device.phone, device.email = alias, phone, email
        if alias:
            self.aliases.setdefault((device.app_id, alias), {})[device.id] = device

    def _unindex_alias(self, device: Device) -> None:
        if device.alias:
            members = self.aliases.get((device.app_id, device.alias), {})
            members.pop(device.id, None)
            if not members:
                self.aliases.pop((device.app_id, device.alias), None)

    def subscribe(self, device: Device, topic: str) -> None:
        self.topics.setdefault((device.app_id, topic), {})[device.id] = device
        device.topics.add(topic)

    def unsubscribe(self, device: Device, topic: str) -> None:
        subs = self.topics.get((device.app_id, topic))
        if subs is not None:
            subs.pop(device.id, None)
            if not subs:
                del self.topics[(device.app_id, topic)]
        device.topics.discard(topic)

    def authenticate_device(self, client_id: str, username: str | None, password: str | None) -> Device | None:
        """The MQTT login: client id and username are the device's client id, password its MQTT secret."""
        device = self.by_client.get(client_id)
        if device is None or username != client_id or password is None:
            return None
        return device if secret_matches(password, device.password_hash) else None
