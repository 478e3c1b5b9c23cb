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

Not guaranteed: BINARY of a part whose transfer encoding the view cannot decode is
answered with the undecoded section (servers would say NO [UNKNOWN-CTE]).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from smimeproxy.errors import MalformedMessage
from smimeproxy.imap.wire import Atom, Message, String, Token, literal, tokenize

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
        return int(size) if size is not None else len(v.section(spec))  # type: ignore[attr-defined]
    if item.kind == b"BINARY[":
        data = v.binary(spec)  # type: ignore[attr-defined]
        if data is None:
            data = v.section(spec)  # type: ignore[attr-defined]
    else:
        data = v.section(spec)  # type: ignore[attr-defined]
    if item.origin is not None:
        data = partial(data, item.origin, item.length)
    return bytes(data)


def render_item(view: object, item: ContentItem) -> bytes:
    """``NAME value`` for one content item, literals for data."""
    value = section_value(view, item)
    name = item.response_name()
    if isinstance(value, int):
        return name + b" %d" % value
    if item.kind in (b"BODYSTRUCTURE", b"BODY"):
        return name + b" " + bytes(value or b"NIL")
    assert value is not None
    if item.kind == b"BINARY[" and b"\x00" in value:
        return name + b" ~" + literal(value)
    return name + b" " + literal(value)


def rewrite_response(message: Message, view: object, items: list[ContentItem]) -> bytes:
    """A server ``* n FETCH (...)`` with content items replaced from ``view``."""
    tokens = tokenize(message)
    if len(tokens) < 4 or tokens[0] != b"*" or not isinstance(tokens[3], list):
        raise MalformedMessage("not a FETCH response")
    seq = bytes(tokens[1])
    pairs = tokens[3]
    kept: list[bytes] = []
    i = 0
    while i + 1 < len(pairs):
        name, value = pairs[i], pairs[i + 1]
        i += 2
        if isinstance(name, Atom) and content_item(bytes(name)) is None:
            kept.append(bytes(name) + b" " + _encode_value(value))
    out = [*kept, *(render_item(view, item) for item in _unique(items))]
    return b"* " + seq + b" FETCH (" + b" ".join(out) + b")\r\n"


def _unique(items: list[ContentItem]) -> list[ContentItem]:
    seen: set[bytes] = set()
    out = []
    for item in items:
        key = item.response_name()
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def _encode_value(value: Token) -> bytes:
    if isinstance(value, list):
        return b"(" + b" ".join(_encode_value(v) for v in value) + b")"
    if isinstance(value, String):
        return (
            literal(bytes(value))
            if (b"\r" in value or b"\n" in value or b'"' in value)
            else (b'"' + bytes(value).replace(b"\\", b"\\\\") + b'"')
        )
    return bytes(value)


def fetch_response_ids(message_head: bytes) -> tuple[int, int | None] | None:
    """``(seq, uid or None)`` from the first physical line of ``* n FETCH (...``."""
    match = re.match(rb"\* ([0-9]+) FETCH \((?:.*?\bUID ([0-9]+))?", message_head, re.IGNORECASE)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)) if match.group(2) else None
