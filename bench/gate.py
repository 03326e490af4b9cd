"""The regression gate of issue #18: run it before landing any change to the hot path (a few minutes).

    python bench/gate.py                  # 5,000 devices, both backends, 3 repetitions

Runs, on each backend at 5,000 devices: unicast in 500-message batches, latency at 1,000/s and the
reconnect storm, each 3 times, beside the raw relay baselines of the same run; every figure becomes a ratio
to the raw relay the backend is built on (embedded: amqtt; Mosquitto backend: Mosquitto). Each ratio is
compared with the best ratio recorded for the same scenario, backend and device count in
bench/results.jsonl (by the suite or an earlier gate run):

    noise     = the larger of (the best row's noise, this run's noise), where a row's noise is the relative
                spread (max - min) / median of its repetitions plus that of its baseline's repetitions
    allowed   = max(2 x noise, 10 %), or 15 % while fewer than 3 rows are recorded for that scenario
    threshold = best x (1 - allowed) for rates, best x (1 + allowed) for latencies (lower is better)

Exit 1 when a ratio is past its threshold, with a line naming the scenario, the ratio, the best and the
threshold; else exit 2 when this run's own noise is over 50 % for some scenario (too noisy to judge: rerun
on a quieter machine); else exit 0 (a scenario with no recorded row passes; its row becomes a reference).
The run's rows are appended to results.jsonl (not with BENCH_NO_RECORD=1).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FIGURES, SCHEMA, load_rows, ratio_noise  # noqa: E402
from report import label, print_run  # noqa: E402
from suite import parser, run_suite, tune  # noqa: E402

FLOOR, FLOOR_FEW, FEW = 0.10, 0.15, 3
TOO_NOISY = 0.5  # a run whose own noise is past this cannot tell a regression from the machine


def key(row: dict[str, Any]) -> tuple[Any, ...]:
    return row["scenario"], row.get("backend"), row.get("devices"), row.get("rate")


def own_ratio(row: dict[str, Any]) -> float | None:
    return row.get("ratio", {}).get(row.get("ratio_to", ""))


def judge(run: list[dict[str, Any]], history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One verdict per scenario row of `run`, against the rows of `history` (other runs)."""
    verdicts = []
    for row in run:
        if row["scenario"] not in FIGURES or own_ratio(row) is None:
            continue
        lower_better = row["kind"] == "latency"
        refs = [r for r in history if r.get("schema", 1) >= SCHEMA and r.get("run") != row.get("run")
                and key(r) == key(row) and own_ratio(r) is not None]
        v: dict[str, Any] = {"row": row, "ratio": own_ratio(row), "recorded": len(refs),
                             "too_noisy": ratio_noise(row) > TOO_NOISY}
        if not refs:
            v.update(best=None, threshold=None, ok=True)
        else:
            best = (min if lower_better else max)(refs, key=lambda r: own_ratio(r))  # type: ignore[arg-type,return-value]
            noise = max(ratio_noise(best), ratio_noise(row))
            allowed = max(2 * noise, FLOOR if len(refs) >= FEW else FLOOR_FEW)
            b = own_ratio(best)
            assert b is not None
            threshold = b * (1 + allowed) if lower_better else b * max(0.0, 1 - allowed)
            ok = v["ratio"] <= threshold if lower_better else v["ratio"] >= threshold
            v.update(best=b, best_run=best.get("run"), best_commit=best.get("commit"), noise=noise,
                     allowed=allowed, threshold=threshold, ok=ok)
        verdicts.append(v)
    return verdicts


def print_verdicts(verdicts: list[dict[str, Any]]) -> None:
    head = f"{'scenario':<44} {'backend':<10} {'ratio':>9} {'best':>9} {'allowed':>8} {'threshold':>10}  verdict"
    print("\ngate: ratios to the backend's own raw relay (rates: higher is better; latency in relay-message "
          "times: lower is better)\n" + head + "\n" + "-" * len(head))
    for v in verdicts:
        r = v["row"]
        if v["best"] is None:
            print(f"{label(r):<44} {r['backend']:<10} {v['ratio']:>9.4g} {'-':>9} {'-':>8} {'-':>10}  "
                  "pass (no recorded reference yet)")
            continue
        verdict = "REGRESSION" if not v["ok"] else "too noisy to judge" if v["too_noisy"] else "pass"
        print(f"{label(r):<44} {r['backend']:<10} {v['ratio']:>9.4g} {v['best']:>9.4g} {v['allowed']:>8.0%} "
              f"{v['threshold']:>10.4g}  {verdict}")
    for v in verdicts:
        if not v["ok"]:
            r = v["row"]
            worse = "above" if r["kind"] == "latency" else "below"
            print(f"REGRESSION: {label(r)} on {r['backend']} at {r['devices']:,} devices: ratio {v['ratio']:.4g} "
                  f"({r['value']:,} {r['figure']}), best {v['best']:.4g} (run {v['best_run']}, commit "
                  f"{v['best_commit']}), threshold {v['threshold']:.4g}: {worse} it by more than the noise "
                  f"({v['allowed']:.0%} allowed)")


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.set_defaults(devices=5000, hold_s=2, pushes=20000, rates=[1000], latency_s=4, relay_messages=50000,
                   only=["batch", "latency", "storm"])
    args = p.parse_args()
    tune()
    history = load_rows()
    run = asyncio.run(run_suite(args, "gate"))
    print_run(run)
    verdicts = judge(run, history)
    print_verdicts(verdicts)
    if not all(v["ok"] for v in verdicts):
        return 1
    noisy = [label(v["row"]) + " on " + v["row"]["backend"] for v in verdicts if v["too_noisy"]]
    if noisy:
        print(f"NOT JUDGED: the repetitions spread by more than {TOO_NOISY:.0%} (figure and baseline together) for: "
              + "; ".join(noisy) + ". Rerun on a quieter machine.")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
