"""Configuration: every bad file is refused with every problem named; precedence flag > env > file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.config import SETTINGS, Config, ConfigError, render_default_file

BAD = sorted((Path(__file__).parent.parent / "data" / "config").glob("*.toml"))


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_config_file_is_refused_with_a_precise_problem(path: Path, tmp_path: Path) -> None:
    expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
    with pytest.raises(ConfigError) as info:
        Config.load(tmp_path, file=path, env={})
    assert any(expected in problem for problem in info.value.problems), info.value.problems


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[broker]\nlisten = 5\nmax_packet_bytes = "big"\n[api]\nmax_batch = 0\n')
    with pytest.raises(ConfigError) as info:
        Config.load(tmp_path, file=f, env={"INTRAPUSH_PUSH_MAX_TTL_S": "soon", "INTRAPUSH_BROKR_LISTEN": "x"})
    assert len(info.value.problems) == 5, info.value.problems


def test_flag_beats_env_beats_file_beats_default(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[api]\nlisten = "127.0.0.1:1"\nmax_batch = 7\n[push]\ninbox_limit = 9\n')
    secret = tmp_path / "batch"
    secret.write_text("11\n")
    cfg = Config.load(tmp_path, file=f, env={"INTRAPUSH_API_LISTEN": "127.0.0.1:2",
                                              "INTRAPUSH_PUSH_INBOX_LIMIT_FILE": str(secret)},
                      flags={"api.listen": "127.0.0.1:3"})
    assert cfg.api.listen == "127.0.0.1:3" and cfg.sources["api.listen"] == "flag"
    assert cfg.api.max_batch == 7 and cfg.sources["api.max_batch"] == str(f)
    assert cfg.push.inbox_limit == 11 and cfg.sources["push.inbox_limit"].startswith("env")
    assert cfg.push.default_ttl_s == 604800 and cfg.sources["push.default_ttl_s"] == "default"


def test_shipped_default_file_parses_to_the_defaults(tmp_path: Path) -> None:
    f = tmp_path / "intrapush.toml"
    text = render_default_file()
    f.write_text("\n".join(line.removeprefix("#") if " = " in line else line for line in text.splitlines()))
    cfg = Config.load(tmp_path, file=f, env={})
    assert all(cfg.values[s.name] == s.default for s in SETTINGS)
    assert all(cfg.sources[s.name] == str(f) for s in SETTINGS)


def test_serve_with_a_bad_config_exits_2_listing_every_problem(tmp_path: Path) -> None:
    (tmp_path / "intrapush.toml").write_text('[broker]\nlisten = "nope"\n[push]\ninbox_limt = 3\n')
    r = subprocess.run([sys.executable, "-m", "appliance", "serve", "--data-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "broker.listen" in r.stderr and "did you mean `inbox_limit`" in r.stderr
    assert not (tmp_path / "intrapush.db").exists()


def test_config_show_names_each_source(tmp_path: Path) -> None:
    (tmp_path / "intrapush.toml").write_text("[push]\ninbox_limit = 5\n")
    r = subprocess.run([sys.executable, "-m", "appliance", "config", "show", "--data-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=30, env={"INTRAPUSH_API_MAX_BATCH": "9", "PATH": ""})
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines()}
    assert lines["push.inbox_limit"].endswith(f"({tmp_path / 'intrapush.toml'})")
    assert "env INTRAPUSH_API_MAX_BATCH" in lines["api.max_batch"]
    assert lines["store.path"].endswith("(default)")


def test_shipped_config_file_is_the_rendered_defaults() -> None:
    shipped = Path(__file__).parent.parent.parent / "image" / "intrapush.toml"
    assert shipped.read_text() == render_default_file(), "run: python -c 'from appliance.config import " \
        "render_default_file; open(\"image/intrapush.toml\",\"w\").write(render_default_file())'"
