"""The store generation: every write that can change a lookup's answer moves it, on
both backends, in the writing transaction; reads, audit entries and harvest sightings
that change nothing leave it; two processes on one PostgreSQL see each other's moves.
And the time-independent encryption candidates choose what the store chooses."""

from __future__ import annotations

import datetime
import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool

from smimeproxy.errors import KeystoreError
from smimeproxy.keystore import Keystore, MasterSecret, SyncStore
from smimeproxy.keystore import ca_state as ca
from smimeproxy.keystore.interface import CertificateSource, TrustKind
from smimeproxy.smime.status import fingerprint
from smimeproxy.testing import CertificateFactory, Issued

ROOT = Path(__file__).resolve().parents[2]
People = dict[str, Issued]


def _import(store: SyncStore, people: People) -> str:
    return store.import_key(people["alice"].private_key, people["alice"].certificate).id


def _user(store: SyncStore, people: People) -> None:
    store.add_user("dave@acme.test", aliases=["d@acme.test"], login_names=["dave"])


def _ca(store: SyncStore, people: People) -> ca.CAState:
    state = ca.CAState(store)
    state.init("Generation Test Root", key_kind="p256")
    return state


def _cert(store: SyncStore, people: People) -> str:
    return store.import_certificate(people["partner"].certificate).fingerprint


# name -> (preparation, the write); the write must move the generation
WRITES: dict[str, tuple[Callable[[SyncStore, People], object], Callable[..., object]]] = {
    "key import": (lambda s, p: None, lambda s, p, _: _import(s, p)),
    "key rotate": (
        _import,
        lambda s, p, _: s.rotate(
            "alice@acme.test", p["alice2"].private_key, p["alice2"].certificate
        ),
    ),
    "key revoke": (_import, lambda s, p, key_id: s.revoke_key(key_id, "superseded")),
    "store reseal": (_import, lambda s, p, _: s.reseal(MasterSecret(os.urandom(32), "new"))),
    "ca reseal": (_import, lambda s, p, _: ca.reseal(s, MasterSecret(os.urandom(32), "new"))),
    "user add": (lambda s, p: None, lambda s, p, _: _user(s, p)),
    "alias add": (_user, lambda s, p, _: s.add_alias("dave", "dave2@acme.test")),
    "alias remove": (_user, lambda s, p, _: s.remove_alias("d@acme.test")),
    "login add": (_user, lambda s, p, _: s.add_login("dave@acme.test", "dave.x")),
    "login remove": (_user, lambda s, p, _: s.remove_login("dave")),
    "user remove": (_user, lambda s, p, _: s.remove_user("dave@acme.test")),
    "certificate import": (lambda s, p: None, lambda s, p, _: _cert(s, p)),
    "certificate harvest": (
        lambda s, p: None,
        lambda s, p, _: s.harvest(p["partner"].certificate, ["aes128-gcm"], verified=True),
    ),
    "certificate revoke": (_cert, lambda s, p, fp: s.revoke_certificate(fp, "compromised")),
    "certificate remove": (_cert, lambda s, p, fp: s.remove_certificate(fp)),
    "trust add": (lambda s, p: None, lambda s, p, _: s.add_trust(p["root"].certificate)),
    "trust remove": (
        lambda s, p: s.add_trust(p["root"].certificate).fingerprint,
        lambda s, p, fp: s.remove_trust(fp),
    ),
    "crl add": (lambda s, p: None, lambda s, p, _: s.add_crl(p["crl"])),  # type: ignore[index]
    "ca init": (lambda s, p: None, lambda s, p, _: _ca(s, p)),
    "ca issue": (
        _ca,
        lambda s, p, state: state.issue(p["bob"].certificate.public_key(), ["bob@acme.test"]),
    ),
    "ca revoke": (
        lambda s, p: (
            state := _ca(s, p),
            state.issue(p["bob"].certificate.public_key(), ["bob@acme.test"]),
        ),
        lambda s, p, made: made[0].revoke(made[1].serial_number, "keyCompromise"),
    ),
    "ca crl": (_ca, lambda s, p, state: state.make_crl()),
}


@pytest.fixture(scope="module")
def everyone(pki: CertificateFactory, people: People) -> dict[str, object]:
    return {**people, "root": pki.root, "crl": pki.crl(pki.root, [people["bob"]])}


@pytest.mark.parametrize("name", list(WRITES))
def test_every_write_moves_the_generation(
    name: str, store: SyncStore, everyone: dict[str, object]
) -> None:
    prepare, write = WRITES[name]
    made = prepare(store, everyone)  # type: ignore[arg-type]
    before = store.generation()
    write(store, everyone, made)
    assert store.generation() > before


def test_a_failed_write_leaves_the_generation(store: SyncStore, people: People) -> None:
    store.add_user("dave@acme.test")
    before = store.generation()
    with pytest.raises(KeystoreError):  # the address is taken: rolled back, bump included
        store.add_user("dave@acme.test")
    assert store.generation() == before


def test_reads_and_audit_leave_the_generation(store: SyncStore, people: People) -> None:
    key_id = _import(store, people)
    store.import_certificate(people["partner"].certificate)
    before = store.generation()
    store.decryption_keys("alice@acme.test")
    store.signing_key("alice@acme.test")
    store.encryption_certificate("carol@partner.test")
    store.encryption_candidates("alice@acme.test")
    store.trust_anchors(), store.intermediates(), store.crls(), store.users()
    store.audit("archive", "archive.decrypt", "alice@acme.test", {"n": 1})
    store.export_key(key_id, reason="test")
    assert store.generation() == before


def test_a_repeated_harvest_of_an_unchanged_certificate_leaves_the_generation(
    store: SyncStore, people: People
) -> None:
    partner = people["partner"].certificate
    t0 = datetime.datetime(2026, 3, 1, tzinfo=datetime.UTC)
    store.harvest(partner, ["aes128-gcm"], verified=True, seen_at=t0)
    before = store.generation()
    later = t0 + datetime.timedelta(days=1)
    store.harvest(partner, ["aes128-gcm"], verified=True, seen_at=later)
    assert store.generation() == before
    assert store.certificate(fingerprint(partner)).last_seen == later
    store.harvest(partner, ["aes256-gcm"], verified=True, seen_at=later)  # new capabilities
    assert store.generation() > before


def test_the_generation_is_shared_by_stores_on_one_database(
    make_store: Callable[..., SyncStore], people: People
) -> None:
    one, two = make_store(), make_store(create=False)
    assert one.generation() == two.generation()
    _import(one, people)
    assert two.generation() == one.generation()


def test_skipped_harvest_bumps_never_change_the_encryption_choice(
    tmp_path: Path, master: MasterSecret, pki: CertificateFactory
) -> None:
    """Random sightings of several certificates of one address (with preferences,
    capabilities, equal notBefore): whenever the generation stayed, the store's
    choice stayed too (the harvest shortcut errs only towards bumping)."""
    from smimeproxy.keystore import open_store

    store = open_store(f"sqlite:{tmp_path / 's.db'}", master, create=True)
    base = pki.now - datetime.timedelta(days=10)
    certs = [
        pki.user("carol@partner.test", key_kind="p256", not_before=base).certificate,
        pki.user("carol@partner.test", key_kind="p256", not_before=base).certificate,
        pki.user(
            "carol@partner.test", key_kind="p256", not_before=base + datetime.timedelta(days=1)
        ).certificate,
        pki.user(
            "carol@partner.test", key_kind="p256", not_before=base - datetime.timedelta(days=1)
        ).certificate,
    ]
    rng = random.Random(7)
    seen = base

    def choice() -> tuple[str, tuple[str, ...]] | None:
        found = store.encryption_certificate("carol@partner.test")
        return None if found is None else (found.fingerprint, found.capabilities)

    last, generation, skipped = choice(), store.generation(), 0
    for _ in range(300):
        seen += datetime.timedelta(minutes=rng.choice([0, 1, 5]))
        cert = rng.choice(certs)
        preference = rng.choice([None, None, None, cert, rng.choice(certs)])
        caps = rng.choice([["aes128-gcm"]] * 5 + [["aes256-gcm"]])
        store.harvest(cert, caps, preference, verified=True, seen_at=seen)
        now_choice, now_generation = choice(), store.generation()
        if now_generation == generation:
            skipped += 1
            assert now_choice == last
        last, generation = now_choice, now_generation
    assert skipped > 30  # the shortcut is exercised, not only the bump
    store.db.close_all()  # type: ignore[attr-defined]


def test_candidates_choose_what_the_store_chooses_at_any_time(
    make_store: Callable[..., SyncStore], pki: CertificateFactory, people: People
) -> None:
    clock = [pki.now]
    store = make_store(now=lambda: clock[0])
    early = pki.user(
        "carol@partner.test",
        key_kind="p256",
        not_before=pki.now - datetime.timedelta(days=30),
        not_after=pki.now + datetime.timedelta(days=5),
    )
    late = pki.user(
        "carol@partner.test",
        key_kind="p256",
        not_before=pki.now + datetime.timedelta(days=2),
        not_after=pki.now + datetime.timedelta(days=60),
    )
    store.harvest(early.certificate, ["aes128-gcm"], verified=True)
    store.import_certificate(late.certificate, source=CertificateSource.DIRECTORY)
    _import(store, people)
    addresses = ("carol@partner.test", "alice@acme.test", "nobody@x.test")
    candidates = {a: store.encryption_candidates(a) for a in addresses}
    answers = []
    for days in (0, 3, 10, 400):
        clock[0] = pki.now + datetime.timedelta(days=days)
        for address, kept in candidates.items():
            assert kept.best(clock[0]) == store.encryption_certificate(address), (address, days)
        answers.append(store.encryption_certificate("carol@partner.test"))
    assert [a.fingerprint if a else None for a in answers] == [
        fingerprint(early.certificate),
        fingerprint(late.certificate),
        fingerprint(late.certificate),
        None,
    ]


NODE = r"""
import json, os, sys
from smimeproxy.keystore import MasterSecret, open_store
store = open_store(os.environ["STORE_URL"], MasterSecret.from_env("SMK"), create=True)
out = {"seen": store.generation()}
if sys.argv[1] == "write":
    store.add_user("node-b@acme.test", actor="node-b")
out["after"] = store.generation()
print(json.dumps(out))
"""


def _node(url: str, master: MasterSecret, command: str) -> dict[str, int]:
    env = dict(os.environ, STORE_URL=url, SMK=master.material.hex(), PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", NODE, command], env=env, cwd=ROOT, capture_output=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def test_processes_on_one_postgresql_see_each_others_generation(
    pg_url: str, master: MasterSecret, people: People
) -> None:
    from smimeproxy.keystore import open_store

    store = open_store(pg_url, master, create=True)
    try:
        mine = store.generation()
        other = _node(pg_url, master, "write")
        assert other["seen"] == mine
        assert store.generation() == other["after"] > mine
        store.add_trust(people["alice"].certificate, kind=TrustKind.INTERMEDIATE)
        assert _node(pg_url, master, "read")["seen"] == store.generation() > other["after"]
    finally:
        store.db.close_all()  # type: ignore[attr-defined]


@pytest_twisted.inlineCallbacks
def test_the_async_face_reads_the_generation_in_its_pool(store: SyncStore, people: People):
    pool = ThreadPool(minthreads=1, maxthreads=2, name="generation-test")
    pool.start()
    try:
        keystore = Keystore(store, reactor, pool)
        before = yield keystore.generation()
        yield keystore.add_user("erin@acme.test")
        after = yield keystore.generation()
        assert after > before
        assert after == store.generation()
    finally:
        pool.stop()
