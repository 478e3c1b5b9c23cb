"""MessageProcessor keeps store lookups only under the store generation: a change made
through another store handle (another node) is used by the very next call, answers
that depend on the clock are judged at each use, and nothing is kept past the bound."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from smimeproxy.keystore import MasterSecret, SyncStore, open_store
from smimeproxy.processing import MessageProcessor
from smimeproxy.smime.sealer import EncryptionTarget, seal
from smimeproxy.smime.status import fingerprint
from smimeproxy.testing import CertificateFactory, Issued, smime_settings
from tests.keystore.conftest import pg_server, pg_url  # noqa: F401 (fixtures)

ALICE, BOB, CAROL = "alice@acme.test", "bob@partner.test", "carol@partner.test"
MESSAGE = b"From: alice@acme.test\r\nTo: bob@partner.test\r\nSubject: hi\r\n\r\nhello\r\n"
SETTINGS = smime_settings()


@pytest.fixture(scope="module")
def pki() -> CertificateFactory:
    return CertificateFactory()


@pytest.fixture(scope="module")
def people(pki: CertificateFactory) -> dict[str, Issued]:
    return {
        "alice": pki.user(ALICE, key_kind="p256"),
        "alice2": pki.user(ALICE, key_kind="p256"),
        "bob": pki.user(BOB, key_kind="p256"),
        "carol": pki.user(CAROL, key_kind="p256"),
    }


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'store.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def stores(
    url: str, pki: CertificateFactory, people: dict[str, Issued]
) -> Iterator[Callable[[], SyncStore]]:
    """Opens handles on one store (as separate nodes would); the first is set up with
    alice's key, bob's certificate and the test root."""
    master = MasterSecret(os.urandom(32), "test master key")
    opened: list[SyncStore] = []

    def make() -> SyncStore:
        store = open_store(url, master, create=True)
        opened.append(store)
        return store

    first = make()
    first.add_trust(pki.root.certificate)
    first.import_key(people["alice"].private_key, people["alice"].certificate)
    first.import_certificate(people["bob"].certificate)
    yield make
    for store in opened:
        store.db.close_all()  # type: ignore[attr-defined]


def signer_of(processor: MessageProcessor, data: bytes) -> str:
    opened = processor.open_for(data, [], harvest=False)
    certificate = opened.status.signers[0].certificate
    assert certificate is not None and opened.status.signers[0].verified
    return fingerprint(certificate)


def test_a_rotation_through_another_node_signs_the_very_next_message(
    stores: Callable[[], SyncStore], people: dict[str, Issued]
) -> None:
    processor = MessageProcessor(stores(), SETTINGS)
    other = stores()
    first = processor.seal_for(MESSAGE, ALICE, [BOB])
    assert first.encrypted_to == (BOB, ALICE)
    assert signer_of(processor, processor.seal_for(MESSAGE, ALICE, [BOB], encrypt=False).data) == (
        fingerprint(people["alice"].certificate)
    )
    misses = processor.cache.misses
    processor.seal_for(MESSAGE, ALICE, [BOB])
    assert processor.cache.misses == misses  # all from memory: nothing changed

    other.rotate(ALICE, people["alice2"].private_key, people["alice2"].certificate)
    sealed = processor.seal_for(MESSAGE, ALICE, [BOB], encrypt=False)
    assert signer_of(processor, sealed.data) == fingerprint(people["alice2"].certificate)


def test_mail_to_a_key_rotated_elsewhere_opens_at_once(
    stores: Callable[[], SyncStore], people: dict[str, Issued]
) -> None:
    processor = MessageProcessor(stores(), SETTINGS)
    assert len(processor.keys_for([ALICE])) == 1  # now kept in memory
    stores().rotate(ALICE, people["alice2"].private_key, people["alice2"].certificate)
    to_new = seal(MESSAGE, signer=None, recipients=[EncryptionTarget(people["alice2"].certificate)])
    to_old = seal(MESSAGE, signer=None, recipients=[EncryptionTarget(people["alice"].certificate)])
    for data in (to_new, to_old):
        opened = processor.open_for(data, [ALICE], harvest=False)
        assert opened.status.decryption is not None and opened.status.decryption.decrypted
        assert b"hello" in opened.data


def test_certificate_changes_elsewhere_are_used_at_once(
    stores: Callable[[], SyncStore], people: dict[str, Issued]
) -> None:
    processor = MessageProcessor(stores(), SETTINGS)
    other = stores()
    assert processor.certificate_for(BOB).target is not None
    assert processor.certificate_for(CAROL).reason == "no certificate known"  # kept: negative
    other.import_certificate(people["carol"].certificate)
    found = processor.certificate_for(CAROL)
    assert found.target is not None
    assert found.target.certificate == people["carol"].certificate
    other.revoke_certificate(fingerprint(people["bob"].certificate), "compromised")
    assert processor.certificate_for(BOB).target is None


def test_trust_changes_elsewhere_replace_the_validator(
    stores: Callable[[], SyncStore], pki: CertificateFactory
) -> None:
    processor = MessageProcessor(stores(), SETTINGS)
    kept = processor.validator()
    assert processor.validator() is kept  # warm across messages
    trusted = [fingerprint(r.certificate) for r in stores().trust_records()]
    stores().remove_trust(trusted[0])
    assert processor.validator() is not kept
    assert processor.certificate_for(BOB).target is None  # no anchor any more
    processor.reload(SETTINGS)  # new settings: nothing kept from the old ones
    assert len(processor.cache) == 0


def test_validity_is_judged_at_use_not_kept(tmp_path: Path, pki: CertificateFactory) -> None:
    """The generation does not move when a certificate expires; the choice must."""
    clock = [pki.now]
    store = open_store(
        f"sqlite:{tmp_path / 's.db'}",
        MasterSecret(os.urandom(32), "m"),
        create=True,
        now=lambda: clock[0],
    )
    store.add_trust(pki.root.certificate)
    day = datetime.timedelta(days=1)
    short = pki.user(CAROL, key_kind="p256", not_before=pki.now - 9 * day, not_after=pki.now + day)
    older = pki.user(CAROL, key_kind="p256", not_before=pki.now - 20 * day)
    for issued in (short, older):
        store.import_certificate(issued.certificate)
    processor = MessageProcessor(store, SETTINGS, clock=lambda: clock[0])
    found = processor.certificate_for(CAROL)
    assert found.target is not None and found.target.certificate == short.certificate
    misses = processor.cache.misses
    clock[0] = pki.now + 3 * day  # the short one has expired; nothing was written
    found = processor.certificate_for(CAROL)
    assert found.target is not None and found.target.certificate == older.certificate
    assert processor.cache.misses == misses  # from the kept candidates
    clock[0] = pki.now + 400 * day
    assert processor.certificate_for(CAROL).target is None
    store.db.close_all()  # type: ignore[attr-defined]


def test_a_batch_reads_the_generation_once(
    stores: Callable[[], SyncStore], people: dict[str, Issued]
) -> None:
    processor = MessageProcessor(stores(), SETTINGS)
    other = stores()
    with processor.batch():
        assert processor.certificate_for(CAROL).target is None
        other.import_certificate(people["carol"].certificate)
        assert processor.certificate_for(CAROL).target is None  # the batch's generation
    assert processor.certificate_for(CAROL).target is not None  # the next one sees it


def test_the_cache_is_bounded_and_never_shows_keys(stores: Callable[[], SyncStore]) -> None:
    processor = MessageProcessor(stores(), SETTINGS, cache_size=3)
    processor.seal_for(MESSAGE, ALICE, [BOB])
    for n in range(10):
        processor.certificate_for(f"user{n}@nowhere.test")
    assert len(processor.cache) == 3
    assert "PRIVATE" not in repr(processor.cache) and "Key" not in repr(processor.cache)


def test_no_cache_still_answers(stores: Callable[[], SyncStore], people: dict[str, Issued]) -> None:
    processor = MessageProcessor(stores(), SETTINGS, cache_size=0)
    processor.seal_for(MESSAGE, ALICE, [BOB])
    assert len(processor.cache) == 0 and processor.cache.hits == 0
