"""Cost of the strict JSON parse (appliance/api/edge.py) on a provider's 500-message batch body, against
plain `json.loads` and an always-on duplicate-key hook: µs per request body (#16)."""

from __future__ import annotations

import json
import secrets
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.api.edge import parse_json  # noqa: E402


def batch_body(n: int = 500) -> bytes:
    messages = [{"to": {"token": "dt_" + secrets.token_urlsafe(24)}, "title": f"Order {i} shipped",
                 "body": "Your parcel left the warehouse at 14:02 and arrives tomorrow.", "priority": "high",
                 "ttl_s": 3600, "collapse_key": f"order-{i}", "data": {"order": i, "url": f"app://orders/{i}",
                                                                        "amount": 12.5}}
                for i in range(n)]
    return json.dumps({"messages": messages}).encode()


def unique(pairs):
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise ValueError("duplicate")
    return doc


def main() -> None:
    body = batch_body()
    runs = 200
    cases = {
        "json.loads (before)": lambda: json.loads(body),
        "json.loads + object_pairs_hook": lambda: json.loads(body, object_pairs_hook=unique),
        "edge.parse_json (after)": lambda: parse_json(body),
    }
    print(f"500-message batch body: {len(body)} bytes")
    for name, fn in cases.items():
        best = min(timeit.repeat(fn, number=runs, repeat=5)) / runs
        print(f"{name:34s} {best * 1e6:8.0f} µs per request")


if __name__ == "__main__":
    main()
