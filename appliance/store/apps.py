"""Apps (provider accounts): names, hashed API keys and enrollment secrets."""

from __future__ import annotations

import sqlite3
from typing import Any

SQL_INSERT_APP = """
INSERT INTO apps (id, name, api_key_hash, enrollment_secret_hash, created_at)
VALUES (:id, :name, :api_key_hash, :enrollment_secret_hash, :created_at)
"""
SQL_SELECT_APPS = """
SELECT a.id, a.name, a.api_key_hash, a.enrollment_secret_hash, a.created_at, a.key_rotated_at, a.fallback,
       (SELECT count(*) FROM devices d WHERE d.app_id = a.id AND d.retired_at IS NULL) AS devices
FROM apps a ORDER BY a.created_at
"""
SQL_SET_API_KEY = "UPDATE apps SET api_key_hash = ?, key_rotated_at = ? WHERE id = ?"
SQL_APP_BY_NAME_OR_ID = "SELECT id FROM apps WHERE id = ? OR name = ?"


def insert_app(conn: sqlite3.Connection, row: dict[str, Any]) -> None:
    conn.execute(SQL_INSERT_APP, row)


def select_apps(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    cur = conn.execute(SQL_SELECT_APPS)
    names = [c[0] for c in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def find_app_id(conn: sqlite3.Connection, name_or_id: str) -> str | None:
    row = conn.execute(SQL_APP_BY_NAME_OR_ID, (name_or_id, name_or_id)).fetchone()
    return row[0] if row else None


def set_api_key(conn: sqlite3.Connection, app_id: str, key_hash: str, now: float) -> None:
    conn.execute(SQL_SET_API_KEY, (key_hash, now, app_id))
