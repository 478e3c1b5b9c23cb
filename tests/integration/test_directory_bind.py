"""Push mode into BIND 9 (RFC 2136 + TSIG, inline DNSSEC signing) and outbound lookup
through a validating unbound, on 127.0.0.1."""

from __future__ import annotations

import base64
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from twisted.internet.task import deferLater

from smimeproxy.directory.lookup import SMIMEALookup
from smimeproxy.directory.publication import Publication
from smimeproxy.directory.push import DNSPusher, TSIGKey, load_tsig_key
from smimeproxy.errors import UpstreamError
from smimeproxy.keystore import CertificateSource, MasterSecret, SyncStore, open_store
from smimeproxy.pki.smimea import smimea_owner_name as owner_of
from smimeproxy.testing import CertificateFactory
from tests.directory.conftest import People, make_people
from tests.integration.bind import BindServer, UnboundServer, dig

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def people() -> People:
    return make_people(CertificateFactory())


@pytest.fixture(scope="module")
def pki_people_extra() -> object:
    """One more certificate for alice (a third generation)."""
    return CertificateFactory().user("alice@acme.test", key_kind="p256")


@pytest.fixture(scope="module")
def bind() -> Iterator[BindServer]:
    with tempfile.TemporaryDirectory(prefix="smimeproxy-bind-") as tmp:
        os.chmod(tmp, 0o755)
        server = BindServer(Path(tmp) / "named")
        server.start()
        yield server
        server.stop()


@pytest.fixture(scope="module")
def unbound(bind: BindServer) -> Iterator[UnboundServer]:
    with tempfile.TemporaryDirectory(prefix="smimeproxy-unbound-") as tmp:
        server = UnboundServer(Path(tmp), bind)
        server.start()
        yield server
        server.stop()


def new_store(path: Path) -> SyncStore:
    return open_store(f"sqlite:{path}", MasterSecret(os.urandom(32), "test"), create=True)


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory, people: People) -> Iterator[SyncStore]:
    store = new_store(tmp_path_factory.mktemp("ours") / "store.db")
    store.import_key(people.alice.private_key, people.alice.certificate)
    store.import_key(people.bob.private_key, people.bob.certificate)
    store.import_key(people.big.private_key, people.big.certificate)
    yield store
    store.close()


@pytest.fixture(scope="module")
def pusher(bind: BindServer, ours: SyncStore) -> DNSPusher:
    key = load_tsig_key(bind.key_file)
    return DNSPusher(Publication(ours, ["acme.test"]), ["acme.test"], "127.0.0.1", bind.port, key,
                     ttl=120)  # fmt: skip


def at_bind(bind: BindServer, *args: str) -> str:
    return dig("@127.0.0.1", "-p", str(bind.port), *args)


def test_tsig_key_file_is_read():
    with tempfile.NamedTemporaryFile("w", suffix=".key") as f:
        secret = base64.b64encode(b"k" * 32).decode()
        f.write(f'key "push.acme.test" {{\n\talgorithm hmac-sha512;\n\tsecret "{secret}";\n}};\n')
        f.flush()
        key = load_tsig_key(Path(f.name))
    assert key == TSIGKey("push.acme.test", "hmac-sha512", b"k" * 32)
    assert secret not in repr(key)


def test_push_publishes_signed_records(bind: BindServer, pusher: DNSPusher, people: People):
    assert pusher.sync() == 3
    assert pusher.sync() == 0  # nothing changed: nothing sent
    out = at_bind(bind, "+dnssec", "+multiline", owner_of("alice@acme.test"), "SMIMEA")
    assert "status: NOERROR" in out
    assert "SMIMEA 3 0 0" in out
    assert "RRSIG SMIMEA" in out  # signed by BIND's inline signing
    der = people.alice.certificate.public_bytes(serialization.Encoding.DER)
    assert der.hex().upper()[:48] in "".join(out.split()).upper()


def test_push_follows_rotation_and_revocation(
    bind: BindServer, pusher: DNSPusher, ours: SyncStore, people: People
):
    pusher.sync()
    ours.rotate("alice@acme.test", people.alice_new.private_key, people.alice_new.certificate)
    (bob_key,) = ours.keys("bob@acme.test")
    ours.revoke_key(bob_key.id, "left")
    assert pusher.sync() == 2
    alice = "".join(at_bind(bind, "+short", owner_of("alice@acme.test"), "SMIMEA").split())
    new_der = people.alice_new.certificate.public_bytes(serialization.Encoding.DER)
    assert alice.upper() == "300" + new_der.hex().upper()
    bob = at_bind(bind, "+dnssec", owner_of("bob@acme.test"), "SMIMEA")
    assert "status: NXDOMAIN" in bob and "NSEC" in bob  # gone, and provably so


def test_wrong_tsig_key_is_refused(bind: BindServer, ours: SyncStore):
    wrong = TSIGKey("smimeproxy-push", "hmac-sha256", os.urandom(32))
    pusher = DNSPusher(Publication(ours, ["acme.test"]), ["acme.test"], "127.0.0.1", bind.port,
                       wrong)  # fmt: skip
    with pytest.raises(UpstreamError):
        pusher.sync()


def test_restart_removes_leftovers(
    bind: BindServer, pusher: DNSPusher, tmp_path: Path, people: People
):
    """A fresh pusher for a store without carol deletes carol's records (zone transfer)."""
    pusher.sync()
    assert "SMIMEA" in at_bind(bind, "+noall", "+answer", owner_of("carol@acme.test"), "SMIMEA")
    other = new_store(tmp_path / "other.db")
    other.import_key(people.alice_new.private_key, people.alice_new.certificate)
    fresh = DNSPusher(Publication(other, ["acme.test"]), ["acme.test"], "127.0.0.1", bind.port,
                      load_tsig_key(bind.key_file))  # fmt: skip
    fresh.sync()
    out = at_bind(bind, owner_of("carol@acme.test"), "SMIMEA")
    assert "status: NXDOMAIN" in out
    pusher._pushed = None  # put the module's records back for the following tests
    pusher.sync()


def test_lookup_through_validating_unbound(
    unbound: UnboundServer, pusher: DNSPusher, tmp_path: Path, people: People
):
    pusher.sync()
    partner = new_store(tmp_path / "partner.db")
    lookup = SMIMEALookup("127.0.0.1", unbound.port, require_dnssec=True, store=partner)
    result = lookup.query("alice@acme.test")
    assert result.authenticated and result.refused is None
    assert [c.serial_number for c in result.certificates] == [
        people.alice_new.certificate.serial_number
    ]
    assert 0 < result.ttl <= 120
    certs = lookup("alice@acme.test")
    assert certs == [people.alice_new.certificate]
    (recorded,) = partner.certificates("alice@acme.test")
    assert recorded.source is CertificateSource.SMIMEA
    # validated NXDOMAIN: no certificate, cached negatively
    assert lookup("mallory@acme.test") == []


def test_unvalidated_answer_refused_when_policy_demands(bind: BindServer, pusher: DNSPusher):
    pusher.sync()
    # BIND answers authoritatively but does not validate: no AD bit
    strict = SMIMEALookup("127.0.0.1", bind.port, require_dnssec=True)
    result = strict.query("alice@acme.test")
    assert not result.authenticated and result.refused and "not DNSSEC-validated" in result.refused
    assert strict("alice@acme.test") == []
    lax = SMIMEALookup("127.0.0.1", bind.port, require_dnssec=False)
    assert len(lax("alice@acme.test")) == 1


def test_large_record_over_tcp_fallback(unbound: UnboundServer, pusher: DNSPusher, people: People):
    pusher.sync()
    lookup = SMIMEALookup("127.0.0.1", unbound.port, require_dnssec=True)
    assert lookup("carol@acme.test") == [people.big.certificate]


def test_unreachable_resolver_is_an_upstream_error():
    lookup = SMIMEALookup("127.0.0.1", 9, require_dnssec=False, timeout=1)
    with pytest.raises(UpstreamError):
        lookup("alice@acme.test")


def test_lookup_caches_for_the_record_ttl(
    bind: BindServer, pusher: DNSPusher, ours: SyncStore, pki_people_extra: object
):
    pusher.sync()
    now = [1000.0]
    lookup = SMIMEALookup("127.0.0.1", bind.port, require_dnssec=False, clock=lambda: now[0])
    (before,) = lookup("alice@acme.test")
    replacement = pki_people_extra
    ours.rotate("alice@acme.test", replacement.private_key, replacement.certificate)  # type: ignore[attr-defined]
    pusher.sync()
    now[0] += 119  # the pusher's TTL is 120 s
    assert lookup("alice@acme.test") == [before]
    now[0] += 2
    assert lookup("alice@acme.test") == [replacement.certificate]  # type: ignore[attr-defined]


@pytest_twisted.inlineCallbacks
def test_push_service_from_config(bind: BindServer, tmp_path: Path):
    """``[directory.push]`` in the config: the service pushes on start and after a
    revocation, within its interval."""
    from twisted.internet import reactor
    from twisted.python.threadpool import ThreadPool

    from smimeproxy.config import load_config
    from smimeproxy.directory.push import PushService
    from smimeproxy.directory.service import make_service

    path = tmp_path / "smimeproxy.toml"
    path.write_text(
        f"""
[keystore]
url = "sqlite:store.db"
master_key_file = "master.key"

[directory]
domains = ["acme.test"]
ttl = 60

[directory.push]
server = "127.0.0.1"
port = {bind.port}
tsig_key_file = "{bind.key_file}"
"""
    )
    store = new_store(tmp_path / "store.db")
    dave = CertificateFactory().user("dave@acme.test", key_kind="p256")
    store.import_key(dave.private_key, dave.certificate)
    pool = ThreadPool(1, 1)
    pool.start()
    service = make_service(load_config(path), store, reactor, pool)
    (pusher,) = [s for s in service if isinstance(s, PushService)]  # type: ignore[attr-defined]
    pusher.interval = 0.2
    service.startService()
    try:
        name = owner_of("dave@acme.test")
        deadline = time.monotonic() + 10
        while "ANSWER: 1" not in at_bind(bind, name, "SMIMEA"):
            assert time.monotonic() < deadline, "the push service did not publish dave"
            yield deferLater(reactor, 0.2, lambda: None)
        (key,) = store.keys("dave@acme.test")
        store.revoke_key(key.id, "left")
        while "NXDOMAIN" not in at_bind(bind, name, "SMIMEA"):
            assert time.monotonic() < deadline, "the push service did not withdraw dave"
            yield deferLater(reactor, 0.2, lambda: None)
    finally:
        yield service.stopService()
        pool.stop()
        store.close()
