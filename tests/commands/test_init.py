"""smimeproxy init: files owner-only, default config, refusals, wrong master key."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from smimeproxy.config import load_config
from tests.commands.conftest import CLI, write_config


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_default_config_and_private_files(tmp_path: Path) -> None:
    config = tmp_path / "etc" / "smimeproxy.toml"
    result = CLI(config)("init", "--json")
    assert result.rc == 0, result.err
    created = result.json()
    assert set(created) == {"config", "master_key_file", "store"}
    assert config.exists() and _mode(config) == 0o600
    loaded = load_config(config)  # the written default loads as it is
    assert loaded.smtp is not None and loaded.smtp.local_domains == ("acme.test",)
    key = tmp_path / "etc" / "var" / "master.key"
    db = tmp_path / "etc" / "var" / "store.db"
    assert _mode(key) == 0o600 and key.stat().st_size == 32
    assert _mode(db) == 0o600
    assert _mode(key.parent) == 0o700


def test_init_keeps_an_existing_config(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    before = config.read_text()
    CLI(config).ok("init")
    assert config.read_text() == before


def test_reinit_refuses_and_keeps_the_key(tmp_path: Path) -> None:
    cli = CLI(write_config(tmp_path))
    cli.ok("init")
    key = tmp_path / "var" / "master.key"
    secret = key.read_bytes()
    again = cli("init")
    assert again.rc == 4
    assert "already initialised" in again.err
    assert key.read_bytes() == secret
    # a key file left over without a store is not overwritten either
    (tmp_path / "var" / "store.db").unlink()
    for extra in ("-wal", "-shm"):
        Path(str(tmp_path / "var" / "store.db") + extra).unlink(missing_ok=True)
    third = cli("init")
    assert third.rc == 4 and "already exists" in third.err
    assert key.read_bytes() == secret


def test_wrong_master_key_is_one_clear_line(tmp_path: Path) -> None:
    cli = CLI(write_config(tmp_path))
    cli.ok("init")
    cli.ok("users", "add", "alice@acme.test")
    key = tmp_path / "var" / "master.key"
    key.write_bytes(os.urandom(32))
    result = cli("users", "list")
    assert result.rc == 4
    lines = result.err.strip().splitlines()
    assert len(lines) == 1
    assert "master key does not match" in lines[0] and str(key) in lines[0]


def test_console_script_runs_end_to_end(tmp_path: Path) -> None:
    config = str(tmp_path / "smimeproxy.toml")
    script = shutil.which("smimeproxy")  # the installed console script, if any
    exe = [script] if script else [sys.executable, "-m", "smimeproxy.cli"]
    run = subprocess.run([*exe, "--config", config, "init"], capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr
    run = subprocess.run(
        [*exe, "--config", config, "users", "add", "bob@acme.test", "--login", "bob"],
        capture_output=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    run = subprocess.run(
        [*exe, "--config", config, "users", "list", "--json"], capture_output=True, timeout=60
    )
    assert run.returncode == 0
    assert json.loads(run.stdout)[0]["logins"] == ["bob"]
    # usage errors exit 2
    run = subprocess.run([*exe, "--config", config, "keys", "rotate"], capture_output=True)
    assert run.returncode == 2
