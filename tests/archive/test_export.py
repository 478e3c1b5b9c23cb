"""Exports re-read with Python's ``zipfile``/``mailbox`` and re-hashed; manifests;
audit entries; a full disk (a real 64 KiB tmpfs as root, and an injected ENOSPC)."""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import mailbox
import os
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from smimeproxy.archive import ArchiveError
from smimeproxy.archive.operations import LocalArchive, export_matches, index_pass
from smimeproxy.archive.sources import maildir_folders
from tests.archive.conftest import ALICE, World, encrypt, plain, sign

pytestmark = pytest.mark.interop


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def indexed(world: World, openssl: str) -> Iterator[tuple[LocalArchive, dict[str, bytes]]]:
    """Alice's mail indexed; returns the archive and the originals by subject."""
    pki = world.pki
    originals = {
        "invoice plain": plain("invoice plain", "pay", attachment=("a.txt", "x")),
        "invoice secret": encrypt(world, openssl, plain("invoice secret", "hidden"), pki.alice),
        "invoice old": encrypt(world, openssl, plain("invoice old", "older"), pki.alice_old),
        "invoice signed": sign(world, openssl, plain("invoice signed", "sig"), pki.carol),
        "invoice for bob": encrypt(world, openssl, plain("invoice for bob", "b"), pki.bob),
        "unrelated": plain("unrelated", "nothing", date="Tue, 01 Sep 2026 08:00:00 +0000"),
    }
    md = mailbox.Maildir(world.root / "mail", create=True)
    for data in originals.values():
        md.add(data)
    archive = world.archive()
    index_pass(archive, world.processor, maildir_folders(world.root / "mail", ALICE))
    yield archive, originals
    archive.close()


QUERY = "subject:invoice date:[20260101 to 20260630]"


def test_zip_both_forms_rehash_and_manifest(
    world: World, indexed: tuple[LocalArchive, dict[str, bytes]]
) -> None:
    archive, originals = indexed
    before = world.store.audit_head()[0]
    out = world.root / "case-17.zip"
    result = export_matches(archive, world.processor, QUERY, out, actor="counsel", form="both")
    assert result.count == 5
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None
        manifest = json.loads(z.read("manifest.json"))
        rows = list(csv.DictReader(io.StringIO(z.read("manifest.csv").decode())))
        assert sha(z.read("manifest.json")) == result.manifest_sha256
        by_subject = {r["subject"]: r for r in manifest["messages"]}
        assert set(by_subject) == {s for s in originals if s.startswith("invoice")}
        for subject, row in by_subject.items():
            original = z.read(row["original_file"])
            assert original == originals[subject]  # byte for byte as stored
            assert sha(original) == row["original_sha256"] == row["original_file_sha256"]
            decrypted = z.read(row["decrypted_file"])
            assert sha(decrypted) == row["decrypted_file_sha256"]
            assert row["owner"] == ALICE and row["folder"] == "INBOX"
        assert b"hidden" in z.read(by_subject["invoice secret"]["decrypted_file"])
        assert b"older" in z.read(by_subject["invoice old"]["decrypted_file"])
        assert by_subject["invoice for bob"]["decryption"] == "undecryptable"
        assert by_subject["invoice secret"]["decryption"] == "decrypted"
        assert by_subject["invoice signed"]["verification"] == "pass"
        assert by_subject["invoice plain"]["decryption"] == "not-encrypted"
        assert [r["subject"] for r in rows] == [m["subject"] for m in manifest["messages"]]
        assert manifest["summary"]["undecryptable"] == 1
        assert b"undecryptable: 1" in z.read("summary.txt")
    entries = [e for e in world.store.audit_entries(before) if e.action == "archive.export"]
    assert len(entries) == 1
    assert entries[0].actor == "counsel"
    assert entries[0].detail["manifest_sha256"] == result.manifest_sha256
    assert entries[0].detail["count"] == 5 and entries[0].detail["query"] == QUERY


def test_mbox_export_rereads_with_mailbox(
    world: World, indexed: tuple[LocalArchive, dict[str, bytes]]
) -> None:
    archive, _ = indexed
    out = world.root / "case.mbox"
    result = export_matches(archive, world.processor, QUERY, out, actor="t", form="both")
    manifest = json.loads((world.root / "case.mbox.manifest.json").read_text())
    assert sha((world.root / "case.mbox.manifest.json").read_bytes()) == result.manifest_sha256
    originals = mailbox.mbox(out)
    decrypted = mailbox.mbox(world.root / "case.decrypted.mbox")
    keys, dkeys = list(originals.keys()), list(decrypted.keys())
    assert len(keys) == len(dkeys) == result.count == 5
    for row, key, dkey in zip(manifest["messages"], keys, dkeys, strict=True):
        assert sha(originals.get_bytes(key)) == row["original_file_sha256"]
        assert sha(decrypted.get_bytes(dkey)) == row["decrypted_file_sha256"]
        assert originals[key]["Subject"] == row["subject"]
    assert (world.root / "case.mbox.manifest.csv").exists()
    assert (world.root / "case.mbox.summary.txt").exists()


def test_altered_original_stops_the_export(
    world: World, indexed: tuple[LocalArchive, dict[str, bytes]]
) -> None:
    archive, originals = indexed
    digest = sha(originals["invoice plain"])
    path = archive.originals.root / digest[:2] / digest[2:]
    path.write_bytes(b"tampered")
    out = world.root / "x.zip"
    with pytest.raises(ArchiveError, match="altered"):
        export_matches(archive, world.processor, QUERY, out, actor="t")
    assert not out.exists()
    assert [p.name for p in world.root.iterdir() if "partial" in p.name] == []


def test_injected_enospc_leaves_nothing(
    world: World, indexed: tuple[LocalArchive, dict[str, bytes]]
) -> None:
    archive, _ = indexed
    before = world.store.audit_head()[0]

    class Full(io.RawIOBase):
        def __init__(self, path: Path) -> None:
            self.inner = open(path, "wb")
            self.written = 0

        def writable(self) -> bool:
            return True

        def write(self, b: bytes) -> int:  # type: ignore[override]
            if self.written + len(b) > 2000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(b)
            return self.inner.write(b)

        def fileno(self) -> int:
            return self.inner.fileno()

        def close(self) -> None:
            self.inner.close()
            super().close()

    def opener(path: Path) -> IO[bytes]:
        return Full(path)  # type: ignore[return-value]

    out = world.root / "full.zip"
    with pytest.raises(ArchiveError, match=r"ENOSPC.*nothing was written"):
        export_matches(archive, world.processor, QUERY, out, actor="t", opener=opener)
    assert [p.name for p in world.root.iterdir() if "full" in p.name] == []
    failed = [e for e in world.store.audit_entries(before) if e.action == "archive.export.failed"]
    assert len(failed) == 1 and "ENOSPC" in failed[0].detail["error"]


@contextlib.contextmanager
def tiny_tmpfs(path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs at ``path``; skipped (also in CI) where mounting is not allowed
    (not root, or a container without CAP_SYS_ADMIN): the injected-ENOSPC test above
    covers the same code path everywhere."""
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace')}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


@pytest.mark.parametrize("suffix", [".zip", ".mbox"])
def test_real_full_disk(
    world: World, indexed: tuple[LocalArchive, dict[str, bytes]], openssl: str, suffix: str
) -> None:
    archive, _ = indexed
    # enough mail that the export cannot fit into 64 KiB
    md = mailbox.Maildir(world.root / "mail", create=False)
    for n in range(12):
        md.add(plain(f"invoice big {n}", os.urandom(9000).hex()))
    index_pass(archive, world.processor, maildir_folders(world.root / "mail", ALICE))
    with tiny_tmpfs(world.root / "disk") as disk:
        out = disk / f"export{suffix}"
        with pytest.raises(ArchiveError, match=r"no space left on device \(ENOSPC\)"):
            export_matches(archive, world.processor, "subject:invoice", out, actor="t")
        assert list(disk.iterdir()) == []  # no archive, no side files, no temporary files
        small = disk / f"small{suffix}"
        export_matches(archive, world.processor, "subject:secret", small, actor="t")
        assert small.exists()  # the disk works; it was only full


def test_bad_output_names(world: World, indexed: tuple[LocalArchive, dict[str, bytes]]) -> None:
    archive, _ = indexed
    with pytest.raises(ArchiveError, match=r"\.zip or \.mbox"):
        export_matches(archive, world.processor, "", world.root / "x.tar", actor="t")
    with pytest.raises(ArchiveError, match="does not exist"):
        export_matches(archive, world.processor, "", world.root / "no" / "x.zip", actor="t")


def test_planted_link_at_the_temporary_name_is_not_followed(
    world: World, indexed: tuple[LocalArchive, dict[str, bytes]]
) -> None:
    """The plaintext export never writes through a link someone left in the output
    directory; the export fails cleanly instead."""
    archive, _ = indexed
    victim = world.root / "victim.txt"
    victim.write_bytes(b"untouched")
    out = world.root / "case.zip"
    planted = out.with_name(f".{out.name}.partial-{os.getpid()}")
    planted.symlink_to(victim)
    with pytest.raises(ArchiveError, match="nothing was written"):
        export_matches(archive, world.processor, QUERY, out, actor="t", form="both")
    assert victim.read_bytes() == b"untouched"
    assert not out.exists()
