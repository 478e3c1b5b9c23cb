"""audit show / verify: entries for exports and bulk operations, tampering detected."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tests.commands.conftest import CLI


def test_audit_show_json_and_verify_intact(cli: CLI) -> None:
    cli.ok("keys", "generate", "--user", "alice@acme.test", "--kind", "p256")
    entries = cli.ok("audit", "show", "--json").json()
    actions = [e["action"] for e in entries]
    assert actions[0] == "store.init"
    assert {"ca.init", "ca.issue", "key.import"} <= set(actions)
    assert all(e["actor"].startswith("cli:") for e in entries if e["action"] != "user.add")
    verified = cli.ok("audit", "verify", "--json").json()
    assert verified["ok"] is True and verified["entries"] == len(entries)
    assert verified["head"]["seq"] == entries[-1]["seq"]
    table = cli.ok("audit", "show", "--action", "ca.").text
    assert "ca.init" in table and "key.import" not in table


def test_private_key_export_is_audited_and_private(cli: CLI, tmp_path: Path) -> None:
    cli.ok("keys", "generate", "--user", "alice@acme.test", "--kind", "p256")
    out = tmp_path / "alice.key"
    cli.ok(
        "keys",
        "export-key",
        "--user",
        "alice@acme.test",
        "--reason",
        "ticket 42",
        "--out",
        str(out),
    )
    assert out.stat().st_mode & 0o777 == 0o600
    assert out.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    entries = cli.ok("audit", "show", "--json").json()
    export = [e for e in entries if e["action"] == "key.export"]
    assert len(export) == 1
    assert export[0]["subject"] == "alice@acme.test"
    assert export[0]["detail"]["reason"] == "ticket 42"
    assert "PRIVATE KEY" not in cli.ok("audit", "show").text
    # a second export to the same file is refused before anything is exported or audited
    again = cli(
        "keys", "export-key", "--user", "alice@acme.test", "--reason", "x", "--out", str(out)
    )
    assert again.rc == 4 and "already exists" in again.err
    entries = cli.ok("audit", "show", "--json").json()
    assert len([e for e in entries if e["action"] == "key.export"]) == 1


def test_audit_verify_detects_an_edited_row(cli: CLI) -> None:
    cli.ok("users", "add", "alice@acme.test")
    cli.ok("users", "add", "bob@acme.test")
    entries = cli.ok("audit", "show", "--json").json()
    target = next(e["seq"] for e in entries if e["subject"] == "alice@acme.test")
    db = cli.config.parent / "var" / "store.db"
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE audit SET subject = 'mallory@acme.test' WHERE seq = ?", (target,))
    result = cli("audit", "verify")
    assert result.rc == 1
    assert f"BROKEN at entry {target}" in result.text
    as_json = cli("audit", "verify", "--json").json()
    assert as_json["ok"] is False and as_json["first_broken"] == target


def test_audit_verify_detects_a_removed_row(cli: CLI) -> None:
    cli.ok("users", "add", "alice@acme.test")
    cli.ok("users", "add", "bob@acme.test")
    db = cli.config.parent / "var" / "store.db"
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM audit WHERE seq = 2")
    result = cli("audit", "verify", "--json")
    assert result.rc == 1 and result.json()["first_broken"] in (2, 3)
