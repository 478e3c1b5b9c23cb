"""The hash-chained audit log: intact chains verify; an altered, removed or reordered
entry is found, with its sequence number; details never carry secrets."""

from __future__ import annotations

import itertools
import json

import pytest

from smimeproxy.errors import KeystoreError
from smimeproxy.keystore import SyncStore
from smimeproxy.keystore.audit import GENESIS_HASH, entry_hash
from smimeproxy.testing import Issued


def filled(store: SyncStore, people: dict[str, Issued]) -> SyncStore:
    store.add_user("alice@acme.test", actor="admin")
    record = store.import_key(people["bob"].private_key, people["bob"].certificate, actor="admin")
    store.export_key(record.id, reason="backup", actor="admin")
    store.audit("archive", "archive.decrypt", "bob@acme.test", {"message": "<id@x>", "n": 1})
    store.revoke_key(record.id, "left the company", actor="admin")
    return store


def test_chain_of_real_operations_verifies(store: SyncStore, people: dict[str, Issued]) -> None:
    filled(store, people)
    entries = store.audit_entries()
    assert [e.action for e in entries] == [
        "user.add",
        "user.add",  # bob, created by the key import
        "key.import",
        "key.export",
        "archive.decrypt",
        "key.revoke",
    ]
    assert [e.seq for e in entries] == list(range(1, 7))
    assert entries[0].prev_hash == GENESIS_HASH
    for before, after in itertools.pairwise(entries):
        assert after.prev_hash == before.hash
    last = entries[-1]
    assert last.hash == entry_hash(
        last.prev_hash,
        last.seq,
        last.time.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        last.actor,
        last.action,
        last.subject,
        last.detail,
    )
    result = store.verify_audit()
    assert result.ok and result.entries == 6 and result.first_broken is None
    assert store.audit_head() == (6, last.hash)
    assert [e.seq for e in store.audit_entries(after=4, limit=1)] == [5]


@pytest.mark.parametrize(
    ("sql", "params", "broken"),
    [
        ("UPDATE audit SET detail = ? WHERE seq = ?", ('{"reason":"routine"}', 4), 4),
        ("UPDATE audit SET actor = ? WHERE seq = ?", ("someone-else", 2), 2),
        ("UPDATE audit SET time = ? WHERE seq = ?", ("2020-01-01T00:00:00.000000Z", 5), 5),
        ("DELETE FROM audit WHERE seq = ?", (3,), 3),
        ("DELETE FROM audit WHERE seq = ?", (1,), 1),
    ],
)
def test_tampering_is_detected(
    store: SyncStore, people: dict[str, Issued], sql: str, params: tuple, broken: int
) -> None:
    filled(store, people)
    with store.db.transaction() as tx:
        assert tx.run(sql, params) == 1
    result = store.verify_audit()
    assert not result.ok
    assert result.first_broken == broken
    assert result.reason


def test_rewritten_hash_breaks_the_next_link(store: SyncStore, people: dict[str, Issued]) -> None:
    """An attacker who alters an entry *and* recomputes its hash still breaks the
    next entry's prev_hash."""
    filled(store, people)
    (entry,) = [e for e in store.audit_entries() if e.seq == 4]
    forged = {"key": entry.detail["key"], "reason": "nothing to see", "encrypted": False}
    new_hash = entry_hash(
        entry.prev_hash,
        4,
        entry.time.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        entry.actor,
        entry.action,
        entry.subject,
        forged,
    )
    with store.db.transaction() as tx:
        tx.run(
            "UPDATE audit SET detail = ?, hash = ? WHERE seq = 4",
            (json.dumps(forged, sort_keys=True, separators=(",", ":")), new_hash),
        )
    result = store.verify_audit()
    assert (result.ok, result.first_broken) == (False, 5)


def test_details_refuse_secrets(store: SyncStore, people: dict[str, Issued]) -> None:
    for detail in ({"key": people["bob"].key_pem.decode()}, {"raw": b"\x00\x01"}, {"o": object()}):
        with pytest.raises(KeystoreError):
            store.audit("admin", "oops", "x", detail)
    assert store.audit_entries() == []
