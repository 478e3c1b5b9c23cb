"""FETCH of S/MIME messages answered from the decrypted message (RFC 3501 6.4.5, 7.4.2).

The proxy forwards the client's FETCH unchanged, so ENVELOPE, FLAGS, INTERNALDATE, UID,
MODSEQ and the server's ``\\Seen`` handling for non-PEEK fetches stay the server's.  For
each message it has decrypted, it replaces the content items of the server's response
(BODY[...], BINARY, BINARY.SIZE, BODYSTRUCTURE, BODY, RFC822*, RFC822.SIZE) with the
same items computed from the decrypted :class:`~smimeproxy.imap.views.MessageView`, named
as the client asked for them.

Which messages: a top-level ``application/pkcs7-mime`` (or ``x-pkcs7-mime``) that is not
``smime-type=certs-only``; i.e. enveloped and authEnveloped data and opaque signed data,
all of which a mail client without S/MIME cannot read.  ``multipart/signed`` stays as
the server has it (any client can read it; verification happened on entry at the
gateway).  A message the user's keys cannot open passes through unchanged.

BINARY or BINARY.SIZE of a part whose transfer encoding is unknown ends that message's
response before the item and fails the command with ``NO [UNKNOWN-CTE]``, as Dovecot
does (RFC 3516 section 4.2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from smimeproxy.errors import MalformedMessage
from smimeproxy.imap.wire import Atom, LiteralHeader, Message, Token

#: RFC 3501 6.4.5 macros
MACROS = {
    b"ALL": (b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE"),
    b"FAST": (b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE"),
    b"FULL": (b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE", b"BODY"),
}

_CONTENT_SIMPLE = frozenset(
    {b"BODY", b"BODYSTRUCTURE", b"RFC822", b"RFC822.HEADER", b"RFC822.TEXT", b"RFC822.SIZE"}
)
_SECTIONED = re.compile(
    rb"(BODY|BODY\.PEEK|BINARY|BINARY\.PEEK|BINARY\.SIZE)\[([^\]]*)\](?:<([0-9]+)(?:\.([0-9]+))?>)?\Z",
    re.IGNORECASE,
)

#: RFC 8551 3.2.2: the media types of CMS content in MIME
PKCS7_TYPES = (b"application/pkcs7-mime", b"application/x-pkcs7-mime")


@dataclass(frozen=True)
class ContentItem:
    """One requested content item: ``kind`` BODY/BINARY/BINARY.SIZE/RFC822... and section."""

    kind: bytes
    section: bytes = b""
    origin: int | None = None
    length: int | None = None
    peek: bool = False

    @property
    def sets_seen(self) -> bool:
        return (self.kind in (b"BODY[", b"BINARY[") and not self.peek) or self.kind in (
            b"RFC822",
            b"RFC822.TEXT",
        )

    def response_name(self) -> bytes:
        if self.kind in (b"BODY[", b"BINARY[", b"BINARY.SIZE["):
            name = self.kind + self.section + b"]"
            if self.origin is not None and self.kind != b"BINARY.SIZE[":
                name += b"<%d>" % self.origin
            return name
        return self.kind


def parse_items(tokens: list[Token]) -> tuple[list[bytes], list[ContentItem]]:
    """``(all item names, content items)`` of a FETCH item list (a list or one atom)."""
    names: list[bytes] = []
    content: list[ContentItem] = []
    for token in tokens:
        if not isinstance(token, Atom):
            raise MalformedMessage("bad FETCH item")
        word = bytes(token).upper()
        for name in MACROS.get(word, (word,)):
            names.append(name)
            item = content_item(name if name in MACROS.get(word, ()) else bytes(token))
            if item is not None:
                content.append(item)
    return names, content


def content_item(name: bytes) -> ContentItem | None:
    """The content item a FETCH attribute names, or None for a server-owned one."""
    upper = name.upper()
    if upper in _CONTENT_SIMPLE:
        return ContentItem(upper)
    match = _SECTIONED.match(name)
    if match is None:
        return None
    kind = match.group(1).upper()
    peek = kind.endswith(b".PEEK")
    base = kind.replace(b".PEEK", b"")
    origin = int(match.group(3)) if match.group(3) is not None else None
    length = int(match.group(4)) if match.group(4) is not None else None
    section = b" ".join(match.group(2).split()).upper()
    return ContentItem(base + b"[", section, origin, length, peek)


def fetch_arguments(tokens: list[Token]) -> tuple[bytes, list[Token], list[Token]]:
    """Split ``FETCH`` arguments into (sequence set, item tokens, modifier tokens)."""
    if len(tokens) < 2 or not isinstance(tokens[0], Atom):
        raise MalformedMessage("FETCH needs a sequence set and items")
    items = tokens[1] if isinstance(tokens[1], list) else [tokens[1]]
    modifiers = tokens[2] if len(tokens) > 2 and isinstance(tokens[2], list) else []
    return bytes(tokens[0]), items, modifiers


def is_smime(content_type_header: bytes) -> bool:
    """Whether a ``Content-Type`` header (name included or not) is CMS content to open."""
    value = content_type_header.lower()
    value = re.sub(rb"\s+", b" ", value)
    if b":" in value.split(b";")[0]:
        value = value.split(b":", 1)[1]
    mtype = value.split(b";")[0].strip()
    if mtype not in PKCS7_TYPES:
        return False
    return b"certs-only" not in value


def section_value(view: object, item: ContentItem) -> bytes | int | None:
    """What the decrypted view says for ``item`` (bytes, a number, or None for NIL)."""
    from smimeproxy.imap.views import partial  # the content layer (pure)

    v = view  # MessageView
    if item.kind == b"RFC822.SIZE":
        return int(v.size)  # type: ignore[attr-defined]
    if item.kind == b"BODYSTRUCTURE":
        return v.bodystructure(True)  # type: ignore[attr-defined,no-any-return]
    if item.kind == b"BODY":
        return v.bodystructure(False)  # type: ignore[attr-defined,no-any-return]
    if item.kind == b"RFC822":
        return v.section("")  # type: ignore[attr-defined,no-any-return]
    if item.kind == b"RFC822.HEADER":
        return v.section("HEADER")  # type: ignore[attr-defined,no-any-return]
    if item.kind == b"RFC822.TEXT":
        return v.section("TEXT")  # type: ignore[attr-defined,no-any-return]
    spec = item.section.decode("ascii", "replace")
    if item.kind == b"BINARY.SIZE[":
        size = v.binary_size(spec)  # type: ignore[attr-defined]
        return int(size) if size is not None else None
    if item.kind == b"BINARY[":
        data = v.binary(spec)  # type: ignore[attr-defined]
        if data is None:
            return None
    else:
        data = v.section(spec)  # type: ignore[attr-defined]
    if item.origin is not None:
        data = partial(data, item.origin, item.length)
    return bytes(data)


#: the tagged answer when a BINARY item meets an unknown transfer encoding (RFC 3516 4.2)
UNKNOWN_CTE = b"NO [UNKNOWN-CTE] Unknown Content-Transfer-Encoding"


def render_item(view: object, item: ContentItem) -> bytes | None:
    """``NAME value`` for one content item, literals for data; None when BINARY cannot
    undo the part's transfer encoding."""
    parts = _item_parts(view, item)
    return None if parts is None else b"".join(parts)


def _item_parts(view: object, item: ContentItem) -> list[bytes] | None:
    """:func:`render_item` as pieces, so a large literal is copied once, when the whole
    response is joined."""
    value = section_value(view, item)
    if value is None:
        return None
    name = item.response_name()
    if isinstance(value, int):
        return [name, b" %d" % value]
    if item.kind in (b"BODYSTRUCTURE", b"BODY"):
        return [name, b" ", bytes(value or b"NIL")]
    assert value is not None
    if item.kind == b"BINARY[" and b"\x00" in value:
        return [name, b" ~", LiteralHeader(len(value)).encode(), value]
    return [name, b" ", LiteralHeader(len(value)).encode(), value]


def rewrite_response(
    message: Message, view: object, items: list[ContentItem], failures: list[bytes] | None = None
) -> bytes:
    """A server ``* n FETCH (...)`` with content items replaced from ``view``; the
    server's other items are copied as they came (octet for octet).  An item BINARY
    cannot produce ends the response there and appends :data:`UNKNOWN_CTE` to
    ``failures`` (the caller fails the command).  Built as pieces and joined once (a
    decrypted body is copied once, not once per concatenation)."""
    return rewrite_items(*fetch_items(message.encode()), view, items, failures)


def rewrite_items(
    seq: bytes,
    pairs: list[tuple[bytes, bytes]],
    view: object,
    items: list[ContentItem],
    failures: list[bytes] | None = None,
) -> bytes:
    """:func:`rewrite_response` of a response already split by :func:`fetch_items`."""
    out = [b"* ", seq, b" FETCH ("]
    for name, raw in pairs:
        if content_item(name) is None:
            out += (name, b" ", raw, b" ")
    for item in _unique(items):
        rendered = _item_parts(view, item)
        if rendered is None:
            if failures is not None:
                failures.append(UNKNOWN_CTE)
            break
        out += rendered
        out.append(b" ")
    if out[-1] == b" ":
        out.pop()
    out.append(b")\r\n")
    return b"".join(out)


_FETCH_START = re.compile(rb"\* ([0-9]+) FETCH \(", re.IGNORECASE)
_LIST_TOKEN = re.compile(rb'(\()|(\))|("(?:[^"\\\r\n]|\\[^\r\n])*")|~?\{([0-9]+)\+?\}\r\n|(")')
_QUOTED = re.compile(rb'"(?:[^"\\\r\n]|\\[^\r\n])*"')
_LITERAL = re.compile(rb"~?\{([0-9]+)\+?\}\r\n")
_NAME = re.compile(rb"(?:[^ ()\r\n\"{\[]|\[[^\]\r\n]*\]?)+")


def fetch_items(data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """``(seq, [(item name, raw value bytes)])`` of one whole FETCH response on the wire.

    Only structural characters are visited (parentheses, quotes, literal headers), so
    large ENVELOPE/BODYSTRUCTURE values cost little.  MalformedMessage if it is not one.
    """
    start = _FETCH_START.match(data)
    if start is None:
        raise MalformedMessage("not a FETCH response")
    pos = start.end()
    items: list[tuple[bytes, bytes]] = []
    n = len(data)
    while True:
        while pos < n and data[pos] == 0x20:
            pos += 1
        if pos >= n:
            raise MalformedMessage("unterminated FETCH response")
        if data[pos] == 0x29:  # )
            return start.group(1), items
        name = _NAME.match(data, pos)
        if name is None:
            raise MalformedMessage("bad FETCH item name")
        pos = name.end()
        if pos < n and data[pos] == 0x20:
            pos += 1
        end = _skip_value(data, pos)
        items.append((name.group(0), data[pos:end]))
        pos = end


def _skip_value(data: bytes, pos: int) -> int:
    n = len(data)
    if pos >= n:
        raise MalformedMessage("missing FETCH value")
    c = data[pos]
    if c == 0x22:
        m = _QUOTED.match(data, pos)
        if m is None:
            raise MalformedMessage("bad quoted string")
        return m.end()
    if c == 0x7B or c == 0x7E:
        m = _LITERAL.match(data, pos)
        if m is None:
            raise MalformedMessage("bad literal")
        return m.end() + int(m.group(1))
    if c != 0x28:
        m = _NAME.match(data, pos)
        if m is None:
            raise MalformedMessage("bad FETCH value")
        return m.end()
    # a list: one C-level iteration step per parenthesis, quoted string or literal
    depth = 0
    while True:
        for m in _LIST_TOKEN.finditer(data, pos):
            kind = m.lastindex
            if kind == 1:
                depth += 1
            elif kind == 2:
                depth -= 1
                if depth == 0:
                    return m.end()
            elif kind == 4:
                pos = m.end() + int(m.group(4))  # literal octets are not looked at
                break
            elif kind == 5:
                raise MalformedMessage("bad quoted string")
        else:
            raise MalformedMessage("unbalanced parenthesis")


def content_kinds(names: list[bytes]) -> frozenset[bytes]:
    """The kinds (``BODY[``, ``RFC822.SIZE``, ...) of the content items among FETCH item
    names, as requested (``BODY.PEEK[...]``) or as answered (``BODY[...]<n>``)."""
    found = (content_item(name) for name in names)
    return frozenset(item.kind for item in found if item is not None)


def _unique(items: list[ContentItem]) -> list[ContentItem]:
    seen: set[bytes] = set()
    out = []
    for item in items:
        key = item.response_name()
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def fetch_response_ids(message_head: bytes) -> tuple[int, int | None] | None:
    """``(seq, uid or None)`` from the first physical line of ``* n FETCH (...``."""
    match = re.match(rb"\* ([0-9]+) FETCH \((?:.*?\bUID ([0-9]+))?", message_head, re.IGNORECASE)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)) if match.group(2) else None
