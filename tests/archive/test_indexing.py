"""Index passes over Maildir and mbox files made with Python's ``mailbox``: messages
encrypted by ``openssl cms`` to the owner's current and rotated-out keys, signed ones,
undecryptable and corrupt ones; incremental runs, resume, mailboxes vanishing."""

from __future__ import annotations

import mailbox
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from smimeproxy.archive import ArchiveError
from smimeproxy.archive.indexing import Indexer
from smimeproxy.archive.operations import LocalArchive, index_pass, search
from smimeproxy.archive.sources import maildir_folders, mbox_file
from tests.archive.conftest import ALICE, BOB, World, encrypt, plain, sign

pytestmark = pytest.mark.interop


def by_subject(archive: LocalArchive, world: World, query: str = "") -> dict[str, object]:
    return {h.subject: h for h in search(archive, world.store, query, actor="test")}


@pytest.fixture
def maildir(world: World, openssl: str) -> Path:
    """Alice's Maildir: INBOX with plain, encrypted (current and rotated-out key),
    signed, signed-then-encrypted, Bob's encrypted mail and a corrupt message; Sent."""
    path = world.root / "alice-mail"
    md = mailbox.Maildir(path, create=True)
    pki = world.pki
    md.add(
        plain(
            "invoice 1",
            "please pay",
            html="<p>Hello <b>world</b></p><script>stealme()</script>",
            attachment=("notes.txt", "zanzibar words"),
        )
    )
    md.add(encrypt(world, openssl, plain("encrypted invoice", "the hidden body"), pki.alice))
    md.add(encrypt(world, openssl, plain("old key", "rotated paragraph"), pki.alice_old))
    md.add(sign(world, openssl, plain("signed note", "signed body"), pki.carol))
    md.add(
        encrypt(
            world, openssl, sign(world, openssl, plain("both", "inner words"), pki.carol), pki.alice
        )
    )
    md.add(encrypt(world, openssl, plain("meant for bob", "bob secret"), pki.bob))
    md.add(b"Subject: broken\r\nContent-Type: application/pkcs7-mime\r\n\r\n!!not base64 cms!!")
    md.add(b"\x00\xff garbage without headers")
    md.add_folder("Sent").add(plain("sent report", "from alice", sender=ALICE, to=BOB))
    return path


def test_index_maildir_decrypts_with_whole_key_history(world: World, maildir: Path) -> None:
    archive = world.archive()
    report = index_pass(archive, world.processor, maildir_folders(maildir, ALICE))
    counts = report.owners[ALICE]
    assert report.errors == []
    assert (counts.indexed, counts.mailboxes) == (9, 2)
    assert (counts.encrypted, counts.decrypted, counts.undecryptable) == (4, 3, 1)
    assert counts.malformed == 2
    hits = by_subject(archive, world)
    assert hits["encrypted invoice"].decrypted and hits["old key"].decrypted
    assert hits["both"].decrypted and hits["both"].verified
    assert hits["both"].signer == "carol@partner.test"
    assert hits["signed note"].verified and not hits["signed note"].encrypted
    # key isolation: Bob's key is in the store, but this is Alice's mailbox
    bob = hits["meant for bob"]
    assert bob.encrypted and not bob.decrypted
    assert bob.sender == "Carol <carol@partner.test>"  # outer headers indexed
    assert hits["sent report"].folder == "Sent"
    assert hits["broken"].malformed
    # body text: text, HTML (scripts dropped) and text attachments; decrypted bodies
    assert [h.subject for h in search(archive, world.store, "hidden", actor="t")] == [
        "encrypted invoice"
    ]
    assert [h.subject for h in search(archive, world.store, "rotated", actor="t")] == ["old key"]
    assert [h.subject for h in search(archive, world.store, "world", actor="t")] == ["invoice 1"]
    assert [h.subject for h in search(archive, world.store, "zanzibar", actor="t")] == ["invoice 1"]
    assert search(archive, world.store, "stealme", actor="t") == []
    assert search(archive, world.store, "bob secret", actor="t") == []
    assert hits["invoice 1"].attachments == "notes.txt"
    archive.close()


def test_one_audit_entry_per_owner_per_run(world: World, maildir: Path) -> None:
    before = world.store.audit_head()[0]
    archive = world.archive()
    index_pass(archive, world.processor, maildir_folders(maildir, ALICE), actor="legal")
    entries = [e for e in world.store.audit_entries(before) if e.action == "archive.index"]
    assert len(entries) == 1
    assert (entries[0].actor, entries[0].subject) == ("legal", ALICE)
    assert entries[0].detail["indexed"] == 9 and entries[0].detail["decrypted"] == 3
    assert world.store.verify_audit().ok


def test_incremental_and_flag_changes_do_not_reindex(world: World, maildir: Path) -> None:
    archive = world.archive()
    index_pass(archive, world.processor, maildir_folders(maildir, ALICE))
    md = mailbox.Maildir(maildir, create=False)
    for key in md.keys():  # a client reads everything: new/ -> cur/, flags change
        msg = md[key]
        msg.set_subdir("cur")
        msg.add_flag("S")
        md[key] = msg
    again = index_pass(archive, world.processor, maildir_folders(maildir, ALICE))
    assert again.indexed == 0
    md.add(plain("late arrival", "new words"))
    third = index_pass(archive, world.processor, maildir_folders(maildir, ALICE))
    assert third.indexed == 1
    assert archive.index.count() == 10
    archive.close()


def test_interrupted_run_resumes_without_duplicates(world: World, maildir: Path) -> None:
    archive = world.archive()
    indexer = Indexer(world.processor, archive.index, archive.state, archive.originals, batch=2)

    def crash_after_five(stream: Iterator, total: int, label: str) -> Iterator:
        for n, item in enumerate(stream):
            if n == 5:
                raise KeyboardInterrupt
            yield item

    with pytest.raises(KeyboardInterrupt):
        indexer.run(maildir_folders(maildir, ALICE), progress=crash_after_five)
    partial = archive.index.count()
    assert 0 < partial < 9  # two batches of two were committed
    report = index_pass(archive, world.processor, maildir_folders(maildir, ALICE))
    assert report.indexed == 9 - partial
    assert archive.index.count() == 9
    docids = [h.docid for h in archive.index.search("")]
    assert len(docids) == len(set(docids)) == 9
    archive.close()


def test_lost_state_is_no_duplicate(world: World, maildir: Path) -> None:
    """The index commits before the state: a crash in between re-indexes, and the
    unique document id keeps one copy."""
    archive = world.archive()
    index_pass(archive, world.processor, maildir_folders(maildir, ALICE))
    archive.state._db.execute("DELETE FROM messages")
    index_pass(archive, world.processor, maildir_folders(maildir, ALICE))
    assert archive.index.count() == 9
    archive.close()


def test_mailbox_deleted_mid_run(world: World, maildir: Path) -> None:
    """INBOX vanishes after its first message; Sent is gone by the time it is read."""
    archive = world.archive()

    def delete_everything(stream: Iterator, total: int, label: str) -> Iterator:
        for n, item in enumerate(stream):
            yield item
            if n == 0:
                shutil.rmtree(maildir)

    report = Indexer(world.processor, archive.index, archive.state, archive.originals).run(
        maildir_folders(maildir, ALICE), progress=delete_everything
    )
    counts = report.owners[ALICE]
    assert counts.indexed == 1 and counts.vanished == 7  # INBOX holds 8
    assert any("Sent" in e and "gone" in e for e in report.errors)
    assert archive.index.count() == 1
    archive.close()


def test_mbox_file_identity_survives_deletion_of_other_messages(world: World, openssl: str) -> None:
    path = world.root / "alice.mbox"
    box = mailbox.mbox(path, create=True)
    box.add(plain("first", "one"))
    box.add(encrypt(world, openssl, plain("second", "two secret"), world.pki.alice_old))
    box.add(plain("third", "three"))
    box.flush()
    archive = world.archive()
    report = index_pass(archive, world.processor, [mbox_file(path, ALICE)])
    assert report.indexed == 3 and report.owners[ALICE].decrypted == 1
    assert [h.subject for h in search(archive, world.store, "secret", actor="t")] == ["second"]
    box.remove(next(iter(box.keys())))  # the first one is expunged
    box.add(plain("fourth", "four"))
    box.flush()
    box.close()
    again = index_pass(archive, world.processor, [mbox_file(path, ALICE, "archive-2026")])
    assert again.indexed == 1
    assert archive.index.count() == 4
    archive.close()


def test_index_directory_is_owner_only_and_stores_no_body(world: World, maildir: Path) -> None:
    archive = world.archive()
    index_pass(archive, world.processor, maildir_folders(maildir, ALICE))
    assert world.config.archive is not None
    mode = stat.S_IMODE(world.config.archive.index_dir.stat().st_mode)
    assert mode == 0o700
    with archive.index._ix.searcher() as s:
        stored = [dict(d) for d in s.all_stored_fields()]
    assert stored and all("body" not in d for d in stored)
    assert not any("hidden body" in str(v) for d in stored for v in d.values())
    archive.close()


def test_not_a_maildir_is_a_clear_error(world: World) -> None:
    with pytest.raises(ArchiveError, match="not a Maildir"):
        maildir_folders(world.root, ALICE)
    with pytest.raises(ArchiveError, match="not an mbox"):
        mbox_file(world.root / "nope.mbox", ALICE)
