"""The DNS request parser of the directory server: bytes in, a request or an error out.

Sans-I/O and small on purpose: an authoritative server only needs the header, the one
question and the EDNS OPT record (RFC 1035 section 4.1, RFC 6891 section 6.1), so this
reads those straight from the bytes instead of building a full message object per
query (twisted.names' decoder, which costs most of a query's time under load). The
question is kept as its exact wire bytes, so the reply echoes it byte for byte (case
included, as resolvers using DNS 0x20 expect).

Every input gives a :class:`Request`, the bytes of an error reply (FORMERR, NOTIMP,
BADVERS), or ``None`` (drop: shorter than a header, or a response). Nothing else
escapes; hypothesis fuzzes that.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "BADVERS",
    "CLASSIC_UDP_LIMIT",
    "EDNS_PAYLOAD",
    "Request",
    "error_reply",
    "opt_record",
    "parse_request",
]

#: RFC 6891 section 6.2.5 leaves the size to us; 1232 is the DNS flag day 2020 value
#: (no IP fragmentation on common paths).
EDNS_PAYLOAD = 1232
#: RFC 1035 section 4.2.1: the UDP limit without EDNS.
CLASSIC_UDP_LIMIT = 512
#: RFC 6891 section 9: BADVERS is extended RCODE 16.
BADVERS = 16
FORMERR, NOTIMP = 1, 4  # RFC 1035 section 4.1.1
OPT = 41  # RFC 6891 section 6.1.1
OP_QUERY = 0
_HEADER = struct.Struct("!6H")
_U16x2 = struct.Struct("!HH")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_MAX_NAME = 255  # RFC 1035 section 2.3.4


@dataclass(frozen=True)
class Request:
    """A query: header fields we echo, the question, and what EDNS allows."""

    id: int
    flags: int  # the request's flags word (RD and CD are echoed)
    name: bytes  # the question name, dotted, as asked (no trailing dot)
    qtype: int
    qclass: int
    question: bytes  # the question section's exact wire bytes
    edns: bool
    udp_limit: int


def error_reply(data: bytes, rcode: int, question: bytes = b"") -> bytes:
    """A reply with ``rcode`` to the request in ``data`` (at least 12 octets):
    same id and opcode, RD echoed, QR set, the question echoed when given."""
    ident, flags = _U16x2.unpack_from(data)
    out = 0x8000 | (flags & 0x7800) | (flags & 0x0100) | (rcode & 0xF)
    return _HEADER.pack(ident, out, 1 if question else 0, 0, 0, 0) + question


def opt_record(extended_rcode: int = 0) -> bytes:
    """Our OPT RR: root owner, our payload size, version 0, no flags, no options."""
    return b"\x00" + struct.pack("!HHBBHH", OPT, EDNS_PAYLOAD, extended_rcode, 0, 0, 0)


class _Malformed(Exception):
    pass


def _name(data: bytes, offset: int, *, pointers: bool) -> tuple[bytes, int]:
    """A domain name at ``offset``: (dotted name, offset after it). Compression
    pointers (RFC 1035 4.1.4) only where allowed, only backwards, never looping."""
    labels: list[bytes] = []
    end = -1
    total = 0
    seen = 0
    while True:
        if offset >= len(data):
            raise _Malformed
        length = data[offset]
        if length & 0xC0 == 0xC0:
            if not pointers or offset + 1 >= len(data):
                raise _Malformed
            target = ((length & 0x3F) << 8) | data[offset + 1]
            if end < 0:
                end = offset + 2
            if target >= offset or seen > 127:
                raise _Malformed
            seen += 1
            offset = target
            continue
        if length & 0xC0:
            raise _Malformed  # 0x40 / 0x80: extended label types (RFC 6891 5) unsupported
        offset += 1
        if length == 0:
            break
        label = data[offset : offset + length]
        if len(label) != length:
            raise _Malformed
        total += length + 1
        if total > _MAX_NAME:
            raise _Malformed
        labels.append(label)
        offset += length
    if any(b"." in label for label in labels):
        # a dot inside a label has no dotted form here; "\x00" matches no zone of ours
        return b"\x00", (end if end >= 0 else offset)
    return b".".join(labels), (end if end >= 0 else offset)


def parse_request(data: bytes) -> Request | bytes | None:
    """See the module docstring."""
    if len(data) < _HEADER.size:
        return None
    ident, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    if flags & 0x8000:
        return None
    if (flags >> 11) & 0xF != OP_QUERY:
        return error_reply(data, NOTIMP)
    if qdcount != 1:
        return error_reply(data, FORMERR)
    try:
        name, offset = _name(data, _HEADER.size, pointers=False)
        if offset + 4 > len(data):
            raise _Malformed
        qtype, qclass = _U16x2.unpack_from(data, offset)
        offset += 4
        question = data[_HEADER.size : offset]
        opt: tuple[int, int] | None = None
        for index in range(ancount + nscount + arcount):
            owner, offset = _name(data, offset, pointers=True)
            if offset + _RR_FIXED.size > len(data):
                raise _Malformed
            rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(data, offset)
            offset += _RR_FIXED.size + rdlength
            if offset > len(data):
                raise _Malformed
            if rtype == OPT:
                # RFC 6891 6.1.1: one OPT, in the additional section, owned by the root
                if opt is not None or owner or index < ancount + nscount:
                    raise _Malformed
                opt = (rclass, ttl)
        if offset != len(data):
            raise _Malformed
    except _Malformed:
        return error_reply(data, FORMERR)
    limit = CLASSIC_UDP_LIMIT
    if opt is not None:
        payload, ttl = opt
        if (ttl >> 16) & 0xFF != 0:  # version
            reply = bytearray(error_reply(data, 0, question))
            reply[11] = 1  # ARCOUNT: our OPT carries the upper bits of BADVERS
            return bytes(reply) + opt_record(BADVERS >> 4)
        limit = max(CLASSIC_UDP_LIMIT, min(payload, EDNS_PAYLOAD))
    return Request(ident, flags, name, qtype, qclass, question, opt is not None, limit)
