"""Shared fixtures: the real daemon in a subprocess on loopback port 0, and real clients for it."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest

START_TIMEOUT_S = 20
MOSQUITTO_PLUGIN = Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")
HAS_MOSQUITTO = shutil.which("mosquitto") is not None and MOSQUITTO_PLUGIN.exists()
# In CI (CI=true) Mosquitto is installed from .ci/debian-packages: a missing one fails there instead of skipping.
needs_mosquitto = pytest.mark.skipif(not HAS_MOSQUITTO and not os.environ.get("CI"), reason="Mosquitto is not installed (apt-get install mosquitto; "
                                     "CI installs it from .ci/debian-packages)")
# The device-protocol tests run against both broker backends (override `backend` with these params).
BACKENDS = ["embedded", pytest.param("mosquitto", marks=needs_mosquitto)]


class Box:
    """One `intrapush serve` process with its own data directory."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None, backend: str | None = None) -> None:
        self.data_dir = data_dir
        self.extra_env = env or {}
        if backend is not None:
            self.extra_env.setdefault("INTRAPUSH_BROKER_BACKEND", backend)
        self.backend = self.extra_env.get("INTRAPUSH_BROKER_BACKEND") or os.environ.get("INTRAPUSH_BROKER_BACKEND",
                                                                                          "embedded")
        self.proc: subprocess.Popen[bytes] | None = None
        self.addresses: dict[str, str] = {}
        self.log_path = data_dir.parent / f"{data_dir.name}.log"

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> Box:
        run_file = self.data_dir / "run.json"
        if run_file.exists():
            run_file.unlink()
        # Plain listeners for the protocol tests, TLS ones beside them (tests/e2e/test_tls.py uses those).
        env = {**os.environ, "INTRAPUSH_API_LISTEN": "127.0.0.1:0", "INTRAPUSH_BROKER_LISTEN": "127.0.0.1:0",
               "INTRAPUSH_API_TLS_LISTEN": "127.0.0.1:0", "INTRAPUSH_BROKER_TLS_LISTEN": "127.0.0.1:0",
               "INTRAPUSH_BROKER_WSS_LISTEN": "", "INTRAPUSH_CERTS_NAMES": "localhost,127.0.0.1",
               "INTRAPUSH_METRICS_LISTEN": "127.0.0.1:0", **self.extra_env}  # the shipped synchronous=full (#10)
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--data-dir", str(self.data_dir)],
                                     env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"intrapush exited with {self.proc.returncode}:\n{self.log()}")
            if run_file.exists():
                try:
                    self.addresses = json.loads(run_file.read_text())
                    break
                except ValueError:
                    pass
            time.sleep(0.05)
        else:
            raise RuntimeError(f"intrapush did not start in {START_TIMEOUT_S}s:\n{self.log()}")
        return self

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- addresses -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return "http://" + self.addresses["http"]

    @property
    def metrics_url(self) -> str:
        return f"http://{self.addresses['metrics']}/metrics"

    @property
    def mqtt_port(self) -> int:
        return int(self.addresses["mqtt"].rsplit(":", 1)[1])

    def port(self, name: str) -> int:
        return int(self.addresses[name].rsplit(":", 1)[1])

    # -- helpers ---------------------------------------------------------------------------------
    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "appliance", *args, "--data-dir", str(self.data_dir)],
                              capture_output=True, text=True, check=check, timeout=30)

    def create_app(self, name: str = "demo") -> dict[str, str]:
        return json.loads(self.cli("app", "create", name, "--json").stdout)

    def enroll(self, app: dict[str, str], device_id: str, platform: str = "android", **extra: Any) -> dict[str, Any]:
        """Enroll a device with the app's secret; with `alias` or `contact`, the way the provider binds them:
        a ticket minted with the API key."""
        identity = {k: extra.pop(k) for k in ("alias", "contact") if k in extra}
        credential = self.ticket(app, **identity)["ticket"] if identity else app["enrollment_secret"]
        body = {"app_id": app["app_id"], "platform": platform, "package": "com.example.app",
                "device_id": device_id, **extra}
        r = httpx.post(f"{self.url}/v1/devices", json=body, headers={"Authorization": f"Bearer {credential}"})
        assert r.status_code == 201, r.text
        return r.json()

    def ticket(self, app: dict[str, str], **binding: Any) -> dict[str, Any]:
        with self.api(app) as api:
            r = api.post("/v1/enrollment-tickets", json=binding)
        assert r.status_code == 201, r.text
        return r.json()

    def api(self, app: dict[str, str]) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {app['api_key']}"}, timeout=10)


class PahoDevice:
    """A device driven by paho-mqtt (a client nobody here wrote)."""

    def __init__(self, enrollment: dict[str, Any], port: int, transport: str = "tcp") -> None:
        self.e = enrollment
        self.port = port
        self.messages: queue.Queue[dict[str, Any]] = queue.Queue()
        self.subscribed: queue.Queue[Any] = queue.Queue()
        self.disconnects: queue.Queue[Any] = queue.Queue()
        cid = enrollment["mqtt"]["client_id"]
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv311,
                                  transport=transport)
        self.client.username_pw_set(enrollment["mqtt"]["username"], enrollment["mqtt"]["password"])
        self.client.will_set(enrollment["status_topic"], b'{"online":false}', qos=1)
        self.client.on_message = lambda c, u, m: self.messages.put(json.loads(m.payload))
        self.client.on_subscribe = lambda c, u, mid, codes, props: self.subscribed.put(codes)
        self.client.on_disconnect = lambda c, u, flags, rc, props: self.disconnects.put(rc)
        self.connack: queue.Queue[Any] = queue.Queue()
        self.client.on_connect = lambda c, u, flags, rc, props: self.connack.put(rc)

    def connect(self, cursor: int | None = 0, keepalive: int = 30) -> PahoDevice:
        self.client.connect("127.0.0.1", self.port, keepalive=keepalive)
        self.client.loop_start()
        rc = self.connack.get(timeout=10)
        assert not rc.is_failure, rc
        self.client.subscribe(self.e["inbox_topic"], qos=1)
        codes = self.subscribed.get(timeout=10)
        assert not codes[0].is_failure, codes
        if cursor is not None:
            self.hello(cursor)
        return self

    def hello(self, cursor: int) -> None:
        self.client.publish(self.e["hello_topic"], json.dumps({"cursor": cursor}), qos=1)

    def ack(self, ids: list[str], state: str = "received") -> None:
        self.client.publish(self.e["ack_topic"], json.dumps({"ids": ids, "state": state}), qos=1).wait_for_publish(5)

    def next(self, timeout: float = 10) -> dict[str, Any]:
        return self.messages.get(timeout=timeout)

    def nothing_within(self, seconds: float) -> bool:
        try:
            extra = self.messages.get(timeout=seconds)
        except queue.Empty:
            return True
        raise AssertionError(f"unexpected message: {extra}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_for(predicate: Any, timeout: float = 10, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


@pytest.fixture(scope="module")
def backend() -> str | None:
    """The broker backend of `box` and `shared_box`: the environment's (INTRAPUSH_BROKER_BACKEND) unless a
    module overrides this fixture, e.g. `backend = pytest.fixture(scope="module", params=BACKENDS)(...)`."""
    return None


@pytest.fixture
def box(tmp_path: Path, backend: str | None) -> Iterator[Box]:
    b = Box(tmp_path / "box", env={"INTRAPUSH_PUSH_EXPIRY_SWEEP_S": "0.2"}, backend=backend).start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def shared_box(tmp_path_factory: pytest.TempPathFactory, backend: str | None) -> Iterator[Box]:
    """One daemon for a module's non-destructive tests (each test makes its own app)."""
    b = Box(tmp_path_factory.mktemp("shared") / "box", env={"INTRAPUSH_PUSH_EXPIRY_SWEEP_S": "0.2"},
            backend=backend).start()
    yield b
    b.stop()


def backend_param(request: pytest.FixtureRequest) -> str:
    return str(request.param)
