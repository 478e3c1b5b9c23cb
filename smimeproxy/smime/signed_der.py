"""The plain-DER fast path of SignedData verification: cut bytes, no asn1crypto objects.

Building asn1crypto's SignedData, SignerInfo and CMSAttribute objects for a received
message cost about three times the signature verification itself. Nearly every
message is plain definite-length DER, so :class:`PlainSignedData` cuts a
``ContentInfo(signedData)`` into its eContentType, eContent, certificates and
SignerInfos with :func:`smimeproxy.smime.der.element_at`, :class:`RawAttributes` cuts
signed attributes into value TLVs per attribute type, and :func:`plain_utc_time` reads
the common ``signingTime`` form directly.

This module only *reads*; it checks nothing. The checks, the per-signer reader that
uses these pieces, and the asn1crypto path live in :mod:`smimeproxy.smime.signed`,
which imports this module (never the other way round). It is separate so that the
byte-cutting code, whose rule is "anything unusual returns None and asn1crypto does
it all", can be read on its own.

Not guaranteed: a None from a reader means "not read here", not "malformed"; the
caller falls back to asn1crypto, which decides. Results hold slices of the input,
not validated structures.
"""

from __future__ import annotations

import datetime
import functools
import re
from dataclasses import dataclass

from asn1crypto import core

from smimeproxy.smime import der

__all__ = [
    "MAX_CERTIFICATES",
    "MAX_SIGNERS",
    "PARSE_ERRORS",
    "SIGNED_DATA_OID",
    "SIGNED_DATA_OID_DER",
    "PlainSignedData",
    "RawAttributes",
    "oid_dotted",
    "plain_utc_time",
]

#: Bounds for hostile input: far above anything a mail client produces.
MAX_SIGNERS = 1000
MAX_CERTIFICATES = 1000

#: id-signedData (RFC 5652 section 5.1).
SIGNED_DATA_OID = "1.2.840.113549.1.7.2"
SIGNED_DATA_OID_DER = der.oid(SIGNED_DATA_OID)

# asn1crypto raises these (and only these, as far as fuzzing found) on bad encodings.
PARSE_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError)


@dataclass(frozen=True)
class PlainSignedData:
    """The parts of a plain DER ``ContentInfo(signedData)`` that verifying needs, cut
    out with the small DER reader: building asn1crypto's SignedData and SignerInfo
    objects cost three times the signature verification. Anything unusual (BER, the
    web.de OID, a constructed eContent, CRLs, other certificate choices, too many
    elements) is not read here: :meth:`read` says None and asn1crypto does it all."""

    content_type: bytes  # the eContentType OID's DER
    encapsulated: bytes | None
    certificates: tuple[bytes, ...]
    signers: tuple[bytes, ...]

    @classmethod
    def read(cls, data: bytes) -> PlainSignedData | None:
        at = der.element_at
        top = at(data, 0, len(data))
        if top is None or top[0] != 0x30 or top[2] != len(data):
            return None
        oid = at(data, top[1], top[2])
        if oid is None or data[top[1] : oid[2]] != SIGNED_DATA_OID_DER:
            return None
        explicit = at(data, oid[2], top[2])
        if explicit is None or explicit[0] != 0xA0 or explicit[2] != top[2]:
            return None
        sd = at(data, explicit[1], explicit[2])
        if sd is None or sd[0] != 0x30 or sd[2] != explicit[2]:
            return None
        _, pos, end = sd
        version = at(data, pos, end)
        if version is None or version[0] != 0x02 or version[1] == version[2]:
            return None
        digests = at(data, version[2], end)
        if digests is None or digests[0] != 0x31:
            return None
        encap = at(data, digests[2], end)
        if encap is None or encap[0] != 0x30 or data[encap[1] - 1] == 0x80:
            return None
        ctype = at(data, encap[1], encap[2])
        if ctype is None or ctype[0] != 0x06:
            return None
        encapsulated = None
        if ctype[2] != encap[2]:
            wrapper = at(data, ctype[2], encap[2])
            if wrapper is None or wrapper[0] != 0xA0 or wrapper[2] != encap[2]:
                return None
            octets = at(data, wrapper[1], wrapper[2])
            if octets is None or octets[0] != 0x04 or octets[2] != wrapper[2]:
                return None
            encapsulated = data[octets[1] : octets[2]]
        pos = encap[2]
        element = at(data, pos, end)
        certificates = []
        if element is not None and element[0] == 0xA0:
            certificates = cls._elements(data, element, MAX_CERTIFICATES)
            if certificates is None:
                return None
            pos = element[2]
            element = at(data, pos, end)
        if element is None or element[0] != 0x31 or element[2] != end:
            return None  # CRLs ([1]) or anything else: the full parser
        signers = cls._elements(data, element, MAX_SIGNERS)
        if signers is None:
            return None
        return cls(data[encap[1] : ctype[2]], encapsulated, tuple(certificates), tuple(signers))

    @staticmethod
    def _elements(data: bytes, outer: tuple[int, int, int], limit: int) -> list[bytes] | None:
        """The DER SEQUENCEs in ``outer``; None for any other element, or too many."""
        out = []
        _, pos, end = outer
        while pos < end:
            element = der.element_at(data, pos, end)
            if element is None or element[0] != 0x30 or len(out) >= limit:
                return None
            if data[element[1] - 1] == 0x80:
                # asn1crypto takes a length ending in 0x80 for "indefinite" and
                # re-encodes the element on dump(): leave such elements to it
                return None
            out.append(data[pos : element[2]])
            pos = element[2]
        return out


class RawAttributes:
    """Signed attributes read straight from their DER: for each attribute type, the
    value TLVs of each instance. A value is parsed (with the class asn1crypto's
    CMSAttribute would use) only when a check asks for it; building the whole
    asn1crypto structure cost more than the signature verification."""

    def __init__(self, by_oid: dict[str, list[list[bytes]]], count: int):
        self.by_oid = by_oid
        self.count = count

    @classmethod
    def read(cls, contents: bytes) -> RawAttributes | None:
        """None when ``contents`` is not a plain definite-length DER SET OF Attribute."""
        by_oid: dict[str, list[list[bytes]]] = {}
        count = 0
        pos, end = 0, len(contents)
        while pos < end:
            attribute = der.element_at(contents, pos, end)
            if attribute is None or attribute[0] != 0x30:
                return None
            _, body, pos = attribute
            oid = der.element_at(contents, body, pos)
            if oid is None or oid[0] != 0x06:
                return None
            value_set = der.element_at(contents, oid[2], pos)
            if value_set is None or value_set[0] != 0x31 or value_set[2] != pos:
                return None
            values = []
            at = value_set[1]
            while at < pos:
                value = der.element_at(contents, at, pos)
                if value is None:
                    return None
                values.append(contents[at : value[2]])
                at = value[2]
            dotted = oid_dotted(contents[body : oid[2]])
            if dotted is None:
                return None
            by_oid.setdefault(dotted, []).append(values)
            count += 1
        return cls(by_oid, count)


@functools.lru_cache(maxsize=256)
def oid_dotted(encoded: bytes) -> str | None:
    try:
        return str(core.ObjectIdentifier.load(encoded).dotted)
    except PARSE_ERRORS:
        return None


_UTC_TIME = re.compile(rb"\x17\x0d([0-9]{12})Z")


def plain_utc_time(instances: list[list[bytes]] | None) -> datetime.datetime | None:
    """A single ``YYMMDDHHMMSSZ`` UTCTime read directly, as asn1crypto would read it
    (RFC 5280 4.1.2.5.1: years 50-99 are 19xx); None for anything else, which then
    goes through asn1crypto."""
    if not instances or len(instances) != 1 or len(instances[0]) != 1:
        return None
    match = _UTC_TIME.fullmatch(instances[0][0])
    if match is None:
        return None
    d = match.group(1)
    year = int(d[0:2])
    try:
        return datetime.datetime(
            year + (1900 if year >= 50 else 2000),
            int(d[2:4]),
            int(d[4:6]),
            int(d[6:8]),
            int(d[8:10]),
            int(d[10:12]),
            tzinfo=datetime.UTC,
        )
    except ValueError:
        return None  # out of range: asn1crypto decides what that is
