"""The abuse bench of issue #10: does a handful of hostile devices slow everyone else down?

    python bench/abuse.py                          # embedded backend, 1,000 devices, 50 hostile
    python bench/abuse.py --backend mosquitto

1,000 well-behaved devices (bench/loadgen.py) receive single pushes paced at 1,000/s through the provider
API, first with no flood, then (same daemon, same run) while 50 hostile devices, real MQTT clients with
valid credentials, flood it from a separate process:
  - a third publish acks of 1,000 ids each as fast as their sockets drain: well-formed ids that exist
    nowhere, other devices' real message ids (among them those pending for 20 offline devices, which must
    stay pending), and junk;
  - a third send hellos in a loop with cursors 0, 10^15 and 2^64 (each has 100 pushes pending, so a
    cursor of 0 asks for all of them again);
  - a third reconnect in a tight loop (CONNECT, SUBSCRIBE, hello, drop).
The flood is bounded in count (--hostile) and time (the phase's length), loopback only. Printed for both
phases: p50/p99/max of the provider's 202 latency and of delivery latency (call to device; a push never
delivered within 30 s, answered or not, counts as slower than any), and the ratio with/without. Target: p99 with the flood <= 2x p99 without. One row goes to bench/results.jsonl (not with
BENCH_NO_RECORD=1).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import StoreReader, record, run_info  # noqa: E402
from loadgen import Fleet, _string, connect_packet, frame, packet  # noqa: E402
from suite import Daemon, percentile, prepare_template, tune, wait_metric  # noqa: E402

TARGET = 2.0
PENDING_PER_HOSTILE = 100
VICTIMS, PENDING_PER_VICTIM = 20, 10  # offline devices whose pending ids the hostile ones ack as their own


# -- the flood (a child process: its CPU must not slow the measuring generator's loop) ------------------
class Hostile(asyncio.Protocol):
    """One hostile device: logs in with its own valid credentials, then misbehaves until `end`."""

    def __init__(self, e: dict[str, Any], kind: str, stats: dict[str, int], ids: list[str], end: float) -> None:
        self.e, self.kind, self.stats, self.ids, self.end = e, kind, stats, ids, end
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.connack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        m = e["mqtt"]
        self.opening = (connect_packet(m["client_id"], m["username"], m["password"], 600)
                        + packet(0x82, b"\x00\x01" + _string(e["inbox_topic"]) + b"\x01"))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.opening + self.hello(0))  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connack.done():
            self.connack.set_exception(ConnectionError("closed before CONNACK"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        pos, out = 0, []
        while (bounds := frame(self.buf, pos, len(self.buf))) is not None:
            i, end = bounds
            ptype = self.buf[pos] >> 4
            if ptype == 2 and not self.connack.done():
                self.connack.set_result(None) if self.buf[i + 1] == 0 else self.connack.set_exception(
                    ConnectionError(f"CONNACK {self.buf[i + 1]}"))
            elif ptype == 3:
                self.stats["pushes_received"] += 1
                if self.buf[pos] & 0x06:  # PUBACK, never an intrapush ack: everything stays pending
                    tlen = int.from_bytes(self.buf[i:i + 2], "big")
                    out.append(b"\x40\x02" + bytes(self.buf[i + 2 + tlen:i + 4 + tlen]))
            pos = end
        del self.buf[:pos]
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def hello(self, cursor: int) -> bytes:
        return packet(0x30, _string(self.e["hello_topic"]) + b'{"cursor":%d}' % cursor)

    def ack(self, rnd: random.Random, pid: int) -> bytes:
        ids = []
        for n in range(1000):
            pick = n % 3
            if pick == 0:
                ids.append("m%028x" % rnd.getrandbits(112))  # well formed, exists nowhere
            elif pick == 1 and self.ids:
                ids.append(rnd.choice(self.ids))  # another device's real message
            else:
                ids.append("x" * rnd.randint(1, 40))  # junk
        body = json.dumps({"ids": ids}).encode()
        return packet(0x32, _string(self.e["ack_topic"]) + pid.to_bytes(2, "big") + body)

    async def flood(self) -> None:
        """Write as fast as the socket drains (at most 1 MiB buffered), until the phase ends or we are cut."""
        rnd, pid, cursors = random.Random(self.e["token"]), 0, (0, 10**15, 2**64)
        while time.monotonic() < self.end and not self.closed.done() and self.transport is not None:
            if self.transport.get_write_buffer_size() > 1 << 20:
                await asyncio.sleep(0.001)
                continue
            if self.kind == "ack":
                pid = pid % 65000 + 1
                self.transport.write(self.ack(rnd, pid))
                self.stats["ack_messages"] += 1
            else:
                self.transport.write(b"".join(self.hello(cursors[(self.stats["hellos"] + k) % 3]) for k in range(30)))
                self.stats["hellos"] += 30
            await asyncio.sleep(0)


async def hostile_device(e: dict[str, Any], kind: str, host: str, port: int, stats: dict[str, int],
                         ids: list[str], end: float) -> None:
    loop = asyncio.get_running_loop()
    while time.monotonic() < end:
        proto = Hostile(e, kind, stats, ids, end)
        try:
            transport, _ = await asyncio.wait_for(loop.create_connection(lambda: proto, host, port), 5)
        except (OSError, asyncio.TimeoutError):
            stats["connect_failures"] += 1
            await asyncio.sleep(0.05)
            continue
        try:
            await asyncio.wait_for(proto.connack, 5)
            stats["logins"] += 1
            if kind == "reconnect":
                transport.abort()
                continue
            await proto.flood()
            if proto.closed.done() and time.monotonic() < end:
                stats["cut_off_by_box"] += 1
                await asyncio.sleep(0.05)
        except (ConnectionError, asyncio.TimeoutError):
            stats["refused"] += 1
            await asyncio.sleep(0.05)
        finally:
            transport.abort()


async def flood_child(config: dict[str, Any]) -> dict[str, int]:
    stats = {k: 0 for k in ("logins", "refused", "connect_failures", "cut_off_by_box", "ack_messages", "hellos",
                            "pushes_received")}
    end = time.monotonic() + config["seconds"]
    kinds = ("ack", "hello", "reconnect")
    await asyncio.gather(*(hostile_device(e, kinds[i % 3], config["host"], config["port"], stats, config["ids"], end)
                           for i, e in enumerate(config["hostile"])))
    stats["ack_ids"] = stats["ack_messages"] * 1000
    return stats


# -- the measured side ---------------------------------------------------------------------------------------
def pct_ms(sorted_values: list[float], q: float) -> float | None:
    """A percentile in ms; None when it falls on a request that never got its answer or push."""
    if not sorted_values:
        return None
    v = percentile(sorted_values, q)
    return None if math.isinf(v) else round(v * 1000, 2)


async def phase(session: aiohttp.ClientSession, url: str, fleet: Fleet, tokens: list[str], rate: int,
                seconds: float, rnd: random.Random, request_timeout: float) -> dict[str, Any]:
    """Single pushes paced at `rate`; 202 latency measured at the provider, delivery latency at the device."""
    stats = fleet.stats
    stats.latencies = []
    stats.record_latency = True
    count = int(rate * seconds)
    received0 = stats.received
    answer: list[float] = []
    refused: dict[str, int] = {}
    timeout = aiohttp.ClientTimeout(total=request_timeout)
    ids: list[str] = []
    sem = asyncio.Semaphore(512)

    async def one(tok: str) -> None:
        async with sem:
            t = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/messages", json={"to": {"token": tok}, "title": "lat",
                                                                    "data": {"t": time.time()}}, timeout=timeout) as r:
                    doc = await r.json()
                    if r.status == 202:
                        answer.append(time.perf_counter() - t)
                        ids.append(doc["id"])
                        return
                    refused[str(r.status)] = refused.get(str(r.status), 0) + 1
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                refused[type(exc).__name__] = refused.get(type(exc).__name__, 0) + 1
            answer.append(math.inf)  # not accepted: counts as slower than any answer

    tasks = []
    t0 = time.perf_counter()
    for k in range(count):
        delay = t0 + k / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(rnd.choice(tokens))))
    await asyncio.gather(*tasks)
    accepted = len(ids)
    try:  # every push sent counts, answered or not: a request that timed out may still have been taken
        await asyncio.wait_for(stats.wait_received(received0 + count), 30)
    except asyncio.TimeoutError:
        pass
    elapsed = time.perf_counter() - t0
    stats.record_latency = False
    undelivered = max(0, count - len(stats.latencies))
    a, lat = sorted(answer), sorted(stats.latencies + [math.inf] * undelivered)
    return {"pushes": count, "answered_202": accepted, "refused": refused, "achieved_per_s": round(count / elapsed),
            "elapsed_s": round(elapsed, 2),
            "undelivered": undelivered, "ids": ids,
            "accept_ms": {"p50": pct_ms(a, 0.5), "p99": pct_ms(a, 0.99), "max": pct_ms(a, 1.0)},
            "delivery_ms": {"p50": pct_ms(lat, 0.5), "p99": pct_ms(lat, 0.99), "max": pct_ms(lat, 1.0)}}


def p99_ratio(flooded: dict[str, Any], quiet: dict[str, Any]) -> float | None:
    """p99 with the flood / p99 without; None (worse than any ratio) when the p99 with the flood is a timeout."""
    w, wo = flooded["p99"], quiet["p99"]
    if w is None:
        return None
    return round(w / max(wo or w, 0.01), 2)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    parent = Path(args.work_dir) if args.work_dir else None
    work = Path(tempfile.mkdtemp(prefix="intrapush-abuse-", dir=parent))
    base = run_info(work, "abuse")
    print(f"run {base['run']}: commit {base['commit']}, data on {base['fs'].get('type')}, "
          f"load {base['machine']['loadavg_1m_at_start']}", flush=True)
    child: subprocess.Popen[str] | None = None
    try:
        template, app, enrollments = await prepare_template(work, args.devices + args.hostile + VICTIMS)
        normal, hostile = enrollments[:args.devices], enrollments[args.devices:args.devices + args.hostile]
        victims = enrollments[args.devices + args.hostile:]
        d = Daemon(template, args.backend).start()
        store = StoreReader(template)
        tokens = [e["token"] for e in normal]
        try:
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {app['api_key']}"},
                                             connector=aiohttp.TCPConnector(limit=512)) as session:
                # pushes waiting for each hostile device: a hello with cursor 0 asks for all of them again
                for e in hostile:
                    async with session.post(f"{d.url}/v1/messages", json={"messages": [
                            {"to": {"token": e["token"]}, "title": "pending", "body": "y" * 60}
                            for _ in range(PENDING_PER_HOSTILE)]}) as r:
                        assert r.status == 202, await r.text()
                # pushes waiting for offline devices: a hostile ack of their ids must not count as theirs
                victim_ids: list[str] = []
                for e in victims:
                    async with session.post(f"{d.url}/v1/messages", json={"messages": [
                            {"to": {"token": e["token"]}, "title": "pending", "body": "z" * 60}
                            for _ in range(PENDING_PER_VICTIM)]}) as r:
                        assert r.status == 202, await r.text()
                        victim_ids += [x["id"] for x in (await r.json())["results"]]
                fleet = Fleet(normal, "127.0.0.1", d.mqtt_port)
                await fleet.connect(200)
                gc.freeze()
                await wait_metric(session, d.metrics_url, "intrapush_devices_online", len(normal), 60)
                await asyncio.sleep(1.0)
                rnd = random.Random(10)
                print(f"phase 1: {args.rate}/s for {args.seconds} s, no flood", flush=True)
                cpu = d.cpu_s()
                quiet = await phase(session, d.url, fleet, tokens, args.rate, args.seconds, rnd, args.request_timeout)
                quiet["box_cpu_pct"] = round((d.cpu_s() - cpu) / quiet["elapsed_s"] * 100)
                config = {"host": "127.0.0.1", "port": d.mqtt_port, "hostile": hostile, "seconds": args.seconds + 2,
                          "ids": quiet["ids"][-5000:] + victim_ids}
                child = subprocess.Popen([sys.executable, __file__, "--flood-child"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)
                assert child.stdin is not None and child.stdout is not None
                child.stdin.write(json.dumps(config))
                child.stdin.close()
                await asyncio.sleep(1.0)  # the flood is under way before the measured pushes start
                print(f"phase 2: {args.rate}/s for {args.seconds} s, {args.hostile} hostile devices flooding", flush=True)
                cpu = d.cpu_s()
                flooded = await phase(session, d.url, fleet, tokens, args.rate, args.seconds, rnd, args.request_timeout)
                flooded["box_cpu_pct"] = round((d.cpu_s() - cpu) / flooded["elapsed_s"] * 100)
                out = await asyncio.to_thread(child.stdout.read)  # the child ends when its phase does
                child.wait(10)
                flood = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
                child = None
                rss = d.rss_kib()
                fleet.drop_all()
                ids = quiet.pop("ids") + flooded.pop("ids")
                acked = await asyncio.to_thread(store.acked, ids)
                foreign = await asyncio.to_thread(store.acked, victim_ids)
        finally:
            d.stop()
            store.close()
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    row = {**base, "scenario": "abuse", "backend": args.backend, "devices": args.devices, "hostile": args.hostile,
           "rate": args.rate, "seconds": args.seconds, "without_flood": quiet, "with_flood": flooded, "flood": flood,
           "acked_in_store": acked, "rss_after_kib": rss, "victim_deliveries": len(victim_ids),
           "victim_deliveries_acked_by_others": foreign,
           "p99_ratio": {"accept": p99_ratio(flooded["accept_ms"], quiet["accept_ms"]),
                         "delivery": p99_ratio(flooded["delivery_ms"], quiet["delivery_ms"])}}
    record(row, quiet=True)
    return row


def ms(v: float | None) -> str:
    return "timeout" if v is None else str(v)


def print_row(row: dict[str, Any]) -> None:
    print(f"\nabuse, {row['backend']} backend: {row['devices']:,} devices at {row['rate']:,} pushes/s, "
          f"{row['hostile']} hostile, {row['seconds']} s per phase (commit {row['commit']})")
    head = (f"{'phase':<14} {'202s':>6} {'refused':>8} {'undeliv.':>8} {'202 p50':>8} {'p99':>8} {'max':>8}   "
            f"{'deliv. p50':>10} {'p99':>8} {'max':>8}  box CPU")
    print(head + "\n" + "-" * len(head))
    for name in ("without_flood", "with_flood"):
        p = row[name]
        a, dl = p["accept_ms"], p["delivery_ms"]
        print(f"{name.replace('_', ' '):<14} {p['answered_202']:>6} {sum(p['refused'].values()):>8} {p['undelivered']:>8} "
              f"{ms(a['p50']):>8} {ms(a['p99']):>8} {ms(a['max']):>8}   {ms(dl['p50']):>10} {ms(dl['p99']):>8} "
              f"{ms(dl['max']):>8}  "
              f"{p['box_cpu_pct']} %")
    f = row["flood"]
    for name in ("without_flood", "with_flood"):
        if row[name]["refused"]:
            print(f"{name.replace('_', ' ')}: not accepted: {row[name]['refused']}")
    print(f"flood: {f.get('logins', 0):,} logins, {f.get('ack_messages', 0):,} ack messages ({f.get('ack_ids', 0):,} ids), "
          f"{f.get('hellos', 0):,} hellos, {f.get('pushes_received', 0):,} pushes resent to the hostile, "
          f"cut off by the box {f.get('cut_off_by_box', 0)}, refused {f.get('refused', 0)}")
    print("(latencies in ms; timeout: the percentile fell on a request refused, timed out or never delivered)")
    print(f"pushes pending for offline devices, acked in the store by the hostile devices' acks: "
          f"{row['victim_deliveries_acked_by_others']} of {row['victim_deliveries']} (must be 0)")
    print(f"acked in store: {row['acked_in_store']:,} of {row['without_flood']['answered_202'] + row['with_flood']['answered_202']:,}; "
          f"box memory after: {row['rss_after_kib']}")
    for what, r in row["p99_ratio"].items():
        verdict = "meets" if r is not None and r <= TARGET else "MISSES"
        shown = f"{r}x" if r is not None else "timeout (past --request-timeout, or never delivered)"
        print(f"p99 {'202' if what == 'accept' else 'delivery'} latency with/without flood: {shown} "
              f"({verdict} the target <= {TARGET}x)")


def main() -> int:
    if sys.argv[1:2] == ["--flood-child"]:
        # The box may close a hostile connection (#10); a write to it must fail with EPIPE, not kill the flood.
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        print(json.dumps(asyncio.run(flood_child(json.loads(sys.stdin.read())))), flush=True)
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="embedded", choices=("embedded", "mosquitto"))
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--hostile", type=int, default=50)
    p.add_argument("--rate", type=int, default=1000, help="pushes per second to the well-behaved devices")
    p.add_argument("--seconds", type=float, default=10, help="length of each phase")
    p.add_argument("--request-timeout", type=float, default=10, help="seconds before a push request counts as failed")
    p.add_argument("--work-dir", default=os.environ.get("BENCH_WORK_DIR"))
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    tune()
    row = asyncio.run(run(args))
    print_row(row)
    return 0 if all(r is not None and r <= TARGET for r in row["p99_ratio"].values()) else 1


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
