"""Fallback escalations: one row per (push, device, channel), due when the push's fallback deadline passes."""

from __future__ import annotations

import sqlite3
from typing import Any

PENDING, SENDING, SENT, FAILED, SKIPPED = range(5)
STATE_NAMES = ("pending", "sending", "sent", "failed", "skipped")

SQL_INSERT = "INSERT OR IGNORE INTO escalations (message_id, device, channel, state, next_at, updated_at) VALUES (?, ?, ?, 0, ?, ?)"
SQL_DUE = """
SELECT e.message_id, e.device, e.channel, e.attempts, e.next_at
FROM escalations e WHERE e.state = 0 AND e.next_at <= ? ORDER BY e.next_at LIMIT ?
"""
SQL_NEXT_DUE = "SELECT min(next_at) FROM escalations WHERE state = 0"
SQL_CONTEXT = """
SELECT m.payload, m.fallback, m.expires_at, d.state, d.ack, dv.phone, dv.email, ac.phone, ac.email, dv.token
FROM escalations e
JOIN messages m ON m.id = e.message_id
JOIN devices dv ON dv.id = e.device
LEFT JOIN deliveries d ON d.message_id = e.message_id AND d.device = e.device
LEFT JOIN alias_contacts ac ON ac.app_id = dv.app_id AND ac.alias = dv.alias
WHERE e.message_id = ? AND e.device = ? AND e.channel = ?
"""
SQL_SET_STATE = """
UPDATE escalations SET state = ?, attempts = ?, next_at = ?, reason = ?, receipt = ?, updated_at = ?
WHERE message_id = ? AND device = ? AND channel = ? AND state <= 1
"""
SQL_INTERRUPTED = "UPDATE escalations SET state = 3, reason = 'interrupted', updated_at = ? WHERE state = 1"
SQL_COUNTS = "SELECT channel, state, count(*) FROM escalations WHERE message_id = ? GROUP BY channel, state"
SQL_PER_TOKEN = """
SELECT dv.token, e.channel, e.state, e.reason, e.attempts FROM escalations e JOIN devices dv ON dv.id = e.device
WHERE e.message_id = ?
"""
SQL_SET_ALIAS_CONTACT = """
INSERT INTO alias_contacts (app_id, alias, phone, email, updated_at) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (app_id, alias) DO UPDATE SET phone = excluded.phone, email = excluded.email, updated_at = excluded.updated_at
"""
SQL_DELETE_ALIAS_CONTACT = "DELETE FROM alias_contacts WHERE app_id = ? AND alias = ?"
SQL_SET_APP_FALLBACK = "UPDATE apps SET fallback = ? WHERE id = ?"


def insert(conn: sqlite3.Connection, rows: list[tuple[str, int, str, float, float]]) -> None:
    conn.executemany(SQL_INSERT, rows)


def select_due(conn: sqlite3.Connection, now: float, limit: int) -> list[tuple[str, int, str, int, float]]:
    return conn.execute(SQL_DUE, (now, limit)).fetchall()


def next_due(conn: sqlite3.Connection) -> float | None:
    return conn.execute(SQL_NEXT_DUE).fetchone()[0]


def context(conn: sqlite3.Connection, message_id: str, device: int, channel: str) -> tuple[Any, ...] | None:
    return conn.execute(SQL_CONTEXT, (message_id, device, channel)).fetchone()


def set_state(conn: sqlite3.Connection, key: tuple[str, int, str], state: int, attempts: int, next_at: float,
              reason: str | None, receipt: str | None, now: float) -> int:
    return conn.execute(SQL_SET_STATE, (state, attempts, next_at, reason, receipt, now, *key)).rowcount


def mark_interrupted(conn: sqlite3.Connection, now: float) -> int:
    """At start: a send that was under way when the box stopped (a crash, or a graceful stop whose timeout
    ran out) may or may not have gone out; it is not repeated."""
    return conn.execute(SQL_INTERRUPTED, (now,)).rowcount


def message_fallback(conn: sqlite3.Connection, message_id: str, detail: bool) -> dict[str, Any] | None:
    counts: dict[str, dict[str, int]] = {}
    for channel, state, n in conn.execute(SQL_COUNTS, (message_id,)):
        counts.setdefault(channel, {name: 0 for name in STATE_NAMES})[STATE_NAMES[state]] = n
    if not counts:
        return None
    out: dict[str, Any] = {"channels": counts,
                           "sent": sum(c["sent"] for c in counts.values()),
                           "failed": sum(c["failed"] for c in counts.values())}
    if detail:
        tokens: dict[str, dict[str, Any]] = {}
        for token, channel, state, reason, attempts in conn.execute(SQL_PER_TOKEN, (message_id,)):
            tokens.setdefault(token, {})[channel] = {"state": STATE_NAMES[state], "reason": reason,
                                                     "attempts": attempts}
        out["tokens"] = tokens
    return out


def set_alias_contact(conn: sqlite3.Connection, app_id: str, alias: str, phone: str | None, email: str | None,
                      now: float) -> None:
    if phone is None and email is None:
        conn.execute(SQL_DELETE_ALIAS_CONTACT, (app_id, alias))
    else:
        conn.execute(SQL_SET_ALIAS_CONTACT, (app_id, alias, phone, email, now))


def set_app_fallback(conn: sqlite3.Connection, app_id: str, policy_json: str | None) -> int:
    return conn.execute(SQL_SET_APP_FALLBACK, (policy_json, app_id)).rowcount
