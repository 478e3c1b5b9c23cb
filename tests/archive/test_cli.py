"""``smimeproxy --config F archive index|search|export|status`` end to end."""

from __future__ import annotations

import io
import json
import mailbox
import zipfile

import pytest

from smimeproxy.cli import main
from tests.archive.conftest import ALICE, World, encrypt, plain

pytestmark = pytest.mark.interop


def run(world: World, *args: str) -> tuple[int, str, str]:
    out, err = io.BytesIO(), io.StringIO()
    code = main(["--config", str(world.config.path), "archive", *args], stdout=out, stderr=err)
    return code, out.getvalue().decode(), err.getvalue()


def test_index_search_export_status(world: World, openssl: str) -> None:
    md = mailbox.Maildir(world.root / "mail", create=True)
    md.add(plain("invoice 7", "amount due", date="Mon, 02 Feb 2026 10:00:00 +0000"))
    late = plain("invoice 8", "secret amount", date="Tue, 03 Feb 2026 10:00:00 +0000")
    md.add(encrypt(world, openssl, late, world.pki.alice_old))
    box = mailbox.mbox(world.root / "old.mbox", create=True)
    box.add(plain("invoice 1999", "ancient", date="Fri, 01 Jan 1999 00:00:00 +0000"))
    box.flush()

    code, out, err = run(world, "index", "--maildir", str(world.root / "mail"), "--owner", ALICE)
    assert code == 0, err
    assert ALICE in out and "indexed" in out  # a table
    code, out, err = run(world, "index", "--mbox", str(world.root / "old.mbox"), "--owner", ALICE)
    assert code == 0, err

    code, out, _ = run(world, "search", "subject:invoice", "--json", "--actor", "auditor")
    hits = json.loads(out)
    assert [h["subject"] for h in hits] == ["invoice 1999", "invoice 7", "invoice 8"]
    assert hits[2]["encrypted"] and hits[2]["decrypted"]
    code, out, _ = run(world, "search", "secret date:[20260101 to 20261231]")
    assert "invoice 8" in out and "1 message(s)" in out and "decrypted" in out

    code, out, err = run(
        world, "export", "subject:invoice date:[2026-01-01 to 2026-12-31]",
        "--out", str(world.root / "case.zip"), "--form", "decrypted", "--json",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)
    assert summary["messages"] == 2 and summary["decrypted"] == 1
    with zipfile.ZipFile(world.root / "case.zip") as z:
        names = z.namelist()
        assert sum(n.startswith("decrypted/") for n in names) == 2
        assert not any(n.startswith("original/") for n in names)

    code, out, _ = run(world, "status", "--json")
    status = json.loads(out)
    assert status["messages"] == 3
    assert {(m["folder"], m["messages"]) for m in status["mailboxes"]} == {
        ("INBOX", 2),
        ("old", 1),
    }
    actions = [(e.actor, e.action) for e in world.store.audit_entries()]
    assert ("auditor", "archive.search") in actions
    assert any(a == "archive.export" for _, a in actions)


def test_errors_are_one_line_and_exit_4(world: World) -> None:
    code, _, err = run(world, "index", "--maildir", str(world.root))
    assert code == 4 and "--owner" in err
    code, _, err = run(world, "search", "date:[garbage to 2026]")
    assert code == 4 and "query" in err
    code, _, err = run(world, "index", "--maildir", str(world.root), "--owner", ALICE)
    assert code == 4 and "not a Maildir" in err
    assert "Traceback" not in err
