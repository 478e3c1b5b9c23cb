"""``smimeproxy archive index|search|export|status``: eDiscovery over the archive index.

Every search and export is audited in the key store (who: ``--actor``, by default the
OS user; the query; the count; for an export the manifest's SHA-256). An index run
audits each owner whose keys it used, with counts.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from smimeproxy.archive import ArchiveError
from smimeproxy.archive.index import Hit
from smimeproxy.archive.indexing import IndexReport
from smimeproxy.archive.operations import (
    LocalArchive,
    configured_mailboxes,
    default_actor,
    export_matches,
    imap_accounts,
    imap_mailboxes,
    index_pass,
    read_secret,
    search,
)
from smimeproxy.archive.sources import IMAPSource, Mailbox, connector, maildir_folders, mbox_file
from smimeproxy.commands.common import IO, print_json, progress, require_config, table
from smimeproxy.config import ArchiveConfig, Config
from smimeproxy.errors import ConfigError
from smimeproxy.processing import MessageProcessor, open_configured_store

INDEX_EXIT_STATUS = """\
exit status:
  0  every source was read completely
  1  indexed what could be read, but a mailbox or source failed (see the errors)
  4  a configuration, key store or index error
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    archive = sub.add_parser(
        "archive",
        help="index, search and export archived mail (eDiscovery)",
        description="Index mailboxes (decrypted with each owner's key history), search "
        "them and export what a search finds with a manifest.",
    )
    asub = archive.add_subparsers(dest="action", required=True, metavar="ACTION")

    ix = asub.add_parser(
        "index",
        help="index new messages of a Maildir, an mbox file, the IMAP server or the config",
        epilog=INDEX_EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = ix.add_mutually_exclusive_group()
    what.add_argument("--maildir", metavar="DIR", type=Path, help="a Maildir (and subfolders)")
    what.add_argument("--mbox", metavar="FILE", type=Path, help="an mbox file")
    what.add_argument(
        "--imap", action="store_true", help="every user of the key store on the IMAP server"
    )
    ix.add_argument("--owner", metavar="ADDRESS", help="whose mail --maildir/--mbox holds")
    ix.add_argument("--folder", metavar="NAME", help="folder name for --mbox (default: stem)")
    ix.add_argument(
        "--upstream", metavar="ENDPOINT", help="IMAP server (default: the config's source)"
    )
    ix.add_argument("--master-user", metavar="NAME", help="Dovecot master user for --imap")
    ix.add_argument("--master-password-file", metavar="FILE", type=Path)
    _common(ix)
    ix.set_defaults(func=_index)

    se = asub.add_parser("search", help="search the index (query language: see --help)")
    se.add_argument("query", metavar="QUERY", help='e.g. "from:carol date:[20260101 to 20260630]"')
    se.add_argument("--limit", type=int, default=None, metavar="N")
    _common(se)
    se.set_defaults(func=_search)

    ex = asub.add_parser("export", help="export the matches of a query with a manifest")
    ex.add_argument("query", metavar="QUERY")
    ex.add_argument("--out", required=True, type=Path, metavar="FILE.zip|FILE.mbox")
    ex.add_argument("--form", choices=("original", "decrypted", "both"), default="original")
    _common(ex)
    ex.set_defaults(func=_export)

    st = asub.add_parser("status", help="what the index holds, per owner and folder")
    _common(st)
    st.set_defaults(func=_status)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--actor", default=None, help="who is recorded in the audit log (default: OS user)"
    )


def _archive_config(config: Config) -> ArchiveConfig:
    if config.archive is None:
        raise ConfigError("the [archive] section is missing", path=str(config.path))
    return config.archive


def _mailboxes(args: argparse.Namespace, config: Config, store: object) -> Iterator[Mailbox]:
    if args.maildir or args.mbox:
        if not args.owner:
            raise ConfigError("--maildir and --mbox need --owner ADDRESS")
        if args.maildir:
            return iter(maildir_folders(args.maildir, args.owner))
        return iter([mbox_file(args.mbox, args.owner, args.folder)])
    archive = _archive_config(config)
    if args.imap:
        imap = [s for s in archive.sources if s.kind == "imap"]
        upstream = args.upstream or (imap[0].upstream if imap else None)
        if upstream is None and config.imap is not None:
            upstream = config.imap.upstream
        master = args.master_user or (imap[0].master_user if imap else None)
        pw_file = args.master_password_file or (imap[0].master_password_file if imap else None)
        if not upstream or not master or pw_file is None:
            raise ConfigError(
                "--imap needs an upstream, a master user and its password file "
                "(options or an [[archive.sources]] entry of kind imap)"
            )
        source = IMAPSource(
            connector(upstream),
            imap_accounts(store),  # type: ignore[arg-type]
            name=upstream,
            master_user=master,
            master_password=read_secret(pw_file),
        )
        return imap_mailboxes(source)
    if not archive.sources:
        raise ConfigError("give --maildir, --mbox or --imap, or list [[archive.sources]]")
    return configured_mailboxes(archive.sources, store)  # type: ignore[arg-type]


def _report_rows(report: IndexReport) -> list[list[object]]:
    return [
        [o, c.indexed, c.encrypted, c.decrypted, c.undecryptable, c.verified, c.malformed,
         c.vanished, c.mailboxes]
        for o, c in sorted(report.owners.items())
    ]  # fmt: skip


def _index(args: argparse.Namespace, io: IO) -> int:
    config = require_config(args)
    archive_cfg = _archive_config(config)
    store = open_configured_store(config)
    try:
        processor = MessageProcessor(store, config.smime)
        archive = LocalArchive.open(archive_cfg.index_dir)
        try:
            mailboxes = _mailboxes(args, config, store)
            report = index_pass(
                archive,
                processor,
                mailboxes,
                actor=args.actor or default_actor(),
                progress=lambda stream, total, label: progress(stream, total, label, io.stderr),
            )
        finally:
            archive.close()
    finally:
        store.close()
    if args.json:
        print_json(
            {**report.as_dict(), "decrypt_seconds": round(report.decrypt_seconds, 3)}, io.stdout
        )
    else:
        headers = ["owner", "indexed", "encrypted", "decrypted", "undecryptable", "verified",
                   "malformed", "vanished", "mailboxes"]  # fmt: skip
        io.write(table(_report_rows(report), headers))
        for error in report.errors:
            io.error(error)
    return 1 if report.errors else 0


def _hit_rows(hits: list[Hit]) -> list[list[object]]:
    def state(h: Hit) -> str:
        out = []
        if h.encrypted:
            out.append("decrypted" if h.decrypted else "UNDECRYPTABLE")
        if h.signed:
            out.append("verified" if h.verified else f"signed({h.smime})")
        if h.malformed:
            out.append("malformed")
        return ",".join(out) or "-"

    return [
        [h.date.strftime("%Y-%m-%d %H:%M") if h.date else "", h.owner, h.folder,
         _short(h.sender), _short(h.subject, 50), state(h)]
        for h in hits
    ]  # fmt: skip


def _short(text: str, width: int = 32) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _search(args: argparse.Namespace, io: IO) -> int:
    config = require_config(args)
    archive_cfg = _archive_config(config)
    store = open_configured_store(config)
    try:
        archive = LocalArchive.open(archive_cfg.index_dir, create=False)
        try:
            hits = search(
                archive, store, args.query, actor=args.actor or default_actor(), limit=args.limit
            )
        finally:
            archive.close()
    finally:
        store.close()
    if args.json:
        print_json([h.as_dict() for h in hits], io.stdout)
    else:
        io.write(table(_hit_rows(hits), ["date", "owner", "folder", "from", "subject", "state"]))
        io.write(f"{len(hits)} message(s)\n")
    return 0


def _export(args: argparse.Namespace, io: IO) -> int:
    config = require_config(args)
    archive_cfg = _archive_config(config)
    store = open_configured_store(config)
    try:
        processor = MessageProcessor(store, config.smime)
        archive = LocalArchive.open(archive_cfg.index_dir, create=False)
        try:
            result = export_matches(
                archive,
                processor,
                args.query,
                args.out,
                actor=args.actor or default_actor(),
                form=args.form,
                wrap=lambda hits, total: progress(hits, total, "exporting", io.stderr),
            )
        finally:
            archive.close()
    finally:
        store.close()
    if args.json:
        print_json(
            {**result.summary, "files": [str(f) for f in result.files], "count": result.count},
            io.stdout,
        )
    else:
        for key, value in result.summary.items():
            io.write(f"{key}: {value}\n")
        io.write("files: " + ", ".join(str(f) for f in result.files) + "\n")
    return 0


def _status(args: argparse.Namespace, io: IO) -> int:
    config = require_config(args)
    archive_cfg = _archive_config(config)
    try:
        archive = LocalArchive.open(archive_cfg.index_dir, create=False)
    except ArchiveError:
        if args.json:
            print_json({"index_dir": str(archive_cfg.index_dir), "messages": 0}, io.stdout)
        else:
            io.write(f"no index yet at {archive_cfg.index_dir}\n")
        return 0
    try:
        totals = archive.state.totals()
        documents = archive.index.count()
    finally:
        archive.close()
    if args.json:
        print_json(
            {
                "index_dir": str(archive_cfg.index_dir),
                "messages": documents,
                "mailboxes": [{"owner": o, "folder": f, "messages": n} for o, f, n in totals],
            },
            io.stdout,
        )
    else:
        io.write(f"index: {archive_cfg.index_dir}\nmessages: {documents}\n")
        io.write(table([list(t) for t in totals], ["owner", "folder", "messages"]))
    return 0
