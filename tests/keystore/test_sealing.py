"""Private keys sealed at rest: unreadable without the master secret, bound to owner
and key id, a wrong master secret named clearly, resealing."""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from smimeproxy.errors import KeystoreError, MasterKeyError, SealError
from smimeproxy.keystore import MasterSecret, SyncStore, create_key_file, open_store
from smimeproxy.keystore.sealing import Sealer, new_kdf_parameters
from smimeproxy.testing import Issued


def secret_fragments(issued: Issued) -> list[bytes]:
    """Byte strings that would betray the private key if found at rest."""
    key = issued.private_key
    out = [
        key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        issued.key_pem,
    ]
    if isinstance(key, rsa.RSAPrivateKey):
        p = key.private_numbers().p
        out.append(p.to_bytes((p.bit_length() + 7) // 8, "big"))
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        out.append(key.private_numbers().private_value.to_bytes(32, "big"))
    return out + [f.hex().encode() for f in out[2:]] + [base64.b64encode(f) for f in out[2:]]


def raw_store_bytes(store: SyncStore, tmp_path: Path) -> bytes:
    """Everything at rest: the SQLite files, or every row of every PostgreSQL table."""
    if store.db.dialect == "sqlite":
        return b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("store"))
    chunks = []
    with store.db.transaction(write=False) as tx:
        for table in ("meta", "users", "addresses", "keys", "certificates", "audit"):
            for row in tx.all(f"SELECT * FROM {table}"):
                for value in row:
                    chunks.append(value if isinstance(value, bytes) else str(value).encode())
    return b"\n".join(chunks)


# -- the master secret ----------------------------------------------------------------------


def test_key_file_is_owner_only_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    created = create_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == created.material and len(created.material) == 32
    assert MasterSecret.from_file(path).material == created.material
    with pytest.raises(MasterKeyError, match="already exists"):
        create_key_file(path)
    assert path.read_bytes() == created.material
    path.write_bytes(b"short")
    with pytest.raises(MasterKeyError, match="exactly 32 bytes"):
        MasterSecret.from_file(path)


def test_secret_from_environment_hex_or_base64() -> None:
    raw = os.urandom(32)
    for text in (raw.hex(), base64.b64encode(raw).decode()):
        got = MasterSecret.from_env("SMK", {"SMK": text})
        assert got.material == raw and "SMK" in got.origin
    with pytest.raises(MasterKeyError, match="SMK is not set"):
        MasterSecret.from_env("SMK", {})
    with pytest.raises(MasterKeyError, match="32 bytes"):
        MasterSecret.from_env("SMK", {"SMK": "abcd"})
    assert raw.hex() not in repr(got)


def test_sealed_blob_is_bound_to_owner_and_key_id() -> None:
    master = MasterSecret(os.urandom(32), "test")
    sealer = Sealer.derive(master, new_kdf_parameters(master))
    blob = sealer.seal(b"key material", owner_id="u1", key_id="k1")
    assert sealer.open(blob, owner_id="u1", key_id="k1") == b"key material"
    for owner, key_id in (("u2", "k1"), ("u1", "k2")):
        with pytest.raises(SealError, match="moved to another owner"):
            sealer.open(blob, owner_id=owner, key_id=key_id)
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    with pytest.raises(SealError):
        sealer.open(bytes(flipped), owner_id="u1", key_id="k1")
    # seal errors name the key, never the bytes
    with pytest.raises(SealError) as info:
        sealer.open(blob, owner_id="u2", key_id="k1")
    assert "key material" not in str(info.value)


# -- at rest in the store ----------------------------------------------------------------


def test_private_keys_are_not_readable_at_rest(
    store: SyncStore, people: dict[str, Issued], tmp_path: Path
) -> None:
    for name in ("alice", "bob"):
        store.import_key(people[name].private_key, people[name].certificate)
    store.export_key(store.keys("bob@acme.test")[0].id, reason="check the audit stays clean")
    data = raw_store_bytes(store, tmp_path)
    assert people["alice"].certificate.public_bytes(serialization.Encoding.DER) in data  # sanity
    for name in ("alice", "bob"):
        for fragment in secret_fragments(people[name]):
            assert fragment not in data


def test_wrong_master_secret_is_named_at_open(
    make_store: Callable[..., SyncStore], tmp_path: Path
) -> None:
    make_store()
    wrong = create_key_file(tmp_path / "other.key")
    with pytest.raises(MasterKeyError, match="the master key does not match this store") as info:
        make_store(wrong)
    assert str(tmp_path / "other.key") in str(info.value)
    env = MasterSecret.from_env("SMIMEPROXY_MASTER_KEY", {"SMIMEPROXY_MASTER_KEY": "00" * 32})
    with pytest.raises(MasterKeyError, match="environment variable SMIMEPROXY_MASTER_KEY"):
        make_store(env)
    with pytest.raises(MasterKeyError, match="not a passphrase"):
        make_store(MasterSecret.from_passphrase("hunter2"))


def test_store_not_initialised_is_refused(make_store: Callable[..., SyncStore]) -> None:
    with pytest.raises(KeystoreError, match="not initialised"):
        make_store(create=False)


def test_passphrase_store(make_store: Callable[..., SyncStore], people: dict[str, Issued]) -> None:
    store = make_store(MasterSecret.from_passphrase("correct horse battery staple"))
    store.import_key(people["bob"].private_key, people["bob"].certificate)
    again = make_store(MasterSecret.from_passphrase("correct horse battery staple"))
    assert again.decryption_keys("bob@acme.test")[0].certificate == people["bob"].certificate
    with pytest.raises(MasterKeyError, match="does not match"):
        make_store(MasterSecret.from_passphrase("wrong"))
    with pytest.raises(MasterKeyError, match="sealed with a passphrase"):
        make_store(MasterSecret(os.urandom(32), "master key file x"))


def test_row_moved_to_another_user_does_not_open(
    store: SyncStore, people: dict[str, Issued]
) -> None:
    """An attacker with write access to the database gives Bob's sealed key to Alice's
    key row: the AAD (owner id + key id) no longer matches."""
    store.import_key(people["alice2"].private_key, people["alice2"].certificate)
    store.import_key(people["bob"].private_key, people["bob"].certificate)
    alice = store.keys("alice@acme.test")[0]
    bob = store.keys("bob@acme.test")[0]
    with store.db.transaction() as tx:
        tx.run("UPDATE keys SET sealed = ? WHERE id = ?", (bob.sealed, alice.id))
    with pytest.raises(SealError, match=alice.id):
        store.decryption_keys("alice@acme.test")
    # moving Bob's whole row to Alice fails as well
    with store.db.transaction() as tx:
        tx.run("UPDATE keys SET sealed = ? WHERE id = ?", (alice.sealed, alice.id))
        tx.run("UPDATE keys SET owner = ?, state = 'previous' WHERE id = ?", (alice.owner, bob.id))
    with pytest.raises(SealError, match=bob.id):
        store.decryption_keys("alice@acme.test")


def test_reseal_rotates_the_master_secret(
    make_store: Callable[..., SyncStore], people: dict[str, Issued], tmp_path: Path
) -> None:
    store = make_store()
    other_node = make_store()  # opened with the old secret before the reseal
    for name in ("alice", "bob"):
        store.import_key(people[name].private_key, people[name].certificate)
    new = create_key_file(tmp_path / "new.key")
    assert store.reseal(new, actor="admin") == 2
    assert store.decryption_keys("alice@acme.test")[0].certificate == people["alice"].certificate
    reopened = make_store(new)
    assert reopened.decryption_keys("bob@acme.test")[0].certificate == people["bob"].certificate
    with pytest.raises(MasterKeyError, match="does not match"):
        make_store()  # the old secret
    with pytest.raises(MasterKeyError, match="resealed"):
        other_node.decryption_keys("bob@acme.test")
    entry = store.audit_entries()[-1]
    assert entry.action == "store.reseal" and entry.detail["keys"] == 2
    assert store.verify_audit().ok


def test_sqlite_files_are_owner_only(tmp_path: Path, people: dict[str, Issued]) -> None:
    old = os.umask(0o022)
    try:
        store = open_store(
            f"sqlite:{tmp_path / 'store.db'}", MasterSecret(os.urandom(32), "t"), create=True
        )
        store.import_key(people["bob"].private_key, people["bob"].certificate)
    finally:
        os.umask(old)
    files = sorted(tmp_path.iterdir())
    assert {f.name for f in files} >= {"store.db", "store.db-wal"}
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f.name
