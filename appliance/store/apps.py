"""Apps (provider accounts): names, hashed API keys and enrollment secrets, each with the previous one kept
valid for a grace period after a rotation, and the app's enrollment policy."""

from __future__ import annotations

import sqlite3
from typing import Any

SQL_INSERT_APP = """
INSERT INTO apps (id, name, api_key_hash, enrollment_secret_hash, created_at)
VALUES (:id, :name, :api_key_hash, :enrollment_secret_hash, :created_at)
"""
SQL_SELECT_APPS = """
SELECT a.id, a.name, a.api_key_hash, a.enrollment_secret_hash, a.created_at, a.key_rotated_at, a.fallback,
       a.api_key_prev_hash, a.api_key_prev_until, a.secret_prev_hash, a.secret_prev_until, a.secret_rotated_at,
       a.require_ticket, a.pushes_per_s, a.targets_per_min,
       (SELECT count(*) FROM devices d WHERE d.app_id = a.id AND d.retired_at IS NULL) AS devices
FROM apps a ORDER BY a.created_at
"""
# The current key becomes the previous one, valid until `prev_until` (a grace of 0 ends it at once).
SQL_ROTATE_API_KEY = """
UPDATE apps SET api_key_prev_hash = api_key_hash, api_key_prev_until = ?, api_key_hash = ?, key_rotated_at = ?
WHERE id = ?
"""
SQL_ROTATE_SECRET = """
UPDATE apps SET secret_prev_hash = enrollment_secret_hash, secret_prev_until = ?, enrollment_secret_hash = ?,
                secret_rotated_at = ?
WHERE id = ?
"""
SQL_SET_REQUIRE_TICKET = "UPDATE apps SET require_ticket = ? WHERE id = ?"
SQL_SET_LIMITS = "UPDATE apps SET pushes_per_s = ?, targets_per_min = ? WHERE id = ?"
SQL_APP_BY_NAME_OR_ID = "SELECT id FROM apps WHERE id = ? OR name = ?"
SQL_APP_BY_ID = SQL_SELECT_APPS.replace("FROM apps a ORDER BY a.created_at", "FROM apps a WHERE a.id = ?")


def _rows(cur: sqlite3.Cursor) -> list[dict[str, Any]]:
    names = [c[0] for c in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def insert_app(conn: sqlite3.Connection, row: dict[str, Any]) -> None:
    conn.execute(SQL_INSERT_APP, row)


def select_apps(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    return _rows(conn.execute(SQL_SELECT_APPS))


def select_app(conn: sqlite3.Connection, app_id: str) -> dict[str, Any] | None:
    rows = _rows(conn.execute(SQL_APP_BY_ID, (app_id,)))
    return rows[0] if rows else None


def find_app_id(conn: sqlite3.Connection, name_or_id: str) -> str | None:
    row = conn.execute(SQL_APP_BY_NAME_OR_ID, (name_or_id, name_or_id)).fetchone()
    return row[0] if row else None


def rotate_api_key(conn: sqlite3.Connection, app_id: str, key_hash: str, prev_until: float, now: float) -> None:
    conn.execute(SQL_ROTATE_API_KEY, (prev_until, key_hash, now, app_id))


def rotate_secret(conn: sqlite3.Connection, app_id: str, secret_hash: str, prev_until: float, now: float) -> None:
    conn.execute(SQL_ROTATE_SECRET, (prev_until, secret_hash, now, app_id))


def set_limits(conn: sqlite3.Connection, app_id: str, pushes_per_s: float | None,
               targets_per_min: float | None) -> None:
    conn.execute(SQL_SET_LIMITS, (pushes_per_s, targets_per_min, app_id))


def set_require_ticket(conn: sqlite3.Connection, app_id: str, required: bool) -> None:
    conn.execute(SQL_SET_REQUIRE_TICKET, (1 if required else 0, app_id))
