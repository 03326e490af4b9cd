"""The `intrapush` CLI, against a running daemon (admin socket) and on a stopped one (the database)."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import Box


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=30)


def test_apps_and_keys_through_the_running_daemon(box: Box) -> None:
    app = box.create_app("shop")
    assert app["api_key"].startswith("ak_") and app["enrollment_secret"].startswith("es_")
    listing = json.loads(box.cli("app", "list", "--json").stdout)
    assert [(a["app_id"], a["name"], a["devices"]) for a in listing] == [(app["app_id"], "shop", 0)]
    dup = box.cli("app", "create", "shop", check=False)
    assert dup.returncode == 1 and "exists" in dup.stderr
    e = box.enroll(app, "d1")
    rotated = json.loads(box.cli("app", "rotate-key", "shop", "--grace-s", "0", "--json").stdout)
    body = {"to": {"token": e["token"]}, "title": "x"}
    old = httpx.post(f"{box.url}/v1/messages", json=body, headers={"Authorization": f"Bearer {app['api_key']}"})
    new = httpx.post(f"{box.url}/v1/messages", json=body, headers={"Authorization": f"Bearer {rotated['api_key']}"})
    assert old.status_code == 401 and new.status_code == 202
    missing = box.cli("app", "rotate-key", "nope", check=False)
    assert missing.returncode == 1 and "no app" in missing.stderr
    bad_revoke = box.cli("device", "revoke", "dt_nope", check=False)
    assert bad_revoke.returncode == 1
    assert stat.S_IMODE((box.data_dir / "admin.sock").stat().st_mode) & 0o077 == 0


def test_secrets_are_stored_only_as_hashes(box: Box) -> None:
    app = box.create_app("hashed")
    box.enroll(app, "d1")
    box.stop()
    raw = b"".join(p.read_bytes() for p in box.data_dir.glob("intrapush.db*"))
    assert app["api_key"].encode() not in raw and app["enrollment_secret"].encode() not in raw


def test_offline_cli_works_on_the_database_and_the_daemon_sees_it(tmp_path: Path) -> None:
    data = tmp_path / "box"
    created = json.loads(cli(data, "app", "create", "offline", "--json").stdout)
    assert json.loads(cli(data, "app", "list", "--json").stdout)[0]["name"] == "offline"
    box = Box(data).start()
    try:
        e = box.enroll(created, "d1")
        assert json.loads(box.cli("device", "list", "--json").stdout)[0]["token"] == e["token"]
    finally:
        box.stop()
    revoked = json.loads(cli(data, "device", "revoke", e["token"], "--json").stdout)
    assert revoked["token"] == e["token"]
    listing = json.loads(cli(data, "device", "list", "--json").stdout)
    assert listing[0]["retired_reason"] == "revoked"


def test_first_start_creates_the_annotated_config_and_the_database(box: Box) -> None:
    text = (box.data_dir / "intrapush.toml").read_text()
    assert "Precedence: command-line flag > environment" in text and "#listen = " in text
    assert (box.data_dir / "intrapush.db").exists()
    log = box.log()
    assert "event=listening" in log and box.addresses["http"] in log and box.addresses["mqtt"] in log


def test_device_simulate_prints_what_it_receives(box: Box) -> None:
    app = box.create_app("sim")
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "device", "simulate", "--url", box.url,
                             "--app-id", app["app_id"], "--secret", app["enrollment_secret"], "--seconds", "20"],
                            stdout=subprocess.PIPE, text=True)
    try:
        first = json.loads(proc.stdout.readline())
        assert first["connected"] is True
        r = httpx.post(f"{box.url}/v1/messages", json={"to": {"token": first["token"]}, "title": "hi sim"},
                       headers={"Authorization": f"Bearer {app['api_key']}"})
        assert r.status_code == 202
        line = json.loads(proc.stdout.readline())
        assert line["push"]["title"] == "hi sim" and line["push"]["id"] == r.json()["id"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_json_logs_are_one_object_per_line(tmp_path: Path) -> None:
    box = Box(tmp_path / "box", env={"INTRAPUSH_LOG_FORMAT": "json"}).start()
    box.stop()
    docs = [json.loads(line) for line in box.log().splitlines() if line.strip()]
    listening = [d for d in docs if "event=listening" in d["msg"]]
    assert listening and listening[0]["logger"] == "appliance.daemon" and listening[0]["level"] == "info"
