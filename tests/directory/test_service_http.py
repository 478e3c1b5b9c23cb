"""``make_service`` from a configuration file: DNS and HTTP listeners on loopback,
certificates downloaded as PEM and as PKCS#7 certs-only (checked with openssl)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.web.client import Agent, readBody

from smimeproxy.config import load_config
from smimeproxy.directory.publication import Publication
from smimeproxy.directory.service import make_service
from smimeproxy.keystore import SyncStore
from smimeproxy.pki.smimea import parse_smimea_presentation, smimea_for_certificate
from smimeproxy.pki.smimea import smimea_owner_name as owner_of
from tests.directory.conftest import People, dig
from tests.integration.bind import free_port
from tests.modules import require_module


@pytest.fixture
def running(tmp_path: Path, store: SyncStore) -> Iterator[tuple[int, int]]:
    dns_port, http_port = free_port(), free_port()
    path = tmp_path / "smimeproxy.toml"
    path.write_text(
        f"""
[keystore]
url = "sqlite:store.db"
master_key_file = "master.key"

[directory]
dns_listen = ["udp:{dns_port}:interface=127.0.0.1", "tcp:{dns_port}:interface=127.0.0.1"]
http_listen = ["tcp:{http_port}:interface=127.0.0.1"]
domains = ["acme.test"]
ttl = 900
smimea_matching_type = 1
"""
    )
    service = make_service(load_config(path), store, reactor, nameserver="ns1.acme.test")
    service.startService()
    yield dns_port, http_port
    pytest_twisted.blockon(service.stopService())


def get(port: int, path: str):  # type: ignore[no-untyped-def]
    d = Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}{path}".encode())

    def body(response):  # type: ignore[no-untyped-def]
        return readBody(response).addCallback(lambda data: (response, data))

    return d.addCallback(body)


@pytest_twisted.inlineCallbacks
def test_dns_from_config_uses_configured_parameters(
    running: tuple[int, int], people: People, dig_path: str
):
    dns_port, _ = running
    out = yield dig(dig_path, dns_port, "+short", owner_of("alice@acme.test"), "SMIMEA")
    record = parse_smimea_presentation(out.strip())
    assert record == smimea_for_certificate(people.alice.certificate, matching_type=1)
    tcp = yield dig(dig_path, dns_port, "+tcp", "+short", owner_of("bob@acme.test"), "SMIMEA")
    assert parse_smimea_presentation(tcp.strip()).matching_type == 1


@pytest_twisted.inlineCallbacks
def test_http_pem_and_p7c(running: tuple[int, int], people: People, tmp_path: Path, openssl: str):
    _, port = running
    response, body = yield get(port, "/certs/alice@acme.test")
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"application/pem-certificate-chain"]
    assert x509.load_pem_x509_certificates(body) == [people.alice.certificate]
    response, body = yield get(port, "/certs/Alice%40acme.test.p7c")
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [
        b"application/pkcs7-mime; smime-type=certs-only"
    ]
    (tmp_path / "alice.p7c").write_bytes(body)
    shown = subprocess.run(
        [openssl, "pkcs7", "-inform", "DER", "-in", str(tmp_path / "alice.p7c"), "-print_certs"],
        capture_output=True,
        check=True,
    ).stdout
    assert x509.load_pem_x509_certificates(shown) == [people.alice.certificate]


@pytest_twisted.inlineCallbacks
def test_http_not_found_and_live(running: tuple[int, int], store: SyncStore, people: People):
    _, port = running
    for path in ("/certs/mallory@acme.test", "/certs/alice@other.test", "/certs/x", "/", "/certs/"):
        response, body = yield get(port, path)
        assert response.code == 404, path
        assert b"Traceback" not in body
    store.rotate("alice@acme.test", people.alice_new.private_key, people.alice_new.certificate)
    response, body = yield get(port, "/certs/alice@acme.test.pem")
    assert x509.load_pem_x509_certificates(body) == [people.alice_new.certificate]
    (key,) = store.keys("bob@acme.test")
    store.revoke_key(key.id, "compromised")
    response, _ = yield get(port, "/certs/bob@acme.test")
    assert response.code == 404


def test_publication_follows_aliases_and_expiry(store: SyncStore, people: People):
    now = [people.alice.certificate.not_valid_before_utc]
    publication = Publication(store, ["acme.test"], now=lambda: now[0])
    assert publication.by_address("alice.smith@acme.test") is None
    store.add_alias("alice@acme.test", "alice.smith@acme.test")
    found = publication.by_address("alice.smith@acme.test")
    assert found is not None and found.certificates == (people.alice.certificate,)
    assert found.owner == owner_of("alice.smith@acme.test")
    everything = publication.everything("acme.test")
    assert {p.address for p in everything} == {
        "alice@acme.test", "alice.smith@acme.test", "bob@acme.test", "carol@acme.test"
    }  # fmt: skip
    now[0] = people.alice.certificate.not_valid_after_utc
    assert publication.by_address("alice@acme.test") is None  # expired: no longer published


@pytest.fixture
def ldap_running(tmp_path: Path, store: SyncStore) -> Iterator[int]:
    require_module("ldaptor")
    port = free_port()
    path = tmp_path / "ldap.toml"
    path.write_text(
        f"""
[directory]
ldap_listen = ["tcp:{port}:interface=127.0.0.1"]
domains = ["acme.test"]
"""
    )
    service = make_service(load_config(path), store, reactor)
    service.startService()
    yield port
    pytest_twisted.blockon(service.stopService())


def ldapsearch(port: int, *args: str):  # type: ignore[no-untyped-def]
    from twisted.internet.utils import getProcessOutputAndValue

    from tests.conftest import require_tool

    argv = ["-x", "-LLL", "-o", "ldif-wrap=no", "-H", f"ldap://127.0.0.1:{port}", *args]
    return getProcessOutputAndValue(require_tool("ldapsearch"), argv)


def ldif_values(ldif: bytes, attribute: str) -> list[bytes]:
    import base64

    prefix = attribute.encode() + b":: "
    return [base64.b64decode(line[len(prefix) :]) for line in ldif.splitlines()
            if line.startswith(prefix)]  # fmt: skip


@pytest_twisted.inlineCallbacks
def test_ldapsearch_finds_certificates(ldap_running: int, people: People, store: SyncStore):
    from cryptography.hazmat.primitives.serialization import pkcs7

    out, err, code = yield ldapsearch(
        ldap_running, "-b", "dc=acme,dc=test", "(mail=alice@acme.test)",
        "userCertificate;binary", "userSMIMECertificate",
    )  # fmt: skip
    assert code == 0, err
    assert b"dn: mail=alice@acme.test,dc=acme,dc=test" in out
    (der,) = ldif_values(out, "userCertificate;binary")
    assert x509.load_der_x509_certificate(der) == people.alice.certificate
    (p7,) = ldif_values(out, "userSMIMECertificate")
    assert pkcs7.load_der_pkcs7_certificates(p7) == [people.alice.certificate]
    assert b"objectClass" not in out  # only what was asked for
    # an OR of two addresses, one unknown; rotation shows at once
    store.rotate("alice@acme.test", people.alice_new.private_key, people.alice_new.certificate)
    out, _, code = yield ldapsearch(
        ldap_running, "-b", "dc=acme,dc=test",
        "(|(mail=ALICE@acme.test)(mail=nobody@acme.test)(email=bob@acme.test))",
    )  # fmt: skip
    assert code == 0
    certs = [x509.load_der_x509_certificate(d) for d in ldif_values(out, "userCertificate;binary")]
    assert certs == [people.alice_new.certificate, people.bob.certificate]


@pytest_twisted.inlineCallbacks
def test_ldap_no_enumeration_no_writes_no_binds(ldap_running: int, tmp_path: Path):
    out, _, code = yield ldapsearch(ldap_running, "-b", "dc=acme,dc=test", "(mail=*)")
    assert code == 0 and out.strip() == b""
    out, _, code = yield ldapsearch(ldap_running, "-b", "dc=acme,dc=test", "(cn=alice*)")
    assert code == 0 and out.strip() == b""
    _, err, code = yield ldapsearch(ldap_running, "-D", "cn=admin,dc=acme,dc=test", "-w", "x",
                                    "-b", "dc=acme,dc=test", "(mail=alice@acme.test)")  # fmt: skip
    assert code == 49, err  # invalidCredentials
    from twisted.internet.utils import getProcessOutputAndValue

    from tests.conftest import require_tool

    ldif = tmp_path / "add.ldif"
    ldif.write_text("dn: mail=x@acme.test,dc=acme,dc=test\nobjectClass: top\nmail: x@acme.test\n")
    _, err, code = yield getProcessOutputAndValue(
        require_tool("ldapmodify"),
        ["-x", "-a", "-H", f"ldap://127.0.0.1:{ldap_running}", "-f", str(ldif)],
    )
    assert code == 53, err  # unwillingToPerform


@pytest_twisted.inlineCallbacks
def test_ldap_garbage_closes_connection_quietly(ldap_running: int):
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol

    class Peer(Protocol):
        def __init__(self) -> None:
            from twisted.internet.defer import Deferred

            self.closed: Deferred[None] = Deferred()

        def connectionLost(self, reason: object = None) -> None:
            self.closed.callback(None)

    peer = Peer()
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", ldap_running), peer)
    peer.transport.write(b"\x30\x03\x02\x01\xff\xff\xff\x04")  # BER that is no LDAPMessage
    yield peer.closed
    out, _, code = yield ldapsearch(ldap_running, "-b", "", "-s", "base", "(objectClass=*)")
    assert code == 0 and b"supportedLDAPVersion: 3" in out  # the server still answers


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_ldap_fuzz_never_raises(data: bytes):
    require_module("ldaptor")
    from twisted.internet.testing import StringTransport

    from smimeproxy.directory.ldap import CertificateLDAPServer

    server = CertificateLDAPServer(live=None)  # type: ignore[arg-type]  # never reached
    server.makeConnection(StringTransport())
    search_prefix = b"\x30\x84"  # whatever follows, nothing may escape dataReceived
    for chunk in (data, search_prefix + data):
        server.dataReceived(chunk)
    server.connectionLost(None)  # the idle timer goes with the connection


def test_ldap_idle_connection_is_closed() -> None:
    """A client that connects and says nothing does not hold the connection forever."""
    require_module("ldaptor")
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from smimeproxy.directory.ldap import LDAP_IDLE_TIMEOUT, CertificateLDAPServer

    clock = Clock()
    server = CertificateLDAPServer(live=None)  # type: ignore[arg-type]  # never reached
    server.callLater = clock.callLater
    transport = StringTransport()
    server.makeConnection(transport)
    clock.advance(LDAP_IDLE_TIMEOUT - 1)
    server.dataReceived(b"")  # a read restarts the clock
    clock.advance(LDAP_IDLE_TIMEOUT - 1)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting or transport.disconnected


def test_http_idle_timeout_is_short() -> None:
    """Twisted's Site keeps an idle connection 12 hours unless told otherwise."""
    from smimeproxy.directory.http import HTTP_IDLE_TIMEOUT, make_site

    site = make_site(None)  # type: ignore[arg-type]  # no request is made
    assert site.timeOut == HTTP_IDLE_TIMEOUT == 60
