"""The store on both backends: users, keys and rotation, lookups, trust, CRLs."""

from __future__ import annotations

import datetime
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from smimeproxy.errors import CertificateError, KeyNotFound, KeystoreError
from smimeproxy.keystore import CertificateSource, KeyState, SyncStore, TrustKind
from smimeproxy.smime.enveloped import decrypt_data
from smimeproxy.smime.status import fingerprint
from smimeproxy.testing import CertificateFactory, Issued


def pem(issued: Issued) -> bytes:
    return issued.cert_pem


# -- users ---------------------------------------------------------------------------------


def test_users_aliases_and_logins(store: SyncStore) -> None:
    user = store.add_user("Alice@ACME.test", aliases=["a.smith@acme.test"], login_names=["ASmith"])
    assert user.address == "alice@acme.test"
    assert user.aliases == ("a.smith@acme.test",)
    assert user.login_names == ("asmith",)
    # found by primary address, alias and login, case-insensitively
    for name in ("alice@acme.test", "A.Smith@acme.test", "asmith"):
        assert store.user(name).id == user.id
    store.add_alias("asmith", "al@acme.test")
    store.add_login("alice@acme.test", "alice")
    assert store.user("al@acme.test").login_names == ("alice", "asmith")
    store.remove_alias("al@acme.test")
    store.remove_login("alice")
    assert store.find_user("al@acme.test") is None
    assert store.find_user("alice") is None
    assert [u.address for u in store.users()] == ["alice@acme.test"]


def test_an_address_or_login_belongs_to_one_user(store: SyncStore) -> None:
    store.add_user("alice@acme.test", login_names=["alice"])
    with pytest.raises(KeystoreError, match="already exists"):
        store.add_user("ALICE@acme.test")
    with pytest.raises(KeystoreError, match="already belongs"):
        store.add_user("bob@acme.test", aliases=["alice@acme.test"])
    with pytest.raises(KeystoreError, match="already belongs"):
        store.add_user("bob@acme.test", login_names=["alice"])
    # the failed additions left nothing behind
    assert store.find_user("bob@acme.test") is None
    with pytest.raises(KeyNotFound):
        store.user("nobody@acme.test")


def test_user_with_keys_cannot_be_removed(store: SyncStore, people: dict[str, Issued]) -> None:
    store.import_key(people["bob"].private_key, people["bob"].certificate)
    with pytest.raises(KeystoreError, match="revoke"):
        store.remove_user("bob@acme.test")
    store.add_user("temp@acme.test")
    store.remove_user("temp@acme.test")
    assert store.find_user("temp@acme.test") is None


# -- keys -----------------------------------------------------------------------------------


def test_import_takes_owner_from_certificate(store: SyncStore, people: dict[str, Issued]) -> None:
    record = store.import_key(people["alice"].key, people["alice"].certificate)
    assert record.id == fingerprint(people["alice"].certificate)
    assert record.state is KeyState.CURRENT
    assert store.user("alice@acme.test").id == record.owner
    pairs = store.decryption_keys("alice@acme.test")
    assert [p.certificate for p in pairs] == [people["alice"].certificate]
    # the unsealed key is the imported one: it signs verifiably
    signature = pairs[0].key.sign(b"hello", "sha256")
    people["alice"].private_key.public_key().verify(  # type: ignore[union-attr]
        signature, b"hello", *_rsa_args()
    )


def _rsa_args() -> tuple[object, object]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    return padding.PKCS1v15(), hashes.SHA256()


def test_import_refuses_mismatched_key_and_duplicates(
    store: SyncStore, people: dict[str, Issued]
) -> None:
    with pytest.raises(CertificateError, match="does not belong"):
        store.import_key(people["bob"].private_key, people["alice2"].certificate)
    store.import_key(people["bob"].private_key, people["bob"].certificate)
    with pytest.raises(KeystoreError, match="already in the store"):
        store.import_key(people["bob"].private_key, people["bob"].certificate)
    with pytest.raises(KeyNotFound):
        store.import_key(
            people["partner"].private_key, people["partner"].certificate, create_user=False
        )


def test_rotation_keeps_every_key_for_decryption(
    store: SyncStore, people: dict[str, Issued]
) -> None:
    first = store.import_key(people["alice"].private_key, people["alice"].certificate)
    second = store.rotate("alice@acme.test", people["alice2"].key, people["alice2"].certificate)
    third = store.rotate("alice@acme.test", people["alice3"].key, people["alice3"].certificate)
    states = {r.id: r.state for r in store.keys("alice@acme.test")}
    assert states == {
        first.id: KeyState.PREVIOUS,
        second.id: KeyState.PREVIOUS,
        third.id: KeyState.CURRENT,
    }
    pairs = store.decryption_keys("alice@acme.test")
    assert pairs[0].certificate == people["alice3"].certificate  # current first
    assert {fingerprint(p.certificate) for p in pairs} == {first.id, second.id, third.id}
    assert store.signing_key("alice@acme.test").pair.certificate == people["alice3"].certificate
    assert store.encryption_certificate("alice@acme.test").fingerprint == third.id  # type: ignore[union-attr]
    actions = [e.action for e in store.audit_entries()]
    assert actions.count("key.rotate") == 2


def test_importing_an_old_key_does_not_demote_the_current_one(
    store: SyncStore, pki: CertificateFactory
) -> None:
    day = datetime.timedelta(days=1)
    new = pki.user("hugo@acme.test", key_kind="p256", not_before=pki.now - day)
    old = pki.user("hugo@acme.test", key_kind="p256", not_before=pki.now - 300 * day)
    store.import_key(new.private_key, new.certificate)
    record = store.import_key(old.private_key, old.certificate)  # from an old PKCS#12
    assert record.state is KeyState.PREVIOUS
    assert store.signing_key("hugo@acme.test").pair.certificate == new.certificate
    assert len(store.decryption_keys("hugo@acme.test")) == 2
    forced = pki.user("hugo@acme.test", key_kind="p256", not_before=pki.now - 400 * day)
    assert store.import_key(forced.private_key, forced.certificate, current=True).state is (
        KeyState.CURRENT
    )


def test_rotation_refuses_someone_elses_certificate(
    store: SyncStore, people: dict[str, Issued]
) -> None:
    store.add_user("bob@acme.test")
    with pytest.raises(CertificateError, match=r"not bob@acme\.test"):
        store.rotate("bob@acme.test", people["alice2"].key, people["alice2"].certificate)
    with pytest.raises(KeyNotFound):
        store.rotate("nobody@acme.test", people["alice2"].key, people["alice2"].certificate)


def test_database_allows_one_current_key_per_user(
    store: SyncStore, people: dict[str, Issued]
) -> None:
    """A node that bypasses rotation (a bug, or a racing insert) is stopped by the
    database's partial unique index, not by anything in this process."""
    store.import_key(people["alice2"].private_key, people["alice2"].certificate)
    owner = store.user("alice@acme.test").id
    with pytest.raises(KeystoreError, match=r"(?i)unique"), store.db.transaction() as tx:
        tx.run(
            "INSERT INTO keys (id, owner, certificate, state, created, not_after, sealed)"
            " VALUES (?, ?, ?, 'current', '2026', '2027', ?)",
            ("x" * 64, owner, b"junk", b"junk"),
        )


def test_revoked_key_still_decrypts_but_no_longer_signs(
    store: SyncStore, people: dict[str, Issued]
) -> None:
    record = store.import_key(people["bob"].private_key, people["bob"].certificate)
    revoked = store.revoke_key(record.id, "key compromise", actor="admin")
    assert revoked.state is KeyState.REVOKED and revoked.revoked_reason == "key compromise"
    assert [p.certificate for p in store.decryption_keys("bob@acme.test")] == [
        people["bob"].certificate
    ]
    with pytest.raises(KeyNotFound):
        store.signing_key("bob@acme.test")
    assert store.encryption_certificate("bob@acme.test") is None
    entry = store.audit_entries()[-1]
    assert (entry.action, entry.actor, entry.detail["reason"]) == (
        "key.revoke",
        "admin",
        "key compromise",
    )


def test_export_is_audited(store: SyncStore, people: dict[str, Issued]) -> None:
    record = store.import_key(people["bob"].private_key, people["bob"].certificate)
    data = store.export_key(record.id, reason="user moves to new laptop", password=b"pw")
    key = serialization.load_pem_private_key(data, b"pw")
    assert key.public_key() == people["bob"].certificate.public_key()
    entry = store.audit_entries()[-1]
    assert entry.action == "key.export"
    assert entry.detail == {
        "key": record.id,
        "reason": "user moves to new laptop",
        "encrypted": True,
    }


def test_hsm_keys_resolve_through_the_token(
    make_store: Callable[..., SyncStore], people: dict[str, Issued]
) -> None:
    seen = []

    def token(reference: str, cert: x509.Certificate) -> object:
        seen.append(reference)
        return people["bob"].key

    store = make_store(hsm=token)
    store.import_key(None, people["bob"].certificate, hsm_reference="pkcs11:object=bob")
    assert store.decryption_keys("bob@acme.test")[0].key is not None
    assert seen == ["pkcs11:object=bob"]
    with pytest.raises(KeystoreError, match="token"):
        store.export_key(fingerprint(people["bob"].certificate), reason="x")


@pytest.mark.interop
def test_openssl_mail_to_an_old_key_opens_after_rotation(
    store: SyncStore, people: dict[str, Issued], openssl: str, tmp_path: Path
) -> None:
    """Mail encrypted by ``openssl cms`` to Alice's first (RSA) and second (EC)
    certificates still opens with the keys the store hands out after two rotations."""
    store.import_key(people["alice"].private_key, people["alice"].certificate)
    messages = []
    for n, who in enumerate(("alice", "alice2")):
        (tmp_path / f"c{n}.pem").write_bytes(pem(people[who]))
        (tmp_path / "m.txt").write_bytes(b"secret plan %d\r\n" % n)
        subprocess.run(
            [openssl, "cms", "-encrypt", "-binary", "-aes256", "-outform", "DER",
             "-in", str(tmp_path / "m.txt"), "-out", str(tmp_path / f"m{n}.der"),
             str(tmp_path / f"c{n}.pem")],
            check=True, capture_output=True,
        )  # fmt: skip
        messages.append((tmp_path / f"m{n}.der").read_bytes())
        if who == "alice":
            store.rotate("alice@acme.test", people["alice2"].key, people["alice2"].certificate)
    store.rotate("alice@acme.test", people["alice3"].key, people["alice3"].certificate)
    keys = store.decryption_keys("alice@acme.test")
    for n, der in enumerate(messages):
        opened = decrypt_data(der, keys)
        assert opened.content == b"secret plan %d\r\n" % n


@pytest.mark.interop
def test_exported_key_is_read_by_openssl(
    store: SyncStore, people: dict[str, Issued], openssl: str, tmp_path: Path
) -> None:
    record = store.import_key(people["bob"].private_key, people["bob"].certificate)
    (tmp_path / "k.pem").write_bytes(store.export_key(record.id, reason="interop test"))
    (tmp_path / "c.pem").write_bytes(pem(people["bob"]))
    from_key = subprocess.run(
        [openssl, "pkey", "-in", str(tmp_path / "k.pem"), "-pubout"],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    from_cert = subprocess.run(
        [openssl, "x509", "-in", str(tmp_path / "c.pem"), "-noout", "-pubkey"],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    assert from_key == from_cert


# -- lookups for encryption ------------------------------------------------------------------


def test_encryption_prefers_our_users_current_key(
    store: SyncStore, people: dict[str, Issued], pki: CertificateFactory
) -> None:
    store.import_key(people["alice2"].private_key, people["alice2"].certificate)
    # an external certificate for the same address does not win over ours
    store.import_certificate(people["alice3"].certificate)
    found = store.encryption_certificate("ALICE@acme.test")
    assert found is not None and found.source is CertificateSource.LOCAL
    assert found.certificate == people["alice2"].certificate


def test_encryption_picks_newest_usable_external_certificate(
    store: SyncStore, pki: CertificateFactory
) -> None:
    now = pki.now
    day = datetime.timedelta(days=1)
    older = pki.user("dave@partner.test", key_kind="p256", not_before=now - 10 * day)
    newer = pki.user("dave@partner.test", key_kind="p256", not_before=now - 2 * day)
    expired = pki.user(
        "dave@partner.test", key_kind="p256", not_before=now - day, not_after=now - day / 2
    )
    sign_only = pki.user("dave@partner.test", key_kind="p256", key_usage="sign")
    wrong_eku = pki.user(
        "dave@partner.test", key_kind="p256", eku=[ExtendedKeyUsageOID.SERVER_AUTH]
    )
    for issued in (older, newer, expired, sign_only, wrong_eku):
        store.import_certificate(issued.certificate)
    found = store.encryption_certificate("dave@partner.test")
    assert found is not None and found.certificate == newer.certificate
    store.revoke_certificate(found.fingerprint, "superseded")
    found = store.encryption_certificate("dave@partner.test")
    assert found is not None and found.certificate == older.certificate
    assert store.encryption_certificate("nobody@partner.test") is None


def test_harvest_refuses_unverified_signatures(store: SyncStore, people: dict[str, Issued]) -> None:
    for verified in (False, None, "yes", 1):
        with pytest.raises(KeystoreError, match="unverified"):
            store.harvest(people["partner"].certificate, ("aes256_gcm",), verified=verified)  # type: ignore[arg-type]
    assert store.certificates() == []
    assert store.encryption_certificate("carol@partner.test") is None


def test_harvest_records_capabilities_and_sightings(
    store: SyncStore, people: dict[str, Issued], pki: CertificateFactory
) -> None:
    t0 = pki.now
    cert = people["partner"].certificate
    first = store.harvest(cert, ("aes256_cbc",), verified=True, seen_at=t0)
    assert first.source is CertificateSource.HARVESTED
    assert first.capabilities == ("aes256_cbc",)
    later = t0 + datetime.timedelta(hours=1)
    second = store.harvest(cert, ("aes256_gcm", "aes128_gcm"), verified=True, seen_at=later)
    assert second.first_seen == t0 and second.last_seen == later
    assert second.capabilities == ("aes256_gcm", "aes128_gcm")
    # a sighting older than the last one does not roll the capabilities back
    third = store.harvest(cert, ("des",), verified=True, seen_at=t0)
    assert third.capabilities == ("aes256_gcm", "aes128_gcm") and third.last_seen == later
    found = store.encryption_certificate("carol@partner.test")
    assert found is not None and found.capabilities == ("aes256_gcm", "aes128_gcm")


def test_harvest_honours_encryption_key_preference(
    store: SyncStore, pki: CertificateFactory
) -> None:
    """A partner signs with one certificate and asks (SMIMEEncryptionKeyPreference)
    to be encrypted to an older one: the preference wins over "newest"."""
    day = datetime.timedelta(days=1)
    enc = pki.user("erin@partner.test", key_kind="p256", not_before=pki.now - 20 * day)
    newest = pki.user("erin@partner.test", key_kind="p256", not_before=pki.now - day)
    signer = pki.user("erin@partner.test", key_kind="p256", key_usage="sign")
    store.import_certificate(newest.certificate)
    store.harvest(signer.certificate, ("aes256_gcm",), enc.certificate, verified=True)
    found = store.encryption_certificate("erin@partner.test")
    assert found is not None and found.certificate == enc.certificate
    assert store.certificate(fingerprint(signer.certificate)).encryption_key_preference == (
        fingerprint(enc.certificate)
    )


# -- trust, CRLs -----------------------------------------------------------------------------


def test_trust_anchors_intermediates_and_signing_chain(
    store: SyncStore, pki: CertificateFactory
) -> None:
    sub = pki.ca("Issuing CA", issuer=pki.root)
    frank = pki.user("frank@acme.test", issuer=sub, key_kind="p256")
    assert store.add_trust(pki.root.certificate).kind is TrustKind.ANCHOR
    assert store.add_trust(sub.certificate).kind is TrustKind.INTERMEDIATE
    assert store.trust_anchors() == [pki.root.certificate]
    assert store.intermediates() == [sub.certificate]
    store.import_key(frank.private_key, frank.certificate)
    signing = store.signing_key("frank@acme.test")
    assert signing.chain == (sub.certificate,)


def test_only_the_latest_crl_per_issuer_is_kept(store: SyncStore, pki: CertificateFactory) -> None:
    victim = pki.user("gina@acme.test", key_kind="p256")
    old = pki.crl(pki.root)
    new_pki_now = pki.now
    pki.now = pki.now + datetime.timedelta(hours=2)
    try:
        newer = pki.crl(pki.root, [victim])
    finally:
        pki.now = new_pki_now
    assert store.add_crl(old) is True
    assert store.add_crl(newer) is True
    assert store.add_crl(old) is False  # an older CRL never replaces a newer one
    (kept,) = store.crls()
    assert kept.get_revoked_certificate_by_serial_number(victim.certificate.serial_number)


def test_store_urls(tmp_path: Path) -> None:
    from smimeproxy.keystore import MasterSecret, database_for, open_store
    from smimeproxy.keystore.postgresql import redact

    db = database_for("sqlite:store.db", base=tmp_path)
    assert db.describe() == f"sqlite:{tmp_path / 'store.db'}"
    assert database_for(f"sqlite://{tmp_path}/abs.db").describe() == f"sqlite:{tmp_path}/abs.db"
    with pytest.raises(KeystoreError, match="scheme"):
        database_for("mysql://x")
    with pytest.raises(KeystoreError, match="cannot connect") as info:
        open_store("postgresql://smime:s3cret@127.0.0.1:1/smime", MasterSecret(b"k" * 32, "t"))
    assert "s3cret" not in str(info.value)
    assert redact("postgresql://smime:s3cret@db.example/smime") == (
        "postgresql://smime:***@db.example/smime"
    )
