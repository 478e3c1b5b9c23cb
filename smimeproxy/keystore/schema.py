"""One schema for both backends, versioned migrations, and the database seam.

The SQL of the store is written once, in the portable subset SQLite 3.24+ and
PostgreSQL 12+ share (``?`` placeholders, ``INSERT ... ON CONFLICT``, partial unique
indexes, ``SAVEPOINT``). A backend supplies a :class:`Database`: transactions yielding a
:class:`Tx`, the dialect's placeholder and type spelling, and a way to tell a constraint
violation apart from other failures.

Times are stored as fixed-width ISO 8601 UTC text (``2026-01-31T12:00:00.000000Z``), so
that comparing them as strings compares them as times in both databases. Booleans are
integers 0/1. Binary columns are ``BLOB`` / ``BYTEA``.

Migrations are numbered, applied in one transaction each, and recorded in
``schema_version``; a store newer than this code is refused rather than misread. Not
guaranteed: a migration that fails halfway in SQLite before ``COMMIT`` is rolled back,
but schema changes are never rolled *forward* by anything but this module.
"""

from __future__ import annotations

import abc
import datetime
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from smimeproxy.errors import KeystoreError

Row = tuple[Any, ...]

#: Format of every stored time: fixed width, so text order is time order.
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def to_text(when: datetime.datetime) -> str:
    """A timezone-aware time as stored text (UTC)."""
    if when.tzinfo is None:
        raise KeystoreError("naive datetime given to the key store; use UTC-aware times")
    return when.astimezone(datetime.UTC).strftime(TIME_FORMAT)


def from_text(text: str) -> datetime.datetime:
    """Stored text back to an aware UTC datetime."""
    try:
        return datetime.datetime.strptime(str(text), TIME_FORMAT).replace(tzinfo=datetime.UTC)
    except ValueError:
        raise KeystoreError("a stored time is damaged") from None


class Tx:
    """One open transaction: portable SQL in, tuples out.

    ``?`` placeholders are rewritten to the backend's style; SQL given here must not
    contain a literal ``?`` or ``%``.
    """

    def __init__(
        self, cursor: Any, placeholder: str, integrity_errors: tuple[type[Exception], ...]
    ):
        self._cursor = cursor
        self._placeholder = placeholder
        self.integrity_errors = integrity_errors

    def _sql(self, sql: str) -> str:
        return sql if self._placeholder == "?" else sql.replace("?", self._placeholder)

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Execute; the number of rows changed."""
        self._cursor.execute(self._sql(sql), tuple(params))
        return int(self._cursor.rowcount)

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        self._cursor.execute(self._sql(sql), tuple(params))
        return [tuple(r) for r in self._cursor.fetchall()]

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        self._cursor.execute(self._sql(sql), tuple(params))
        row = self._cursor.fetchone()
        return None if row is None else tuple(row)

    def attempt(self, name: str, action: Callable[[Tx], Any]) -> Any:
        """Run ``action`` inside a savepoint; on a constraint violation roll back to it
        and re-raise, leaving the outer transaction usable (needed by PostgreSQL)."""
        self._cursor.execute(f"SAVEPOINT sp_{name}")
        try:
            result = action(self)
        except self.integrity_errors:
            self._cursor.execute(f"ROLLBACK TO SAVEPOINT sp_{name}")
            raise
        self._cursor.execute(f"RELEASE SAVEPOINT sp_{name}")
        return result


class Database(abc.ABC):
    """A backend: where the store's SQL runs. Implementations are safe to call from
    many threads (one connection per thread) and keep no shared state in process."""

    #: "sqlite" or "postgresql"
    dialect: str
    #: spelling of a binary column
    blob_type: str
    #: spelling of a 64-bit integer column
    bigint_type: str

    @abc.abstractmethod
    def transaction(self, *, write: bool = True) -> AbstractContextManager[Tx]:
        """A transaction on this thread's connection: committed when the block ends,
        rolled back on an exception. Backend errors leave as :class:`KeystoreError`.

        ``write=False`` promises only reads; a backend may then skip the transaction
        block (PostgreSQL runs such reads in autocommit to save round trips, so a read
        of several statements may see a change committed between them)."""

    @abc.abstractmethod
    def lock_for_migration(self, tx: Tx) -> None:
        """Keep concurrent migrators (other nodes) out until ``tx`` ends."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""

    def describe(self) -> str:
        """Where the data lives, without credentials (for messages)."""
        return self.dialect


def _ddl(db: Database, statements: Sequence[str]) -> list[str]:
    return [s.format(blob=db.blob_type, bigint=db.bigint_type) for s in statements]


#: Version -> DDL statements. Append only: never edit a released migration.
MIGRATIONS: dict[int, Sequence[str]] = {
    1: (
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE users ("
        " id TEXT PRIMARY KEY, address TEXT NOT NULL UNIQUE, created TEXT NOT NULL)",
        # primary addresses and aliases in one table: an address names one user only
        "CREATE TABLE addresses ("
        " address TEXT PRIMARY KEY,"
        " user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,"
        " kind TEXT NOT NULL CHECK (kind IN ('primary', 'alias')))",
        "CREATE INDEX addresses_user ON addresses(user_id)",
        "CREATE TABLE logins ("
        " login TEXT PRIMARY KEY,"
        " user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE)",
        "CREATE INDEX logins_user ON logins(user_id)",
        "CREATE TABLE keys ("
        " id TEXT PRIMARY KEY,"
        " owner TEXT NOT NULL REFERENCES users(id),"
        " certificate {blob} NOT NULL,"
        " state TEXT NOT NULL CHECK (state IN ('current', 'previous', 'revoked')),"
        " created TEXT NOT NULL,"
        " not_after TEXT NOT NULL,"
        " revoked_reason TEXT,"
        " sealed {blob},"
        " hsm_reference TEXT,"
        " CHECK (sealed IS NOT NULL OR hsm_reference IS NOT NULL))",
        "CREATE INDEX keys_owner ON keys(owner)",
        # at most one current key per user, enforced by the database for every node
        "CREATE UNIQUE INDEX keys_one_current ON keys(owner) WHERE state = 'current'",
        "CREATE TABLE certificates ("
        " fingerprint TEXT PRIMARY KEY,"
        " certificate {blob} NOT NULL,"
        " source TEXT NOT NULL,"
        " first_seen TEXT NOT NULL,"
        " last_seen TEXT NOT NULL,"
        " not_before TEXT NOT NULL,"
        " not_after TEXT NOT NULL,"
        " capabilities TEXT NOT NULL,"
        " encryption_key_preference TEXT,"
        " revoked INTEGER NOT NULL DEFAULT 0)",
        "CREATE TABLE certificate_addresses ("
        " fingerprint TEXT NOT NULL REFERENCES certificates(fingerprint) ON DELETE CASCADE,"
        " address TEXT NOT NULL,"
        " PRIMARY KEY (fingerprint, address))",
        "CREATE INDEX certificate_addresses_address ON certificate_addresses(address)",
        "CREATE TABLE trust ("
        " fingerprint TEXT PRIMARY KEY,"
        " kind TEXT NOT NULL CHECK (kind IN ('anchor', 'intermediate')),"
        " subject TEXT NOT NULL,"
        " certificate {blob} NOT NULL,"
        " added TEXT NOT NULL)",
        "CREATE TABLE crls ("
        " issuer TEXT PRIMARY KEY,"
        " crl {blob} NOT NULL,"
        " this_update TEXT NOT NULL,"
        " next_update TEXT,"
        " added TEXT NOT NULL)",
        "CREATE TABLE audit ("
        " seq {bigint} PRIMARY KEY,"
        " time TEXT NOT NULL,"
        " actor TEXT NOT NULL,"
        " action TEXT NOT NULL,"
        " subject TEXT NOT NULL,"
        " detail TEXT NOT NULL,"
        " prev_hash TEXT NOT NULL,"
        " hash TEXT NOT NULL)",
    ),
    # the internal CA's own state (smimeproxy.keystore.ca_state): its keys sealed like
    # users' keys, every certificate it issued (serial, revocation), keys waiting for an
    # external CA's certificate, and bulk rotation runs (rerun-safe, republish list)
    2: (
        "CREATE TABLE ca_keys ("
        " name TEXT PRIMARY KEY CHECK (name IN ('root', 'issuing')),"
        " certificate {blob} NOT NULL,"
        " sealed {blob} NOT NULL,"
        " created TEXT NOT NULL,"
        " crl_number {bigint} NOT NULL DEFAULT 0,"
        " crl_url_template TEXT)",
        "CREATE TABLE ca_issued ("
        " serial TEXT PRIMARY KEY,"
        " issuer TEXT NOT NULL,"
        " fingerprint TEXT NOT NULL UNIQUE,"
        " subject TEXT NOT NULL,"
        " certificate {blob} NOT NULL,"
        " issued TEXT NOT NULL,"
        " not_after TEXT NOT NULL,"
        " revoked_at TEXT,"
        " reason TEXT)",
        "CREATE INDEX ca_issued_subject ON ca_issued(subject)",
        "CREATE TABLE pending_keys ("
        " id TEXT PRIMARY KEY,"
        " address TEXT NOT NULL,"
        " sealed {blob} NOT NULL,"
        " created TEXT NOT NULL)",
        "CREATE TABLE rotation_runs ("
        " run TEXT NOT NULL,"
        " address TEXT NOT NULL,"
        " key TEXT NOT NULL,"
        " rotated TEXT NOT NULL,"
        " published INTEGER NOT NULL DEFAULT 0,"
        " PRIMARY KEY (run, address))",
    ),
    # the store generation (see bump_generation): one row, one counter
    3: (
        "CREATE TABLE generation ( id INTEGER PRIMARY KEY CHECK (id = 1), value {bigint} NOT NULL)",
        "INSERT INTO generation (id, value) VALUES (1, 0)",
    ),
}

LATEST = max(MIGRATIONS)


def current_version(tx: Tx) -> int:
    row = tx.one("SELECT MAX(version) FROM schema_version")
    return int(row[0]) if row and row[0] is not None else 0


def bump_generation(tx: Tx) -> None:
    """Count one more change that can alter a lookup's answer, inside ``tx``.

    Every write that can change what a lookup returns (keys, users and their
    addresses and logins, certificates, trust, CRLs, the CA's issued certificates)
    calls this in the transaction that makes the change, so a reader that sees the
    old generation has seen none of the change and one that sees the new generation
    sees all of it. Caches on every node (:mod:`smimeproxy.processing`) read the
    generation once per message and drop what they hold when it moved.

    The row is locked until ``tx`` ends, so concurrent writers on any node take
    turns here and each commit gets its own, larger value. Not guaranteed: that the
    number grows by exactly one per write (a rolled-back transaction leaves no trace,
    and one transaction may bump more than once); only that it changes.
    """
    tx.run("UPDATE generation SET value = value + 1 WHERE id = 1")


def read_generation(tx: Tx) -> int:
    """The current store generation (see :func:`bump_generation`)."""
    row = tx.one("SELECT value FROM generation WHERE id = 1")
    if row is None:
        raise KeystoreError("the key store's generation row is missing")
    return int(row[0])


def migrate(db: Database, now: Callable[[], datetime.datetime]) -> int:
    """Bring the schema to :data:`LATEST`; returns the version found before.

    Safe to run from several nodes at once: the backend's migration lock serialises
    them and each re-reads the version under it.
    """
    with db.transaction() as tx:
        db.lock_for_migration(tx)
        # under the lock: CREATE TABLE IF NOT EXISTS itself races in PostgreSQL
        tx.run(
            "CREATE TABLE IF NOT EXISTS schema_version"
            " (version INTEGER PRIMARY KEY, applied TEXT NOT NULL)"
        )
        found = current_version(tx)
        if found > LATEST:
            raise KeystoreError(
                f"the store at {db.describe()} has schema version {found}, newer than this"
                f" smimeproxy understands ({LATEST}); upgrade smimeproxy"
            )
        for version in range(found + 1, LATEST + 1):
            for statement in _ddl(db, MIGRATIONS[version]):
                tx.run(statement)
            tx.run(
                "INSERT INTO schema_version (version, applied) VALUES (?, ?)",
                (version, to_text(now())),
            )
    return found
