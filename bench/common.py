"""What every benchmark row shares: where it ran (commit, machine, the data directory's filesystem), how a
figure becomes a ratio to the raw relay baselines of the same run, the spread of repeated runs, and the
store read back at the end of a scenario ("acked" means committed in the database, not counted by the
generator). Imported by suite.py, gate.py, abuse.py, push_path.py and report.py.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("BENCH_RESULTS") or Path(__file__).parent / "results.jsonl")  # another file: for trials
SCHEMA = 2  # rows before it carry no commit, filesystem, repetitions or ratios

# The figure that stands for each scenario, and how it becomes a ratio to a raw relay rate (msgs/s):
#   "rate"    higher is better; ratio = figure / relay rate
#   "latency" lower is better;  ratio = figure in ms * relay rate / 1000 (the latency in relay-message times)
FIGURES: dict[str, tuple[str, str]] = {
    "unicast_batch500": ("acked_per_s", "rate"),
    "unicast_single": ("acked_per_s", "rate"),
    "latency": ("p99_ms", "latency"),
    "broadcast": ("acked_per_s", "rate"),
    "reconnect_storm": ("acked_per_s", "rate"),
}
BASELINE_KEYS = {"amqtt": "amqtt_msgs_per_s", "mosquitto": "mosquitto_msgs_per_s"}
OWN_BASELINE = {"embedded": "amqtt", "mosquitto": "mosquitto"}  # the relay each backend is built on


# -- where a row ran -------------------------------------------------------------------------------
def _out(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def commit() -> str:
    """The checked-out commit; "+dirty" when appliance/ has uncommitted changes (they are what is measured)."""
    head = _out("git", "rev-parse", "--short=12", "HEAD") or "unknown"
    return head + ("+dirty" if _out("git", "status", "--porcelain", "--", "appliance") else "")


def filesystem(path: Path) -> dict[str, str]:
    """The filesystem holding `path` (the data directory: fsync cost depends on it)."""
    if shutil.which("findmnt"):
        fields = _out("findmnt", "-n", "-o", "FSTYPE,SOURCE,OPTIONS", "--target", str(path)).split(None, 2)
        if len(fields) == 3:
            return {"type": fields[0], "source": fields[1], "options": fields[2]}
    return {"type": _out("stat", "-f", "-c", "%T", str(path))}


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = 0
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // (1024 * 1024)
    except (OSError, IndexError, ValueError):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    mosquitto = _out("mosquitto", "-h").splitlines()[:1]
    return {"node": platform.node(), "cpu": cpu, "cpus": os.cpu_count(), "mem_gib": mem,
            "kernel": platform.release(), "python": platform.python_version(),
            "mosquitto": mosquitto[0].replace("mosquitto version ", "") if mosquitto else "",
            "loadavg_1m_at_start": round(load, 2) if load is not None else None}


def run_info(data_dir: Path, source: str) -> dict[str, Any]:
    """Fields every row of one run carries."""
    return {"schema": SCHEMA, "source": source, "run": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
            "commit": commit(), "fs": filesystem(data_dir), "machine": machine()}


def record(row: dict[str, Any], quiet: bool = False) -> None:
    """Print a row and append it to results.jsonl (not with BENCH_NO_RECORD=1)."""
    row = {**row, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if not quiet:
        print(json.dumps(row), flush=True)
    if os.environ.get("BENCH_NO_RECORD"):
        return
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")


def load_rows(path: Path = RESULTS) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# -- repetitions, spread, ratios ---------------------------------------------------------------------
def spread(values: list[float]) -> float:
    """Relative spread of repeated runs: (max - min) / median; 0 for fewer than 2 runs."""
    if len(values) < 2:
        return 0.0
    med = statistics.median(values)
    return round((max(values) - min(values)) / med, 4) if med else 0.0


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per numeric key, the median of the runs."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: round(statistics.median(r[k] for r in runs if k in r), 4) for k in keys}


def ratio(kind: str, value: float, relay_rate: float) -> float | None:
    if not relay_rate:
        return None
    return round(value / relay_rate, 4) if kind == "rate" else round(value * relay_rate / 1000, 3)


def summarise(base: dict[str, Any], scenario: str, runs: list[dict[str, Any]],
              baselines: dict[str, Any]) -> dict[str, Any]:
    """One row for the repetitions of a scenario: the median figure, its spread, its ratios."""
    figure, kind = FIGURES[scenario]
    med = medians(runs)
    value = med[figure]
    row = {**base, "scenario": scenario, "figure": figure, "kind": kind, "value": value,
           "spread": spread([r[figure] for r in runs]), "repeat": len(runs), "median": med, "runs": runs,
           "baselines": baselines,
           "ratio": {name: ratio(kind, value, baselines.get(key, 0)) for name, key in BASELINE_KEYS.items()}}
    if base.get("backend") in OWN_BASELINE:
        row["ratio_to"] = OWN_BASELINE[base["backend"]]
    return row


def baseline_summary(runs: list[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {key: round(statistics.median(r[key] for r in runs)) for key in BASELINE_KEYS.values()}
    out["spread"] = {key: spread([r[key] for r in runs]) for key in BASELINE_KEYS.values()}
    return out


def ratio_noise(row: dict[str, Any]) -> float:
    """Relative noise of a row's own ratio: the spread of its figure plus that of its baseline."""
    key = BASELINE_KEYS[row.get("ratio_to", "amqtt")]
    return float(row.get("spread", 0)) + float(row.get("baselines", {}).get("spread", {}).get(key, 0))


# -- the store, read back -----------------------------------------------------------------------------
ACKED = 2  # appliance/store/messages.py: QUEUED, DELIVERED, ACKED, ...


class StoreReader:
    """Read-only view of the daemon's SQLite store (WAL: sees committed transactions only, never blocks the
    writer). What a scenario reports as acked is counted here."""

    def __init__(self, data_dir: Path, name: str = "intrapush.db") -> None:
        self.path = data_dir / name
        self._conn: sqlite3.Connection | None = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30, check_same_thread=False)
        return self._conn

    def pending(self) -> int:
        """Deliveries not yet acked (queued or delivered): the partial index makes this cheap."""
        return int(self.conn.execute("SELECT count(*) FROM deliveries WHERE state < 2").fetchone()[0])

    def acked(self, message_ids: list[str]) -> int:
        """Deliveries of these messages committed as acked."""
        return int(self.conn.execute(
            "SELECT count(*) FROM deliveries WHERE message_id IN (SELECT value FROM json_each(?)) AND state = ?",
            (json.dumps(message_ids), ACKED)).fetchone()[0])

    def stored(self, message_ids: list[str]) -> int:
        """How many of these messages are in the store at all."""
        return int(self.conn.execute("SELECT count(*) FROM messages WHERE id IN (SELECT value FROM json_each(?))",
                                     (json.dumps(message_ids),)).fetchone()[0])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
