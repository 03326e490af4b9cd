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
from appliance import errors as E
from appliance.directory import App, Device, Directory, hash_secret, hash_secret_pbkdf2, new_secret
from appliance.errors import APP_EXISTS, APP_NOT_FOUND, DEVICE_NOT_FOUND, ApiError
from appliance.store import Store
from appliance.store import apps as sql_apps
from appliance.store import audit as sql_audit
from appliance.store import devices as sql_devices
from appliance.store import escalations as sql_escalations
from appliance.store import tickets as sql_tickets

# How long the previous credential keeps working after a rotation unless the caller says otherwise: an API
# key lives on a few app servers that a deploy updates within a day; an enrollment secret ships inside every
# copy of the app, and old copies keep enrolling until users update, so it gets a release cycle.
API_KEY_GRACE_S = 86400
SECRET_GRACE_S = 30 * 86400


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


def _insert_app_checked(conn: Any, row: dict[str, Any], actor: str) -> None:
    if sql_apps.find_app_id(conn, row["name"]) is not None:
        raise ApiError(APP_EXISTS, f"an app named {row['name']!r} exists")
    sql_apps.insert_app(conn, row)
    sql_audit.record(conn, actor, "app.create", row["id"], row["name"])


def _app_id_checked(conn: Any, name_or_id: str) -> str:
    app_id = sql_apps.find_app_id(conn, name_or_id)
    if app_id is None:
        raise ApiError(APP_NOT_FOUND, f"no app named or with id {name_or_id!r}")
    return app_id


def _rotate_checked(conn: Any, name_or_id: str, what: str, new_hash: str, grace_s: int, now: float,
                    actor: str) -> dict[str, Any]:
    """Rotate the API key or the enrollment secret; return the app's row as it is after the change."""
    app_id = _app_id_checked(conn, name_or_id)
    rotate = sql_apps.rotate_api_key if what == "api_key" else sql_apps.rotate_secret
    rotate(conn, app_id, new_hash, now + grace_s, now)
    sql_audit.record(conn, actor, f"app.rotate_{'key' if what == 'api_key' else 'secret'}", app_id,
                     detail={"grace_s": grace_s, "previous_valid_until": now + grace_s})
    row = sql_apps.select_app(conn, app_id)
    assert row is not None
    return row


def _app_setting_checked(conn: Any, name_or_id: str, action: str, apply: Callable[[Any, str], None],
                         detail: dict[str, Any], actor: str) -> str:
    app_id = _app_id_checked(conn, name_or_id)
    apply(conn, app_id)
    sql_audit.record(conn, actor, action, app_id, detail=detail)
    return app_id


def _retire_checked(conn: Any, token: str, app_id: str | None, reason: str, now: float,
                    actor: str) -> tuple[int, str]:
    """Retire an active token (of `app_id` when given: a provider reaches only its own devices)."""
    row = sql_devices.find_token(conn, token)
    if row is None or row["retired_at"] is not None or (app_id is not None and row["app_id"] != app_id):
        raise ApiError(DEVICE_NOT_FOUND, "no active device with that token")
    sql_devices.retire_device(conn, row["id"], reason, now)
    sql_audit.record(conn, actor, RETIRE_ACTIONS[reason], row["app_id"], token)
    return int(row["id"]), str(row["client_id"])


RETIRE_ACTIONS = {"revoked": "device.revoke", "unregistered": "device.unregister"}


def _grace(grace_s: int | None, default: int) -> int:
    return default if grace_s is None else grace_s


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

    def create_app(self, name: str, actor: str) -> NewApp:
        created, row = new_app_rows(name, time.time())
        self.store.write_now(_insert_app_checked, row, actor)
        return created

    def rotate_key(self, name_or_id: str, grace_s: int | None, actor: str) -> dict[str, Any]:
        return _rotated(self.store.write_now(*_rotation(name_or_id, "api_key", grace_s, actor)))

    def rotate_secret(self, name_or_id: str, grace_s: int | None, actor: str) -> dict[str, Any]:
        return _rotated(self.store.write_now(*_rotation(name_or_id, "secret", grace_s, actor)))

    def list_apps(self) -> list[dict[str, Any]]:
        return [_public_app(a) for a in self.store.read_now(sql_apps.select_apps)]

    def set_app_fallback(self, name_or_id: str, policy: dict[str, Any] | None, actor: str) -> dict[str, Any]:
        app_id = self.store.write_now(*_fallback_args(name_or_id, policy, actor))
        return {"app_id": app_id, "fallback": policy}

    def set_enrollment(self, name_or_id: str, require_ticket: bool, actor: str) -> dict[str, Any]:
        app_id = self.store.write_now(*_enrollment_args(name_or_id, require_ticket, actor))
        return {"app_id": app_id, "require_ticket": require_ticket}

    def set_limits(self, name_or_id: str, pushes_per_s: float | None, targets_per_min: float | None,
                   actor: str) -> dict[str, Any]:
        app_id = self.store.write_now(*_limits_args(name_or_id, pushes_per_s, targets_per_min, actor))
        return {"app_id": app_id, "pushes_per_s": pushes_per_s, "targets_per_min": targets_per_min}

    def list_devices(self, app: str | None) -> list[dict[str, Any]]:
        app_id = None if app is None else self.store.read_now(_app_id_checked, app)
        return [_public_device(d) for d in self.store.read_now(sql_devices.select_devices, app_id)]

    def revoke(self, token: str, actor: str) -> dict[str, Any]:
        now = time.time()
        _, client_id = self.store.write_now(_retire_checked, token, None, "revoked", now, actor)
        revoked = revoke_device_certs(self.cert_store, client_id)
        return {"token": token, "revoked_at": now, "certificates_revoked": revoked}

    def audit(self, app: str | None, before: int | None, limit: int) -> list[dict[str, Any]]:
        app_id = None if app is None else self.store.read_now(_app_id_checked, app)
        return self.store.read_now(sql_audit.select, app_id, before, limit)


def _rotation(name_or_id: str, what: str, grace_s: int | None, actor: str) -> tuple[Any, ...]:
    """A write job that rotates the API key (`api_key`) or the enrollment secret (`secret`)."""
    fresh = new_secret("ak_" if what == "api_key" else "es_")
    grace = _grace(grace_s, API_KEY_GRACE_S if what == "api_key" else SECRET_GRACE_S)

    def rotate(conn: Any) -> tuple[dict[str, Any], str, str]:
        return _rotate_checked(conn, name_or_id, what, hash_secret(fresh), grace, time.time(), actor), what, fresh
    return (rotate,)


def _rotated(done: tuple[dict[str, Any], str, str]) -> dict[str, Any]:
    row, what, fresh = done
    if what == "api_key":
        return {"app_id": row["id"], "api_key": fresh, "previous_valid_until": row["api_key_prev_until"]}
    return {"app_id": row["id"], "enrollment_secret": fresh, "previous_valid_until": row["secret_prev_until"]}


def _fallback_args(name_or_id: str, policy: dict[str, Any] | None, actor: str) -> tuple[Any, ...]:
    text = json.dumps(policy) if policy else None
    return (_app_setting_checked, name_or_id, "app.set_fallback",
            lambda conn, app_id: sql_escalations.set_app_fallback(conn, app_id, text), {"fallback": policy}, actor)


def _limits_args(name_or_id: str, pushes_per_s: float | None, targets_per_min: float | None,
                 actor: str) -> tuple[Any, ...]:
    return (_app_setting_checked, name_or_id, "app.set_limits",
            lambda conn, app_id: sql_apps.set_limits(conn, app_id, pushes_per_s, targets_per_min),
            {"pushes_per_s": pushes_per_s, "targets_per_min": targets_per_min}, actor)


def _enrollment_args(name_or_id: str, require_ticket: bool, actor: str) -> tuple[Any, ...]:
    return (_app_setting_checked, name_or_id, "app.set_enrollment",
            lambda conn, app_id: sql_apps.set_require_ticket(conn, app_id, require_ticket),
            {"require_ticket": require_ticket}, actor)


@dataclass
class Enrollment:
    """What a device asks for, and what vouches for it: the app's secret, or a ticket its app server minted."""

    app: App
    platform: str
    package: str
    device_id: str
    ticket: str | None = None
    previous: Device | None = None


def _enroll_checked(conn: Any, row: dict[str, Any], ticket_hash: str | None,
                    previous: int | None) -> tuple[dict[str, Any], list[int]]:
    """Redeem the ticket (once), bind its identity, insert the token and retire what it replaces: one
    transaction, so two redemptions of one ticket cannot both succeed."""
    replaces = [previous] if previous is not None else []
    if ticket_hash is not None:
        ticket = sql_tickets.find_ticket(conn, ticket_hash)
        if ticket is None or ticket["app_id"] != row["app_id"]:
            raise ApiError(E.TICKET_UNKNOWN)
        if ticket["redeemed_at"] is not None:
            raise ApiError(E.TICKET_USED, f"the ticket was redeemed at {ticket['redeemed_at']:.0f}")
        if ticket["expires_at"] <= row["created_at"]:
            raise ApiError(E.TICKET_EXPIRED, f"the ticket expired at {ticket['expires_at']:.0f}")
        row.update(alias=ticket["alias"], phone=ticket["phone"], email=ticket["email"])
        if previous is None and ticket["alias"]:  # the same user reinstalling the same install
            replaces = sql_devices.same_user_devices(conn, row["app_id"], row["package"], row["device_id"],
                                                     ticket["alias"])
    row["id"] = sql_devices.enroll_device(conn, row, replaces)
    if ticket_hash is not None:
        sql_tickets.mark_redeemed(conn, ticket_hash, row["id"], row["created_at"])
    return row, replaces


class Accounts(OfflineAccounts):
    """Inside the daemon: writes go through the writer thread and the directory follows each commit."""

    def __init__(self, store: Store, directory: Directory, drop_device: Callable[[Device, str], None],
                 cert_store: certs.CertStore | None = None, credentials: BrokerCredentials | None = None) -> None:
        super().__init__(store, cert_store)
        self.directory = directory
        self.drop_device = drop_device
        self.credentials: BrokerCredentials = credentials or DirectoryCredentials()
        self.on_limits: Callable[[App], None] = lambda app: None  # the provider API's rate limiter follows

    def load(self) -> None:
        for row in self.store.read_now(sql_apps.select_apps):
            self.directory.add_app(App.from_row(row))
        for row in self.store.read_now(sql_devices.select_active_devices):
            self.directory.add_device(Device.from_row(row))
        for app_id, topic, device_id in self.store.read_now(sql_devices.select_subscriptions):
            device = self.directory.by_id.get(device_id)
            if device is not None and device.app_id == app_id:
                self.directory.subscribe(device, topic)

    # -- apps ------------------------------------------------------------------------------------
    async def create_app_async(self, name: str, actor: str) -> NewApp:
        created, row = new_app_rows(name, time.time())
        await self.store.write(_insert_app_checked, row, actor)
        self.directory.add_app(App(row["id"], name, row["api_key_hash"], row["enrollment_secret_hash"]))
        return created

    async def rotate_key_async(self, name_or_id: str, grace_s: int | None, actor: str) -> dict[str, Any]:
        return self._rotated_live(await self.store.write(*_rotation(name_or_id, "api_key", grace_s, actor)))

    async def rotate_secret_async(self, name_or_id: str, grace_s: int | None, actor: str) -> dict[str, Any]:
        return self._rotated_live(await self.store.write(*_rotation(name_or_id, "secret", grace_s, actor)))

    def _rotated_live(self, done: tuple[dict[str, Any], str, str]) -> dict[str, Any]:
        self.directory.add_app(App.from_row(done[0]))  # the new credential, and the previous one until its end
        return _rotated(done)

    async def set_app_fallback_async(self, name_or_id: str, policy: dict[str, Any] | None,
                                     actor: str) -> dict[str, Any]:
        """Set (or clear, with None) the app's default fallback policy for pushes that give none."""
        app_id = await self.store.write(*_fallback_args(name_or_id, policy, actor))
        self.directory.apps[app_id].fallback = policy
        return {"app_id": app_id, "fallback": policy}

    async def set_enrollment_async(self, name_or_id: str, require_ticket: bool, actor: str) -> dict[str, Any]:
        """Require an enrollment ticket for every enrollment of the app (or allow the secret again)."""
        app_id = await self.store.write(*_enrollment_args(name_or_id, require_ticket, actor))
        self.directory.apps[app_id].require_ticket = require_ticket
        return {"app_id": app_id, "require_ticket": require_ticket}

    async def set_limits_async(self, name_or_id: str, pushes_per_s: float | None, targets_per_min: float | None,
                               actor: str) -> dict[str, Any]:
        """The app's send limits (None: the box's default; 0: none)."""
        app_id = await self.store.write(*_limits_args(name_or_id, pushes_per_s, targets_per_min, actor))
        app = self.directory.apps[app_id]
        app.pushes_per_s, app.targets_per_min = pushes_per_s, targets_per_min
        self.on_limits(app)
        return {"app_id": app_id, "pushes_per_s": pushes_per_s, "targets_per_min": targets_per_min}

    async def set_alias_contact(self, app_id: str, alias: str, phone: str | None, email: str | None) -> None:
        await self.store.write(sql_escalations.set_alias_contact, app_id, alias, phone, email, time.time())

    async def list_apps_async(self) -> list[dict[str, Any]]:
        return [_public_app(a) for a in await self.store.read(sql_apps.select_apps)]

    async def audit_async(self, app: str | None, before: int | None, limit: int) -> list[dict[str, Any]]:
        app_id = None if app is None else await self.store.read(_app_id_checked, app)
        return await self.store.read(sql_audit.select, app_id, before, limit)

    # -- devices ---------------------------------------------------------------------------------
    async def list_devices_async(self, app: str | None) -> list[dict[str, Any]]:
        app_id = None if app is None else await self.store.read(_app_id_checked, app)
        rows = await self.store.read(sql_devices.select_devices, app_id)
        return [_public_device(row) for row in rows]

    async def revoke_async(self, token: str, actor: str) -> dict[str, Any]:
        at, _, client_id = await self._retire(token, None, "revoked", actor)
        revoked = await asyncio.to_thread(revoke_device_certs, self.cert_store, client_id)
        return {"token": token, "revoked_at": at, "certificates_revoked": revoked}

    async def unregister(self, app: App, token: str) -> dict[str, Any]:
        """The app server retires one of its own tokens (an uninstalled app, a departed user)."""
        at, _, client_id = await self._retire(token, app.id, "unregistered", f"provider:{app.id}")
        await asyncio.to_thread(revoke_device_certs, self.cert_store, client_id)
        return {"token": token, "unregistered_at": at}

    async def _retire(self, token: str, app_id: str | None, reason: str, actor: str) -> tuple[float, int, str]:
        now = time.time()
        device_id, client_id = await self.store.write(_retire_checked, token, app_id, reason, now, actor)
        device = self.directory.by_id.get(device_id)
        if device is not None:
            self.directory.remove_device(device)
            self.drop_device(device, reason)
        await self.credentials.remove_device(client_id)  # a broker holding logins also disconnects it
        return now, device_id, client_id

    async def mint_ticket(self, app: App, alias: str | None, phone: str | None, email: str | None,
                          ttl_s: int) -> dict[str, Any]:
        ticket = new_secret("et_", 24)
        now = time.time()
        row = {"ticket_hash": hash_secret(ticket), "app_id": app.id, "alias": alias, "phone": phone, "email": email,
               "created_at": now, "expires_at": now + ttl_s}
        await self.store.write(sql_tickets.insert_ticket, row)
        return {"ticket": ticket, "expires_at": row["expires_at"], "alias": alias}

    async def set_identity(self, app: App, device: Device, alias: str | None, phone: str | None,
                           email: str | None) -> None:
        def write(conn: Any) -> None:
            if not sql_devices.set_identity(conn, device.id, alias, phone, email):
                raise ApiError(DEVICE_NOT_FOUND, "no active device with that token")
            sql_audit.record(conn, f"provider:{app.id}", "device.set_identity", app.id, device.token,
                             {"alias": alias, "phone": _masked(phone), "email": _masked(email)})
        await self.store.write(write)
        self.directory.set_identity(device, alias, phone, email)

    async def enroll(self, req: Enrollment) -> tuple[Device, str, list[str]]:
        """Issue a new token; return it, its MQTT password, and the tokens it replaced."""
        now = time.time()
        password = new_secret("", 24)
        prev = req.previous
        row = {
            "app_id": req.app.id, "token": new_secret("dt_", 24), "client_id": "d-" + secrets.token_hex(8),
            "mqtt_password_hash": hash_secret(password), "mqtt_password_pbkdf2": hash_secret_pbkdf2(password),
            "platform": req.platform, "package": req.package, "device_id": req.device_id,
            "alias": prev.alias if prev else None, "phone": prev.phone if prev else None,
            "email": prev.email if prev else None, "created_at": now,
        }
        ticket_hash = hash_secret(req.ticket) if req.ticket is not None else None
        row, replaced_ids = await self.store.write(_enroll_checked, row, ticket_hash, prev.id if prev else None)
        replaced = []
        topics: set[str] = set()
        for old_id in replaced_ids:
            old = self.directory.by_id.get(old_id)
            if old is None:
                continue
            topics |= old.topics
            replaced.append(old.token)
            self.directory.remove_device(old)
            self.drop_device(old, "reenrolled")
            await self.credentials.remove_device(old.client_id)
        device = Device.from_row({**row, "last_seq": 0, "dropped_through": 0})
        self.directory.add_device(device)
        for topic in topics:
            self.directory.subscribe(device, topic)
        await self.credentials.add_device(device.client_id, password)  # before the answer: it may connect at once
        return device, password, replaced

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


def _masked(value: str | None) -> str | None:
    """Contacts in the audit log: enough to recognise, not to harvest (no full numbers above DEBUG)."""
    if not value:
        return value
    return value[:3] + "…" + value[-2:] if len(value) > 6 else "…"


def _public_app(row: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    return {"app_id": row["id"], "name": row["name"], "created_at": row["created_at"],
            "key_rotated_at": row["key_rotated_at"], "secret_rotated_at": row["secret_rotated_at"],
            "previous_key_valid_until": row["api_key_prev_until"] if (row["api_key_prev_until"] or 0) > now else None,
            "previous_secret_valid_until": (row["secret_prev_until"]
                                            if (row["secret_prev_until"] or 0) > now else None),
            "require_ticket": bool(row["require_ticket"]), "devices": row["devices"],
            "limits": {"pushes_per_s": row["pushes_per_s"], "targets_per_min": row["targets_per_min"]},
            "fallback": json.loads(row["fallback"]) if row["fallback"] else None}


def _public_device(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "token": row["token"], "app_id": row["app_id"], "client_id": row["client_id"], "platform": row["platform"],
        "package": row["package"], "device_id": row["device_id"], "alias": row["alias"],
        "created_at": row["created_at"], "retired_at": row["retired_at"], "retired_reason": row["retired_reason"],
        "last_seq": row["last_seq"], "last_seen": row["last_seen"],
    }
