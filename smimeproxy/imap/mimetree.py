"""The MIME tree of a message as an IMAP server parses it (Dovecot's reading).

:class:`Part` nodes hold the raw header block and body of each entity, the parts of a
multipart with their positions, and the encapsulated message of a ``message/rfc822``
part. Header values are parsed the way Dovecot parses them for ``BODYSTRUCTURE``: case
kept, a type without subtype kept with an empty subtype, RFC 2231 continuations merged
(``rfc2231_parse``), ``multipart/digest`` parts defaulting to ``message/rfc822``, and
the line end after a nested close delimiter kept with the part it closes.

Not guaranteed: a header block broken by a line that is not a header field ends at that
line (Dovecot keeps parsing); nesting deeper than :data:`MAX_DEPTH` is an opaque
``application/octet-stream`` leaf; a multipart's own boundary is the only one looked for
inside it (a part cut short by an enclosing boundary is cut by the enclosing split first,
which gives the same result for every message we have seen).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from smimeproxy.errors import MalformedMessage
from smimeproxy.smime.mime import MAX_PARTS, parse_entity

#: Deeper nesting than this is shown as an opaque leaf (Dovecot stops at 100; 32 is far
#: beyond real mail and keeps recursion shallow).
MAX_DEPTH = 32

_TOKEN = re.compile(rb"[^\x00-\x20()<>@,;:\\\"/\[\]?=\x7f]+")
_LINE_END = re.compile(rb"\r\n|\n|\r")


@dataclass(eq=False)
class Part:
    """One node of the parse: a MIME header block, a body, and what the body holds.

    ``header`` is the raw header block including the empty line that ends it (absent
    when the input had none); ``children`` are the parts of a multipart, ``message``
    the encapsulated message of a ``message/rfc822`` part. Every node refers to the one
    message buffer by offsets, so the tree costs about the size of the header fields,
    not another copy of the message per nesting level; ``header`` and ``body`` are
    sliced out when asked for.
    """

    buf: bytes = field(repr=False)
    start: int
    body_start: int
    end: int
    fields: list[tuple[str, bytes]]
    mime_type: str
    main: str
    sub: str
    params: list[tuple[str, str]]
    children: list[Part] = field(default_factory=list)
    #: where each child lies in ``body`` (start, end): BINARY[] rebuilds around them
    spans: list[tuple[int, int]] = field(default_factory=list)
    message: Part | None = None
    #: a message header (the top level or an encapsulated message), not a MIME part header
    is_message: bool = False

    @property
    def header(self) -> bytes:
        return self.buf[self.start : self.body_start]

    @property
    def body(self) -> bytes:
        return self.buf[self.body_start : self.end]

    @property
    def body_size(self) -> int:
        return self.end - self.body_start

    def body_lines(self) -> int:
        """Line ends in the body, as IMAP counts lines (RFC 3501 section 7.4.2)."""
        return self.buf.count(b"\n", self.body_start, self.end)

    @property
    def is_multipart(self) -> bool:
        """Any ``multipart/*`` type, even without a boundary (then it has no parts)."""
        return self.main.lower() == "multipart"

    @property
    def ignores_content_fields(self) -> bool:
        """A message header without MIME-Version and Content-Type: Dovecot then reports
        the RFC 2045 defaults and ignores every other Content-* field."""
        return (
            self.is_message
            and self.first("mime-version") is None
            and (self.first("content-type") is None)
        )

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


def parse_part(
    buf: bytes,
    start: int = 0,
    end: int | None = None,
    default_type: str = "text/plain",
    depth: int = 0,
    *,
    is_message: bool = True,
) -> Part:
    """Parse the entity ``buf[start:end]`` and everything below it.

    Never raises for odd structure; raises :class:`MalformedMessage` only for the hard
    limits of the MIME codec (header fields or parts beyond ten thousand).
    """
    end = len(buf) if end is None else end
    data = buf if (start, end) == (0, len(buf)) else buf[start:end]
    entity = parse_entity(data)
    body_start = start + len(data) - len(entity.body)
    del data
    fields = [(h.key, h.raw) for h in entity.headers]
    part = Part(buf, start, body_start, end, fields, "", "", "", [], is_message=is_message)
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
            base = body_start
            for rel_start, rel_end in split_spans(entity.body, boundary):
                a, b = base + rel_start, base + rel_end
                child = parse_part(buf, a, b, child_default, depth + 1, is_message=False)
                if _ends_with_close(child) and buf[b : b + 1] in (b"\r", b"\n") and b < end:
                    # Dovecot: the line end after a nested close delimiter stays with the
                    # part; only a line end not ending a delimiter line goes to the next.
                    b += 2 if buf[b : b + 2] == b"\r\n" and b + 1 < end else 1
                    child = parse_part(buf, a, b, child_default, depth + 1, is_message=False)
                part.children.append(child)
                part.spans.append((a - base, b - base))
    elif part.mime_type == "message/rfc822":
        part.message = parse_part(buf, body_start, end, "text/plain", depth + 1)
    return part


def _ends_with_close(part: Part) -> bool:
    """Does ``part`` end with the close delimiter of a multipart inside it (no epilogue)?"""
    while part.message is not None:
        part = part.message
    boundary = part.boundary if part.is_multipart else None
    if not boundary:
        return False
    close = b"--" + boundary.encode("utf-8", "surrogateescape") + b"--"
    tail = part.buf[max(part.body_start, part.end - len(close) - 200) : part.end]
    last = tail.rsplit(b"\n", 1)[-1].rstrip(b" \t")
    return last == close


def split_spans(body: bytes, boundary: str) -> list[tuple[int, int]]:
    """Where the parts of a multipart body lie (RFC 2046 section 5.1.1).

    The line end before a delimiter belongs to the delimiter. Without a close delimiter
    the last part runs to the end of the body.
    """
    if len(boundary) > 200:
        raise MalformedMessage("multipart boundary longer than 200 characters")
    delim = b"--" + boundary.encode("utf-8", "surrogateescape")
    spans: list[tuple[int, int]] = []
    start: int | None = None
    # bytes.find for the delimiter, then its line context checked: the same matches as
    # ``(?:\A|\r\n|\n)--boundary(--)?[ \t]*(?=\r\n|\n|\Z)(?:\r\n|\n)?`` scanned
    # left to right without overlap, at C speed (a regex with that leading alternation
    # tries every position of a large body)
    searched = 0  # matches do not overlap: a line end used by one is not another's
    pos = 0
    while True:
        i = body.find(delim, pos)
        if i < 0:
            break
        pos = i + 1
        if i == 0:
            begin = 0
        elif body[i - 1] == 0x0A and i - 1 >= searched:
            begin = i - 2 if i - 2 >= searched and body[i - 2] == 0x0D else i - 1
        else:
            continue
        m = _DELIMITER_TAIL.match(body, i + len(delim))
        if m is None:
            continue
        if start is not None:
            spans.append((start, begin))
            if len(spans) > MAX_PARTS:
                raise MalformedMessage("too many MIME parts")
        if m.group(1):
            return spans
        start = searched = pos = m.end()
    if start is not None:
        spans.append((start, len(body)))
    return spans


_DELIMITER_TAIL = re.compile(rb"(--)?[ \t]*(?=\r\n|\n|\Z)(?:\r\n|\n)?")


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
        if rest == "":  # "name*": one extended piece (Dovecot reads it as index 0)
            pieces.append((name, 0, True, value))
            continue
        idx_text = re.match(r"[0-9]*", rest).group()  # type: ignore[union-attr]
        rest = rest[len(idx_text) :]
        if rest not in ("", "*"):
            plain.append((key, value))
            continue
        pieces.append((name, int(idx_text or "0"), rest == "*", value))
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
