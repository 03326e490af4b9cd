"""The docs stay true: generated reference blocks are current, and every setting, error code and
route is documented."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from appliance.api.admin import AdminApi
from appliance.config import SETTINGS
from appliance.errors import CATALOG

DOCS = Path(__file__).parent.parent / "docs"


def test_generated_reference_blocks_are_current() -> None:
    files = [str(DOCS / name) for name in ("config.md", "errors.md", "fallback.md", "benchmarks.md")]
    r = subprocess.run([sys.executable, "-m", "cogapp", "--check", *files],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr + "\nrun: cog -r docs/config.md docs/errors.md docs/fallback.md docs/benchmarks.md"


def test_every_setting_is_in_config_md() -> None:
    text = (DOCS / "config.md").read_text()
    missing = [s.name for s in SETTINGS if f"`{s.name}`" not in text]
    assert not missing


def test_every_error_code_is_in_errors_md() -> None:
    text = (DOCS / "errors.md").read_text()
    assert not [code for code in CATALOG if f'id="{code}"' not in text]


def test_every_admin_route_is_in_admin_api_md() -> None:
    text = (DOCS / "admin-api.md").read_text()
    api = AdminApi(accounts=None, status=dict)  # type: ignore[arg-type]  # routes only
    paths = {r.path for r in api.routes()}
    assert paths and not [p for p in paths if f"`{p}`" not in text]


def test_every_provider_route_is_in_provider_api_md() -> None:
    text = (DOCS / "provider-api.md").read_text()
    source = (Path(__file__).parent.parent / "appliance" / "api" / "provider.py").read_text()
    paths = set(re.findall(r'web\.\w+\("(/v1/[^"]+)"', source))
    assert paths and not [p for p in paths if p.replace("{topic}", "{name}") not in text]
