"""keys rotate --all: every user in one run, a summary, rerun and interruption safe,
old keys kept, audited, and marked for republication."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from smimeproxy.commands.store_ops import configured_store
from smimeproxy.keystore.ca_state import CAState
from smimeproxy.pki.ca import generate_user_key
from tests.commands.conftest import CLI, FakeTTY

USERS = 50


@pytest.fixture
def many(cli: CLI) -> CLI:
    """50 users with a P-256 key each, made through the library (setup only, fast)."""
    import argparse

    with configured_store(argparse.Namespace(config=str(cli.config))) as (_, store):
        ca = CAState(store)
        for n in range(USERS):
            key = generate_user_key("p256")
            address = f"user{n:02d}@acme.test"
            cert = ca.issue(key.public_key(), [address])  # type: ignore[arg-type]
            store.import_key(key, cert)
    return cli


def _states(cli: CLI) -> Counter[tuple[str, str]]:
    return Counter((k["address"], k["state"]) for k in cli.ok("keys", "list", "--json").json())


def test_rotate_all_summary_and_rerun(many: CLI) -> None:
    cli = many
    first = cli.ok("keys", "rotate", "--all", "--run", "r1", "--json").json()
    assert (first["rotated"], first["skipped"], first["failed"]) == (USERS, 0, 0)
    assert first["republish"] == USERS
    assert all(u["old"] and u["new"] and u["old"] != u["new"] for u in first["users"])
    states = _states(cli)
    for n in range(USERS):
        a = f"user{n:02d}@acme.test"
        assert states[(a, "current")] == 1 and states[(a, "previous")] == 1
    # rerun of the same run: nothing happens
    again = cli.ok("keys", "rotate", "--all", "--run", "r1", "--json").json()
    assert (again["rotated"], again["skipped"]) == (0, USERS)
    assert _states(cli) == states
    # the table form ends with the summary line
    table = cli.ok("keys", "rotate", "--all", "--run", "r1").text
    assert f"run r1: 0 rotated, {USERS} skipped, 0 failed" in table
    assert "skipped: already rotated" in table
    audit = cli.ok("audit", "show", "--json").json()
    bulk = [e for e in audit if e["action"] == "key.rotate.bulk"]
    assert bulk[0]["subject"] == "r1" and bulk[0]["detail"]["rotated"] == USERS
    assert len([e for e in audit if e["action"] == "key.rotate"]) == USERS
    assert any(e["action"] == "key.rotate.bulk.start" for e in audit)
    # what directories must republish, until marked done
    waiting = cli.ok("keys", "republish", "--json").json()
    assert len(waiting) == USERS and {w["run"] for w in waiting} == {"r1"}
    new_of_00 = next(u["new"] for u in first["users"] if u["address"] == "user00@acme.test")
    assert next(w["key"] for w in waiting if w["address"] == "user00@acme.test") == new_of_00
    left = cli.ok("keys", "republish", "--done", "user00@acme.test", "--json").json()
    assert len(left) == USERS - 1
    assert cli("keys", "republish", "--done", "user00@acme.test").rc == 4


def _rotated_in(db: Path, run: str) -> int:
    with sqlite3.connect(db, timeout=30) as conn:
        row = conn.execute("SELECT COUNT(*) FROM rotation_runs WHERE run = ?", (run,)).fetchone()
    return int(row[0])


def test_interrupted_run_resumes_without_rotating_twice(many: CLI) -> None:
    """Ctrl-C (SIGINT) a real ``smimeproxy keys rotate --all`` part way, then rerun."""
    cli = many
    db = cli.config.parent / "var" / "store.db"
    script = shutil.which("smimeproxy")
    exe = [script] if script else [sys.executable, "-m", "smimeproxy.cli"]
    # RSA-3072 generation is slow enough to interrupt part way
    proc = subprocess.Popen(
        [
            *exe,
            "--config",
            str(cli.config),
            "keys",
            "rotate",
            "--all",
            "--run",
            "r2",
            "--kind",
            "rsa3072",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while _rotated_in(db, "r2") < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"interrupted" in err
    done = Counter(state for (_, state) in _states(cli).elements())
    assert 0 < done["previous"] < USERS
    resumed = cli.ok("keys", "rotate", "--all", "--run", "r2", "--kind", "p256", "--json").json()
    assert resumed["rotated"] + resumed["skipped"] == USERS
    assert resumed["skipped"] == done["previous"]
    states = _states(cli)
    assert all(states[(f"user{n:02d}@acme.test", "previous")] == 1 for n in range(USERS))
    assert all(states[(f"user{n:02d}@acme.test", "current")] == 1 for n in range(USERS))


def test_progress_bar_on_a_terminal(cli: CLI) -> None:
    cli.ok("keys", "generate", "--user", "a@acme.test", "--kind", "p256")
    stderr = FakeTTY()
    assert cli("keys", "rotate", "--all", stderr=stderr).rc == 0
    assert "1/1" in stderr.getvalue() and "[" in stderr.getvalue()
