"""What the archive has indexed already, so that runs are incremental.

A message is known by ``(mailbox, UIDVALIDITY, UID)``: for IMAP the server's values;
for a Maildir the folder's path and the message's unique file name (flags and the
``new``/``cur`` move do not change it); for an mbox file its path and the SHA-256 of the
message with an occurrence number (positions shift when other messages are deleted).

Resume without duplicates: the indexing pass commits the index first and this state
second, batch by batch. After a crash between the two, the next pass finds the
batch's documents in the index by their unique id (``ArchiveIndex.known``) and records
them here instead of indexing them again, so nothing is counted twice.

A changed UIDVALIDITY (RFC 9051 section 2.3.1.1: the UIDs of the mailbox no longer
name the same messages) forgets the mailbox here; the pass drops its documents from
the index and indexes it again.

The state is a SQLite file in the index directory (owner-only, like the index); it is
local to the archive host, which is the only node that indexes.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from smimeproxy.archive import ArchiveError

STATE_FILE = "state.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mailboxes (
    mailbox TEXT PRIMARY KEY,
    uidvalidity TEXT NOT NULL,
    owner TEXT NOT NULL,
    folder TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    mailbox TEXT NOT NULL,
    uid TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (mailbox, uid)
);
"""


class IndexState:
    """The bookkeeping of indexed messages (blocking; one instance per thread)."""

    def __init__(self, directory: Path):
        path = Path(directory) / STATE_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            self._db = sqlite3.connect(path, isolation_level=None)
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise ArchiveError(f"cannot open the archive state {path}: {e}") from None
        self.path = path

    def uidvalidity(self, mailbox: str) -> str | None:
        row = self._db.execute(
            "SELECT uidvalidity FROM mailboxes WHERE mailbox = ?", (mailbox,)
        ).fetchone()
        return None if row is None else str(row[0])

    def start_mailbox(self, mailbox: str, uidvalidity: str, owner: str, folder: str) -> bool:
        """Record ``mailbox`` with ``uidvalidity``. True when it was known with another
        UIDVALIDITY: its messages were forgotten and the caller must drop them from the
        index (before indexing it again)."""
        known = self.uidvalidity(mailbox)
        try:
            with self._tx():
                if known is not None and known != uidvalidity:
                    self._db.execute("DELETE FROM messages WHERE mailbox = ?", (mailbox,))
                self._db.execute(
                    "INSERT INTO mailboxes (mailbox, uidvalidity, owner, folder)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (mailbox) DO UPDATE SET"
                    " uidvalidity = excluded.uidvalidity",
                    (mailbox, uidvalidity, owner, folder),
                )
        except sqlite3.Error as e:
            raise ArchiveError(f"cannot update the archive state: {e}") from None
        return known is not None and known != uidvalidity

    def seen(self, mailbox: str) -> set[str]:
        """UIDs of ``mailbox`` already indexed."""
        rows = self._db.execute("SELECT uid FROM messages WHERE mailbox = ?", (mailbox,))
        return {str(r[0]) for r in rows}

    def mark(self, entries: Iterable[tuple[str, str, str]]) -> None:
        """Record ``(mailbox, uid, sha256)`` as indexed, all in one transaction."""
        try:
            with self._tx():
                self._db.executemany(
                    "INSERT OR REPLACE INTO messages (mailbox, uid, sha256) VALUES (?, ?, ?)",
                    list(entries),
                )
        except sqlite3.Error as e:
            raise ArchiveError(f"cannot update the archive state: {e}") from None

    def totals(self) -> list[tuple[str, str, int]]:
        """``(owner, folder, messages)`` per known mailbox, for ``archive status``."""
        rows = self._db.execute(
            "SELECT b.owner, b.folder, COUNT(m.uid) FROM mailboxes b"
            " LEFT JOIN messages m ON m.mailbox = b.mailbox"
            " GROUP BY b.mailbox ORDER BY b.owner, b.folder"
        )
        return [(str(o), str(f), int(n)) for o, f, n in rows]

    def close(self) -> None:
        self._db.close()

    def _tx(self) -> sqlite3.Connection:
        self._db.execute("BEGIN")
        return _Commit(self._db)  # type: ignore[return-value]


class _Commit:
    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self) -> sqlite3.Connection:
        return self._db

    def __exit__(self, kind: object, value: object, tb: object) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")
