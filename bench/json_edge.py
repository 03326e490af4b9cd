"""Cost of the strict JSON parse of the HTTP edge (appliance/api/edge.py, #16) on the hot path: µs per
request body for a 500-message batch and a single push, plain `json.loads` (before) against
`edge.parse_json` (after), with an always-on duplicate-key hook for scale. Prints, and appends a JSON line
to bench/results.jsonl (not with BENCH_NO_RECORD=1).

    /work/venv/bin/python bench/json_edge.py
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import sys
import time
import timeit
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.api.edge import parse_json  # noqa: E402

RESULTS = Path(__file__).parent / "results.jsonl"


def push(i: int) -> dict[str, Any]:
    return {"to": {"token": "dt_" + secrets.token_urlsafe(24)}, "title": f"Order {i} shipped",
            "body": "Your parcel left the warehouse at 14:02 and arrives tomorrow.", "priority": "high",
            "ttl_s": 3600, "collapse_key": f"order-{i}",
            "data": {"order": i, "url": f"app://orders/{i}", "amount": 12.5}}


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise ValueError("duplicate key")
    return doc


def best_us(fn: Any, runs: int) -> float:
    return min(timeit.repeat(fn, number=runs, repeat=7)) / runs * 1e6


def main() -> None:
    result: dict[str, Any] = {"scenario": "json_edge"}
    for name, body, runs in (("batch500", json.dumps({"messages": [push(i) for i in range(500)]}).encode(), 200),
                             ("single", json.dumps(push(1)).encode(), 20000)):
        before = best_us(lambda b=body: json.loads(b), runs)
        hook = best_us(lambda b=body: json.loads(b, object_pairs_hook=unique_keys), runs)
        after = best_us(lambda b=body: parse_json(b), runs)
        print(f"{name}: {len(body)} bytes; json.loads {before:.1f} µs, with a duplicate-key hook {hook:.1f} µs, "
              f"edge.parse_json {after:.1f} µs per request")
        result.update({f"{name}_bytes": len(body), f"{name}_before_us": round(before, 1),
                       f"{name}_hook_us": round(hook, 1), f"{name}_after_us": round(after, 1)})
    result.update({"machine": platform.node() and "vm", "cpus": os.cpu_count(), "python": platform.python_version(),
                   "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    if not os.environ.get("BENCH_NO_RECORD"):
        with RESULTS.open("a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
