"""Small DER writing helpers (X.690) for the parts of CMS the engine builds itself.

Building CMS structures with ``asn1crypto`` objects costs far more than the RSA
operation they wrap (every value is an object, every SET OF is re-sorted on each
dump). The engine therefore writes the fixed parts of its output as DER bytes: a
tag-length header, an OBJECT IDENTIFIER, an INTEGER, a SET OF sorted by encoding
(X.690 section 11.6), and the issuerAndSerialNumber of a certificate taken verbatim
from the certificate's own DER.

Not guaranteed: these helpers do not validate what they are given; they encode
definite-length DER only, and :func:`issuer_and_serial` reads only certificates that
``cryptography`` produced or accepted (strict DER).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from smimeproxy.errors import MalformedMessage


def header(tag: int, length: int) -> bytes:
    """Identifier and definite length octets (X.690 section 8.1.3)."""
    if length < 0x80:
        return bytes((tag, length))
    size = (length.bit_length() + 7) // 8
    return bytes((tag, 0x80 | size)) + length.to_bytes(size, "big")


def tlv(tag: int, body: bytes) -> bytes:
    """A complete element: header and ``body``."""
    return header(tag, len(body)) + body


def sequence(*items: bytes) -> bytes:
    """A SEQUENCE of already encoded elements, in the given order."""
    body = b"".join(items)
    return header(0x30, len(body)) + body


def set_of(items: Iterable[bytes], tag: int = 0x31) -> bytes:
    """A SET OF: its elements sorted by their encodings, as DER requires (X.690 11.6)."""
    body = b"".join(sorted(items))
    return header(tag, len(body)) + body


def integer(value: int) -> bytes:
    """An INTEGER in its minimal two's complement form (X.690 section 8.3)."""
    size = ((value if value >= 0 else ~value).bit_length() + 8) // 8
    return tlv(0x02, value.to_bytes(size, "big", signed=True))


@lru_cache(maxsize=128)
def oid(dotted: str) -> bytes:
    """An OBJECT IDENTIFIER (X.690 section 8.19) from its dotted form."""
    arcs = [int(a) for a in dotted.split(".")]
    values = [arcs[0] * 40 + arcs[1], *arcs[2:]]
    out = bytearray()
    for value in values:
        chunk = [value & 0x7F]
        value >>= 7
        while value:
            chunk.append(0x80 | (value & 0x7F))
            value >>= 7
        out.extend(reversed(chunk))
    return tlv(0x06, bytes(out))


def element_at(data: bytes, pos: int, limit: int) -> tuple[int, int, int] | None:
    """(tag, body start, end) of the element at ``pos``, or None when it is not a
    definite-length, low-tag-number element within ``limit`` (the caller then hands the
    data to a full BER parser)."""
    if pos + 2 > limit:
        return None
    tag, length = data[pos], data[pos + 1]
    if tag & 0x1F == 0x1F or length == 0x80:
        return None
    p = pos + 2
    if length & 0x80:
        n = length & 0x7F
        if n > 4 or p + n > limit:
            return None
        length = int.from_bytes(data[p : p + n], "big")
        p += n
    if p + length > limit:
        return None
    return tag, p, p + length


def _element(data: bytes, pos: int, limit: int) -> tuple[int, int, int]:
    """(tag, start of the body, end of the element) of the DER element at ``pos``."""
    if pos + 2 > limit:
        raise MalformedMessage("truncated DER element")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise MalformedMessage("unexpected high tag number in a certificate")
    length = data[pos + 1]
    p = pos + 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or p + n > limit:
            raise MalformedMessage("bad DER length in a certificate")
        length = int.from_bytes(data[p : p + n], "big")
        p += n
    if p + length > limit:
        raise MalformedMessage("truncated DER element")
    return tag, p, p + length


@lru_cache(maxsize=256)
def issuer_and_serial(certificate_der: bytes) -> bytes:
    """The DER ``IssuerAndSerialNumber`` (RFC 5652 section 10.2.4) of a certificate.

    The issuer Name is copied byte for byte from the certificate (it must match the
    certificate exactly, not a re-encoding of it), and so is the serial number.
    """
    tag, body, end = _element(certificate_der, 0, len(certificate_der))
    if tag != 0x30:
        raise MalformedMessage("a certificate is not a SEQUENCE")
    tag, pos, tbs_end = _element(certificate_der, body, end)
    if tag != 0x30:
        raise MalformedMessage("tbsCertificate is not a SEQUENCE")
    tag, _, stop = _element(certificate_der, pos, tbs_end)
    if tag == 0xA0:  # [0] EXPLICIT version
        pos = stop
        tag, _, stop = _element(certificate_der, pos, tbs_end)
    if tag != 0x02:
        raise MalformedMessage("certificate serial number is not an INTEGER")
    serial = certificate_der[pos:stop]
    _, _, pos = _element(certificate_der, stop, tbs_end)  # signature AlgorithmIdentifier
    tag, _, stop = _element(certificate_der, pos, tbs_end)
    if tag != 0x30:
        raise MalformedMessage("certificate issuer is not a Name")
    issuer = certificate_der[pos:stop]
    return sequence(issuer, serial)
