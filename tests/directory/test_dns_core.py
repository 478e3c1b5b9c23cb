"""The DNS core fed bytes: malformed queries and updates get the right error codes,
nothing crashes, and the TCP protocol survives peers that vanish mid-message."""

from __future__ import annotations

import sqlite3
import struct
from pathlib import Path

import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.names import dns

from smimeproxy.directory.dns import (
    TCP_IDLE_TIMEOUT,
    Answer,
    DNSStreamServer,
    SMIMEAAuthority,
    SMIMEAResponder,
    encode_answer,
    reply_bytes,
)
from smimeproxy.directory.records import SMIMEA, Record_SMIMEA, smimea_message_types
from smimeproxy.directory.wire import Request, parse_request
from smimeproxy.pki.smimea import smimea_for_certificate, smimea_owner_name
from tests.directory.conftest import DOMAIN, ZONE, People, Server


def query(name: str, qtype: int = SMIMEA, *, ident: int = 4242, edns: bool = True) -> bytes:
    m = dns.Message(ident, recDes=1)
    m.queries = [dns.Query(name, qtype, dns.IN)]
    if edns:
        m.additional = [dns._OPTHeader(4096)]
    return m.toStr()


def decode(wire: bytes) -> dns.Message:
    m = smimea_message_types(dns.Message())
    m.fromStr(wire)
    return m


def rcode_of(wire: bytes) -> int:
    return struct.unpack("!H", wire[2:4])[0] & 0xF


def responder_for(server: Server) -> SMIMEAResponder:
    return SMIMEAResponder(SMIMEAAuthority(server.live, [DOMAIN], nameserver="ns1.acme.test"))


@pytest_twisted.inlineCallbacks
def test_answer_decodes_as_smimea(dns_server: Server, people: People):
    responder = responder_for(dns_server)
    wire = yield responder.respond(query(smimea_owner_name("alice@acme.test")), udp=True)
    m = decode(wire)
    assert m.id == 4242 and m.answer and m.auth and m.rCode == dns.OK
    (rr,) = m.answers
    assert isinstance(rr.payload, Record_SMIMEA)
    assert rr.payload.record() == smimea_for_certificate(people.alice.certificate)


@pytest_twisted.inlineCallbacks
def test_malformed_queries(dns_server: Server):
    responder = responder_for(dns_server)
    good = query(ZONE, dns.SOA, ident=0x1234)
    # garbage after a valid header: FORMERR echoing the id
    wire = yield responder.respond(good[:12] + b"\xff" * 7, udp=True)
    assert wire[:2] == b"\x12\x34" and rcode_of(wire) == dns.EFORMAT
    # two questions
    m = dns.Message(7)
    m.queries = [dns.Query(ZONE, dns.SOA), dns.Query(ZONE, dns.NS)]
    wire = yield responder.respond(m.toStr(), udp=True)
    assert rcode_of(wire) == dns.EFORMAT
    # no question
    wire = yield responder.respond(dns.Message(8).toStr(), udp=True)
    assert rcode_of(wire) == dns.EFORMAT
    # two OPT records (RFC 6891 6.1.1)
    m = dns.Message(9)
    m.queries = [dns.Query(ZONE, dns.SOA)]
    m.additional = [dns._OPTHeader(1232), dns._OPTHeader(1232)]
    wire = yield responder.respond(m.toStr(), udp=True)
    assert rcode_of(wire) == dns.EFORMAT
    # too short to answer, and responses, are dropped
    assert (yield responder.respond(b"\x00\x01", udp=True)) is None
    response = bytearray(good)
    response[2] |= 0x80
    assert (yield responder.respond(bytes(response), udp=True)) is None


@pytest_twisted.inlineCallbacks
def test_updates_and_other_opcodes_not_implemented(dns_server: Server):
    responder = responder_for(dns_server)
    for opcode in (dns.OP_INVERSE, dns.OP_STATUS, dns.OP_NOTIFY, 5, 15):  # 5: UPDATE
        m = dns.Message(99, opCode=opcode)
        m.queries = [dns.Query(ZONE, dns.SOA)]
        wire = yield responder.respond(m.toStr(), udp=True)
        reply = decode(wire)
        assert reply.rCode == dns.ENOTIMP and reply.opCode == opcode and reply.answer
    # an update with a broken body is still NOTIMP, not a crash
    broken = struct.pack("!6H", 5, 5 << 11, 1, 0, 3, 0) + b"\x03abc"
    assert rcode_of((yield responder.respond(broken, udp=True))) == dns.ENOTIMP


@pytest_twisted.inlineCallbacks
def test_nonascii_name_refused(dns_server: Server):
    responder = responder_for(dns_server)
    m = dns.Message(3)
    m.queries = [dns.Query(b"\xc3\xa9." + ZONE.encode(), SMIMEA)]
    wire = yield responder.respond(m.toStr(), udp=True)
    assert rcode_of(wire) in (dns.EREFUSED, dns.ENAME)


@pytest_twisted.inlineCallbacks
def test_case_insensitive_names(dns_server: Server):
    responder = responder_for(dns_server)
    name = smimea_owner_name("alice@acme.test").upper()
    reply = decode((yield responder.respond(query(name), udp=True)))
    assert reply.rCode == dns.OK and len(reply.answers) == 1
    assert reply.queries[0].name.name == name.encode()  # the question is echoed as asked


@pytest_twisted.inlineCallbacks
def test_store_failure_is_servfail(dns_server: Server, tmp_path: Path):
    responder = responder_for(dns_server)
    with sqlite3.connect(tmp_path / "store.db") as db:  # the store breaks under us
        db.execute("DROP TABLE audit")
    wire = yield responder.respond(query(smimea_owner_name("bob@acme.test")), udp=True)
    assert rcode_of(wire) == dns.ESERVER


# -- fuzz: the parser never raises, and whatever parses can be answered ------------------

_REQUEST = query(ZONE, dns.SOA)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes):
    result = parse_request(data)
    assert result is None or isinstance(result, (bytes, Request))
    if isinstance(result, Request):
        wire = reply_bytes(result, encode_answer(result, Answer(dns.ENAME)), 512)
        assert len(wire) <= 512
        assert decode(wire).id == result.id


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(_REQUEST) - 1), st.integers(0, 255), st.integers(0, len(_REQUEST)))
def test_fuzz_mutated_and_cut_queries(pos: int, value: int, cut: int):
    data = bytearray(_REQUEST)
    data[pos] = value
    result = parse_request(bytes(data[:cut]) if cut >= 12 else bytes(data))
    assert result is None or isinstance(result, (bytes, Request))
    if isinstance(result, bytes):
        assert result[:2] == bytes(data[:2])  # error replies keep the id
        assert result[2] & 0x80  # and are responses


# -- TCP framing ---------------------------------------------------------------------


class _Immediate:
    """A responder that answers synchronously with an echo (to test framing only)."""

    def respond(self, data: bytes, *, udp: bool):  # type: ignore[no-untyped-def]
        from twisted.internet.defer import succeed

        result = parse_request(data)
        if isinstance(result, Request):
            return succeed(reply_bytes(result, encode_answer(result, Answer(dns.ENAME)), None))
        return succeed(result)


def test_tcp_peer_disconnecting_at_every_byte():
    framed = struct.pack("!H", len(_REQUEST)) + _REQUEST
    for cut in range(len(framed) + 1):
        proto = DNSStreamServer(_Immediate(), Clock())  # type: ignore[arg-type]
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(framed[:cut])
        proto.connectionLost(None)  # type: ignore[arg-type]
        if cut == len(framed):
            assert decode(transport.value()[2:]).rCode == dns.ENAME


def test_tcp_pipelined_queries_and_idle_timeout():
    clock = Clock()
    proto = DNSStreamServer(_Immediate(), clock)  # type: ignore[arg-type]
    transport = StringTransport()
    proto.makeConnection(transport)
    one = query(ZONE, dns.SOA, ident=1)
    two = query(ZONE, dns.NS, ident=2)
    proto.dataReceived(struct.pack("!H", len(one)) + one + struct.pack("!H", len(two)) + two)
    out = transport.value()
    first_len = struct.unpack("!H", out[:2])[0]
    assert decode(out[2 : 2 + first_len]).id == 1
    assert decode(out[4 + first_len :]).id == 2
    clock.advance(TCP_IDLE_TIMEOUT - 1)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnecting


def test_tcp_response_message_closes_connection():
    proto = DNSStreamServer(_Immediate(), Clock())  # type: ignore[arg-type]
    transport = StringTransport()
    proto.makeConnection(transport)
    response = bytearray(_REQUEST)
    response[2] |= 0x80
    proto.dataReceived(struct.pack("!H", len(response)) + bytes(response))
    assert transport.value() == b"" and transport.disconnecting


def test_record_smimea_round_trip():
    record = Record_SMIMEA(3, 1, 1, bytes(range(32)), ttl=60)
    rr = dns.RRHeader("x." + ZONE, SMIMEA, dns.IN, 60, record)
    m = dns.Message(1, answer=1)
    m.answers = [rr]
    (back,) = decode(m.toStr()).answers
    assert back.payload == record
    assert "SMIMEA" in str(back.payload)


# -- the request parser's edge cases ---------------------------------------------------


def _header(qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0, flags: int = 0x0100) -> bytes:
    return struct.pack("!6H", 0xBEEF, flags, qd, an, ns, ar)


_QUESTION = b"\x04_x_y\x04acme\x04test\x00" + struct.pack("!HH", SMIMEA, dns.IN)
_OPT = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)


def test_parser_accepts_plain_and_edns_queries():
    plain = parse_request(_header() + _QUESTION)
    assert isinstance(plain, Request)
    assert plain.name == b"_x_y.acme.test" and plain.qtype == SMIMEA and not plain.edns
    assert plain.udp_limit == 512 and plain.question == _QUESTION
    edns = parse_request(_header(ar=1) + _QUESTION + _OPT)
    assert isinstance(edns, Request) and edns.edns and edns.udp_limit == 1232


def test_parser_rejects_what_rfcs_forbid():
    formerr = [
        _header() + _QUESTION + b"\x00",  # trailing garbage
        _header() + _QUESTION[:-1],  # cut question
        _header(an=1) + _QUESTION + _OPT,  # OPT outside the additional section
        _header(ar=2) + _QUESTION + _OPT + _OPT,  # two OPT records
        _header(ar=1) + _QUESTION + b"\x01a" + _OPT[1:],  # OPT not owned by the root
        _header() + b"\xc0\x0c" + _QUESTION[-4:],  # a pointer in the question
        _header(ar=1) + _QUESTION + b"\xc0\x20" + _OPT[1:],  # a pointer to itself
        _header() + b"\x3f" + b"a" * 63 + (b"\x3f" + b"a" * 63) * 4 + b"\x00" + _QUESTION[-4:],
        _header() + b"\x41a\x00" + _QUESTION[-4:],  # extended label type
    ]
    for data in formerr:
        reply = parse_request(data)
        assert isinstance(reply, bytes), data
        assert reply[:2] == b"\xbe\xef" and reply[3] & 0xF == dns.EFORMAT, data


@pytest_twisted.inlineCallbacks
def test_dotted_label_and_0x20_case(dns_server: Server):
    responder = responder_for(dns_server)
    dotted = _header() + b"\x0fa._smimecert.ac\x04acme\x04test\x00" + _QUESTION[-4:]
    assert rcode_of((yield responder.respond(dotted, udp=True))) == dns.EREFUSED
    mixed = query("_SmImEcErT.AcMe.TeSt", dns.SOA)
    wire = yield responder.respond(mixed, udp=True)
    assert b"_SmImEcErT\x04AcMe\x04TeSt" in wire  # the question is echoed byte for byte
    assert decode(wire).rCode == dns.OK
