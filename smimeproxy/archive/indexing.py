"""One index pass: read every mailbox, open each new message with its owner's whole key
history, extract its fields, index them, keep the original.

Rules (issue 6):

* each message is decrypted with the keys of *its owner only* (every key the owner
  ever had, so mail from before any number of rotations stays readable); the archive
  role may use every owner's keys, and each pass writes one audit entry per owner
  with its counts;
* a message that cannot be decrypted is indexed by its outer headers and marked
  ``decrypted=False``; a corrupt one is indexed as far as it can be read and marked
  ``malformed``: neither stops the run;
* a mailbox deleted mid-run is noted and skipped; an upstream that disconnects ends
  that source with an error after committing what was done, and the next run resumes
  without duplicates (see :mod:`.state`).

The pass is blocking (CMS work, whoosh, SQLite): the service runs it in a thread pool.
Keys and the path validator are fetched through :class:`MessageProcessor` once per
owner per pass, not per message. The footer is left out of the indexed text (it is
ours, not the sender's).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.logger import Logger

from smimeproxy.archive import ArchiveError
from smimeproxy.archive.extract import ExtractedMessage, extract
from smimeproxy.archive.index import ArchiveIndex, IndexedMessage
from smimeproxy.archive.originals import Originals, sha256_hex
from smimeproxy.archive.sources import Mailbox, MailboxGone
from smimeproxy.archive.state import IndexState
from smimeproxy.bugs import log_bug
from smimeproxy.errors import SMIMEProxyError, UpstreamError
from smimeproxy.processing import MessageProcessor
from smimeproxy.smime.opener import open_message

#: messages indexed per commit: the most a crash re-does (whoosh merges segments on
#: each commit; fewer, larger commits are faster)
BATCH = 1000
#: whether a message may hold S/MIME at all (else it is only parsed, never opened)
_SMIME_HINT = re.compile(rb"pkcs7|\.p7[msz]\b", re.IGNORECASE)

#: wraps a mailbox's message stream (the command line draws a progress bar with it):
#: ``(stream, total, label) -> stream``
Progress = Callable[
    [Iterator[tuple[str, bytes | None]], int, str], Iterable[tuple[str, bytes | None]]
]


@dataclass
class OwnerCounts:
    """What one pass did for one owner (the audit entry's detail)."""

    indexed: int = 0
    encrypted: int = 0
    decrypted: int = 0
    undecryptable: int = 0
    signed: int = 0
    verified: int = 0
    malformed: int = 0
    vanished: int = 0
    mailboxes: int = 0
    reindexed_mailboxes: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class IndexReport:
    """The result of a pass: counts per owner and the errors that ended a mailbox or
    a source early (the run itself went on)."""

    owners: dict[str, OwnerCounts] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    decrypt_seconds: float = 0.0  # opening: decrypting and verifying
    index_seconds: float = 0.0  # reading, extracting, indexing, storing, committing
    maintain_seconds: float = 0.0  # merging index segments at the end

    @property
    def indexed(self) -> int:
        return sum(c.indexed for c in self.owners.values())

    def total(self, name: str) -> int:
        return sum(getattr(c, name) for c in self.owners.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "indexed": self.indexed,
            "owners": {o: c.as_dict() for o, c in sorted(self.owners.items())},
            "errors": list(self.errors),
        }


class Indexer:
    """Indexes mailboxes into ``index``, remembering progress in ``state``."""

    _log = Logger()

    def __init__(
        self,
        processor: MessageProcessor,
        index: ArchiveIndex,
        state: IndexState,
        originals: Originals,
        *,
        actor: str = "archive",
        batch: int = BATCH,
        clock: Callable[[], float] | None = None,
    ):
        import time

        self.processor = processor
        self.index = index
        self.state = state
        self.originals = originals
        self.actor = actor
        self.batch = batch
        self._clock = clock or time.perf_counter
        self._opening = 0.0  # seconds spent in open_message (decrypt + verify)
        self._options = replace(processor.open_options(stored=True), footer=False)

    # -- one message ------------------------------------------------------------------
    def fields(self, owner: str, data: bytes) -> ExtractedMessage:
        """The index fields of ``data`` opened with ``owner``'s keys. Never raises."""
        try:
            if not _SMIME_HINT.search(data):
                return extract(data)
            # the processor keeps keys and trust under the store generation: a rotation
            # or revocation made during a long run is used from the next message on
            with self.processor.batch():
                keys = self.processor.keys_for([owner])
                validator = self.processor.validator()
            t0 = self._clock()
            opened = open_message(data, keys=keys, validator=validator, options=self._options)
            self._opening += self._clock() - t0
            return extract(opened.data, opened.status)
        except Exception as e:  # one bad message must never stop an archive run
            log_bug(self._log, "archive.extract.failed owner={owner}", e, owner=owner)
            try:
                fields = extract(data)
            except Exception:
                fields = extract(b"")
            return ExtractedMessage(**{**fields.__dict__, "malformed": True})

    # -- a pass -----------------------------------------------------------------------
    def run(self, mailboxes: Iterable[Mailbox], progress: Progress | None = None) -> IndexReport:
        """Index every new message of ``mailboxes``; audit per owner at the end (also
        when a source failed part way)."""
        report = IndexReport()
        try:
            iterator = iter(mailboxes)
            while True:
                try:
                    box = next(iterator)
                except StopIteration:
                    break
                except (UpstreamError, ArchiveError) as e:
                    report.errors.append(str(e))
                    self._log.warn("archive.source.failed error={error}", error=str(e))
                    break
                try:
                    self._mailbox(box, report, progress)
                except MailboxGone as e:
                    report.errors.append(str(e))
                    self._log.warn("archive.mailbox.gone mailbox={mailbox}", mailbox=box.key)
                except UpstreamError as e:
                    report.errors.append(str(e))
                    self._log.warn("archive.source.failed error={error}", error=str(e))
                    close = getattr(iterator, "close", None)
                    if close is not None:
                        close()
                    break
        finally:
            self._audit(report)
        if report.indexed:
            started = self._clock()
            self.index.maintain()
            report.maintain_seconds = self._clock() - started
        return report

    def _mailbox(self, box: Mailbox, report: IndexReport, progress: Progress | None) -> None:
        counts = report.owners.setdefault(box.owner, OwnerCounts())
        counts.mailboxes += 1
        if self.state.start_mailbox(box.key, box.uidvalidity, box.owner, box.folder):
            counts.reindexed_mailboxes += 1
            with self.index.writer() as w:
                w.delete_mailbox(box.key)
        pending = box.pending(self.state.seen(box.key))
        if not pending:
            return
        # committed to the index but not to the state (a crash between the two):
        # record them instead of indexing them twice
        ids = {_docid(box, uid): uid for uid in pending}
        known = self.index.known(ids)
        if known:
            self.state.mark((box.key, ids[d], sha) for d, sha in known.items())
            done = {ids[d] for d in known}
            pending = [uid for uid in pending if uid not in done]
        stream: Iterable[tuple[str, bytes | None]] = box.fetch(pending)
        if progress is not None:
            stream = progress(iter(stream), len(pending), f"{box.owner} {box.folder}")
        fetched = iter(stream)
        while self._batch(box, fetched, counts, report):
            pass

    def _batch(
        self,
        box: Mailbox,
        fetched: Iterator[tuple[str, bytes | None]],
        counts: OwnerCounts,
        report: IndexReport,
    ) -> bool:
        """Index up to ``self.batch`` messages from ``fetched`` in one commit; False
        when the stream is exhausted."""
        marks: list[tuple[str, str, str]] = []
        failure: BaseException | None = None
        started = self._clock()
        decrypting = 0.0
        more = True
        with self.index.writer() as w:
            for _ in range(self.batch):
                try:
                    uid, data = next(fetched)
                except StopIteration:
                    more = False
                    break
                except (UpstreamError, MailboxGone) as e:
                    failure = e  # commit what was done, then report it
                    break
                if data is None:
                    counts.vanished += 1
                    continue
                before = self._opening
                fields = self.fields(box.owner, data)
                decrypting += self._opening - before
                digest = self.originals.put(data, sha256_hex(data))
                w.add(
                    IndexedMessage(
                        docid=_docid(box, uid),
                        mailbox=box.key,
                        owner=box.owner,
                        folder=box.folder,
                        uid=uid,
                        sha256=digest,
                        size=len(data),
                        fields=fields,
                    )
                )
                marks.append((box.key, uid, digest))
                _count(counts, fields)
        self.state.mark(marks)
        report.decrypt_seconds += decrypting
        report.index_seconds += self._clock() - started - decrypting
        if failure is not None:
            raise failure
        return more

    def _audit(self, report: IndexReport) -> None:
        for owner, counts in sorted(report.owners.items()):
            try:
                self.processor.store.audit(self.actor, "archive.index", owner, counts.as_dict())
            except SMIMEProxyError as e:
                report.errors.append(f"cannot write the audit entry for {owner}: {e}")


def _docid(box: Mailbox, uid: str) -> str:
    """Unique and stable: the mailbox, its UIDVALIDITY and the UID."""
    return f"{box.key}\x1f{box.uidvalidity}\x1f{uid}"


def _count(counts: OwnerCounts, fields: ExtractedMessage) -> None:
    counts.indexed += 1
    counts.encrypted += fields.encrypted
    counts.decrypted += fields.decrypted
    counts.undecryptable += fields.encrypted and not fields.decrypted
    counts.signed += fields.signed
    counts.verified += fields.verified
    counts.malformed += fields.malformed
