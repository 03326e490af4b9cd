"""Pushes and the per-device inbox rows (deliveries) that make each one durable until acked."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from appliance.store import escalations

# Delivery states; below ACKED a row is pending.
QUEUED, DELIVERED, ACKED, EXPIRED, CANCELLED, REPLACED, DROPPED, RETIRED = range(8)
STATE_NAMES = ("queued", "delivered", "acked", "expired", "cancelled", "replaced", "dropped", "unregistered")
ACK_RANKS = {"received": 1, "displayed": 2, "opened": 3}
ACK_NAMES = {v: k for k, v in ACK_RANKS.items()}

SQL_INSERT_MESSAGE = """
INSERT INTO messages (id, app_id, created_at, expires_at, payload, collapse_key, target, targeted, fallback)
VALUES (:id, :app_id, :created_at, :expires_at, :payload, :collapse_key, :target, :targeted, :fallback)
"""
SQL_INSERT_DELIVERY = """
INSERT INTO deliveries (device, seq, message_id, state, expires_at, collapse_key, updated_at)
VALUES (?, ?, ?, 0, ?, ?, ?)
"""
SQL_REPLACE_COLLAPSED = """
UPDATE deliveries SET state = 5, updated_at = ?
WHERE collapse_key = ? AND device = ? AND state < 2 AND collapse_key IS NOT NULL
"""
SQL_MARK_DELIVERED = "UPDATE deliveries SET state = 1, updated_at = ? WHERE device = ? AND seq = ? AND state = 0"
# An ack never overwrites a finished state (expired, cancelled, replaced, dropped, unregistered): the
# device's ack rank is recorded beside it, so the status shows both (#10).
SQL_MARK_ACKED_BY_SEQ = """
UPDATE deliveries SET state = CASE WHEN state < 2 THEN 2 ELSE state END, ack = ?, updated_at = ?
WHERE device = ? AND seq = ? AND message_id = ? AND (ack IS NULL OR ack < ?)
"""
SQL_MARK_ACKED_BY_ID = """
UPDATE deliveries SET state = CASE WHEN state < 2 THEN 2 ELSE state END, ack = ?, updated_at = ?
WHERE message_id = ? AND device = ? AND (ack IS NULL OR ack < ?)
"""
SQL_PENDING = """
SELECT d.seq, d.message_id, m.payload
FROM deliveries d JOIN messages m ON m.id = d.message_id
WHERE d.device = ? AND d.seq > ? AND d.state < 2 AND d.expires_at > ?
ORDER BY d.seq LIMIT ?
"""
# The seq that leaves `inbox_limit` pending pushes above it: a catch-up reads in pages, so it cannot count
# the rows it reads to find the overflow (#10).
SQL_NTH_PENDING_ABOVE = """
SELECT seq FROM deliveries WHERE device = ? AND seq > ? AND state < 2 AND expires_at > ?
ORDER BY seq DESC LIMIT 1 OFFSET ?
"""
SQL_IN_INBOX = "SELECT 1 FROM deliveries WHERE message_id = ? AND device = ?"
SQL_DROP_THROUGH = """
UPDATE deliveries SET state = 6, updated_at = ? WHERE device = ? AND seq <= ? AND state < 2
"""
SQL_SET_DROPPED_THROUGH = "UPDATE devices SET dropped_through = max(dropped_through, ?) WHERE id = ?"
# Maintenance runs in bounded batches, each its own write job, so a 202 waits behind at most one batch (#10).
SQL_EXPIRE_BATCH = """
UPDATE deliveries SET state = 3, updated_at = ?
WHERE (device, seq) IN (SELECT device, seq FROM deliveries WHERE state < 2 AND expires_at <= ? LIMIT ?)
"""
SQL_OVERFULL = "SELECT device, count(*) FROM deliveries WHERE state < 2 GROUP BY device HAVING count(*) > ?"
SQL_NTH_PENDING = "SELECT seq FROM deliveries WHERE device = ? AND state < 2 ORDER BY seq DESC LIMIT 1 OFFSET ?"
SQL_MESSAGE = """
SELECT id, app_id, created_at, expires_at, collapse_key, target, targeted, cancelled_at
FROM messages WHERE id = ? AND app_id = ?
"""
SQL_STATE_COUNTS = "SELECT state, count(*) FROM deliveries WHERE message_id = ? GROUP BY state"
SQL_ACK_COUNTS = "SELECT ack, count(*) FROM deliveries WHERE message_id = ? AND ack IS NOT NULL GROUP BY ack"
SQL_PER_TOKEN = """
SELECT dv.token, d.state, d.ack, d.updated_at FROM deliveries d JOIN devices dv ON dv.id = d.device
WHERE d.message_id = ? ORDER BY d.device
"""
SQL_CANCEL_MESSAGE = "UPDATE messages SET cancelled_at = ? WHERE id = ? AND app_id = ? AND cancelled_at IS NULL"
SQL_CANCEL_DELIVERIES = "UPDATE deliveries SET state = 4, updated_at = ? WHERE message_id = ? AND state < 2"
SQL_SKIPPED = """
SELECT seq, message_id, state FROM deliveries
WHERE device = ? AND seq > ? AND ack IS NULL AND (state IN (3, 4, 5) OR (state < 2 AND expires_at <= ?))
ORDER BY seq LIMIT ?
"""
# Retention walks the inbox in primary-key order (each batch deletes from a few neighbouring pages, so its
# commit writes little) and tells a push's age by its id, which starts with its creation time in
# milliseconds: it needs no index of its own.
SQL_INBOX_FROM = """
SELECT device, seq, message_id, state FROM deliveries WHERE (device, seq) > (?, ?) ORDER BY device, seq LIMIT ?
"""
SQL_HELD_BY_ESCALATIONS = "SELECT DISTINCT message_id FROM escalations WHERE message_id < ? AND state <= 1"
SQL_OLD_MESSAGES = "SELECT id FROM messages WHERE id < ? AND id > ? ORDER BY id LIMIT ?"
SQL_HAS_PENDING_ESCALATION = "SELECT 1 FROM escalations WHERE message_id = ? AND state <= 1 LIMIT 1"
SQL_HAS_DELIVERIES = "SELECT 1 FROM deliveries WHERE message_id = ? LIMIT 1"
SQL_DELETE_DELIVERY = "DELETE FROM deliveries WHERE device = ? AND seq = ?"
SQL_RAISE_LAST_SEQ = "UPDATE devices SET last_seq = max(last_seq, ?) WHERE id = ?"
SQL_DELETE_ESCALATIONS = "DELETE FROM escalations WHERE message_id = ?"
SQL_DELETE_MESSAGE = "DELETE FROM messages WHERE id = ?"
SKIP_REASONS = {EXPIRED: "expired", CANCELLED: "cancelled", REPLACED: "replaced"}


@dataclass(slots=True)
class NewPush:
    """One accepted push: its message row, its inbox rows ((device, seq) each) and its fallback channels."""

    message: dict[str, Any]
    deliveries: list[tuple[int, int]]
    fallback_channels: tuple[str, ...] = ()
    fallback_due: float = 0.0


def insert_pushes(conn: sqlite3.Connection, pushes: list[NewPush]) -> None:
    """Persist a request's pushes; a collapse key first retires the older pending pushes it replaces."""
    if not any(push.message["collapse_key"] is not None or push.fallback_channels for push in pushes):
        # The common batch: one statement of each kind for all of it (a device's seqs ascend in list order).
        conn.executemany(SQL_INSERT_MESSAGE, [push.message for push in pushes])
        conn.executemany(SQL_INSERT_DELIVERY, [
            (device, seq, push.message["id"], push.message["expires_at"], None, push.message["created_at"])
            for push in pushes for device, seq in push.deliveries])
        return
    for push in pushes:
        msg = push.message
        now, ck, mid, exp = msg["created_at"], msg["collapse_key"], msg["id"], msg["expires_at"]
        if ck is not None:
            conn.executemany(SQL_REPLACE_COLLAPSED, [(now, ck, device) for device, _ in push.deliveries])
        conn.execute(SQL_INSERT_MESSAGE, msg)
        conn.executemany(SQL_INSERT_DELIVERY, [(device, seq, mid, exp, ck, now) for device, seq in push.deliveries])
        if push.fallback_channels:
            escalations.insert(conn, [(mid, device, channel, push.fallback_due, now)
                                      for device, _ in push.deliveries for channel in push.fallback_channels])


def mark_delivered(conn: sqlite3.Connection, rows: list[tuple[float, int, int]]) -> None:
    """rows: (now, device, seq)."""
    conn.executemany(SQL_MARK_DELIVERED, rows)


def mark_acked(conn: sqlite3.Connection, by_seq: list[tuple[int, float, int, int, str, int]],
               by_id: list[tuple[int, float, str, int, int]]) -> int:
    """Record acks; an ack only ever raises a row's ack rank (received < displayed < opened). Returns how
    many of the acks by message id named no push in that device's inbox (bogus: dropped, #10)."""
    if by_seq:
        conn.executemany(SQL_MARK_ACKED_BY_SEQ, by_seq)
    bogus = 0
    for row in by_id:  # one by one: each must say whether it found its row
        if conn.execute(SQL_MARK_ACKED_BY_ID, row).rowcount == 0 and \
                conn.execute(SQL_IN_INBOX, (row[2], row[3])).fetchone() is None:
            bogus += 1
    return bogus


def select_pending(conn: sqlite3.Connection, device: int, after_seq: int, now: float,
                   limit: int = -1) -> list[tuple[int, str, str]]:
    """Pending, unexpired pushes of a device above its cursor, in seq order, at most `limit` (-1: all):
    (seq, message_id, payload)."""
    return conn.execute(SQL_PENDING, (device, after_seq, now, limit)).fetchall()


def select_overflow(conn: sqlite3.Connection, device: int, after_seq: int, now: float, keep: int) -> int | None:
    """The seq through which a device's pending pushes above `after_seq` must be dropped so that `keep`
    remain, or None when no more than `keep` are pending."""
    row = conn.execute(SQL_NTH_PENDING_ABOVE, (device, after_seq, now, keep)).fetchone()
    return None if row is None else int(row[0])


def drop_through(conn: sqlite3.Connection, device: int, seq: int, now: float) -> None:
    """Drop a device's pending pushes up to `seq` (inbox overflow); the device will be told to resync."""
    conn.execute(SQL_DROP_THROUGH, (now, device, seq))
    conn.execute(SQL_SET_DROPPED_THROUGH, (seq, device))


def expire_batch(conn: sqlite3.Connection, now: float, limit: int) -> int:
    """Mark up to `limit` pending pushes whose TTL passed as expired; returns how many."""
    return conn.execute(SQL_EXPIRE_BATCH, (now, now, limit)).rowcount


def select_overfull(conn: sqlite3.Connection, inbox_limit: int) -> list[int]:
    """Devices holding more than `inbox_limit` pending pushes (a read: it scans every pending row)."""
    return [device for device, _count in conn.execute(SQL_OVERFULL, (inbox_limit,))]


def trim_inbox(conn: sqlite3.Connection, device: int, inbox_limit: int, now: float) -> int | None:
    """Drop a device's oldest pending pushes beyond `inbox_limit`; returns the seq dropped through."""
    row = conn.execute(SQL_NTH_PENDING, (device, inbox_limit)).fetchone()
    if row is None:
        return None
    drop_through(conn, device, row[0], now)
    return int(row[0])


def select_skipped(conn: sqlite3.Connection, device: int, after_seq: int, now: float,
                   limit: int) -> list[tuple[int, str, str]]:
    """Pushes above a cursor the device will never get and never acked: (seq, message_id, reason)."""
    return [(seq, mid, SKIP_REASONS.get(state, "expired"))
            for seq, mid, state in conn.execute(SQL_SKIPPED, (device, after_seq, now, limit))]


def retention_cutoff_id(before: float) -> str:
    """The smallest message id created at or after `before` (see dispatch.new_message_id)."""
    return f"m{int(before * 1000):012x}"


def purge_deliveries_batch(conn: sqlite3.Connection, cutoff_id: str, after: tuple[int, int],
                           limit: int) -> tuple[tuple[int, int] | None, int]:
    """Delete finished inbox rows of messages created before the cutoff among `limit` rows from `after`
    (device, seq); returns (where to go on, or None when done; rows deleted).

    A row whose message still has an escalation to run is kept: the escalation must see the ack (#10).
    Each device's highest seq is kept in its devices row first: a device's seqs never go back."""
    rows = conn.execute(SQL_INBOX_FROM, (after[0], after[1], limit)).fetchall()
    if not rows:
        return None, 0
    held = {row[0] for row in conn.execute(SQL_HELD_BY_ESCALATIONS, (cutoff_id,))}
    doomed, top = [], {}
    for device, seq, mid, state in rows:
        if state >= ACKED and mid < cutoff_id and mid not in held:
            doomed.append((device, seq))
            top[device] = seq  # rows come in seq order
    conn.executemany(SQL_RAISE_LAST_SEQ, [(seq, device) for device, seq in top.items()])
    conn.executemany(SQL_DELETE_DELIVERY, doomed)
    last = rows[-1]
    return ((last[0], last[1]) if len(rows) == limit else None), len(doomed)


def purge_messages_batch(conn: sqlite3.Connection, cutoff_id: str, after: str,
                         limit: int) -> tuple[str | None, int]:
    """Delete messages created before the cutoff that have no inbox row left, with their escalations (an
    escalation lives and dies with its message); at most `limit` looked at. Returns (go on from, deleted)."""
    ids = [row[0] for row in conn.execute(SQL_OLD_MESSAGES, (cutoff_id, after, limit))]
    deleted = 0
    for mid in ids:
        if conn.execute(SQL_HAS_DELIVERIES, (mid,)).fetchone() is not None:
            continue
        if conn.execute(SQL_HAS_PENDING_ESCALATION, (mid,)).fetchone() is not None:
            continue
        conn.execute(SQL_DELETE_ESCALATIONS, (mid,))
        conn.execute(SQL_DELETE_MESSAGE, (mid,))
        deleted += 1
    return (ids[-1] if len(ids) == limit else None), deleted


def purge(conn: sqlite3.Connection, before: float, batch: int = 1 << 62) -> int:
    """Every purge batch in one go, on one connection (tests and `write_now`); the daemon runs the batches
    as separate write jobs (dispatch.Dispatcher.purge)."""
    cutoff_id = retention_cutoff_id(before)
    deleted, after_row = 0, (0, 0)
    while True:
        next_row, n = purge_deliveries_batch(conn, cutoff_id, after_row, batch)
        deleted += n
        if next_row is None:
            break
        after_row = next_row
    after_id: str | None = ""
    while after_id is not None:
        after_id, _ = purge_messages_batch(conn, cutoff_id, after_id, batch)
    return deleted


def cancel_message(conn: sqlite3.Connection, app_id: str, message_id: str, now: float) -> int | None:
    """Cancel what is still pending; None when no such message belongs to the app."""
    if conn.execute(SQL_MESSAGE, (message_id, app_id)).fetchone() is None:
        return None
    conn.execute(SQL_CANCEL_MESSAGE, (now, message_id, app_id))
    return conn.execute(SQL_CANCEL_DELIVERIES, (now, message_id)).rowcount


def message_status(conn: sqlite3.Connection, app_id: str, message_id: str, detail_limit: int) -> dict[str, Any] | None:
    row = conn.execute(SQL_MESSAGE, (message_id, app_id)).fetchone()
    if row is None:
        return None
    mid, _app, created_at, expires_at, collapse_key, _target, targeted, cancelled_at = row
    counts = {name: 0 for name in STATE_NAMES}
    for state, n in conn.execute(SQL_STATE_COUNTS, (mid,)):
        counts[STATE_NAMES[state]] = n
    acks = {name: 0 for name in ACK_RANKS}
    for rank, n in conn.execute(SQL_ACK_COUNTS, (mid,)):
        acks[ACK_NAMES[rank]] = n
    status: dict[str, Any] = {
        "id": mid,
        "created_at": created_at,
        "expires_at": expires_at,
        "collapse_key": collapse_key,
        "cancelled_at": cancelled_at,
        "targeted": targeted,
        "counts": counts,
        "acks": acks,
    }
    detail = targeted <= detail_limit
    if detail:
        status["tokens"] = {
            token: {"state": STATE_NAMES[state], "ack": ACK_NAMES.get(ack), "updated_at": updated}
            for token, state, ack, updated in conn.execute(SQL_PER_TOKEN, (mid,))
        }
    fallback = escalations.message_fallback(conn, mid, detail)
    status["fallback_sent"] = fallback["sent"] if fallback else 0
    status["fallback_failed"] = fallback["failed"] if fallback else 0
    if fallback is not None:
        status["fallback"] = fallback["channels"]
        for token, channels in fallback.get("tokens", {}).items():
            if token in status.get("tokens", {}):
                status["tokens"][token]["fallback"] = channels
    return status
