"""Apps and devices: create, rotate, enroll, revoke, subscribe. Store first, then the in-memory directory."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import certs
from appliance.directory import App, Device, Directory, hash_secret, hash_secret_pbkdf2, new_secret
from appliance.errors import APP_EXISTS, APP_NOT_FOUND, DEVICE_NOT_FOUND, ApiError
from appliance.store import Store
from appliance.store import apps as sql_apps
from appliance.store import devices as sql_devices
from appliance.store import escalations as sql_escalations


class BrokerCredentials(Protocol):
    """Device logins held by the broker itself (Mosquitto's dynamic security); the embedded broker reads the
    directory instead and needs nothing. Called after the store committed the change."""

    async def add_device(self, client_id: str, password: str) -> None: ...
    async def remove_device(self, client_id: str) -> None: ...


class DirectoryCredentials:
    """The embedded broker authenticates against the directory: nothing to provision."""

    async def add_device(self, client_id: str, password: str) -> None:
        return None

    async def remove_device(self, client_id: str) -> None:
        return None


@dataclass
class NewApp:
    app_id: str
    api_key: str
    enrollment_secret: str

    def as_json(self) -> dict[str, str]:
        return {"app_id": self.app_id, "api_key": self.api_key, "enrollment_secret": self.enrollment_secret}


def new_app_rows(name: str, now: float) -> tuple[NewApp, dict[str, Any]]:
    created = NewApp(app_id="app_" + secrets.token_hex(6), api_key=new_secret("ak_"),
                     enrollment_secret=new_secret("es_"))
    row = {"id": created.app_id, "name": name, "api_key_hash": hash_secret(created.api_key),
           "enrollment_secret_hash": hash_secret(created.enrollment_secret), "created_at": now}
    return created, row


def _insert_app_checked(conn: Any, row: dict[str, Any]) -> None:
    if sql_apps.find_app_id(conn, row["name"]) is not None:
        raise ApiError(APP_EXISTS, f"an app named {row['name']!r} exists")
    sql_apps.insert_app(conn, row)


def _rotate_checked(conn: Any, name_or_id: str, key_hash: str, now: float) -> str:
    app_id = sql_apps.find_app_id(conn, name_or_id)
    if app_id is None:
        raise ApiError(APP_NOT_FOUND, f"no app named or with id {name_or_id!r}")
    sql_apps.set_api_key(conn, app_id, key_hash, now)
    return app_id


def _revoke_checked(conn: Any, token: str, now: float) -> tuple[int, str]:
    row = sql_devices.find_token(conn, token)
    if row is None or row["retired_at"] is not None:
        raise ApiError(DEVICE_NOT_FOUND, "no active device with that token")
    sql_devices.retire_device(conn, row["id"], "revoked", now)
    return int(row["id"]), str(row["client_id"])


def revoke_device_certs(cert_store: certs.CertStore | None, client_id: str) -> int:
    """A revoked device's certificates go on the CRL too (none issued is fine)."""
    if cert_store is None or not cert_store.has_ca():
        return 0
    try:
        return len(certs.revoke_device(cert_store, client_id))
    except certs.UnknownCert:
        return 0


class OfflineAccounts:
    """The same operations on a store with no daemon running (CLI without the admin socket)."""

    def __init__(self, store: Store, cert_store: certs.CertStore | None = None) -> None:
        self.store = store
        self.cert_store = cert_store

    def create_app(self, name: str) -> NewApp:
        created, row = new_app_rows(name, time.time())
        self.store.write_now(_insert_app_checked, row)
        return created

    def rotate_key(self, name_or_id: str) -> dict[str, str]:
        key = new_secret("ak_")
        app_id = self.store.write_now(_rotate_checked, name_or_id, hash_secret(key), time.time())
        return {"app_id": app_id, "api_key": key}

    def list_apps(self) -> list[dict[str, Any]]:
        return [_public_app(a) for a in self.store.read_now(sql_apps.select_apps)]

    def set_app_fallback(self, name_or_id: str, policy: dict[str, Any] | None) -> dict[str, Any]:
        app_id = self.store.read_now(sql_apps.find_app_id, name_or_id)
        if app_id is None:
            raise ApiError(APP_NOT_FOUND, f"no app named or with id {name_or_id!r}")
        self.store.write_now(sql_escalations.set_app_fallback, app_id, json.dumps(policy) if policy else None)
        return {"app_id": app_id, "fallback": policy}

    def list_devices(self, app: str | None) -> list[dict[str, Any]]:
        app_id = None
        if app is not None:
            app_id = self.store.read_now(sql_apps.find_app_id, app)
            if app_id is None:
                raise ApiError(APP_NOT_FOUND, f"no app named or with id {app!r}")
        return [_public_device(d) for d in self.store.read_now(sql_devices.select_devices, app_id)]

    def revoke(self, token: str) -> dict[str, Any]:
        now = time.time()
        _, client_id = self.store.write_now(_revoke_checked, token, now)
        revoked = revoke_device_certs(self.cert_store, client_id)
        return {"token": token, "revoked_at": now, "certificates_revoked": revoked}


class Accounts(OfflineAccounts):
    """Inside the daemon: writes go through the writer thread and the directory follows each commit."""

    def __init__(self, store: Store, directory: Directory, drop_device: Callable[[Device, str], None],
                 cert_store: certs.CertStore | None = None, credentials: BrokerCredentials | None = None) -> None:
        super().__init__(store, cert_store)
        self.directory = directory
        self.drop_device = drop_device
        self.credentials: BrokerCredentials = credentials or DirectoryCredentials()

    def load(self) -> None:
        for row in self.store.read_now(sql_apps.select_apps):
            self.directory.add_app(App(row["id"], row["name"], row["api_key_hash"], row["enrollment_secret_hash"],
                                       json.loads(row["fallback"]) if row["fallback"] else None))
        for row in self.store.read_now(sql_devices.select_active_devices):
            self.directory.add_device(Device.from_row(row))
        for app_id, topic, device_id in self.store.read_now(sql_devices.select_subscriptions):
            device = self.directory.by_id.get(device_id)
            if device is not None and device.app_id == app_id:
                self.directory.subscribe(device, topic)

    async def create_app_async(self, name: str) -> NewApp:
        created, row = new_app_rows(name, time.time())
        await self.store.write(_insert_app_checked, row)
        self.directory.add_app(App(row["id"], name, row["api_key_hash"], row["enrollment_secret_hash"]))
        return created

    async def rotate_key_async(self, name_or_id: str) -> dict[str, str]:
        key = new_secret("ak_")
        key_hash = hash_secret(key)
        app_id = await self.store.write(_rotate_checked, name_or_id, key_hash, time.time())
        app = self.directory.apps[app_id]
        self.directory.add_app(App(app.id, app.name, key_hash, app.enrollment_secret_hash, app.fallback))
        return {"app_id": app_id, "api_key": key}

    async def set_app_fallback_async(self, name_or_id: str, policy: dict[str, Any] | None) -> dict[str, Any]:
        """Set (or clear, with None) the app's default fallback policy for pushes that give none."""
        app_id = await self.store.read(sql_apps.find_app_id, name_or_id)
        if app_id is None:
            raise ApiError(APP_NOT_FOUND, f"no app named or with id {name_or_id!r}")
        await self.store.write(sql_escalations.set_app_fallback, app_id, json.dumps(policy) if policy else None)
        self.directory.apps[app_id].fallback = policy
        return {"app_id": app_id, "fallback": policy}

    async def set_alias_contact(self, app_id: str, alias: str, phone: str | None, email: str | None) -> None:
        await self.store.write(sql_escalations.set_alias_contact, app_id, alias, phone, email, time.time())

    async def list_apps_async(self) -> list[dict[str, Any]]:
        return [_public_app(a) for a in await self.store.read(sql_apps.select_apps)]

    async def list_devices_async(self, app: str | None) -> list[dict[str, Any]]:
        app_id = None
        if app is not None:
            app_id = await self.store.read(sql_apps.find_app_id, app)
            if app_id is None:
                raise ApiError(APP_NOT_FOUND, f"no app named or with id {app!r}")
        rows = await self.store.read(sql_devices.select_devices, app_id)
        return [_public_device(row) for row in rows]

    async def revoke_async(self, token: str) -> dict[str, Any]:
        now = time.time()
        device_id, client_id = await self.store.write(_revoke_checked, token, now)
        device = self.directory.by_id.get(device_id)
        if device is not None:
            self.directory.remove_device(device)
            self.drop_device(device, "revoked")
        await self.credentials.remove_device(client_id)  # a broker holding logins also disconnects it
        revoked = await asyncio.to_thread(revoke_device_certs, self.cert_store, client_id)
        return {"token": token, "revoked_at": now, "certificates_revoked": revoked}

    async def enroll(self, app: App, fields: dict[str, Any]) -> tuple[Device, str]:
        """Issue a new token for (app, package, device_id), retiring the one it had; returns the MQTT password."""
        now = time.time()
        old = self.directory.by_identity.get((app.id, fields["package"], fields["device_id"]))
        password = new_secret("", 24)
        contact = fields.get("contact") or {}
        row = {
            "app_id": app.id, "token": new_secret("dt_", 24), "client_id": "d-" + secrets.token_hex(8),
            "mqtt_password_hash": hash_secret(password), "mqtt_password_pbkdf2": hash_secret_pbkdf2(password),
            "platform": fields["platform"],
            "package": fields["package"], "device_id": fields["device_id"], "alias": fields.get("alias"),
            "phone": contact.get("phone"), "email": contact.get("email"), "created_at": now,
        }
        row["id"] = await self.store.write(sql_devices.enroll_device, row, old.id if old else None)
        if old is not None:
            self.directory.remove_device(old)
            self.drop_device(old, "reenrolled")
            await self.credentials.remove_device(old.client_id)
        device = Device.from_row({**row, "last_seq": 0, "dropped_through": 0})
        self.directory.add_device(device)
        await self.credentials.add_device(device.client_id, password)  # before the answer: it may connect at once
        return device, password

    async def set_subscription(self, app_id: str, topic: str, devices: list[Device], subscribe: bool) -> None:
        ids = [d.id for d in devices]
        if subscribe:
            await self.store.write(sql_devices.subscribe, app_id, topic, ids)
            for d in devices:
                self.directory.subscribe(d, topic)
        else:
            await self.store.write(sql_devices.unsubscribe, app_id, topic, ids)
            for d in devices:
                self.directory.unsubscribe(d, topic)


def _public_app(row: dict[str, Any]) -> dict[str, Any]:
    return {"app_id": row["id"], "name": row["name"], "created_at": row["created_at"],
            "key_rotated_at": row["key_rotated_at"], "devices": row["devices"],
            "fallback": json.loads(row["fallback"]) if row["fallback"] else None}


def _public_device(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "token": row["token"], "app_id": row["app_id"], "client_id": row["client_id"], "platform": row["platform"],
        "package": row["package"], "device_id": row["device_id"], "alias": row["alias"],
        "created_at": row["created_at"], "retired_at": row["retired_at"], "retired_reason": row["retired_reason"],
        "last_seq": row["last_seq"], "last_seen": row["last_seen"],
    }
