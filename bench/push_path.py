"""Quick end-to-end figures for the core push path: the real daemon, N connected devices, durable pushes.

    python bench/push_path.py [--devices 1000] [--pushes 20000] [--single 2000]

Prints, and appends to bench/results.jsonl: memory per connected device (daemon RSS), durable unicast
pushes per second (HTTP accepted -> fsynced -> delivered -> committed as acked in the store, read back
read-only) with 500-message batches and with single requests. BENCH_NO_RECORD=1: printed only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from appliance.device import Device, enroll  # noqa: E402
from common import StoreReader, record, run_info  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def start_daemon(data_dir: Path, extra_env: dict[str, str], tls: bool = False
                 ) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    listen = {"INTRAPUSH_API_TLS_LISTEN": "127.0.0.1:0", "INTRAPUSH_BROKER_TLS_LISTEN": "127.0.0.1:0"} if tls else \
        {"INTRAPUSH_API_LISTEN": "127.0.0.1:0", "INTRAPUSH_BROKER_LISTEN": "127.0.0.1:0",
         "INTRAPUSH_API_TLS_LISTEN": "", "INTRAPUSH_BROKER_TLS_LISTEN": ""}
    env = {**os.environ, **listen, "INTRAPUSH_BROKER_WSS_LISTEN": "", "INTRAPUSH_CERTS_NAMES": "localhost,127.0.0.1",
           "INTRAPUSH_METRICS_LISTEN": "127.0.0.1:0", **extra_env}
    log = open(data_dir.parent / "daemon.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--data-dir", str(data_dir)], env=env,
                            stdout=log, stderr=log)
    run = data_dir / "run.json"
    for _ in range(400):
        if run.exists():
            try:
                return proc, json.loads(run.read_text())
            except ValueError:
                pass
        time.sleep(0.05)
    raise RuntimeError("daemon did not start")


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    """One value from the daemon's metrics listener; `url` is http://ADDRESS/metrics (run.json's `metrics`)."""
    async with session.get(url) as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


async def run(args: argparse.Namespace) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="intrapush-bench-"))
    data_dir = tmp / "data"
    env = {"INTRAPUSH_LOG_LEVEL": args.log_level}
    proc, addrs = start_daemon(data_dir, env, args.tls)
    url = "https://" + addrs["https"].replace("127.0.0.1", "localhost") if args.tls else "http://" + addrs["http"]
    mqtt_port = int(addrs["mqtt-tls" if args.tls else "mqtt"].rsplit(":", 1)[1])
    metrics_url = f"http://{addrs['metrics']}/metrics"
    https = ssl.create_default_context(cafile=str(data_dir / "certs" / "ca.pem")) if args.tls else None
    out = subprocess.run([sys.executable, "-m", "appliance", "app", "create", "bench", "--json", "--data-dir",
                          str(data_dir)], capture_output=True, text=True, check=True)
    app = json.loads(out.stdout)
    result: dict[str, object] = {**run_info(data_dir, "push_path"), "scenario": "push_path", "tls": args.tls,
                                 "devices": args.devices, "log_level": args.log_level}
    store = StoreReader(data_dir)
    try:
        connector = aiohttp.TCPConnector(ssl=https) if https else None
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {app['api_key']}"},
                                         connector=connector) as session:
            sem = asyncio.Semaphore(32)

            async def one(i: int) -> dict:
                async with sem:
                    return await enroll(url, app["app_id"], app["enrollment_secret"], f"bench-{i}", "android",
                                        session=session, ssl_context=https)

            enrollments = await asyncio.gather(*(one(i) for i in range(args.devices)))
            await asyncio.sleep(0.5)
            rss_before = rss_kib(proc.pid)

            received = 0
            done = asyncio.Event()
            target = 0
            devices: list[Device] = []

            def on_push(doc: dict, box: list[Device] = devices) -> None:
                nonlocal received
                received += 1
                if received >= target:
                    done.set()

            t0 = time.perf_counter()
            for e in enrollments:
                dev = Device(e, host="localhost" if args.tls else "127.0.0.1", port=mqtt_port)
                devices.append(dev)
            # each device acks what it gets; the callback knows its device through a closure
            for dev in devices:
                dev.on_push = (lambda d: (lambda doc: (d.ack([doc["id"]]), on_push(doc))))(dev)
            conn_sem = asyncio.Semaphore(100)

            async def connect(dev: Device) -> None:
                async with conn_sem:
                    await dev.connect(keepalive=600)

            await asyncio.gather(*(connect(d) for d in devices))
            connect_s = time.perf_counter() - t0
            await asyncio.sleep(1.0)
            rss_after = rss_kib(proc.pid)
            result["connect_per_s"] = round(args.devices / connect_s)
            result["rss_idle_mib"] = round(rss_before / 1024, 1)
            result["kib_per_connected_device"] = round((rss_after - rss_before) / args.devices, 1)

            tokens = [e["token"] for e in enrollments]

            async def measure(label: str, bodies: list[dict], concurrency: int, expected: int) -> None:
                nonlocal received, target
                received = 0
                target = expected
                done.clear()
                acks0 = await metric(session, metrics_url, "intrapush_acks_total")
                req_sem = asyncio.Semaphore(concurrency)

                ids: list[str] = []

                async def post(body: dict) -> None:
                    async with req_sem:
                        async with session.post(f"{url}/v1/messages", json=body) as r:
                            assert r.status == 202, await r.text()
                            doc = await r.json()
                            ids.extend([x["id"] for x in doc["results"]] if "results" in doc else [doc["id"]])

                cpu0 = sum(os.times()[:2])
                d0 = Path(f"/proc/{proc.pid}/stat").read_text().split()
                t = time.perf_counter()
                await asyncio.gather(*(post(b) for b in bodies))
                accepted_s = time.perf_counter() - t
                await asyncio.wait_for(done.wait(), 120)
                delivered_s = time.perf_counter() - t
                while await metric(session, metrics_url, "intrapush_acks_total") - acks0 < expected:
                    await asyncio.sleep(0.01)
                # acked means committed: the store, read back, holds every one of them as acked
                while (acked := await asyncio.to_thread(store.acked, ids)) < expected:
                    if time.perf_counter() - t > 120:
                        break
                    await asyncio.sleep(0.01)
                acked_s = time.perf_counter() - t
                d1 = Path(f"/proc/{proc.pid}/stat").read_text().split()
                daemon_cpu = (int(d1[13]) + int(d1[14]) - int(d0[13]) - int(d0[14])) / os.sysconf("SC_CLK_TCK")
                result[label] = {
                    "pushes": expected, "accepted_per_s": round(expected / accepted_s),
                    "delivered_per_s": round(expected / delivered_s), "acked_in_store": acked,
                    "acked_per_s": round(acked / acked_s),
                    "daemon_cpu_us_per_push": round(daemon_cpu / expected * 1e6),
                    "loadgen_cpu_s": round(sum(os.times()[:2]) - cpu0, 1),
                }

            rnd = random.Random(7)
            batches = []
            for start in range(0, args.pushes, 500):
                n = min(500, args.pushes - start)
                batches.append({"messages": [{"to": {"token": rnd.choice(tokens)}, "title": "bench",
                                              "body": "x" * 60} for _ in range(n)]})
            await measure("unicast_batch500", batches, 4, args.pushes)
            singles = [{"to": {"token": rnd.choice(tokens)}, "title": "bench", "body": "x" * 60}
                       for _ in range(args.single)]
            await measure("unicast_single", singles, 32, args.single)
            result["rss_end_mib"] = round(rss_kib(proc.pid) / 1024, 1)
            for dev in devices:
                await dev.close()
    finally:
        store.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--pushes", type=int, default=20000)
    parser.add_argument("--single", type=int, default=2000)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--tls", action="store_true", help="HTTPS and MQTT over TLS, as shipped by default")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2))
    record(result, quiet=True)


if __name__ == "__main__":
    main()
