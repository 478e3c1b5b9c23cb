"""One decrypted message as an IMAP server would show it: sections, BINARY, BODYSTRUCTURE.

The IMAP proxy answers FETCH for S/MIME messages from the decrypted message instead of
the stored ciphertext. A client that fetches ``BODYSTRUCTURE`` first and then sections
and partials of sections (Thunderbird does) must see one consistent message, and it must
look exactly as if the upstream server held the plaintext. :class:`MessageView` parses
the message once and answers every content item of FETCH from that parse:

* ``section(spec)`` -- ``BODY[spec]`` (RFC 3501 section 6.4.5, RFC 9051 section 6.4.5);
* ``binary(spec)`` / ``binary_size(spec)`` -- ``BINARY[spec]`` (RFC 3516);
* ``bodystructure(extended)`` -- ``BODYSTRUCTURE`` / ``BODY`` in wire form (RFC 3501 7.4.2);
* :func:`partial` -- the ``<origin.length>`` suffix.

Part numbering follows Dovecot's reading of RFC 3501 exactly (it is the reference the
tests compare against, byte for byte): part ``1`` of a non-multipart message is its
body; ``n.1`` of a leaf part is that leaf; a ``message/rfc822`` part followed by more
numbers, ``HEADER`` or ``TEXT`` stands for the encapsulated message; a part that does
not exist is the empty string, as is ``HEADER`` or ``TEXT`` of a part that is not a
``message/rfc822``. ``BODYSTRUCTURE`` is computed the way Dovecot computes it (case of
types and parameters kept, ``charset us-ascii`` supplied for text parts without one,
RFC 2231 continuations merged, line counts for ``text/*`` and ``message/rfc822``).

The structure builder deliberately does not call ``twisted.mail.imap4.getBodyStructure``
or ``collapseNestedLists``: checked against Dovecot they lower-case parameter values
(boundaries included), crash on a parameter without ``=``, omit ``Content-Location``,
send ``Content-Language`` as a string instead of a list, and put a space between the
parts of a multipart, which the RFC 3501 grammar (``body-type-mpart = 1*body SP
media-subtype``) does not allow. The field order is the same as theirs.

Not guaranteed: line endings are served as they are in ``data`` (the proxy hands in
CRLF text, as servers store it; Dovecot turns bare LF into CRLF, this class does not);
a header block broken by a line that is not a header field ends at that line (Dovecot
keeps parsing); nesting deeper than :data:`MAX_DEPTH` is shown as a leaf; 8-bit bytes
in ``BODYSTRUCTURE`` strings are sent as literals (never as raw quoted 8-bit).
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from smimeproxy.errors import MalformedMessage, SMIMEProxyError
from smimeproxy.smime.mime import CRLF, MAX_PARTS, parse_entity

#: Deeper nesting than this is shown as an opaque leaf (Dovecot stops at 100; 32 is far
#: beyond real mail and keeps recursion shallow).
MAX_DEPTH = 32

#: Transfer encodings BINARY can undo (RFC 2045 section 6.1; RFC 3516 section 4.2 says
#: the server answers ``NO [UNKNOWN-CTE]`` for others).
IDENTITY_ENCODINGS = frozenset({"7bit", "8bit", "binary", ""})
KNOWN_ENCODINGS = IDENTITY_ENCODINGS | {"base64", "quoted-printable"}

_SECTION = re.compile(
    r"^(?P<part>[1-9][0-9]*(?:\.[1-9][0-9]*)*)?"
    r"(?:(?(part)\.)(?P<text>HEADER\.FIELDS\.NOT|HEADER\.FIELDS|HEADER|TEXT|MIME)"
    r"(?:\s*\((?P<names>[^()]*)\))?)?$",
    re.IGNORECASE,
)
_TOKEN = re.compile(rb"[^\x00-\x20()<>@,;:\\\"/\[\]?=\x7f]+")
_LINE_END = re.compile(rb"\r\n|\n|\r")


def partial(data: bytes, origin: int, length: int | None) -> bytes:
    """The ``<origin.length>`` slice of a fetched item (RFC 3501 section 6.4.5).

    An origin beyond the end gives the empty string; a length running past the end is
    cut at the end. Negative values are not valid IMAP and give the empty string.
    """
    if origin < 0 or (length is not None and length < 0):
        return b""
    if length is None:
        return data[origin:]
    return data[origin : origin + length]


@dataclass(eq=False)
class Part:
    """One node of the parse: a MIME header block, a body, and what the body holds.

    ``header`` is the raw header block including the empty line that ends it (absent
    when the input had none); ``children`` are the parts of a multipart, ``message``
    the encapsulated message of a ``message/rfc822`` part.
    """

    header: bytes
    body: bytes
    fields: list[tuple[str, bytes]]
    mime_type: str
    main: str
    sub: str
    params: list[tuple[str, str]]
    children: list[Part] = field(default_factory=list)
    #: where each child lies in ``body`` (start, end): BINARY[] rebuilds around them
    spans: list[tuple[int, int]] = field(default_factory=list)
    message: Part | None = None

    @property
    def is_multipart(self) -> bool:
        """Any ``multipart/*`` type, even without a boundary (then it has no parts)."""
        return self.main.lower() == "multipart"

    @property
    def is_rfc822(self) -> bool:
        return self.message is not None

    @property
    def boundary(self) -> str | None:
        for k, v in self.params:
            if k.lower() == "boundary" and v:
                return v
        return None

    def first(self, name: str) -> str | None:
        """The unfolded value of the first field called ``name`` (Dovecot uses the first)."""
        key = name.lower()
        for k, raw in self.fields:
            if k == key:
                return _unfold(raw)
        return None

    def raw_first(self, name: str) -> bytes | None:
        """The first field called ``name`` after its colon, line ends of folding kept."""
        key = name.lower()
        for k, raw in self.fields:
            if k == key:
                return raw.partition(b":")[2].strip(b" \t\r\n")
        return None

    def transfer_encoding(self) -> str:
        return (self.first("content-transfer-encoding") or "7bit").strip()


def _unfold(raw: bytes) -> str:
    """Header value after the colon with folding line ends removed (whitespace kept)."""
    _, _, rest = raw.partition(b":")
    return _LINE_END.sub(b"", rest).strip(b" \t").decode("utf-8", "surrogateescape")


def parse_part(data: bytes, default_type: str = "text/plain", depth: int = 0) -> Part:
    """Parse one entity and everything below it; never raises for odd structure.

    Raises :class:`MalformedMessage` only for the hard limits of the MIME codec
    (header fields or parts beyond ten thousand).
    """
    entity = parse_entity(data)
    header = data[: len(data) - len(entity.body)]
    fields = [(h.key, h.raw) for h in entity.headers]
    part = Part(header, entity.body, fields, "", "", "", [])
    ctype = part.first("content-type")
    main, sub, params = parse_content_type(ctype) if ctype is not None else (None, None, [])
    if main is None or sub is None:
        main, sub = default_type.split("/")
        params = []
    part.main, part.sub, part.params = main, sub, params
    part.mime_type = f"{main}/{sub}".lower()
    if depth >= MAX_DEPTH:
        part.main, part.sub, part.params = "application", "octet-stream", []
        part.mime_type = "application/octet-stream"
        return part
    if part.is_multipart:
        boundary = part.boundary
        if boundary:
            child_default = (
                "message/rfc822" if part.mime_type == "multipart/digest" else "text/plain"
            )
            body = part.body
            for start, end in split_spans(body, boundary):
                child = parse_part(body[start:end], child_default, depth + 1)
                if _ends_with_close(child) and body[end : end + 1] in (b"\r", b"\n"):
                    # Dovecot: the line end after a nested close delimiter stays with the
                    # part; only a line end not ending a delimiter line goes to the next.
                    end += 2 if body[end : end + 2] == b"\r\n" else 1
                    child = parse_part(body[start:end], child_default, depth + 1)
                part.children.append(child)
                part.spans.append((start, end))
    elif part.mime_type == "message/rfc822":
        part.message = parse_part(part.body, "text/plain", depth + 1)
    return part


def _ends_with_close(part: Part) -> bool:
    """Does ``part`` end with the close delimiter of a multipart inside it (no epilogue)?"""
    while part.message is not None:
        part = part.message
    boundary = part.boundary if part.is_multipart else None
    if not boundary or not part.body.rstrip(b" \t").endswith(b"--"):
        return False
    last = part.body.rsplit(b"\n", 1)[-1].rstrip(b" \t")
    return last == b"--" + boundary.encode("utf-8", "surrogateescape") + b"--"


def split_spans(body: bytes, boundary: str) -> list[tuple[int, int]]:
    """Where the parts of a multipart body lie (RFC 2046 section 5.1.1).

    The line end before a delimiter belongs to the delimiter. Without a close delimiter
    the last part runs to the end of the body.
    """
    if len(boundary) > 200:
        raise MalformedMessage("multipart boundary longer than 200 characters")
    delim = b"--" + boundary.encode("utf-8", "surrogateescape")
    pattern = re.compile(
        rb"(?:\A|\r\n|\n)" + re.escape(delim) + rb"(--)?[ \t]*(?=\r\n|\n|\Z)(?:\r\n|\n)?"
    )
    spans: list[tuple[int, int]] = []
    start: int | None = None
    for m in pattern.finditer(body):
        if start is not None:
            spans.append((start, m.start()))
            if len(spans) > MAX_PARTS:
                raise MalformedMessage("too many MIME parts")
        if m.group(1):
            return spans
        start = m.end()
    if start is not None:
        spans.append((start, len(body)))
    return spans


def parse_content_type(value: str) -> tuple[str | None, str | None, list[tuple[str, str]]]:
    """``(type, subtype, params)`` with case kept, as Dovecot reports them.

    ``type`` and ``subtype`` are ``None`` when the value is not ``token/token``; the
    parameters are then not used either (RFC 2045 section 5.2: default to text/plain).
    """
    raw = value.encode("utf-8", "surrogateescape")
    pos = _skip_cfws(raw, 0)
    m = _TOKEN.match(raw, pos)
    if m is None:
        return None, None, []
    main = m.group().decode("utf-8", "surrogateescape")
    pos = _skip_cfws(raw, m.end())
    if raw[pos : pos + 1] != b"/":
        # Dovecot keeps a type without subtype as it is, with an empty subtype
        return main, "", parse_params(raw, pos)
    pos = _skip_cfws(raw, pos + 1)
    m = _TOKEN.match(raw, pos)
    if m is None:
        return None, None, []
    sub = m.group().decode("utf-8", "surrogateescape")
    return main, sub, parse_params(raw, m.end())


def parse_disposition(value: str) -> tuple[str | None, list[tuple[str, str]]]:
    raw = value.encode("utf-8", "surrogateescape")
    pos = _skip_cfws(raw, 0)
    m = _TOKEN.match(raw, pos)
    if m is None:
        return None, []
    return m.group().decode("utf-8", "surrogateescape"), parse_params(raw, m.end())


def _skip_cfws(raw: bytes, pos: int) -> int:
    """Skip whitespace and (nested) comments (RFC 5322 section 3.2.2)."""
    n = len(raw)
    while pos < n:
        c = raw[pos : pos + 1]
        if c in (b" ", b"\t", b"\r", b"\n"):
            pos += 1
        elif c == b"(":
            depth = 0
            while pos < n:
                c = raw[pos : pos + 1]
                if c == b"\\":
                    pos += 2
                    continue
                if c == b"(":
                    depth += 1
                elif c == b")":
                    depth -= 1
                    if depth == 0:
                        pos += 1
                        break
                pos += 1
        else:
            break
    return pos


def _quoted(raw: bytes, pos: int) -> tuple[bytes, int]:
    """A quoted-string starting at ``raw[pos] == '"'``: (unescaped content, end)."""
    out = bytearray()
    pos += 1
    n = len(raw)
    while pos < n:
        c = raw[pos]
        if c == 0x5C and pos + 1 < n:
            out.append(raw[pos + 1])
            pos += 2
            continue
        if c == 0x22:
            return bytes(out), pos + 1
        if c not in (0x0D, 0x0A):
            out.append(c)
        pos += 1
    return bytes(out), pos


def parse_params(raw: bytes, pos: int) -> list[tuple[str, str]]:
    """``;``-separated ``name=value`` pairs, with RFC 2231 continuations merged.

    Follows Dovecot's ``rfc2231_parse``: plain parameters in order first, then each
    ``name*n[*]`` family sorted and joined into ``name`` (or ``name*`` when a piece is
    extended); a family with a missing index is kept piece by piece. Parsing stops at
    the first piece that does not fit the grammar.
    """
    plain: list[tuple[str, str]] = []
    pieces: list[tuple[str, int, bool, str]] = []
    n = len(raw)
    while True:
        pos = _skip_cfws(raw, pos)
        if pos >= n or raw[pos : pos + 1] != b";":
            break
        pos = _skip_cfws(raw, pos + 1)
        m = _TOKEN.match(raw, pos)
        if m is None:
            break
        key = m.group().decode("utf-8", "surrogateescape")
        pos = _skip_cfws(raw, m.end())
        if raw[pos : pos + 1] != b"=":
            break
        pos = _skip_cfws(raw, pos + 1)
        if raw[pos : pos + 1] == b'"':
            val_b, pos = _quoted(raw, pos)
        else:
            vm = _TOKEN.match(raw, pos)
            if vm is None:
                break
            val_b, pos = vm.group(), vm.end()
        value = val_b.decode("utf-8", "surrogateescape")
        star = key.find("*")
        if star < 0:
            plain.append((key, value))
            continue
        name, rest = key[:star], key[star + 1 :]
        digits = re.match(r"[0-9]*", rest)
        idx_text = digits.group() if digits else ""
        rest = rest[len(idx_text) :]
        extended = rest == "*"
        if rest not in ("", "*") or (idx_text == "" and not extended):
            plain.append((key, value))
            continue
        pieces.append((name, int(idx_text or "0"), extended, value))
    pieces.sort(key=lambda p: (p[0].lower(), p[1]))
    i = 0
    while i < len(pieces):
        j = i
        while j < len(pieces) and pieces[j][0].lower() == pieces[i][0].lower():
            j += 1
        family = pieces[i:j]
        if any(p[1] != k for k, p in enumerate(family)):
            for name, idx, ext, value in family:
                plain.append((f"{name}*{idx}*" if ext else f"{name}*{idx}", value))
        else:
            have_ext = any(p[2] for p in family)
            text = "''" if have_ext and not family[0][2] else ""
            for _, _, ext, value in family:
                text += _rfc2231_escape(value) if have_ext and not ext else value
            plain.append((family[0][0] + ("*" if have_ext else ""), text))
        i = j
    return plain


def _rfc2231_escape(value: str) -> str:
    out = []
    for ch in value.encode("utf-8", "surrogateescape"):
        if ch < 0x20 or ch >= 0x7F or chr(ch) in "*'%":
            out.append(f"%{ch:02X}")
        else:
            out.append(chr(ch))
    return "".join(out)


class MessageView:
    """One decrypted message, parsed once, answering FETCH content items.

    Pure and immutable after construction; safe to share between threads. Sizes and
    structure are functions of ``data`` only, so every command of a session sees the
    same message.
    """

    def __init__(self, data: bytes):
        if not isinstance(data, bytes):
            raise TypeError("MessageView takes bytes")
        self.data = data
        self.size = len(data)
        try:
            self.root = parse_part(data)
        except SMIMEProxyError:
            raise
        except (ValueError, IndexError, KeyError, TypeError, UnicodeError) as e:
            raise MalformedMessage(
                f"message structure could not be parsed: {type(e).__name__}"
            ) from None
        self._structure: dict[bool, bytes] = {}

    # -- sections -------------------------------------------------------------------
    def _resolve(self, spec: str) -> tuple[Part | None, str, list[str], bool]:
        """(part, text specifier upper-cased, header names, reached-a-message)."""
        m = _SECTION.match(spec.strip())
        if m is None:
            raise MalformedMessage(f"invalid section specifier {spec[:100]!r}")
        numbers = [int(x) for x in m.group("part").split(".")] if m.group("part") else []
        text = (m.group("text") or "").upper()
        names_text = m.group("names")
        if text.startswith("HEADER.FIELDS") != (names_text is not None):
            raise MalformedMessage(f"invalid section specifier {spec[:100]!r}")
        names = names_text.split() if names_text else []
        if text == "MIME" and not numbers:
            raise MalformedMessage("MIME needs a part number")
        if text.startswith("HEADER.FIELDS") and not names:
            raise MalformedMessage("HEADER.FIELDS needs at least one field name")
        part: Part | None = self.root
        is_message = True
        wants_message = text.startswith("HEADER") or text == "TEXT"
        for i, num in enumerate(numbers):
            assert part is not None
            more_numbers = i + 1 < len(numbers)
            is_message = False
            if part.is_multipart:
                part = part.children[num - 1] if num <= len(part.children) else None
            elif num != 1 or (more_numbers and not part.is_rfc822):
                part = None
            if part is None:
                return None, text, names, False
            if part.message is not None and (more_numbers or wants_message):
                part = part.message
                is_message = True
        return part, text, names, is_message

    def section(self, spec: str) -> bytes:
        """``BODY[spec]`` exactly as the server would send it (before any partial).

        ``spec`` is the text between the brackets, e.g. ``""``, ``"1.2.MIME"``,
        ``"HEADER.FIELDS (From To)"``. A part that does not exist gives ``b""``.
        Raises :class:`MalformedMessage` for a specifier that is not valid syntax.
        """
        part, text, names, is_message = self._resolve(spec)
        if part is None:
            return b""
        if not spec.strip():
            return self.data
        if text == "":
            return part.body
        if text == "MIME":
            return part.header
        if not is_message:
            return b""
        if text == "TEXT":
            return part.body
        if text == "HEADER":
            return part.header
        return _filter_header(part, names, negate=text == "HEADER.FIELDS.NOT")

    def header_fields(self, names: Iterable[str], negate: bool = False) -> bytes:
        """``BODY[HEADER.FIELDS (names)]`` (or ``.NOT``) of the top-level message."""
        return _filter_header(self.root, list(names), negate)

    # -- BINARY (RFC 3516) ------------------------------------------------------------
    def binary(self, spec: str) -> bytes | None:
        """``BINARY[spec]``: the part with its transfer encoding removed.

        ``None`` when the encoding is unknown (answer ``NO [UNKNOWN-CTE]``). Only part
        numbers and the empty section are valid (RFC 3516 section 4.1); anything else
        raises :class:`MalformedMessage`, as does base64 that cannot be decoded.
        """
        if not spec.strip():
            return binary_entity(self.root)
        part, text, _, _ = self._resolve(spec)
        if text:
            raise MalformedMessage("BINARY takes part numbers only")
        if part is None:
            return b""
        if part.message is not None:
            return binary_entity(part.message)
        if part.is_multipart:
            whole = binary_entity(part)
            return None if whole is None else whole[len(part.header) :]
        cte = part.transfer_encoding().lower()
        if cte not in KNOWN_ENCODINGS:
            return None
        return decode_body(part.body, cte)

    def binary_size(self, spec: str) -> int | None:
        """``BINARY.SIZE[spec]``: length of :meth:`binary`, ``None`` for an unknown CTE."""
        content = self.binary(spec)
        return None if content is None else len(content)

    # -- BODYSTRUCTURE ----------------------------------------------------------------
    def bodystructure(self, extended: bool = True) -> bytes:
        """The parenthesised ``BODYSTRUCTURE`` (``extended``) or ``BODY`` value."""
        cached = self._structure.get(extended)
        if cached is None:
            cached = encode(body_structure(self.root, extended))
            self._structure[extended] = cached
        return cached


def binary_entity(part: Part) -> bytes | None:
    """A whole entity with every leaf decoded and its CTE field rewritten to ``binary``.

    What Dovecot sends for ``BINARY[]``; ``None`` when any leaf has an unknown encoding.
    """
    if part.is_multipart:
        out = bytearray(part.header)
        pos = 0
        for (start, end), child in zip(part.spans, part.children, strict=True):
            inner = binary_entity(child)
            if inner is None:
                return None
            out += part.body[pos:start] + inner
            pos = end
        return bytes(out + part.body[pos:])
    if part.message is not None:
        inner = binary_entity(part.message)
        return None if inner is None else part.header + inner
    cte = part.transfer_encoding().lower()
    if cte not in KNOWN_ENCODINGS:
        return None
    if cte in IDENTITY_ENCODINGS:
        return part.header + part.body
    # Dovecot drops the field where it stood and appends the new one to the header block
    kept = b"".join(raw for key, raw in part.fields if key != "content-transfer-encoding")
    end = part.header[sum(len(raw) for _, raw in part.fields) :]
    return kept + b"Content-Transfer-Encoding: binary\r\n" + end + decode_body(part.body, cte)


def _filter_header(part: Part, names: Sequence[str], negate: bool) -> bytes:
    """Matching (or, negated, non-matching) header fields in order, then an empty line.

    Like Dovecot: ``HEADER.FIELDS`` always ends with an empty line; ``.NOT`` keeps the
    original end of the header block (so a message without one gets none).
    """
    wanted = {n.lower() for n in names}
    kept = [raw for key, raw in part.fields if (key in wanted) != negate]
    if negate:
        end = part.header[sum(len(raw) for _, raw in part.fields) :]
        return b"".join(kept) + end
    return b"".join(kept) + CRLF


def decode_body(body: bytes, cte: str) -> bytes:
    """Remove a known Content-Transfer-Encoding, leniently where servers are lenient."""
    if cte in IDENTITY_ENCODINGS:
        return body
    if cte == "base64":
        return decode_base64(body)
    if cte == "quoted-printable":
        return decode_quoted_printable(body)
    raise MalformedMessage(f"unknown Content-Transfer-Encoding {cte[:40]!r}")


_BASE64 = re.compile(rb"[A-Za-z0-9+/ \t\r\n]*(?:=[ \t\r\n]*){0,2}")


def decode_base64(body: bytes) -> bytes:
    """Base64 with whitespace anywhere (RFC 2045 section 6.8); other characters are
    refused with :class:`MalformedMessage`, as Dovecot answers ``NO [PARSE]``."""
    if _BASE64.fullmatch(body) is None:
        raise MalformedMessage("base64 body holds characters outside the alphabet")
    cleaned = re.sub(rb"[^A-Za-z0-9+/]", b"", body)
    if len(cleaned) % 4 == 1:
        raise MalformedMessage("base64 body has a dangling character")
    try:
        return binascii.a2b_base64(cleaned + b"=" * (-len(cleaned) % 4))
    except binascii.Error:
        raise MalformedMessage("base64 body could not be decoded") from None


_QP_ESCAPE = re.compile(rb"=([0-9A-Fa-f]{2})|=")


def _qp_byte(m: re.Match[bytes]) -> bytes:
    if m.group(1) is None:
        raise MalformedMessage("invalid quoted-printable escape")
    return bytes([int(m.group(1), 16)])


def decode_quoted_printable(body: bytes) -> bytes:
    """RFC 2045 section 6.7: trailing whitespace dropped, soft line breaks joined.

    An ``=`` not followed by two hex digits or a line end raises
    :class:`MalformedMessage`, as Dovecot answers ``NO [PARSE]`` for it.
    """
    out = bytearray()
    pieces = re.split(rb"(\r\n|\n)", body)
    for i in range(0, len(pieces), 2):
        line = pieces[i].rstrip(b" \t")
        eol = pieces[i + 1] if i + 1 < len(pieces) else b""
        soft = line.endswith(b"=")
        if soft and not eol:
            # Dovecot refuses a soft break with nothing after it ("invalid trailer")
            raise MalformedMessage("quoted-printable ends in a soft line break")
        if soft:
            line = line[:-1]
        out += _QP_ESCAPE.sub(_qp_byte, line)
        if not soft:
            out += eol
    return bytes(out)


# -- BODYSTRUCTURE and ENVELOPE (RFC 3501 section 7.4.2), computed like Dovecot --------


class Literal(str):
    """A string Dovecot sends as a literal although it could be quoted (a folded value)."""


class Adjacent(list):  # type: ignore[type-arg]
    """Items written one after the other with no separator and no parentheses.

    RFC 3501 juxtaposes the parts of a multipart (``1*body``) and the addresses of an
    address list (``"(" 1*address ")"``).
    """


Item = None | int | str | list  # type: ignore[type-arg]


def body_structure(part: Part, extended: bool) -> list:  # type: ignore[type-arg]
    """The nested-list form of ``BODYSTRUCTURE`` (``extended``) or ``BODY`` of ``part``."""
    if part.is_multipart:
        result: list = [  # type: ignore[type-arg]
            Adjacent(body_structure(child, extended) for child in part.children)
            or Adjacent([_empty_part(extended)]),
            part.sub,
        ]
        if extended:
            result += [
                _params(part.params) or None,
                _disposition(part),
                _language(part),
                part.first("content-location"),
            ]
        return result
    main, sub, params = part.main, part.sub, list(part.params)
    if main.lower() == "text" and not any(k.lower() == "charset" for k, _ in params):
        params.append(("charset", "us-ascii"))
    cte = part.first("content-transfer-encoding")
    result = [
        main,
        sub,
        _params(params) or None,
        part.first("content-id"),
        part.first("content-description"),
        cte.strip() if cte is not None else "7bit",
        len(part.body),
    ]
    if main.lower() == "text":
        result.append(part.body.count(b"\n"))
    elif part.message is not None:
        result += [
            envelope(part.message),
            body_structure(part.message, extended),
            part.body.count(b"\n"),
        ]
    if extended:
        result += [
            part.first("content-md5"),
            _disposition(part),
            _language(part),
            part.first("content-location"),
        ]
    return result


def _empty_part(extended: bool) -> list:  # type: ignore[type-arg]
    result: list = ["text", "plain", ["charset", "us-ascii"], None, None, "7bit", 0, 0]  # type: ignore[type-arg]
    return [*result, None, None, None, None] if extended else result


def _params(params: Sequence[tuple[str, str]]) -> list[str]:
    return [x for pair in params for x in pair]


def _disposition(part: Part) -> list | None:  # type: ignore[type-arg]
    value = part.first("content-disposition")
    if value is None:
        return None
    kind, params = parse_disposition(value)
    if kind is None:
        return None
    return [kind, _params(params) or None]


def _language(part: Part) -> list[str] | None:
    value = part.first("content-language")
    if value is None:
        return None
    tags = [t for t in re.split(r"[\s,]+", re.sub(r"\([^()]*\)", " ", value)) if t]
    return tags or None


def envelope(message: Part) -> list:  # type: ignore[type-arg]
    """ENVELOPE of an encapsulated message (RFC 3501 section 7.4.2), raw values as Dovecot.

    Sender and Reply-To default to From (RFC 3501). Encoded words are not decoded.
    """
    sender = _addresses(message.first("from"))

    def text(name: str) -> str | None:
        value = message.first(name)
        raw = message.raw_first(name)
        return Literal(value) if value is not None and raw and b"\n" in raw else value

    def addr(name: str, default: list | None = None) -> list | None:  # type: ignore[type-arg]
        value = _addresses(message.first(name))
        return value if value is not None else default

    return [
        text("date"),
        text("subject"),
        sender,
        addr("sender", sender),
        addr("reply-to", sender),
        addr("to"),
        addr("cc"),
        addr("bcc"),
        text("in-reply-to"),
        text("message-id"),
    ]


_ADDR_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"?|\((?:\\.|[^()\\])*\)?|[<>@,;:]|[^\s<>@,;:"(]+')


def _addresses(value: str | None) -> list | None:  # type: ignore[type-arg]
    """An address list as IMAP address structures; ``None`` for an absent/empty header."""
    if value is None:
        return None
    all_tokens = _ADDR_TOKEN.findall(value)
    tokens = [t for t in all_tokens if not t.startswith("(")]
    out: list[list[str | None]] = []
    i = 0
    n = len(tokens)
    in_group = False

    def word(t: str) -> str:
        if t.startswith('"'):
            return re.sub(r"\\(.)", r"\1", t[1:-1] if t.endswith('"') and len(t) > 1 else t[1:])
        return t

    while i < n:
        phrase: list[str] = []
        while i < n and tokens[i] not in ("<", "@", ":", ",", ";"):
            phrase.append(tokens[i])
            i += 1
        stop = tokens[i] if i < n else ""
        if stop == ":" and not in_group:
            out.append([None, None, " ".join(word(t) for t in phrase), None])
            in_group = True
            i += 1
            continue
        if stop == "<":
            i += 1
            route: list[str] = []
            inner: list[str] = []
            while i < n and tokens[i] != ">":
                inner.append(tokens[i])
                i += 1
            i += 1
            if ":" in inner:
                k = inner.index(":")
                route, inner = inner[:k], inner[k + 1 :]
            local, host = _split_addr(inner, word)
            name = " ".join(word(t) for t in phrase) or None
            adl = "".join(route) or None
            out.append([name, adl, local or MISSING_MAILBOX, host or MISSING_DOMAIN])
        elif stop == "@":
            rest: list[str] = []
            while i < n and tokens[i] not in (",", ";"):
                rest.append(tokens[i])
                i += 1
            local, host = _split_addr(phrase + rest, word)
            out.append([_comment_name(value, local), None, local, host or MISSING_DOMAIN])
        elif phrase:
            local = "".join(word(t) for t in phrase)
            out.append([_comment_name(value, local), None, local, MISSING_DOMAIN])
        if i < n and tokens[i] == ";" and in_group:
            out.append([None, None, None, None])
            in_group = False
        i += 1
    if in_group:
        out.append([None, None, None, None])
    return [Adjacent(out)] if out else None


#: What Dovecot fills in for a missing part of an address (lib-mail/message-address.c).
MISSING_MAILBOX = "MISSING_MAILBOX"
MISSING_DOMAIN = "MISSING_DOMAIN"


def _comment_name(value: str, local: str) -> str | None:
    """The comment after an addr-spec (``a@b (Name)``) as the name, as Dovecot does."""
    m = re.search(re.escape(local) + r"[^,;(]*\(((?:\\.|[^()\\])*)\)", value)
    return re.sub(r"\\(.)", r"\1", m.group(1)) if m else None


def _split_addr(tokens: list[str], word) -> tuple[str, str | None]:  # type: ignore[no-untyped-def]
    if "@" in tokens:
        k = len(tokens) - 1 - tokens[::-1].index("@")
        return "".join(word(t) for t in tokens[:k]), "".join(tokens[k + 1 :]) or None
    return "".join(word(t) for t in tokens), None


def encode(item: object) -> bytes:
    """IMAP wire form: NIL, numbers, quoted strings (literals where quoting is unsafe)."""
    if item is None:
        return b"NIL"
    if isinstance(item, bool):
        raise TypeError("no booleans in IMAP structures")
    if isinstance(item, int):
        return b"%d" % item
    if isinstance(item, Literal):
        raw = item.encode("utf-8", "surrogateescape")
        return b"{%d}\r\n" % len(raw) + raw
    if isinstance(item, str):
        return _string(item.encode("utf-8", "surrogateescape"))
    if isinstance(item, bytes):
        return _string(item)
    if isinstance(item, Adjacent):
        return b"".join(encode(x) for x in item)
    if isinstance(item, list):
        return b"(" + b" ".join(encode(x) for x in item) + b")"
    raise TypeError(f"cannot encode {type(item).__name__}")


_QUOTABLE = re.compile(rb"[\x20-\x7e]*")


def _string(raw: bytes) -> bytes:
    """A quoted string, or a literal when it holds CR, LF, NUL or 8-bit bytes."""
    if len(raw) <= 1024 and _QUOTABLE.fullmatch(raw):
        return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(raw) + raw
