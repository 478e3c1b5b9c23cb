"""Export what a search found, with a manifest a court would accept.

Formats: a zip of ``.eml`` files (``original/``, ``decrypted/``, ``manifest.csv``,
``manifest.json``, ``summary.txt`` inside), or an mbox file (``OUT``, with
``OUT.decrypted.mbox`` for ``--form both``) beside ``OUT.manifest.csv``,
``OUT.manifest.json`` and ``OUT.summary.txt``.

Forms: ``original`` (the bytes as the mailbox stored them, re-hashed against the
SHA-256 recorded at indexing time), ``decrypted`` (the message opened with its owner's
whole key history, as the owner's reader sees it, with its status headers and
footer), or ``both``.

The manifest has one row per message: message-id, owner, folder, UID, date, from, to,
subject, the SHA-256 of the original, the name and SHA-256 of each exported file,
and the decryption and verification status. Its own SHA-256 goes into the audit log.

Atomicity: everything is written to temporary files in the destination directory,
flushed and fsynced, then renamed; the archive itself is renamed last. A full disk
(ENOSPC) or any other write error removes the temporary files and raises
:class:`~smimeproxy.archive.ArchiveError` saying what happened: there is never a
half-written archive under the name asked for.

Not guaranteed: an mbox cannot carry a message byte for byte (line ends become LF,
``From`` lines are quoted): the manifest's hash of an mbox entry is of the entry as a
reader gets it back (Python's ``mailbox.mbox.get_bytes``); the zip form is exact.
"""

from __future__ import annotations

import csv
import datetime
import errno
import hashlib
import io
import json
import mailbox as stdmailbox
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from smimeproxy.archive import ArchiveError
from smimeproxy.archive.index import Hit
from smimeproxy.archive.originals import Originals, sha256_hex
from smimeproxy.smime.opener import OpenedMessage

Form = Literal["original", "decrypted", "both"]
FORMS: tuple[str, ...] = ("original", "decrypted", "both")
#: opens a file for writing (tests inject one that fails with ENOSPC)
Opener = Callable[[Path], IO[bytes]]
#: wraps the messages being exported (a progress bar): ``(hits, total) -> hits``
Wrap = Callable[[Iterator[Hit], int], Iterable[Hit]]
#: opens a stored message for its owner: ``(data, owner) -> OpenedMessage``
Decrypt = Callable[[bytes, str], OpenedMessage]

CSV_COLUMNS = (
    "n",
    "message_id",
    "owner",
    "folder",
    "uid",
    "date",
    "from",
    "to",
    "subject",
    "original_sha256",
    "original_file",
    "original_file_sha256",
    "decrypted_file",
    "decrypted_file_sha256",
    "encrypted",
    "decryption",
    "verification",
    "signer",
)


def _open_private(path: Path) -> IO[bytes]:
    """A new owner-only (0600) file at ``path``. Exclusive: an existing file or a link
    planted at the temporary name (the output directory may be shared) is refused,
    never followed or truncated."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    return os.fdopen(fd, "wb")


@dataclass
class ExportResult:
    path: Path
    files: tuple[Path, ...]  # every file written, the archive first
    count: int
    manifest_sha256: str
    summary: dict[str, Any] = field(default_factory=dict)


def _decryption(hit: Hit) -> str:
    if not hit.encrypted:
        return "not-encrypted"
    return "decrypted" if hit.decrypted else "undecryptable"


class _Exporter:
    def __init__(
        self,
        hits: Sequence[Hit],
        originals: Originals,
        form: Form,
        decrypt: Decrypt | None,
        query: str,
        wrap: Wrap | None = None,
    ):
        if form not in FORMS:
            raise ArchiveError(f"--form must be one of {', '.join(FORMS)}, not {form!r}")
        if form != "original" and decrypt is None:
            raise ArchiveError("a decrypted export needs the key store")
        self.hits = hits
        self.originals = originals
        self.form = form
        self.decrypt = decrypt
        self.query = query
        self.wrap = wrap
        self.rows: list[dict[str, Any]] = []

    def messages(self) -> list[tuple[Hit, bytes, bytes | None]]:
        """(hit, original, decrypted or None) for each hit; the original re-hashed."""
        out = []
        hits = self.wrap(iter(self.hits), len(self.hits)) if self.wrap else self.hits
        for hit in hits:
            original = self.originals.get(hit.sha256)
            decrypted = None
            if self.form != "original":
                assert self.decrypt is not None
                decrypted = self.decrypt(original, hit.owner).data
            out.append((hit, original, decrypted))
        return out

    def row(self, n: int, hit: Hit) -> dict[str, Any]:
        return {
            "n": n,
            "message_id": hit.message_id,
            "owner": hit.owner,
            "folder": hit.folder,
            "uid": hit.uid,
            "date": hit.date.isoformat() if hit.date else "",
            "from": hit.sender,
            "to": hit.to,
            "subject": hit.subject,
            "original_sha256": hit.sha256,
            "original_file": "",
            "original_file_sha256": "",
            "decrypted_file": "",
            "decrypted_file_sha256": "",
            "encrypted": hit.encrypted,
            "decryption": _decryption(hit),
            "verification": hit.smime,
            "signer": hit.signer,
        }

    def manifest(self, archive_name: str) -> tuple[bytes, bytes, bytes, dict[str, Any]]:
        """manifest.json, manifest.csv, summary.txt and the summary as a dict."""
        summary = {
            "archive": archive_name,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "query": self.query,
            "form": self.form,
            "messages": len(self.rows),
            "encrypted": sum(1 for r in self.rows if r["encrypted"]),
            "decrypted": sum(1 for r in self.rows if r["decryption"] == "decrypted"),
            "undecryptable": sum(1 for r in self.rows if r["decryption"] == "undecryptable"),
            "verified": sum(1 for r in self.rows if r["verification"] == "pass"),
            "owners": sorted({r["owner"] for r in self.rows}),
        }
        as_json = json.dumps(
            {"summary": summary, "messages": self.rows}, indent=2, sort_keys=True
        ).encode()
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS, lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(self.rows)
        summary["manifest_sha256"] = sha256_hex(as_json)
        lines = [f"{k}: {v}" for k, v in summary.items()]
        return as_json, text.getvalue().encode("utf-8"), ("\n".join(lines) + "\n").encode(), summary

    # -- zip ------------------------------------------------------------------------------
    def write_zip(self, target: IO[bytes], archive_name: str) -> dict[str, Any]:
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as z:
            for n, (hit, original, decrypted) in enumerate(self.messages(), 1):
                row = self.row(n, hit)
                stem = f"{n:06d}-{hit.sha256[:12]}.eml"
                if self.form in ("original", "both"):
                    row["original_file"] = f"original/{stem}"
                    row["original_file_sha256"] = sha256_hex(original)
                    z.writestr(row["original_file"], original)
                if decrypted is not None:
                    row["decrypted_file"] = f"decrypted/{stem}"
                    row["decrypted_file_sha256"] = sha256_hex(decrypted)
                    z.writestr(row["decrypted_file"], decrypted)
                self.rows.append(row)
            as_json, as_csv, text, summary = self.manifest(archive_name)
            z.writestr("manifest.json", as_json)
            z.writestr("manifest.csv", as_csv)
            z.writestr("summary.txt", text)
        return summary


def _mbox_entries(path: Path, messages: Sequence[bytes]) -> list[str]:
    """Write ``messages`` to a new mbox at ``path``; the SHA-256 of each entry as read
    back. The stdlib writes it (its quoting rules are the ones readers undo)."""
    with _open_private(path):
        pass  # owner-only from the start
    box = stdmailbox.mbox(path, create=True)
    try:
        box.lock()
        for data in messages:
            box.add(data)
        box.flush()
        box.unlock()
    finally:
        box.close()
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    back = stdmailbox.mbox(path, create=False)
    try:
        return [hashlib.sha256(back.get_bytes(k)).hexdigest() for k in back.iterkeys()]
    finally:
        back.close()


def _fsync_write(opener: Opener, path: Path, data: bytes) -> None:
    with opener(path) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _describe(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on device (ENOSPC)"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return e.strerror or str(e)


def export(
    hits: Sequence[Hit],
    originals: Originals,
    out: Path,
    *,
    form: Form = "original",
    decrypt: Decrypt | None = None,
    query: str = "",
    opener: Opener = _open_private,
    wrap: Wrap | None = None,
) -> ExportResult:
    """Write ``hits`` to ``out`` (``.zip`` or ``.mbox``, by its suffix).

    Raises ArchiveError when the archive cannot be written completely (the message
    says why, e.g. ENOSPC); nothing is then left under ``out`` or its side files.
    An original that no longer matches its recorded SHA-256 also stops the export.
    """
    out = Path(out).absolute()
    kind = out.suffix.lower()
    if kind not in (".zip", ".mbox"):
        raise ArchiveError(f"--out must end in .zip or .mbox, not {out.name}")
    if not out.parent.is_dir():
        raise ArchiveError(f"the directory {out.parent} does not exist")
    job = _Exporter(hits, originals, form, decrypt, query, wrap)
    tag = f".partial-{os.getpid()}"
    finals: list[Path] = []
    temps: list[Path] = []

    def temp_for(final: Path) -> Path:
        tmp = final.with_name(f".{final.name}{tag}")
        finals.append(final)
        temps.append(tmp)
        return tmp

    try:
        if kind == ".zip":
            tmp = temp_for(out)
            with opener(tmp) as f:
                summary = job.write_zip(f, out.name)
                f.flush()
                os.fsync(f.fileno())
        else:
            messages = job.messages()
            originals_hashes: list[str] = []
            decrypted_hashes: list[str] = []
            decrypted_out = out.with_name(out.stem + ".decrypted.mbox")
            if form in ("original", "both"):
                originals_hashes = _mbox_entries(temp_for(out), [m[1] for m in messages])
            if form != "original":
                target = decrypted_out if form == "both" else out
                decrypted_hashes = _mbox_entries(temp_for(target), [m[2] or b"" for m in messages])
            for n, (hit, _, _) in enumerate(messages, 1):
                row = job.row(n, hit)
                if originals_hashes:
                    row["original_file"] = f"{out.name}#{n}"
                    row["original_file_sha256"] = originals_hashes[n - 1]
                if decrypted_hashes:
                    name = decrypted_out.name if form == "both" else out.name
                    row["decrypted_file"] = f"{name}#{n}"
                    row["decrypted_file_sha256"] = decrypted_hashes[n - 1]
                job.rows.append(row)
            manifest_json, as_csv, text, summary = job.manifest(out.name)
            _fsync_write(
                opener, temp_for(out.with_name(out.name + ".manifest.json")), manifest_json
            )
            _fsync_write(opener, temp_for(out.with_name(out.name + ".manifest.csv")), as_csv)
            _fsync_write(opener, temp_for(out.with_name(out.name + ".summary.txt")), text)
        # the archive is renamed last: if it is there, everything is
        for tmp, final in reversed(list(zip(temps, finals, strict=True))):
            os.replace(tmp, final)
    except OSError as e:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise ArchiveError(
            f"the export to {out} failed: {_describe(e)}; nothing was written"
        ) from None
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    written = tuple(dict.fromkeys([out, *finals]))
    return ExportResult(out, written, len(job.rows), summary["manifest_sha256"], summary)
