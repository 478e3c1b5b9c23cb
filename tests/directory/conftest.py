"""Fixtures for the directory: a store with local users, the DNS/HTTP servers on
loopback in the test's reactor, and ``dig`` run without blocking it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.threadpool import ThreadPool

from smimeproxy.directory.dns import (
    DNSDatagramServer,
    DNSStreamServerFactory,
    SMIMEAAuthority,
    SMIMEAResponder,
)
from smimeproxy.directory.publication import LivePublication, Publication
from smimeproxy.keystore import MasterSecret, SyncStore, open_store
from smimeproxy.testing import CertificateFactory, Issued
from tests.conftest import require_tool

DOMAIN = "acme.test"
ZONE = "_smimecert.acme.test"


@pytest.fixture(scope="session")
def pki() -> CertificateFactory:
    return CertificateFactory()


@dataclass
class People:
    alice: Issued
    bob: Issued
    alice_new: Issued
    big: Issued  # RSA-4096: its SMIMEA record does not fit a UDP reply


@pytest.fixture(scope="session")
def people(pki: CertificateFactory) -> People:
    return make_people(pki)


def make_people(pki: CertificateFactory) -> People:
    """Alice (and her next certificate), Bob, and Carol with an RSA-4096 certificate
    under an RSA-4096 CA (a record of over 1232 octets)."""
    big_ca = pki.ca("smimeproxy Test RSA-4096 CA", pki.root, key_kind="rsa4096")
    return People(
        alice=pki.user("alice@acme.test", key_kind="p256"),
        bob=pki.user("bob@acme.test", key_kind="p256"),
        alice_new=pki.user("alice@acme.test", key_kind="p256"),
        big=pki.user("carol@acme.test", big_ca, key_kind="rsa4096"),
    )


@pytest.fixture
def store(tmp_path: Path, people: People) -> Iterator[SyncStore]:
    s = open_store(
        f"sqlite:{tmp_path / 'store.db'}",
        MasterSecret(os.urandom(32), "test master key"),
        create=True,
    )
    s.import_key(people.alice.private_key, people.alice.certificate)
    s.import_key(people.bob.private_key, people.bob.certificate)
    s.import_key(people.big.private_key, people.big.certificate)
    yield s
    s.close()


@pytest.fixture
def threadpool() -> Iterator[ThreadPool]:
    pool = ThreadPool(minthreads=1, maxthreads=2, name="test-directory")
    pool.start()
    yield pool
    pool.stop()


@dataclass
class Server:
    port: int
    publication: Publication
    live: LivePublication


@pytest.fixture
def dns_server(store: SyncStore, threadpool: ThreadPool) -> Iterator[Server]:
    """The built-in DNS server on 127.0.0.1, UDP and TCP on the same free port."""
    publication = Publication(store, [DOMAIN])
    live = LivePublication(publication, reactor, threadpool)
    authority = SMIMEAAuthority(live, [DOMAIN], ttl=600, nameserver="ns1.acme.test")
    responder = SMIMEAResponder(authority)
    for _ in range(20):
        tcp = reactor.listenTCP(0, DNSStreamServerFactory(responder), interface="127.0.0.1")
        port = tcp.getHost().port
        try:
            udp = reactor.listenUDP(port, DNSDatagramServer(responder), interface="127.0.0.1")
            break
        except Exception:
            tcp.stopListening()
    else:
        pytest.fail("no free port for UDP and TCP")
    yield Server(port, publication, live)
    pytest_twisted.blockon(udp.stopListening())
    pytest_twisted.blockon(tcp.stopListening())


@pytest.fixture(scope="session")
def dig_path() -> str:
    return require_tool("dig")


def dig(dig_path: str, port: int, *args: str) -> Deferred[str]:
    """Run dig against 127.0.0.1:port without blocking the reactor; its stdout."""
    argv = ["@127.0.0.1", "-p", str(port), "+time=5", "+tries=1", *args]
    d = getProcessOutputAndValue(dig_path, argv, env=dict(os.environ))

    def done(result: tuple[bytes, bytes, int]) -> str:
        out, err, _code = result
        return out.decode() + err.decode()

    return d.addCallback(done)
