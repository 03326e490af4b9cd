"""The SQLite store: numbered migrations, one writer thread that group-commits, and a read pool.

Every write is a function of a connection, queued to the writer thread; the writer runs as many
queued writes as it finds (up to `max_group`) inside one `BEGIN IMMEDIATE` transaction, each in its
own savepoint, then commits once. A write's future resolves only after that COMMIT returned.

Writes come in two lanes: `write()` (a provider's push, an admin change) goes first; background writes
(device acks and delivered marks, maintenance, escalation bookkeeping) join a transaction at most
`background_per_commit` at a time, so device traffic never holds a 202 for more than a few jobs (#10).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from appliance.errors import StoreError

log = logging.getLogger("appliance.store")
T = TypeVar("T")

MIGRATIONS: tuple[str, ...] = (
    # 1: apps, devices, topics, messages and per-device inbox rows
    """
    CREATE TABLE apps (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        api_key_hash TEXT NOT NULL,
        enrollment_secret_hash TEXT NOT NULL,
        created_at REAL NOT NULL,
        key_rotated_at REAL
    );
    CREATE TABLE devices (
        id INTEGER PRIMARY KEY,
        app_id TEXT NOT NULL REFERENCES apps(id),
        token TEXT NOT NULL UNIQUE,
        client_id TEXT NOT NULL UNIQUE,
        mqtt_password_hash TEXT NOT NULL,
        platform TEXT NOT NULL,
        package TEXT NOT NULL,
        device_id TEXT NOT NULL,
        alias TEXT,
        phone TEXT,
        email TEXT,
        created_at REAL NOT NULL,
        retired_at REAL,
        retired_reason TEXT,
        last_seq INTEGER NOT NULL DEFAULT 0,
        dropped_through INTEGER NOT NULL DEFAULT 0,
        last_seen REAL
    );
    CREATE UNIQUE INDEX devices_identity ON devices(app_id, package, device_id) WHERE retired_at IS NULL;
    CREATE TABLE topic_subscribers (
        app_id TEXT NOT NULL,
        topic TEXT NOT NULL,
        device INTEGER NOT NULL REFERENCES devices(id),
        PRIMARY KEY (app_id, topic, device)
    ) WITHOUT ROWID;
    CREATE INDEX topic_subscribers_device ON topic_subscribers(device);
    CREATE TABLE messages (
        id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        payload TEXT NOT NULL,
        collapse_key TEXT,
        target TEXT NOT NULL,
        targeted INTEGER NOT NULL,
        cancelled_at REAL
    );
    CREATE TABLE deliveries (
        device INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        message_id TEXT NOT NULL,
        state INTEGER NOT NULL,
        ack INTEGER,
        expires_at REAL NOT NULL,
        collapse_key TEXT,
        updated_at REAL,
        PRIMARY KEY (device, seq)
    ) WITHOUT ROWID;
    CREATE INDEX deliveries_message ON deliveries(message_id, device);
    CREATE INDEX deliveries_expiry ON deliveries(expires_at) WHERE state < 2;
    CREATE INDEX deliveries_collapse ON deliveries(collapse_key, device) WHERE state < 2 AND collapse_key IS NOT NULL;
    """,
    # 2: fallback by SMS and e-mail: per-app default policy, per-push policy, alias contacts, escalations
    """
    ALTER TABLE apps ADD COLUMN fallback TEXT;
    ALTER TABLE messages ADD COLUMN fallback TEXT;
    CREATE TABLE alias_contacts (
        app_id TEXT NOT NULL,
        alias TEXT NOT NULL,
        phone TEXT,
        email TEXT,
        updated_at REAL NOT NULL,
        PRIMARY KEY (app_id, alias)
    ) WITHOUT ROWID;
    CREATE TABLE escalations (
        message_id TEXT NOT NULL,
        device INTEGER NOT NULL,
        channel TEXT NOT NULL,
        state INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL NOT NULL,
        reason TEXT,
        receipt TEXT,
        updated_at REAL,
        PRIMARY KEY (message_id, device, channel)
    ) WITHOUT ROWID;
    CREATE INDEX escalations_due ON escalations(next_at) WHERE state <= 1;
    """,
    # 3: the MQTT password also as PBKDF2-SHA512 (Mosquitto's dynamic-security format), so the Mosquitto
    # backend can provision every device at start without knowing its password (#5)
    """
    ALTER TABLE devices ADD COLUMN mqtt_password_pbkdf2 TEXT;
    """,
    # 4: the provider binds identity (#9): one-time enrollment tickets, secrets that roll over with a grace
    # period, an audit log, and (package, device_id) no longer unique: knowing it must not retire a device
    """
    ALTER TABLE apps ADD COLUMN api_key_prev_hash TEXT;
    ALTER TABLE apps ADD COLUMN api_key_prev_until REAL;
    ALTER TABLE apps ADD COLUMN secret_prev_hash TEXT;
    ALTER TABLE apps ADD COLUMN secret_prev_until REAL;
    ALTER TABLE apps ADD COLUMN secret_rotated_at REAL;
    ALTER TABLE apps ADD COLUMN require_ticket INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE apps ADD COLUMN pushes_per_s REAL;
    ALTER TABLE apps ADD COLUMN targets_per_min REAL;
    CREATE TABLE enrollment_tickets (
        ticket_hash TEXT PRIMARY KEY,
        app_id TEXT NOT NULL REFERENCES apps(id),
        alias TEXT,
        phone TEXT,
        email TEXT,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        redeemed_at REAL,
        device INTEGER
    ) WITHOUT ROWID;
    CREATE INDEX enrollment_tickets_expiry ON enrollment_tickets(expires_at);
    CREATE TABLE audit_log (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        app_id TEXT,
        subject TEXT,
        detail TEXT
    );
    CREATE INDEX audit_log_app ON audit_log(app_id, id);
    DROP INDEX devices_identity;
    CREATE INDEX devices_identity ON devices(app_id, package, device_id) WHERE retired_at IS NULL;
    """,
)

CHECKPOINT_EVERY_S = 1.0
WAL_LIMIT_BYTES = 1 << 30
SQL_CREATE_VERSION = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"


def _connect(path: Path, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to the newest version, one transaction per migration; return the version."""
    conn.execute(SQL_CREATE_VERSION)
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    version = row[0] if row else 0
    if version > len(MIGRATIONS):
        raise StoreError(
            f"the database has schema version {version}, newer than this intrapush knows ({len(MIGRATIONS)}); "
            "run the newer release or restore a backup"
        )
    for number in range(version + 1, len(MIGRATIONS) + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in filter(None, (s.strip() for s in MIGRATIONS[number - 1].split(";"))):
                conn.execute(statement)
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (number,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        log.info("event=migrated version=%d", number)
    return len(MIGRATIONS)


_WAKE = object()  # put on the main queue for each background job, so the writer wakes for it


class _Job:
    __slots__ = ("fn", "args", "future", "loop")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], future: asyncio.Future[Any] | None,
                 loop: asyncio.AbstractEventLoop | None) -> None:
        self.fn = fn
        self.args = args
        self.future = future
        self.loop = loop


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Store:
    """The database file: `write()` group-commits on the writer thread, `read()` uses a pool."""

    def __init__(self, path: Path, synchronous: str = "full", max_group: int = 256, readers: int = 2,
                 background_per_commit: int = 4) -> None:
        self.path = path
        self.synchronous = synchronous
        self.max_group = max_group
        self.background_per_commit = background_per_commit
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()  # _Job, _WAKE or None (stop)
        self._background: deque[_Job] = deque()
        self._thread: threading.Thread | None = None
        self._local = threading.local()
        self._readers = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="store-read")
        self._reader_conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self.commits = 0
        self.committed_writes = 0
        self.checkpoints = 0
        self._checkpointer: threading.Thread | None = None
        self._stop_checkpoints = threading.Event()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = _connect(path, synchronous)
            self.version = migrate(self._conn)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open the database {path}: {exc}") from exc

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        # Checkpoints move to their own thread: run by the writer after a commit (SQLite's auto-checkpoint),
        # one could hold every pending commit, and so every push, for 50-100 ms.
        self._conn.execute("PRAGMA wal_autocheckpoint=0")
        self._thread = threading.Thread(target=self._run_writer, name="store-writer", daemon=True)
        self._thread.start()
        self._checkpointer = threading.Thread(target=self._run_checkpointer, name="store-checkpoint", daemon=True)
        self._checkpointer.start()

    def close(self) -> None:
        """Finish every queued write, then close all connections."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
            self._stop_checkpoints.set()
            if self._checkpointer is not None:
                self._checkpointer.join()
            self._conn.execute("PRAGMA wal_autocheckpoint=1000")
            self._checkpoint(self._conn, "TRUNCATE")
        self._readers.shutdown(wait=True)
        with self._lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()
        self._conn.close()

    @property
    def db(self) -> sqlite_utils.Database:
        """sqlite-utils view of the writer connection; only for use before start() or after close()."""
        return sqlite_utils.Database(self._conn)

    # -- writes ----------------------------------------------------------------------------------
    def write(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue `fn(conn, *args)`; the future resolves once its transaction has committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Job(fn, args, future, loop))
        return future

    def write_later(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue a background write nobody waits for (bookkeeping such as delivered marks)."""
        self._background.append(_Job(fn, args, None, None))
        self._queue.put(_WAKE)

    def write_background(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue a background write (device traffic, maintenance): it never goes ahead of a `write()`, and at
        most `background_per_commit` of them share a transaction; the future resolves after its commit."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._background.append(_Job(fn, args, future, loop))
        self._queue.put(_WAKE)
        return future

    def write_now(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a write on the caller's thread, outside the writer (only while the writer is stopped)."""
        assert self._thread is None, "write_now while the writer runs"
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(self._conn, *args)
            self._conn.execute("COMMIT")
            return result
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    def _run_writer(self) -> None:
        conn = self._conn
        main, background = self._queue, self._background
        stopping = False
        while True:
            batch: list[_Job] = []
            if not background and not stopping:
                first = main.get()  # sleep until a write (or a background write's wake-up) comes
                if first is None:
                    stopping = True
                elif first is not _WAKE:
                    batch.append(first)
            while len(batch) < self.max_group:  # every queued foreground write first
                try:
                    job = main.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                elif job is not _WAKE:
                    batch.append(job)
            for _ in range(self.background_per_commit):
                if not background:
                    break
                batch.append(background.popleft())
            if batch:
                self._commit_batch(conn, batch)
            elif stopping:
                break

    def _commit_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        outcomes: list[tuple[Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                conn.execute("SAVEPOINT job")
                try:
                    result = job.fn(conn, *job.args)
                    conn.execute("RELEASE job")
                    outcomes.append((result, None))
                except Exception as exc:  # one bad write must not sink the others
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    outcomes.append((None, exc))
                    if job.future is None:
                        log.exception("event=write_failed fn=%s", getattr(job.fn, "__name__", job.fn))
            conn.execute("COMMIT")
            self.commits += 1
            self.committed_writes += len(batch)
        except Exception as exc:
            log.exception("event=commit_failed writes=%d", len(batch))
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            outcomes = [(None, StoreError(f"commit failed: {exc}"))] * len(batch)
        for job, (result, error) in zip(batch, outcomes):
            if job.future is not None and job.loop is not None:
                try:
                    job.loop.call_soon_threadsafe(_settle, job.future, result, error)
                except RuntimeError:  # loop already closed: nobody is waiting any more
                    pass

    # -- checkpoints -----------------------------------------------------------------------------
    def _run_checkpointer(self) -> None:
        """Copy committed pages from the WAL into the database file beside the writer, never holding it up
        (PASSIVE); only a WAL grown past WAL_LIMIT_BYTES under sustained load makes the writer wait once
        (RESTART), so that the file stays bounded."""
        conn = _connect(self.path, self.synchronous)
        wal = Path(f"{self.path}-wal")
        try:
            while not self._stop_checkpoints.wait(CHECKPOINT_EVERY_S):
                try:
                    big = wal.stat().st_size > WAL_LIMIT_BYTES
                except FileNotFoundError:
                    big = False
                self._checkpoint(conn, "RESTART" if big else "PASSIVE")
        finally:
            conn.close()

    def _checkpoint(self, conn: sqlite3.Connection, mode: str) -> None:
        try:
            conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
            self.checkpoints += 1
        except sqlite3.Error as exc:  # the next round tries again; the WAL keeps every commit meanwhile
            log.warning("event=checkpoint_failed mode=%s error=%r", mode, str(exc))

    # -- reads -----------------------------------------------------------------------------------
    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path, self.synchronous)
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
            with self._lock:
                self._reader_conns.append(conn)
        return conn

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(conn, *args)` on a read connection in the pool; sees every committed write."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, lambda: fn(self._reader(), *args))

    def read_now(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a read on the writer connection from the caller's thread (start-up, CLI)."""
        return fn(self._conn, *args)
