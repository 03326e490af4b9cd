"""The store on a real SQLite file: seqs that never go back, checkpoints beside the writer."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time
from pathlib import Path

from appliance.store import Store
from appliance.store import apps as sql_apps
from appliance.store import devices as sql_devices
from appliance.store import messages as sql_messages


def _push(mid: str, device: int, seq: int, now: float) -> sql_messages.NewPush:
    message = {"id": mid, "app_id": "app_1", "created_at": now, "expires_at": now + 60, "payload": "{}",
               "collapse_key": None, "target": "{}", "targeted": 1, "fallback": None}
    return sql_messages.NewPush(message, [(device, seq)])


def _last_seq(store: Store, device: int) -> int:
    rows = store.read_now(sql_devices.select_active_devices)
    return next(row["last_seq"] for row in rows if row["id"] == device)


def test_last_seq_survives_the_purge_of_every_inbox_row(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    now = time.time()
    try:
        store.write_now(sql_apps.insert_app, {"id": "app_1", "name": "a", "api_key_hash": "k",
                                              "enrollment_secret_hash": "s", "created_at": now})
        device = store.write_now(sql_devices.insert_device, {
            "app_id": "app_1", "token": "dt_1", "client_id": "d-1", "mqtt_password_hash": "h",
            "mqtt_password_pbkdf2": None, "platform": "android", "package": "p", "device_id": "x", "alias": None,
            "phone": None, "email": None, "created_at": now})
        assert _last_seq(store, device) == 0
        store.write_now(sql_messages.insert_pushes, [_push(f"m{n:028x}", device, n, now) for n in (1, 2, 3)])
        assert _last_seq(store, device) == 3  # from the inbox rows alone
        store.write_now(sql_messages.mark_acked, [(1, now, device, n, f"m{n:028x}", 1) for n in (1, 2, 3)], [])
        purged = store.write_now(sql_messages.purge, now + 1)
        assert purged == 3
        assert store.read_now(lambda conn: conn.execute("SELECT count(*) FROM deliveries").fetchone()[0]) == 0
        assert _last_seq(store, device) == 3  # kept in the devices row
        store.write_now(sql_messages.insert_pushes, [_push(f"m{4:028x}", device, 4, now)])
        assert _last_seq(store, device) == 4
    finally:
        store.close()


def test_checkpoints_run_beside_the_writer_and_close_empties_the_wal(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    store = Store(path)
    now = time.time()

    async def writes() -> None:
        for n in range(50):
            await store.write(sql_apps.insert_app, {"id": f"app_{n}", "name": f"a{n}", "api_key_hash": "k",
                                                    "enrollment_secret_hash": "s", "created_at": now})

    store.start()
    try:
        asyncio.run(writes())
        deadline = time.monotonic() + 5
        while store.checkpoints < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.checkpoints >= 2  # the checkpoint thread runs on its own
        # The database file alone, without its WAL, already holds every committed row.
        shutil.copy(path, tmp_path / "copy.sqlite")
        conn = sqlite3.connect(tmp_path / "copy.sqlite")
        try:
            assert conn.execute("SELECT count(*) FROM apps").fetchone()[0] == 50
        finally:
            conn.close()
    finally:
        store.close()
