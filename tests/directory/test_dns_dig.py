"""The built-in SMIMEA server asked by ``dig`` (BIND's client) over real sockets."""

from __future__ import annotations

import re

import pytest
import pytest_twisted

from smimeproxy.keystore import SyncStore
from smimeproxy.pki.smimea import parse_smimea_presentation, smimea_for_certificate
from smimeproxy.pki.smimea import smimea_owner_name as owner_of
from tests.directory.conftest import ZONE, People, Server, dig

pytestmark = pytest.mark.integration


def status(output: str) -> str:
    found = re.search(r"status: (\w+)", output)
    assert found, output
    return found.group(1)


def flags(output: str) -> set[str]:
    found = re.search(r"flags: ([a-z ]+);", output)
    assert found, output
    return set(found.group(1).split())


def answers(output: str) -> list[str]:
    """The SMIMEA RDATA in dig's answer section (one per record)."""
    section = output.split(";; ANSWER SECTION:", 1)
    if len(section) == 1:
        return []
    lines = section[1].strip().split("\n\n", 1)[0].splitlines()
    return [line.split("SMIMEA", 1)[1].strip() for line in lines if " SMIMEA " in line]


def expected(issued: object) -> object:
    return smimea_for_certificate(issued.certificate)  # type: ignore[attr-defined]


@pytest_twisted.inlineCallbacks
def test_existing_user_gets_their_certificate(dns_server: Server, people: People, dig_path: str):
    out = yield dig(dig_path, dns_server.port, owner_of("alice@acme.test"), "SMIMEA")
    assert status(out) == "NOERROR"
    assert "aa" in flags(out)
    (rdata,) = answers(out)
    assert parse_smimea_presentation(rdata) == expected(people.alice)
    assert " 600 IN SMIMEA 3 0 0 " in out  # the configured TTL, DANE-EE full certificate


@pytest_twisted.inlineCallbacks
def test_unknown_user_is_nxdomain_with_soa(dns_server: Server, dig_path: str):
    out = yield dig(dig_path, dns_server.port, owner_of("mallory@acme.test"), "SMIMEA")
    assert status(out) == "NXDOMAIN"
    assert re.search(rf"^{re.escape(ZONE)}\.\s+\d+\s+IN\s+SOA\s+ns1\.acme\.test\.", out, re.M)


@pytest_twisted.inlineCallbacks
def test_rotation_shows_in_the_next_answer(
    dns_server: Server, store: SyncStore, people: People, dig_path: str
):
    name = owner_of("alice@acme.test")
    before = yield dig(dig_path, dns_server.port, name, "SMIMEA")
    assert parse_smimea_presentation(answers(before)[0]) == expected(people.alice)
    store.rotate("alice@acme.test", people.alice_new.private_key, people.alice_new.certificate)
    after = yield dig(dig_path, dns_server.port, name, "SMIMEA")
    (rdata,) = answers(after)
    assert parse_smimea_presentation(rdata) == expected(people.alice_new)


@pytest_twisted.inlineCallbacks
def test_revoked_user_is_gone(dns_server: Server, store: SyncStore, people: People, dig_path: str):
    name = owner_of("bob@acme.test")
    before = yield dig(dig_path, dns_server.port, name, "SMIMEA")
    assert status(before) == "NOERROR" and answers(before)
    (key,) = store.keys("bob@acme.test")
    store.revoke_key(key.id, "left the company")
    after = yield dig(dig_path, dns_server.port, name, "SMIMEA")
    assert status(after) == "NXDOMAIN"
    assert answers(after) == []


@pytest_twisted.inlineCallbacks
def test_large_record_truncated_over_udp_complete_over_tcp(
    dns_server: Server, people: People, dig_path: str
):
    name = owner_of("carol@acme.test")
    udp = yield dig(dig_path, dns_server.port, "+notcp", "+ignore", name, "SMIMEA")
    assert status(udp) == "NOERROR"
    assert "tc" in flags(udp)
    assert answers(udp) == []
    tcp = yield dig(dig_path, dns_server.port, "+tcp", name, "SMIMEA")
    assert "tc" not in flags(tcp)
    (rdata,) = answers(tcp)
    assert parse_smimea_presentation(rdata) == expected(people.big)
    assert len(expected(people.big).data) > 1232  # type: ignore[attr-defined]
    # without EDNS the UDP limit is 512 octets, and so even a small record is too big
    small = yield dig(dig_path, dns_server.port, "+noedns", "+ignore", "+notcp",
                      owner_of("alice@acme.test"), "SMIMEA")  # fmt: skip
    assert "tc" in flags(small)
    assert "OPT PSEUDOSECTION" not in small


@pytest_twisted.inlineCallbacks
def test_apex_soa_ns_and_nodata(dns_server: Server, dig_path: str):
    soa = yield dig(dig_path, dns_server.port, ZONE, "SOA", "+norecurse")
    assert status(soa) == "NOERROR" and "aa" in flags(soa)
    assert re.search(r"IN\s+SOA\s+ns1\.acme\.test\. hostmaster\.acme\.test\. \d+ ", soa)
    ns = yield dig(dig_path, dns_server.port, ZONE, "NS")
    assert re.search(r"IN\s+NS\s+ns1\.acme\.test\.", ns)
    nodata = yield dig(dig_path, dns_server.port, owner_of("alice@acme.test"), "A")
    assert status(nodata) == "NOERROR"
    assert "ANSWER: 0" in nodata and "AUTHORITY: 1" in nodata


@pytest_twisted.inlineCallbacks
def test_soa_serial_grows_with_changes(
    dns_server: Server, store: SyncStore, people: People, dig_path: str
):
    first = yield dig(dig_path, dns_server.port, "+short", ZONE, "SOA")
    store.rotate("alice@acme.test", people.alice_new.private_key, people.alice_new.certificate)
    second = yield dig(dig_path, dns_server.port, "+short", ZONE, "SOA")
    assert int(second.split()[2]) > int(first.split()[2])


@pytest_twisted.inlineCallbacks
def test_foreign_names_and_classes_refused(dns_server: Server, dig_path: str):
    other = yield dig(dig_path, dns_server.port, "example.org", "A")
    assert status(other) == "REFUSED"
    chaos = yield dig(dig_path, dns_server.port, "version.bind", "TXT", "CH")
    assert status(chaos) == "REFUSED"
    axfr = yield dig(dig_path, dns_server.port, ZONE, "AXFR")
    assert "Transfer failed" in axfr or "REFUSED" in axfr


@pytest_twisted.inlineCallbacks
def test_edns_version_1_gets_badvers(dns_server: Server, dig_path: str):
    out = yield dig(dig_path, dns_server.port, "+edns=1", "+noednsnegotiation", ZONE, "SOA")
    assert status(out) == "BADVERS"
