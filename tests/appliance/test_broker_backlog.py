"""A child Mosquitto's listen backlog (100, not configurable in 2.0.11) is deepened from outside."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from appliance.broker.backlog import ACCEPT_BACKLOG, deepen_backlog
from appliance.broker.mosquitto_child import free_port
from tests.conftest import Box, needs_mosquitto

SOMAXCONN = int(Path("/proc/sys/net/core/somaxconn").read_text())


def listen_backlogs(port: int) -> list[int]:
    """The backlog ss reports (Send-Q of a listening socket) for each socket listening on `port`."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return [int(line.split()[2]) for line in out.splitlines()]


@needs_mosquitto
def test_backlog_of_a_child_mosquitto_is_raised(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    conf = tmp_path / "m.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if listen_backlogs(port):
                break
            time.sleep(0.05)
        assert listen_backlogs(port) == [100]
        assert deepen_backlog(proc.pid, [port], 2048) == 1
        assert listen_backlogs(port) == [2048]
        assert deepen_backlog(proc.pid, [free_port("127.0.0.1")]) == 0  # nothing listens there
    finally:
        proc.terminate()
        proc.wait(5)


def test_a_process_that_does_not_exist_is_an_error() -> None:
    with pytest.raises(OSError):
        deepen_backlog(2**22 + 12345, [1])


@needs_mosquitto
def test_the_mosquitto_backend_listens_with_a_deep_backlog(tmp_path: Path) -> None:
    box = Box(tmp_path / "box", backend="mosquitto").start()
    try:
        port = int(box.addresses["mqtt"].rsplit(":", 1)[1])
        assert listen_backlogs(port) == [min(ACCEPT_BACKLOG, SOMAXCONN)]
        assert "event=backlog_deepened" in box.log_path.read_text()
    finally:
        box.stop()


@needs_mosquitto
def test_mosquitto_s_own_error_reaches_the_log_when_it_cannot_start(tmp_path: Path) -> None:
    """The child's stderr is relayed: a taken port is reported in Mosquitto's words, and the box exits."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        box = Box(tmp_path / "box", env={"INTRAPUSH_BROKER_LISTEN": f"127.0.0.1:{port}"}, backend="mosquitto")
        with pytest.raises(RuntimeError, match="exited"):
            box.start()
        log = box.log()
        assert "event=mosquitto_log" in log and "Address already in use" in log
    finally:
        taken.close()
