"""The append-only, hash-chained audit log.

Each entry is ``(seq, time, actor, action, subject, detail, prev_hash, hash)`` with

    hash = SHA-256(prev_hash || canonical JSON of {seq, time, actor, action, subject, detail})

(``prev_hash`` as its 64 hex characters, the first entry's ``prev_hash`` 64 zeros), so an
entry altered, removed or inserted in the middle breaks the chain at that point, and
:func:`verify` names the first broken sequence number.

Appending is safe from several nodes at once: the sequence number is the primary key,
so two writers that read the same head collide on it; the loser rolls back to a
savepoint, re-reads the head and tries again. The entry is written in the caller's
transaction, so an audited change and its entry commit together or not at all.

Not guaranteed: removing the *last* entries leaves a shorter but intact chain. Record
:func:`head` (sequence number and hash) somewhere else (a log shipper, a ticket) to
detect that. Entries are never secret-bearing: :func:`check_detail` refuses PEM blocks
and bytes.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Callable, Iterable
from typing import Any

from smimeproxy.errors import KeystoreError
from smimeproxy.keystore.interface import AuditEntry, AuditVerification
from smimeproxy.keystore.schema import Row, Tx, from_text, to_text

GENESIS_HASH = "0" * 64
#: How often an append retries after losing a race for the next sequence number.
APPEND_ATTEMPTS = 20

_COLUMNS = "seq, time, actor, action, subject, detail, prev_hash, hash"


def canonical(value: Any) -> bytes:
    """Canonical JSON (sorted keys, no spaces, UTF-8): the same bytes on every node."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


def entry_hash(
    prev_hash: str, seq: int, time: str, actor: str, action: str, subject: str, detail: Any
) -> str:
    body = {
        "seq": seq,
        "time": time,
        "actor": actor,
        "action": action,
        "subject": subject,
        "detail": detail,
    }
    return hashlib.sha256(prev_hash.encode("ascii") + canonical(body)).hexdigest()


def check_detail(detail: dict[str, Any]) -> None:
    """Refuse details that could carry secrets (bytes, PEM blocks) or are not JSON."""

    def walk(value: Any) -> None:
        if isinstance(value, bytes | bytearray | memoryview):
            raise KeystoreError("audit details must not hold bytes")
        if isinstance(value, str) and "-----BEGIN" in value:
            raise KeystoreError("audit details must not hold PEM data")
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    raise KeystoreError("audit detail keys must be strings")
                walk(v)
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v)
        elif not isinstance(value, str | int | float | bool | type(None)):
            raise KeystoreError(f"audit details cannot hold {type(value).__name__}")

    walk(detail)


def head(tx: Tx) -> tuple[int, str]:
    """The last sequence number and its hash (``0`` and the genesis hash if empty)."""
    row = tx.one("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
    return (0, GENESIS_HASH) if row is None else (int(row[0]), str(row[1]))


def append(
    tx: Tx,
    now: Callable[[], datetime.datetime],
    actor: str,
    action: str,
    subject: str,
    detail: dict[str, Any] | None = None,
) -> AuditEntry:
    """Append one entry in ``tx``; see the module docstring for concurrency."""
    detail = dict(detail or {})
    check_detail(detail)
    # round-trip so the hash is over exactly what is stored and read back
    detail = json.loads(canonical(detail))
    for attempt in range(APPEND_ATTEMPTS):
        seq, prev = head(tx)
        seq += 1
        time = to_text(now())
        digest = entry_hash(prev, seq, time, actor, action, subject, detail)
        params = (
            seq,
            time,
            actor,
            action,
            subject,
            canonical(detail).decode("utf-8"),
            prev,
            digest,
        )

        def insert(t: Tx, params: tuple[Any, ...] = params) -> None:
            t.run(f"INSERT INTO audit ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", params)

        try:
            tx.attempt(f"audit_{attempt}", insert)
        except tx.integrity_errors:
            continue
        return AuditEntry(seq, from_text(time), actor, action, subject, detail, prev, digest)
    raise KeystoreError("could not append to the audit log: too much contention")


def to_entry(row: Row) -> AuditEntry:
    try:
        detail = json.loads(row[5])
    except (TypeError, ValueError):
        detail = {"unreadable": True}
    return AuditEntry(
        int(row[0]), from_text(row[1]), row[2], row[3], row[4], detail, row[6], row[7]
    )


def entries(tx: Tx, after: int = 0, limit: int | None = None) -> list[AuditEntry]:
    sql = f"SELECT {_COLUMNS} FROM audit WHERE seq > ? ORDER BY seq"
    params: list[Any] = [after]
    if limit is not None:
        sql += " LIMIT ?"
        params.append(int(limit))
    return [to_entry(r) for r in tx.all(sql, params)]


def verify(rows: Iterable[Row]) -> AuditVerification:
    """Check the chain over raw rows (in ``seq`` order), recomputing every hash from
    the stored text, so an edited ``detail`` is caught even if its JSON still parses."""
    expected_seq = 1
    prev = GENESIS_HASH
    count = 0
    for row in rows:
        seq, time, actor, action, subject, detail_text, prev_hash, digest = row
        seq = int(seq)
        if seq != expected_seq:
            return AuditVerification(
                False, count, expected_seq, f"entry {expected_seq} is missing (next is {seq})"
            )
        if prev_hash != prev:
            return AuditVerification(
                False, count, seq, f"entry {seq} does not follow entry {seq - 1}"
            )
        try:
            detail = json.loads(detail_text)
        except (TypeError, ValueError):
            return AuditVerification(False, count, seq, f"entry {seq} has unreadable detail")
        if entry_hash(prev, seq, time, actor, action, subject, detail) != digest:
            return AuditVerification(False, count, seq, f"entry {seq} was altered")
        prev = digest
        expected_seq += 1
        count += 1
    return AuditVerification(True, count)


def verify_all(tx: Tx) -> AuditVerification:
    return verify(tx.all(f"SELECT {_COLUMNS} FROM audit ORDER BY seq"))
