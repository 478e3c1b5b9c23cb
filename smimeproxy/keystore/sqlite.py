"""The embedded backend: one SQLite file, created owner-only, in WAL mode.

Each thread gets its own connection (SQLite connections must not cross threads), so
the async face's thread pool and the command line share one code path. Writers take
the database lock at ``BEGIN IMMEDIATE``, so two writers never deadlock on a lock
upgrade; readers never block writers (WAL).

Not guaranteed: SQLite over a network file system. Several processes on one host may
share the file; several hosts must use PostgreSQL.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from smimeproxy.errors import KeystoreError
from smimeproxy.keystore.schema import Database, Tx

#: Seconds a writer waits for another writer's lock before failing.
BUSY_TIMEOUT = 30.0


def create_private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists, before SQLite opens it,
    so the database is never readable by others, not even for a moment. SQLite gives
    its ``-wal`` and ``-shm`` files the same mode as the database file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as e:
        raise KeystoreError(f"cannot create the key store file {path}: {e.strerror}") from None
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class SQLiteDatabase(Database):
    """A key store in the SQLite file at ``path`` (created owner-only if missing)."""

    dialect = "sqlite"
    blob_type = "BLOB"
    bigint_type = "INTEGER"

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise KeystoreError(f"the directory of the key store {self.path} does not exist")
        create_private_file(self.path)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []

    def describe(self) -> str:
        return f"sqlite:{self.path}"

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(
                    self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=True
                )
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as e:
                raise KeystoreError(f"cannot open the key store {self.path}: {e}") from None
            self._local.conn = conn
            self._connections.append(conn)
        return conn

    @contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Tx]:
        conn = self._connection()
        cursor = conn.cursor()
        try:
            cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        except sqlite3.Error as e:
            raise KeystoreError(f"key store {self.path} is unavailable: {e}") from None
        try:
            yield Tx(cursor, "?", (sqlite3.IntegrityError,))
        except sqlite3.Error as e:
            conn.rollback()
            raise KeystoreError(f"key store {self.path}: {e}") from None
        except BaseException:
            conn.rollback()
            raise
        else:
            try:
                conn.commit()
            except sqlite3.Error as e:
                conn.rollback()
                raise KeystoreError(f"key store {self.path}: commit failed: {e}") from None
        finally:
            cursor.close()

    def lock_for_migration(self, tx: Tx) -> None:
        """Nothing to do: ``BEGIN IMMEDIATE`` already excludes other writers."""

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def close_all(self) -> None:
        """Close every connection this object opened (at shutdown, threads stopped)."""
        for conn in self._connections:
            try:
                conn.close()
            except sqlite3.ProgrammingError:  # pragma: no cover - closed from another thread
                pass
        self._connections.clear()
