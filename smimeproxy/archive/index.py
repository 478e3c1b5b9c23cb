"""The search index behind a small interface, and its whoosh implementation.

:class:`ArchiveIndex` is what the indexing pass, search and export use; a deployment
of cluster size can implement it over OpenSearch without touching them. The whoosh
backend keeps everything in one directory, created owner-only (0700): the index holds
plaintext-derived terms of decrypted mail.

Only metadata fields are stored (addresses, subject, date, folder, owner, UID, hashes,
S/MIME state, attachment names); body text is indexed, never stored, so the index
cannot be read back as the mail itself.

Not guaranteed: whoosh allows one writer at a time; a second concurrent writer gets
:class:`~smimeproxy.archive.ArchiveError` ("busy") instead of waiting. Whoosh is a pure
Python engine: fine to some millions of messages on one host, not beyond.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from whoosh import fields, index
from whoosh.analysis import StandardAnalyzer
from whoosh.writing import IndexingError, LockError

from smimeproxy.archive import ArchiveError
from smimeproxy.archive.extract import ExtractedMessage
from smimeproxy.archive.query import parse

#: segments above which a pass ends by merging them (each commit adds one)
MAX_SEGMENTS = 4


@dataclass(frozen=True)
class IndexedMessage:
    """One message as the index holds it: where it came from plus the extracted fields."""

    docid: str  # unique and stable: see sources.SourceMessage.docid
    mailbox: str  # the docid prefix shared by one mailbox (for UIDVALIDITY resets)
    owner: str
    folder: str
    uid: str  # IMAP UID, Maildir key or mbox position
    sha256: str  # of the original stored bytes
    size: int
    fields: ExtractedMessage


@dataclass(frozen=True)
class Hit:
    """A search result: the stored metadata of one message."""

    docid: str
    owner: str
    folder: str
    uid: str
    sha256: str
    message_id: str
    sender: str
    to: str
    cc: str
    subject: str
    date: datetime.datetime | None
    attachments: str
    encrypted: bool
    decrypted: bool
    signed: bool
    verified: bool
    signer: str
    smime: str
    malformed: bool
    size: int

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["date"] = self.date.isoformat() if self.date else None
        return out


class IndexWriter(Protocol):
    def add(self, message: IndexedMessage) -> None:
        """Add a message whose ``docid`` is not in the index (see ``known``)."""
        ...

    def delete_mailbox(self, mailbox: str) -> int: ...


class ArchiveIndex(Protocol):
    """What the archive needs of a search engine."""

    @contextmanager
    def writer(self) -> Iterator[IndexWriter]:
        """Changes made through the writer are visible after the block ends without
        an exception (all of them), and none of them otherwise."""
        ...

    def search(self, query: str, limit: int | None = None) -> list[Hit]: ...

    def count(self) -> int: ...

    def known(self, docids: Iterable[str]) -> dict[str, str]:
        """Which of ``docids`` are in the index, with the SHA-256 of their original."""
        ...

    def maintain(self) -> None:
        """Called after a pass that changed the index (merge segments, refresh)."""
        ...


def schema() -> fields.Schema:
    analyzer = StandardAnalyzer(stoplist=None, minsize=1)
    text = {"analyzer": analyzer, "stored": True}
    return fields.Schema(
        docid=fields.ID(unique=True, stored=True),
        mailbox=fields.ID(),
        owner=fields.KEYWORD(stored=True, lowercase=True),
        folder=fields.ID(stored=True),
        uid=fields.ID(stored=True),
        sha256=fields.ID(stored=True),
        size=fields.NUMERIC(stored=True),
        messageid=fields.ID(stored=True),
        **{"from": fields.TEXT(**text)},
        to=fields.TEXT(**text),
        cc=fields.TEXT(**text),
        subject=fields.TEXT(**text),
        date=fields.DATETIME(stored=True, sortable=True),
        body=fields.TEXT(analyzer=analyzer, stored=False),
        attachment=fields.TEXT(**text),
        signer=fields.TEXT(**text),
        smime=fields.ID(stored=True),
        encrypted=fields.BOOLEAN(stored=True),
        decrypted=fields.BOOLEAN(stored=True),
        signed=fields.BOOLEAN(stored=True),
        verified=fields.BOOLEAN(stored=True),
        malformed=fields.BOOLEAN(stored=True),
    )


def _document(m: IndexedMessage) -> dict[str, Any]:
    f = m.fields
    doc: dict[str, Any] = {
        "docid": m.docid,
        "mailbox": m.mailbox,
        "owner": m.owner,
        "folder": m.folder,
        "uid": m.uid,
        "sha256": m.sha256,
        "size": m.size,
        "messageid": f.message_id,
        "from": f.sender,
        "to": f.to,
        "cc": f.cc,
        "subject": f.subject,
        "body": f.body,
        "attachment": " ".join(f.attachments),
        "signer": f.signer,
        "smime": f.smime,
        "encrypted": f.encrypted,
        "decrypted": f.decrypted,
        "signed": f.signed,
        "verified": f.verified,
        "malformed": f.malformed,
    }
    if f.date is not None:
        doc["date"] = f.date
    return doc


def _hit(stored: dict[str, Any]) -> Hit:
    return Hit(
        docid=stored.get("docid", ""),
        owner=stored.get("owner", ""),
        folder=stored.get("folder", ""),
        uid=stored.get("uid", ""),
        sha256=stored.get("sha256", ""),
        message_id=stored.get("messageid", ""),
        sender=stored.get("from", ""),
        to=stored.get("to", ""),
        cc=stored.get("cc", ""),
        subject=stored.get("subject", ""),
        date=stored.get("date"),
        attachments=stored.get("attachment", ""),
        encrypted=bool(stored.get("encrypted")),
        decrypted=bool(stored.get("decrypted")),
        signed=bool(stored.get("signed")),
        verified=bool(stored.get("verified")),
        signer=stored.get("signer", ""),
        smime=stored.get("smime", ""),
        malformed=bool(stored.get("malformed")),
        size=int(stored.get("size") or 0),
    )


def private_directory(path: Path) -> Path:
    """Create ``path`` (and missing parents) owner-only; tighten it if it exists."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    except OSError as e:
        raise ArchiveError(f"cannot create {path}: {e.strerror}") from None
    return path


class _WhooshWriter:
    def __init__(self, writer: Any):
        self._w = writer

    def add(self, message: IndexedMessage) -> None:
        # add, not update: whoosh's update opens a reader per call and slows down as
        # the index grows (measured: 10x at 10,000 documents); the indexing pass asks
        # ``known`` first instead
        self._w.add_document(**_document(message))

    def delete_mailbox(self, mailbox: str) -> int:
        return int(self._w.delete_by_term("mailbox", mailbox))


class WhooshIndex:
    """:class:`ArchiveIndex` over a whoosh index in ``directory`` (created 0700)."""

    def __init__(self, directory: Path, *, create: bool = True):
        self.directory = Path(directory)
        if not self.directory.exists() and not create:
            raise ArchiveError(f"no archive index at {self.directory}: run `archive index`")
        private_directory(self.directory)
        self._searcher: Any = None
        try:
            if index.exists_in(str(self.directory)):
                self._ix = index.open_dir(str(self.directory))
            else:
                self._ix = index.create_in(str(self.directory), schema())
        except (OSError, index.IndexError, ValueError) as e:
            raise ArchiveError(f"cannot open the archive index {self.directory}: {e}") from None

    @contextmanager
    def writer(self) -> Iterator[IndexWriter]:
        try:
            w = self._ix.writer(limitmb=128)
        except LockError:
            raise ArchiveError(
                f"the archive index {self.directory} is busy (another index run?)"
            ) from None
        try:
            yield _WhooshWriter(w)
        except BaseException:
            w.cancel()
            raise
        try:
            w.commit()
        except (OSError, IndexingError) as e:
            raise ArchiveError(f"cannot write the archive index: {e}") from None

    def search(self, query: str, limit: int | None = None) -> list[Hit]:
        """Matches of ``query``, oldest first (the same date: no particular order);
        messages without a date come first."""
        q = parse(query, self._ix.schema)
        results = self._current().search(q, limit=limit, sortedby="date")
        return [_hit(dict(r)) for r in results]

    def count(self) -> int:
        return int(self._current().doc_count())

    def known(self, docids: Iterable[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        s = self._current()
        for docid in docids:
            number = s.document_number(docid=docid)
            if number is not None:
                out[docid] = str(s.stored_fields(number).get("sha256", ""))
        return out

    def _current(self) -> Any:
        """A searcher kept open between searches (opening one costs milliseconds per
        segment), refreshed when a commit made it stale."""
        if self._searcher is None:
            self._searcher = self._ix.searcher()
        else:
            self._searcher = self._searcher.refresh()
        return self._searcher

    def segments(self) -> int:
        return len(self._ix._segments())

    def maintain(self) -> None:
        if self.segments() > MAX_SEGMENTS:
            self.optimize()

    def optimize(self) -> None:
        """Merge every segment into one (searches over one segment are 2-4 times
        faster; the cost is rewriting the index, so the pass does it only when there
        are more than :data:`MAX_SEGMENTS`)."""
        try:
            self._ix.optimize()
        except LockError:
            raise ArchiveError(f"the archive index {self.directory} is busy") from None

    def close(self) -> None:
        if self._searcher is not None:
            self._searcher.close()
            self._searcher = None
        self._ix.close()


def open_index(directory: Path, *, create: bool = True) -> WhooshIndex:
    return WhooshIndex(directory, create=create)


__all__: Sequence[str] = (
    "ArchiveIndex",
    "Hit",
    "IndexWriter",
    "IndexedMessage",
    "WhooshIndex",
    "open_index",
    "private_directory",
    "schema",
)
