"""The benchmark suite of issues #5 and #18: the real daemon, its real HTTP API, thousands of devices from
bench/loadgen.py, on each broker backend; beside raw amqtt and raw Mosquitto relays, the baselines of the
same run, to which every figure is also given as a ratio (machines differ; ratios hold).

    python bench/suite.py --devices 10000                 # both backends, every scenario, 3 repetitions
    python bench/suite.py table                           # the latest run's table, from bench/results.jsonl

Scenarios per backend: hold (once), then unicast (500-message batches, single requests), latency (paced),
broadcast and reconnect storm, repeated --repeat times (median and spread recorded), then crash (kill -9).
"Acked" is read back from the store (committed rows in state acked), not counted by the generator. Each
scenario appends one JSON line to bench/results.jsonl (not with BENCH_NO_RECORD=1). Loopback only; every
wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import BASELINE_KEYS, OWN_BASELINE, StoreReader, baseline_summary, ratio, record, run_info, summarise  # noqa: E402
from loadgen import Fleet, relay_rate  # noqa: E402
from push_path import metric  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")
SCENARIOS = ("batch", "single", "latency", "broadcast", "storm", "crash")


# -- the daemon under test --------------------------------------------------------------------------
class Daemon:
    def __init__(self, data_dir: Path, backend: str) -> None:
        self.data_dir, self.backend = data_dir, backend
        self.proc: subprocess.Popen[bytes] | None = None
        self.addrs: dict[str, str] = {}

    def start(self) -> Daemon:
        run = self.data_dir / "run.json"
        run.unlink(missing_ok=True)
        env = {**os.environ, "INTRAPUSH_API_LISTEN": "127.0.0.1:0", "INTRAPUSH_BROKER_LISTEN": "127.0.0.1:0",
               "INTRAPUSH_API_TLS_LISTEN": "", "INTRAPUSH_BROKER_TLS_LISTEN": "", "INTRAPUSH_BROKER_WSS_LISTEN": "",
               "INTRAPUSH_CERTS_NAMES": "localhost,127.0.0.1", "INTRAPUSH_BROKER_BACKEND": self.backend,
               "INTRAPUSH_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "warning"), "INTRAPUSH_API_MAX_TOKENS": "100000",
               "INTRAPUSH_METRICS_LISTEN": "127.0.0.1:0"}
        # The generator brings 20,000 devices from each of 127.0.0.1, .2, …: a storm measures the box, not the
        # per-source limits (#10), which exempt only 127.0.0.1 and ::1 by default.
        env["INTRAPUSH_BROKER_CONNECT_LIMIT_EXEMPT"] = ",".join(f"127.0.0.{n}" for n in range(1, 17))
        # One provider process with up to 128 pooled connections stands for many app servers (#16's cap is 64
        # per source address by default).
        env["INTRAPUSH_API_MAX_CONNECTIONS_PER_ADDRESS"] = "1024"
        log = open(self.data_dir.parent / f"daemon-{self.backend}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--data-dir", str(self.data_dir)],
                                     env=env, stdout=log, stderr=log)
        for _ in range(600):
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}")
            if run.exists():
                try:
                    self.addrs = json.loads(run.read_text())
                    return self
                except ValueError:
                    pass
            time.sleep(0.05)
        raise RuntimeError("daemon did not start in 30 s")

    @property
    def url(self) -> str:
        return "http://" + self.addrs["http"]

    @property
    def metrics_url(self) -> str:
        return f"http://{self.addrs['metrics']}/metrics"

    @property
    def mqtt_port(self) -> int:
        return int(self.addrs["mqtt"].rsplit(":", 1)[1])

    def pids(self) -> list[int]:
        assert self.proc is not None
        pids = [self.proc.pid]
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            pids += [int(p) for p in (task / "children").read_text().split()]
        return pids

    def cpu_s(self) -> float:
        return sum(self.cpu_by_process().values())

    def cpu_by_process(self) -> dict[str, float]:
        """CPU seconds so far of the daemon and of each child (Mosquitto), by process name."""
        out: dict[str, float] = {}
        for n, pid in enumerate(self.pids()):
            stat = Path(f"/proc/{pid}/stat")
            if stat.exists():
                name, f = stat.read_text().split(" (", 1)[1].split(")", 1)[0], stat.read_text().rsplit(")", 1)[1].split()
                key = "intrapush" if n == 0 else name
                out[key] = out.get(key, 0.0) + (int(f[11]) + int(f[12])) / CLK
        return out

    def rss_kib(self) -> dict[str, int]:
        out = {}
        for pid in self.pids():
            status = Path(f"/proc/{pid}/status")
            if status.exists():
                text = status.read_text()
                name = "intrapush" if pid == self.pids()[0] else text.split()[1]
                out[name] = int(text.split("VmRSS:")[1].split()[0])
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


async def wait_metric(session: aiohttp.ClientSession, url: str, name: str, at_least: float, timeout: float) -> float:
    """Seconds until the metric reached the value (bounded)."""
    t = time.perf_counter()
    while await metric(session, url, name) < at_least:
        if time.perf_counter() - t > timeout:
            raise TimeoutError(f"{name} < {at_least} after {timeout} s")
        await asyncio.sleep(0.01)
    return time.perf_counter() - t


# -- set-up: enroll once, copy per backend ---------------------------------------------------------------
async def prepare_template(work: Path, devices: int) -> tuple[Path, dict[str, str], list[dict[str, Any]]]:
    """N devices enrolled through the API (embedded backend: fast); each backend run gets a copy. The
    Mosquitto backend provisions them all from the store at its start (the bulk path)."""
    template = work / "template"
    d = Daemon(template / "data", "embedded")
    (template / "data").mkdir(parents=True)
    d.start()
    try:
        out = subprocess.run([sys.executable, "-m", "appliance", "app", "create", "bench", "--json", "--data-dir",
                              str(template / "data")], capture_output=True, text=True, check=True)
        app = json.loads(out.stdout)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
            sem = asyncio.Semaphore(64)

            async def one(i: int) -> dict[str, Any]:
                async with sem:
                    body = {"app_id": app["app_id"], "platform": "android", "package": "com.bench",
                            "device_id": f"bench-{i}"}
                    async with session.post(f"{d.url}/v1/devices", json=body,
                                            headers={"Authorization": f"Bearer {app['enrollment_secret']}"}) as r:
                        assert r.status == 201, await r.text()
                        return await r.json()

            t = time.perf_counter()
            enrollments = await asyncio.gather(*(one(i) for i in range(devices)))
            print(f"enrolled {devices} devices in {time.perf_counter() - t:.1f} s (embedded)", flush=True)
    finally:
        d.stop()
    return template / "data", app, enrollments


# -- scenarios --------------------------------------------------------------------------------------
async def wait_acked(store: StoreReader, ids: list[str], expected: int, t0: float, timeout: float) -> tuple[float, int]:
    """Seconds from t0 until the store holds `expected` acked deliveries of these messages (committed, read
    back read-only), and how many it holds then. Polls the cheap pending count first; bounded by `timeout`."""
    deadline = time.perf_counter() + timeout
    last_exact = 0.0
    while True:
        now = time.perf_counter()
        if store.pending() == 0 or now - last_exact > 0.5:
            last_exact = now
            acked = await asyncio.to_thread(store.acked, ids)
            if acked >= expected or now > deadline:
                return time.perf_counter() - t0, acked
        await asyncio.sleep(0.005)


async def status_sample(session: aiohttp.ClientSession, url: str, ids: list[str], k: int = 20) -> str:
    """The provider's status API for a sample of the messages: "acked/targeted" summed over the sample."""
    acked = targeted = 0
    for mid in random.Random(len(ids)).sample(ids, min(k, len(ids))):
        async with session.get(f"{url}/v1/messages/{mid}") as r:
            doc = await r.json()
            acked += doc["counts"]["acked"]
            targeted += doc["targeted"]
    return f"{acked}/{targeted}"


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))] if sorted_values else 0.0


async def run_backend(backend: str, args: argparse.Namespace, template: Path, app: dict[str, str],
                      enrollments: list[dict[str, Any]], work: Path, base: dict[str, Any],
                      baselines: dict[str, Any]) -> list[dict[str, Any]]:
    """The scenarios on one backend; returns the rows it recorded."""
    data = work / backend / "data"
    shutil.copytree(template, data, ignore=shutil.ignore_patterns("admin.sock", "run.json"))
    base = {**base, "backend": backend, "devices": len(enrollments)}
    rows: list[dict[str, Any]] = []
    d = Daemon(data, backend).start()
    store = StoreReader(data)
    headers = {"Authorization": f"Bearer {app['api_key']}"}
    tokens = [e["token"] for e in enrollments]
    n = len(enrollments)
    try:
        async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=128)) as session:
            await asyncio.sleep(1.0)
            rss0 = d.rss_kib()
            fleet = Fleet(enrollments, "127.0.0.1", d.mqtt_port)
            connect_s = await fleet.connect(args.concurrency)
            gc.freeze()  # the generator's own pauses must not show up as the box's latency (see main())
            await wait_metric(session, d.metrics_url, "intrapush_devices_online", n, 60)
            await asyncio.sleep(2.0)
            rss1 = d.rss_kib()
            cpu0 = d.cpu_s()
            await asyncio.sleep(args.hold_s)
            idle_cpu = (d.cpu_s() - cpu0) / args.hold_s if args.hold_s else 0.0
            online = await metric(session, d.metrics_url, "intrapush_devices_online")
            row = {**base, "scenario": "hold", "connect_per_s": round(n / connect_s),
                   "rss_before_kib": rss0, "rss_after_kib": rss1,
                   "kib_per_device": {k: round((rss1[k] - rss0.get(k, 0)) / n, 2) for k in rss1},
                   "idle_cpu_pct": round(idle_cpu * 100, 1), "hold_s": args.hold_s,
                   "online_at_end": int(online), "lost": fleet.stats.lost, "baselines": baselines,
                   "ratio": {name: ratio("rate", n / connect_s, baselines.get(key, 0)) for name, key in BASELINE_KEYS.items()},
                   "ratio_to": OWN_BASELINE[backend]}
            record(row, quiet=True)
            rows.append(row)

            async def post(body: dict[str, Any]) -> list[str]:
                async with session.post(f"{d.url}/v1/messages", json=body) as r:
                    assert r.status == 202, await r.text()
                    doc = await r.json()
                    return [x["id"] for x in doc["results"]] if "results" in doc else [doc["id"]]

            async def unicast(bodies: list[dict[str, Any]], concurrency: int, pushes: int) -> dict[str, Any]:
                sem = asyncio.Semaphore(concurrency)
                received0 = fleet.stats.received
                cpu = d.cpu_by_process()
                own_cpu = time.process_time()
                ids: list[str] = []

                async def one(body: dict[str, Any]) -> None:
                    async with sem:
                        ids.extend(await post(body))

                t = time.perf_counter()
                await asyncio.gather(*(one(b) for b in bodies))
                accepted_s = time.perf_counter() - t
                await asyncio.wait_for(fleet.stats.wait_received(received0 + pushes), 300)
                delivered_s = time.perf_counter() - t
                acked_s, acked = await wait_acked(store, ids, pushes, t, 300)
                return {"pushes": pushes, "accepted_per_s": round(pushes / accepted_s),
                        "delivered_per_s": round(pushes / delivered_s), "acked_in_store": acked,
                        "acked_per_s": round(acked / acked_s),
                        "status_api_sample": await status_sample(session, d.url, ids),
                        "box_cpu_us_per_push": round((d.cpu_s() - sum(cpu.values())) / pushes * 1e6),
                        "cpu_us_per_push": {**{k: round((v - cpu.get(k, 0.0)) / pushes * 1e6)
                                               for k, v in d.cpu_by_process().items()},
                                            "loadgen": round((time.process_time() - own_cpu) / pushes * 1e6)}}

            async def latency(rate: int) -> dict[str, Any]:
                """Paced single requests; the push carries the call time, the device subtracts it."""
                stats = fleet.stats
                stats.latencies = []
                stats.record_latency = True
                count = int(rate * args.latency_s)
                received0 = stats.received
                tasks = []
                sem = asyncio.Semaphore(256)
                ids: list[str] = []
                cpu = d.cpu_s()
                t0 = time.perf_counter()

                async def paced(tok: str) -> None:
                    async with sem:
                        ids.extend(await post({"to": {"token": tok}, "title": "lat", "data": {"t": time.time()}}))

                for k in range(count):
                    delay = t0 + k / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(paced(rnd.choice(tokens))))
                await asyncio.gather(*tasks)
                await asyncio.wait_for(stats.wait_received(received0 + count), 120)
                elapsed = time.perf_counter() - t0
                stats.record_latency = False
                lat = sorted(stats.latencies)
                _, acked = await wait_acked(store, ids, count, t0, 120)
                return {"pushes": count, "achieved_per_s": round(count / elapsed), "acked_in_store": acked,
                        "p50_ms": round(percentile(lat, 0.5) * 1000, 2), "p99_ms": round(percentile(lat, 0.99) * 1000, 2),
                        "max_ms": round(lat[-1] * 1000, 2), "box_cpu_pct": round((d.cpu_s() - cpu) / elapsed * 100)}

            async def broadcast() -> dict[str, Any]:
                received0 = fleet.stats.received
                t = time.perf_counter()
                ids = await post({"to": {"all": True}, "title": "everyone"})
                accepted_s = time.perf_counter() - t
                await asyncio.wait_for(fleet.stats.wait_received(received0 + n), 120)
                delivered_s = time.perf_counter() - t
                acked_s, acked = await wait_acked(store, ids, n, t, 120)
                return {"accepted_s": round(accepted_s, 3), "all_delivered_s": round(delivered_s, 3),
                        "all_acked_s": round(acked_s, 3), "acked_in_store": acked, "acked_per_s": round(acked / acked_s)}

            async def storm() -> dict[str, Any]:
                """Everyone drops, 10 pushes each wait in the store, everyone comes back at once."""
                fleet.drop_all()
                await asyncio.sleep(0.5)
                t = time.perf_counter()
                while await metric(session, d.metrics_url, "intrapush_devices_online") > 0:
                    if time.perf_counter() - t > 120:
                        raise TimeoutError("devices still online 120 s after dropping them")
                    await asyncio.sleep(0.05)
                ids = []
                for i in range(10):
                    ids += await post({"to": {"all": True}, "title": f"while away {i}"})
                received0 = fleet.stats.received
                lost0 = fleet.stats.lost
                t = time.perf_counter()
                connect_s = await fleet.connect(args.storm_concurrency)
                await asyncio.wait_for(fleet.stats.wait_received(received0 + 10 * n), 300)
                caught_up_s = time.perf_counter() - t
                acked_s, acked = await wait_acked(store, ids, 10 * n, t, 300)
                return {"pending_each": 10, "all_connected_s": round(connect_s, 2), "all_caught_up_s": round(caught_up_s, 2),
                        "all_acked_s": round(acked_s, 2), "acked_in_store": acked, "acked_per_s": round(acked / acked_s),
                        "drops_during": fleet.stats.lost - lost0}

            rnd = random.Random(5)
            runs: dict[tuple[str, int | None], list[dict[str, Any]]] = defaultdict(list)
            repeated = {"batch", "single", "latency", "broadcast", "storm"} & set(args.only)
            for rep in range(args.repeat if repeated else 0):
                print(f"{backend}: repetition {rep + 1} of {args.repeat}", flush=True)
                if "batch" in args.only:
                    batches = []
                    for start in range(0, args.pushes, 500):
                        # 500 distinct devices per batch, with repeats when fewer are enrolled
                        picked = [tokens[i % len(tokens)] for i in rnd.sample(range(max(500, len(tokens))), 500)]
                        batches.append({"messages": [{"to": {"token": tok}, "title": "bench", "body": "x" * 60}
                                                     for tok in picked[:min(500, args.pushes - start)]]})
                    runs["unicast_batch500", None].append(await unicast(batches, args.batch_concurrency, args.pushes))
                if "single" in args.only:
                    singles = [{"to": {"token": rnd.choice(tokens)}, "title": "bench", "body": "x" * 60}
                               for _ in range(args.single)]
                    runs["unicast_single", None].append(await unicast(singles, 32, args.single))
                for rate in args.rates if "latency" in args.only else []:
                    runs["latency", rate].append(await latency(rate))
                if "broadcast" in args.only:
                    runs["broadcast", None].append(await broadcast())
                if "storm" in args.only:
                    runs["reconnect_storm", None].append(await storm())
            for (scenario, rate), reps in runs.items():
                row = summarise({**base, **({"rate": rate} if rate else {})}, scenario, reps, baselines)
                record(row, quiet=True)
                rows.append(row)
            fleet.drop_all()
    finally:
        d.stop()
        store.close()
    if "crash" in args.only:
        rows.append(await crash(backend, args, data, app, enrollments[:args.crash_devices], base))
    return rows


async def crash(backend: str, args: argparse.Namespace, data: Path, app: dict[str, str],
                enrollments: list[dict[str, Any]], base: dict[str, Any]) -> dict[str, Any]:
    """kill -9 during a unicast run; every push answered 202 must be in the store and reach its device
    after the restart."""
    d = Daemon(data, backend).start()
    headers = {"Authorization": f"Bearer {app['api_key']}"}
    accepted: dict[str, str] = {}
    stop = asyncio.Event()
    async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=64)) as session:
        fleet = Fleet(enrollments, "127.0.0.1", d.mqtt_port)
        await fleet.connect(args.concurrency)
        seen: set[str] = set()
        original = fleet.devices[0].__class__._on_push

        def tracking(self: Any, payload: bytes, out: list[bytes]) -> None:
            seen.add(json.loads(payload).get("id", ""))
            original(self, payload, out)

        fleet.devices[0].__class__._on_push = tracking  # type: ignore[method-assign]
        rnd = random.Random(9)

        async def sender() -> None:
            while not stop.is_set():
                tok = rnd.choice(enrollments)["token"]
                try:
                    async with session.post(f"{d.url}/v1/messages", json={"to": {"token": tok}, "title": "crash"}) as r:
                        if r.status == 202:
                            accepted[(await r.json())["id"]] = tok
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    await asyncio.sleep(0.01)

        senders = [asyncio.create_task(sender()) for _ in range(16)]
        await asyncio.sleep(args.crash_after_s)
        d.kill9()
        stop.set()
        await asyncio.gather(*senders)
        answered = len(accepted)
        fleet.drop_all()
        d.start()
        fleet.port = d.mqtt_port
        await fleet.connect(args.concurrency)
        t = time.perf_counter()
        while not set(accepted) <= seen and time.perf_counter() - t < 60:
            await asyncio.sleep(0.1)
        fleet.drop_all()
        fleet.devices[0].__class__._on_push = original  # type: ignore[method-assign]
    d.stop()
    store = StoreReader(data)
    in_store = store.stored(list(accepted))
    store.close()
    row = {**base, "backend": backend, "scenario": "crash", "devices": len(enrollments), "answered_202": answered,
           "in_store_after_restart": in_store, "lost": len(set(accepted) - seen)}
    record(row, quiet=True)
    return row


async def baseline_once(work: Path, messages: int) -> dict[str, float]:
    """Raw relays with the same load generator: stock amqtt 0.12.1 and Debian's Mosquitto, 1 -> 1, QoS 1."""
    stock = subprocess.Popen([sys.executable, str(ROOT / "tests" / "data" / "stock_amqtt.py")], stdout=subprocess.PIPE,
                             text=True)
    try:
        port = int(stock.stdout.readline())  # type: ignore[union-attr]
        amqtt_rate = await relay_rate("127.0.0.1", port, messages // 5)
    finally:
        stock.kill()
        stock.wait()
    conf = work / "raw-mosquitto.conf"
    from appliance.broker.mosquitto_child import free_port  # noqa: PLC0415

    port = free_port("127.0.0.1")
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n"
                    f"max_inflight_messages 1000\nuser {os.environ.get('USER') or 'root'}\n")
    mosq = subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=subprocess.DEVNULL)
    try:
        await asyncio.sleep(0.3)
        mosq_rate = await relay_rate("127.0.0.1", port, messages)
    finally:
        mosq.terminate()
        mosq.wait()
    return {"amqtt_msgs_per_s": round(amqtt_rate), "mosquitto_msgs_per_s": round(mosq_rate)}


async def baselines(work: Path, messages: int, repeat: int, base: dict[str, Any]) -> dict[str, Any]:
    """The raw relays, `repeat` times; records one row and returns the medians with their spread."""
    runs = []
    for _ in range(repeat):
        runs.append(await baseline_once(work, messages))
    summary = baseline_summary(runs)
    record({**base, "scenario": "baseline_relay_qos1", "payload_bytes": 100, **summary, "repeat": repeat,
            "runs": runs}, quiet=True)
    return summary


async def run_suite(args: argparse.Namespace, source: str) -> list[dict[str, Any]]:
    """Baselines, then every backend; returns the rows of this run (also appended to results.jsonl)."""
    parent = Path(args.work_dir) if args.work_dir else None
    work = Path(tempfile.mkdtemp(prefix="intrapush-suite-", dir=parent))
    base = run_info(work, source)
    print(f"run {base['run']}: commit {base['commit']}, data on {base['fs'].get('type')} "
          f"({work}), {base['machine']['cpus']} CPUs, load {base['machine']['loadavg_1m_at_start']}", flush=True)
    rows: list[dict[str, Any]] = []
    try:
        summary = await baselines(work, args.relay_messages, args.repeat, base)
        print(f"baselines: amqtt {summary['amqtt_msgs_per_s']} msg/s, Mosquitto {summary['mosquitto_msgs_per_s']} msg/s",
              flush=True)
        template, app, enrollments = await prepare_template(work, args.devices)
        for backend in args.backends:
            rows += await run_backend(backend, args, template, app, enrollments, work, base, summary)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}", flush=True)
    return rows


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--backends", default="embedded,mosquitto", type=lambda s: s.split(","))
    p.add_argument("--devices", type=int, default=10000)
    p.add_argument("--repeat", type=int, default=3, help="repetitions of each scenario (median and spread recorded)")
    p.add_argument("--hold-s", type=float, default=60)
    p.add_argument("--pushes", type=int, default=30000, help="unicast pushes in 500-message batches")
    p.add_argument("--batch-concurrency", type=int, default=8, help="batch requests in flight (a provider sending in parallel)")
    p.add_argument("--single", type=int, default=3000, help="unicast pushes as single requests")
    p.add_argument("--rates", type=lambda s: [int(x) for x in s.split(",")], default=[200, 1000, 2000])
    p.add_argument("--latency-s", type=float, default=5)
    p.add_argument("--concurrency", type=int, default=400, help="connects in flight")
    p.add_argument("--storm-concurrency", type=int, default=2000, help="reconnects in flight in the storm")
    p.add_argument("--crash-devices", type=int, default=1000)
    p.add_argument("--crash-after-s", type=float, default=3)
    p.add_argument("--relay-messages", type=int, default=100000, help="messages per Mosquitto relay run (amqtt: a fifth)")
    p.add_argument("--only", default=",".join(SCENARIOS), type=lambda s: s.split(","),
                   help="scenarios after hold, comma-separated: " + ",".join(SCENARIOS))
    p.add_argument("--work-dir", default=os.environ.get("BENCH_WORK_DIR"),
                   help="where the data directories go (default: the system temp dir); its filesystem is recorded")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, data)")
    return p


def tune() -> None:
    # 10,000 device objects make each full collection of the generator a 30-100 ms pause, which its
    # latency figures would charge to the box: collect young objects rarely, and old ones (frozen) never.
    gc.set_threshold(50_000, 20, 100)
    try:
        import uvloop  # noqa: PLC0415

        uvloop.install()
    except ImportError:
        pass


if __name__ == "__main__":
    from report import print_run  # noqa: PLC0415

    if sys.argv[1:2] == ["table"]:
        print_run()
        sys.exit(0)
    arguments = parser(__doc__.splitlines()[0]).parse_args()
    tune()
    print_run(asyncio.run(run_suite(arguments, "suite")))
