"""The archive's operations as the command line and the service run them: an index
pass over configured or given sources, an audited search, an audited export.

Everything here is blocking. Every search and every export writes one audit entry
(who, the query, how many messages, and for an export the manifest's SHA-256); every
index pass one per owner (see :mod:`.indexing`).
"""

from __future__ import annotations

import getpass
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from smimeproxy.archive import ArchiveError
from smimeproxy.archive.export import ExportResult, Form, Opener, Wrap, export
from smimeproxy.archive.index import Hit, WhooshIndex
from smimeproxy.archive.indexing import Indexer, IndexReport, Progress
from smimeproxy.archive.originals import Originals
from smimeproxy.archive.sources import (
    IMAPAccount,
    IMAPSource,
    Mailbox,
    connector,
    maildir_folders,
    mbox_file,
)
from smimeproxy.archive.state import IndexState
from smimeproxy.config import ArchiveConfig, ArchiveSource
from smimeproxy.keystore import SyncStore
from smimeproxy.processing import MessageProcessor
from smimeproxy.smime.opener import OpenedMessage


def default_actor() -> str:
    """Who runs the command: the OS user (``--actor`` overrides it)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@dataclass
class LocalArchive:
    """The index, its state and the stored originals under one directory."""

    directory: Path
    index: WhooshIndex
    state: IndexState
    originals: Originals

    @classmethod
    def open(cls, directory: Path, *, create: bool = True) -> LocalArchive:
        index = WhooshIndex(Path(directory), create=create)
        return cls(Path(directory), index, IndexState(directory), Originals(directory))

    def close(self) -> None:
        self.state.close()
        self.index.close()


# -- sources ---------------------------------------------------------------------------


def imap_accounts(store: SyncStore) -> list[IMAPAccount]:
    """Every user of the store: login name (the first, else the address) and owner."""
    return [
        IMAPAccount(u.login_names[0] if u.login_names else u.address, u.address)
        for u in store.users()
    ]


def imap_mailboxes(source: IMAPSource) -> Iterator[Mailbox]:
    for account in source.accounts:
        yield from source.folders(account)


def read_secret(path: Path) -> str:
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ArchiveError(f"cannot read {path}: {e.strerror}") from None
    if not lines or not lines[0]:
        raise ArchiveError(f"{path} is empty")
    return lines[0]


def configured_mailboxes(sources: Sequence[ArchiveSource], store: SyncStore) -> Iterator[Mailbox]:
    """Mailboxes of every ``[[archive.sources]]`` entry, in order (IMAP: all users)."""
    for s in sources:
        if s.kind == "maildir":
            assert s.path is not None and s.owner is not None
            yield from maildir_folders(s.path, s.owner)
        elif s.kind == "mbox":
            assert s.path is not None and s.owner is not None
            yield mbox_file(s.path, s.owner)
        else:
            assert s.upstream is not None and s.master_password_file is not None
            yield from imap_mailboxes(
                IMAPSource(
                    connector(s.upstream),
                    imap_accounts(store),
                    name=s.upstream,
                    master_user=s.master_user,
                    master_password=read_secret(s.master_password_file),
                )
            )


def index_pass(
    archive: LocalArchive,
    processor: MessageProcessor,
    mailboxes: Iterable[Mailbox],
    *,
    actor: str = "archive",
    progress: Progress | None = None,
) -> IndexReport:
    return Indexer(processor, archive.index, archive.state, archive.originals, actor=actor).run(
        mailboxes, progress
    )


def configured_pass(
    config: ArchiveConfig, processor: MessageProcessor, *, actor: str = "archive"
) -> IndexReport:
    """One pass over the configured sources (what the service's periodic job runs)."""
    archive = LocalArchive.open(config.index_dir)
    try:
        return index_pass(
            archive,
            processor,
            configured_mailboxes(config.sources, processor.store),
            actor=actor,
        )
    finally:
        archive.close()


# -- search and export -----------------------------------------------------------------


def search(
    archive: LocalArchive,
    store: SyncStore,
    query: str,
    *,
    actor: str,
    limit: int | None = None,
) -> list[Hit]:
    """The messages matching ``query`` (oldest first); audited."""
    hits = archive.index.search(query, limit=limit)
    store.audit(actor, "archive.search", query[:500], {"query": query, "count": len(hits)})
    return hits


def export_matches(
    archive: LocalArchive,
    processor: MessageProcessor,
    query: str,
    out: Path,
    *,
    actor: str,
    form: Form = "original",
    opener: Opener | None = None,
    wrap: Wrap | None = None,
) -> ExportResult:
    """Export every match of ``query`` to ``out``; audited with the manifest's hash
    (a failed export is audited too, with its error)."""
    hits = archive.index.search(query)

    def decrypt(data: bytes, owner: str) -> OpenedMessage:
        return processor.open_for(data, [owner], harvest=False, stored=True)

    kwargs = {"opener": opener} if opener is not None else {}
    detail = {"query": query, "count": len(hits), "form": form, "out": str(out)}
    try:
        result = export(
            hits,
            archive.originals,
            out,
            form=form,
            decrypt=decrypt,
            query=query,
            wrap=wrap,
            **kwargs,
        )
    except ArchiveError as e:
        processor.store.audit(
            actor, "archive.export.failed", query[:500], {**detail, "error": str(e)}
        )
        raise
    processor.store.audit(
        actor,
        "archive.export",
        query[:500],
        {**detail, "manifest_sha256": result.manifest_sha256},
    )
    return result
