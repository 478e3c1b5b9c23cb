"""The SMIMEA resource record for twisted.names, which has no class for it.

Modelled on twisted.names' own record classes (``Record_SSHFP`` is the closest: fixed
octets then opaque data). The RDATA codec is :mod:`smimeproxy.pki.smimea`'s, so the
DNS server, the zone text and the lookup agree on one encoding.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from twisted.names import dns
from twisted.python import util as tputil
from zope.interface import implementer

from smimeproxy.errors import MalformedMessage
from smimeproxy.pki.smimea import SMIMEA_RRTYPE, SMIMEARecord, parse_smimea_rdata

__all__ = ["SMIMEA", "Record_SMIMEA", "smimea_message_types"]

#: RFC 8162 section 8
SMIMEA = SMIMEA_RRTYPE


@implementer(dns.IEncodable, dns.IRecord)
class Record_SMIMEA(tputil.FancyEqMixin, tputil.FancyStrMixin):
    """An SMIMEA record (RFC 8162 section 2; the TLSA fields of RFC 6698 section 2.1).

    ``decode`` raises :class:`MalformedMessage` for RDATA shorter than four octets or
    with a digest of the wrong length; twisted.names turns that into a failed parse.
    """

    TYPE = SMIMEA
    fancybasename = "SMIMEA"
    compareAttributes = ("usage", "selector", "matchingType", "data", "ttl")
    showAttributes = ("usage", "selector", "matchingType", ("data", lambda d: d.hex()), "ttl")

    def __init__(
        self,
        usage: int = 3,
        selector: int = 0,
        matchingType: int = 0,
        data: bytes = b"",
        ttl: Any = None,
    ) -> None:
        self.usage = usage
        self.selector = selector
        self.matchingType = matchingType
        self.data = data
        self.ttl = dns.str2time(ttl)

    @classmethod
    def from_record(cls, record: SMIMEARecord, ttl: int | None = None) -> Record_SMIMEA:
        return cls(record.usage, record.selector, record.matching_type, record.data, ttl)

    def record(self) -> SMIMEARecord:
        """The checked record (MalformedMessage when the fields are not a valid one)."""
        return parse_smimea_rdata(bytes((self.usage, self.selector, self.matchingType)) + self.data)

    def encode(self, strio: BytesIO, compDict: dict[bytes, int] | None = None) -> None:
        strio.write(bytes((self.usage, self.selector, self.matchingType)))
        strio.write(self.data)

    def decode(self, strio: BytesIO, length: int | None = None) -> None:
        if length is None:
            raise MalformedMessage("SMIMEA RDATA without a length")
        raw = strio.read(length)
        if len(raw) != length:
            raise MalformedMessage("SMIMEA RDATA cut short")
        record = parse_smimea_rdata(raw)
        self.usage, self.selector = record.usage, record.selector
        self.matchingType, self.data = record.matching_type, record.data

    def __hash__(self) -> int:
        return hash((self.usage, self.selector, self.matchingType, self.data))


def smimea_message_types(message: dns.Message) -> dns.Message:
    """Make ``message`` decode SMIMEA RDATA into :class:`Record_SMIMEA` (instead of
    ``UnknownRecord``); returns it."""
    message._recordTypes = {**message._recordTypes, SMIMEA: Record_SMIMEA}
    return message
