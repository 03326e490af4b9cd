"""How long a push waits for the store while retention purges, or the expiry sweep expires, a big backlog
(#10).

    python bench/purge_latency.py [--rows 200000] [--devices 1000]

Fills a store (synchronous=full, as shipped) with `--rows` acked inbox rows of pushes older than the
retention, then purges them while a provider-like writer commits one push every 5 ms, and reports that
writer's commit latency (max, p99, median) during the purge and the purge's duration. Run once with the
daemon's batched purge (`dispatch.Dispatcher.purge`) and once with the previous one-statement purge, kept
here as the reference; then the same for the expiry sweep (`Dispatcher.sweep`) over as many pending rows
whose TTL passed, batched and as the previous single UPDATE. The 202 of a push waits for exactly this
commit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from appliance.directory import Directory  # noqa: E402
from appliance.dispatch import Dispatcher, new_message_id  # noqa: E402
from appliance.store import Store  # noqa: E402
from appliance.store import apps as sql_apps  # noqa: E402
from appliance.store import messages as sql_messages  # noqa: E402

RESULTS = Path(__file__).parent / "results.jsonl"
DAY = 86400.0

# The purge as it was before #10: one transaction, a full scan of deliveries and of every device.
OLD_PURGE = (
    """UPDATE devices SET last_seq = (SELECT max(seq) FROM deliveries WHERE device = devices.id)
       WHERE last_seq < coalesce((SELECT max(seq) FROM deliveries WHERE device = devices.id), 0)""",
    "DELETE FROM deliveries WHERE state >= 2 AND updated_at < :before",
    """DELETE FROM messages WHERE created_at < :before
       AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.message_id = messages.id)""",
)


def old_purge(conn: Any, before: float) -> int:
    n = 0
    for statement in OLD_PURGE:
        cur = conn.execute(statement, {"before": before} if ":before" in statement else {})
        n = cur.rowcount if "deliveries WHERE state" in statement else n
    return n


OLD_EXPIRE = "UPDATE deliveries SET state = 3, updated_at = ? WHERE state < 2 AND expires_at <= ?"


def old_expire(conn: Any, now: float) -> int:
    return conn.execute(OLD_EXPIRE, (now, now)).rowcount


def fill(store: Store, rows: int, devices: int, now: float, pending: bool = False) -> None:
    old = now - 40 * DAY
    store.write_now(sql_apps.insert_app, {"id": "app_1", "name": "a", "api_key_hash": "k",
                                          "enrollment_secret_hash": "s", "created_at": now})

    def insert(conn: Any) -> None:
        conn.executemany(
            "INSERT INTO devices (id, app_id, token, client_id, mqtt_password_hash, platform, package, device_id, "
            "created_at) VALUES (?, 'app_1', ?, ?, 'h', 'android', 'p', ?, ?)",
            [(d, f"dt_{d}", f"d-{d}", f"x{d}", now) for d in range(1, devices + 1)])
        messages = rows // devices
        for m in range(messages):
            created = old + m * 0.01
            mid = new_message_id(created)
            conn.execute("INSERT INTO messages (id, app_id, created_at, expires_at, payload, target, targeted) "
                         "VALUES (?, 'app_1', ?, ?, '{}', '{}', ?)", (mid, created, created + 60, devices))
            conn.executemany("INSERT INTO deliveries (device, seq, message_id, state, ack, expires_at, updated_at) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)",
                             [(d, m + 1, mid, 0 if pending else 2, None if pending else 1, created + 60,
                               created + 1) for d in range(1, devices + 1)])

    store.write_now(insert)


async def measure(store: Store, purge: Any, now: float) -> dict[str, float]:
    latencies: list[tuple[float, float]] = []  # (started, seconds to commit)
    done = asyncio.Event()
    seq = [10**6]

    async def provider() -> None:
        while not done.is_set():
            seq[0] += 1
            mid = new_message_id(now)
            push = sql_messages.NewPush(
                {"id": mid, "app_id": "app_1", "created_at": now, "expires_at": now + 60, "payload": "{}",
                 "collapse_key": None, "target": "{}", "targeted": 1, "fallback": None}, [(1, seq[0])])
            t = time.perf_counter()
            await store.write(sql_messages.insert_pushes, [push])
            latencies.append((t, time.perf_counter() - t))
            await asyncio.sleep(0.005)

    task = asyncio.create_task(provider())
    await asyncio.sleep(0.2)
    started = time.perf_counter()
    purged = await purge()
    duration = time.perf_counter() - started
    done.set()
    await task
    during = [took for at, took in latencies if started <= at + took and at <= started + duration]
    return {"purged_rows": purged, "purge_s": round(duration, 2), "pushes_during": len(during),
            "commit_ms_max": round(max(during) * 1000, 1),
            "commit_ms_p99": round(sorted(during)[int(len(during) * 0.99) - 1] * 1000, 1) if len(during) > 1 else 0,
            "commit_ms_median": round(statistics.median(during) * 1000, 1)}


async def run_one(path: Path, kind: str, batched: bool, rows: int, devices: int) -> dict[str, float]:
    now = time.time()
    store = Store(path)
    fill(store, rows, devices, now, pending=kind == "expiry")
    store.start()
    try:
        dispatcher = Dispatcher(store, Directory(), clock=lambda: now)
        if kind == "expiry":
            async def batched_sweep() -> int:
                await dispatcher.sweep()
                return dispatcher.counters["expired"]
            return await measure(store, batched_sweep if batched else lambda: store.write(old_expire, now), now)
        cutoff = now - 30 * DAY
        return await measure(store, (lambda: dispatcher.purge(cutoff)) if batched
                             else (lambda: store.write(old_purge, cutoff)), now)
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--devices", type=int, default=1000)
    args = parser.parse_args()
    result: dict[str, Any] = {"bench": "purge_latency", "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "host": platform.node(), "rows": args.rows, "devices": args.devices}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("purge", "expiry"):
            for name, batched in (("one_statement", False), ("batched", True)):
                result[f"{kind}_{name}"] = asyncio.run(run_one(Path(tmp) / f"{kind}_{name}.db", kind, batched,
                                                               args.rows, args.devices))
    print(json.dumps(result, indent=2))
    if not os.environ.get("BENCH_NO_RECORD"):
        with RESULTS.open("a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
