"""Enrollment tickets: one-time, short-lived credentials that a provider mints for a user (alias, contact) and
a device redeems once. Only their SHA-256 is stored."""

from __future__ import annotations

import sqlite3
from typing import Any

# Redeemed and expired tickets are kept a day (what was redeemed by which device), then deleted.
KEEP_AFTER_EXPIRY_S = 86400.0
SQL_INSERT = """
INSERT INTO enrollment_tickets (ticket_hash, app_id, alias, phone, email, created_at, expires_at)
VALUES (:ticket_hash, :app_id, :alias, :phone, :email, :created_at, :expires_at)
"""
SQL_DELETE_OLD = "DELETE FROM enrollment_tickets WHERE expires_at < ?"
SQL_FIND = """
SELECT ticket_hash, app_id, alias, phone, email, created_at, expires_at, redeemed_at, device
FROM enrollment_tickets WHERE ticket_hash = ?
"""
SQL_REDEEM = "UPDATE enrollment_tickets SET redeemed_at = ?, device = ? WHERE ticket_hash = ? AND redeemed_at IS NULL"


def insert_ticket(conn: sqlite3.Connection, row: dict[str, Any]) -> None:
    conn.execute(SQL_DELETE_OLD, (row["created_at"] - KEEP_AFTER_EXPIRY_S,))
    conn.execute(SQL_INSERT, row)


def find_ticket(conn: sqlite3.Connection, ticket_hash: str) -> dict[str, Any] | None:
    cur = conn.execute(SQL_FIND, (ticket_hash,))
    row = cur.fetchone()
    return dict(zip([c[0] for c in cur.description], row)) if row else None


def mark_redeemed(conn: sqlite3.Connection, ticket_hash: str, device: int, now: float) -> bool:
    """True when this call redeemed it (inside the writer's transaction, so two redemptions cannot both win)."""
    return conn.execute(SQL_REDEEM, (now, device, ticket_hash)).rowcount == 1
