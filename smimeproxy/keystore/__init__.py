"""The central key store: users, key history, certificates, trust, CRLs, audit.

Open it with :func:`open_store` (blocking, for the command line) and wrap it in
:class:`Keystore` for Twisted services::

    store = open_store("sqlite:var/store.db", MasterSecret.from_file("var/master.key"))
    keystore = Keystore(store, reactor, threadpool)

URLs: ``sqlite:PATH`` (relative paths resolved against ``base``, the config file's
directory) or ``postgresql://user@host/db`` (any libpq URI).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from pathlib import Path

from smimeproxy.errors import KeystoreError
from smimeproxy.keystore.interface import (
    AuditEntry,
    AuditVerification,
    CertificateRecord,
    CertificateSource,
    CRLRecord,
    KeyRecord,
    KeyState,
    Keystore,
    SigningIdentity,
    TrustKind,
    TrustRecord,
    User,
)
from smimeproxy.keystore.schema import Database
from smimeproxy.keystore.sealing import MasterSecret, create_key_file
from smimeproxy.keystore.store import HSMResolver, SyncStore, utcnow

__all__ = [
    "AuditEntry",
    "AuditVerification",
    "CRLRecord",
    "CertificateRecord",
    "CertificateSource",
    "KeyRecord",
    "KeyState",
    "Keystore",
    "MasterSecret",
    "SigningIdentity",
    "SyncStore",
    "TrustKind",
    "TrustRecord",
    "User",
    "create_key_file",
    "database_for",
    "open_store",
]


def database_for(url: str, base: str | os.PathLike[str] | None = None) -> Database:
    """The backend a store URL names (nothing is opened yet for PostgreSQL)."""
    if url.startswith(("postgresql://", "postgres://")):
        from smimeproxy.keystore.postgresql import PostgreSQLDatabase

        return PostgreSQLDatabase(url)
    if url.startswith("sqlite:"):
        raw = url[len("sqlite:") :]
        if raw.startswith("//"):
            raw = raw[2:]  # sqlite:///abs/path -> /abs/path
        if not raw:
            raise KeystoreError("the sqlite store URL names no file")
        path = Path(raw)
        if not path.is_absolute() and base is not None:
            path = Path(base) / path
        from smimeproxy.keystore.sqlite import SQLiteDatabase

        return SQLiteDatabase(path)
    raise KeystoreError(f"unknown key store URL scheme in {url.split(':', 1)[0]!r}")


def open_store(
    url: str,
    master: MasterSecret,
    *,
    create: bool = False,
    base: str | os.PathLike[str] | None = None,
    now: Callable[[], datetime.datetime] = utcnow,
    hsm: HSMResolver | None = None,
) -> SyncStore:
    """Open the store at ``url`` with ``master`` (see :meth:`SyncStore.open`)."""
    return SyncStore.open(database_for(url, base), master, create=create, now=now, hsm=hsm)
