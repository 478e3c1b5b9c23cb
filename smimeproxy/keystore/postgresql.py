"""The shared backend: PostgreSQL through psycopg 3, for several nodes on one store.

Each thread holds its own connection (psycopg connections are thread-safe but
serialise their queries; one per pool thread keeps them parallel). Correctness across
nodes rests on the database alone: unique constraints (one current key per user, one
owner per address, one audit entry per sequence number), transactions, and an advisory
lock while migrating. No state is cached in the process.

Not guaranteed: a connection broken mid-transaction fails that call with
:class:`KeystoreError` (the next call reconnects); nothing is retried behind the
caller's back.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from smimeproxy.errors import KeystoreError
from smimeproxy.keystore.schema import Database, Tx

try:
    import psycopg
except ImportError:  # pragma: no cover - depends on the installation
    psycopg = None  # type: ignore[assignment]

#: Advisory lock key held while migrating ("smimeprx" as a 64-bit number).
_MIGRATION_LOCK = 0x736D696D65707278


def redact(url: str) -> str:
    """The URL with any password replaced, for messages."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


class PostgreSQLDatabase(Database):
    """A key store in the PostgreSQL database named by a libpq ``url``."""

    dialect = "postgresql"
    blob_type = "BYTEA"
    bigint_type = "BIGINT"

    def __init__(self, url: str, *, connect_timeout: int = 10):
        if psycopg is None:
            raise KeystoreError(
                "the PostgreSQL key store needs psycopg 3: pip install 'smimeproxy[postgresql]'"
            )
        self.url = url
        self._connect_timeout = connect_timeout
        self._local = threading.local()
        self._connections: list[Any] = []

    def describe(self) -> str:
        return redact(self.url)

    def _connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is not None and conn.closed:
            conn = None
        if conn is None:
            try:
                conn = psycopg.connect(
                    self.url, autocommit=True, connect_timeout=self._connect_timeout
                )
            except psycopg.Error as e:
                raise KeystoreError(
                    f"cannot connect to the key store {self.describe()}: {_first_line(e)}"
                ) from None
            self._local.conn = conn
            self._connections.append(conn)
        return conn

    @contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Tx]:
        conn = self._connection()
        try:
            if write:
                with conn.transaction(), conn.cursor() as cursor:
                    yield Tx(cursor, "%s", (psycopg.IntegrityError,))
            else:
                # Reads run in autocommit: no BEGIN/COMMIT round trips on the hot
                # lookup path. Each statement sees committed data; a read spanning
                # several statements may see a change committed between them.
                with conn.cursor() as cursor:
                    yield Tx(cursor, "%s", (psycopg.IntegrityError,))
        except psycopg.Error as e:
            if conn.broken:
                self._local.conn = None
            raise KeystoreError(f"key store {self.describe()}: {_first_line(e)}") from None

    def lock_for_migration(self, tx: Tx) -> None:
        tx.one("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def close_all(self) -> None:
        """Close every connection this object opened (at shutdown)."""
        for conn in self._connections:
            conn.close()
        self._connections.clear()


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
