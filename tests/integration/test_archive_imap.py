"""The archive against a real Dovecot with a master user: every user's every folder,
incremental runs, a changed UIDVALIDITY, and the upstream dying mid-run."""

from __future__ import annotations

import imaplib
import io
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from smimeproxy.archive.indexing import Indexer
from smimeproxy.archive.operations import imap_accounts, imap_mailboxes, index_pass, search
from smimeproxy.archive.sources import IMAPSource, connector, maildir_folders
from smimeproxy.cli import main
from tests.archive.conftest import ALICE, BOB, World, encrypt, pki, plain, world  # noqa: F401
from tests.integration.dovecot import Dovecot, start_dovecot

pytestmark = [pytest.mark.integration, pytest.mark.interop]

MASTER = ("archiver", "master-secret-pw")
USERS = {"alice": "alice-pw", "bob": "bob-pw"}


def append(server: Dovecot, login: str, folder: str, messages: list[bytes]) -> None:
    conn = imaplib.IMAP4(server.host, server.port)
    conn.login(login, USERS[login])
    if folder != "INBOX":
        typ, detail = conn.create(folder)
        assert typ == "OK" or b"exists" in detail[0], detail
    for data in messages:
        typ, detail = conn.append(folder, None, None, data)
        assert typ == "OK", detail
    conn.logout()


@pytest.fixture
def dovecot(tmp_path: Path) -> Iterator[Dovecot]:
    server = start_dovecot(tmp_path, USERS, master_user=MASTER)
    yield server
    server.stop()


@pytest.fixture
def filled(world: World, dovecot: Dovecot, openssl: str) -> Dovecot:  # noqa: F811
    world.store.add_login(ALICE, "alice")
    world.store.add_login(BOB, "bob")
    pki_ = world.pki
    append(
        dovecot,
        "alice",
        "INBOX",
        [
            plain("hello alice", "plain words"),
            encrypt(world, openssl, plain("rotated", "old key words"), pki_.alice_old),
            encrypt(world, openssl, plain("current", "new key words"), pki_.alice),
        ],
    )
    append(dovecot, "alice", "Sent", [plain("my report", "sent words", sender=ALICE, to=BOB)])
    append(dovecot, "bob", "INBOX", [encrypt(world, openssl, plain("to bob", "bobs"), pki_.bob)])
    return dovecot


def source(world: World, server: Dovecot) -> IMAPSource:  # noqa: F811
    return IMAPSource(
        connector(server.endpoint(), timeout=10),
        imap_accounts(world.store),
        name=server.endpoint(),
        master_user=MASTER[0],
        master_password=MASTER[1],
    )


def cli(world: World, *args: str) -> tuple[int, str, str]:  # noqa: F811
    out, err = io.BytesIO(), io.StringIO()
    code = main(["--config", str(world.config.path), "archive", *args], stdout=out, stderr=err)
    return code, out.getvalue().decode(), err.getvalue()


def test_master_user_indexes_every_folder_of_every_user(world: World, filled: Dovecot) -> None:  # noqa: F811
    pw = world.root / "master.pw"
    pw.write_text(MASTER[1] + "\n")
    code, out, err = cli(
        world, "index", "--imap", "--upstream", filled.endpoint(),
        "--master-user", MASTER[0], "--master-password-file", str(pw), "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["owners"][ALICE]["indexed"] == 4
    assert report["owners"][ALICE]["decrypted"] == 2  # current and rotated-out key
    assert report["owners"][BOB]["decrypted"] == 1  # Bob's mail with Bob's key
    code, out, _ = cli(world, "search", "folder:Sent", "--json")
    assert [h["subject"] for h in json.loads(out)] == ["my report"]
    code, out, _ = cli(world, "search", "old key words", "--json")
    assert [(h["owner"], h["folder"]) for h in json.loads(out)] == [(ALICE, "INBOX")]
    # nothing new: nothing indexed
    code, out, _ = cli(
        world, "index", "--imap", "--upstream", filled.endpoint(),
        "--master-user", MASTER[0], "--master-password-file", str(pw), "--json",
    )  # fmt: skip
    assert json.loads(out)["indexed"] == 0
    assert "master-secret-pw" not in out


def test_changed_uidvalidity_reindexes_that_mailbox(world: World, filled: Dovecot) -> None:  # noqa: F811
    append(filled, "alice", "Work", [plain("w1", "one"), plain("w2", "two")])
    archive = world.archive()
    index_pass(archive, world.processor, imap_mailboxes(source(world, filled)))
    assert {h.subject for h in search(archive, world.store, "folder:Work", actor="t")} == {
        "w1",
        "w2",
    }
    conn = imaplib.IMAP4(filled.host, filled.port)
    conn.login("alice", USERS["alice"])
    conn.delete("Work")
    conn.logout()
    time.sleep(1.1)  # Dovecot derives UIDVALIDITY from the time in seconds
    append(filled, "alice", "Work", [plain("w3", "three")])
    report = index_pass(archive, world.processor, imap_mailboxes(source(world, filled)))
    assert report.owners[ALICE].reindexed_mailboxes == 1
    assert [h.subject for h in search(archive, world.store, "folder:Work", actor="t")] == ["w3"]
    archive.close()


def test_upstream_dies_mid_run_then_resumes_without_duplicates(
    world: World,  # noqa: F811
    filled: Dovecot,
    tmp_path: Path,
) -> None:
    archive = world.archive()

    def kill_after_first(stream: Iterator, total: int, label: str) -> Iterator:
        for n, item in enumerate(stream):
            yield item
            if n == 0:  # the server dies; its mail stays on disk
                filled.process.kill()
                filled.process.wait()

    report = Indexer(world.processor, archive.index, archive.state, archive.originals).run(
        imap_mailboxes(source(world, filled)), progress=kill_after_first
    )
    assert report.errors and any("IMAP" in e for e in report.errors)
    done = archive.index.count()
    assert 1 <= done < 5
    # the server comes back on another port with the same mail (UIDs, UIDVALIDITY)
    (tmp_path / "second").mkdir()
    again = start_dovecot(tmp_path / "second", USERS, master_user=MASTER)
    shutil.copytree(filled.base / "mail", again.base / "mail", dirs_exist_ok=True)
    again.own(again.base / "mail")
    try:
        resumed = index_pass(archive, world.processor, imap_mailboxes(source(world, again)))
    finally:
        again.stop()
    assert resumed.errors == []
    assert resumed.indexed == 5 - done
    docids = [h.docid for h in archive.index.search("")]
    assert len(docids) == len(set(docids)) == 5
    archive.close()


def test_wrong_master_password_is_a_clear_error(world: World, filled: Dovecot) -> None:  # noqa: F811
    bad = IMAPSource(
        connector(filled.endpoint(), timeout=10),
        imap_accounts(world.store),
        name="x",
        master_user=MASTER[0],
        master_password="wrong",
    )
    archive = world.archive()
    report = index_pass(archive, world.processor, imap_mailboxes(bad))
    assert report.indexed == 0
    assert report.errors and "refused the login" in report.errors[0]
    assert "wrong" not in " ".join(report.errors)
    archive.close()


def test_dovecot_maildir_tree_read_directly(world: World, filled: Dovecot) -> None:  # noqa: F811
    """The same mail read from Dovecot's files (LAYOUT=fs: folders are subdirectories)."""
    folders = maildir_folders(filled.maildir("alice"), ALICE)
    assert {"INBOX", "Sent"} <= {f.folder for f in folders}
    archive = world.archive()
    report = index_pass(archive, world.processor, folders)
    assert report.owners[ALICE].indexed == 4 and report.owners[ALICE].decrypted == 2
    assert [h.subject for h in search(archive, world.store, "folder:Sent", actor="t")] == [
        "my report"
    ]
    archive.close()
