"""Devices (one row per issued token) and provider-managed topic subscriptions."""

from __future__ import annotations

import sqlite3
from typing import Any

# A device's last seq is the highest seq of its inbox rows: pushes do not rewrite its devices row (one random
# page less per push); devices.last_seq keeps the highest seq of rows already purged (messages.purge).
LAST_SEQ = ("max(last_seq, coalesce((SELECT max(seq) FROM deliveries WHERE deliveries.device = devices.id), 0)) "
            "AS last_seq")
DEVICE_COLUMNS = (
    "id, app_id, token, client_id, mqtt_password_hash, platform, package, device_id, alias, phone, email, "
    f"created_at, retired_at, retired_reason, {LAST_SEQ}, dropped_through, last_seen"
)
SQL_INSERT_DEVICE = """
INSERT INTO devices (app_id, token, client_id, mqtt_password_hash, mqtt_password_pbkdf2, platform, package,
                     device_id, alias, phone, email, created_at)
VALUES (:app_id, :token, :client_id, :mqtt_password_hash, :mqtt_password_pbkdf2, :platform, :package,
        :device_id, :alias, :phone, :email, :created_at)
"""
SQL_RETIRE_DEVICE = "UPDATE devices SET retired_at = ?, retired_reason = ? WHERE id = ? AND retired_at IS NULL"
SQL_ACTIVE_DEVICES = f"SELECT {DEVICE_COLUMNS} FROM devices WHERE retired_at IS NULL"
SQL_DEVICE_BY_TOKEN = f"SELECT {DEVICE_COLUMNS} FROM devices WHERE token = ?"
SQL_DEVICES_OF_APP = f"SELECT {DEVICE_COLUMNS} FROM devices WHERE app_id = ? ORDER BY id"
SQL_ALL_DEVICES = f"SELECT {DEVICE_COLUMNS} FROM devices ORDER BY id"
SQL_SUBSCRIPTIONS = "SELECT app_id, topic, device FROM topic_subscribers"
SQL_SUBSCRIBE = "INSERT OR IGNORE INTO topic_subscribers (app_id, topic, device) VALUES (?, ?, ?)"
SQL_UNSUBSCRIBE = "DELETE FROM topic_subscribers WHERE app_id = ? AND topic = ? AND device = ?"
SQL_UNSUBSCRIBE_DEVICE = "DELETE FROM topic_subscribers WHERE device = ?"
SQL_RETIRE_DELIVERIES = "UPDATE deliveries SET state = 7, updated_at = ? WHERE device = ? AND state < 2"
SQL_LAST_SEEN = "UPDATE devices SET last_seen = ? WHERE id = ?"
SQL_SET_IDENTITY = "UPDATE devices SET alias = ?, phone = ?, email = ? WHERE id = ? AND retired_at IS NULL"
SQL_CARRY_SUBSCRIPTIONS = """
INSERT OR IGNORE INTO topic_subscribers (app_id, topic, device) SELECT app_id, topic, ? FROM topic_subscribers
WHERE device = ?
"""
SQL_SAME_USER_DEVICE = """
SELECT id FROM devices WHERE app_id = ? AND package = ? AND device_id = ? AND alias = ? AND retired_at IS NULL
ORDER BY id
"""
SQL_BROKER_CREDENTIALS = "SELECT client_id, mqtt_password_pbkdf2 FROM devices WHERE retired_at IS NULL"


def _rows(cur: sqlite3.Cursor) -> list[dict[str, Any]]:
    names = [c[0] for c in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def insert_device(conn: sqlite3.Connection, row: dict[str, Any]) -> int:
    return int(conn.execute(SQL_INSERT_DEVICE, row).lastrowid)


def retire_device(conn: sqlite3.Connection, device: int, reason: str, now: float) -> None:
    """Retire a token: its pending inbox rows end, its topic subscriptions go."""
    conn.execute(SQL_RETIRE_DEVICE, (now, reason, device))
    conn.execute(SQL_RETIRE_DELIVERIES, (now, device))
    conn.execute(SQL_UNSUBSCRIBE_DEVICE, (device,))


def enroll_device(conn: sqlite3.Connection, row: dict[str, Any], replaces: list[int]) -> int:
    """Insert the new token and retire the ones it replaces (their topic subscriptions move to it), in one
    transaction."""
    device = insert_device(conn, row)
    for old in replaces:
        conn.execute(SQL_CARRY_SUBSCRIPTIONS, (device, old))
        retire_device(conn, old, "reenrolled", row["created_at"])
    return device


def same_user_devices(conn: sqlite3.Connection, app_id: str, package: str, device_id: str, alias: str) -> list[int]:
    """Active devices of one install (package, device_id) bound to this alias: what a ticket for the same
    user replaces when the app is reinstalled."""
    return [r[0] for r in conn.execute(SQL_SAME_USER_DEVICE, (app_id, package, device_id, alias))]


def set_identity(conn: sqlite3.Connection, device: int, alias: str | None, phone: str | None,
                 email: str | None) -> bool:
    return conn.execute(SQL_SET_IDENTITY, (alias, phone, email, device)).rowcount == 1


def select_active_devices(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    return _rows(conn.execute(SQL_ACTIVE_DEVICES))


def select_devices(conn: sqlite3.Connection, app_id: str | None) -> list[dict[str, Any]]:
    if app_id is None:
        return _rows(conn.execute(SQL_ALL_DEVICES))
    return _rows(conn.execute(SQL_DEVICES_OF_APP, (app_id,)))


def find_token(conn: sqlite3.Connection, token: str) -> dict[str, Any] | None:
    rows = _rows(conn.execute(SQL_DEVICE_BY_TOKEN, (token,)))
    return rows[0] if rows else None


def select_subscriptions(conn: sqlite3.Connection) -> list[tuple[str, str, int]]:
    return conn.execute(SQL_SUBSCRIPTIONS).fetchall()


def subscribe(conn: sqlite3.Connection, app_id: str, topic: str, devices: list[int]) -> None:
    conn.executemany(SQL_SUBSCRIBE, [(app_id, topic, d) for d in devices])


def unsubscribe(conn: sqlite3.Connection, app_id: str, topic: str, devices: list[int]) -> None:
    conn.executemany(SQL_UNSUBSCRIBE, [(app_id, topic, d) for d in devices])


def mark_seen(conn: sqlite3.Connection, rows: list[tuple[float, int]]) -> None:
    conn.executemany(SQL_LAST_SEEN, rows)


def select_broker_credentials(conn: sqlite3.Connection) -> list[tuple[str, str | None]]:
    """(client id, PBKDF2 password hash or None for devices enrolled before schema 3) of every active device."""
    return conn.execute(SQL_BROKER_CREDENTIALS).fetchall()
