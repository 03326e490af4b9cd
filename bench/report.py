"""Tables from bench/results.jsonl: the plain-text table the suite and the gate print, and the markdown of
docs/benchmarks.md (generated with `python -m cogapp -r docs/benchmarks.md`, so every figure there has its
row). Rows of schema 2 (issue #18: commit, filesystem, repetitions, ratios) make the main tables; earlier
rows are listed apart.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BASELINE_KEYS, FIGURES, OWN_BASELINE, SCHEMA, load_rows  # noqa: E402

LABELS = {
    "unicast_batch500": "unicast, 500-message batches: acked/s",
    "unicast_single": "unicast, single requests (32 in flight): acked/s",
    "latency": "latency at {rate}/s: p99",
    "broadcast": "broadcast to every device: acked/s",
    "reconnect_storm": "reconnect storm, 10 pending each: acked/s",
}
RELAY = {"amqtt": "raw amqtt", "mosquitto": "raw Mosquitto"}
BACKENDS = ("embedded", "mosquitto")


def _n(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}" if digits else f"{round(v):,}"


def label(row: dict[str, Any]) -> str:
    return LABELS.get(row["scenario"], row["scenario"]).format(rate=_n(row.get("rate")))


def ratio_text(row: dict[str, Any], to: str | None = None) -> str:
    to = to or row.get("ratio_to", "amqtt")
    r = row.get("ratio", {}).get(to)
    if r is None:
        return "-"
    text = f"{r:,.0f}" if r >= 100 else f"{r:.1f}" if r >= 10 else f"{r:.3g}"
    return f"{text}× {RELAY[to]}" if row["kind"] == "rate" else f"{text} {RELAY[to]} message times"


def figure_text(row: dict[str, Any]) -> str:
    v = row["value"]
    text = f"{v:,.2f} ms" if row["kind"] == "latency" else f"{_n(v)} /s"
    return f"{text} ±{row['spread'] * 50:.0f} %" if row.get("repeat", 1) > 1 else text


def latest_run(rows: list[dict[str, Any]], source: str = "suite") -> list[dict[str, Any]]:
    runs = [r for r in rows if r.get("schema", 1) >= SCHEMA and r.get("source") == source]
    if not runs:
        return []
    last = max(r["run"] for r in runs)
    return [r for r in runs if r["run"] == last]


def _scenario_rows(run: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    keys = []
    for r in run:
        if r["scenario"] in FIGURES and (r["scenario"], r.get("rate")) not in keys:
            keys.append((r["scenario"], r.get("rate")))
    order = list(FIGURES)
    return sorted(keys, key=lambda k: (order.index(k[0]), k[1] or 0))


def _find(run: list[dict[str, Any]], scenario: str, backend: str | None, rate: Any = None) -> dict[str, Any] | None:
    for r in run:
        if r["scenario"] == scenario and r.get("backend") == backend and r.get("rate") == rate:
            return r
    return None


def _about(run: list[dict[str, Any]]) -> str:
    r = run[0]
    m, fs = r["machine"], r["fs"]
    return (f"run {r['run']} ({r['source']}), commit `{r['commit']}`, machine `{m['node']}` "
            f"({m['cpus']} CPUs, {m['cpu'] or 'cpu unknown'}, {m['mem_gib']} GiB, kernel {m['kernel']}, "
            f"Python {m['python']}, Mosquitto {m['mosquitto']}, load {m['loadavg_1m_at_start']} at start), "
            f"data directory on {fs.get('type')} ({fs.get('source', '?')})")


# -- plain text: what the suite and the gate print ----------------------------------------------------------
def print_run(run: list[dict[str, Any]] | None = None) -> None:
    run = run if run is not None else latest_run(load_rows())
    if not run:
        print("no run of schema 2 recorded in bench/results.jsonl yet")
        return
    print("\n" + _about(run).replace("`", ""))
    m = run[0]["machine"]
    if (m.get("loadavg_1m_at_start") or 0) > 0.25 * (m.get("cpus") or 1):
        print(f"WARNING: load average {m['loadavg_1m_at_start']} on {m['cpus']} CPUs at the start: other processes "
              "took CPU during this run, and a steady load does not show in the spread; its figures are low")
    base = _find(run, "baseline_relay_qos1", None)
    if base:
        print(f"baselines (median of {base['repeat']}): raw amqtt {_n(base['amqtt_msgs_per_s'])} msg/s "
              f"(spread {base['spread']['amqtt_msgs_per_s']:.0%}), raw Mosquitto {_n(base['mosquitto_msgs_per_s'])} "
              f"msg/s (spread {base['spread']['mosquitto_msgs_per_s']:.0%})")
    head = f"{'scenario':<50} {'backend':<10} {'median':>12} {'spread':>7} {'ratio to own relay':>34}  acked in store"
    print(head + "\n" + "-" * len(head))
    for scenario, rate in _scenario_rows(run):
        for backend in BACKENDS:
            r = _find(run, scenario, backend, rate)
            if r is None:
                continue
            value = f"{r['value']:.2f} ms" if r["kind"] == "latency" else f"{_n(r['value'])} /s"
            acked = [x.get("acked_in_store") for x in r["runs"]]
            print(f"{label(r):<50} {backend:<10} {value:>12} {r['spread']:>7.0%} {ratio_text(r):>34}  {acked}")
    for r in run:
        if r["scenario"] == "hold":
            print(f"hold {r['backend']}: {r['devices']:,} devices, connect {_n(r['connect_per_s'])}/s "
                  f"({r['ratio'][r['ratio_to']]:.3g}× {RELAY[r['ratio_to']]}), "
                  f"KiB/device {r['kib_per_device']}, idle CPU {r['idle_cpu_pct']} %, lost {r['lost']}")
        if r["scenario"] == "crash":
            print(f"crash {r['backend']}: {r['lost']} of {r['answered_202']:,} answered 202 never delivered, "
                  f"{r.get('in_store_after_restart')} in the store after restart")


# -- markdown: docs/benchmarks.md ------------------------------------------------------------------------------
def markdown(rows: list[dict[str, Any]] | None = None) -> str:
    rows = rows if rows is not None else load_rows()
    out: list[str] = []
    run = latest_run(rows)
    if not run:
        out.append("No run of the current suite is recorded yet: `python bench/suite.py --devices 10000`.\n")
    else:
        out += _ratio_tables(run)
    gate = latest_run(rows, "gate")
    if gate:
        out.append("\n### Latest gate run\n")
        out.append(_about(gate) + ".\n")
        out += _ratio_table(gate)
    out += _earlier(rows)
    return "\n".join(out)


def _ratio_table(run: list[dict[str, Any]]) -> list[str]:
    out = ["| scenario | embedded: ratio | figure | Mosquitto backend: ratio | figure |", "|---|---|---|---|---|"]
    for scenario, rate in _scenario_rows(run):
        cells = []
        for backend in BACKENDS:
            r = _find(run, scenario, backend, rate)
            cells += [f"**{ratio_text(r)}**", figure_text(r)] if r else ["", ""]
        out.append(f"| {label(_find(run, scenario, None, rate) or {'scenario': scenario, 'rate': rate})} | "
                   + " | ".join(cells) + " |")
    return out


def _ratio_tables(run: list[dict[str, Any]]) -> list[str]:
    out = [_about(run) + ".\n"]
    base = _find(run, "baseline_relay_qos1", None)
    if base:
        out.append(f"Baselines of the same run (1 publisher → 1 subscriber, QoS 1, 100 bytes, median of "
                   f"{base['repeat']}): raw amqtt **{_n(base['amqtt_msgs_per_s'])} msg/s** "
                   f"(spread {base['spread']['amqtt_msgs_per_s']:.0%}), raw Mosquitto "
                   f"**{_n(base['mosquitto_msgs_per_s'])} msg/s** (spread {base['spread']['mosquitto_msgs_per_s']:.0%}).\n")
    devices = next((r["devices"] for r in run if r.get("devices")), None)
    out.append(f"{_n(devices)} devices. Each figure is the median of the repetitions, ± half their spread.\n")
    out += _ratio_table(run)
    out.append("\n| absolute | embedded (hardened amqtt) | Mosquitto backend |\n|---|---|---|")
    holds = {r["backend"]: r for r in run if r["scenario"] == "hold"}
    crashes = {r["backend"]: r for r in run if r["scenario"] == "crash"}
    if holds:
        out.append("| hold: connect rate | " + " | ".join(
            f"{_n(holds[b]['connect_per_s'])} /s ({holds[b]['ratio'][holds[b]['ratio_to']]:.3g}× "
            f"{RELAY[holds[b]['ratio_to']]})" if b in holds else "" for b in BACKENDS) + " |")
        out.append("| hold: memory per device (KiB, by process) | " + " | ".join(
            ", ".join(f"{k} {v}" for k, v in holds[b]["kib_per_device"].items()) if b in holds else ""
            for b in BACKENDS) + " |")
        out.append("| hold: devices lost / idle CPU | " + " | ".join(
            f"{holds[b]['lost']} / {holds[b]['idle_cpu_pct']} %" if b in holds else "" for b in BACKENDS) + " |")
    for scenario, rate in _scenario_rows(run):
        cells = []
        for b in BACKENDS:
            r = _find(run, scenario, b, rate)
            m = r["median"] if r else {}
            if not r:
                cells.append("")
            elif scenario == "latency":
                cells.append(f"p50 {m['p50_ms']} / p99 {m['p99_ms']} / max {m['max_ms']} ms")
            elif scenario in ("broadcast", "reconnect_storm"):
                cells.append(f"all delivered {m.get('all_delivered_s', m.get('all_caught_up_s'))} s, "
                             f"all acked {m['all_acked_s']} s")
            else:
                cells.append(f"accepted {_n(m['accepted_per_s'])} /s, acked {_n(m['acked_per_s'])} /s, "
                             f"box {_n(m['box_cpu_us_per_push'])} µs/push")
        name = label({"scenario": scenario, "rate": rate}).split(":")[0]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    if crashes:
        out.append("| crash (`kill -9` during unicast): 202s never delivered | " + " | ".join(
            f"{crashes[b]['lost']} of {_n(crashes[b]['answered_202'])}" if b in crashes else "" for b in BACKENDS) + " |")
    return out


def _earlier(rows: list[dict[str, Any]]) -> list[str]:
    """Rows from before schema 2: the last one of each scenario, backend and device count."""
    old = [r for r in rows if r.get("schema", 1) < SCHEMA and r.get("scenario") != "push_path"]
    if not old:
        return []
    last: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in old:
        last[r["scenario"], r.get("backend"), r.get("rate"), r.get("devices")] = r
    out = ["\n### Earlier runs (before #18)\n",
           f"Single runs, no ratios, acked counted from the daemon's ack counter (not read back from the store), "
           f"machine `{old[-1].get('machine')}`: the last row of each scenario, backend and device count.\n",
           "| scenario | backend | devices | at | figures |", "|---|---|---|---|---|"]
    keep = ("connect_per_s", "acked_per_s", "accepted_per_s", "p50_ms", "p99_ms", "max_ms", "all_acked_s",
            "all_caught_up_s", "answered_202", "lost", "amqtt_msgs_per_s", "mosquitto_msgs_per_s")
    order = ["baseline_relay_qos1", "hold", *FIGURES, "crash"]
    for (scenario, backend, rate, devices), r in sorted(last.items(), key=lambda kv: (
            order.index(kv[0][0]) if kv[0][0] in order else 99, str(kv[0][1]), kv[0][2] or 0, kv[0][3] or 0)):
        figures = ", ".join(f"{k} {r[k]:,}" for k in keep if k in r)
        name = f"{scenario} at {rate}/s" if rate else scenario
        out.append(f"| {name} | {backend or '-'} | {_n(devices)} | {r['at'][:16].replace('T', ' ')} | {figures} |")
    return out


__all__ = ["BASELINE_KEYS", "OWN_BASELINE", "markdown", "print_run"]


def _ms(v: float | None) -> str:
    return "timeout" if v is None else f"{v} ms"


def abuse_markdown(rows: list[dict[str, Any]] | None = None) -> str:
    """The latest abuse run of each backend (bench/abuse.py)."""
    rows = rows if rows is not None else load_rows()
    last: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.get("scenario") == "abuse":
            last[r["backend"]] = r
    if not last:
        return "No abuse run is recorded yet: `python bench/abuse.py`.\n"
    out = []
    for backend, r in last.items():
        m = r["machine"]
        out.append(f"{backend} backend: {r['devices']:,} devices at {r['rate']:,} pushes/s, {r['hostile']} hostile, "
                   f"{r['seconds']} s per phase; run {r['run']}, commit `{r['commit']}`, machine `{m['node']}` "
                   f"({m['cpus']} CPUs, load {m['loadavg_1m_at_start']} at start).\n")
        out += ["| phase | 202s | refused | undelivered | 202 latency p50 / p99 / max | "
                "delivery latency p50 / p99 / max |", "|---|---|---|---|---|---|"]
        for name in ("without_flood", "with_flood"):
            p = r[name]
            a, d = p["accept_ms"], p["delivery_ms"]
            out.append(f"| {name.replace('_', ' ')} | {p['answered_202']:,} | {sum(p['refused'].values())} | "
                       f"{p['undelivered']} | {_ms(a['p50'])} / {_ms(a['p99'])} / {_ms(a['max'])} | "
                       f"{_ms(d['p50'])} / {_ms(d['p99'])} / {_ms(d['max'])} |")
        ratio = {k: "timeout" if v is None else f"{v}×" for k, v in r["p99_ratio"].items()}
        f = r["flood"]
        out.append(f"\np99 with / without the flood: 202 latency **{ratio['accept']}**, delivery latency "
                   f"**{ratio['delivery']}** (target ≤ 2×). The flood: {f.get('ack_messages', 0):,} ack messages "
                   f"({f.get('ack_ids', 0):,} ids), {f.get('hellos', 0):,} hellos, {f.get('logins', 0):,} logins; "
                   f"cut off by the box {f.get('cut_off_by_box', 0)} times. Pushes pending for offline devices "
                   f"that the store marked acked on the hostile devices' acks: "
                   f"**{r.get('victim_deliveries_acked_by_others', '-')}** of {r.get('victim_deliveries', '-')}.\n")
    return "\n".join(out)
