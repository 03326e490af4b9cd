"""schemathesis, a fuzzer nobody here wrote, against a real box through the served /openapi.json: every check,
every phase (examples, coverage, fuzzing, stateful via the description's links), a fixed seed and a bounded
number of cases, with each credential the box takes and without any. Zero failures (#16)."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Box

pytest.importorskip("schemathesis")
# Each run takes 20-50 s on 2 cores; room for a loaded machine, never a bound that the test asserts.
pytestmark = pytest.mark.timeout(600)

HOOKS = Path(__file__).with_name("schemathesis_hooks.py")
SEED = 16
RUN_TIMEOUT_S = 540

# Statuses schemathesis counts as "rejected" (negative data) and "accepted" (positive data) besides its own
# defaults: 410 is the box's documented answer to a token it does not know (docs/provider-api.md), 413 and
# 415 are bodies over api.max_body_bytes or not JSON.
CONFIG = """
hooks = "{hooks}"
seed = {seed}

[generation]
max-examples = {examples}
database = "none"

[phases.stateful]
max-steps = 12

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "401", "403", "404", "409", "410", "429"]

[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "410", "413", "415"]
{auth}
"""


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    b = Box(tmp_path_factory.mktemp("fuzz") / "box").start()
    yield b
    b.stop()


def fuzz(box: Box, work: Path, name: str, examples: int, app_id: str, auth: dict[str, str]) -> dict[str, Any]:
    """Run `st run` against the box; return its summary, the statuses per operation and the catalog codes."""
    work.mkdir(parents=True, exist_ok=True)
    schemes = "".join(f'\n[auth.openapi.{scheme}]\nbearer = "{value}"\n' for scheme, value in auth.items())
    config = work / f"{name}.toml"
    config.write_text(CONFIG.format(hooks=HOOKS, seed=SEED, examples=examples, auth=schemes))
    report = work / f"{name}.ndjson"
    dropped = work / f"{name}.dropped"
    st = Path(sys.executable).with_name("st")
    command = [str(st), "--config-file", str(config), "--no-color", "run", f"{box.url}/openapi.json",
               "--checks", "all", "--phases", "examples,coverage,fuzzing,stateful", "--workers", "1",
               "--report", "ndjson", "--report-ndjson-path", str(report)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=work,
                          env={**os.environ, "INTRAPUSH_FUZZ_APP_ID": app_id,
                                                                "INTRAPUSH_FUZZ_DROPPED": str(dropped)})
    (work / f"{name}.out").write_text(done.stdout + done.stderr)
    generated = re.search(r"(\d+) generated", done.stdout)
    statuses: Counter[tuple[str, int]] = Counter()
    codes: Counter[int] = Counter()
    for line in report.read_text().splitlines():
        event = json.loads(line)
        recorder = event.get("ScenarioFinished", {}).get("recorder", {})
        for interaction in recorder.get("interactions", {}).values():
            response = interaction.get("response")
            if not response:
                continue
            request = interaction["request"]
            path = re.sub(r"^https?://[^/]+", "", request["uri"]).split("?")[0]
            statuses[(f"{request['method']} {_route(path)}", response["status_code"])] += 1
            code = _code(response)
            if code is not None:
                codes[code] += 1
    summary = {"name": name, "returncode": done.returncode, "generated": int(generated[1]) if generated else 0,
               "statuses": statuses, "codes": codes,
               "dropped": Counter(dropped.read_text().splitlines()) if dropped.exists() else Counter(),
               "output": done.stdout[-6000:] + done.stderr[-2000:]}
    print(f"\n[{name}] {summary['generated']} cases generated; statuses: "
          f"{dict(sorted(Counter(s for _, s in statuses.elements()).items()))}; codes: {dict(sorted(codes.items()))}; "
          f"failures accepted by tests/e2e/schemathesis_hooks.py: {dict(summary['dropped'])}")
    return summary


def _route(path: str) -> str:
    for pattern, route in ((r"^/v1/devices/[^/]+/identity$", "/v1/devices/{token}/identity"),
                           (r"^/v1/devices/[^/]+$", "/v1/devices/{token}"),
                           (r"^/v1/messages/[^/]+$", "/v1/messages/{id}"),
                           (r"^/v1/aliases/[^/]+/contact$", "/v1/aliases/{alias}/contact"),
                           (r"^/v1/topics/[^/]+/subscribers$", "/v1/topics/{topic}/subscribers")):
        if re.match(pattern, path):
            return route
    return path


def _code(response: dict[str, Any]) -> int | None:
    content = response.get("content") or {}
    raw = base64.b64decode(content["$base64"]) if "$base64" in content else (content.get("string") or "").encode()
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc.get("code") if isinstance(doc, dict) and isinstance(doc.get("code"), int) else None


def test_fuzzer_finds_nothing_with_the_api_key_and_the_enrollment_secret(box: Box, tmp_path: Path) -> None:
    app = box.create_app("fuzz-secret")
    run = fuzz(box, tmp_path, "secret", 60, app["app_id"],
               {"apiKey": app["api_key"], "enrollmentCredential": app["enrollment_secret"]})
    assert run["returncode"] == 0, run["output"]
    assert run["generated"] > 0
    statuses = run["statuses"]
    # It gets past the front door: devices enroll, pushes are accepted, followed and cancelled.
    assert statuses[("POST /v1/devices", 201)] > 0, run["output"]
    assert statuses[("POST /v1/messages", 202)] > 0
    assert statuses[("GET /v1/messages/{id}", 200)] > 0
    assert not [k for k in statuses if k[1] >= 500]


def test_fuzzer_finds_nothing_with_a_minted_ticket(box: Box, tmp_path: Path) -> None:
    app = box.create_app("fuzz-ticket")
    ticket = box.ticket(app, alias="emp-fuzz")["ticket"]
    run = fuzz(box, tmp_path, "ticket", 20, app["app_id"], {"apiKey": app["api_key"], "enrollmentCredential": ticket})
    assert run["returncode"] == 0, run["output"]
    assert run["statuses"][("POST /v1/devices", 201)] == 1  # a ticket works once
    assert run["codes"][40105] > 0  # ... and then says it was redeemed
    assert not [k for k in run["statuses"] if k[1] >= 500]


def test_fuzzer_finds_nothing_without_credentials(box: Box, tmp_path: Path) -> None:
    app = box.create_app("fuzz-anonymous")
    run = fuzz(box, tmp_path, "anonymous", 20, app["app_id"], {})
    assert run["returncode"] == 0, run["output"]
    seen = {status for (_, status) in run["statuses"]}
    assert 401 in seen and 200 in seen
    assert not [k for k in run["statuses"] if k[0].startswith("POST /v1/") and 200 <= k[1] < 300]
