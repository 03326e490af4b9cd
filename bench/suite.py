"""The benchmark suite of issue #5: the real daemon, its real HTTP API, thousands of devices from
bench/loadgen.py, on each broker backend; plus raw amqtt and raw Mosquitto relays as baselines.

    python bench/suite.py --backends embedded,mosquitto --devices 10000
    python bench/suite.py table          # the markdown table of the latest results (docs/benchmarks.md)

Scenarios per backend: hold, unicast (500-message batches and single requests), latency (paced), broadcast,
reconnect storm, crash (kill -9). Each prints its figures and appends a JSON line to bench/results.jsonl.
Everything runs on 127.0.0.0/8 and every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from loadgen import Fleet, relay_rate  # noqa: E402
from push_path import metric  # noqa: E402

RESULTS = Path(__file__).parent / "results.jsonl"
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
               "INTRAPUSH_LOG_LEVEL": "warning", "INTRAPUSH_API_MAX_TOKENS": "100000"}
        # The generator brings 20,000 devices from each of 127.0.0.1, .2, …: a storm measures the box, not the
        # per-source limits (#10), which exempt only 127.0.0.1 and ::1 by default.
        env["INTRAPUSH_BROKER_CONNECT_LIMIT_EXEMPT"] = ",".join(f"127.0.0.{n}" for n in range(1, 17))
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


def record(result: dict[str, Any]) -> None:
    result = {**result, "machine": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
              "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(json.dumps(result), flush=True)
    if os.environ.get("BENCH_NO_RECORD"):
        return
    with RESULTS.open("a") as f:
        f.write(json.dumps(result) + "\n")


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
async def run_backend(backend: str, args: argparse.Namespace, template: Path, app: dict[str, str],
                      enrollments: list[dict[str, Any]], work: Path) -> None:
    data = work / backend / "data"
    shutil.copytree(template, data, ignore=shutil.ignore_patterns("admin.sock", "run.json"))
    base = {"backend": backend, "devices": len(enrollments)}
    d = Daemon(data, backend).start()
    headers = {"Authorization": f"Bearer {app['api_key']}"}
    tokens = [e["token"] for e in enrollments]
    try:
        async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=128)) as session:
            await asyncio.sleep(1.0)
            rss0 = d.rss_kib()
            fleet = Fleet(enrollments, "127.0.0.1", d.mqtt_port)
            connect_s = await fleet.connect(args.concurrency)
            gc.freeze()  # the generator's own pauses must not show up as the box's latency (see main())
            await wait_metric(session, d.url, "intrapush_devices_online", len(enrollments), 60)
            await asyncio.sleep(2.0)
            rss1 = d.rss_kib()
            cpu0 = d.cpu_s()
            await asyncio.sleep(args.hold_s)
            idle_cpu = (d.cpu_s() - cpu0) / args.hold_s
            online = await metric(session, d.url, "intrapush_devices_online")
            record({**base, "scenario": "hold", "connect_per_s": round(len(enrollments) / connect_s),
                    "rss_before_kib": rss0, "rss_after_kib": rss1,
                    "kib_per_device": {k: round((rss1[k] - rss0.get(k, 0)) / len(enrollments), 2) for k in rss1},
                    "idle_cpu_pct": round(idle_cpu * 100, 1), "hold_s": args.hold_s,
                    "online_at_end": int(online), "lost": fleet.stats.lost})

            async def post(body: dict[str, Any]) -> dict[str, Any]:
                async with session.post(f"{d.url}/v1/messages", json=body) as r:
                    assert r.status == 202, await r.text()
                    return await r.json()

            async def unicast(label: str, bodies: list[dict[str, Any]], concurrency: int, pushes: int) -> None:
                sem = asyncio.Semaphore(concurrency)
                acks0 = await metric(session, d.url, "intrapush_acks_total")
                received0 = fleet.stats.received
                cpu = d.cpu_by_process()
                own_cpu = time.process_time()

                async def one(body: dict[str, Any]) -> None:
                    async with sem:
                        await post(body)

                t = time.perf_counter()
                await asyncio.gather(*(one(b) for b in bodies))
                accepted_s = time.perf_counter() - t
                await asyncio.wait_for(fleet.stats.wait_received(received0 + pushes), 300)
                delivered_s = time.perf_counter() - t
                await wait_metric(session, d.url, "intrapush_acks_total", acks0 + pushes, 300)
                acked_s = time.perf_counter() - t
                record({**base, "scenario": label, "pushes": pushes,
                        "accepted_per_s": round(pushes / accepted_s), "delivered_per_s": round(pushes / delivered_s),
                        "acked_per_s": round(pushes / acked_s),
                        "box_cpu_us_per_push": round((d.cpu_s() - sum(cpu.values())) / pushes * 1e6),
                        "cpu_us_per_push": {**{k: round((v - cpu.get(k, 0.0)) / pushes * 1e6)
                                               for k, v in d.cpu_by_process().items()},
                                            "loadgen": round((time.process_time() - own_cpu) / pushes * 1e6)}})

            rnd = random.Random(5)
            batches = []
            for start in range(0, args.pushes, 500):
                picked = rnd.sample(tokens, min(500, len(tokens)))
                batches.append({"messages": [{"to": {"token": tok}, "title": "bench", "body": "x" * 60}
                                             for tok in picked[:min(500, args.pushes - start)]]})
            if "batch" in args.only:
                await unicast("unicast_batch500", batches, args.batch_concurrency, args.pushes)
            singles = [{"to": {"token": rnd.choice(tokens)}, "title": "bench", "body": "x" * 60}
                       for _ in range(args.single)]
            if "single" in args.only:
                await unicast("unicast_single", singles, 32, args.single)

            # latency: paced single requests; the push carries the call time, the device subtracts it
            for rate in args.rates if "latency" in args.only else []:
                stats = fleet.stats
                stats.latencies = []
                stats.record_latency = True
                count = int(rate * args.latency_s)
                received0 = stats.received
                tasks = []
                t0 = time.perf_counter()
                sem = asyncio.Semaphore(256)
                cpu = d.cpu_s()

                async def paced(tok: str) -> None:
                    async with sem:
                        await post({"to": {"token": tok}, "title": "lat", "data": {"t": time.time()}})

                for n in range(count):
                    delay = t0 + n / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(paced(rnd.choice(tokens))))
                await asyncio.gather(*tasks)
                await asyncio.wait_for(stats.wait_received(received0 + count), 120)
                stats.record_latency = False
                lat = sorted(stats.latencies)
                record({**base, "scenario": "latency", "rate": rate, "pushes": count,
                        "achieved_per_s": round(count / (time.perf_counter() - t0)),
                        "p50_ms": round(lat[len(lat) // 2] * 1000, 2), "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 2),
                        "max_ms": round(lat[-1] * 1000, 2), "box_cpu_pct": round((d.cpu_s() - cpu) / (time.perf_counter() - t0) * 100)})

            n = len(enrollments)
            if "broadcast" in args.only:
                # broadcast: one push to every device of the app
                acks0 = await metric(session, d.url, "intrapush_acks_total")
                received0 = fleet.stats.received
                t = time.perf_counter()
                await post({"to": {"all": True}, "title": "everyone"})
                accepted_s = time.perf_counter() - t
                await asyncio.wait_for(fleet.stats.wait_received(received0 + n), 120)
                delivered_s = time.perf_counter() - t
                await wait_metric(session, d.url, "intrapush_acks_total", acks0 + n, 120)
                record({**base, "scenario": "broadcast", "accepted_s": round(accepted_s, 3),
                        "all_delivered_s": round(delivered_s, 3), "all_acked_s": round(time.perf_counter() - t, 3)})

            if "storm" in args.only:
                # reconnect storm: everyone drops, 10 pushes each wait in the store, everyone comes back at once
                fleet.drop_all()
                await asyncio.sleep(0.5)
                t = time.perf_counter()
                while await metric(session, d.url, "intrapush_devices_online") > 0:
                    if time.perf_counter() - t > 120:
                        raise TimeoutError("devices still online 120 s after dropping them")
                    await asyncio.sleep(0.05)
                for i in range(10):
                    await post({"to": {"all": True}, "title": f"while away {i}"})
                acks0 = await metric(session, d.url, "intrapush_acks_total")
                received0 = fleet.stats.received
                lost0 = fleet.stats.lost
                print("storm: every device reconnects now", flush=True)
                t = time.perf_counter()
                connect_s = await fleet.connect(args.storm_concurrency)
                await asyncio.wait_for(fleet.stats.wait_received(received0 + 10 * n), 300)
                caught_up_s = time.perf_counter() - t
                await wait_metric(session, d.url, "intrapush_acks_total", acks0 + 10 * n, 300)
                record({**base, "scenario": "reconnect_storm", "pending_each": 10, "all_connected_s": round(connect_s, 2),
                        "all_caught_up_s": round(caught_up_s, 2), "all_acked_s": round(time.perf_counter() - t, 2),
                        "drops_during": fleet.stats.lost - lost0})
                fleet.drop_all()
    finally:
        d.stop()
    if "crash" in args.only:
        await crash(backend, args, data, app, enrollments[:args.crash_devices])


async def crash(backend: str, args: argparse.Namespace, data: Path, app: dict[str, str],
                enrollments: list[dict[str, Any]]) -> None:
    """kill -9 during a unicast run; every push answered 202 must reach its device after the restart."""
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
    record({"backend": backend, "scenario": "crash", "devices": len(enrollments), "answered_202": answered,
            "lost": len(set(accepted) - seen)})


async def baselines(work: Path, messages: int) -> None:
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
    record({"scenario": "baseline_relay_qos1", "payload_bytes": 100, "amqtt_msgs_per_s": round(amqtt_rate),
            "mosquitto_msgs_per_s": round(mosq_rate)})


def table() -> None:
    """Markdown: the latest figures of each scenario and backend."""
    latest: dict[tuple[str, str, Any, Any], dict[str, Any]] = {}
    for line in RESULTS.read_text().splitlines():
        r = json.loads(line)
        latest[(r["scenario"], r.get("backend", "-"), r.get("devices"), r.get("rate"))] = r
    for key in sorted(latest, key=str):
        print(key, {k: v for k, v in latest[key].items() if k not in ("scenario", "backend", "python", "cpus")})


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="intrapush-suite-"))
    try:
        if not args.skip_baselines:
            await baselines(work, args.relay_messages)
        template, app, enrollments = await prepare_template(work, args.devices)
        for backend in args.backends:
            await run_backend(backend, args, template, app, enrollments, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["table"]:
        table()
        sys.exit(0)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="embedded,mosquitto", type=lambda s: s.split(","))
    p.add_argument("--devices", type=int, default=10000)
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
    p.add_argument("--relay-messages", type=int, default=100000)
    p.add_argument("--skip-baselines", action="store_true")
    p.add_argument("--only", default=",".join(SCENARIOS), type=lambda s: s.split(","),
                   help="scenarios after hold, comma-separated: " + ",".join(SCENARIOS))
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, data)")
    args = p.parse_args()
    # 10,000 device objects make each full collection of the generator a 30-100 ms pause, which its
    # latency figures would charge to the box: collect young objects rarely, and old ones (frozen) never.
    gc.set_threshold(50_000, 20, 100)
    try:
        import uvloop  # noqa: PLC0415

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(args))
