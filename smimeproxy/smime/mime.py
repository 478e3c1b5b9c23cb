"""A raw MIME codec that keeps bytes exactly as they came.

Python's :mod:`email` package re-folds headers and re-encodes bodies when it writes a
message back, which breaks the bytes a signature covers. Everything the engine must
keep byte for byte (a clear-signed part, an untouched body) goes through this module
instead: it splits a message into header fields and body, and a multipart body into
its parts (RFC 2046 section 5.1.1), and puts them back together without changing a
byte it was not asked to change. Header *values* are interpreted with :mod:`email`'s
parsers, which know RFC 2047 and RFC 2231.

Not guaranteed: this is not a validating parser. Malformed structure (a missing
closing boundary, say) is tolerated the way mail clients tolerate it, and reported
through :class:`MalformedMessage` only where the engine must refuse to continue.
"""

from __future__ import annotations

import base64
import binascii
import email.message
import email.utils
import quopri
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache

from smimeproxy.errors import MalformedMessage

CRLF = b"\r\n"
LF = b"\n"

#: Headers that describe the content of an entity (RFC 2045 section 9 and RFC 2183); they
#: move with the content when it is signed or encrypted, the rest stay outside.
CONTENT_HEADER_PREFIX = "content-"

_HEADER_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")
_LINE_END = re.compile(rb"\r\n|\n|\r")

#: Hard limits against hostile input (each is far beyond any real message).
MAX_HEADER_FIELDS = 10_000
MAX_PARTS = 10_000


@dataclass
class HeaderField:
    """One header field exactly as it appeared, continuation lines and line end included."""

    name: str
    raw: bytes

    @property
    def key(self) -> str:
        return self.name.lower()

    def value(self) -> str:
        """The unfolded value, decoded as UTF-8 (with replacement for stray bytes)."""
        _, _, rest = self.raw.partition(b":")
        unfolded = _LINE_END.sub(b"", rest).strip()
        return unfolded.decode("utf-8", "replace")

    @classmethod
    def make(cls, name: str, value: str, eol: bytes = CRLF) -> HeaderField:
        """A new field; ``value`` must already be folded/encoded as the caller wants it."""
        if "\r" in value or "\n" in value:
            raise ValueError("header values must not contain line breaks")
        return cls(name, f"{name}: {value}".encode() + eol)


@dataclass
class Entity:
    """A MIME entity: header fields and the raw body, plus the line ending it uses."""

    headers: list[HeaderField] = field(default_factory=list)
    body: bytes = b""
    eol: bytes = CRLF
    #: whether the header block was closed by an empty line (false for truncated input)
    terminated: bool = True

    # -- reading --------------------------------------------------------------------
    def get(self, name: str, default: str | None = None) -> str | None:
        key = name.lower()
        for h in self.headers:
            if h.key == key:
                return h.value()
        return default

    def get_all(self, name: str) -> list[str]:
        key = name.lower()
        return [h.value() for h in self.headers if h.key == key]

    def content_type(self) -> tuple[str, dict[str, str]]:
        """(``type/subtype`` lower-cased, parameters); ``text/plain`` when absent (RFC 2045)."""
        return parse_content_type(self.get("Content-Type"))

    @property
    def mime_type(self) -> str:
        return self.content_type()[0]

    def transfer_encoding(self) -> str:
        return (self.get("Content-Transfer-Encoding") or "7bit").strip().lower()

    def decoded_body(self) -> bytes:
        """The body with its Content-Transfer-Encoding removed."""
        return decode_transfer_encoding(self.body, self.transfer_encoding())

    def is_multipart(self) -> bool:
        return self.mime_type.startswith("multipart/")

    # -- writing --------------------------------------------------------------------
    def header_bytes(self) -> bytes:
        return b"".join(h.raw for h in self.headers)

    def to_bytes(self) -> bytes:
        return self.header_bytes() + self.eol + self.body

    def remove(self, name: str) -> None:
        key = name.lower()
        self.headers = [h for h in self.headers if h.key != key]

    def set(self, name: str, value: str) -> None:
        """Replace every field called ``name`` with one new field (kept in place)."""
        new = HeaderField.make(name, value, self.eol)
        for i, h in enumerate(self.headers):
            if h.key == name.lower():
                self.headers[i] = new
                self.headers = [x for j, x in enumerate(self.headers) if j <= i or x.key != h.key]
                return
        self.headers.append(new)

    def add(self, name: str, value: str, *, first: bool = False) -> None:
        new = HeaderField.make(name, value, self.eol)
        if first:
            self.headers.insert(0, new)
        else:
            self.headers.append(new)

    def content_headers(self) -> list[HeaderField]:
        return [h for h in self.headers if h.key.startswith(CONTENT_HEADER_PREFIX)]

    def other_headers(self) -> list[HeaderField]:
        return [
            h
            for h in self.headers
            if not h.key.startswith(CONTENT_HEADER_PREFIX) and h.key != "mime-version"
        ]


def detect_eol(data: bytes) -> bytes:
    """The line ending of the first line: CRLF or LF (files on Unix often use LF)."""
    i = data.find(b"\n")
    if i > 0 and data[i - 1 : i] == b"\r":
        return CRLF
    return LF if i >= 0 else CRLF


def parse_entity(data: bytes) -> Entity:
    """Split ``data`` into header fields and body without changing any byte.

    A message without an empty line is all header (and ``terminated`` is false);
    a first line that is not a header field means there are no headers at all.
    """
    eol = detect_eol(data)
    headers: list[HeaderField] = []
    pos = 0
    n = len(data)
    terminated = False
    while pos < n:
        m = _LINE_END.search(data, pos)
        end = m.end() if m else n
        line = data[pos:end]
        if line in (b"\r\n", b"\n", b"\r"):
            pos = end
            terminated = True
            break
        if line[:1] in (b" ", b"\t") and headers:
            headers[-1].raw += line
        else:
            hm = _HEADER_NAME.match(line)
            if hm is None:
                if not headers:
                    # no header block at all: everything is body (RFC 2045 defaults apply)
                    return Entity([], data, eol, True)
                # a stray line inside the header block: treat it as the end of headers
                terminated = False
                break
            headers.append(HeaderField(hm.group(1).decode("ascii"), line))
            if len(headers) > MAX_HEADER_FIELDS:
                raise MalformedMessage("too many header fields")
        pos = end
    return Entity(headers, data[pos:], eol, terminated)


def parse_content_type(value: str | None) -> tuple[str, dict[str, str]]:
    """``type/subtype`` lower-cased and its parameters (RFC 2045, RFC 2231 continuations)."""
    if not value:
        return "text/plain", {}
    if len(value) > _CACHED_VALUE_LIMIT:
        return _parse_content_type(value)
    ctype, params = _parse_content_type_cached(value)
    return ctype, dict(params)


#: email's parser costs ~50 us a call and the engine asks for the same few values many
#: times per message; short values are cached (long ones would pin memory).
_CACHED_VALUE_LIMIT = 1000


@lru_cache(maxsize=512)
def _parse_content_type_cached(value: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    ctype, params = _parse_content_type(value)
    return ctype, tuple(params.items())


def _parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    msg = email.message.Message()
    msg["Content-Type"] = value
    ctype = msg.get_content_type()
    params: dict[str, str] = {}
    for item in msg.get_params(failobj=[])[1:]:
        k, v = item
        params[k.lower()] = email.utils.collapse_rfc2231_value(v)
    return ctype, params


def split_multipart(body: bytes, boundary: str) -> tuple[bytes, list[bytes], bytes, bool]:
    """Split a multipart body into (preamble, parts, epilogue, closed).

    Each part is returned exactly as it stands between its delimiters: the line ending
    before a delimiter belongs to the delimiter (RFC 2046 section 5.1.1), so a signed
    part comes out with precisely the bytes that were signed. ``closed`` is false when
    the closing delimiter is missing (a truncated message).
    """
    if not boundary or len(boundary) > 200:
        raise MalformedMessage("multipart without a usable boundary parameter")
    parts: list[bytes] = []
    preamble = b""
    start: int | None = None
    for m_start, m_end, closing in delimiter_lines(body, boundary):
        if start is None:
            preamble = body[:m_start]
        else:
            parts.append(body[start:m_start])
            if len(parts) > MAX_PARTS:
                raise MalformedMessage("too many MIME parts")
        if closing:
            return preamble, parts, body[m_end:], True
        start = m_end
    if start is None:
        return body, [], b"", False
    parts.append(body[start:])
    return preamble, parts, b"", False


#: what may follow the boundary on a delimiter line: "--" for the closing one, then
#: optional whitespace and a line ending (or the end of the data), RFC 2046 5.1.1
_DELIMITER_TAIL = re.compile(rb"(--)?[ \t]*(?=\r\n|\n|\Z)(?:\r\n|\n)?")


def delimiter_lines(body: bytes, boundary: str) -> Iterator[tuple[int, int, bool]]:
    r"""(start, end, closing) of each delimiter line of a multipart body, in order.

    ``start`` is at the line ending before the delimiter (it belongs to the delimiter,
    RFC 2046 section 5.1.1), ``end`` after the line ending that closes it. A delimiter
    counts at the start of the body or right after CRLF or LF that no earlier
    delimiter line took. Scans with ``bytes.find`` for the boundary, not with a regex
    tried at every byte: the same result as the pattern
    ``(?:\A|\r\n|\n)--boundary(--)?[ \t]*(?=\r\n|\n|\Z)(?:\r\n|\n)?`` found left to right.
    """
    if not boundary or len(boundary) > 200:
        raise MalformedMessage("multipart without a usable boundary parameter")
    delim = b"--" + boundary.encode("ascii", "replace")
    last_end = 0
    i = body.find(delim)
    while i >= 0:
        if i >= last_end + 2 and body[i - 2 : i] == b"\r\n":
            m_start = i - 2
        elif i >= last_end + 1 and body[i - 1] == 0x0A:
            m_start = i - 1
        elif i == 0:
            m_start = 0
        else:
            i = body.find(delim, i + 1)
            continue
        tail = _DELIMITER_TAIL.match(body, i + len(delim))
        if tail is None:
            i = body.find(delim, i + 1)
            continue
        closing = tail.group(1) is not None
        yield m_start, tail.end(), closing
        last_end = tail.end()
        i = body.find(delim, last_end)


def iter_leaves(entity: Entity, depth: int = 0, max_depth: int = 32) -> Iterator[Entity]:
    """Every non-multipart entity below ``entity``, depth first."""
    if depth > max_depth:
        raise MalformedMessage("MIME nesting too deep")
    if entity.is_multipart():
        boundary = entity.content_type()[1].get("boundary", "")
        _, parts, _, _ = split_multipart(entity.body, boundary)
        for raw in parts:
            yield from iter_leaves(parse_entity(raw), depth + 1, max_depth)
    else:
        yield entity


#: every byte that is not in the base64 alphabet or "=" (RFC 2045 section 6.8 says to
#: ignore them when decoding)
_NOT_BASE64 = bytes(
    b
    for b in range(256)
    if b not in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
)


def _plain_base64(body: bytes) -> bytes | None:
    """Base64 whose only "=" are its padding at the end, decoded in one pass (binascii
    skips line ends and other non-alphabet bytes, as the general path below deletes
    them); None when it is not that or binascii refuses it (the general path decides:
    it gives the same bytes whenever this succeeds)."""
    first = body.find(b"=")
    if first >= 0 and body[first:].strip(b"=\r\n\t "):
        return None
    try:
        return binascii.a2b_base64(body)
    except (binascii.Error, ValueError):
        return None


def decode_transfer_encoding(body: bytes, encoding: str) -> bytes:
    """Remove a Content-Transfer-Encoding; unknown encodings are an error, not a guess."""
    encoding = encoding.lower()
    if encoding in ("7bit", "8bit", "binary", ""):
        return body
    if encoding == "base64":
        quick = _plain_base64(body)
        if quick is not None:
            return quick
        # one C pass each, no slice copies: 10 MB bodies come through here
        cleaned = body.translate(None, _NOT_BASE64)
        if cleaned.find(b"=", 0, max(len(cleaned) - 2, 0)) >= 0:
            cleaned = cleaned.split(b"=", 1)[0]
        if len(cleaned) % 4:
            cleaned += b"=" * (-len(cleaned) % 4)
        try:
            return base64.b64decode(cleaned)
        except (binascii.Error, ValueError) as e:
            raise MalformedMessage(f"bad base64 body: {e}") from None
    if encoding == "quoted-printable":
        return quopri.decodestring(body)
    raise MalformedMessage(f"unknown Content-Transfer-Encoding {encoding!r}")


def base64_body(data: bytes | bytearray | memoryview, eol: bytes = CRLF) -> bytes:
    """Base64 in lines of 76 characters (RFC 2045 section 6.8), ending with a line end."""
    return b"".join(base64_chunks(data, eol))


#: input bytes per block of :func:`base64_chunks`: whole 76-character lines (57 bytes)
_BASE64_BLOCK = 57 * 16384


def base64_chunks(data: bytes | bytearray | memoryview, eol: bytes = CRLF) -> list[bytes]:
    """:func:`base64_body` as a list of blocks of lines (about 1.3 MB each), for a
    caller that joins them with other bytes: encoding a 10 MB body then costs the
    blocks and one final join, not a list of line objects and copies of the whole."""
    view = memoryview(data).cast("B")
    chunks = []
    for start in range(0, len(view), _BASE64_BLOCK):
        encoded = binascii.b2a_base64(view[start : start + _BASE64_BLOCK], newline=False)
        chunks.append(eol.join([encoded[i : i + 76] for i in range(0, len(encoded), 76)]) + eol)
    return chunks


def to_crlf(data: bytes) -> bytes:
    """Canonical line endings (RFC 5751 section 3.1.1): every line ends with CRLF."""
    if b"\r" not in data:
        return data.replace(b"\n", b"\r\n")
    if is_crlf(data):
        return data  # already canonical: no copy
    return _LINE_END.sub(b"\r\n", data)


def is_crlf(data: bytes) -> bool:
    """Whether every CR in ``data`` is followed by LF and every LF preceded by CR."""
    if not data:
        return True
    if len(data) <= _MASKED_LIMIT:
        # the CR mask shifted by one is the LF mask (two table lookups per byte beat
        # counting the two-byte CRLF)
        cr, lf = data.translate(_CR_MASK), data.translate(_LF_MASK)
        return cr[:-1] == lf[1:] and cr[-1] == 0 and lf[0] == 0
    # counting is far cheaper than a regex, and makes no copy
    return data.count(b"\r\n") == data.count(b"\n") == data.count(b"\r")


#: to_crlf masks (1 at CR, resp. LF); above the limit it counts instead of copying twice
_CR_MASK = bytes(1 if b == 0x0D else 0 for b in range(256))
_LF_MASK = bytes(1 if b == 0x0A else 0 for b in range(256))
_MASKED_LIMIT = 1 << 20


def to_eol(data: bytes, eol: bytes) -> bytes:
    """Convert canonical CRLF data to ``eol`` (LF for files that use it)."""
    if eol == CRLF:
        return to_crlf(data)
    return data.replace(b"\r\n", b"\n")


def new_boundary() -> str:
    """A boundary that cannot occur in base64 or quoted-printable text (RFC 2046)."""
    return "=_smimeproxy_" + secrets.token_hex(12)


def build_multipart(
    headers: Iterable[HeaderField],
    subtype: str,
    parts: Iterable[bytes],
    *,
    params: str = "",
    eol: bytes = CRLF,
    boundary: str | None = None,
) -> Entity:
    """A new multipart entity with ``parts`` placed verbatim between delimiters."""
    boundary = boundary or new_boundary()
    entity = Entity([*headers], b"", eol)
    entity.set("Content-Type", f'multipart/{subtype}; {params}boundary="{boundary}"')
    delim = b"--" + boundary.encode()
    chunks: list[bytes] = []
    for part in parts:
        chunks.extend((delim, eol, part, eol))
    chunks.extend((delim, b"--", eol))
    entity.body = b"".join(chunks)  # one join: a 10 MB part is copied once
    return entity


def needs_transport_encoding(entity: Entity, max_line: int = 998) -> bool:
    """True when a leaf body is not 7bit-clean or has over-long lines (RFC 5322 2.1.1)."""
    if entity.transfer_encoding() in ("base64", "quoted-printable"):
        return False
    body = entity.body
    if not body.isascii() or b"\0" in body:
        return True
    return has_long_line(body, max_line)


def has_long_line(data: bytes, max_line: int = 998) -> bool:
    """True when a line (split at LF, a CR counted in) is longer than ``max_line``.

    Works through big bodies in slices, so a 10 MB body is never split into one list
    of lines at once.
    """
    if len(data) <= max_line:
        return False
    step = 1 << 20
    carry = 0  # length of the unfinished line at the end of the previous slice
    for start in range(0, len(data), step):
        lines = data[start : start + step].split(b"\n")
        if carry + len(lines[0]) > max_line:
            return True
        if len(lines) > 1:
            if max(map(len, lines[1:-1]), default=0) > max_line:
                return True
            carry = len(lines[-1])
        else:
            carry += len(lines[0])
        if carry > max_line:
            return True
    return False


def is_ascii(data: bytes) -> bool:
    return data.isascii()
