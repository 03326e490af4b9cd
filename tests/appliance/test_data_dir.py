"""The data directory belongs to one daemon (#9): a second `serve` refuses and changes nothing, the CLI
decides "running" by the lock and never writes the database behind a daemon, and the directory and
its files are private whoever created them."""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import BACKENDS, Box, PahoDevice, wait_for
from tests.e2e.test_fallback_escalation import SmtpSink

as_root_only = pytest.mark.skipif(os.geteuid() != 0, reason="runs the CLI as `nobody`, which needs root")


def serve_again(box: Box) -> subprocess.CompletedProcess[str]:
    """A second `intrapush serve` on the running box's data directory, every listener on a free port."""
    env = {**os.environ, "INTRAPUSH_API_LISTEN": "127.0.0.1:0", "INTRAPUSH_BROKER_LISTEN": "127.0.0.1:0",
           "INTRAPUSH_API_TLS_LISTEN": "127.0.0.1:0", "INTRAPUSH_BROKER_TLS_LISTEN": "127.0.0.1:0",
           "INTRAPUSH_BROKER_WSS_LISTEN": "", "INTRAPUSH_METRICS_LISTEN": "127.0.0.1:0", **box.extra_env}
    return subprocess.run([sys.executable, "-m", "appliance", "serve", "--data-dir", str(box.data_dir)],
                          capture_output=True, text=True, timeout=60, env=env)


def as_nobody(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                           sys.executable, "-m", "appliance", *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent.parent)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(data_dir: Path) -> dict[str, int]:
    """Every file by name and inode: no file made, removed or replaced. (Sizes and times are not compared:
    the running daemon's own checkpoints change them.)"""
    return {p.name: p.stat().st_ino for p in data_dir.iterdir()}


@pytest.fixture
def open_box() -> Iterator[Box]:
    """A box whose data directory `nobody` can reach (pytest's own temporary folders are root's alone)."""
    parent = Path(tempfile.mkdtemp(prefix="intrapush-open-"))
    os.chmod(parent, 0o755)
    box = Box(parent / "box").start()
    yield box
    box.stop()
    shutil.rmtree(parent, ignore_errors=True)


# -- one daemon per data directory ---------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_second_serve_refuses_naming_the_running_pid_and_the_first_keeps_working(tmp_path: Path,
                                                                                   backend: str) -> None:
    box = Box(tmp_path / "box", backend=backend).start()
    app = box.create_app("first")
    device = PahoDevice(box.enroll(app, "d1"), box.mqtt_port).connect()
    run_json = (box.data_dir / "run.json").read_text()
    before = snapshot(box.data_dir)
    try:
        second = serve_again(box)
        assert second.returncode != 0
        assert f"pid {box.proc.pid}" in second.stderr and "in use" in second.stderr, second.stderr
        assert box.proc.poll() is None
        assert (box.data_dir / "run.json").read_text() == run_json
        assert snapshot(box.data_dir) == before  # admin.sock, database, lock: none made or replaced
        listing = json.loads(box.cli("app", "list", "--json").stdout)
        assert [a["name"] for a in listing] == ["first"]
        with box.api(app) as api:
            r = api.post("/v1/messages", json={"to": {"token": device.e["token"]}, "title": "still here"})
        assert r.status_code == 202, r.text
        assert device.next()["title"] == "still here"
    finally:
        device.close()
        box.stop()


def test_second_serve_leaves_the_first_daemons_pending_fallback_alone(tmp_path: Path) -> None:
    smtp = SmtpSink()
    env = {"INTRAPUSH_FALLBACK_EMAIL_TRANSPORT": "smtp", "INTRAPUSH_FALLBACK_EMAIL_HOST": "127.0.0.1",
           "INTRAPUSH_FALLBACK_EMAIL_PORT": str(smtp.port), "INTRAPUSH_FALLBACK_EMAIL_TLS": "none",
           "INTRAPUSH_FALLBACK_EMAIL_FROM_ADDRESS": "push@corp.example"}
    box = Box(tmp_path / "box", env=env).start()
    try:
        app = box.create_app("alarms")
        away = box.enroll(app, "away", contact={"email": "alice@corp.example"})
        with box.api(app) as api:
            sent = api.post("/v1/messages", json={"to": {"token": away["token"]}, "title": "Alarm",
                                                  "fallback": {"after_s": 2, "channels": ["email"]}}).json()
            assert serve_again(box).returncode != 0  # while the escalation waits for its deadline
            wait_for(lambda: api.get(f"/v1/messages/{sent['id']}").json()["fallback_sent"] == 1, timeout=20)
        time.sleep(1.5)  # give a second sender every chance to show up
        assert [rcpts for _, rcpts, _ in smtp.messages] == [["alice@corp.example"]]
    finally:
        box.stop()
        smtp.stop()


def test_a_lock_left_by_a_killed_daemon_does_not_block_the_next_start(tmp_path: Path) -> None:
    box = Box(tmp_path / "box").start()
    app = box.create_app("survivor")
    box.kill9()
    assert (box.data_dir / "intrapush.lock").read_text().split()[0] == str(box.proc.pid)
    box.start()
    try:
        assert box.addresses["pid"] == box.proc.pid
        assert [a["app_id"] for a in json.loads(box.cli("app", "list", "--json").stdout)] == [app["app_id"]]
    finally:
        box.stop()


def test_a_stale_lock_file_naming_a_gone_process_does_not_block(tmp_path: Path) -> None:
    data = tmp_path / "box"
    data.mkdir()
    (data / "intrapush.lock").write_text("999999999\n")
    (data / "run.json").write_text(json.dumps({"pid": 999999999, "admin": str(data / "admin.sock")}))
    box = Box(data).start()
    try:
        assert box.addresses["pid"] == box.proc.pid
    finally:
        box.stop()


def test_serve_refuses_while_an_offline_command_holds_the_lock(tmp_path: Path) -> None:
    data = tmp_path / "box"
    data.mkdir()
    with open(data / "intrapush.lock", "w") as held:  # what an offline `app create` holds while it writes
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write(f"{os.getpid()}\n")
        held.flush()
        r = subprocess.run([sys.executable, "-m", "appliance", "serve", "--data-dir", str(data)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and f"pid {os.getpid()}" in r.stderr
    assert not (data / "intrapush.db").exists() and not (data / "run.json").exists()


# -- the CLI decides "running" by the lock -------------------------------------------------------
def test_cli_writes_through_the_daemon_even_when_run_json_is_gone(box: Box) -> None:
    (box.data_dir / "run.json").unlink()
    app = box.create_app("late")
    # Only the daemon's own directory of apps lets this enrollment in: a write made behind its back is unseen.
    r = httpx.post(f"{box.url}/v1/devices", json={"app_id": app["app_id"], "platform": "android",
                                                  "package": "com.example.app", "device_id": "d1"},
                   headers={"Authorization": f"Bearer {app['enrollment_secret']}"})
    assert r.status_code == 201, r.text


def test_cli_refuses_when_the_lock_is_held_but_no_admin_socket_answers(tmp_path: Path) -> None:
    data = tmp_path / "box"
    data.mkdir()
    with open(data / "intrapush.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write(f"{os.getpid()}\n")
        held.flush()
        r = subprocess.run([sys.executable, "-m", "appliance", "app", "create", "ghost", "--data-dir", str(data)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert f"pid {os.getpid()}" in r.stderr and "admin socket" in r.stderr and "Traceback" not in r.stderr
    assert not (data / "intrapush.db").exists()


@as_root_only
def test_cli_as_another_user_fails_clearly_on_a_private_data_directory(open_box: Box) -> None:
    before = snapshot(open_box.data_dir)
    r = as_nobody(open_box.data_dir, "app", "create", "intruder")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "run as the user that owns" in r.stderr
    assert snapshot(open_box.data_dir) == before
    assert json.loads(open_box.cli("app", "list", "--json").stdout) == []


@as_root_only
def test_cli_never_opens_the_database_when_the_running_daemons_socket_is_not_its_own(open_box: Box) -> None:
    # An operator opened the folder up (say for a backup agent): `nobody` can see the lock held but cannot
    # use root's admin socket. That is "running, unreachable", never "not running, write the file".
    data = open_box.data_dir
    os.chmod(data, 0o755)
    for name in ("intrapush.lock", "intrapush.toml", "intrapush.db", "intrapush.db-wal", "intrapush.db-shm"):
        os.chmod(data / name, 0o666 if name.startswith("intrapush.db") else 0o644)
    before = snapshot(data)
    r = as_nobody(data, "app", "create", "intruder")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"pid {open_box.proc.pid}" in r.stderr and "admin socket" in r.stderr
    assert snapshot(data) == before
    assert json.loads(open_box.cli("app", "list", "--json").stdout) == []  # nothing written behind the daemon


@as_root_only
def test_offline_cli_on_another_users_data_directory_creates_nothing(tmp_path: Path) -> None:
    data = tmp_path / "box"
    data.mkdir(mode=0o700)
    os.chown(data, pwd.getpwnam("nobody").pw_uid, pwd.getpwnam("nobody").pw_gid)
    r = subprocess.run([sys.executable, "-m", "appliance", "app", "create", "root-made", "--data-dir", str(data)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "belongs to uid" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert list(data.iterdir()) == []


# -- private, whoever created the folder ---------------------------------------------------------
def test_data_directory_and_files_are_made_private_at_every_start(tmp_path: Path) -> None:
    data = tmp_path / "box"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)  # made by an installer or an operator, not by the daemon
    (data / "intrapush.toml").write_text("")
    os.chmod(data / "intrapush.toml", 0o644)
    box = Box(data).start()
    box.create_app("one")
    private = ("intrapush.db", "intrapush.db-wal", "intrapush.db-shm", "run.json", "intrapush.lock",
               "intrapush.toml")
    try:
        assert mode(data) == 0o700
        assert {name: mode(data / name) for name in private} == dict.fromkeys(private, 0o600)
    finally:
        box.stop()
    os.chmod(data, 0o755)
    for name in ("intrapush.db", "intrapush.lock", "intrapush.toml"):
        os.chmod(data / name, 0o644)
    box.start()
    try:
        assert mode(data) == 0o700
        assert {name: mode(data / name) for name in private} == dict.fromkeys(private, 0o600)
    finally:
        box.stop()


def test_an_offline_command_creates_a_private_database(tmp_path: Path) -> None:
    data = tmp_path / "box"
    r = subprocess.run([sys.executable, "-m", "appliance", "app", "create", "offline", "--data-dir", str(data)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert mode(data) == 0o700 and mode(data / "intrapush.db") == 0o600
