"""The authoritative DNS server for the ``_smimecert`` zones of the local domains.

RFC 8162 puts a user's SMIMEA records at ``<sha256(local part)[:28] hex>._smimecert.
<domain>``. This server is authoritative for ``_smimecert.<domain>`` of each published
domain and answers:

- at the apex: SOA and NS (the SOA serial is the key store's audit sequence, so it
  grows with every change), anything else NODATA;
- at a user's owner name: the SMIMEA records of their current certificate(s), read
  live from the key store (:mod:`smimeproxy.directory.publication`), anything else
  NODATA; NXDOMAIN for a name that is no user of ours (or whose key is revoked);
- REFUSED for names outside these zones and classes other than IN; NOTIMP for every
  opcode but QUERY (dynamic UPDATE included: the zone is derived from the store, push
  mode updates the organisation's own server instead); FORMERR for what does not
  parse; nothing at all for a response (QR set), so two servers never loop.

EDNS0 (RFC 6891): a query with an OPT record gets one back, advertising 1232 octets
(the DNS flag day 2020 value); version > 0 gets BADVERS. Over UDP a reply larger than
the client's limit (512 without EDNS) is sent empty with TC set (RFC 2181 section 9:
never a partial RRset), and the client retries over TCP, where it gets everything.

The core (:class:`SMIMEAResponder`) is fed the bytes of one request and returns the
bytes of the reply; the Twisted protocols around it only move datagrams and
length-prefixed TCP messages. Not implemented: DNSSEC signing (use push mode into a
signing server for that), zone transfers (AXFR and IXFR are REFUSED), NOTIFY.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from twisted.internet import protocol
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import dns
from twisted.protocols.basic import Int16StringReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from smimeproxy.directory.publication import LivePublication, Published
from smimeproxy.directory.records import SMIMEA, Record_SMIMEA
from smimeproxy.directory.wire import EDNS_PAYLOAD, Request, opt_record, parse_request
from smimeproxy.errors import SMIMEProxyError
from smimeproxy.metrics import Registry
from smimeproxy.pki.smimea import smimea_for_certificate

__all__ = [
    "EDNS_PAYLOAD",
    "Answer",
    "DNSDatagramServer",
    "DNSStreamServer",
    "DNSStreamServerFactory",
    "SMIMEAAuthority",
    "SMIMEAResponder",
    "encode_answer",
    "reply_bytes",
    "zone_name",
]

#: AXFR (252), IXFR (251, RFC 1995): zone transfers are not offered.
_TRANSFERS = (dns.AXFR, dns.IXFR)
#: RFC 7766 section 6.2.3: servers close idle TCP connections; seconds
TCP_IDLE_TIMEOUT = 30
_HEADER = struct.Struct("!6H")


def zone_name(domain: str) -> str:
    """``_smimecert.<domain>`` (RFC 8162 section 3), lower case, no trailing dot."""
    return "_smimecert." + domain.strip().lower().rstrip(".")


@dataclass(frozen=True)
class Answer:
    """What the authority says about one question."""

    rcode: int
    answers: tuple[dns.RRHeader, ...] = ()
    authority: tuple[dns.RRHeader, ...] = ()
    aa: bool = True


REFUSED = Answer(dns.EREFUSED, aa=False)


class SMIMEAAuthority:
    """Answers questions for the ``_smimecert`` zones from a :class:`LivePublication`.

    ``nameserver`` is the host name in the SOA MNAME and the apex NS record (default:
    this host's FQDN); ``hostmaster`` the SOA RNAME (default ``hostmaster.<domain>``).
    Negative answers are cacheable for ``min(ttl, 300)`` seconds (the SOA minimum,
    RFC 2308 section 5), so a new user is found within five minutes by resolvers that
    cached their absence.
    """

    def __init__(
        self,
        live: LivePublication,
        domains: Iterable[str],
        *,
        ttl: int = 3600,
        usage: int = 3,
        selector: int = 0,
        matching_type: int = 0,
        nameserver: str | None = None,
        hostmaster: str | None = None,
    ) -> None:
        self.live = live
        self.zones = {zone_name(d): d.strip().lower().rstrip(".") for d in domains}
        self.ttl = ttl
        self.negative_ttl = min(ttl, 300)
        self.parameters = (usage, selector, matching_type)
        self.nameserver = (nameserver or socket.getfqdn()).rstrip(".")
        self.hostmaster = hostmaster

    def zone_of(self, name: str) -> str | None:
        for zone in self.zones:
            if name == zone or name.endswith("." + zone):
                return zone
        return None

    def _soa(self, zone: str, serial: int) -> dns.RRHeader:
        rname = self.hostmaster or f"hostmaster.{self.zones[zone]}"
        soa = dns.Record_SOA(
            mname=self.nameserver,
            rname=rname,
            serial=serial,
            refresh=3600,
            retry=600,
            expire=14 * 86400,
            minimum=self.negative_ttl,
            ttl=self.negative_ttl,
        )
        return dns.RRHeader(zone, dns.SOA, dns.IN, self.negative_ttl, soa, auth=True)

    def _ns(self, zone: str) -> dns.RRHeader:
        return dns.RRHeader(
            zone, dns.NS, dns.IN, self.ttl, dns.Record_NS(self.nameserver, self.ttl), auth=True
        )

    def records(self, published: Published) -> list[dns.RRHeader]:
        usage, selector, matching = self.parameters
        out = []
        for cert in published.certificates:
            record = smimea_for_certificate(
                cert, usage=usage, selector=selector, matching_type=matching
            )
            payload = Record_SMIMEA.from_record(record, self.ttl)
            out.append(dns.RRHeader(published.owner, SMIMEA, dns.IN, self.ttl, payload, auth=True))
        return out

    def resolve(self, name: str, qtype: int, qclass: int) -> Deferred[Answer]:
        """The answer to one question; ``name`` compares case-insensitively."""
        name = name.lower().rstrip(".")
        zone = self.zone_of(name)
        if zone is None or qclass not in (dns.IN, dns.ANY) or qtype in _TRANSFERS:
            return succeed(REFUSED)
        return self.live.by_owner(name).addCallback(self.answer, name, zone, qtype)

    def answer(
        self, found: tuple[int, Published | None], name: str, zone: str, qtype: int
    ) -> Answer:
        """The answer for ``name`` in ``zone`` given ``(serial, published)``."""
        serial, published = found
        soa = self._soa(zone, serial)
        if name == zone:
            answers = {dns.SOA: [soa], dns.NS: [self._ns(zone)]}
            if qtype == dns.ALL_RECORDS:
                return Answer(dns.OK, (soa, self._ns(zone)))
            if qtype in answers:
                return Answer(dns.OK, tuple(answers[qtype]))
            return Answer(dns.OK, (), (soa,))
        if published is None:
            return Answer(dns.ENAME, (), (soa,))
        if qtype in (SMIMEA, dns.ALL_RECORDS):
            return Answer(dns.OK, tuple(self.records(published)))
        return Answer(dns.OK, (), (soa,))


@dataclass
class _Encoded:
    """The sections after the question of one reply, ready to send behind any
    request's header and question (compression pointers only point into the
    question, whose length is the same for every spelling of the name)."""

    published: Published | None
    rcode: int
    aa: bool
    counts: tuple[int, int, int]
    body: bytes


def encode_answer(request: Request, answer: Answer) -> _Encoded:
    """``answer`` encoded by twisted.names behind ``request``'s question."""
    m = dns.Message(0, answer=1, auth=answer.aa, rCode=answer.rcode & 0xF, maxSize=0)
    m.queries = [dns.Query(request.name, request.qtype, request.qclass)]
    m.answers = list(answer.answers)
    m.authority = list(answer.authority)
    wire = m.toStr()
    counts = struct.unpack_from("!3H", wire, 6)
    return _Encoded(None, answer.rcode, answer.aa, counts, wire[12 + len(request.question) :])


def reply_bytes(request: Request, encoded: _Encoded, limit: int | None) -> bytes:
    """The reply: our header, the question as asked, the sections, our OPT if the
    request had one; over UDP (``limit`` set) an empty reply with TC when the whole
    would not fit (RFC 2181 section 9: never a partial RRset)."""
    flags = 0x8000 | (request.flags & 0x0110) | (encoded.rcode & 0xF)  # QR, RD+CD echoed
    if encoded.aa:
        flags |= 0x0400
    an, ns, ar = encoded.counts
    opt = opt_record(encoded.rcode >> 4) if request.edns else b""
    extra = 1 if request.edns else 0
    wire = (
        _HEADER.pack(request.id, flags, 1, an, ns, ar + extra)
        + request.question
        + encoded.body
        + opt
    )
    if limit is not None and len(wire) > limit:
        wire = _HEADER.pack(request.id, flags | 0x0200, 1, 0, 0, extra) + request.question + opt
    return wire


#: names of the reply codes of RFC 1035 section 4.1.1 (the metric's label values)
_RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


class SMIMEAResponder:
    """Bytes of a request in, bytes of its reply out (or None: no reply).

    Encoded replies are cached per question and per published state (the object
    :class:`Publication` returns, which changes whenever what it publishes does), so
    a repeated question costs a store freshness check (batched) and a header.
    """

    _log = Logger()
    _CACHE_LIMIT = 50_000

    def __init__(self, authority: SMIMEAAuthority, registry: Registry | None = None) -> None:
        self.authority = authority
        self._cache: dict[tuple[str, int, int], _Encoded] = {}
        self._serial = -1
        self._queries = (registry or Registry()).counter(
            "smimeproxy_dns_queries_total", "DNS queries answered, by reply code", ("rcode",)
        )

    def respond(self, data: bytes, *, udp: bool) -> Deferred[bytes | None]:
        """The reply to ``data`` (None: not answered), counted by its reply code."""
        return self._respond(data, udp=udp).addCallback(self._count)

    def _count(self, reply: bytes | None) -> bytes | None:
        if reply is not None and len(reply) >= 4:
            code = reply[3] & 0xF
            self._queries.inc(rcode=_RCODE_NAMES.get(code, str(code)))
        return reply

    def _respond(self, data: bytes, *, udp: bool) -> Deferred[bytes | None]:
        parsed = parse_request(data)
        if not isinstance(parsed, Request):
            return succeed(parsed)
        request = parsed
        limit = request.udp_limit if udp else None
        try:
            name = request.name.decode("ascii").lower()
        except UnicodeDecodeError:
            name = ""
        zone = self.authority.zone_of(name) if name else None
        if zone is None or request.qclass not in (dns.IN, dns.ANY) or request.qtype in _TRANSFERS:
            return succeed(reply_bytes(request, encode_answer(request, REFUSED), limit))
        d = self.authority.live.by_owner(name)

        def found(result: tuple[int, Published | None]) -> bytes:
            serial, published = result
            if serial != self._serial or len(self._cache) > self._CACHE_LIMIT:
                self._cache.clear()
                self._serial = serial
            key = (name, request.qtype, request.qclass)
            encoded = self._cache.get(key)
            if encoded is None or encoded.published is not published:
                answer = self.authority.answer(result, name, zone, request.qtype)
                encoded = encode_answer(request, answer)
                encoded.published = published
                self._cache[key] = encoded
            return reply_bytes(request, encoded, limit)

        def failed(failure: Failure) -> bytes:
            if failure.check(SMIMEProxyError):
                self._log.warn("directory lookup failed: {error}", error=failure.getErrorMessage())
            else:
                self._log.failure("directory lookup crashed", failure)
            servfail = encode_answer(request, Answer(dns.ESERVER, aa=False))
            return reply_bytes(request, servfail, limit)

        return d.addCallbacks(found, failed)


class DNSDatagramServer(protocol.DatagramProtocol):
    """UDP: one datagram per request, the reply to its sender."""

    _log = Logger()

    def __init__(self, responder: SMIMEAResponder) -> None:
        self.responder = responder

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        def send(reply: bytes | None) -> None:
            if reply is not None and self.transport is not None:
                self.transport.write(reply, addr)

        self.responder.respond(datagram, udp=True).addCallback(send).addErrback(
            lambda f: self._log.failure("DNS reply not sent", f)
        )


class DNSStreamServer(Int16StringReceiver, TimeoutMixin):
    """TCP (RFC 7766): length-prefixed messages, replies possibly out of order,
    the connection closed after ``TCP_IDLE_TIMEOUT`` seconds of silence."""

    _log = Logger()

    def __init__(self, responder: SMIMEAResponder, clock: IReactorTime | None = None) -> None:
        self.responder = responder
        if clock is not None:
            self.callLater = clock.callLater  # type: ignore[assignment]

    def connectionMade(self) -> None:
        self.setTimeout(TCP_IDLE_TIMEOUT)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.setTimeout(None)

    def timeoutConnection(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def stringReceived(self, string: bytes) -> None:
        self.resetTimeout()

        def send(reply: bytes | None) -> None:
            if reply is not None and self.transport is not None and self.connected:
                self.sendString(reply)
            elif reply is None and self.transport is not None:
                self.transport.loseConnection()  # a response sent to a server: a confused peer

        self.responder.respond(string, udp=False).addCallback(send).addErrback(
            lambda f: self._log.failure("DNS reply not sent", f)
        )


class DNSStreamServerFactory(protocol.Factory):
    def __init__(self, responder: SMIMEAResponder, clock: IReactorTime | None = None) -> None:
        self.responder = responder
        self.clock = clock

    def buildProtocol(self, addr: object) -> DNSStreamServer:
        return DNSStreamServer(self.responder, self.clock)
