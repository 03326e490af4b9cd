"""The audit log: who (the Unix user on the admin socket, or the app on the provider API) changed what, when.
Written in the same transaction as the change it records."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

SQL_INSERT = "INSERT INTO audit_log (at, actor, action, app_id, subject, detail) VALUES (?, ?, ?, ?, ?, ?)"
SQL_SELECT = """
SELECT id, at, actor, action, app_id, subject, detail FROM audit_log
WHERE (? IS NULL OR app_id = ?) AND (? IS NULL OR id < ?) ORDER BY id DESC LIMIT ?
"""


def record(conn: sqlite3.Connection, actor: str, action: str, app_id: str | None, subject: str | None = None,
           detail: dict[str, Any] | None = None) -> None:
    conn.execute(SQL_INSERT, (time.time(), actor, action, app_id, subject,
                              json.dumps(detail, sort_keys=True) if detail else None))


def select(conn: sqlite3.Connection, app_id: str | None, before: int | None, limit: int) -> list[dict[str, Any]]:
    """Newest first; `before` pages back from an entry id."""
    cur = conn.execute(SQL_SELECT, (app_id, app_id, before, before, limit))
    names = [c[0] for c in cur.description]
    out = []
    for row in cur.fetchall():
        entry = dict(zip(names, row))
        entry["detail"] = json.loads(entry["detail"]) if entry["detail"] else None
        out.append(entry)
    return out
